//! The agent `lbd`: owns the data path, applies the config file, runs the
//! health probes and answers the control API.
//!
//! Every change goes the same way: build the candidate config (file or CLI
//! edit) → validate it → compute which backends may serve (health + the
//! safety valve) → plan the maps (pure) → write the difference into the
//! kernel (`Datapath::apply`, which restores the previous plan if a write
//! fails) → persist the applied state → only then write a CLI edit back to
//! the config file. A failure anywhere leaves the live config and the data
//! path exactly as they were.

pub mod metrics;
pub mod report;
pub mod server;
pub mod state;

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use aya::programs::XdpMode;
use tokio::sync::mpsc;

use crate::{
    config::{self, AdminState, Config, HostChecks, VipConfig, XdpAttachMode},
    control::{BackendOp, ChangeReport},
    datapath::{Datapath, DatapathError, DataplaneStats, LoadOptions},
    health::{self, Health, Monitor, ProbeResult, Target, Tracker},
    model::{BackendState, VipId},
    plan::{self, IdAllocator, MapPlan},
};

/// A backend of a VIP, as health checks and the valve know it.
pub type BackendKey = (VipId, IpAddr);

/// Why the agent could not do something. Every variant leaves the live
/// config and the data path as they were.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config rejected, nothing changed:\n{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("config cannot be planned, nothing changed: {0}")]
    Plan(#[from] plan::PlanError),
    #[error("data path: {0}")]
    Datapath(#[from] DatapathError),
    #[error("{0}")]
    Io(String),
    #[error("the data path is detached (`lbctl datapath detach`); restart lbd to attach again")]
    Detached,
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
    datapath: Datapath,
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
}

impl Agent {
    /// Loads and checks the config, loads (or adopts) the data path,
    /// programs it and attaches. Health results are sent to `probes`.
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
        };
        agent.adopt()?;
        let digest = state::digest(&source);
        let generation =
            if agent.datapath.applied().is_some() && agent.saved_digest() == Some(digest) {
                agent.generation
            } else {
                agent.generation + 1
            };
        agent.apply(config, source, generation, "start")?;
        agent.attach()?;
        Ok(agent)
    }

    fn saved_digest(&self) -> Option<u64> {
        state::load(&self.config.agent.state_dir)
            .ok()
            .flatten()
            .map(|s| s.config_digest)
    }

    /// With adopted maps: re-plans the saved spec, checks the kernel holds
    /// exactly that, and makes it the base of the next apply. Without saved
    /// state (or if the kernel differs), plans from scratch with ids past
    /// every generation the kernel knows, and removes what is not planned.
    fn adopt(&mut self) -> Result<(), AgentError> {
        if !self.datapath.adopted() {
            self.event("created and pinned new maps");
            return Ok(());
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
                        return Ok(());
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
        Ok(())
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
            egress.push(
                ifindex(name)
                    .ok_or_else(|| AgentError::Io(format!("interface {name} does not exist")))?,
            );
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

    /// Which backends health (after the safety valve) lets serve, per VIP.
    fn serve_sets(&mut self, cfg: &Config) -> BTreeMap<VipId, BTreeSet<IpAddr>> {
        let mut out = BTreeMap::new();
        let mut alerts = BTreeMap::new();
        for vip in &cfg.vips {
            let id = vip.id();
            let down: BTreeSet<IpAddr> = vip
                .backends
                .iter()
                .filter(|b| {
                    self.trackers
                        .get(&(id, b.address))
                        .is_some_and(|t| t.health() == Health::Down)
                })
                .map(|b| b.address)
                .collect();
            let eligible: Vec<IpAddr> = vip.eligible_backends().map(|b| b.address).collect();
            let last = self
                .served
                .get(&id)
                .cloned()
                .unwrap_or_else(|| eligible.iter().copied().collect());
            let decision = health::safety_valve(health::ValveInput {
                eligible: &eligible,
                down: &down,
                last_served: &last,
                max_unhealthy_share: cfg.policy.max_unhealthy_share,
            });
            if let Some(reason) = decision.reason.filter(|_| decision.tripped) {
                alerts.insert(id, reason);
            }
            let mut serve = decision.serve;
            // Backends not taking new flows (drain, weight 0) are not the
            // valve's business: they serve while healthy.
            serve.extend(
                vip.backends
                    .iter()
                    .filter(|b| !eligible.contains(&b.address) && !down.contains(&b.address))
                    .map(|b| b.address),
            );
            out.insert(id, serve);
        }
        for (id, reason) in &alerts {
            if self.valve_alerts.get(id) != Some(reason) {
                tracing::warn!("VIP {id}: safety valve: {reason}");
                self.event(&format!("ALERT VIP {id}: safety valve: {reason}"));
            }
        }
        for id in self.valve_alerts.keys() {
            if !alerts.contains_key(id) {
                tracing::info!("VIP {id}: safety valve released");
            }
        }
        self.valve_alerts = alerts;
        out
    }

    /// Plans `cfg` and writes it; on success makes it the live config.
    fn apply(
        &mut self,
        cfg: Config,
        source: String,
        generation: u64,
        why: &str,
    ) -> Result<ChangeReport, AgentError> {
        if self.detached {
            return Err(AgentError::Detached);
        }
        let t0 = Instant::now();
        let serve = self.serve_sets(&cfg);
        let spec = cfg.dataplane_spec(generation, &|v: &VipConfig, b| {
            serve.get(&v.id()).is_none_or(|s| s.contains(&b.address))
        });
        let before = self
            .datapath
            .applied()
            .map_or_else(|| self.base_allocator.clone(), |p| p.allocator.clone());
        let planned = plan::plan(&spec, &before)?;
        let changed = self.datapath.applied() != Some(&planned);
        if changed {
            let fresh = self.datapath.applied().is_none() && self.datapath.adopted();
            self.datapath.apply(&planned)?;
            if fresh {
                self.datapath.remove_unplanned(&planned)?;
            }
        }
        let apply_ms = t0.elapsed().as_secs_f64() * 1e3;
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
        self.generation = generation;
        self.config = cfg;
        self.source = source;
        self.reconcile_probes();
        self.event(&format!("{summary} in {apply_ms:.1} ms"));
        Ok(ChangeReport {
            generation,
            changed,
            apply_ms,
            summary,
        })
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
        if let Err(e) = self.apply(cfg, source, generation, "health change") {
            tracing::error!("applying a health change failed: {e}");
            self.event(&format!("health change not applied: {e}"));
        }
    }

    /// Re-reads the config file. An invalid file changes nothing.
    pub fn reload(&mut self, why: &str) -> Result<ChangeReport, AgentError> {
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
        self.apply(cfg, source, generation, why)
    }

    /// `lbctl backend ...`: edits the config text, applies it, then writes
    /// it back to the file (so a reload or restart keeps the change).
    pub fn backend_op(
        &mut self,
        vip: &str,
        backend: IpAddr,
        op: BackendOp,
    ) -> Result<ChangeReport, AgentError> {
        let file = self.opts.config_path.display().to_string();
        let text = config::edit_backend(&self.source, vip, backend, op.edit())?;
        let cfg = config::check(&text, &file, HostChecks::Yes)?;
        let old = (self.config.clone(), self.source.clone(), self.generation);
        let report = self.apply(
            cfg,
            text.clone(),
            self.generation + 1,
            &format!("{op:?} {vip} {backend}"),
        )?;
        if let Err(e) = state::write_atomic(&self.opts.config_path, text.as_bytes()) {
            // Undo: the file is the source of truth for restarts.
            let undo = self.apply(old.0, old.1, old.2 + 2, "undo (config file not writable)");
            return Err(AgentError::Io(format!(
                "writing {file} failed ({e}); the change was undone{}",
                undo.err()
                    .map(|u| format!(" — but undoing failed: {u}"))
                    .unwrap_or_default()
            )));
        }
        Ok(report)
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
    pub fn datapath(&self) -> &Datapath {
        &self.datapath
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

fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
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
