//! Atomic updates under traffic: one thread runs new-flow packets through
//! the real program (BPF_PROG_TEST_RUN on a second handle that adopted the
//! same pinned maps) while another replaces the VIP's backends hundreds of
//! times, rotating three disjoint backend sets so every backend id is
//! released and reused with a new generation over and over. Every packet
//! must be forwarded (XDP_TX) to a backend of a config that was live while
//! it ran: a half-written table, a slot naming an id that is not (or no
//! longer) programmed, or a reused id carrying an old owner would show up as
//! a drop or a foreign MAC.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_tests::{
    packet::{PacketBuilder, TcpFlags, decode},
    pins::PinDir,
    scenario::{CLIENT_MAC, LB_MAC, VIP_V4, spec, vip},
};
use lb_userspace::{
    datapath::{Datapath, LoadOptions},
    model::{BackendSpec, BackendState, DataplaneSpec, ForwardingMode, MacAddr, Protocol},
    plan::{IdAllocator, plan},
};

const XDP_TX: u32 = 3;
const SWAPS: u64 = 300;
const TIME_LIMIT: Duration = Duration::from_mins(1);

/// Backend set `set` (0..3): three backends with their own MACs.
fn backends(set: u8) -> Vec<BackendSpec> {
    (0..3)
        .map(|i| {
            let n = set * 10 + i + 1;
            BackendSpec {
                address: IpAddr::V4(Ipv4Addr::new(198, 18, 2, n)),
                weight: 100 + u32::from(i),
                mac: Some(MacAddr([0x02, 0xbe, 0, 0, set, n])),
                state: BackendState::Active,
            }
        })
        .collect()
}

fn config(set: u8, generation: u64) -> DataplaneSpec {
    let mut v = vip(
        IpAddr::V4(VIP_V4),
        80,
        Protocol::Tcp,
        ForwardingMode::Dsr,
        0,
    );
    v.backends = backends(set);
    let mut s = spec(vec![v]);
    s.generation = generation;
    s
}

fn set_of(mac: [u8; 6]) -> Option<u8> {
    (0..3).find(|&set| backends(set).iter().any(|b| b.mac == Some(MacAddr(mac))))
}

fn syn(i: u64) -> Vec<u8> {
    let src = Ipv4Addr::new(198, 18, 100 + (i % 50) as u8, (i / 50 % 250) as u8 + 1);
    PacketBuilder::eth(CLIENT_MAC, LB_MAC)
        .ipv4(src, VIP_V4)
        .tcp(1024 + (i % 60000) as u16, 80, TcpFlags::SYN)
        .build()
}

#[test]
fn tables_replaced_under_traffic_never_misroute() {
    let pins = PinDir::new("lb-atomic");
    let opts = LoadOptions {
        pin_dir: Some(pins.path().to_path_buf()),
        ..LoadOptions::default()
    };
    let mut writer = Datapath::load(opts.clone()).expect("load xdp_lb");
    let first = plan(&config(0, 1), &IdAllocator::default()).expect("plan");
    writer.apply(&first).expect("apply");
    // A second program over the same (pinned) maps, for the traffic thread.
    // It reads its own copy of the VIP address filter, filled from the
    // pinned record when it adopts them and not by the writer's applies:
    // the plans below change backends only, never the VIP address.
    let mut reader = Datapath::load(opts).expect("load a second handle");
    assert!(
        reader.adopted(),
        "the second handle must adopt the pinned maps"
    );
    reader
        .set_interface_mac(LB_MAC)
        .expect("set the program's MAC");

    // applied = applies completed, started = applies begun (an apply may
    // be live from any moment after it began); set k % 3 is live after k.
    let applied = Arc::new(AtomicU64::new(0));
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (applied, started, done) = (applied.clone(), started.clone(), done.clone());
        std::thread::spawn(move || {
            let prog = reader.program().expect("program");
            let mut out = vec![0u8; 2048];
            let (mut sent, mut wrong) = (0u64, Vec::new());
            let start = Instant::now();
            while !done.load(Ordering::Acquire) && start.elapsed() < TIME_LIMIT {
                let pkt = syn(sent);
                let before = applied.load(Ordering::Acquire);
                let mut o = TestRunOptions::new();
                o.data_in = Some(&pkt);
                o.data_out = Some(&mut out);
                o.repeat = 1;
                let r = prog.test_run(o).expect("BPF_PROG_TEST_RUN");
                let after = started.load(Ordering::Acquire);
                sent += 1;
                let frame = &out[..r.data_size_out as usize];
                let landed = decode(frame).ok().and_then(|d| set_of(d.eth_dst));
                // Live while it ran: the sets of applies before..=after.
                let ok = r.return_value == XDP_TX
                    && landed.is_some_and(|s| (before..=after).any(|k| k % 3 == u64::from(s)));
                if !ok && wrong.len() < 10 {
                    wrong.push(format!(
                        "packet {sent}: action {} set {landed:?} applies {before}..={after}",
                        r.return_value
                    ));
                }
                if !ok && wrong.len() >= 10 {
                    break;
                }
            }
            (sent, wrong)
        })
    };

    let mut prev = first;
    let mut apply_ms = Vec::new();
    for k in 1..=SWAPS {
        let set = (k % 3) as u8;
        let next = plan(&config(set, k + 1), &prev.allocator).expect("plan");
        started.store(k, Ordering::Release);
        let t = Instant::now();
        writer.apply(&next).expect("apply under traffic");
        apply_ms.push(t.elapsed().as_secs_f64() * 1e3);
        applied.store(k, Ordering::Release);
        prev = next;
    }
    done.store(true, Ordering::Release);
    let (sent, wrong) = traffic.join().expect("traffic thread");
    apply_ms.sort_by(f64::total_cmp);
    eprintln!(
        "{SWAPS} table replacements under {sent} packets; apply median {:.2} ms, max {:.2} ms",
        apply_ms[apply_ms.len() / 2],
        apply_ms[apply_ms.len() - 1]
    );
    assert!(wrong.is_empty(), "misrouted packets: {wrong:#?}");
    assert!(
        sent > SWAPS * 10,
        "too little traffic ran during the swaps ({sent} packets) to show anything"
    );
    // The maps hold exactly the last plan.
    assert_eq!(writer.verify(&prev).expect("verify"), Vec::<String>::new());
    drop(writer);
    drop(pins);
}
