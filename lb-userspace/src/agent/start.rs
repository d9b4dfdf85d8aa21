//! Starting the agent: load the config and the data path, adopt pinned
//! maps an earlier process left (verified against the saved state), apply
//! the config and attach.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::Instant,
};

use aya::programs::XdpMode;
use tokio::sync::mpsc;

use super::{Agent, AgentError, AgentOptions, BackendKey, Gate, Origin, state};
use crate::{
    config::{self, Config, HostChecks, XdpAttachMode},
    datapath::{Datapath, Dataplane, LoadOptions},
    health::{Monitor, ProbeResult},
    model::BackendState,
    plan::{self, IdAllocator},
};

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
}
