//! Loading the object: the pin directory and its layout version, the
//! connection table's load-time parameters, attaching and detaching
//! (through pinned links when pinning) and typed access to the maps.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapError},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    ConnParams, GLOBAL_CONN_BUCKET_MASK, GLOBAL_CONN_SECRET, LAYOUT_VERSION, MAP_BACKEND_STATS,
    MAP_BACKENDS, MAP_CONFIG, MAP_CONN_PARAMS, MAP_CONN_TABLE, MAP_COUNTERS, MAP_RING_LIVE,
    MAP_RINGS, MAP_TX_PORTS, MAP_VIP_FILTER, MAP_VIP_INDEX, MAP_VIP_INDEX_LIVE, conn_buckets,
};

use super::{DatapathError, map_err};
/// Maps that carry state across restarts (all but the benchmark's and the
/// decap program's).
pub(super) const PINNED_MAPS: [&str; 12] = [
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
pub(super) fn conn_params_for(
    pins: Option<&Path>,
    capacity: u32,
) -> Result<ConnParams, DatapathError> {
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
pub(super) fn bucket_mask(buckets: u32) -> u32 {
    (1u32 << buckets.max(1).ilog2()) - 1
}

/// Records the parameters the program was loaded with in `CONN_PARAMS`
/// (kept with the pinned table for the next process), after checking that
/// they fit the table the object got.
pub(super) fn record_conn_params(loaded: &mut Loaded) -> Result<(), DatapathError> {
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

/// The directory of one layout version under the operator's pin dir.
pub(super) fn layout_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("layout-v{LAYOUT_VERSION}"))
}

/// Creates the layout directory, refusing a pin dir that holds another
/// layout. Returns whether our layout's maps were already pinned.
pub(super) fn prepare_pins(pin_dir: &Path) -> Result<bool, DatapathError> {
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

/// One loaded program of the object, with the object's maps and the links
/// it was attached by. `Datapath` and `Decap` are thin roles over this.
pub(super) struct Loaded {
    pub(super) ebpf: Ebpf,
    pub(super) name: &'static str,
    pub(super) links: Vec<XdpLinkId>,
    /// Links pinned under `pins` (interface name, pin path).
    pub(super) pinned_links: Vec<(String, PathBuf)>,
    /// Our layout directory when pinning.
    pub(super) pins: Option<PathBuf>,
    /// Whether the maps were adopted from an earlier process.
    pub(super) adopted: bool,
    /// The connection-table parameters the program was loaded with.
    pub(super) conn: ConnParams,
}

impl Loaded {
    pub(super) fn load(
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

    pub(super) fn link_pin(&self, iface: &str) -> Option<PathBuf> {
        self.pins.as_ref().map(|d| d.join(format!("link-{iface}")))
    }

    /// Attaches through a pinned link: replaces the program of an existing
    /// link atomically (no packet sees no program), or creates and pins a
    /// new link.
    pub(super) fn attach_pinned(
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
    pub(super) fn pinned_interfaces(&self) -> Vec<String> {
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

    pub(super) fn program(&mut self) -> Result<&mut Xdp, DatapathError> {
        program(&mut self.ebpf, self.name)
    }

    pub(super) fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<(), DatapathError> {
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
    pub(super) fn detach(&mut self) -> Result<(), DatapathError> {
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

    pub(super) fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap { name })?;
        T::try_from(map).map_err(map_err(name))
    }

    pub(super) fn map<'a, T>(&'a self, name: &'static str) -> Result<T, DatapathError>
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

pub(super) fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut Xdp, DatapathError> {
    let prog = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| DatapathError::Program { name, source })
}
