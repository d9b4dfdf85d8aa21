//! The thin layer that touches the kernel: load the object, attach, write a
//! [`MapPlan`] into the maps in an order that never shows a packet a
//! half-made state, and read the counters.
//!
//! Update order (see [`Datapath::apply`]):
//! 1. global config;
//! 2. backend entries (new ids first get zeroed counters): a new id is not
//!    referenced by any table yet;
//! 3. each changed lookup table is built as a new inner map, filled through
//!    `mmap`, and swapped in with one update of the outer map (all CPUs see
//!    the old or the new table, never a mix);
//! 4. the VIP address filter admits the old and new addresses, then VIP
//!    entries are written (one atomic hash update each);
//! 5. VIP entries that left are deleted;
//! 6. backends that left are marked inactive, so their connection entries
//!    miss; the filter is narrowed to the new addresses.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, xdp::DevMapHash,
    },
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
    util::nr_cpus,
};
use lb_common::{
    BACKEND_NONE, BPF_F_MMAPABLE, Backend, CONN_TABLE_CAPACITY, DECAP_STAT_COUNT, GlobalConfig,
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG, MAP_CONN_TABLE, MAP_DECAP_STATS, MAP_RINGS,
    MAP_STATS, MAP_TX_PORTS, MAP_VIP_FILTER, MAP_VIP_STATS, MAP_VIPS, MAX_RING_SIZE, PROG_DECAP,
    PROG_LB, STAT_COUNT, TrafficCounters, VipKey, VipMeta,
};

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
    #[error("memory-mapping a lookup table failed: {0}")]
    Mmap(std::io::Error),
    #[error("reading the number of CPUs failed: {0}")]
    Cpus(std::io::Error),
    #[error("egress map: {0}")]
    TxPorts(aya::maps::xdp::XdpMapError),
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// How to load the object.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Capacity of the connection table.
    pub conn_table_capacity: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conn_table_capacity: CONN_TABLE_CAPACITY,
        }
    }
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneStats {
    /// Indexed by the `STAT_*` constants.
    pub global: Vec<u64>,
    /// By VIP id.
    pub vips: BTreeMap<u32, TrafficCounters>,
    /// By backend id.
    pub backends: BTreeMap<u32, TrafficCounters>,
}

fn sum(values: &PerCpuValues<TrafficCounters>) -> TrafficCounters {
    values
        .iter()
        .fold(TrafficCounters::default(), |a, v| TrafficCounters {
            packets: a.packets + v.packets,
            bytes: a.bytes + v.bytes,
            new_flows: a.new_flows + v.new_flows,
        })
}

/// One loaded program of the object, with the object's maps and the links
/// it was attached by. `Datapath` and `Decap` are thin roles over this.
struct Loaded {
    ebpf: Ebpf,
    name: &'static str,
    links: Vec<XdpLinkId>,
}

impl Loaded {
    fn load(name: &'static str, conn_table_capacity: u32) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_CONN_TABLE, conn_table_capacity)
            .load(crate::EBPF_OBJECT)?;
        program(&mut ebpf, name)?
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(Self {
            ebpf,
            name,
            links: Vec::new(),
        })
    }

    fn program(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, self.name)
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        let link = self
            .program()?
            .attach(iface, mode)
            .map_err(|source| DatapathError::Attach {
                iface: iface.into(),
                source,
            })?;
        self.links.push(link);
        Ok(())
    }

    fn detach(&mut self) -> Result<(), DatapathError> {
        let name = self.name;
        for link in std::mem::take(&mut self.links) {
            self.program()?
                .detach(link)
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(())
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        T::try_from(map).map_err(map_err(name))
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { name })?;
        T::try_from(map).map_err(map_err(name))
    }
}

/// The load balancer's program and maps in the kernel.
pub struct Datapath {
    loaded: Loaded,
    applied: Option<MapPlan>,
}

