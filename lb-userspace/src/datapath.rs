//! The thin layer that touches the kernel: load the object, attach, write a
//! [`MapPlan`] into the maps in an order that never shows a packet a
//! half-made state, and read the counters.
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

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, MapData, MapError, PerCpuArray, PerCpuValues, xdp::DevMapHash},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
    util::nr_cpus,
};
use lb_common::{
    BACKEND_NONE, BPF_F_MMAPABLE, Backend, CONN_TABLE_CAPACITY, ConnParams, Counters,
    DECAP_STAT_COUNT, GLOBAL_CONN_BUCKET_MASK, GLOBAL_CONN_SECRET, GlobalConfig, LAYOUT_VERSION,
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG, MAP_CONN_PARAMS, MAP_CONN_TABLE, MAP_COUNTERS,
    MAP_DECAP_STATS, MAP_RING_LIVE, MAP_RINGS, MAP_TX_PORTS, MAP_VIP_FILTER, MAP_VIP_FILTER_COPY,
    MAP_VIP_INDEX, MAP_VIP_INDEX_LIVE, MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS, PROG_DECAP, PROG_LB,
    RING_CHUNK_SLOTS, RING_CHUNKS, RING_SLOT_NONE, RingChunk, STAT_COUNT, TrafficCounters,
    VIP_FILTER_WORDS, VIP_INDEX_PROBES, VIP_INDEX_SLOTS, VipKey, VipMeta, VipSlot, conn_buckets,
    ring_index, vip_index_half, vip_index_home, vip_index_live, vip_index_probe, vip_index_salt,
    vip_slot,
};

use crate::plan::{MapPlan, PlannedBackend};

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

/// Maps that carry state across restarts (all but the benchmark's and the
/// decap program's).
const PINNED_MAPS: [&str; 12] = [
    MAP_VIP_INDEX,
    MAP_VIP_INDEX_LIVE,
    MAP_RINGS,
    MAP_RING_LIVE,
    MAP_BACKENDS,
    MAP_CONN_TABLE,
    MAP_CONN_PARAMS,
    MAP_VIP_FILTER,
    MAP_CONFIG,
    MAP_TX_PORTS,
    MAP_COUNTERS,
    MAP_BACKEND_STATS,
];

/// The connection table's parameters for a program about to be loaded
/// (the program gets them as load-time constants): those kept with the
/// pinned table when there is one (its flows were placed by that secret,
/// and it keeps the size it was created with; a new `capacity` takes
/// effect after a detach), else a new secret and the mask of a new table
/// of `capacity` flows.
fn conn_params_for(pins: Option<&Path>, capacity: u32) -> Result<ConnParams, DatapathError> {
    let mut p = ConnParams {
        secret: 0,
        bucket_mask: conn_buckets(capacity) - 1,
        _pad: 0,
    };
    let pinned = |name: &str| pins.map(|d| d.join(name)).filter(|f| f.exists());
    if let Some(table) = pinned(MAP_CONN_TABLE) {
        let table = MapData::from_pin(&table).map_err(map_err(MAP_CONN_TABLE))?;
        let buckets = table.info().map_err(map_err(MAP_CONN_TABLE))?.max_entries();
        p.bucket_mask = bucket_mask(buckets);
        if let Some(params) = pinned(MAP_CONN_PARAMS) {
            let params = MapData::from_pin(&params).map_err(map_err(MAP_CONN_PARAMS))?;
            let params: Array<_, ConnParams> =
                Array::try_from(aya::maps::Map::Array(params)).map_err(map_err(MAP_CONN_PARAMS))?;
            p.secret = params.get(&0, 0).map_err(map_err(MAP_CONN_PARAMS))?.secret;
        }
    }
    while p.secret == 0 {
        let mut b = [0u8; 8];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").map_err(DatapathError::Random)?,
            &mut b,
        )
        .map_err(DatapathError::Random)?;
        p.secret = u64::from_ne_bytes(b);
    }
    Ok(p)
}

/// The bucket mask of a table of `buckets` buckets: the largest power of
/// two ≤ `buckets`, less one (the loader only makes powers of two; this
/// keeps any other size in bounds).
fn bucket_mask(buckets: u32) -> u32 {
    (1u32 << buckets.max(1).ilog2()) - 1
}

/// Records the parameters the program was loaded with in `CONN_PARAMS`
/// (kept with the pinned table for the next process), after checking that
/// they fit the table the object got.
fn record_conn_params(loaded: &mut Loaded) -> Result<(), DatapathError> {
    let buckets = match loaded.ebpf.map(MAP_CONN_TABLE) {
        Some(aya::maps::Map::Array(data)) => {
            data.info().map_err(map_err(MAP_CONN_TABLE))?.max_entries()
        }
        _ => {
            return Err(DatapathError::MissingMap {
                name: MAP_CONN_TABLE,
            });
        }
    };
    let p = loaded.conn;
    if bucket_mask(buckets) != p.bucket_mask {
        return Err(DatapathError::ConnTableChanged {
            buckets,
            mask: p.bucket_mask,
        });
    }
    let mut params: Array<_, ConnParams> = loaded.map_mut(MAP_CONN_PARAMS)?;
    params.set(0, p, 0).map_err(map_err(MAP_CONN_PARAMS))
}

