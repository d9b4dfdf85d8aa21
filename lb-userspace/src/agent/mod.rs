//! The agent `lbd`: owns the data path, applies the config file, runs the
//! health probes and answers the control API.
//!
//! Every change goes the same way: build the candidate config (file or CLI
//! edit) → validate it → compute which backends may serve (health + the
//! safety valve) → plan the maps (pure) → write the difference into the
//! kernel (`Dataplane::apply`, which restores the previous plan if a write
//! fails) → persist the applied state → only then write a CLI edit back to
//! the config file. A failure anywhere leaves the live config and the data
//! path exactly as they were.
//!
//! Around this module: `serving` (the safety valve), `workflow` (plan,
//! approve, apply, rollback), `guard`, `history`, `state`, `report` and
//! `metrics` (what the agent shows), `server` (the control socket and
//! HTTP), `systemd`, `error`. The kernel is reached only through the
//! `Dataplane` trait, so `tests` runs the rules on memory.
//!
//! Why this file is longer than ~600 lines of code: it still holds the
//! start-up (start, adopt, attach), the change types (Gate, Source, Origin,
//! Prepared) and the probe handling beside the change road. They are the
//! parts issue 18 rewrites in parallel (live policy on every road, caller
//! identities, guard re-baseline); they move to their own modules (start,
//! change, probes) once that has landed, so neither change has to be made
//! twice.

mod error;
pub mod guard;
pub mod history;
pub mod metrics;
pub mod report;
pub mod server;
pub mod serving;
pub mod state;
pub mod systemd;
#[cfg(test)]
mod tests;
pub mod workflow;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use aya::programs::XdpMode;
pub use error::{AgentError, Refusal};
pub use report::diff_lines;
use tokio::sync::mpsc;

use crate::{
    config::{self, AdminState, Config, HostChecks, VipConfig, XdpAttachMode},
    control::{BackendOp, ChangeReport},
    datapath::{Datapath, Dataplane, DataplaneStats, LoadOptions},
    health::{Health, Monitor, ProbeResult, Target, Tracker},
    model::{BackendState, VipId},
    plan::{self, IdAllocator, MapPlan},
    policy,
};

/// A backend of a VIP, as health checks and the valve know it.
pub type BackendKey = (VipId, IpAddr);

/// Per VIP, the backends health lets serve.
pub type ServeSets = BTreeMap<VipId, BTreeSet<IpAddr>>;

/// Whether a change must pass the policy.
#[derive(Clone, Debug)]
pub enum Gate {
    /// Operator changes: refused when the policy fails, unless forced
    /// with a reason (recorded).
    Policy { force: Option<String> },
    /// Health transitions: the safety valve governs them, not the policy.
    Health,
    /// Restoring a generation that was live before (rollback, undo): not
    /// gated, but recorded.
    Rollback,
}

/// The config text of a change: given, or made from the live text after
/// the maps are written (a CLI edit re-serialises the whole file, which
/// need not delay the data path).
pub enum Source {
    Text(String),
    Edit {
        base: String,
        vip: String,
        backend: IpAddr,
        edit: config::BackendEdit,
    },
}

impl From<String> for Source {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl Source {
    fn resolve(self, file: &str) -> Result<String, AgentError> {
        match self {
            Self::Text(t) => Ok(t),
            Self::Edit {
                base,
                vip,
                backend,
                edit,
            } => config::edit_backend(&base, &vip, backend, edit)
                .map_err(|e| AgentError::Config(e.with_file(file))),
        }
    }
}

/// Where a change comes from, for the history.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    /// start, reload, backend, apply, rollback, health, undo.
    pub kind: &'static str,
    pub actor: String,
    pub reason: String,
    pub plan_digest: Option<String>,
    pub approvals: Vec<history::Approval>,
    pub restored: Option<u64>,
    /// When the request arrived (for the end-to-end figures).
    pub started: Option<Instant>,
    /// Refusals other than the policy's that the operator overrode
    /// (stale plan, missing approvals), for the record.
    pub overridden: Vec<String>,
}

impl Origin {
    pub fn new(kind: &'static str, actor: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            kind,
            actor: actor.into(),
            reason: reason.into(),
            ..Self::default()
        }
    }

    /// The same origin, timed from `at`.
    #[must_use]
    pub fn at(mut self, at: Instant) -> Self {
        self.started = Some(at);
        self
    }

    fn describe(&self) -> String {
        if self.reason.is_empty() {
            self.kind.to_owned()
        } else {
            format!("{} ({})", self.kind, self.reason)
        }
    }
}

