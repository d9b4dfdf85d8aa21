//! The XDP program attached to a veth forwards real traffic by L2 DSR, for
//! IPv4 and IPv6, TCP and UDP, while the LB host's own traffic (and ARP /
//! neighbour discovery) keeps working.
//!
//! Topology and servers: [`lb_tests::lab`] (one flat L2 subnet, client →
//! VIP → LB MAC, `xdp_lb` rewrites the destination MAC to a backend's and
//! sends the frame back out with XDP_TX; backends answer with their name
//! and reply straight to the client). All namespaces are unique per run, so
//! the tests run in parallel.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Instant,
};

use lb_common::{STAT_NAMES, STAT_OUTCOMES, STAT_PASS_NON_IP, STAT_PASS_NOT_VIP, STAT_TX};
use lb_tests::{
    lab::{
        Batch, Family, IO_TIMEOUT, LB_PORT, Lab, N_BACKENDS, Served, TCP_PORT, UDP_PORT, V4, V6,
        backend_name, lb_service, xdp_counters,
    },
    netns::{self, fmt_mac},
};
use lb_userspace::{datapath::DataplaneStats, model::Protocol};

const REQUESTS: usize = 200;

// ---------------------------------------------------------------- checks

fn check_batch(
    lab: &Lab,
    stats: &DataplaneStats,
    fam: Family,
    proto: Protocol,
    port: u16,
    b: &Batch,
) -> String {
    let what = format!(
        "{} {proto} {}",
        fam.label(),
        SocketAddr::new(fam.vip(), port)
    );
    assert!(
        b.failures.is_empty(),
        "{what}: {} of {REQUESTS} requests failed (answered: {:?}); first failures: {:#?}\n{}",
        b.failures.len(),
        b.replies,
        &b.failures[..b.failures.len().min(5)],
        lab.diagnostics(stats),
    );
    assert_eq!(b.answered(), REQUESTS, "{what}: replies {:?}", b.replies);
    assert_eq!(
        b.src_ports.len(),
        REQUESTS,
        "{what}: source ports were not all distinct"
    );
    let known: BTreeSet<String> = (1..=N_BACKENDS).map(backend_name).collect();
    for name in b.replies.keys() {
        assert!(
            known.contains(name),
            "{what}: reply from an unknown server {name:?}"
        );
    }
    assert!(
        b.replies.len() > 1,
        "{what}: only {:?} answered; the load was not spread",
        b.replies
    );
    let counters = lab.backend_counters(stats, fam.vip(), port, proto);
    for (name, &(packets, new_flows)) in &counters {
        let replies = b.replies.get(name).copied().unwrap_or(0);
        // Every request is a new flow (a fresh source port) that reached
        // the backend it was hashed to; a backend the data path never sent
        // to cannot have answered, and vice versa.
        assert_eq!(
            replies > 0,
            packets > 0,
            "{what}: {name} answered {replies} requests but the data path counted {packets} packets for it"
        );
        assert!(
            new_flows >= replies as u64,
            "{what}: {name}: {new_flows} new flows < {replies} replies"
        );
        if proto == Protocol::Udp {
            // One datagram per flow, no retries: exact.
            assert_eq!(
                packets, replies as u64,
                "{what}: {name}: {packets} packets for {replies} replies"
            );
        }
    }
    let per_backend: Vec<String> = counters
        .iter()
        .map(|(name, (packets, new_flows))| {
            format!(
                "{name}={} (pkts {packets}, new {new_flows})",
                b.replies.get(name).copied().unwrap_or(0)
            )
        })
        .collect();
    format!(
        "{what}: {} requests in {:?}: {}",
        b.answered(),
        b.elapsed,
        per_backend.join(", ")
    )
}

