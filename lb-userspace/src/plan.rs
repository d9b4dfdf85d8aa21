//! The map-content planner: a pure function from the model
//! ([`DataplaneSpec`]) to exactly what every map must hold ([`MapPlan`]).
//! No kernel involved, so it is tested with plain `cargo test`, and the
//! simulator uses the same tables the data path will get.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    BACKEND_F_ACTIVE, Backend, FAMILY_V4, FAMILY_V6, GlobalConfig, MAX_BACKENDS, MAX_RING_SIZE,
    MAX_VIPS, VIP_F_FRAG_ALIAS, VIP_F_IPIP, VIP_F_SRC_AFFINITY, VIP_FILTER_WORDS, VipKey, VipMeta,
    vip_filter_bit,
};
use serde::{Deserialize, Serialize};

use crate::{
    maglev::{self, BackendIdentity, MaglevBackend, MaglevError},
    model::{BackendState, DataplaneSpec, ForwardingMode, HashMode, VipId, VipSpec},
};

/// Why a spec cannot be turned into map contents.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("more than {max} VIPs (VIP {vip} does not fit); split the config across nodes")]
    TooManyVips { vip: VipId, max: u32 },
    #[error("more than {max} backends in all VIPs (VIP {vip}, backend {backend} does not fit)")]
    TooManyBackends {
        vip: VipId,
        backend: IpAddr,
        max: u32,
    },
    #[error("VIP {vip}: table size {size} is larger than the maximum {max}")]
    TableTooLarge { vip: VipId, size: u32, max: u32 },
    #[error("VIP {vip}: port 0 is reserved (it routes IP fragments); use a real port")]
    PortZero { vip: VipId },
    #[error("VIP {vip} appears twice")]
    DuplicateVip { vip: VipId },
    #[error(
        "VIP {vip}: backend {backend} is {backend_family}, the VIP is {vip_family}; ipip needs the same family"
    )]
    FamilyMismatch {
        vip: VipId,
        backend: IpAddr,
        backend_family: &'static str,
        vip_family: &'static str,
    },
    #[error(
        "VIP {vip}: backend {backend} has no MAC address, which dsr needs; add `mac = \"aa:bb:cc:dd:ee:ff\"`"
    )]
    MissingMac { vip: VipId, backend: IpAddr },
    #[error("VIP {vip}: {source}")]
    Maglev { vip: VipId, source: MaglevError },
}

/// Stable ids for VIPs and backends across plans.
///
/// A backend id names one backend of one VIP. Ids released by a plan are
/// quarantined until the next plan (by then the released plan's tables,
/// which may still name them, have been replaced), and every reuse bumps
/// the id's generation so connection entries made for the old owner miss.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdAllocator {
    vips: BTreeMap<(VipId, u32), u32>,
    backends: BTreeMap<(VipId, IpAddr), u32>,
    generations: BTreeMap<u32, u32>,
    free_vip_ids: BTreeSet<u32>,
    free_backend_ids: BTreeSet<u32>,
    quarantined_vip_ids: BTreeSet<u32>,
    quarantined_backend_ids: BTreeSet<u32>,
    next_vip_id: u32,
    next_backend_id: u32,
}

impl IdAllocator {
    fn vip_id(&mut self, vip: VipId, ring_size: u32) -> Option<u32> {
        if let Some(&id) = self.vips.get(&(vip, ring_size)) {
            return Some(id);
        }
        let id = take_id(&mut self.free_vip_ids, &mut self.next_vip_id, MAX_VIPS)?;
        self.vips.insert((vip, ring_size), id);
        Some(id)
    }

    fn backend_id(&mut self, vip: VipId, addr: IpAddr) -> Option<(u32, u32)> {
        if let Some(&id) = self.backends.get(&(vip, addr)) {
            return Some((id, self.generations[&id]));
        }
        let id = take_id(
            &mut self.free_backend_ids,
            &mut self.next_backend_id,
            MAX_BACKENDS,
        )?;
        let generation = self
            .generations
            .entry(id)
            .and_modify(|g| *g = g.wrapping_add(1))
            .or_insert(1);
        self.backends.insert((vip, addr), id);
        Some((id, *generation))
    }