/// A planned change, not yet written.
pub struct Prepared {
    serve: ServeSets,
    alerts: BTreeMap<VipId, String>,
    spec: crate::model::DataplaneSpec,
    before: IdAllocator,
    pub planned: MapPlan,
    pub verdict: policy::Verdict,
}

/// How `lbd` was started.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub config_path: PathBuf,
    /// Detach the XDP program when the agent stops (default: keep
    /// forwarding; a restarted agent adopts the pinned program and maps).
    pub detach_on_exit: bool,
}

/// Maximum events kept for `lbctl status`.
const MAX_EVENTS: usize = 50;

/// The running agent.
pub struct Agent {
    opts: AgentOptions,
    config: Config,
    source: String,
    datapath: Box<dyn Dataplane>,
    generation: u64,
    /// Allocator to plan from when nothing is applied yet.
    base_allocator: IdAllocator,
    trackers: BTreeMap<BackendKey, Tracker>,
    /// Initial health for trackers made at start (from the adopted state).
    initial_down: BTreeSet<BackendKey>,
    /// Per VIP, the eligible backends health let serve at the last apply.
    served: BTreeMap<VipId, BTreeSet<IpAddr>>,
    valve_alerts: BTreeMap<VipId, String>,
    events: VecDeque<String>,
    started: Instant,
    detached: bool,
    monitor: Monitor<BackendKey>,
    samples: VecDeque<(Instant, DataplaneStats)>,
    guard: Option<guard::Guard>,
    /// Rollbacks the guard made since start (a metric).
    guard_rollbacks: u64,
    /// The last config change written to the history (for status and the
    /// alerts' annotations); a cell because recording takes `&self`.
    last_change: std::cell::RefCell<Option<crate::control::LastChange>>,
}

impl Agent {
    /// Loads and checks the config, loads (or adopts) the data path,
    /// programs it and attaches (on a restart whose earlier program still
    /// forwards: attaches first, then programs). Health results are sent to
    /// `probes`.
    pub fn start(
        opts: AgentOptions,
        probes: mpsc::Sender<ProbeResult<BackendKey>>,
    ) -> Result<Self, AgentError> {
        let (config, source) = config::load(&opts.config_path, HostChecks::Yes)?;
        let a = &config.agent;
        let datapath = Datapath::load(LoadOptions {
            conn_table_capacity: a.conn_table_capacity,
            pin_dir: Some(a.pin_dir.clone()),
        })?;
        Self::start_on(opts, probes, (config, source), Box::new(datapath))
    }

    /// [`Agent::start`] on a given data path (an in-memory one in tests).
    pub fn start_with(
        opts: AgentOptions,
        probes: mpsc::Sender<ProbeResult<BackendKey>>,
        datapath: Box<dyn Dataplane>,
    ) -> Result<Self, AgentError> {
        let loaded = config::load(&opts.config_path, HostChecks::Yes)?;
        Self::start_on(opts, probes, loaded, datapath)
    }

    fn start_on(
        opts: AgentOptions,
        probes: mpsc::Sender<ProbeResult<BackendKey>>,
        (config, source): (Config, String),
        datapath: Box<dyn Dataplane>,
    ) -> Result<Self, AgentError> {
        let mut agent = Self {
            opts,
            datapath,
            config: config.clone(),
            source: source.clone(),
            generation: 0,
            base_allocator: IdAllocator::default(),
            trackers: BTreeMap::new(),
            initial_down: BTreeSet::new(),
            served: BTreeMap::new(),
            valve_alerts: BTreeMap::new(),
            events: VecDeque::new(),
            started: Instant::now(),
            detached: false,
            monitor: Monitor::new(probes),
            samples: VecDeque::new(),
            guard: None,
            guard_rollbacks: 0,
            last_change: std::cell::RefCell::new(None),
        };
        let adopted_digest = agent.adopt()?;
        // If an earlier process's program still forwards on our interface
        // (a restart), ours takes it over first: a program reads its own
        // copy of the VIP address filter, written only through its own
        // handle, so the earlier program would not see the filter changes
        // of this apply. Otherwise (new maps, or pins left after a detach)
        // the program is attached only once the config is applied.
        let take_over = agent
            .datapath
            .pinned_interfaces()
            .contains(&agent.config.agent.interface);
        if take_over {
            agent.attach()?;
        }
        // A restart with the same file is not a change: same generation.
        let generation = if adopted_digest == Some(state::digest(&source)) {
            agent.generation
        } else {
            agent.generation + 1
        };
        agent.apply(
            config,
            source,
            generation,
            &Origin::new("start", "lbd", ""),
            &Gate::Policy { force: None },
        )?;
        if !take_over {
            agent.attach()?;
        }
        Ok(agent)
    }

