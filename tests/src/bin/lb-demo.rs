//! `cargo xtask demo`: the data path on a self-contained lab, with real
//! traffic.
//!
//! Builds the network-namespace lab of [`lb_tests::lab`] (client, LB,
//! three backends on one bridge, L2 DSR), gives the backends unequal
//! weights, sends a few thousand TCP and UDP requests from distinct source
//! ports to the IPv4 VIP and compares the share of replies each backend
//! gave with its weight. Exits 0 only if every request was answered and
//! every share is within [`TOLERANCE_PP`] points of the expected one. The
//! namespaces are removed at the end, also on failure.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    panic::{self, AssertUnwindSafe},
    process::ExitCode,
    time::Instant,
};

use lb_common::{STAT_CONN_HIT, STAT_CONN_MISS, STAT_NAMES, STAT_TX};
use lb_tests::{
    lab::{Batch, Lab, N_BACKENDS, TCP_PORT, UDP_PORT, V4, backend_name},
    netns::{self, NetNs, fmt_mac},
};
use lb_userspace::model::Protocol;

/// Backend `i` (1-based) has weight `WEIGHTS[i - 1]`.
const WEIGHTS: [u32; N_BACKENDS as usize] = [1, 2, 3];
/// Requests (flows) per protocol, each from its own source port.
const REQUESTS: usize = 3000;
/// Allowed deviation of an observed share from the expected one, in
/// percentage points.
const TOLERANCE_PP: f64 = 3.0;
/// Width of a 100% bar, in characters.
const BAR_WIDTH: f64 = 50.0;

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lb-demo needs root (network namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    // A failed step panics; unwinding drops the lab (and with it the
    // namespaces) before we get here.
    let result = panic::catch_unwind(AssertUnwindSafe(demo));
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("demo-{}-", std::process::id())))
        .collect();
    match result {
        Ok(Ok(())) if left.is_empty() => {
            println!("\ndemo passed");
            ExitCode::SUCCESS
        }
        Ok(Ok(())) => {
            println!("\ndemo FAILED: namespaces left behind: {left:?}");
            ExitCode::FAILURE
        }
        Ok(Err(problems)) => {
            println!("\ndemo FAILED:");
            for p in problems {
                println!("  - {p}");
            }
            ExitCode::FAILURE
        }
        Err(_) => {
            println!("\ndemo FAILED: a step panicked (see above)");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo; `Err` lists what did not behave as expected.
fn demo() -> Result<(), Vec<String>> {
    let t0 = Instant::now();
    println!("== 1. lab");
    let lab = Lab::new("demo", WEIGHTS);
    print_topology(&lab);

    println!("\n== 2. traffic: {REQUESTS} TCP and {REQUESTS} UDP requests, one flow each");
    let vip = V4.vip();
    let (tcp, udp) = lab.client_batches(V4, REQUESTS);

    println!("\n== 3. results");
    let stats = lab
        .dp
        .stats()
        .unwrap_or_else(|e| panic!("reading stats: {e}"));
    let mut problems = Vec::new();
    for (proto, port, b) in [
        (Protocol::Tcp, TCP_PORT, &tcp),
        (Protocol::Udp, UDP_PORT, &udp),
    ] {
        let flows = lab.backend_counters(&stats, vip, port, proto);
        report(
            &format!("{proto} {}", SocketAddr::new(vip, port)),
            b,
            &flows,
            &mut problems,
        );
    }
    let g = &stats.global;
    println!("\ndata path counters (all VIPs):");
    for s in [STAT_TX, STAT_CONN_HIT, STAT_CONN_MISS] {
        println!("  {:<10} {:>7}", STAT_NAMES[s as usize], g[s as usize]);
    }
    let others: Vec<String> = STAT_NAMES
        .iter()
        .zip(g)
        .enumerate()
        .filter(|&(i, (_, v))| {
            *v > 0 && ![STAT_TX, STAT_CONN_HIT, STAT_CONN_MISS].contains(&(i as u32))
        })
        .map(|(_, (n, v))| format!("{n}={v}"))
        .collect();
    println!("  other non-zero: {}", others.join(" "));
    if g[STAT_TX as usize] == 0 {
        problems.push("the data path counted no XDP_TX".into());
    }
    if !problems.is_empty() {
        println!("\n{}", lab.diagnostics(&stats));
    }

    println!("\n== 4. teardown");
    let names = lab.names();
    drop(lab);
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    if left.is_empty() {
        println!("removed {} namespaces", names.len());
    } else {
        problems.push(format!("namespaces left behind: {left:?}"));
    }
    println!("total time {:.1?}", t0.elapsed());
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn print_topology(lab: &Lab) {
    let host = |role: &str, ns: &NetNs, addr: String| {
        println!("  {role:<10} ns {:<22} {addr}", ns.name());
    };
    println!("  {:<10} ns {:<22} bridge br0", "switch", lab.switch.name());
    host("client", &lab.client, V4.client().to_string());
    host(
        "lb",
        &lab.lb,
        format!(
            "{}  mac {}  xdp_lb ({} mode)",
            V4.lb(),
            fmt_mac(lab.lb_mac),
            lab.mode
        ),
    );
    for (i, ns) in (1..=N_BACKENDS).zip(&lab.backends) {
        host(
            &backend_name(i),
            ns,
            format!(
                "{}  mac {}  weight {}",
                V4.backend(i),
                fmt_mac(lab.backend_macs[usize::from(i - 1)]),
                WEIGHTS[usize::from(i - 1)]
            ),
        );
    }
    println!(
        "  VIP {} (TCP :{TCP_PORT}, UDP :{UDP_PORT}; also {}), L2 DSR: client -> lb (XDP_TX, dst MAC rewritten) -> backend -> client",
        V4.vip(),
        lb_tests::lab::V6.vip()
    );
}

/// Prints one protocol's table and bar chart; records what is off.
fn report(what: &str, b: &Batch, flows: &BTreeMap<String, (u64, u64)>, problems: &mut Vec<String>) {
    let total_weight: u32 = WEIGHTS.iter().sum();
    let answered = b.answered();
    println!(
        "\n{what}: {answered}/{REQUESTS} answered in {:.1?} ({} distinct source ports)",
        b.elapsed,
        b.src_ports.len()
    );
    if answered != REQUESTS || !b.failures.is_empty() {
        problems.push(format!(
            "{what}: {answered} of {REQUESTS} requests answered; first failures: {:?}",
            &b.failures[..b.failures.len().min(5)]
        ));
    }
    if b.src_ports.len() != answered {
        problems.push(format!("{what}: source ports were not all distinct"));
    }
    println!(
        "  {:<10} {:>6} {:>9} {:>9} {:>9} {:>8}",
        "backend", "weight", "expected", "observed", "deviation", "dp flows"
    );
    let mut bars = Vec::new();
    for (i, &w) in (1..=N_BACKENDS).zip(&WEIGHTS) {
        let name = backend_name(i);
        let got = b.replies.get(&name).copied().unwrap_or(0);
        let expected = 100.0 * f64::from(w) / f64::from(total_weight);
        let observed = if answered == 0 {
            0.0
        } else {
            100.0 * got as f64 / answered as f64
        };
        let dev = observed - expected;
        let new_flows = flows.get(&name).map_or(0, |&(_, new)| new);
        let ok = dev.abs() <= TOLERANCE_PP;
        println!(
            "  {name:<10} {w:>6} {expected:>8.1}% {observed:>8.1}% {dev:>+8.1}pp {new_flows:>8} {}",
            if ok { "ok" } else { "OFF" }
        );
        if !ok {
            problems.push(format!(
                "{what}: {name} got {observed:.1}% of the flows, expected {expected:.1}% ± {TOLERANCE_PP}pp"
            ));
        }
        bars.push(format!(
            "  {name:<10} {:<width$} {observed:.1}%",
            "█".repeat((observed / 100.0 * BAR_WIDTH).round() as usize),
            width = BAR_WIDTH as usize
        ));
    }
    let unknown: Vec<&String> = b
        .replies
        .keys()
        .filter(|n| !(1..=N_BACKENDS).any(|i| backend_name(i) == **n))
        .collect();
    if !unknown.is_empty() {
        problems.push(format!("{what}: replies from unknown servers {unknown:?}"));
    }
    println!();
    for bar in bars {
        println!("{bar}");
    }
}
