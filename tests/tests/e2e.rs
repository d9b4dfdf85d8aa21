//! End to end: real TCP connections and UDP exchanges from two clients
//! through `lbd`'s XDP program in both forwarding modes (L2 DSR and
//! IP-in-IP with `xdp_decap` on the backends), IPv4 and IPv6.
//!
//! - every request answered, and the distribution within a stated
//!   tolerance of the weights (1 : 2 : 3);
//! - long-lived connections survive a backend addition, a weight change, a
//!   drain and an `lbd` restart with zero resets;
//! - health failover and recovery through IP-in-IP;
//! - the LB host's own TCP service is unaffected;
//! - the same with a real standard client: curl.
//!
//! Each test builds its own uniquely named namespaces and cleans up on
//! failure; traffic is bounded in count and time.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use lb_tests::{
    agent::{LabConfig, Lbd},
    lab::{
        Batch, Held, LB_PORT, LabNet, LabOptions, N_BACKENDS, V4, V6, backend_name, lb_service,
        tcp_request,
    },
    pins::PinDir,
};
use lb_userspace::model::BackendState;

/// Requests per VIP and protocol (split over the two clients).
const N: usize = 300;
/// Allowed |observed − weight share| per backend, in share points. The
/// requests are a fixed set of flows (fixed source ports), so the shares
/// are the same on every run; 9 points is more than 3 standard deviations
/// of a share near 1/3 over 300 flows, the spread a hash gives a set of
/// flows this size.
const TOLERANCE: f64 = 0.09;

fn ipip_lab(prefix: &str) -> LabNet {
    let pins = PinDir::new(prefix);
    let mut opts = LabOptions::test(prefix, pins.path());
    opts.clients = 2;
    opts.ipip = true;
    LabNet::build_with(opts, Some(pins))
}

fn check_shares(what: &str, b: &Batch, weights: [u32; 3], n: usize, lbd: &Lbd) {
    assert!(
        b.failures.is_empty() && b.answered() == n,
        "{what}: {} of {n} answered; failures {:#?}\nlbd log:\n{}\nlbctl stats:\n{}",
        b.answered(),
        &b.failures[..b.failures.len().min(5)],
        lbd.log(),
        String::from_utf8_lossy(&lbd.lbctl(&["stats"]).stdout)
    );
    let total: u32 = weights.iter().sum();
    for i in 1..=N_BACKENDS {
        let got = b.replies.get(&backend_name(i)).copied().unwrap_or(0) as f64 / n as f64;
        let want = f64::from(weights[usize::from(i - 1)]) / f64::from(total);
        assert!(
            (got - want).abs() <= TOLERANCE,
            "{what}: backend-{i} got {:.1}% of requests, its weight asks for {:.1}% (tolerance {:.0} points): {:?}",
            got * 100.0,
            want * 100.0,
            TOLERANCE * 100.0,
            b.replies
        );
    }
}

