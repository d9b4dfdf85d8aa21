//! The thin layer that touches the kernel: load the object, attach, write a
//! [`MapPlan`] into the maps in an order that never shows a packet a
//! half-made state, and read the counters.
//!
//! Layout: `loaded` (the object, pins and their layout version, attach and
//! detach), `write` (the order below), `verify` (reading the maps back),
//! `vip_table` (the VIP index), `stats`, `decap` (the backend-side
//! program) and `sys` (every raw system call, behind safe functions and one
//! RAII mapping type). The agent sees all of it through [`Dataplane`].
//!
//! Update order (see [`Datapath::apply`]):
//! 1. global config;
//! 2. backend entries (new ids first get zeroed counters): a new id is not
//!    referenced by any table yet;
//! 3. each changed lookup table is written, through `mmap`, into the idle
//!    one of its VIP's two tables (no program reads it: `RING_LIVE` names
//!    the other, and a grace period has passed since it was live). A new
//!    VIP's pair is created and put into the outer map with one batched
//!    update; if the idle table may still be read (after a failed write),
//!    a new table replaces it in the outer map instead (atomic for
//!    readers);
//! 4. the changed VIPs' `RING_LIVE` entries are flipped to the new tables
//!    (one aligned 4-byte store each: a packet uses the old table or the
//!    new one);
//! 5. the VIP address filter admits the old and new addresses; if any VIP
//!    entry is new, changed or gone, a whole new VIP index table is written
//!    (through `mmap`) into the idle half of `VIP_INDEX` and
//!    `VIP_INDEX_LIVE` is switched to it (one aligned 8-byte store: a
//!    packet sees the old VIP set or the new one). **From here the change
//!    is live on every CPU**;
//! 6. after an RCU grace period (no program still runs with an old table
//!    or entry), backends that left are marked inactive, so their
//!    connection entries miss, and the tables switched away from become
//!    idle; the filter is narrowed to the new addresses.
//!
//! Table changes never rewrite VIP entries: VIP entries change only when a
//! VIP's address, mode, hashing or table size does. The VIP index half
//! that was live is written again only after a grace period.
//!
//! Two things the program does not read from the pinned maps, to save
//! map lookups on every packet:
//! - the connection table's secret and bucket mask are load-time constants
//!   of the program, taken from the pinned `CONN_PARAMS` (or made new with
//!   a new table) before loading;
//! - the VIP address filter is read from the program's own copy (its
//!   `.bss`), which every filter write of step 5 and 6 updates after the
//!   pinned record `VIP_FILTER`, and which an adopting handle fills from
//!   that record. Writes through one handle reach only its own program: a
//!   process that adopts the maps attaches its program before it applies.

mod decap;
mod loaded;
mod stats;
pub mod sys;
mod verify;
mod vip_table;
mod write;

use std::{
    collections::{BTreeMap, HashSet},
    path::PathBuf,
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{Array, MapError, xdp::DevMapHash},
    programs::{ProgramError, Xdp, XdpMode, links::PinnedLink},
};
pub use decap::Decap;
use lb_common::{
    CONN_TABLE_CAPACITY, LAYOUT_VERSION, MAP_LB_MAC, MAP_RING_LIVE, MAP_TX_PORTS, MAX_VIPS,
    PROG_LB, VipKey, VipMeta, lb_mac_word,
};
use loaded::{Loaded, record_conn_params};
pub use stats::DataplaneStats;
pub use sys::SysError;
use verify::read_filter_record;
use vip_table::read_vip_index;
use write::write_filter_copy;

