//! An in-memory [`Dataplane`] for tests that need the agent's rules
//! (workflow, guard, safety valve) but not the kernel: no root, no bpffs,
//! no XDP. It keeps what the real one would keep (the applied plan, the
//! maps as written) and lets the test see and steer the rest through a
//! [`MemoryKernel`] handle: the counters the guard reads, a failure of the
//! next write, what is attached.
//!
//! It models the contract of [`crate::datapath::Datapath`], not its
//! mechanics: a failed `apply` leaves the maps as they were (the real one
//! writes the previous plan back), `verify` compares the maps with a plan.

use std::{
    collections::BTreeMap,
    io,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use aya::programs::XdpMode;

use crate::{
    datapath::{Applied, DatapathError, Dataplane, DataplaneStats, SysError},
    plan::MapPlan,
};

/// The "kernel" side of a [`MemoryDataplane`], shared with the test.
#[derive(Debug, Default)]
pub struct Kernel {
    /// The maps' contents: the last plan written successfully.
    pub maps: Option<MapPlan>,
    /// Interfaces attached to, with their mode.
    pub attached: Vec<(String, XdpMode)>,
    /// Interfaces with a pinned link (as an earlier process would leave).
    pub pinned: Vec<String>,
    /// Egress interface indexes.
    pub egress: Vec<u32>,
    /// What `stats` returns.
    pub stats: DataplaneStats,
    /// Successful writes so far.
    pub writes: u64,
    /// The next this many `apply` calls fail (nothing is written).
    pub fail_applies: u32,
}

/// A handle on the kernel side of a [`MemoryDataplane`].
#[derive(Clone, Debug, Default)]
pub struct MemoryKernel(Arc<Mutex<Kernel>>);

impl MemoryKernel {
    /// The kernel state (a test's own handle: a poisoned lock is a failed
    /// test already, so it is taken over).
    pub fn lock(&self) -> MutexGuard<'_, Kernel> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The next `apply` fails without writing anything.
    pub fn fail_next_apply(&self) {
        self.lock().fail_applies = 1;
    }

    /// The maps' contents.
    pub fn maps(&self) -> Option<MapPlan> {
        self.lock().maps.clone()
    }

    /// Sets the new-flow counter of backend id `id` (as the XDP program
    /// would count it).
    pub fn set_new_flows(&self, id: u32, new_flows: u64) {
        self.lock().stats.backends.entry(id).or_default().new_flows = new_flows;
    }
}

/// The in-memory data path.
#[derive(Debug, Default)]
pub struct MemoryDataplane {
    kernel: MemoryKernel,
    applied: Option<MapPlan>,
    /// Whether it found maps an earlier "process" left.
    adopted: bool,
}

impl MemoryDataplane {
    /// An empty data path (nothing pinned, nothing applied) and the handle
    /// the test keeps.
    pub fn new() -> (Self, MemoryKernel) {
        let kernel = MemoryKernel::default();
        (
            Self {
                kernel: kernel.clone(),
                applied: None,
                adopted: false,
            },
            kernel,
        )
    }

    /// A new handle on `kernel`, as a restarted agent gets: it adopts the
    /// maps (and pinned links) an earlier handle left, knowing nothing of
    /// what they hold until it verifies them.
    pub fn adopting(kernel: &MemoryKernel) -> Self {
        Self {
            kernel: kernel.clone(),
            applied: None,
            adopted: kernel.lock().maps.is_some(),
        }
    }
}

fn injected(what: &'static str) -> DatapathError {
    DatapathError::Sys(SysError {
        call: what,
        source: io::Error::other("failure injected by the test"),
    })
}

impl Dataplane for MemoryDataplane {
    fn adopted(&self) -> bool {
        self.adopted
    }

    fn pinned_interfaces(&self) -> Vec<String> {
        self.kernel.lock().pinned.clone()
    }

    fn detach_pinned(&mut self, iface: &str) -> Result<(), DatapathError> {
        self.kernel.lock().pinned.retain(|i| i != iface);
        Ok(())
    }

    fn set_egress_interfaces(&mut self, ifindexes: &[u32]) -> Result<(), DatapathError> {
        self.kernel.lock().egress.extend_from_slice(ifindexes);
        Ok(())
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        let mut k = self.kernel.lock();
        k.attached.push((iface.to_owned(), mode));
        if !k.pinned.iter().any(|i| i == iface) {
            k.pinned.push(iface.to_owned());
        }
        Ok(())
    }

    fn detach(&mut self) -> Result<(), DatapathError> {
        let mut k = self.kernel.lock();
        k.attached.clear();
        k.pinned.clear();
        Ok(())
    }

    fn applied(&self) -> Option<&MapPlan> {
        self.applied.as_ref()
    }

    fn assume_applied(&mut self, plan: MapPlan) {
        self.applied = Some(plan);
    }

    fn apply(&mut self, plan: &MapPlan) -> Result<Applied, DatapathError> {
        let mut k = self.kernel.lock();
        if k.fail_applies > 0 {
            k.fail_applies -= 1;
            return Err(injected("memory apply"));
        }
        k.maps = Some(plan.clone());
        k.writes += 1;
        drop(k);
        self.applied = Some(plan.clone());
        Ok(Applied {
            live_at: Instant::now(),
        })
    }

    fn verify(&self, plan: &MapPlan) -> Result<Vec<String>, DatapathError> {
        let k = self.kernel.lock();
        let Some(maps) = &k.maps else {
            return Ok(vec!["the maps are empty".into()]);
        };
        let mut diffs = Vec::new();
        if maps.global != plan.global {
            diffs.push("global config differs".into());
        }
        if maps.vips != plan.vips || maps.aliases != plan.aliases {
            diffs.push("VIP entries differ".into());
        }
        if maps.backends != plan.backends {
            diffs.push("backend entries differ".into());
        }
        if maps.vip_filter != plan.vip_filter {
            diffs.push("VIP address filter differs".into());
        }
        Ok(diffs)
    }

    fn backend_generations(&self) -> Result<BTreeMap<u32, u32>, DatapathError> {
        Ok(self
            .kernel
            .lock()
            .maps
            .as_ref()
            .map_or_else(BTreeMap::new, |m| {
                m.backends
                    .iter()
                    .map(|b| (b.id, b.entry.generation))
                    .collect()
            }))
    }

    fn remove_unplanned(&mut self, _plan: &MapPlan) -> Result<(), DatapathError> {
        // The maps hold exactly the last plan written: nothing else to remove.
        Ok(())
    }

    fn stats(&self) -> Result<DataplaneStats, DatapathError> {
        Ok(self.kernel.lock().stats.clone())
    }

    fn live_generation(&self) -> Result<u64, DatapathError> {
        Ok(self
            .kernel
            .lock()
            .maps
            .as_ref()
            .map_or(0, |m| m.global.config_generation))
    }
}
