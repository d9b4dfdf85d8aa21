//! `cargo xtask demo`: the product on its built-in lab, with real traffic.
//!
//! Builds a network-namespace lab (two clients, the LB running `lbd` with
//! XDP on its interface, three backends that serve HTTP and UDP with their
//! own names, both DSR and IP-in-IP), then shows:
//! 1. thousands of requests from many source ports, and each backend's
//!    share against its weight (table and bar chart);
//! 2. a weight change and a drain while long-lived connections stay up
//!    (counted: none reset);
//! 3. a backend's server killed: health probes take it out, traffic moves,
//!    nothing fails after that; then it comes back;
//! 4. the outage replayed: a config that sends most traffic to one backend
//!    is refused before it reaches the kernel, with the reason;
//! 5. clean teardown.
//!
//! Exits 0 only if every step behaved as expected.

use std::{
    panic::{self, AssertUnwindSafe},
    process::ExitCode,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{LabConfig, Lbd},
    lab::{Batch, Held, LabNet, LabOptions, N_BACKENDS, V4, V6, backend_name},
    netns,
    pins::PinDir,
};
use lb_userspace::model::BackendState;

/// Backend `i` (1-based) has weight `WEIGHTS[i - 1]`.
const WEIGHTS: [u32; 3] = [100, 200, 300];
/// Requests per protocol in step 1, each flow from its own source port.
const REQUESTS: usize = 3000;
/// Allowed deviation of an observed share from the weight's, in points:
/// about four standard deviations of the sampling noise of a 50% share
/// over 3000 flows (0.9 points).
const TOLERANCE_PP: f64 = 4.0;
const BAR_WIDTH: f64 = 50.0;
const INTERVAL_MS: u64 = 300;
const FALL: u32 = 3;
const RISE: u32 = 2;

type Step = Result<String, String>;

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lb-demo needs root (network namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    let t0 = Instant::now();
    // A failed step panics; unwinding drops the lab (namespaces, lbd,
    // pins) before we get here.
    let result = panic::catch_unwind(AssertUnwindSafe(demo));
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with("demo-") && n.contains(&format!("-{}-", std::process::id())))
        .collect();
    println!("\n5. teardown");
    let teardown_ok = left.is_empty();
    if teardown_ok {
        println!("   ✓ lbd stopped, namespaces, pins and files removed");
    } else {
        println!("   ✗ namespaces left behind: {left:?}");
    }
    let Ok(steps) = result else {
        println!("\ndemo FAILED: a step panicked (message above)");
        return ExitCode::FAILURE;
    };
    let failed: Vec<&String> = steps.iter().filter_map(|s| s.as_ref().err()).collect();
    if failed.is_empty() && teardown_ok {
        println!(
            "\ndemo passed: every step behaved as expected ({:.0} s)",
            t0.elapsed().as_secs_f64()
        );
        ExitCode::SUCCESS
    } else {
        println!("\ndemo FAILED:");
        for f in failed {
            println!("  - {f}");
        }
        ExitCode::FAILURE
    }
}

fn demo() -> Vec<Step> {
    println!("building the lab: 2 clients, LB with lbd, 3 backends (DSR and IP-in-IP)");
    let pins = PinDir::new("demo");
    let mut opts = LabOptions::test("demo", pins.path());
    opts.clients = 2;
    opts.ipip = true;
    let mut net = LabNet::build_with(opts, Some(pins));
    let mut lbd = Lbd::new("demo-lbd");
    let cfg = LabConfig {
        weights: WEIGHTS,
        interval_ms: INTERVAL_MS,
        rise: RISE,
        fall: FALL,
        ipip: true,
        ..LabConfig::default()
    };
    lbd.write_config(&lbd.lab_config(&net, &cfg));
    lbd.start(&net.lb);
    let st = lbd.status();
    println!(
        "lbd up: generation {}, {} VIPs, XDP {} on {} (namespaces {})",
        st.generation,
        st.vips.len(),
        st.attach_mode,
        st.interface,
        net.names().join(" ")
    );
    let mut steps = vec![step("1. distribution", distribution(&net, &lbd))];
    steps.push(step(
        "2. weight change and drain under long-lived connections",
        weight_and_drain(&net, &lbd),
    ));
    steps.push(step(
        "3. a backend fails and returns",
        failover(&mut net, &lbd),
    ));
    steps.push(step("4. the outage replayed", outage(&lbd)));
    lbd.stop();
    steps
}

fn step(title: &str, r: Step) -> Step {
    match &r {
        Ok(msg) => println!("   ✓ {msg}"),
        Err(msg) => println!("   ✗ {title}: {msg}"),
    }
    r
}