impl Datapath {
    /// Loads the embedded object and the `xdp_lb` program (not attached).
    pub fn load(opts: LoadOptions) -> Result<Self, DatapathError> {
        let loaded = Loaded::load(PROG_LB, opts.conn_table_capacity)?;
        Ok(Self {
            loaded,
            applied: None,
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

    /// Attaches `xdp_lb` to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        self.loaded.attach(iface, mode)
    }

    /// Detaches from every interface this handle attached to.
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        self.loaded.detach()
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

    /// Writes `plan` into the maps (see the module docs for the order).
    pub fn apply(&mut self, plan: &MapPlan) -> Result<(), DatapathError> {
        let prev = self.applied.take();
        let res = self.write_plan(plan, prev.as_ref());
        // On failure the maps may hold a mix; remember the new plan anyway
        // only if it was fully written.
        self.applied = if res.is_ok() {
            Some(plan.clone())
        } else {
            prev
        };
        res
    }

    fn write_plan(&mut self, plan: &MapPlan, prev: Option<&MapPlan>) -> Result<(), DatapathError> {
        let mut config: Array<_, GlobalConfig> = self.map_mut(MAP_CONFIG)?;
        config.set(0, plan.global, 0).map_err(map_err(MAP_CONFIG))?;

        let prev_backends: BTreeMap<u32, Backend> = prev
            .map(|p| p.backends.iter().map(|b| (b.id, b.entry)).collect())
            .unwrap_or_default();
        let ncpus = nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        {
            let mut backends: Array<_, Backend> = self.map_mut(MAP_BACKENDS)?;
            let mut fresh = Vec::new();
            for b in &plan.backends {
                match prev_backends.get(&b.id) {
                    Some(old) if *old == b.entry => continue,
                    Some(old) if old.generation == b.entry.generation => {}
                    _ => fresh.push(b.id),
                }
                backends
                    .set(b.id, b.entry, 0)
                    .map_err(map_err(MAP_BACKENDS))?;
            }
            let mut stats: PerCpuArray<_, TrafficCounters> = self.map_mut(MAP_BACKEND_STATS)?;
            for id in fresh {
                let zero = PerCpuValues::try_from(vec![TrafficCounters::default(); ncpus])
                    .map_err(DatapathError::Cpus)?;
                stats.set(id, zero, 0).map_err(map_err(MAP_BACKEND_STATS))?;
            }
        }

        let prev_rings: BTreeMap<u32, u64> = prev
            .map(|p| {
                p.vips
                    .iter()
                    .map(|v| (v.meta.vip_id, v.ring_digest))
                    .collect()
            })
            .unwrap_or_default();
        {
            let mut rings: ArrayOfMaps<_, MapData> = self.map_mut(MAP_RINGS)?;
            for v in &plan.vips {
                if prev_rings.get(&v.meta.vip_id) == Some(&v.ring_digest) {
                    continue;
                }
                let inner = build_ring(&v.ring)?;
                rings
                    .set(v.meta.vip_id, &inner, 0)
                    .map_err(map_err(MAP_RINGS))?;
            }
        }

        // The address filter must admit every address of the old and the
        // new plan while both may be in the VIP map.
        let old_filter = prev.map(|p| p.vip_filter.clone()).unwrap_or_default();
        let union: Vec<u64> = plan
            .vip_filter
            .iter()
            .enumerate()
            .map(|(i, w)| w | old_filter.get(i).copied().unwrap_or(0))
            .collect();
        self.write_filter(&union)?;

        let mut vips: HashMap<_, VipKey, VipMeta> = self.map_mut(MAP_VIPS)?;
        let mut keys = HashSet::new();
        for (key, meta) in plan
            .vips
            .iter()
            .map(|v| (v.key, v.meta))
            .chain(plan.aliases.iter().copied())
        {
            keys.insert(key);
            vips.insert(key, meta, 0).map_err(map_err(MAP_VIPS))?;
        }
        if let Some(prev) = prev {
            for key in prev
                .vips
                .iter()
                .map(|v| v.key)
                .chain(prev.aliases.iter().map(|a| a.0))
            {
                if !keys.contains(&key) {
                    vips.remove(&key).map_err(map_err(MAP_VIPS))?;
                }
            }
            let now: BTreeSet<u32> = plan.backends.iter().map(|b| b.id).collect();
            let mut backends: Array<_, Backend> = self.map_mut(MAP_BACKENDS)?;
            for b in prev.backends.iter().filter(|b| !now.contains(&b.id)) {
                let gone = Backend {
                    flags: 0,
                    ..b.entry
                };
                backends.set(b.id, gone, 0).map_err(map_err(MAP_BACKENDS))?;
            }
        }
        if union != plan.vip_filter {
            self.write_filter(&plan.vip_filter)?;
        }
        Ok(())
    }

    fn write_filter(&mut self, words: &[u64]) -> Result<(), DatapathError> {
        let mut filter: Array<_, u64> = self.map_mut(MAP_VIP_FILTER)?;
        for (i, w) in words.iter().enumerate() {
            filter
                .set(i as u32, *w, 0)
                .map_err(map_err(MAP_VIP_FILTER))?;
        }
        Ok(())
    }

    /// Reads the counters (per-VIP and per-backend only for the ids of the
    /// applied plan).
    pub fn stats(&self) -> Result<DataplaneStats, DatapathError> {
        let global: PerCpuArray<_, u64> = self.map(MAP_STATS)?;
        let mut out = DataplaneStats {
            global: vec![0; STAT_COUNT as usize],
            ..Default::default()
        };
        for (i, slot) in out.global.iter_mut().enumerate() {
            *slot = global
                .get(&(i as u32), 0)
                .map_err(map_err(MAP_STATS))?
                .iter()
                .sum();
        }
        if let Some(plan) = &self.applied {
            let vips: PerCpuArray<_, TrafficCounters> = self.map(MAP_VIP_STATS)?;
            for v in &plan.vips {
                let id = v.meta.vip_id;
                out.vips
                    .insert(id, sum(&vips.get(&id, 0).map_err(map_err(MAP_VIP_STATS))?));
            }
            let backends: PerCpuArray<_, TrafficCounters> = self.map(MAP_BACKEND_STATS)?;
            for b in &plan.backends {
                let v = backends.get(&b.id, 0).map_err(map_err(MAP_BACKEND_STATS))?;
                out.backends.insert(b.id, sum(&v));
            }
        }
        Ok(out)
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

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DatapathError> {
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Creates a lookup table as a memory-mappable array and fills it with one
/// copy (65537 single-slot syscalls take about 60 ms; this takes well
/// under one). Slots past `ring.len()` hold `BACKEND_NONE`.
fn build_ring(ring: &[u32]) -> Result<MapData, DatapathError> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // An array's elements are 8-byte aligned: a u32 value occupies 8 bytes.
    const STRIDE: usize = 8;
    let obj =
        aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, 4, MAX_RING_SIZE, BPF_F_MMAPABLE);
    let data = MapData::create(obj, "lb_ring", None).map_err(map_err(MAP_RINGS))?;
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let len = (MAX_RING_SIZE as usize * STRIDE).div_ceil(page) * page;
    let fd = data.fd().as_fd().as_raw_fd();
    // SAFETY: mapping a BPF_F_MMAPABLE array of `len` bytes (rounded to
    // pages) that we own; unmapped below before the fd can go away.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(DatapathError::Mmap(std::io::Error::last_os_error()));
    }
    // The mapping is page-aligned, so viewing it as u64 elements is aligned;
    // the value sits in the element's first four bytes (little-endian).
    let base = ptr.cast::<u64>();
    for i in 0..MAX_RING_SIZE as usize {
        let v = ring.get(i).copied().unwrap_or(BACKEND_NONE);
        // SAFETY: (i + 1) * STRIDE ≤ len; aligned u64 writes.
        unsafe { base.add(i).write(u64::from(v)) };
    }
    // SAFETY: ptr/len are the mapping created above.
    unsafe { libc::munmap(ptr, len) };
    Ok(data)
}

/// The IP-in-IP decapsulation program for a backend host.
pub struct Decap {
    loaded: Loaded,
}

impl Decap {
    /// Loads `xdp_decap` (with a minimal connection table: it uses none).
    pub fn load() -> Result<Self, DatapathError> {
        Ok(Self {
            loaded: Loaded::load(PROG_DECAP, 1)?,
        })
    }

    /// The loaded `xdp_decap` program.
    pub fn program(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.loaded.program()
    }

    /// Attaches to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        self.loaded.attach(iface, mode)
    }

    /// Detaches from every interface this handle attached to.
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        self.loaded.detach()
    }

    /// Decap counters summed over CPUs, indexed by the `DECAP_*` constants.
    pub fn stats(&self) -> Result<Vec<u64>, DatapathError> {
        let stats: PerCpuArray<_, u64> = self.loaded.map(MAP_DECAP_STATS)?;
        (0..DECAP_STAT_COUNT)
            .map(|i| {
                Ok(stats
                    .get(&i, 0)
                    .map_err(map_err(MAP_DECAP_STATS))?
                    .iter()
                    .sum())
            })
            .collect()
    }
}