    /// Releases every id not in `used` into quarantine, and frees what the
    /// previous plan quarantined.
    fn release_unused(&mut self, used_vips: &BTreeSet<u32>, used_backends: &BTreeSet<u32>) {
        self.free_vip_ids.append(&mut self.quarantined_vip_ids);
        self.free_backend_ids
            .append(&mut self.quarantined_backend_ids);
        let q = &mut self.quarantined_vip_ids;
        self.vips
            .retain(|_, id| used_vips.contains(id) || !q.insert(*id));
        let q = &mut self.quarantined_backend_ids;
        self.backends
            .retain(|_, id| used_backends.contains(id) || !q.insert(*id));
    }
}

fn take_id(free: &mut BTreeSet<u32>, next: &mut u32, max: u32) -> Option<u32> {
    if let Some(id) = free.pop_first() {
        return Some(id);
    }
    (*next < max).then(|| {
        *next += 1;
        *next - 1
    })
}

/// One VIP's planned maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedVip {
    pub vip: VipId,
    pub key: VipKey,
    pub meta: VipMeta,
    /// Lookup table: `meta.ring_size` backend ids (or `BACKEND_NONE`).
    pub ring: Vec<u32>,
    /// [`maglev::table_digest`] of `ring`, comparable across nodes.
    pub ring_digest: u64,
}

/// One backend of one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedBackend {
    pub id: u32,
    pub vip: VipId,
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    pub entry: Backend,
}

/// Everything the maps must hold for one spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapPlan {
    pub global: GlobalConfig,
    pub vips: Vec<PlannedVip>,
    /// Fragment aliases: (address, 0, protocol) → the VIP with the lowest
    /// port on that address and protocol.
    pub aliases: Vec<(VipKey, VipMeta)>,
    pub backends: Vec<PlannedBackend>,
    /// Bitmap of VIP addresses (`VIP_FILTER`), `VIP_FILTER_WORDS` words.
    pub vip_filter: Vec<u64>,
    /// Id state after this plan; commit it once the plan is applied.
    pub allocator: IdAllocator,
}

