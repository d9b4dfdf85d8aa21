//! The agent's rules on the in-memory data path (no root, no kernel): the
//! change workflow, the guard and the safety valve, as they behave today.
//!
//! The agent is started inside a current-thread Tokio runtime that these
//! tests enter but never drive: probe tasks are spawned but never run, so
//! no probe packet is sent; health results are fed in with
//! `Agent::on_probe` instead.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{runtime::Runtime, sync::mpsc};

use super::{Agent, AgentError, AgentOptions, BackendKey, Origin, Refusal, report};
use crate::{
    health::ProbeResult,
    testing::{MemoryDataplane, MemoryKernel},
};

const BACKENDS: [&str; 4] = ["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"];

/// Knobs of the test config.
#[derive(Clone)]
struct Shape {
    weights: [u32; 4],
    max_unhealthy_share: f64,
    min_approvals: u32,
    health: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            weights: [1; 4],
            max_unhealthy_share: 0.5,
            min_approvals: 1,
            health: false,
        }
    }
}

fn config_text(dir: &std::path::Path, s: &Shape) -> String {
    let mut t = format!(
        r#"[agent]
interface = "lo"
xdp_mode = "generic"
pin_dir = "{dir}/pins"
state_dir = "{dir}/state"

[policy]
min_backends = 2
min_approvals = {approvals}
max_unhealthy_share = {valve}
guard_window = "30s"
guard_max_share_deviation = 0.1
guard_min_flows = 100

[[vip]]
name = "web"
address = "198.18.0.10"
port = 80
protocol = "tcp"
"#,
        dir = dir.display(),
        approvals = s.min_approvals,
        valve = s.max_unhealthy_share,
    );
    if s.health {
        t.push_str(
            "\n[vip.health]\nkind = \"tcp\"\ninterval = \"1h\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n",
        );
    }
    for (i, (addr, w)) in BACKENDS.iter().zip(s.weights).enumerate() {
        let _ = write!(
            t,
            "\n[[vip.backend]]\naddress = \"{addr}\"\nweight = {w}\nmac = \"02:00:00:00:00:0{}\"\n",
            i + 1
        );
    }
    t
}

/// An agent on a memory data path, with its files in a directory removed
/// on drop.
struct Lab {
    dir: PathBuf,
    agent: Agent,
    kernel: MemoryKernel,
    // Dropped after the agent (field order): its probe tasks need it.
    runtime: Runtime,
}

/// Starts an agent on `dataplane` with the config in `dir`.
fn start_agent(runtime: &Runtime, dir: &Path, dataplane: MemoryDataplane) -> Agent {
    let (tx, _rx) = mpsc::channel::<ProbeResult<BackendKey>>(16);
    let _entered = runtime.enter();
    Agent::start_with(
        AgentOptions {
            config_path: dir.join("lbd.toml"),
            detach_on_exit: false,
        },
        tx,
        Box::new(dataplane),
    )
    .expect("starting the agent on the memory data path")
}

