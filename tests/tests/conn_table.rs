//! The connection table on the real object: one bucket keeps its flows in
//! most-recently-used order and, when full, drops the least recently used
//! one. A table of `CONN_WAYS` flows has exactly one bucket, so every flow
//! of this test shares it; the kernel's hit/miss counters must follow an
//! LRU list of `CONN_WAYS` entries packet by packet.
use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{CONN_WAYS, STAT_CONN_HIT, STAT_CONN_MISS, STAT_TX};
use lb_tests::{
    packet::{PacketBuilder, TcpFlags},
    scenario::{self, CLIENT_MAC, LB_MAC, VIP_V4},
};
use lb_userspace::{
    datapath::{Datapath, LoadOptions},
    plan::{self, IdAllocator},
};

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Seen {
    Hit,
    Miss,
}

fn packet(flow: u16, syn: bool) -> Vec<u8> {
    let flags = if syn { TcpFlags::SYN } else { TcpFlags::ACK };
    PacketBuilder::eth(CLIENT_MAC, LB_MAC)
        .ipv4(Ipv4Addr::new(198, 18, 7, 1), VIP_V4)
        .tcp(20000 + flow, 80, flags)
        .payload(&[0u8; 16])
        .build()
}

/// Runs one packet and says whether the connection table hit.
fn send(dp: &mut Datapath, data: &[u8]) -> Seen {
    let before = dp.stats().expect("stats").global;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(data);
    dp.program()
        .expect("xdp_lb")
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN");
    let after = dp.stats().expect("stats").global;
    let d = |s: u32| after[s as usize] - before[s as usize];
    assert_eq!(d(STAT_TX), 1, "every packet of this test is forwarded");
    match (d(STAT_CONN_HIT), d(STAT_CONN_MISS)) {
        (1, 0) => Seen::Hit,
        (0, 1) => Seen::Miss,
        other => panic!("hit/miss counters moved by {other:?}"),
    }
}

#[test]
fn a_full_bucket_drops_its_least_recently_used_flow() {
    let mut dp = Datapath::load(LoadOptions {
        conn_table_capacity: CONN_WAYS as u32,
        pin_dir: None,
    })
    .expect("load xdp_lb (run as root)");
    let plan = plan::plan(&scenario::standard(4), &IdAllocator::default()).expect("plan");
    dp.apply(&plan).expect("apply");
    dp.set_interface_mac(LB_MAC).expect("set the program's MAC");

    // The model: flows, most recently used first, at most CONN_WAYS.
    let mut lru: Vec<u16> = Vec::new();
    // 12 flows over 8 ways, SYNs and ACKs mixed: a fixed pseudo-random walk.
    let mut x = 0x2545_f491_u32;
    let mut evictions = 0;
    for step in 0..600 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let flow = (x % 12) as u16;
        let syn = x.is_multiple_of(7);
        let pos = lru.iter().position(|&f| f == flow);
        let expect = if pos.is_some() && !syn {
            Seen::Hit
        } else {
            Seen::Miss
        };
        if let Some(p) = pos {
            lru.remove(p);
        } else if lru.len() == CONN_WAYS {
            lru.pop();
            evictions += 1;
        }
        lru.insert(0, flow);
        let seen = send(&mut dp, &packet(flow, syn));
        assert_eq!(
            seen, expect,
            "step {step}: flow {flow} (syn {syn}); model after: {lru:?}"
        );
    }
    assert!(
        evictions > 50,
        "the walk must exercise eviction ({evictions})"
    );
}

/// The destination MAC a packet leaves with (the backend it was sent to).
fn sent_to(dp: &mut Datapath, data: &[u8]) -> [u8; 6] {
    let mut out = vec![0u8; 2048];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(data);
    opts.data_out = Some(&mut out);
    dp.program()
        .expect("xdp_lb")
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN");
    out[..6].try_into().expect("six bytes")
}

/// The program gets the table's secret and bucket mask as load-time
/// constants and reads its own copy of the VIP address filter. A second
/// handle adopting the pinned maps (as a restarted agent does) must load
/// them from the pinned table, not make new ones: its program finds every
/// flow the first program recorded (a new secret would move every flow to
/// another bucket), also when asked for another table size, and forwards
/// (an empty filter copy would pass the packets to the host).
#[test]
fn an_adopting_handle_finds_the_flows_of_the_pinned_table() {
    let pins = lb_tests::pins::PinDir::new("lb-conn-adopt");
    let opts = |capacity| LoadOptions {
        conn_table_capacity: capacity,
        pin_dir: Some(pins.path().to_path_buf()),
    };
    let mut first = Datapath::load(opts(4096)).expect("load xdp_lb (run as root)");
    let plan = plan::plan(&scenario::standard(4), &IdAllocator::default()).expect("plan");
    first.apply(&plan).expect("apply");
    first
        .set_interface_mac(LB_MAC)
        .expect("set the program's MAC");
    let flows: Vec<u16> = (0..64).collect();
    let mut backend = Vec::new();
    for &f in &flows {
        assert_eq!(send(&mut first, &packet(f, true)), Seen::Miss);
        backend.push(sent_to(&mut first, &packet(f, false)));
    }

    let mut second = Datapath::load(opts(1 << 20)).expect("adopt");
    assert!(second.adopted(), "the second handle must adopt the pins");
    second
        .set_interface_mac(LB_MAC)
        .expect("set the program's MAC");
    for (&f, mac) in flows.iter().zip(&backend) {
        assert_eq!(
            send(&mut second, &packet(f, false)),
            Seen::Hit,
            "flow {f}: the adopting program must find the entry"
        );
        assert_eq!(sent_to(&mut second, &packet(f, false)), *mac, "flow {f}");
    }
    drop((first, second));
    drop(pins);
}
