//! The real `lbd` and `lbctl` binaries on a network-namespace lab: attach
//! and program from the config, reload (a bad file changes nothing),
//! backend operations written back to the file, hitless restart (traffic
//! and long-lived connections keep flowing while lbd is down and after it
//! adopts the pinned maps), health probes taking a backend out and back,
//! the safety valve, metrics, and a bounded clean stop.
//!
//! Each test builds its own uniquely named namespaces, directory and pin
//! directory; all traffic is bounded in count and time; the guards clean up
//! on panic.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{LabConfig, Lbd},
    lab::{
        Batch, Held, IO_TIMEOUT, LabNet, N_BACKENDS, TCP_PORT, UDP_PORT, UDP_SRC_BASE, V4, V6,
        backend_name, batch, tcp_request, udp_request,
    },
    scenario::{VIP_V4, VIP_V6},
};
use lb_userspace::{control::StatusReport, model::BackendState};

const N: usize = 60;

fn vip_status<'a>(st: &'a StatusReport, name: &str) -> &'a lb_userspace::control::VipStatus {
    st.vips
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("VIP {name} missing from status"))
}

/// `n` TCP and `n` UDP requests from the client to the VIPs of both
/// families; returns (tcp v4, udp v4, tcp v6, udp v6).
fn traffic(net: &LabNet, n: usize, udp_base: u16) -> [Batch; 4] {
    net.client.in_netns(|| {
        let mut out = Vec::new();
        for fam in [V4, V6] {
            out.push(batch(n, |_| {
                tcp_request(SocketAddr::new(fam.vip(), TCP_PORT))
            }));
            out.push(batch(n, |i| {
                udp_request(
                    SocketAddr::new(fam.client(), udp_base + i as u16),
                    SocketAddr::new(fam.vip(), UDP_PORT),
                )
            }));
        }
        out.try_into().expect("four batches")
    })
}

fn assert_all_answered(what: &str, batches: &[Batch], n: usize, lbd: &Lbd) {
    for (b, label) in batches.iter().zip(["tcp v4", "udp v4", "tcp v6", "udp v6"]) {
        assert!(
            b.failures.is_empty() && b.answered() == n,
            "{what}: {label}: {} of {n} answered, failures {:#?}\nlbd log:\n{}",
            b.answered(),
            &b.failures[..b.failures.len().min(5)],
            lbd.log()
        );
    }
}

/// Metrics over HTTP on loopback inside the LB namespace.
fn check_metrics(net: &LabNet, lbd: &Lbd) {
    let port = lbd.metrics_port;
    let body = net.lb.in_netns(|| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    });
    let st = lbd.status();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(&format!("lb_config_generation {}", st.generation)),
        "{body}"
    );
    assert!(
        body.contains("lb_backend_new_flows_total{vip=\"198.18.0.10:80/tcp\""),
        "{body}"
    );
    assert!(body.contains("lb_datapath_verify_differences 0"), "{body}");
    let exposition = body
        .split_once("\r\n\r\n")
        .map_or(body.as_str(), |(_, b)| b);
    check_exposition_serves_the_alert_rules(exposition);
}

