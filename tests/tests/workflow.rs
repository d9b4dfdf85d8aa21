//! The safe change workflow with the real binaries on the netns lab:
//! simulate (model and kernel agree), plan (a weight typo refused with the
//! reason), approve (no self-approval), apply (stale, tampered, unapproved
//! plans refused; forced apply recorded), rollback, history, and the guard
//! catching a change that looked fine on paper (source-address affinity
//! while most requests come from one client) from the live counters and
//! rolling it back within its window.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{LabConfig, Lbd},
    lab::{LabNet, TCP_PORT, V4, batch, tcp_request},
};
use lb_userspace::{
    agent::history::Record,
    config::{HostChecks, check},
    control::Response,
    simulate,
};

fn history(lbd: &Lbd) -> Vec<Record> {
    let out = lbd.lbctl_ok(&["history", "-o", "json"]);
    let r: Response = serde_json::from_str(&out).expect("history JSON");
    serde_json::from_value(r.data).expect("history records")
}

fn stderr(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

#[test]
fn simulate_model_and_kernel_agree() {
    let net = LabNet::build("wf-sim");
    let lbd = Lbd::new("wf-sim");
    let mut text = lbd.lab_config(
        &net,
        &LabConfig {
            weights: [100, 300, 600],
            ..LabConfig::default()
        },
    );
    // One VIP with client affinity, as well.
    text = text.replacen(
        "name = \"dns4\"",
        "name = \"dns4\"\nhash = \"source-address\"",
        1,
    );
    let cfg = check(&text, "lab.toml", HostChecks::No).expect("lab config");
    let r = simulate::run(&cfg, 20_000).expect("simulate");
    assert!(r.agree, "{}", simulate::render(&r));
    for v in &r.vips {
        assert_eq!(v.mismatches, 0);
        assert!(v.worst_deviation < 0.02, "{}", simulate::render(&r));
        for b in &v.backends {
            assert!((b.predicted - b.expected).abs() < 0.001, "{b:?}");
        }
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one story: plan, approve, apply, stale, force, rollback, history
fn plan_approve_apply_rollback_and_history() {
    let net = LabNet::build("wf-rev");
    let mut lbd = Lbd::new("wf-rev");
    let base = lbd.lab_config(
        &net,
        &LabConfig {
            min_approvals: 1,
            ..LabConfig::default()
        },
    );
    lbd.write_config(&base);
    lbd.start(&net.lb);
    let gen0 = lbd.status().generation;
    let dir = lbd.dir.clone();
    let path = |n: &str| dir.join(n).display().to_string();

    // A weight typo is refused at plan time, with the backend and the rule.
    std::fs::write(
        path("typo.toml"),
        base.replacen("weight = 100", "weight = 1000", 1),
    )
    .unwrap();
    let out = lbd.lbctl(&["plan", &path("typo.toml"), "--author", "alice"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("FAILS") && text.contains("max_share_vs_even"),
        "{text}"
    );
    assert!(text.contains(&V4.backend(1).to_string()), "{text}");

    // A sound change: plan it.
    let cand = base.replacen("weight = 100", "weight = 150", 1);
    std::fs::write(path("cand.toml"), &cand).unwrap();
    let out = lbd.lbctl(&[
        "plan",
        &path("cand.toml"),
        "--plan-file",
        &path("p1.json"),
        "--author",
        "alice",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Unapproved: refused. The author cannot approve. Someone else can.
    let out = lbd.lbctl(&["apply", &path("p1.json")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("approvals"), "{}", stderr(&out));
    let out = lbd.lbctl(&["approve", &path("p1.json"), "--reviewer", "alice"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot approve their own plan"),
        "{}",
        stderr(&out)
    );
    lbd.lbctl_ok(&[
        "approve",
        &path("p1.json"),
        "--reviewer",
        "bob",
        "--comment",
        "lgtm",
    ]);

    // An edited plan file is refused, also after approval.
    let p1 = std::fs::read_to_string(path("p1.json")).unwrap();
    std::fs::write(
        path("tampered.json"),
        p1.replacen("weight = 150", "weight = 9000", 1),
    )
    .unwrap();
    let out = lbd.lbctl(&["apply", &path("tampered.json")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("edited"), "{}", stderr(&out));
    // ... and --force does not get it through.
    let out = lbd.lbctl(&["apply", &path("tampered.json"), "--force", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(1));

    // The reviewed plan applies; the file now holds exactly its config.
    lbd.lbctl_ok(&["apply", &path("p1.json"), "--actor", "carol"]);
    let st = lbd.status();
    assert_eq!(st.generation, gen0 + 1);
    assert_eq!(st.live_generation, gen0 + 1);
    assert_eq!(lbd.read_config(), cand);

    // A plan made before another change is stale.
    let cand2 = cand.replacen("weight = 100", "weight = 120", 1);
    std::fs::write(path("cand2.toml"), &cand2).unwrap();
    lbd.lbctl_ok(&[
        "plan",
        &path("cand2.toml"),
        "--plan-file",
        &path("p2.json"),
        "--author",
        "alice",
    ]);
    lbd.lbctl_ok(&["approve", &path("p2.json"), "--reviewer", "bob"]);
    lbd.lbctl_ok(&[
        "backend",
        "set-weight",
        "web6",
        &lb_tests::lab::V6.backend(3).to_string(),
        "130",
    ]);
    let out = lbd.lbctl(&["apply", &path("p2.json")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("stale"), "{}", stderr(&out));
    // Forcing it is possible, and recorded with the reason.
    lbd.lbctl_ok(&[
        "apply",
        &path("p2.json"),
        "--force",
        "--reason",
        "incident 7",
    ]);
    let forced_gen = lbd.status().generation;

    // Rollback restores the generation before, as a new generation.
    lbd.lbctl_ok(&["rollback", "--reason", "undo the forced change"]);
    let st = lbd.status();
    assert_eq!(st.generation, forced_gen + 1);
    assert!(st.verify_diffs.is_empty(), "{:?}", st.verify_diffs);

    let h = history(&lbd);
    let kinds: Vec<&str> = h.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["start", "apply", "backend", "apply", "rollback"],
        "{h:#?}"
    );
    let applied = &h[1];
    assert_eq!(applied.actor, "carol");
    assert_eq!(applied.approvals.len(), 1);
    assert_eq!(applied.approvals[0].reviewer, "bob");
    assert!(applied.plan_digest.is_some());
    assert!(!applied.diff.is_empty(), "{applied:?}");
    let forced = &h[3];
    assert!(forced.reason.contains("incident 7"), "{forced:?}");
    assert!(
        forced.overridden.iter().any(|o| o.contains("stale")),
        "{forced:?}"
    );
    assert_eq!(h[4].restored, Some(forced_gen - 1));
    // The human form too.
    let text = lbd.lbctl_ok(&["history"]);
    assert!(
        text.contains("approved by: bob") && text.contains("OVERRIDDEN"),
        "{text}"
    );
}

#[test]
fn guard_rolls_back_a_change_skewed_by_real_traffic() {
    let net = LabNet::build("wf-guard");
    let mut lbd = Lbd::new("wf-guard");
    let base = lbd.lab_config(
        &net,
        &LabConfig {
            policy_extra:
                "guard_window = \"30s\"\nguard_min_flows = 90\nguard_max_share_deviation = 0.15\n"
                    .into(),
            ..LabConfig::default()
        },
    );
    lbd.write_config(&base);
    lbd.start(&net.lb);
    let gen0 = lbd.status().generation;
    let dir = lbd.dir.clone();
    let path = |n: &str| dir.join(n).display().to_string();

    // Client affinity for web4: the tables do not change, so the plan
    // passes — but all our requests come from one client.
    let cand = base.replacen(
        "name = \"web4\"",
        "name = \"web4\"\nhash = \"source-address\"",
        1,
    );
    std::fs::write(path("affinity.toml"), &cand).unwrap();
    lbd.lbctl_ok(&[
        "plan",
        &path("affinity.toml"),
        "--plan-file",
        &path("p.json"),
        "--author",
        "alice",
    ]);
    lbd.lbctl_ok(&["apply", &path("p.json"), "--actor", "alice"]);
    assert_eq!(lbd.status().generation, gen0 + 1);
    let t0 = Instant::now();

    // Real traffic from one client: every flow lands on one backend.
    let b = net
        .client
        .in_netns(|| batch(150, |_| tcp_request(SocketAddr::new(V4.vip(), TCP_PORT))));
    assert!(b.failures.is_empty(), "{:?}", b.failures);
    assert_eq!(
        b.replies.len(),
        1,
        "affinity should pin one client to one backend: {:?}",
        b.replies
    );

    // The guard sees it in the counters and rolls back within its window.
    let took = lbd.wait_status("guard rollback", Duration::from_secs(30), |st| {
        st.generation == gen0 + 2
    });
    eprintln!(
        "guard rolled back {:?} after the apply ({took:?} after the traffic)",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert_eq!(
        lbd.read_config(),
        base,
        "the rollback must restore the file too"
    );
    let h = history(&lbd);
    let guard = h
        .iter()
        .find(|r| r.kind == "guard")
        .expect("a guard record");
    assert!(
        guard.reason.contains("failed") && guard.reason.contains("198.18.0.10:80/tcp"),
        "{guard:?}"
    );
    let rb = h
        .iter()
        .find(|r| r.kind == "rollback")
        .expect("a rollback record");
    assert_eq!(rb.actor, "guard");
    assert_eq!(rb.restored, Some(gen0));

    // Traffic is spread again after the rollback.
    let b = net
        .client
        .in_netns(|| batch(60, |_| tcp_request(SocketAddr::new(V4.vip(), TCP_PORT))));
    assert!(b.failures.is_empty());
    assert!(b.replies.len() > 1, "{:?}", b.replies);
}