/// The VIP address filter as the program reads it: one value of
/// `VIP_FILTER_WORDS` words.
type FilterCopy = [u64; VIP_FILTER_WORDS as usize];

/// The words of the VIP address filter's pinned record ([`MAP_VIP_FILTER`]).
fn read_filter_record(loaded: &Loaded) -> Result<Vec<u64>, DatapathError> {
    let record: Array<_, u64> = loaded.map(MAP_VIP_FILTER)?;
    (0..VIP_FILTER_WORDS)
        .map(|i| record.get(&i, 0).map_err(map_err(MAP_VIP_FILTER)))
        .collect()
}

/// The program's copy of the VIP address filter ([`MAP_VIP_FILTER_COPY`]).
fn read_filter_copy(loaded: &Loaded) -> Result<FilterCopy, DatapathError> {
    let copy: Array<_, FilterCopy> = loaded.map(MAP_VIP_FILTER_COPY)?;
    copy.get(&0, 0).map_err(map_err(MAP_VIP_FILTER_COPY))
}

/// Writes the program's copy of the VIP address filter (all words in one
/// update; a word the update does not change reads the same throughout).
fn write_filter_copy(loaded: &mut Loaded, words: &[u64]) -> Result<(), DatapathError> {
    let mut value: FilterCopy = [0; VIP_FILTER_WORDS as usize];
    for (v, w) in value.iter_mut().zip(words) {
        *v = *w;
    }
    let mut copy: Array<_, FilterCopy> = loaded.map_mut(MAP_VIP_FILTER_COPY)?;
    copy.set(0, value, 0).map_err(map_err(MAP_VIP_FILTER_COPY))
}

/// The directory of one layout version under the operator's pin dir.
fn layout_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("layout-v{LAYOUT_VERSION}"))
}