/// The LB host's own traffic passes through the program untouched, and
/// the client resolves the LB's address by ARP / ND across it (it has no
/// static entry for it).
fn check_lb_own_service(lab: &Lab, fam: Family) -> String {
    let lb_addr = SocketAddr::new(fam.lb(), LB_PORT);
    let listener = lab.lb.in_netns(|| {
        TcpListener::bind(lb_addr).unwrap_or_else(|e| panic!("binding {lb_addr} on the LB: {e}"))
    });
    let svc = lb_service(listener);
    let own = lab.client.in_netns(|| {
        let mut s = TcpStream::connect_timeout(&lb_addr, IO_TIMEOUT)
            .map_err(|e| format!("connect {lb_addr}: {e}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.write_all(b"hello lb\n")
            .map_err(|e| format!("write: {e}"))?;
        let mut r = String::new();
        (&mut s)
            .take(64)
            .read_to_string(&mut r)
            .map_err(|e| format!("read: {e}"))?;
        Ok::<String, String>(r)
    });
    let svc = svc.join().expect("LB service thread panicked");
    let own = own.unwrap_or_else(|e| {
        panic!(
            "{}: the LB's own service {lb_addr} is unreachable with XDP attached: {e}",
            fam.label()
        )
    });
    assert_eq!(own.trim(), "lb");
    svc.unwrap_or_else(|e| panic!("LB service: {e}"));
    let resolved = lab.client.neigh_mac("eth0", fam.lb());
    assert_eq!(
        resolved,
        Some(lab.lb_mac),
        "{}: the client should have resolved {} to the LB's MAC by {}",
        fam.label(),
        fam.lb(),
        if fam.v6 { "ND" } else { "ARP" }
    );
    format!(
        "LB own service {lb_addr}: ok; neighbour {} resolved to {}",
        fam.lb(),
        fmt_mac(lab.lb_mac)
    )
}

/// Global outcomes and the veths' XDP counters: only pass and TX, and
/// every XDP_TX frame reached the switch.
fn check_global(lab: &Lab, stats: &DataplaneStats, fam: Family) -> String {
    let g = &stats.global;
    assert!(g[STAT_TX as usize] > 0, "no XDP_TX counted: {g:?}");
    assert!(
        g[STAT_PASS_NOT_VIP as usize] > 0,
        "the LB's own traffic was not seen as non-VIP"
    );
    if !fam.v6 {
        assert!(g[STAT_PASS_NON_IP as usize] > 0, "ARP was not passed");
    }
    for &o in &STAT_OUTCOMES {
        if ![STAT_PASS_NON_IP, STAT_PASS_NOT_VIP, STAT_TX].contains(&o) {
            assert_eq!(
                g[o as usize],
                0,
                "unexpected outcome {}\n{}",
                STAT_NAMES[o as usize],
                lab.diagnostics(stats)
            );
        }
    }
    let xdp = xdp_counters(&lab.lb, "eth0");
    let counter = |v: &[(String, u64)], name: &str| {
        v.iter()
            .filter(|(k, _)| k.ends_with(name))
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    assert_eq!(
        counter(&xdp, "xdp_tx_errors"),
        0,
        "XDP_TX frames were lost on the LB's veth: {xdp:?}"
    );
    let xdp_tx = counter(&xdp, "xdp_tx");
    assert!(
        xdp_tx >= g[STAT_TX as usize],
        "veth counted {xdp_tx} XDP_TX frames, the program {}",
        g[STAT_TX as usize]
    );
    let peer_rx = counter(&xdp_counters(&lab.switch, "lb0"), "xdp_packets");
    assert!(
        peer_rx >= xdp_tx,
        "the LB's peer received {peer_rx} frames, fewer than the {xdp_tx} sent by XDP_TX"
    );
    let global: Vec<String> = STAT_NAMES
        .iter()
        .zip(g)
        .filter(|(_, v)| **v > 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    format!(
        "global counters: {}\nlb eth0 (veth) XDP counters: {xdp:?}; peer lb0 received {peer_rx}",
        global.join(" ")
    )
}

fn run_family(fam: Family) {
    let t0 = Instant::now();
    let mut lab = Lab::new("fw", [100; N_BACKENDS as usize]);
    let names = lab.names();

    let (tcp, udp) = lab.client_batches(fam, REQUESTS);
    let own_line = check_lb_own_service(&lab, fam);

    let stats = lab
        .dp
        .stats()
        .unwrap_or_else(|e| panic!("reading stats: {e}"));
    let tcp_line = check_batch(&lab, &stats, fam, Protocol::Tcp, TCP_PORT, &tcp);
    let udp_line = check_batch(&lab, &stats, fam, Protocol::Udp, UDP_PORT, &udp);
    let global_line = check_global(&lab, &stats, fam);

    // The servers' own tallies agree with what the client saw.
    let served: Vec<Served> = (1..=N_BACKENDS).map(|i| lab.stop_server(i)).collect();
    for (i, s) in (1..=N_BACKENDS).zip(&served) {
        let name = backend_name(i);
        let got = |b: &Batch| b.replies.get(&name).copied().unwrap_or(0);
        assert_eq!(
            (s.tcp, s.udp),
            (got(&tcp), got(&udp)),
            "{name}: served (tcp, udp) vs replies seen by the client"
        );
    }
    let macs: Vec<String> = lab.backend_macs.iter().map(|m| fmt_mac(*m)).collect();
    eprintln!(
        "--- {} DSR summary (xdp_lb in {} mode, backend MACs {}) ---\n{tcp_line}\n{udp_line}\n{own_line}\n{global_line}",
        fam.label(),
        lab.mode,
        macs.join(" ")
    );
    // Data path detached, namespaces deleted.
    drop(lab);
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    eprintln!("{} test done in {:?}", fam.label(), t0.elapsed());
}

#[test]
fn dsr_forwards_ipv4_tcp_and_udp() {
    run_family(V4);
}

#[test]
fn dsr_forwards_ipv6_tcp_and_udp() {
    run_family(V6);
}