/// An address as the data path sees it: wire-order words and family.
pub fn addr_words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// A port as the data path sees it (wire byte order).
pub const fn port_wire(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The VIP map key of a VIP.
pub fn vip_key(vip: &VipId) -> VipKey {
    let (addr, family) = addr_words(vip.address);
    VipKey {
        addr,
        port: port_wire(vip.port),
        proto: vip.protocol.number(),
        family,
    }
}

const fn family_name(a: IpAddr) -> &'static str {
    match a {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// Mask of the low `host_bits` bits of a big-endian word, in wire order.
fn host_mask(prefix_len: u8, word_bits_start: u8) -> u32 {
    let fixed = u32::from(prefix_len.saturating_sub(word_bits_start).min(32));
    let host = if fixed >= 32 { 0 } else { u32::MAX >> fixed };
    u32::from_ne_bytes(host.to_be_bytes())
}

fn global_config(spec: &DataplaneSpec) -> GlobalConfig {
    let mut g = GlobalConfig {
        hash_seed: spec.hash_seed,
        config_generation: spec.generation,
        ..GlobalConfig::default()
    };
    if let Some(p) = spec.ipip_source_v4 {
        g.ipip_src_v4 = u32::from_ne_bytes(p.addr.octets());
        g.ipip_src_v4_mask = host_mask(p.len, 0);
    }
    if let Some(p) = spec.ipip_source_v6 {
        g.ipip_src_v6 = addr_words(IpAddr::V6(p.addr)).0;
        g.ipip_src_v6_mask = host_mask(p.len.max(96), 96);
    }
    g
}

/// Plans the maps for `spec`, reusing the ids of `previous`.
pub fn plan(spec: &DataplaneSpec, previous: &IdAllocator) -> Result<MapPlan, PlanError> {
    let mut alloc = previous.clone();
    let mut seen = BTreeSet::new();
    let mut vips = Vec::with_capacity(spec.vips.len());
    let mut backends = Vec::new();
    let mut used_vips = BTreeSet::new();
    let mut used_backends = BTreeSet::new();
    for vip in &spec.vips {
        let id = vip.id();
        if !seen.insert(id) {
            return Err(PlanError::DuplicateVip { vip: id });
        }
        let planned = plan_vip(vip, spec.hash_seed, &mut alloc, &mut backends)?;
        used_vips.insert(planned.meta.vip_id);
        vips.push(planned);
    }
    used_backends.extend(backends.iter().map(|b: &PlannedBackend| b.id));
    alloc.release_unused(&used_vips, &used_backends);
    Ok(MapPlan {
        global: global_config(spec),
        vip_filter: vip_filter(&vips),
        aliases: fragment_aliases(&vips),
        vips,
        backends,
        allocator: alloc,
    })
}

fn plan_vip(
    vip: &VipSpec,
    seed: u32,
    alloc: &mut IdAllocator,
    backends: &mut Vec<PlannedBackend>,
) -> Result<PlannedVip, PlanError> {
    let id = vip.id();
    if vip.port == 0 {
        return Err(PlanError::PortZero { vip: id });
    }
    if vip.table_size > MAX_RING_SIZE {
        return Err(PlanError::TableTooLarge {
            vip: id,
            size: vip.table_size,
            max: MAX_RING_SIZE,
        });
    }
    let vip_id = alloc
        .vip_id(id, vip.table_size)
        .ok_or(PlanError::TooManyVips {
            vip: id,
            max: MAX_VIPS,
        })?;
    let mut maglev_input = Vec::with_capacity(vip.backends.len());
    for b in &vip.backends {
        let (addr, family) = addr_words(b.address);
        if vip.mode == ForwardingMode::Ipip && family_name(b.address) != family_name(vip.address) {
            return Err(PlanError::FamilyMismatch {
                vip: id,
                backend: b.address,
                backend_family: family_name(b.address),
                vip_family: family_name(vip.address),
            });
        }
        if vip.mode == ForwardingMode::Dsr && b.mac.is_none() && b.state != BackendState::Down {
            return Err(PlanError::MissingMac {
                vip: id,
                backend: b.address,
            });
        }
        let (bid, generation) =
            alloc
                .backend_id(id, b.address)
                .ok_or(PlanError::TooManyBackends {
                    vip: id,
                    backend: b.address,
                    max: MAX_BACKENDS,
                })?;
        let weight = if b.state == BackendState::Active {
            b.weight
        } else {
            0
        };
        maglev_input.push(MaglevBackend {
            identity: BackendIdentity {
                addr: b.address,
                port: 0,
            },
            weight,
            id: bid,
        });
        let flags = if b.state == BackendState::Down {
            0
        } else {
            BACKEND_F_ACTIVE
        };
        backends.push(PlannedBackend {
            id: bid,
            vip: id,
            address: b.address,
            weight: b.weight,
            state: b.state,
            entry: Backend {
                addr,
                mac: b.mac.map(|m| m.0).unwrap_or_default(),
                family,
                flags,
                generation,
                vip_id,
            },
        });
    }
    let ring = maglev::build_table(&maglev_input, vip.table_size, seed)
        .map_err(|source| PlanError::Maglev { vip: id, source })?;
    let mut flags = 0;
    if vip.mode == ForwardingMode::Ipip {
        flags |= VIP_F_IPIP;
    }
    if vip.hash == HashMode::SourceAddress {
        flags |= VIP_F_SRC_AFFINITY;
    }
    Ok(PlannedVip {
        vip: id,
        key: vip_key(&id),
        meta: VipMeta {
            vip_id,
            ring_size: vip.table_size,
            flags,
            _pad: 0,
        },
        ring_digest: maglev::table_digest(&ring),
        ring,
    })
}

fn vip_filter(vips: &[PlannedVip]) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
    for v in vips {
        let (word, mask) = vip_filter_bit(&v.key.addr);
        words[word as usize] |= mask;
    }
    words
}

fn fragment_aliases(vips: &[PlannedVip]) -> Vec<(VipKey, VipMeta)> {
    let mut lowest: BTreeMap<(IpAddr, u8), &PlannedVip> = BTreeMap::new();
    for v in vips {
        let k = (v.vip.address, v.key.proto);
        match lowest.get(&k) {
            Some(cur) if cur.vip.port <= v.vip.port => {}
            _ => {
                lowest.insert(k, v);
            }
        }
    }
    lowest
        .into_values()
        .map(|v| {
            let key = VipKey { port: 0, ..v.key };
            let meta = VipMeta {
                flags: v.meta.flags | VIP_F_FRAG_ALIAS,
                ..v.meta
            };
            (key, meta)
        })
        .collect()
}