impl Lab {
    fn start(name: &str, shape: &Shape) -> Self {
        let dir = std::env::temp_dir().join(format!("lbd-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        std::fs::write(dir.join("lbd.toml"), config_text(&dir, shape)).expect("writing the config");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (dataplane, kernel) = MemoryDataplane::new();
        let agent = start_agent(&runtime, &dir, dataplane);
        Self {
            dir,
            agent,
            kernel,
            runtime,
        }
    }

    /// Stops the agent (the maps stay, as pinned maps do) and starts a new
    /// one that adopts them.
    fn restart(&mut self) {
        let dataplane = MemoryDataplane::adopting(&self.kernel);
        self.agent = start_agent(&self.runtime, &self.dir, dataplane);
    }

    fn write_config(&self, shape: &Shape) -> String {
        let text = config_text(&self.dir, shape);
        std::fs::write(self.agent.config_path(), &text).expect("writing the config");
        text
    }

    fn reload(&mut self) -> Result<crate::control::ChangeReport, AgentError> {
        let _entered = self.runtime.enter();
        self.agent.reload(&Origin::new("reload", "test", ""), None)
    }

    /// Each backend's share of the applied lookup table, by address.
    fn shares(&self) -> BTreeMap<IpAddr, f64> {
        let plan = self.kernel.maps().expect("maps written");
        let by_id = report::table_shares(&plan);
        plan.backends
            .iter()
            .map(|b| (b.address, by_id.get(&b.id).copied().unwrap_or(0.0)))
            .collect()
    }

    fn serving(&self) -> Vec<IpAddr> {
        self.shares()
            .into_iter()
            .filter(|(_, s)| *s > 0.0)
            .map(|(a, _)| a)
            .collect()
    }

    fn probe(&mut self, backend: usize, ok: bool) {
        let _entered = self.runtime.enter();
        let vip = self.agent.config().vips[0].id();
        self.agent.on_probe(ProbeResult {
            key: (vip, addr(backend)),
            at: Instant::now(),
            result: if ok {
                Ok(Duration::from_millis(1))
            } else {
                Err("connection refused".into())
            },
        });
    }

    fn history_kinds(&self) -> Vec<String> {
        self.agent
            .history()
            .expect("history")
            .into_iter()
            .map(|r| format!("{} {}", r.kind, r.reason))
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn addr(i: usize) -> IpAddr {
    BACKENDS[i].parse().expect("address")
}

// --- Workflow ---------------------------------------------------------------

#[test]
fn a_start_writes_the_config_and_attaches() {
    let lab = Lab::start("start", &Shape::default());
    assert_eq!(lab.agent.generation(), 1);
    let k = lab.kernel.lock();
    assert_eq!(k.writes, 1);
    assert_eq!(k.attached.len(), 1);
    assert_eq!(k.attached[0].0, "lo");
    drop(k);
    assert_eq!(lab.serving().len(), 4);
}

#[test]
fn a_restart_with_the_same_file_adopts_the_maps_without_a_write() {
    let mut lab = Lab::start("restart", &Shape::default());
    let maps = lab.kernel.maps();
    lab.restart();
    assert_eq!(lab.agent.generation(), 1, "not a change: same generation");
    assert_eq!(lab.kernel.lock().writes, 1, "verified, not rewritten");
    assert_eq!(lab.agent.applied(), maps.as_ref());
    // A restart with an edited file is a change.
    lab.write_config(&Shape {
        weights: [1, 1, 1, 2],
        ..Shape::default()
    });
    lab.restart();
    assert_eq!(lab.agent.generation(), 2);
    assert_eq!(lab.kernel.lock().writes, 2);
}

#[test]
fn a_refused_change_leaves_the_live_config_and_the_maps() {
    let mut lab = Lab::start("refused", &Shape::default());
    let (maps, source) = (lab.kernel.maps(), lab.agent.source.clone());
    // The weight typo of the origin story: one backend gets ~96%.
    lab.write_config(&Shape {
        weights: [1, 1, 1, 100],
        ..Shape::default()
    });
    let err = lab.reload().expect_err("the policy refuses the typo");
    assert!(matches!(err, AgentError::Policy(_)), "{err}");
    assert_eq!(lab.agent.generation(), 1);
    assert_eq!(lab.agent.source, source);
    assert_eq!(lab.kernel.maps(), maps);
    assert_eq!(lab.kernel.lock().writes, 1);
}

#[test]
fn a_failed_write_restores_and_keeps_the_live_config() {
    let mut lab = Lab::start("write-fails", &Shape::default());
    let (maps, source) = (lab.kernel.maps(), lab.agent.source.clone());
    lab.write_config(&Shape {
        weights: [1, 1, 1, 2],
        ..Shape::default()
    });
    lab.kernel.fail_next_apply();
    let err = lab.reload().expect_err("the write fails");
    assert!(matches!(err, AgentError::Datapath(_)), "{err}");
    assert_eq!(lab.agent.generation(), 1);
    assert_eq!(lab.agent.source, source);
    assert_eq!(lab.kernel.maps(), maps);
    assert_eq!(lab.agent.applied(), maps.as_ref());
    // The same change goes through once the data path works again.
    let report = lab.reload().expect("applied");
    assert_eq!(report.generation, 2);
    assert_ne!(lab.kernel.maps(), maps);
}

#[test]
fn a_plan_needs_an_approval_by_someone_else_and_a_live_base() {
    let mut lab = Lab::start("plan", &Shape::default());
    let candidate = config_text(
        &lab.dir,
        &Shape {
            weights: [1, 1, 1, 2],
            ..Shape::default()
        },
    );
    let doc = lab
        .agent
        .plan_change(candidate.clone(), "candidate.toml", "alice")
        .expect("plan");
    assert!(doc.verdict.passed());
    assert_eq!(lab.agent.generation(), 1, "a plan changes nothing");

    let err = lab.agent.apply_plan(&doc, "alice", None).unwrap_err();
    assert!(
        matches!(&err, AgentError::Refused { reason: Refusal::Unapproved, message } if message.contains("approvals")),
        "{err}"
    );
    let err = lab.agent.approve(&doc, "alice", "").unwrap_err();
    assert!(
        matches!(&err, AgentError::Refused { reason: Refusal::Review, message } if message.contains("author")),
        "{err}"
    );
    let mut edited = doc.clone();
    edited.source.push_str("\n# edited\n");
    let err = lab.agent.approve(&edited, "bob", "").unwrap_err();
    assert!(
        matches!(&err, AgentError::Refused { reason: Refusal::PlanRejected, message } if message.contains("edited")),
        "{err}"
    );

    let approved = lab.agent.approve(&doc, "bob", "looks right").expect("ok");
    assert_eq!(approved.approvals.len(), 1);
    let report = lab.agent.apply_plan(&doc, "alice", None).expect("applied");
    assert_eq!(report.generation, 2);
    assert_eq!(lab.agent.source, candidate);
    // The same plan again is stale: its base is no longer live.
    let err = lab.agent.apply_plan(&doc, "alice", None).unwrap_err();
    assert!(
        matches!(&err, AgentError::Refused { reason: Refusal::StalePlan, message } if message.contains("stale")),
        "{err}"
    );
    assert_eq!(lab.agent.generation(), 2);
}

// --- Guard ------------------------------------------------------------------

/// Starts a lab, reloads a change (which the guard then watches) and
/// zeroes the counters' baseline.
fn guarded(name: &str) -> Lab {
    let mut lab = Lab::start(name, &Shape::default());
    lab.write_config(&Shape {
        weights: [1, 1, 1, 2],
        ..Shape::default()
    });
    lab.reload().expect("reload");
    assert_eq!(lab.agent.generation(), 2);
    assert!(lab.agent.guard_status().is_some(), "the guard watches");
    lab
}

/// Counts `total` new flows spread by `share` over the applied backends.
fn count_flows(lab: &Lab, total: f64, share: impl Fn(IpAddr, f64) -> f64) {
    let plan = lab.kernel.maps().expect("maps");
    let shares = report::table_shares(&plan);
    for b in &plan.backends {
        let s = shares.get(&b.id).copied().unwrap_or(0.0);
        lab.kernel
            .set_new_flows(b.id, (total * share(b.address, s)).round() as u64);
    }
}

#[test]
fn the_guard_keeps_a_change_whose_traffic_follows_the_tables() {
    let mut lab = guarded("guard-ok");
    count_flows(&lab, 1000.0, |_, s| s);
    lab.agent.guard_tick();
    assert_eq!(lab.agent.generation(), 2);
    assert!(lab.agent.guard_status().is_some(), "still watching");
    assert!(
        !lab.history_kinds()
            .iter()
            .any(|k| k.starts_with("rollback"))
    );
}

#[test]
fn the_guard_rolls_back_when_shares_skew() {
    let mut lab = guarded("guard-skew");
    let before = lab.agent.source.clone();
    // The first backend takes 70% of the new flows; its table gives it 20%.
    count_flows(&lab, 1000.0, |a, _| if a == addr(0) { 0.7 } else { 0.1 });
    lab.agent.guard_tick();
    assert!(lab.agent.guard_status().is_none());
    assert_eq!(lab.agent.generation(), 3, "rolled back as a new generation");
    assert_ne!(lab.agent.source, before);
    assert_eq!(
        lab.agent.source,
        config_text(&lab.dir, &Shape::default()),
        "generation 1's config is live again"
    );
    let kinds = lab.history_kinds();
    assert!(
        kinds.iter().any(|k| k.starts_with("guard failed")),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k.starts_with("rollback")), "{kinds:?}");
}

// --- Safety valve -----------------------------------------------------------

fn health_shape(max_unhealthy_share: f64) -> Shape {
    Shape {
        health: true,
        max_unhealthy_share,
        ..Shape::default()
    }
}

/// `fall` (2) failed probes: the backend is down.
fn fail(lab: &mut Lab, backend: usize) {
    lab.probe(backend, false);
    lab.probe(backend, false);
}

#[test]
fn a_backend_that_fails_within_the_limit_is_removed() {
    let mut lab = Lab::start("valve-within", &health_shape(0.5));
    fail(&mut lab, 0);
    assert_eq!(lab.serving(), vec![addr(1), addr(2), addr(3)]);
    assert!(lab.agent.valve_alerts().is_empty());
    // Health changes are not new generations.
    assert_eq!(lab.agent.generation(), 1);
    lab.probe(0, true);
    lab.probe(0, true);
    assert_eq!(lab.serving().len(), 4, "back after `rise` successes");
}

#[test]
fn more_than_the_unhealthy_share_down_keeps_the_last_healthy_set() {
    let mut lab = Lab::start("valve-trips", &health_shape(0.25));
    fail(&mut lab, 0);
    assert_eq!(lab.serving(), vec![addr(1), addr(2), addr(3)]);
    // A second failure would be 2 of 4 down, above 25%: the valve holds.
    fail(&mut lab, 1);
    assert_eq!(lab.serving(), vec![addr(1), addr(2), addr(3)]);
    let alert = lab.agent.valve_alerts().values().next().expect("an alert");
    assert!(alert.contains("2 of 4"), "{alert}");
    // Recovery releases it.
    lab.probe(1, true);
    lab.probe(1, true);
    assert!(lab.agent.valve_alerts().is_empty());
    assert_eq!(lab.serving(), vec![addr(1), addr(2), addr(3)]);
}

#[test]
fn every_backend_down_fails_open() {
    let mut lab = Lab::start("valve-open", &health_shape(0.5));
    for b in 0..4 {
        fail(&mut lab, b);
    }
    assert!(!lab.serving().is_empty(), "a VIP never serves nothing");
    assert!(!lab.agent.valve_alerts().is_empty());
}