use crate::plan::MapPlan;
/// Errors of the kernel-facing layer, each naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the XDP object failed (is this Linux ≥ 5.15 with BTF, run as root?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {name} is missing from the object (object and agent out of sync?)")]
    MissingMap { name: &'static str },
    #[error("attaching to interface {iface} failed: {source}")]
    Attach { iface: String, source: ProgramError },
    #[error("reading the MAC address of interface {iface} failed: {source}")]
    InterfaceMac { iface: String, source: SysError },
    #[error("system call: {0}")]
    Sys(#[from] SysError),
    #[error("reading the number of CPUs failed: {0}")]
    Cpus(std::io::Error),
    #[error("reading a random connection-table secret from /dev/urandom failed: {0}")]
    Random(std::io::Error),
    #[error(
        "no salt places all {0} VIP entries in the VIP index within the probe limit (a bug: the index is at most a quarter full)"
    )]
    VipIndex(usize),
    #[error("egress map: {0}")]
    TxPorts(aya::maps::xdp::XdpMapError),
    #[error(
        "{dir} holds pinned state of layout {found}, this lbd uses {LAYOUT_VERSION}; refusing to adopt it. Detach with the lbd that made it (`lbctl datapath detach`) or remove the directory if nothing forwards through it"
    )]
    IncompatiblePins { dir: PathBuf, found: String },
    #[error("pin directory {dir}: {source} (is bpffs mounted at /sys/fs/bpf?)")]
    PinDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "writing the maps failed and restoring the previous plan failed too; the data path may hold a mix — re-apply the config: {0}"
    )]
    RestoreFailed(Box<DatapathError>),
    #[error("pinning or adopting the XDP link {path}: {reason}")]
    LinkPin { path: PathBuf, reason: String },
    #[error(
        "the connection table has {buckets} buckets, but the program was loaded for bucket mask {mask:#x} (was the pinned table replaced while loading? load again)"
    )]
    ConnTableChanged { buckets: u32, mask: u32 },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// How to load the object.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the connection table (ignored when adopting pinned maps).
    pub conn_table_capacity: u32,
    /// bpffs directory for pinned maps and links. With it, the maps and
    /// the XDP link outlive the process, and the next `load` adopts them
    /// (hitless restart). Without it, everything goes away with the handle.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conn_table_capacity: CONN_TABLE_CAPACITY,
            pin_dir: None,
        }
    }
}

/// The load balancer's program and maps in the kernel.
pub struct Datapath {
    loaded: Loaded,
    applied: Option<MapPlan>,
    /// The VIP entries of the live VIP index table, as the kernel holds
    /// them: read back at load, then kept in step with every write.
    vip_entries: BTreeMap<VipKey, VipMeta>,
    /// `VIP_INDEX_LIVE` as the kernel holds it.
    vip_live: u64,
    /// The VIP index was switched since the last grace period: programs
    /// may still read its idle table, so it is not written yet.
    vip_switched: bool,
    /// `RING_LIVE` as the kernel holds it (by VIP id).
    live: Vec<u32>,
    /// Tables (outer-map slots) that stopped being live since the last
    /// grace period: a program may still be reading them, so they are not
    /// written in place.
    retired: HashSet<u32>,
}

/// What [`Datapath::apply`] did.
#[derive(Clone, Copy, Debug)]
pub struct Applied {
    /// When the last table flip and VIP entry write were done: from then on
    /// every packet on every CPU is handled by the new plan. (`apply`
    /// returns later, after the grace period that lets departed backends
    /// be deactivated.)
    pub live_at: Instant,
}

/// What the agent needs of the kernel: the seam between the agent's rules
/// (workflow, guard, safety valve) and the maps. [`Datapath`] implements it
/// on the real kernel; `crate::testing::MemoryDataplane` in memory, so
/// those rules are unit-tested without root (as Katran's adapter and
/// testing mode allow).
pub trait Dataplane: Send {
    /// Whether the maps were adopted from pins an earlier process left.
    fn adopted(&self) -> bool;
    /// Interfaces with a pinned link of this layout.
    fn pinned_interfaces(&self) -> Vec<String>;
    /// Removes the pinned link of `iface` this handle does not hold.
    fn detach_pinned(&mut self, iface: &str) -> Result<(), DatapathError>;
    /// Interfaces IP-in-IP may leave by (XDP_REDIRECT targets).
    fn set_egress_interfaces(&mut self, ifindexes: &[u32]) -> Result<(), DatapathError>;
    /// Attaches the program to `iface`.
    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError>;
    /// Detaches from every interface (forwarding stops).
    fn detach(&mut self) -> Result<(), DatapathError>;
    /// The plan last applied, if any.
    fn applied(&self) -> Option<&MapPlan>;
    /// Records `plan` as what the (adopted, verified) maps hold.
    fn assume_applied(&mut self, plan: MapPlan);
    /// Writes `plan`; on failure the previous plan is restored (the error
    /// says if that failed too).
    fn apply(&mut self, plan: &MapPlan) -> Result<Applied, DatapathError>;
    /// The differences between the maps and `plan` (empty: identical).
    fn verify(&self, plan: &MapPlan) -> Result<Vec<String>, DatapathError>;
    /// Generations of every backend id the maps hold an entry for.
    fn backend_generations(&self) -> Result<BTreeMap<u32, u32>, DatapathError>;
    /// Removes every VIP and backend entry `plan` does not name.
    fn remove_unplanned(&mut self, plan: &MapPlan) -> Result<(), DatapathError>;
    /// The counters, summed over CPUs.
    fn stats(&self) -> Result<DataplaneStats, DatapathError>;
    /// The config generation the maps carry.
    fn live_generation(&self) -> Result<u64, DatapathError>;
}