/// The shipped alert rules (deploy/prometheus/xlb-rules.yml) only use
/// metrics that a real lbd exports, and Prometheus' own linter accepts the
/// exposition (`promtool check metrics`).
fn check_exposition_serves_the_alert_rules(exposition: &str) {
    let rules_path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/xlb-rules.yml"
    );
    let rules = std::fs::read_to_string(rules_path).expect("read the alert rules");
    let mut names: Vec<&str> = rules
        .match_indices("lb_")
        .filter(|(i, _)| {
            // A metric name, not the tail of a recorded `xlb:...` name.
            *i == 0
                || !rules.as_bytes()[i - 1].is_ascii_alphanumeric()
                    && rules.as_bytes()[i - 1] != b':'
        })
        .map(|(i, _)| {
            let rest = &rules[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "found only {names:?} in {rules_path}");
    for name in &names {
        assert!(
            exposition.lines().any(|l| l
                .strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))),
            "the alert rules use {name}, which lbd does not export:\n{exposition}"
        );
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (installed by scripts/setup.sh: Debian prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics refused lbd's exposition:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn agent_programs_reloads_and_edits_backends() {
    let net = LabNet::build("lbd-ops");
    let mut lbd = Lbd::new("lbd-ops");
    lbd.write_config(&lbd.lab_config(&net, &LabConfig::default()));
    lbd.start(&net.lb);

    let st = lbd.status();
    assert_eq!(st.generation, st.live_generation, "{st:#?}");
    assert!(st.verify_diffs.is_empty(), "{:?}", st.verify_diffs);
    assert_eq!(st.vips.len(), 4);
    assert_all_answered("first traffic", &traffic(&net, N, UDP_SRC_BASE), N, &lbd);

    // A bad file is refused with the reason; nothing changes.
    let good = lbd.read_config();
    let gen_before = lbd.status().generation;
    lbd.write_config(&good.replacen("weight = 100", "weight = 100000", 1));
    let out = lbd.lbctl(&["reload"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "reload of a bad file must fail as an invalid config"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("weight") && err.contains("100000"),
        "reason missing: {err}"
    );
    // SIGHUP with the same bad file: also refused.
    lbd.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    let st = lbd.status();
    assert_eq!(
        st.generation, gen_before,
        "a refused reload changed the generation"
    );
    assert!(st.verify_diffs.is_empty());
    assert_all_answered(
        "after refused reload",
        &traffic(&net, N, UDP_SRC_BASE),
        N,
        &lbd,
    );
    lbd.write_config(&good);

    // Drain backend 1 of web4: held connection to it survives, no new flows.
    let mut held = Held::open(&net.client, &[IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)], 12);
    lbd.lbctl_ok(&["backend", "drain", "web4", &V4.backend(1).to_string()]);
    let st = lbd.status();
    let b1 = &vip_status(&st, "web4").backends[0];
    assert_eq!(b1.state, BackendState::Drain, "{b1:?}");
    assert!(b1.table_share == 0.0);
    assert_eq!(st.generation, gen_before + 1);
    assert!(
        lbd.read_config().contains("state = \"drain\""),
        "drain not written back:\n{}",
        lbd.read_config()
    );
    let batches = traffic(&net, N, UDP_SRC_BASE + 1000);
    assert_all_answered("after drain", &batches, N, &lbd);
    assert_eq!(
        batches[0].replies.get(&backend_name(1)),
        None,
        "a drained backend got new TCP v4 flows: {:?}",
        batches[0].replies
    );
    assert_eq!(
        held.check(),
        Vec::<String>::new(),
        "held connections broke on drain"
    );

    // Weight change; then undrain; both written back.
    lbd.lbctl_ok(&[
        "backend",
        "set-weight",
        "web4",
        &V4.backend(2).to_string(),
        "300",
    ]);
    lbd.lbctl_ok(&["backend", "undrain", "web4", &V4.backend(1).to_string()]);
    let st = lbd.status();
    let shares: Vec<f64> = vip_status(&st, "web4")
        .backends
        .iter()
        .map(|b| b.table_share)
        .collect();
    assert!(
        (shares[1] - 0.6).abs() < 0.01,
        "weights 100/300/100 → shares {shares:?}"
    );
    assert!(lbd.read_config().contains("weight = 300"));
    assert!(!lbd.read_config().contains("state = \"drain\""));
    assert_eq!(
        held.check(),
        Vec::<String>::new(),
        "held connections broke on weight change"
    );

    // Unknown VIP/backend: clear refusal, exit 64 (invalid edit).
    let out = lbd.lbctl(&["backend", "drain", "nope", "198.18.2.1"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));

    check_metrics(&net, &lbd);

    // Clean, bounded stop.
    let took = lbd.stop();
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
}

#[test]
fn restart_keeps_forwarding_and_connections() {
    let net = LabNet::build("lbd-rst");
    let mut lbd = Lbd::new("lbd-rst");
    lbd.write_config(&lbd.lab_config(&net, &LabConfig::default()));
    lbd.start(&net.lb);
    let generation = lbd.status().generation;
    let mut held = Held::open(&net.client, &[IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)], 16);

    // lbd stops: forwarding goes on (the link and maps are pinned).
    lbd.stop();
    assert_all_answered(
        "while lbd is stopped",
        &traffic(&net, N, UDP_SRC_BASE),
        N,
        &lbd,
    );
    assert_eq!(
        held.check(),
        Vec::<String>::new(),
        "held connections broke while lbd was down"
    );

    // A new lbd adopts the pinned maps: same generation, verified, no reset.
    lbd.start(&net.lb);
    let st = lbd.status();
    assert!(st.adopted, "{st:#?}");
    assert!(
        st.events
            .iter()
            .any(|e| e.contains("verified against saved state")),
        "the restart must adopt through the saved state: {:?}",
        st.events
    );
    assert_eq!(
        st.generation, generation,
        "an unchanged config must keep its generation"
    );
    assert!(st.verify_diffs.is_empty(), "{:?}", st.verify_diffs);
    assert_eq!(
        held.check(),
        Vec::<String>::new(),
        "held connections broke on restart"
    );
    assert_all_answered(
        "after restart",
        &traffic(&net, N, UDP_SRC_BASE + 1000),
        N,
        &lbd,
    );

    // Restart with a changed config (weight change): applied on adoption.
    lbd.stop();
    lbd.write_config(
        &lbd.read_config()
            .replacen("weight = 100", "weight = 200", 1),
    );
    lbd.start(&net.lb);
    let st = lbd.status();
    assert_eq!(st.generation, generation + 1);
    assert!(st.verify_diffs.is_empty(), "{:?}", st.verify_diffs);
    assert_eq!(
        held.check(),
        Vec::<String>::new(),
        "held connections broke on restart with a change"
    );

    // `lbctl datapath detach` really stops forwarding.
    lbd.lbctl_ok(&["datapath", "detach"]);
    let st = lbd.status();
    assert_eq!(st.attach_mode, "detached");
    let r = net
        .client
        .in_netns(|| tcp_request(SocketAddr::new(IpAddr::V4(VIP_V4), TCP_PORT)));
    assert!(r.is_err(), "VIP still answered after detach: {r:?}");
}