fn print_shares(label: &str, b: &Batch, weights: &[u32; 3]) -> f64 {
    let total: u32 = weights.iter().sum();
    let n = b.answered().max(1) as f64;
    println!(
        "   {label}: {} answered, {} failed",
        b.answered(),
        b.failures.len()
    );
    println!("     backend     weight  expected  observed");
    let mut worst: f64 = 0.0;
    for i in 1..=N_BACKENDS {
        let got = b.replies.get(&backend_name(i)).copied().unwrap_or(0) as f64 / n * 100.0;
        let want = f64::from(weights[usize::from(i - 1)]) / f64::from(total.max(1)) * 100.0;
        worst = worst.max((got - want).abs());
        let bar = "█".repeat((got / 100.0 * BAR_WIDTH).round() as usize);
        println!(
            "     {:<10} {:>6} {:>8.1}% {:>8.1}%  {bar}",
            backend_name(i),
            weights[usize::from(i - 1)],
            want,
            got
        );
    }
    worst
}

fn distribution(net: &LabNet, lbd: &Lbd) -> Step {
    println!(
        "\n1. {REQUESTS} TCP (HTTP-style) and {REQUESTS} UDP requests from two clients, each flow from its own source port"
    );
    let mut problems = Vec::new();
    let mut summary = Vec::new();
    for (mode, vip, n, base) in [
        ("DSR", V4.vip(), REQUESTS, 10_000u16),
        ("IP-in-IP", V4.vip_ipip(), REQUESTS, 20_000),
    ] {
        let t = Instant::now();
        let (tcp, udp) = net.traffic(V4, vip, n, base);
        for (proto, b) in [("TCP", &tcp), ("UDP", &udp)] {
            let worst = print_shares(&format!("{mode} {vip} {proto}"), b, &WEIGHTS);
            if !b.failures.is_empty() || b.answered() != n {
                problems.push(format!(
                    "{mode} {proto}: {} of {n} answered: {:?}",
                    b.answered(),
                    &b.failures[..b.failures.len().min(3)]
                ));
            }
            if worst > TOLERANCE_PP {
                problems.push(format!("{mode} {proto}: a share is {worst:.1} points off its weight (tolerance {TOLERANCE_PP})"));
            }
            summary.push(format!("{mode} {proto} ±{worst:.1}"));
        }
        println!("     ({:.1} s)", t.elapsed().as_secs_f64());
    }
    let st = lbd.lbctl_ok(&["stats"]);
    let counters: Vec<&str> = st
        .lines()
        .skip_while(|l| !l.starts_with("counters"))
        .take(8)
        .collect();
    println!(
        "   lbctl stats (data path counters):\n   {}",
        counters.join("\n   ")
    );
    if problems.is_empty() {
        Ok(format!(
            "every request answered; shares within {TOLERANCE_PP} points of the weights ({})",
            summary.join(", ")
        ))
    } else {
        Err(problems.join("; "))
    }
}

fn weight_and_drain(net: &LabNet, lbd: &Lbd) -> Step {
    println!("\n2. 40 long-lived connections open (DSR and IP-in-IP, IPv4 and IPv6); then:");
    let vips = [V4.vip(), V6.vip(), V4.vip_ipip(), V6.vip_ipip()];
    let mut held: Vec<Held> = net
        .clients()
        .iter()
        .map(|c| Held::open(c, &vips, 20))
        .collect();
    let mut resets = 0;
    let mut check = |held: &mut Vec<Held>, what: &str| {
        let bad: Vec<String> = held.iter_mut().flat_map(Held::check).collect();
        println!(
            "   {what}: {} of 40 long-lived connections reset",
            bad.len()
        );
        resets += bad.len();
    };
    check(&mut held, "before");
    let b1 = V4.backend(1).to_string();
    let b2 = V4.backend(2).to_string();
    let out = lbd.lbctl_ok(&["backend", "set-weight", "web4", &b1, "300"]);
    println!(
        "   $ lbctl backend set-weight web4 {b1} 300\n     {}",
        out.trim()
    );
    check(&mut held, "after the weight change");
    let out = lbd.lbctl_ok(&["backend", "drain", "web4", &b2]);
    println!("   $ lbctl backend drain web4 {b2}\n     {}", out.trim());
    check(&mut held, "after the drain");
    let (tcp, _) = net.traffic(V4, V4.vip(), 600, 30_000);
    let worst = print_shares(
        "new flows to web4 after both (weights now 300/drained/300)",
        &tcp,
        &[300, 0, 300],
    );
    let mut problems = Vec::new();
    if resets > 0 {
        problems.push(format!("{resets} long-lived connections reset"));
    }
    if tcp.replies.contains_key(&backend_name(2)) {
        problems.push("the drained backend got new flows".into());
    }
    if !tcp.failures.is_empty() || worst > 6.0 {
        problems.push(format!(
            "new flows after the change: {} failures, shares {worst:.1} points off",
            tcp.failures.len()
        ));
    }
    // Put things back for the next steps.
    lbd.lbctl_ok(&["backend", "undrain", "web4", &b2]);
    lbd.lbctl_ok(&["backend", "set-weight", "web4", &b1, "100"]);
    if problems.is_empty() {
        Ok("0 of 40 long-lived connections reset across a weight change and a drain; the drained backend got no new flows; both written back to the config file".into())
    } else {
        Err(problems.join("; "))
    }
}