impl Dataplane for Datapath {
    fn adopted(&self) -> bool {
        Datapath::adopted(self)
    }
    fn pinned_interfaces(&self) -> Vec<String> {
        Datapath::pinned_interfaces(self)
    }
    fn detach_pinned(&mut self, iface: &str) -> Result<(), DatapathError> {
        Datapath::detach_pinned(self, iface)
    }
    fn set_egress_interfaces(&mut self, ifindexes: &[u32]) -> Result<(), DatapathError> {
        Datapath::set_egress_interfaces(self, ifindexes)
    }
    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        Datapath::attach(self, iface, mode)
    }
    fn detach(&mut self) -> Result<(), DatapathError> {
        Datapath::detach(self)
    }
    fn applied(&self) -> Option<&MapPlan> {
        Datapath::applied(self)
    }
    fn assume_applied(&mut self, plan: MapPlan) {
        Datapath::assume_applied(self, plan);
    }
    fn apply(&mut self, plan: &MapPlan) -> Result<Applied, DatapathError> {
        Datapath::apply(self, plan)
    }
    fn verify(&self, plan: &MapPlan) -> Result<Vec<String>, DatapathError> {
        Datapath::verify(self, plan)
    }
    fn backend_generations(&self) -> Result<BTreeMap<u32, u32>, DatapathError> {
        Datapath::backend_generations(self)
    }
    fn remove_unplanned(&mut self, plan: &MapPlan) -> Result<(), DatapathError> {
        Datapath::remove_unplanned(self, plan)
    }
    fn stats(&self) -> Result<DataplaneStats, DatapathError> {
        Datapath::stats(self)
    }
    fn live_generation(&self) -> Result<u64, DatapathError> {
        Datapath::live_generation(self)
    }
}

impl Datapath {
    /// Loads the embedded object and the `xdp_lb` program (not attached).
    pub fn load(opts: LoadOptions) -> Result<Self, DatapathError> {
        let LoadOptions {
            conn_table_capacity,
            pin_dir,
        } = opts;
        let mut loaded = Loaded::load(PROG_LB, conn_table_capacity, pin_dir.as_deref())?;
        record_conn_params(&mut loaded)?;
        let mut live = vec![0; MAX_VIPS as usize];
        let mut vip_live = 0;
        let mut vip_entries = BTreeMap::new();
        if loaded.adopted {
            let (word, slots) = read_vip_index(&loaded)?;
            vip_live = word;
            for slot in slots.into_iter().filter(|s| s.key.family != 0) {
                vip_entries.insert(slot.key, slot.meta);
            }
            let flags: Array<_, u32> = loaded.map(MAP_RING_LIVE)?;
            for (id, l) in live.iter_mut().enumerate() {
                *l = flags.get(&(id as u32), 0).map_err(map_err(MAP_RING_LIVE))? & 1;
            }
            // The program's own copy of the address filter starts empty.
            let filter = read_filter_record(&loaded)?;
            write_filter_copy(&mut loaded, &filter)?;
            // Whatever the earlier process switched away from last is idle
            // after this.
            sys::wait_for_readers();
        }
        Ok(Self {
            loaded,
            applied: None,
            vip_entries,
            vip_live,
            vip_switched: false,
            live,
            retired: HashSet::new(),
        })
    }

    /// The loaded `xdp_lb` program (for attaching or BPF_PROG_TEST_RUN).
    pub fn program(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.loaded.program()
    }