/// Creates the layout directory, refusing a pin dir that holds another
/// layout. Returns whether our layout's maps were already pinned.
fn prepare_pins(pin_dir: &Path) -> Result<bool, DatapathError> {
    let ours = layout_dir(pin_dir);
    let io = |source| DatapathError::PinDir {
        dir: pin_dir.to_path_buf(),
        source,
    };
    if pin_dir.exists() {
        for entry in std::fs::read_dir(pin_dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.path() != ours {
                return Err(DatapathError::IncompatiblePins {
                    dir: pin_dir.to_path_buf(),
                    found: entry.file_name().to_string_lossy().into_owned(),
                });
            }
        }
    }
    let existed = ours.join(MAP_VIP_INDEX).exists();
    std::fs::create_dir_all(&ours).map_err(io)?;
    Ok(existed)
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

fn sum(values: impl IntoIterator<Item = TrafficCounters>) -> TrafficCounters {
    values
        .into_iter()
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
    /// Links pinned under `pins` (interface name, pin path).
    pinned_links: Vec<(String, PathBuf)>,
    /// Our layout directory when pinning.
    pins: Option<PathBuf>,
    /// Whether the maps were adopted from an earlier process.
    adopted: bool,
    /// The connection-table parameters the program was loaded with.
    conn: ConnParams,
}

impl Loaded {
    fn load(
        name: &'static str,
        conn_table_capacity: u32,
        pin_dir: Option<&Path>,
    ) -> Result<Self, DatapathError> {
        let mut adopted = false;
        let pins = match pin_dir {
            Some(dir) => {
                adopted = prepare_pins(dir)?;
                Some(layout_dir(dir))
            }
            None => None,
        };
        let conn = conn_params_for(pins.as_deref(), conn_table_capacity)?;
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(MAP_CONN_TABLE, conn_buckets(conn_table_capacity));
        loader.override_global(GLOBAL_CONN_SECRET, &conn.secret, true);
        loader.override_global(GLOBAL_CONN_BUCKET_MASK, &conn.bucket_mask, true);
        if let Some(ours) = &pins {
            for map in PINNED_MAPS {
                loader.map_pin_path(map, ours.join(map));
            }
        }
        let mut ebpf = loader.load(crate::EBPF_OBJECT)?;
        program(&mut ebpf, name)?
            .load()
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok(Self {
            ebpf,
            name,
            links: Vec::new(),
            pinned_links: Vec::new(),
            pins,
            adopted,
            conn,
        })
    }

    fn link_pin(&self, iface: &str) -> Option<PathBuf> {
        self.pins.as_ref().map(|d| d.join(format!("link-{iface}")))
    }

    /// Attaches through a pinned link: replaces the program of an existing
    /// link atomically (no packet sees no program), or creates and pins a
    /// new link.
    fn attach_pinned(
        &mut self,
        iface: &str,
        mode: XdpMode,
        path: PathBuf,
    ) -> Result<(), DatapathError> {
        let pin_err = |reason: String| DatapathError::LinkPin {
            path: path.clone(),
            reason,
        };
        if path.exists() {
            let link = PinnedLink::from_pin(&path).map_err(|e| pin_err(e.to_string()))?;
            let link = XdpLink::try_from(FdLink::from(link)).map_err(|e| pin_err(e.to_string()))?;
            let name = self.name;
            let id = self
                .program()?
                .attach_to_link(link)
                .map_err(|source| DatapathError::Program { name, source })?;
            self.links.push(id);
        } else {
            let name = self.name;
            let prog = self.program()?;
            let id = prog
                .attach(iface, mode)
                .map_err(|source| DatapathError::Attach {
                    iface: iface.into(),
                    source,
                })?;
            let link = prog
                .take_link(id)
                .map_err(|source| DatapathError::Program { name, source })?;
            let fd = FdLink::try_from(link).map_err(|e| {
                pin_err(format!(
                    "{e}: this kernel attached XDP by netlink, not by a BPF link, so it cannot be pinned"
                ))
            })?;
            let pinned = fd.pin(&path).map_err(|e| pin_err(e.to_string()))?;
            // The pin keeps the link; hold it through the program so a
            // later detach closes it.
            let link =
                XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(e.to_string()))?;
            let id = self
                .program()?
                .attach_to_link(link)
                .map_err(|source| DatapathError::Program { name, source })?;
            self.links.push(id);
        }
        self.pinned_links.push((iface.to_owned(), path));
        Ok(())
    }

    /// Interfaces with a pinned link of our layout.
    fn pinned_interfaces(&self) -> Vec<String> {
        let Some(dir) = &self.pins else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("link-"))
                    .map(str::to_owned)
            })
            .collect()
    }

    fn program(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, self.name)
    }

    fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        if let Some(path) = self.link_pin(iface) {
            return self.attach_pinned(iface, mode, path);
        }
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

    /// Detaches: removes the link pins (so closing the links really
    /// detaches) and closes every link this handle holds.
    fn detach(&mut self) -> Result<(), DatapathError> {
        let name = self.name;
        for (_, path) in std::mem::take(&mut self.pinned_links) {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(DatapathError::LinkPin {
                    path,
                    reason: e.to_string(),
                });
            }
        }
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
            wait_for_readers();
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

    /// Attaches `xdp_lb` to `iface`.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        self.loaded.attach(iface, mode)
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

    /// The config generation the data path carries (its `CONFIG` map).
    pub fn live_generation(&self) -> Result<u64, DatapathError> {
        let config: Array<_, GlobalConfig> = self.map(MAP_CONFIG)?;
        Ok(config
            .get(&0, 0)
            .map_err(map_err(MAP_CONFIG))?
            .config_generation)
    }

    /// Compares the kernel's maps with `plan`: global config, every VIP
    /// entry (and no others), every backend entry, the address filter, and
    /// every lookup table's contents (by digest). Returns the differences,
    /// each readable by an operator; empty means the data path does
    /// exactly what the plan says.
    pub fn verify(&self, plan: &MapPlan) -> Result<Vec<String>, DatapathError> {
        let mut diffs = Vec::new();
        let config: Array<_, GlobalConfig> = self.map(MAP_CONFIG)?;
        let global = config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        if global != plan.global {
            diffs.push(format!(
                "global config differs (kernel generation {}, planned {})",
                global.config_generation, plan.global.config_generation
            ));
        }
        let params: Array<_, ConnParams> = self.map(MAP_CONN_PARAMS)?;
        if params.get(&0, 0).map_err(map_err(MAP_CONN_PARAMS))? != self.loaded.conn {
            diffs.push(
                "the connection table's recorded secret or bucket mask differs from the program's"
                    .to_string(),
            );
        }
        let (word, slots) = read_vip_index(&self.loaded)?;
        let mut kernel_vips = std::collections::HashMap::new();
        for slot in slots.iter().filter(|s| s.key.family != 0) {
            kernel_vips.insert(slot.key, slot.meta);
            if vip_index_find(&slots, vip_index_salt(word), &slot.key) != Some(slot.meta) {
                diffs.push(format!(
                    "VIP index: the entry of {:?} is not where the data path looks for it",
                    slot.key
                ));
            }
        }
        let planned_vips: Vec<(String, VipKey, VipMeta)> = plan
            .vips
            .iter()
            .map(|v| (v.vip.to_string(), v.key, v.meta))
            .chain(
                plan.aliases
                    .iter()
                    .map(|(k, m)| (format!("fragment alias of VIP id {}", m.vip_id), *k, *m)),
            )
            .collect();
        for (name, key, meta) in &planned_vips {
            match kernel_vips.get(key) {
                None => diffs.push(format!("VIP {name} is missing from the kernel")),
                Some(m) if m != meta => diffs.push(format!("VIP {name}: entry differs")),
                Some(_) => {}
            }
        }
        let planned_keys: HashSet<VipKey> = planned_vips.iter().map(|p| p.1).collect();
        let extra = kernel_vips
            .keys()
            .filter(|k| !planned_keys.contains(*k))
            .count();
        if extra > 0 {
            diffs.push(format!("{extra} VIP entries in the kernel are not planned"));
        }
        let backends: Array<_, Backend> = self.map(MAP_BACKENDS)?;
        for b in &plan.backends {
            let got = backends.get(&b.id, 0).map_err(map_err(MAP_BACKENDS))?;
            if got != b.entry {
                diffs.push(format!(
                    "VIP {} backend {} (id {}): entry differs",
                    b.vip, b.address, b.id
                ));
            }
        }
        let record = read_filter_record(&self.loaded)?;
        let copy = read_filter_copy(&self.loaded)?;
        for (i, w) in plan.vip_filter.iter().enumerate() {
            if record.get(i) != Some(w) {
                diffs.push(format!("VIP address filter word {i} differs"));
            }
            if copy.get(i) != Some(w) {
                diffs.push(format!(
                    "the program's copy of VIP address filter word {i} differs"
                ));
            }
        }
        let rings: ArrayOfMaps<_, MapData> = self.map(MAP_RINGS)?;
        let live: Array<_, u32> = self.map(MAP_RING_LIVE)?;
        for v in &plan.vips {
            let id = v.meta.vip_id;
            let flag = live.get(&id, 0).map_err(map_err(MAP_RING_LIVE))?;
            if flag > 1 {
                diffs.push(format!(
                    "VIP {}: live-table flag {flag} is not 0 or 1",
                    v.vip
                ));
            }
            match rings.get(&ring_index(id, flag), 0) {
                Ok(inner) => {
                    let table = read_ring(&inner, v.ring.len())?;
                    if crate::maglev::table_digest(&table) != v.ring_digest {
                        diffs.push(format!("VIP {}: lookup table differs", v.vip));
                    }
                }
                Err(MapError::KeyNotFound) => {
                    diffs.push(format!("VIP {}: no lookup table", v.vip));
                }
                Err(e) => return Err(map_err(MAP_RINGS)(e)),
            }
        }
        Ok(diffs)
    }

    /// Generations of every backend id the kernel holds an entry for (to
    /// seed a fresh id allocator when pinned maps are adopted without the
    /// state that made them).
    pub fn backend_generations(&self) -> Result<BTreeMap<u32, u32>, DatapathError> {
        let backends: Array<_, Backend> = self.map(MAP_BACKENDS)?;
        let mut out = BTreeMap::new();
        for id in 0..lb_common::MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(map_err(MAP_BACKENDS))?;
            if b.generation != 0 {
                out.insert(id, b.generation);
            }
        }
        Ok(out)
    }

    /// Removes every VIP entry not in `plan` and deactivates every backend
    /// entry not in it: for adopted maps whose contents are not known.
    pub fn remove_unplanned(&mut self, plan: &MapPlan) -> Result<(), DatapathError> {
        let planned: HashSet<VipKey> = plan
            .vips
            .iter()
            .map(|v| v.key)
            .chain(plan.aliases.iter().map(|(k, _)| *k))
            .collect();
        let keys: Vec<VipKey> = self.vip_entries.keys().copied().collect();
        let mut removed = false;
        for k in keys {
            if !planned.contains(&k) {
                removed |= unref(&mut self.vip_entries, &self.live, &mut self.retired, &k);
            }
        }
        if removed {
            self.publish_vips()?;
            self.grace_period();
        }
        let ids: BTreeSet<u32> = plan.backends.iter().map(|b| b.id).collect();
        let mut backends: Array<_, Backend> = self.map_mut(MAP_BACKENDS)?;
        for id in 0..lb_common::MAX_BACKENDS {
            if ids.contains(&id) {
                continue;
            }
            let b = backends.get(&id, 0).map_err(map_err(MAP_BACKENDS))?;
            if b.flags != 0 {
                let gone = Backend { flags: 0, ..b };
                backends.set(id, gone, 0).map_err(map_err(MAP_BACKENDS))?;
            }
        }
        Ok(())
    }

    fn write_plan(
        &mut self,
        plan: &MapPlan,
        prev: Option<&MapPlan>,
    ) -> Result<Instant, DatapathError> {
        let mut config: Array<_, GlobalConfig> = self.map_mut(MAP_CONFIG)?;
        config.set(0, plan.global, 0).map_err(map_err(MAP_CONFIG))?;
        self.write_backends(plan, prev)?;
        let flips = self.write_rings(plan, prev)?;
        self.flip_tables(&flips)?;

        // The address filter must admit every address of the old and the
        // new plan while both may be in the VIP map.
        let old_filter = prev.map(|p| p.vip_filter.clone()).unwrap_or_default();
        let union: Vec<u64> = plan
            .vip_filter
            .iter()
            .enumerate()
            .map(|(i, w)| w | old_filter.get(i).copied().unwrap_or(0))
            .collect();
        if prev.is_none() || union != old_filter {
            self.write_filter(&union)?;
        }
        self.write_vip_entries(plan, prev)?;
        let live_at = Instant::now();

        let gone: Vec<&PlannedBackend> = prev.map_or_else(Vec::new, |prev| {
            let now: BTreeSet<u32> = plan.backends.iter().map(|b| b.id).collect();
            prev.backends
                .iter()
                .filter(|b| !now.contains(&b.id))
                .collect()
        });
        if !gone.is_empty() || !self.retired.is_empty() {
            // No program that could still pick a departed backend, or read
            // a table switched away from, runs after this.
            self.grace_period();
        }
        if !gone.is_empty() {
            let mut backends: Array<_, Backend> = self.map_mut(MAP_BACKENDS)?;
            for b in gone {
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
        Ok(live_at)
    }

    /// Backend entries that are new or changed (new ids first get zeroed
    /// counters); departed ones are left for after the switch.
    fn write_backends(
        &mut self,
        plan: &MapPlan,
        prev: Option<&MapPlan>,
    ) -> Result<(), DatapathError> {
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
        Ok(())
    }

    /// VIP entries that are new or changed (one hash update each), then
    /// deletion of those that left.
    fn write_vip_entries(
        &mut self,
        plan: &MapPlan,
        prev: Option<&MapPlan>,
    ) -> Result<(), DatapathError> {
        let mut keys = HashSet::new();
        let mut changed = false;
        for (key, meta) in plan
            .vips
            .iter()
            .map(|v| (v.key, v.meta))
            .chain(plan.aliases.iter().copied())
        {
            keys.insert(key);
            if self.vip_entries.get(&key) == Some(&meta) {
                continue;
            }
            changed = true;
            if let Some(old) = self.vip_entries.insert(key, meta) {
                retire_if_unused(&self.vip_entries, &self.live, &mut self.retired, old.vip_id);
            }
        }
        if let Some(prev) = prev {
            for key in prev
                .vips
                .iter()
                .map(|v| v.key)
                .chain(prev.aliases.iter().map(|a| a.0))
            {
                if !keys.contains(&key) {
                    changed |= unref(&mut self.vip_entries, &self.live, &mut self.retired, &key);
                }
            }
        }
        if changed {
            self.publish_vips()?;
        }
        Ok(())
    }

    /// Waits for an RCU grace period: afterwards no program still reads a
    /// table switched away from, the idle VIP index half, or a departed
    /// backend's entry.
    fn grace_period(&mut self) {
        wait_for_readers();
        self.retired.clear();
        self.vip_switched = false;
    }

    /// Builds a VIP index table of `vip_entries`, writes it into the idle
    /// table (after a grace period if the index was switched since the
    /// last one) and switches `VIP_INDEX_LIVE` to it.
    fn publish_vips(&mut self) -> Result<(), DatapathError> {
        let (salt, table) = build_vip_index(&self.vip_entries)?;
        if self.vip_switched {
            self.grace_period();
        }
        let idle = vip_index_half(self.vip_live) ^ 1;
        write_vip_index(&self.loaded, idle, &table)?;
        let word = vip_index_live(idle, salt);
        let mut live: Array<_, u64> = self.map_mut(MAP_VIP_INDEX_LIVE)?;
        live.set(0, word, 0).map_err(map_err(MAP_VIP_INDEX_LIVE))?;
        self.vip_live = word;
        self.vip_switched = true;
        Ok(())
    }

    /// Writes every changed lookup table into its VIP's idle table, without
    /// touching a table a program may read. Returns the flips to make live:
    /// (VIP id, table 0 or 1). Unchanged tables stay where they are.
    fn write_rings(
        &mut self,
        plan: &MapPlan,
        prev: Option<&MapPlan>,
    ) -> Result<Vec<(u32, u32)>, DatapathError> {
        let prev_rings: BTreeMap<u32, u64> = prev
            .map(|p| {
                p.vips
                    .iter()
                    .map(|v| (v.meta.vip_id, v.ring_digest))
                    .collect()
            })
            .unwrap_or_default();
        let in_kernel: HashSet<u32> = self.vip_entries.values().map(|m| m.vip_id).collect();
        let mut flips = Vec::new();
        // Tables to put into the outer map: one batched update, and one
        // grace period, for all of them.
        let mut created = Vec::new();
        for v in &plan.vips {
            let id = v.meta.vip_id;
            if in_kernel.contains(&id) && prev_rings.get(&id) == Some(&v.ring_digest) {
                continue;
            }
            let idle = ring_index(id, self.live[id as usize] ^ 1);
            match self.inner_ring(idle)? {
                Some(table) if !self.retired.contains(&idle) => fill_ring(&table, &v.ring)?,
                Some(_) => created.push((idle, new_ring(&v.ring)?)),
                None => {
                    created.push((idle, new_ring(&v.ring)?));
                    // A new VIP id gets its spare table now, so that its
                    // later changes never wait on the outer map.
                    if self.inner_ring(idle ^ 1)?.is_none() {
                        created.push((idle ^ 1, new_ring(&[])?));
                    }
                }
            }
            flips.push((id, idle & 1));
        }
        if !created.is_empty() {
            self.swap_rings(&created)?;
        }
        Ok(flips)
    }

    /// Makes each VIP id's new table live (`RING_LIVE`); the tables left
    /// are retired until the next grace period.
    fn flip_tables(&mut self, flips: &[(u32, u32)]) -> Result<(), DatapathError> {
        let mut live: Array<_, u32> = self.loaded.map_mut(MAP_RING_LIVE)?;
        for &(id, table) in flips {
            live.set(id, table, 0).map_err(map_err(MAP_RING_LIVE))?;
            let old = std::mem::replace(&mut self.live[id as usize], table);
            if old != table {
                self.retired.insert(ring_index(id, old));
            }
        }
        Ok(())
    }

    /// The table in outer-map slot `index`, if one was put there.
    fn inner_ring(&self, index: u32) -> Result<Option<MapData>, DatapathError> {
        let rings: ArrayOfMaps<_, MapData> = self.map(MAP_RINGS)?;
        match rings.get(&index, 0) {
            Ok(table) => Ok(Some(table)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_RINGS)(e)),
        }
    }

    /// Points the outer map's slots at new tables: one BPF_MAP_UPDATE_BATCH
    /// (one grace period for all), or one update per table where the kernel
    /// does not batch this map type.
    fn swap_rings(&mut self, built: &[(u32, MapData)]) -> Result<(), DatapathError> {
        const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
        let fd = {
            let map = self
                .loaded
                .ebpf
                .map(MAP_RINGS)
                .ok_or(DatapathError::MissingMap { name: MAP_RINGS })?;
            let aya::maps::Map::ArrayOfMaps(data) = map else {
                return Err(DatapathError::MissingMap { name: MAP_RINGS });
            };
            data.fd().as_fd().as_raw_fd()
        };
        let keys: Vec<u32> = built.iter().map(|(k, _)| *k).collect();
        let values: Vec<u32> = built
            .iter()
            .map(|(_, m)| m.fd().as_fd().as_raw_fd() as u32)
            .collect();
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: attr is a valid, fully initialised bpf_attr prefix of the
        // size passed; keys/values outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                std::ptr::from_mut(&mut attr),
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if rc == 0 && attr.count as usize == keys.len() {
            return Ok(());
        }
        // Not supported here (or partly done): update one by one; setting a
        // slot again to the same table is harmless.
        let mut rings: ArrayOfMaps<_, MapData> = self.map_mut(MAP_RINGS)?;
        for (id, inner) in built {
            rings.set(*id, inner, 0).map_err(map_err(MAP_RINGS))?;
        }
        Ok(())
    }

    /// Writes the VIP address filter: the pinned record, then the copy the
    /// program reads.
    fn write_filter(&mut self, words: &[u64]) -> Result<(), DatapathError> {
        let mut filter: Array<_, u64> = self.map_mut(MAP_VIP_FILTER)?;
        for (i, w) in words.iter().enumerate() {
            filter
                .set(i as u32, *w, 0)
                .map_err(map_err(MAP_VIP_FILTER))?;
        }
        write_filter_copy(&mut self.loaded, words)
    }

    /// Reads the counters (per-VIP and per-backend only for the ids of the
    /// applied plan).
    pub fn stats(&self) -> Result<DataplaneStats, DatapathError> {
        let counters: PerCpuArray<_, Counters> = self.map(MAP_COUNTERS)?;
        let per_cpu = counters.get(&0, 0).map_err(map_err(MAP_COUNTERS))?;
        let mut out = DataplaneStats {
            global: vec![0; STAT_COUNT as usize],
            ..Default::default()
        };
        for (i, slot) in out.global.iter_mut().enumerate() {
            *slot = per_cpu.iter().map(|c| c.global[i]).sum();
        }
        if let Some(plan) = &self.applied {
            for v in &plan.vips {
                let id = v.meta.vip_id;
                let on_cpus = per_cpu
                    .iter()
                    .filter_map(|c| c.vips.get(id as usize).copied());
                out.vips.insert(id, sum(on_cpus));
            }
            let backends: PerCpuArray<_, TrafficCounters> = self.map(MAP_BACKEND_STATS)?;
            for b in &plan.backends {
                let v = backends.get(&b.id, 0).map_err(map_err(MAP_BACKEND_STATS))?;
                out.backends.insert(b.id, sum(v.iter().copied()));
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

/// The byte length of a lookup table's memory mapping: `RING_CHUNKS`
/// elements of 64 bytes (a multiple of 8, so no padding between elements),
/// rounded up to whole pages.
fn ring_map_len() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    (RING_CHUNKS as usize * size_of::<RingChunk>()).div_ceil(page) * page
}

/// A backend id as a lookup-table slot: ids are below `MAX_BACKENDS`
/// (asserted in `lb_common` to fit a `u16`); `BACKEND_NONE`, or anything
/// that could not be an id, becomes `RING_SLOT_NONE` (the data path then
/// finds no backend, as it would for `BACKEND_NONE`).
fn slot_of(id: u32) -> u16 {
    if id < MAX_BACKENDS {
        id as u16
    } else {
        RING_SLOT_NONE
    }
}

/// Creates a lookup table as a memory-mappable array holding `ring`.
fn new_ring(ring: &[u32]) -> Result<MapData, DatapathError> {
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let obj = aya_obj::Map::new_from_params(
        BPF_MAP_TYPE_ARRAY,
        4,
        size_of::<RingChunk>() as u32,
        RING_CHUNKS,
        BPF_F_MMAPABLE,
    );
    let data = MapData::create(obj, "lb_ring", None).map_err(map_err(MAP_RINGS))?;
    fill_ring(&data, ring)?;
    Ok(data)
}

/// Writes `ring` into a lookup table with one copy through `mmap` (65537
/// single-slot syscalls take about 60 ms; this takes well under one).
/// Slot `s` is entry `s % 32` of element `s / 32` (see
/// `lb_common::RING_CHUNK_SLOTS`); slots past `ring.len()` get
/// `RING_SLOT_NONE`. Only for a table no program reads.
fn fill_ring(table: &MapData, ring: &[u32]) -> Result<(), DatapathError> {
    let mapping = ArrayMapping::new(table, ring_map_len())?;
    // The mapping is page-aligned: viewing it as u16 slots is aligned, and
    // element `c`'s slots are u16 entries `32c .. 32c + 32`, so slot `s` is
    // entry `s` of the mapping.
    let slots = RING_CHUNKS as usize * RING_CHUNK_SLOTS as usize;
    let table: Vec<u16> = (0..slots)
        .map(|s| ring.get(s).map_or(RING_SLOT_NONE, |&id| slot_of(id)))
        .collect();
    // SAFETY: `slots * 2` bytes ≤ the mapping's length; the source is a
    // separate allocation.
    unsafe {
        std::ptr::copy_nonoverlapping(table.as_ptr(), mapping.ptr.cast::<u16>(), slots);
    }
    Ok(())
}

/// Builds one VIP index table holding `entries`: the first salt with which
/// every key finds a free slot within `VIP_INDEX_PROBES` of its home.
fn build_vip_index(
    entries: &BTreeMap<VipKey, VipMeta>,
) -> Result<(u32, Vec<VipSlot>), DatapathError> {
    'salt: for salt in 1..=256u32 {
        let mut table = vec![VipSlot::default(); VIP_INDEX_SLOTS as usize];
        for (key, meta) in entries {
            let home = vip_index_home(key, salt);
            let free = (0..VIP_INDEX_PROBES)
                .map(|i| vip_index_probe(home, i) as usize)
                .find(|&s| table[s].key.family == 0);
            match free {
                Some(s) => table[s] = vip_slot(*key, *meta),
                None => continue 'salt,
            }
        }
        return Ok((salt, table));
    }
    Err(DatapathError::VipIndex(entries.len()))
}

/// What the data path finds for `key` in one VIP index table (the same
/// probe sequence as `lb-ebpf`'s `find_vip`).
fn vip_index_find(table: &[VipSlot], salt: u32, key: &VipKey) -> Option<VipMeta> {
    let home = vip_index_home(key, salt);
    for i in 0..VIP_INDEX_PROBES {
        let slot = table.get(vip_index_probe(home, i) as usize)?;
        if slot.key == *key {
            return Some(slot.meta);
        }
        if slot.key.family == 0 {
            return None;
        }
    }
    None
}

/// A read-write mapping of a `BPF_F_MMAPABLE` array map; unmapped on drop.
struct ArrayMapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl ArrayMapping {
    /// Maps the first `len` bytes (a whole number of pages, at most the
    /// map's size) of `map`.
    fn new(map: &MapData, len: usize) -> Result<Self, DatapathError> {
        // SAFETY: mapping a BPF_F_MMAPABLE array that we hold an fd of;
        // unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Mmap(std::io::Error::last_os_error()));
        }
        Ok(Self { ptr, len })
    }
}

impl Drop for ArrayMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping created in `new`.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Maps the whole `VIP_INDEX` (both tables).
fn map_vip_index(loaded: &Loaded) -> Result<ArrayMapping, DatapathError> {
    let Some(aya::maps::Map::Array(data)) = loaded.ebpf.map(MAP_VIP_INDEX) else {
        return Err(DatapathError::MissingMap {
            name: MAP_VIP_INDEX,
        });
    };
    // Exactly the map's size: 2 tables of 64-byte slots, whole pages.
    ArrayMapping::new(
        data,
        2 * VIP_INDEX_SLOTS as usize * std::mem::size_of::<VipSlot>(),
    )
}

/// Table `half` (0 or 1) of a `VIP_INDEX` mapping, as slots.
fn vip_index_table(mapping: &ArrayMapping, half: u32) -> *mut VipSlot {
    // SAFETY: the mapping holds 2 × VIP_INDEX_SLOTS slots, page-aligned.
    unsafe {
        mapping
            .ptr
            .cast::<VipSlot>()
            .add((half & 1) as usize * VIP_INDEX_SLOTS as usize)
    }
}

/// The live `VIP_INDEX_LIVE` word and a copy of the live table.
fn read_vip_index(loaded: &Loaded) -> Result<(u64, Vec<VipSlot>), DatapathError> {
    let live: Array<_, u64> = loaded.map(MAP_VIP_INDEX_LIVE)?;
    let word = live.get(&0, 0).map_err(map_err(MAP_VIP_INDEX_LIVE))?;
    let mapping = map_vip_index(loaded)?;
    let mut slots = vec![VipSlot::default(); VIP_INDEX_SLOTS as usize];
    // SAFETY: one table of VIP_INDEX_SLOTS slots inside the mapping; the
    // destination is a separate allocation of the same length.
    unsafe {
        std::ptr::copy_nonoverlapping(
            vip_index_table(&mapping, vip_index_half(word)),
            slots.as_mut_ptr(),
            slots.len(),
        );
    }
    Ok((word, slots))
}

/// Writes `table` into VIP index table `half` (which no program reads).
fn write_vip_index(loaded: &Loaded, half: u32, table: &[VipSlot]) -> Result<(), DatapathError> {
    assert_eq!(table.len(), VIP_INDEX_SLOTS as usize);
    let mapping = map_vip_index(loaded)?;
    // SAFETY: one table of VIP_INDEX_SLOTS slots inside the mapping; the
    // source is a separate allocation of the same length.
    unsafe {
        std::ptr::copy_nonoverlapping(table.as_ptr(), vip_index_table(&mapping, half), table.len());
    }
    Ok(())
}

/// Forgets the kernel VIP entry `key` (deleted); see [`retire_if_unused`].
/// Returns whether there was one.
fn unref(
    entries: &mut BTreeMap<VipKey, VipMeta>,
    live: &[u32],
    retired: &mut HashSet<u32>,
    key: &VipKey,
) -> bool {
    let Some(old) = entries.remove(key) else {
        return false;
    };
    retire_if_unused(entries, live, retired, old.vip_id);
    true
}

/// Retires VIP id `vip_id`'s live table once no kernel VIP entry has that
/// id any more (a program that looked the entry up may still read it).
fn retire_if_unused(
    entries: &BTreeMap<VipKey, VipMeta>,
    live: &[u32],
    retired: &mut HashSet<u32>,
    vip_id: u32,
) {
    if !entries.values().any(|m| m.vip_id == vip_id) {
        retired.insert(ring_index(vip_id, live[vip_id as usize]));
    }
}

/// `struct bpf_attr` for the batch commands: in_batch, out_batch, keys,
/// values, count, map_fd, elem_flags, flags.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Waits for an RCU grace period: XDP programs run inside RCU read-side
/// sections, so when this returns no program that started before it is
/// still running. `membarrier(MEMBARRIER_CMD_GLOBAL)` is implemented with
/// `synchronize_rcu()`; where it is unavailable (nohz_full), sleep well past
/// any XDP program's run time instead.
fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integer arguments and touches no memory.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Reads the first `len` slots of a lookup table (memory-mapped, read
/// only), with `RING_SLOT_NONE` read back as `BACKEND_NONE`.
fn read_ring(inner: &MapData, len: usize) -> Result<Vec<u32>, DatapathError> {
    let map_len = ring_map_len();
    let fd = inner.fd().as_fd().as_raw_fd();
    // SAFETY: a read-only shared mapping of a BPF_F_MMAPABLE array of
    // `map_len` bytes; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(DatapathError::Mmap(std::io::Error::last_os_error()));
    }
    let base = ptr.cast::<u16>();
    let len = len.min(MAX_RING_SIZE as usize);
    // SAFETY: i < MAX_RING_SIZE ≤ RING_CHUNKS * 32, so (i + 1) * 2 ≤
    // map_len; page-aligned, so aligned.
    let out = (0..len)
        .map(|i| match unsafe { base.add(i).read() } {
            RING_SLOT_NONE => BACKEND_NONE,
            id => u32::from(id),
        })
        .collect();
    // SAFETY: ptr/map_len are the mapping created above.
    unsafe { libc::munmap(ptr, map_len) };
    Ok(out)
}

/// The IP-in-IP decapsulation program for a backend host.
pub struct Decap {
    loaded: Loaded,
}

impl Decap {
    /// Loads `xdp_decap` (with a minimal connection table: it uses none).
    pub fn load() -> Result<Self, DatapathError> {
        Ok(Self {
            loaded: Loaded::load(PROG_DECAP, 1, None)?,
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

#[cfg(test)]
mod tests {
    use lb_common::MAX_VIP_KEYS;

    use super::*;

    fn key(i: u32) -> VipKey {
        VipKey {
            addr: [0x0000_12c6 | (i << 16), 0, 0, 0],
            port: (80 + (i % 3) as u16).to_be(),
            proto: if i.is_multiple_of(2) { 6 } else { 17 },
            family: 4,
        }
    }

    /// A full VIP index (every VIP and every fragment alias) places every
    /// key where the data path's probe sequence finds it, and finds nothing
    /// for other keys.
    #[test]
    fn vip_index_holds_the_maximum_and_finds_every_key() {
        let entries: BTreeMap<VipKey, VipMeta> = (0..MAX_VIP_KEYS)
            .map(|i| {
                (
                    key(i),
                    VipMeta {
                        vip_id: i % MAX_VIPS,
                        ring_size: 1009,
                        flags: i,
                        _pad: 0,
                    },
                )
            })
            .collect();
        let (salt, table) = build_vip_index(&entries).expect("build");
        assert_eq!(
            table.iter().filter(|s| s.key.family != 0).count(),
            entries.len()
        );
        for (k, m) in &entries {
            assert_eq!(vip_index_find(&table, salt, k), Some(*m), "{k:?}");
        }
        for i in MAX_VIP_KEYS..MAX_VIP_KEYS + 1000 {
            assert_eq!(vip_index_find(&table, salt, &key(i)), None);
        }
        let (_, empty) = build_vip_index(&BTreeMap::new()).expect("empty");
        assert!(empty.iter().all(|s| s.key.family == 0));
    }
}