fn failover(net: &mut LabNet, lbd: &Lbd) -> Step {
    let bound = Duration::from_millis(INTERVAL_MS * u64::from(FALL) + 1000);
    println!(
        "\n3. killing backend-3's servers (health checks: every {INTERVAL_MS} ms, down after {FALL} failures, up after {RISE} successes)"
    );
    let t = Instant::now();
    net.stop_server(3);
    let out = wait(lbd, bound, |st| {
        st.vips
            .iter()
            .all(|v| v.backends[2].state == BackendState::Down)
    });
    let removal = t.elapsed();
    if let Err(e) = out {
        return Err(format!("backend-3 not removed within {bound:?}: {e}"));
    }
    println!(
        "   backend-3 out of all 8 VIPs after {:.2} s (fall × interval = {:.1} s)",
        removal.as_secs_f64(),
        (INTERVAL_MS * u64::from(FALL)) as f64 / 1000.0
    );
    let (tcp, udp) = net.traffic(V4, V4.vip(), 300, 40_000);
    println!(
        "   300 TCP + 300 UDP requests after that: {} + {} answered, {} failed, to backend-3: {}",
        tcp.answered(),
        udp.answered(),
        tcp.failures.len() + udp.failures.len(),
        tcp.replies.get(&backend_name(3)).unwrap_or(&0)
            + udp.replies.get(&backend_name(3)).unwrap_or(&0)
    );
    let bad_after = tcp.failures.len() + udp.failures.len();
    let t = Instant::now();
    net.start_server(3);
    let back = wait(lbd, Duration::from_secs(5), |st| {
        st.vips
            .iter()
            .all(|v| v.backends[2].state == BackendState::Active)
    });
    if let Err(e) = back {
        return Err(format!("backend-3 did not return: {e}"));
    }
    println!(
        "   backend-3's servers restarted: back in all VIPs after {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let (tcp, _) = net.traffic(V4, V4.vip(), 300, 41_000);
    let got3 = tcp.replies.get(&backend_name(3)).copied().unwrap_or(0);
    if bad_after > 0 || tcp.answered() != 300 || got3 == 0 {
        return Err(format!(
            "after removal {bad_after} requests failed; after return {} of 300 answered, {got3} by backend-3",
            tcp.answered()
        ));
    }
    Ok(format!(
        "removed {:.2} s after its server died, no request failed after that, back after {RISE} good probes",
        removal.as_secs_f64()
    ))
}

fn wait(
    lbd: &Lbd,
    timeout: Duration,
    cond: impl Fn(&lb_userspace::control::StatusReport) -> bool,
) -> Result<(), String> {
    let t = Instant::now();
    loop {
        if cond(&lbd.status()) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(format!("not within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn outage(lbd: &Lbd) -> Step {
    println!("\n4. the outage replayed: a routing change that sends most traffic to one backend");
    let live = lbd.read_config();
    let gen_before = lbd.status().generation;
    // The typo: one backend's weight 3000 instead of 300.
    let typo = live.replacen("weight = 300", "weight = 3000", 1);
    let path = lbd.dir.join("typo.toml");
    std::fs::write(&path, &typo).map_err(|e| e.to_string())?;
    let plan = lbd.lbctl(&["plan", &path.display().to_string(), "--author", "demo"]);
    let text = String::from_utf8_lossy(&plan.stdout);
    println!(
        "   $ lbctl plan typo.toml   (exit {})",
        plan.status.code().unwrap_or(-1)
    );
    for l in text
        .lines()
        .filter(|l| l.contains("FAILS") || l.trim_start().starts_with("- "))
        .take(4)
    {
        println!("     {}", l.trim());
    }
    // Even pushed straight to the agent, it never reaches the kernel.
    std::fs::write(&lbd.config_path, &typo).map_err(|e| e.to_string())?;
    let reload = lbd.lbctl(&["reload"]);
    let err = String::from_utf8_lossy(&reload.stderr);
    println!(
        "   $ lbctl reload   (the typo written to lbd's config file; exit {})",
        reload.status.code().unwrap_or(-1)
    );
    println!("     {}", err.lines().next().unwrap_or_default());
    std::fs::write(&lbd.config_path, &live).map_err(|e| e.to_string())?;
    let st = lbd.status();
    let refused = plan.status.code() == Some(1)
        && text.contains("max_share_vs_even")
        && reload.status.code() == Some(1)
        && err.contains("refused by policy")
        && st.generation == gen_before
        && st.verify_diffs.is_empty();
    if refused {
        Ok(format!(
            "refused by plan and by reload with the reason; generation still {gen_before}, the data path verified unchanged"
        ))
    } else {
        Err(format!(
            "the typo was not refused as expected (plan exit {:?}, reload exit {:?}, generation {} → {})",
            plan.status.code(),
            reload.status.code(),
            gen_before,
            st.generation
        ))
    }
}