    /// With adopted maps: re-plans the saved spec, checks the kernel holds
    /// exactly that, and makes it the base of the next apply. Without saved
    /// state (or if the kernel differs), plans from scratch with ids past
    /// every generation the kernel knows, and removes what is not planned.
    /// Returns the saved config digest when the maps were adopted through
    /// the saved state.
    fn adopt(&mut self) -> Result<Option<u64>, AgentError> {
        if !self.datapath.adopted() {
            self.event("created and pinned new maps");
            return Ok(None);
        }
        let dir = self.config.agent.state_dir.clone();
        let saved = match state::load(&dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("ignoring saved state: {e}");
                None
            }
        };
        if let Some(saved) = saved {
            match plan::plan(&saved.spec, &saved.allocator_before) {
                Ok(prev) => {
                    let diffs = self.datapath.verify(&prev)?;
                    if diffs.is_empty() {
                        for v in &saved.spec.vips {
                            for b in &v.backends {
                                if b.state == BackendState::Down {
                                    self.initial_down.insert((v.id(), b.address));
                                }
                            }
                        }
                        self.generation = saved.generation;
                        self.datapath.assume_applied(prev);
                        self.event(&format!(
                            "adopted pinned maps at generation {} (verified against saved state)",
                            saved.generation
                        ));
                        return Ok(Some(saved.config_digest));
                    }
                    tracing::warn!(
                        "pinned maps differ from the saved state ({}); reprogramming everything",
                        diffs.join("; ")
                    );
                    self.generation = saved.generation;
                }
                Err(e) => tracing::warn!("saved state cannot be planned ({e}); reprogramming"),
            }
        }
        self.base_allocator = IdAllocator::after_generations(&self.datapath.backend_generations()?);
        self.event("adopted pinned maps without matching state: reprogrammed all entries");
        Ok(None)
    }

    fn attach(&mut self) -> Result<(), AgentError> {
        let a = &self.config.agent;
        let iface = a.interface.clone();
        for stale in self.datapath.pinned_interfaces() {
            if stale != iface {
                tracing::warn!("detaching from {stale}: the config no longer names it");
                self.datapath.detach_pinned(&stale)?;
            }
        }
        let mode = match a.xdp_mode {
            XdpAttachMode::Driver => XdpMode::Driver,
            XdpAttachMode::Generic => XdpMode::Skb,
        };
        let mut egress = Vec::new();
        for name in std::iter::once(&a.interface).chain(&a.egress_interfaces) {
            egress
                .push(config::interface_index(name).ok_or_else(|| {
                    AgentError::io(format!("interface {name}"), "does not exist")
                })?);
        }
        self.datapath.set_egress_interfaces(&egress)?;
        self.datapath.attach(&iface, mode)?;
        self.event(&format!("attached to {iface} ({:?} mode)", a.xdp_mode));
        Ok(())
    }

    /// Records an event for `lbctl status` and the log.
    fn event(&mut self, what: &str) {
        tracing::info!("{what}");
        let stamp = humane_time(SystemTime::now());
        self.events.push_back(format!("{stamp} {what}"));
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Which backends health (after the safety valve) lets serve, per VIP,
    /// and the VIPs whose valve is holding (with the reason).
    fn serve_sets(&self, cfg: &Config) -> (ServeSets, BTreeMap<VipId, String>) {
        let is_down = |id, address| {
            self.trackers
                .get(&(id, address))
                .is_some_and(|t| t.health() == Health::Down)
        };
        serving::serve_sets(cfg, is_down, &self.served)
    }

    /// Plans `cfg` at `generation` against what is live (nothing written).
    pub fn prepare(&self, cfg: &Config, generation: u64) -> Result<Prepared, AgentError> {
        let t = Instant::now();
        let (serve, alerts) = self.serve_sets(cfg);
        let spec = cfg.dataplane_spec(generation, &|v: &VipConfig, b| {
            serve.get(&v.id()).is_none_or(|s| s.contains(&b.address))
        });
        tracing::debug!(
            "serve sets and spec: {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let (before, planned) = match self.datapath.applied() {
            Some(prev) => (prev.allocator.clone(), plan::plan_next(&spec, prev)?),
            None => (
                self.base_allocator.clone(),
                plan::plan(&spec, &self.base_allocator)?,
            ),
        };
        tracing::debug!("planned: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        let verdict = policy::evaluate(self.datapath.applied(), &planned, cfg);
        tracing::debug!("judged: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        Ok(Prepared {
            serve,
            alerts,
            spec,
            before,
            planned,
            verdict,
        })
    }

    /// Plans and (if the gate allows) writes `cfg`; on success it is live.
    fn apply(
        &mut self,
        cfg: Config,
        source: impl Into<Source>,
        generation: u64,
        origin: &Origin,
        gate: &Gate,
    ) -> Result<ChangeReport, AgentError> {
        if self.detached {
            return Err(AgentError::Detached);
        }
        let why = origin.describe();
        let t0 = origin.started.unwrap_or_else(Instant::now);
        tracing::debug!(
            "{why}: validated {:.1} ms after the request",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let prepared = self.prepare(&cfg, generation)?;
        tracing::debug!(
            "{why}: planned and judged {:.1} ms after the request",
            t0.elapsed().as_secs_f64() * 1e3
        );
        let mut overridden = Vec::new();
        if let Gate::Policy { force } = gate
            && !prepared.verdict.passed()
        {
            let Some(reason) = force else {
                self.event(&format!(
                    "{why} refused by policy: {}",
                    prepared.verdict.violations.join("; ")
                ));
                return Err(AgentError::Policy(prepared.verdict.violations));
            };
            overridden.clone_from(&prepared.verdict.violations);
            self.event(&format!(
                "policy overridden ({reason}): {}",
                overridden.join("; ")
            ));
        }
        let diff = diff_lines(&prepared.verdict);
        let previous = self.generation;
        overridden.extend(origin.overridden.iter().cloned());
        let report = self.commit(
            prepared,
            cfg,
            source.into(),
            generation,
            &why,
            t0,
            overridden,
        )?;
        if matches!(origin.kind, "reload" | "backend" | "apply") && generation != previous {
            self.start_guard(generation, previous);
        }
        if !matches!(gate, Gate::Health) {
            self.record(history::Record {
                diff,
                plan_digest: origin.plan_digest.clone(),
                approvals: origin.approvals.clone(),
                overridden: report.overridden.clone(),
                restored: origin.restored,
                config_digest: format!("{:016x}", state::digest(&self.source)),
                ..history::Record::new(
                    origin.kind,
                    generation,
                    &origin.actor,
                    &origin.reason,
                    &report.summary,
                )
            });
        }
        Ok(report)
    }

    /// Writes a prepared plan and makes `cfg` the live config.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        &mut self,
        prepared: Prepared,
        cfg: Config,
        source: Source,
        generation: u64,
        why: &str,
        t0: Instant,
        overridden: Vec<String>,
    ) -> Result<ChangeReport, AgentError> {
        let Prepared {
            serve,
            alerts,
            spec,
            before,
            planned,
            verdict: _,
        } = prepared;
        let changed = self.datapath.applied() != Some(&planned);
        let previous = self.datapath.applied().cloned();
        let live_at = if changed {
            self.write(&planned, previous.is_none())?
        } else {
            Instant::now()
        };
        let live_ms = live_at.duration_since(t0).as_secs_f64() * 1e3;
        let file = self.opts.config_path.display().to_string();
        let source = match source.resolve(&file) {
            Ok(s) => s,
            Err(e) => {
                // Cannot record the change: put the maps back.
                if changed && let Some(p) = &previous {
                    let _ = self.datapath.apply(p);
                }
                return Err(e);
            }
        };
        let st = state::AppliedState {
            version: state::STATE_VERSION,
            layout: lb_common::LAYOUT_VERSION,
            generation,
            config_digest: state::digest(&source),
            spec,
            allocator_before: before,
        };
        if let Err(e) = state::save(&cfg.agent.state_dir, &st) {
            tracing::error!(
                "saving state to {} failed: {e}; a restart will reprogram all entries",
                cfg.agent.state_dir.display()
            );
        }
        self.served = cfg
            .vips
            .iter()
            .map(|v| {
                let id = v.id();
                let s = serve.get(&id).cloned().unwrap_or_default();
                let eligible: BTreeSet<IpAddr> = v.eligible_backends().map(|b| b.address).collect();
                (id, s.intersection(&eligible).copied().collect())
            })
            .collect();
        let summary = format!(
            "{why}: generation {generation}, {} VIPs, {} backends{}",
            planned.vips.len(),
            planned.backends.len(),
            if changed {
                ""
            } else {
                " (no data-path change)"
            }
        );
        for (id, reason) in &alerts {
            if self.valve_alerts.get(id) != Some(reason) {
                tracing::warn!("VIP {id}: safety valve: {reason}");
                self.event(&format!("ALERT VIP {id}: safety valve: {reason}"));
            }
        }
        let released: Vec<VipId> = self
            .valve_alerts
            .keys()
            .filter(|id| !alerts.contains_key(id))
            .copied()
            .collect();
        for id in released {
            self.event(&format!("VIP {id}: safety valve released"));
        }
        self.valve_alerts = alerts;
        if generation != self.generation
            && let Err(e) = history::save_generation(&cfg.agent.state_dir, generation, &source)
        {
            tracing::error!("saving generation {generation}'s config failed: {e}");
        }
        self.generation = generation;
        self.config = cfg;
        self.source = source;
        self.reconcile_probes();
        let apply_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.event(&format!(
            "{summary}: live {live_ms:.1} ms after the request, recorded after {apply_ms:.1} ms"
        ));
        Ok(ChangeReport {
            generation,
            changed,
            live_ms,
            apply_ms,
            summary,
            overridden,
        })
    }

    /// Writes `planned`; returns when it was live. The first plan over
    /// adopted maps also clears what the plan does not name.
    fn write(&mut self, planned: &MapPlan, first: bool) -> Result<Instant, AgentError> {
        let live_at = self.datapath.apply(planned)?.live_at;
        if first && self.datapath.adopted() {
            self.datapath.remove_unplanned(planned)?;
            return Ok(Instant::now());
        }
        Ok(live_at)
    }

    /// Starts/stops probe tasks to match the live config.
    fn reconcile_probes(&mut self) {
        let mut targets = Vec::new();
        for vip in &self.config.vips {
            for b in &vip.backends {
                if b.state == AdminState::Disabled {
                    continue;
                }
                let Some(check) = b.health.as_ref().or(vip.health.as_ref()) else {
                    continue;
                };
                targets.push(Target {
                    key: (vip.id(), b.address),
                    addr: SocketAddr::new(b.address, check.port.unwrap_or(vip.port)),
                    check: check.clone(),
                });
            }
        }
        let keys: BTreeSet<BackendKey> = targets.iter().map(|t| t.key).collect();
        self.trackers.retain(|k, _| keys.contains(k));
        for t in &targets {
            let initial = if self.initial_down.contains(&t.key) {
                Health::Down
            } else {
                Health::Up
            };
            self.trackers
                .entry(t.key)
                .or_insert_with(|| Tracker::new(t.check.rise, t.check.fall, initial));
        }
        self.monitor.reconcile(targets);
    }

    /// A probe finished: update the backend's state; re-plan if it flipped.
    pub fn on_probe(&mut self, r: ProbeResult<BackendKey>) {
        let Some(tracker) = self.trackers.get_mut(&r.key) else {
            return;
        };
        let Some(t) = tracker.record(r.result, r.at) else {
            return;
        };
        let (vip, addr) = r.key;
        self.event(&format!(
            "VIP {vip} backend {addr}: {:?} -> {:?} ({})",
            t.from, t.to, t.reason
        ));
        let (cfg, source, generation) = (self.config.clone(), self.source.clone(), self.generation);
        if let Err(e) = self.apply(
            cfg,
            source,
            generation,
            &Origin::new("health", "lbd", ""),
            &Gate::Health,
        ) {
            tracing::error!("applying a health change failed: {e}");
            self.event(&format!("health change not applied: {e}"));
        }
    }

    /// Re-reads the config file. An invalid file changes nothing.
    pub fn reload(
        &mut self,
        origin: &Origin,
        force: Option<String>,
    ) -> Result<ChangeReport, AgentError> {
        let (cfg, source) = config::load(&self.opts.config_path, HostChecks::Yes)
            .inspect_err(|e| self.event(&format!("reload rejected: {}", first_line(e))))?;
        if cfg.agent != self.config.agent {
            tracing::warn!(
                "[agent] settings changed; they take effect at the next lbd restart (interface, sockets, pins)"
            );
        }
        let mut cfg = cfg;
        cfg.agent = self.config.agent.clone();
        let generation = if source == self.source {
            self.generation
        } else {
            self.generation + 1
        };
        self.apply(cfg, source, generation, origin, &Gate::Policy { force })
    }

    /// `lbctl backend ...`: edits the config text, applies it, then writes
    /// it back to the file (so a reload or restart keeps the change).
    pub fn backend_op(
        &mut self,
        vip: &str,
        backend: IpAddr,
        op: BackendOp,
        force: Option<String>,
        actor: &str,
    ) -> Result<ChangeReport, AgentError> {
        let started = Instant::now();
        let file = self.opts.config_path.display().to_string();
        let cfg = self
            .config
            .with_backend_edit(vip, backend, op.edit())
            .map_err(|e| e.with_file(&file))?;
        config::validate(&cfg, "", &file, HostChecks::Yes)?;
        tracing::debug!(
            "edited and validated {:.1} ms after the request",
            started.elapsed().as_secs_f64() * 1e3
        );
        let source = Source::Edit {
            base: self.source.clone(),
            vip: vip.to_owned(),
            backend,
            edit: op.edit(),
        };
        self.change_file(
            cfg,
            source,
            &Origin::new("backend", actor, format!("{vip} {backend}: {op}")).at(started),
            &Gate::Policy { force },
        )
    }

    /// Appends to the history; a failure is logged (the change itself is
    /// already live).
    fn record(&self, rec: history::Record) {
        if rec.kind != "guard" {
            *self.last_change.borrow_mut() = Some(crate::control::LastChange {
                generation: rec.generation,
                kind: rec.kind.clone(),
                actor: rec.actor.clone(),
                at_unix: rec.at_unix,
            });
        }
        if let Err(e) = history::append(&self.config.agent.state_dir, rec) {
            tracing::error!("appending to the history failed: {e}");
        }
    }

    /// The last config change recorded in the history since start.
    pub fn last_change(&self) -> Option<crate::control::LastChange> {
        self.last_change.borrow().clone()
    }

    /// Rollbacks the guard made since start.
    pub const fn guard_rollbacks(&self) -> u64 {
        self.guard_rollbacks
    }

    /// Detaches the XDP program (`lbctl datapath detach`).
    pub fn detach(&mut self) -> Result<(), AgentError> {
        self.datapath.detach()?;
        self.detached = true;
        self.event("detached from the interface on request; forwarding stopped");
        Ok(())
    }

    /// Stops the probes; detaches if the agent was told to.
    pub fn shutdown(&mut self) {
        self.monitor.shutdown();
        if self.opts.detach_on_exit && !self.detached {
            match self.detach() {
                Ok(()) => tracing::info!("detached on exit as requested"),
                Err(e) => tracing::error!("detach on exit failed: {e}"),
            }
        } else {
            tracing::info!("stopping; the pinned data path keeps forwarding");
        }
    }

    /// Takes a counter sample for rates (kept for the last ~10 s).
    pub fn sample(&mut self) {
        match self.datapath.stats() {
            Ok(s) => {
                let now = Instant::now();
                self.samples.push_back((now, s));
                while self
                    .samples
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t).as_secs() > 10)
                {
                    self.samples.pop_front();
                }
            }
            Err(e) => tracing::warn!("reading counters failed: {e}"),
        }
        self.guard_tick();
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn config_path(&self) -> &Path {
        &self.opts.config_path
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn datapath(&self) -> &dyn Dataplane {
        self.datapath.as_ref()
    }
    pub fn applied(&self) -> Option<&MapPlan> {
        self.datapath.applied()
    }
    pub fn trackers(&self) -> &BTreeMap<BackendKey, Tracker> {
        &self.trackers
    }
    pub fn valve_alerts(&self) -> &BTreeMap<VipId, String> {
        &self.valve_alerts
    }
    pub fn events(&self) -> impl Iterator<Item = &String> {
        self.events.iter()
    }
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
    pub fn is_detached(&self) -> bool {
        self.detached
    }
    pub fn samples(&self) -> &VecDeque<(Instant, DataplaneStats)> {
        &self.samples
    }
}

fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// Seconds since the epoch, for event stamps (UTC, no time-zone database).
fn humane_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}Z")
}