    /// The underlying object, for tests and tools that read maps directly.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.loaded.ebpf
    }

    /// Attaches `xdp_lb` to `iface`, after telling the program the
    /// interface's MAC address (see [`Datapath::set_interface_mac`]).
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        let mac = sys::interface_mac(iface).map_err(|source| DatapathError::InterfaceMac {
            iface: iface.into(),
            source,
        })?;
        self.set_interface_mac(mac)?;
        self.loaded.attach(iface, mode)
    }

    /// Tells the program the MAC address of the interface it runs on: it
    /// forwards only frames addressed to it (and sends DSR frames from it).
    /// [`Datapath::attach`] does this; BPF_PROG_TEST_RUN users call it
    /// themselves, or every frame is passed (`pass_other_host`).
    pub fn set_interface_mac(&mut self, mac: [u8; 6]) -> Result<(), DatapathError> {
        let mut data: Array<_, u64> = self.loaded.map_mut(MAP_LB_MAC)?;
        data.set(0, lb_mac_word(mac), 0)
            .map_err(map_err(MAP_LB_MAC))
    }

    /// Detaches from every interface this handle attached to (and removes
    /// the link pins, so forwarding really stops).
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        self.loaded.detach()
    }

    /// Whether the maps were adopted from pins an earlier process left.
    pub fn adopted(&self) -> bool {
        self.loaded.adopted
    }

    /// Interfaces with a pinned link of this layout (attached, whether by
    /// this process or an earlier one).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        self.loaded.pinned_interfaces()
    }

    /// Removes the pinned link of `iface` that this handle does not hold
    /// (an interface an earlier process attached to and the config no
    /// longer names): forwarding on it stops.
    pub fn detach_pinned(&mut self, iface: &str) -> Result<(), DatapathError> {
        let Some(path) = self.loaded.link_pin(iface) else {
            return Ok(());
        };
        if !path.exists() {
            return Ok(());
        }
        let link = PinnedLink::from_pin(&path).map_err(|e| DatapathError::LinkPin {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        link.unpin().map_err(|e| DatapathError::LinkPin {
            path,
            reason: e.to_string(),
        })?;
        Ok(())
    }

    /// Interfaces that IP-in-IP may leave by when the route's egress is not
    /// the ingress interface (XDP_REDIRECT targets).
    pub fn set_egress_interfaces(&mut self, ifindexes: &[u32]) -> Result<(), DatapathError> {
        let mut tx: DevMapHash<_> = self.map_mut(MAP_TX_PORTS)?;
        for &i in ifindexes {
            tx.insert(i, i, None, 0).map_err(DatapathError::TxPorts)?;
        }
        Ok(())
    }

    /// The plan last applied, if any.
    pub fn applied(&self) -> Option<&MapPlan> {
        self.applied.as_ref()
    }

    /// Records `plan` as what the (adopted) maps hold, without writing.
    /// Call [`Datapath::verify`] first: the next apply only writes the
    /// difference from this plan.
    pub fn assume_applied(&mut self, plan: MapPlan) {
        self.applied = Some(plan);
    }

    /// Writes `plan` into the maps (see the module docs for the order).
    ///
    /// If a write fails half-way, the previous plan is written back over
    /// everything the failed attempt may have touched, so the data path is
    /// left as it was; the error says whether that restore worked.
    pub fn apply(&mut self, plan: &MapPlan) -> Result<Applied, DatapathError> {
        let prev = self.applied.take();
        match self.write_plan(plan, prev.as_ref()) {
            Ok(live_at) => {
                self.applied = Some(plan.clone());
                Ok(Applied { live_at })
            }
            Err(err) => {
                // Restore: the maps hold a mix of `prev` and `plan`, so
                // writing `prev` relative to `plan` rewrites every entry
                // that may differ and removes what `plan` added.
                let restored = match &prev {
                    Some(p) => self.write_plan(p, Some(plan)).is_ok(),
                    None => true,
                };
                self.applied = prev;
                if restored {
                    Err(err)
                } else {
                    Err(DatapathError::RestoreFailed(Box::new(err)))
                }
            }
        }
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        self.loaded.map_mut(name)
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        self.loaded.map(name)
    }
}