#[test]
fn health_probes_remove_and_return_backends_and_valve_holds() {
    let mut net = LabNet::build("lbd-hc");
    let mut lbd = Lbd::new("lbd-hc");
    let cfg = LabConfig::default();
    lbd.write_config(&lbd.lab_config(&net, &cfg));
    lbd.start(&net.lb);
    lbd.wait_status("all backends up", Duration::from_secs(5), |st| {
        st.vips
            .iter()
            .all(|v| v.backends.iter().all(|b| b.health == "up"))
    });

    // Kill backend 2's servers: every VIP drops it within fall × interval
    // (+ bound).
    let bound = Duration::from_millis(cfg.interval_ms * u64::from(cfg.fall) + 1000);
    let t0 = Instant::now();
    net.stop_server(2);
    lbd.wait_status("backend 2 out of every VIP", bound, |st| {
        st.vips
            .iter()
            .all(|v| v.backends[1].state == BackendState::Down && v.backends[1].table_share == 0.0)
    });
    let removal = t0.elapsed();
    eprintln!(
        "backend 2 removed from all VIPs {removal:?} after its server stopped (fall 3 × 200 ms)"
    );
    let batches = traffic(&net, N, UDP_SRC_BASE);
    assert_all_answered("with backend 2 down", &batches, N, &lbd);
    for b in &batches {
        assert_eq!(b.replies.get(&backend_name(2)), None);
    }

    // Back after `rise` successes.
    net.start_server(2);
    let back = lbd.wait_status(
        "backend 2 back",
        Duration::from_millis(cfg.interval_ms * u64::from(cfg.rise) + 1000),
        |st| {
            st.vips
                .iter()
                .all(|v| v.backends[1].state == BackendState::Active)
        },
    );
    eprintln!("backend 2 back {back:?} after its server restarted (rise 2 × 200 ms)");
    assert_all_answered(
        "backend 2 back",
        &traffic(&net, N, UDP_SRC_BASE + 1000),
        N,
        &lbd,
    );

    // Two of three fail: the valve keeps the last healthy set instead of
    // collapsing every VIP onto backend 1.
    net.stop_server(2);
    lbd.wait_status("backend 2 out again", bound, |st| {
        st.vips
            .iter()
            .all(|v| v.backends[1].state == BackendState::Down)
    });
    net.stop_server(3);
    lbd.wait_status("valve tripped", bound, |st| {
        st.vips
            .iter()
            .all(|v| v.valve_alert.is_some() && v.backends[2].health == "down")
    });
    let st = lbd.status();
    for v in &st.vips {
        let share1 = v.backends[0].table_share;
        assert!(
            share1 < 0.6,
            "VIP {}: backend 1 got {share1} of the table: the valve did not hold",
            v.name
        );
        assert_eq!(
            v.backends[2].state,
            BackendState::Active,
            "VIP {}: the valve must keep backend 3",
            v.name
        );
    }
    assert!(
        st.events.iter().any(|e| e.contains("safety valve")),
        "{:?}",
        st.events
    );
    // Recovery releases the valve.
    net.start_server(2);
    net.start_server(3);
    lbd.wait_status("valve released", Duration::from_secs(5), |st| {
        st.vips.iter().all(|v| {
            v.valve_alert.is_none() && v.backends.iter().all(|b| b.state == BackendState::Active)
        })
    });
    let _ = N_BACKENDS;
}

#[test]
fn lbd_refuses_a_bad_config_at_start() {
    let net = LabNet::build("lbd-bad");
    let mut lbd = Lbd::new("lbd-bad");
    let text = lbd
        .lab_config(&net, &LabConfig::default())
        .replace("interface = \"eth0\"", "interface = \"nosuch0\"");
    lbd.write_config(&text);
    let (code, err) = lbd.start_expect_failure(&net.lb);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("nosuch0"), "{err}");
}