#[test]
fn both_modes_both_families_answer_every_request_in_weight_proportion() {
    let net = ipip_lab("e2e-dist");
    let mut lbd = Lbd::new("e2e-dist");
    let weights = [100, 200, 300];
    lbd.write_config(&lbd.lab_config(
        &net,
        &LabConfig {
            weights,
            ipip: true,
            ..LabConfig::default()
        },
    ));
    lbd.start(&net.lb);
    let mut base = 20_000;
    for fam in [V4, V6] {
        for (mode, vip) in [("dsr", fam.vip()), ("ipip", fam.vip_ipip())] {
            let (tcp, udp) = net.traffic(fam, vip, N, base);
            base += 1000;
            check_shares(
                &format!("{} {mode} tcp", fam.label()),
                &tcp,
                weights,
                N,
                &lbd,
            );
            check_shares(
                &format!("{} {mode} udp", fam.label()),
                &udp,
                weights,
                N,
                &lbd,
            );
        }
    }
    let st = lbd.status();
    assert!(st.verify_diffs.is_empty(), "{:?}", st.verify_diffs);

    // The LB host's own service (not a VIP) keeps working.
    for fam in [V4, V6] {
        let listener = net
            .lb
            .in_netns(|| TcpListener::bind((fam.lb(), LB_PORT)).expect("bind the LB's service"));
        let server = lb_service(listener);
        let r = net
            .client
            .in_netns(|| tcp_request(SocketAddr::new(fam.lb(), LB_PORT)));
        assert_eq!(r.map(|x| x.1), Ok("lb".to_owned()), "{}", fam.label());
        server
            .join()
            .expect("lb service thread")
            .expect("lb service");
    }

    // A real standard client: curl, over both modes and families.
    for url in [
        "http://198.18.0.10/",
        "http://198.18.0.20/",
        "http://[2001:db8::10]/",
        "http://[2001:db8::20]/",
    ] {
        let out = net.client.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "3",
            "-o",
            "-",
            "-w",
            " %{http_code}",
            url,
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with("backend-") && text.ends_with(" 200"),
            "curl {url}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn long_lived_connections_survive_addition_weight_drain_and_restart() {
    let net = ipip_lab("e2e-held");
    let mut lbd = Lbd::new("e2e-held");
    // Start with two backends per VIP; backend 3 is added later.
    let two = lbd.lab_config(
        &net,
        &LabConfig {
            ipip: true,
            backends: 2,
            ..LabConfig::default()
        },
    );
    lbd.write_config(&two);
    lbd.start(&net.lb);
    let vips = [V4.vip(), V6.vip(), V4.vip_ipip(), V6.vip_ipip()];
    let mut held: Vec<Held> = net
        .clients()
        .iter()
        .map(|c| Held::open(c, &vips, 16))
        .collect();
    let check = |held: &mut Vec<Held>, step: &str, lbd: &Lbd| {
        let bad: Vec<String> = held.iter_mut().flat_map(Held::check).collect();
        assert!(
            bad.is_empty(),
            "{step}: {} held connections broke: {bad:#?}\nlbd log:\n{}",
            bad.len(),
            lbd.log()
        );
    };
    check(&mut held, "start", &lbd);

    // Backend addition (reload with backend 3 in every VIP).
    let three = lbd.lab_config(
        &net,
        &LabConfig {
            ipip: true,
            ..LabConfig::default()
        },
    );
    lbd.write_config(&three);
    lbd.lbctl_ok(&["reload"]);
    check(&mut held, "after adding backend 3", &lbd);
    let (tcp, _) = net.traffic(V4, V4.vip_ipip(), 90, 40_000);
    assert!(
        tcp.replies.contains_key(&backend_name(3)),
        "new flows must reach the added backend: {:?}",
        tcp.replies
    );

    // Weight change and drain, through the CLI (written back).
    lbd.lbctl_ok(&[
        "backend",
        "set-weight",
        "web4-ipip",
        &V4.backend(2).to_string(),
        "200",
    ]);
    check(&mut held, "after a weight change", &lbd);
    lbd.lbctl_ok(&["backend", "drain", "web4", &V4.backend(1).to_string()]);
    lbd.lbctl_ok(&["backend", "drain", "web6-ipip", &V6.backend(1).to_string()]);
    check(&mut held, "after drains", &lbd);

    // lbd restart: forwarding and connections go on.
    lbd.stop();
    check(&mut held, "while lbd is stopped", &lbd);
    lbd.start(&net.lb);
    assert!(lbd.status().adopted);
    check(&mut held, "after the restart", &lbd);
    let total: usize = held.iter().map(Held::len).sum();
    let spread: BTreeMap<String, usize> =
        held.iter()
            .flat_map(Held::backends)
            .fold(BTreeMap::new(), |mut m, (k, v)| {
                *m.entry(k).or_default() += v;
                m
            });
    eprintln!(
        "{total} long-lived connections, zero resets over addition, weight change, drain, restart; by backend {spread:?}"
    );
}

#[test]
fn ipip_health_failover_and_recovery() {
    let mut net = ipip_lab("e2e-hc");
    let mut lbd = Lbd::new("e2e-hc");
    let cfg = LabConfig {
        ipip: true,
        ..LabConfig::default()
    };
    lbd.write_config(&lbd.lab_config(&net, &cfg));
    lbd.start(&net.lb);
    net.stop_server(3);
    let bound = Duration::from_millis(cfg.interval_ms * u64::from(cfg.fall) + 1500);
    lbd.wait_status("backend 3 out", bound, |st| {
        st.vips
            .iter()
            .all(|v| v.backends[2].state == BackendState::Down)
    });
    for fam in [V4, V6] {
        let (tcp, udp) = net.traffic(fam, fam.vip_ipip(), 60, 50_000);
        for b in [&tcp, &udp] {
            assert!(b.failures.is_empty(), "{}: {:?}", fam.label(), b.failures);
            assert!(!b.replies.contains_key(&backend_name(3)));
        }
    }
    net.start_server(3);
    lbd.wait_status("backend 3 back", Duration::from_secs(5), |st| {
        st.vips
            .iter()
            .all(|v| v.backends[2].state == BackendState::Active)
    });
    let (tcp, _) = net.traffic(V4, V4.vip_ipip(), 90, 51_000);
    assert!(tcp.failures.is_empty());
    assert!(
        tcp.replies.contains_key(&backend_name(3)),
        "{:?}",
        tcp.replies
    );
}
