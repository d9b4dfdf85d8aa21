//! The map-content planner: a pure function from the model
//! ([`DataplaneSpec`]) to exactly what every map must hold ([`MapPlan`]).
//! No kernel involved, so it is tested with plain `cargo test`, and the
//! simulator uses the same tables the data path will get.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    BACKEND_F_ACTIVE, BACKEND_NONE, Backend, FAMILY_V4, FAMILY_V6, GlobalConfig, MAX_BACKENDS,
    MAX_RING_SIZE, MAX_VIPS, VIP_F_FRAG_ALIAS, VIP_F_IPIP, VIP_F_SRC_AFFINITY, VIP_FILTER_WORDS,
    VipKey, VipMatch, VipMeta, vip_filter_bit,
};
use serde::{Deserialize, Serialize};

use crate::{
    maglev::{self, BackendIdentity, MaglevBackend, MaglevError},
    model::{BackendState, DataplaneSpec, ForwardingMode, HashMode, VipId, VipSpec, family_name},
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
/// A backend id names one backend of one VIP. Ids a plan no longer uses are
/// released only after that plan has allocated, so the plan that drops an
/// id never hands it to someone else (the tables live while it is applied
/// may still name it); the next plan may reuse it, and every reuse bumps
/// the id's generation so connection entries made for the old owner miss.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdAllocator {
    #[serde(with = "as_pairs")]
    vips: BTreeMap<(VipId, u32), u32>,
    #[serde(with = "as_pairs")]
    backends: BTreeMap<(VipId, IpAddr), u32>,
    #[serde(with = "as_pairs")]
    generations: BTreeMap<u32, u32>,
    free_vip_ids: BTreeSet<u32>,
    free_backend_ids: BTreeSet<u32>,
    next_vip_id: u32,
    next_backend_id: u32,
}

/// Maps with non-string keys as JSON arrays of [key, value] pairs.
mod as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

impl IdAllocator {
    /// An allocator for maps whose history is unknown (adopted pins without
    /// the agent's state): every id starts past the generation the kernel
    /// holds for it, so no connection entry made before can match.
    pub fn after_generations(generations: &BTreeMap<u32, u32>) -> Self {
        Self {
            generations: generations.clone(),
            ..Self::default()
        }
    }

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

    /// Frees every id not in `used`. Called after the plan has allocated,
    /// so the freed ids are only reusable by the next plan.
    /// `used_vips` and `used_backends` are indexed by id.
    fn release_unused(&mut self, used_vips: &[bool], used_backends: &[bool]) {
        let used = |set: &[bool], id: u32| set.get(id as usize).copied().unwrap_or(false);
        let free = &mut self.free_vip_ids;
        self.vips
            .retain(|_, id| used(used_vips, *id) || !free.insert(*id));
        let free = &mut self.free_backend_ids;
        self.backends
            .retain(|_, id| used(used_backends, *id) || !free.insert(*id));
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
    /// Shared: plans are cloned and compared often, tables are large and
    /// unchanged tables are the same allocation (compared by pointer first).
    pub ring: std::sync::Arc<[u32]>,
    /// [`maglev::table_digest`] of `ring` (backend ids): detects a change
    /// of the table this node must write.
    pub ring_digest: u64,
    /// Digest of the table by backend *address* (ids differ between nodes
    /// with different histories): equal on every node with the same config
    /// and seed, for comparing nodes of a fleet.
    pub fleet_digest: u64,
    /// What the table was built from (backend address, weight given to
    /// Maglev, id) and the seed: a later plan with the same input reuses
    /// the table instead of rebuilding it.
    pub table_input: (Vec<(IpAddr, u32, u32)>, u32),
    /// Slots per backend id in `ring` (computed once per table).
    pub slot_counts: std::sync::Arc<BTreeMap<u32, u32>>,
    /// The spec this was planned from: a later plan with an equal spec
    /// and seed takes this VIP and its backends as they are.
    pub spec: std::sync::Arc<VipSpec>,
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

/// An address as the data path sees it: wire-order words and family (not
/// `lb_common::addr_words`, which packs such words into two `u64`s).
pub fn wire_address(addr: IpAddr) -> ([u32; 4], u8) {
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
    let (addr, family) = wire_address(vip.address);
    VipKey {
        addr,
        port: port_wire(vip.port),
        proto: vip.protocol.number(),
        family,
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
        ipip_mtu: spec.ipip_mtu,
        ..GlobalConfig::default()
    };
    if let Some(p) = spec.ipip_source_v4 {
        g.ipip_src_v4 = u32::from_ne_bytes(p.addr.octets());
        g.ipip_src_v4_mask = host_mask(p.len, 0);
    }
    if let Some(p) = spec.ipip_source_v6 {
        g.ipip_src_v6 = wire_address(IpAddr::V6(p.addr)).0;
        g.ipip_src_v6_mask = host_mask(p.len.max(96), 96);
    }
    g
}

/// Plans the maps for `spec`, reusing the ids of `previous`.
pub fn plan(spec: &DataplaneSpec, previous: &IdAllocator) -> Result<MapPlan, PlanError> {
    plan_reusing(spec, previous, None)
}

/// Plans `spec` as the successor of the applied plan `prev`: ids from its
/// allocator, and every VIP whose table input is unchanged keeps its table
/// without rebuilding it (a change to one VIP of a large config costs one
/// Maglev build, not one per VIP). The result equals `plan(spec,
/// &prev.allocator)`.
pub fn plan_next(spec: &DataplaneSpec, prev: &MapPlan) -> Result<MapPlan, PlanError> {
    plan_reusing(spec, &prev.allocator, Some(prev))
}

fn plan_reusing(
    spec: &DataplaneSpec,
    previous: &IdAllocator,
    reuse: Option<&MapPlan>,
) -> Result<MapPlan, PlanError> {
    // Each planned VIP with its backends (planned one per spec backend, in
    // VIP order, so each VIP's are the next `spec.backends.len()`).
    let mut tables: BTreeMap<(VipId, u32), (&PlannedVip, &[PlannedBackend])> = BTreeMap::new();
    let mut same_seed = false;
    if let Some(p) = reuse {
        same_seed = p.global.hash_seed == spec.hash_seed;
        let mut rest = p.backends.as_slice();
        for v in &p.vips {
            let (own, tail) = rest.split_at(v.spec.backends.len().min(rest.len()));
            rest = tail;
            tables.insert((v.vip, v.meta.ring_size), (v, own));
        }
    }
    let mut alloc = previous.clone();
    let mut seen = BTreeSet::new();
    let mut vips = Vec::with_capacity(spec.vips.len());
    let mut backends = Vec::new();
    let mut used_vips = vec![false; MAX_VIPS as usize];
    let mut used_backends = vec![false; MAX_BACKENDS as usize];
    for vip in &spec.vips {
        let id = vip.id();
        if !seen.insert(id) {
            return Err(PlanError::DuplicateVip { vip: id });
        }
        let old = tables.get(&(id, vip.table_size)).copied();
        if let Some((o, own)) = old
            && same_seed
            && *o.spec == *vip
        {
            // Unchanged: same ids (they are in the allocator), same table.
            used_vips[o.meta.vip_id as usize] = true;
            backends.extend_from_slice(own);
            vips.push(o.clone());
            continue;
        }
        let old = old.map(|(o, _)| o);
        let planned = plan_vip(vip, spec.hash_seed, &mut alloc, &mut backends, old)?;
        used_vips[planned.meta.vip_id as usize] = true;
        vips.push(planned);
    }
    for b in &backends {
        used_backends[b.id as usize] = true;
    }
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

#[allow(clippy::too_many_lines)]
fn plan_vip(
    vip: &VipSpec,
    seed: u32,
    alloc: &mut IdAllocator,
    backends: &mut Vec<PlannedBackend>,
    old: Option<&PlannedVip>,
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
    let mut vip_flags = 0;
    if vip.mode == ForwardingMode::Ipip {
        vip_flags |= VIP_F_IPIP;
    }
    if vip.hash == HashMode::SourceAddress {
        vip_flags |= VIP_F_SRC_AFFINITY;
    }
    let key = vip_key(&id);
    let first_backend = backends.len();
    let mut maglev_input = Vec::with_capacity(vip.backends.len());
    for b in &vip.backends {
        let (addr, family) = wire_address(b.address);
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
                vip: VipMatch::new(&key, vip_flags),
                _pad: 0,
            },
        });
    }
    let table_input = (
        maglev_input
            .iter()
            .map(|m| (m.identity.addr, m.weight, m.id))
            .collect::<Vec<_>>(),
        seed,
    );
    let reused = old.filter(|o| o.table_input == table_input);
    let ring: std::sync::Arc<[u32]> = match reused {
        Some(o) => o.ring.clone(),
        None => maglev::build_table(&maglev_input, vip.table_size, seed)
            .map_err(|source| PlanError::Maglev { vip: id, source })?
            .into(),
    };
    Ok(PlannedVip {
        vip: id,
        key,
        meta: VipMeta {
            vip_id,
            ring_size: vip.table_size,
            flags: vip_flags,
            _pad: 0,
        },
        ring_digest: reused.map_or_else(|| maglev::table_digest(&ring), |o| o.ring_digest),
        fleet_digest: reused.map_or_else(
            || fleet_digest(&ring, &backends[first_backend..]),
            |o| o.fleet_digest,
        ),
        slot_counts: reused.map_or_else(
            || {
                let mut counts = vec![0u32; MAX_BACKENDS as usize];
                for &id in ring.iter() {
                    if let Some(c) = counts.get_mut(id as usize) {
                        *c += 1;
                    }
                }
                std::sync::Arc::new(
                    counts
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| **c > 0)
                        .map(|(id, c)| (id as u32, *c))
                        .collect(),
                )
            },
            |o| o.slot_counts.clone(),
        ),
        ring,
        table_input,
        spec: std::sync::Arc::new(vip.clone()),
    })
}

/// The table in terms of backend addresses: each slot becomes the rank of
/// its backend's address among the VIP's backends, then the ranks and the
/// sorted addresses are hashed together.
fn fleet_digest(ring: &[u32], backends: &[PlannedBackend]) -> u64 {
    let mut by_addr: Vec<(IpAddr, u32)> = backends.iter().map(|b| (b.address, b.id)).collect();
    by_addr.sort_unstable();
    // Rank by id, as a dense table (ids are below MAX_BACKENDS).
    let len = by_addr
        .iter()
        .map(|&(_, id)| id as usize + 1)
        .max()
        .unwrap_or(0);
    let mut rank = vec![BACKEND_NONE; len];
    for (i, &(_, id)) in by_addr.iter().enumerate() {
        rank[id as usize] = i as u32;
    }
    let ranks: Vec<u32> = ring
        .iter()
        .map(|&id| rank.get(id as usize).copied().unwrap_or(BACKEND_NONE))
        .collect();
    let addrs: Vec<u32> = by_addr
        .iter()
        .flat_map(|&(a, _)| wire_address(a).0)
        .collect();
    maglev::table_digest(&ranks) ^ maglev::table_digest(&addrs).rotate_left(1)
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

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
    };

    use lb_common::{
        BACKEND_F_ACTIVE, BACKEND_NONE, FAMILY_V4, FAMILY_V6, MAX_RING_SIZE, MAX_VIPS, PROTO_TCP,
        PROTO_UDP, VIP_F_FRAG_ALIAS, VIP_F_IPIP, VIP_F_SRC_AFFINITY,
    };

    use super::{
        IdAllocator, MapPlan, PlanError, PlannedBackend, PlannedVip, plan, plan_next, port_wire,
        wire_address,
    };
    use crate::model::{
        BackendSpec, BackendState, DataplaneSpec, ForwardingMode, HashMode, Ipv4Prefix, Ipv6Prefix,
        MacAddr, Protocol, VipId, VipSpec,
    };

    /// Small prime table size so most tests stay fast.
    const SMALL: u32 = 1009;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An active DSR backend with a MAC derived from its address.
    fn backend(addr: &str, weight: u32) -> BackendSpec {
        let a = ip(addr);
        let last = match a {
            IpAddr::V4(a) => a.octets()[3],
            IpAddr::V6(a) => a.octets()[15],
        };
        BackendSpec {
            address: a,
            weight,
            mac: Some(MacAddr([2, 0, 0, 0, 0, last])),
            state: BackendState::Active,
        }
    }

    fn with_state(mut b: BackendSpec, state: BackendState) -> BackendSpec {
        b.state = state;
        b
    }

    fn vip(addr: &str, port: u16, protocol: Protocol, backends: Vec<BackendSpec>) -> VipSpec {
        VipSpec {
            address: ip(addr),
            port,
            protocol,
            mode: ForwardingMode::Dsr,
            hash: HashMode::FiveTuple,
            table_size: SMALL,
            backends,
        }
    }

    fn spec(vips: Vec<VipSpec>) -> DataplaneSpec {
        DataplaneSpec {
            hash_seed: 0x5eed,
            generation: 7,
            vips,
            ..DataplaneSpec::default()
        }
    }

    /// VIP A (two backends) and VIP B (one IPv6 VIP with two backends).
    fn two_vips() -> DataplaneSpec {
        spec(vec![
            vip(
                "192.0.2.1",
                80,
                Protocol::Tcp,
                vec![backend("10.0.0.1", 1), backend("10.0.0.2", 2)],
            ),
            vip(
                "2001:db8::1",
                443,
                Protocol::Tcp,
                vec![backend("2001:db8:1::1", 1), backend("2001:db8:1::2", 1)],
            ),
        ])
    }

    fn first(spec: &DataplaneSpec) -> MapPlan {
        plan(spec, &IdAllocator::default()).expect("plan")
    }

    fn find_vip<'a>(p: &'a MapPlan, addr: &str, port: u16) -> &'a PlannedVip {
        p.vips
            .iter()
            .find(|v| v.vip.address == ip(addr) && v.vip.port == port)
            .expect("VIP in plan")
    }

    fn find_backend<'a>(p: &'a MapPlan, vip_port: u16, addr: &str) -> &'a PlannedBackend {
        p.backends
            .iter()
            .find(|b| b.vip.port == vip_port && b.address == ip(addr))
            .expect("backend in plan")
    }

    /// Backend ids (and generations) by (VIP, address).
    fn backend_ids(p: &MapPlan) -> BTreeMap<(VipId, IpAddr), (u32, u32)> {
        p.backends
            .iter()
            .map(|b| ((b.vip, b.address), (b.id, b.entry.generation)))
            .collect()
    }

    fn vip_ids(p: &MapPlan) -> BTreeMap<VipId, u32> {
        p.vips.iter().map(|v| (v.vip, v.meta.vip_id)).collect()
    }

    /// Slots per backend id.
    fn slot_counts(ring: &[u32]) -> BTreeMap<u32, usize> {
        let mut c = BTreeMap::new();
        for &s in ring {
            *c.entry(s).or_default() += 1;
        }
        c
    }

    // ---- ids ----

    #[test]
    fn replanning_the_same_spec_changes_nothing() {
        let s = two_vips();
        let p1 = first(&s);
        let p2 = plan(&s, &p1.allocator).unwrap();
        let p3 = plan(&s, &p2.allocator).unwrap();
        // Ids, rings, digests, entries, aliases, global config and the id
        // state itself are identical.
        assert_eq!(p2, p1);
        assert_eq!(p3, p1);
        // Ids are dense and distinct from the start.
        let ids: BTreeSet<u32> = p1.backends.iter().map(|b| b.id).collect();
        assert_eq!(ids, (0..4).collect());
        assert_eq!(
            vip_ids(&p1).into_values().collect::<BTreeSet<_>>(),
            (0..2).collect()
        );
    }

    #[test]
    fn plan_next_reuses_unchanged_tables_and_equals_a_full_plan() {
        let s1 = two_vips();
        let p1 = first(&s1);
        let mut s2 = s1.clone();
        s2.vips[1].backends[0].weight += 7;
        s2.vips.push(vip(
            "192.0.2.99",
            53,
            Protocol::Udp,
            vec![backend("10.0.9.1", 1), backend("10.0.9.2", 3)],
        ));
        let full = plan(&s2, &p1.allocator).unwrap();
        let next = plan_next(&s2, &p1).unwrap();
        assert_eq!(next, full);
        // The unchanged VIP's table came from p1, the changed one is new.
        assert_eq!(next.vips[0].ring_digest, p1.vips[0].ring_digest);
        assert_ne!(next.vips[1].ring_digest, p1.vips[1].ring_digest);
        // A seed change rebuilds everything.
        let mut s3 = s2.clone();
        s3.hash_seed ^= 1;
        let next3 = plan_next(&s3, &next).unwrap();
        assert_eq!(next3, plan(&s3, &next.allocator).unwrap());
        assert_ne!(next3.vips[0].ring_digest, next.vips[0].ring_digest);
    }

    #[test]
    fn adding_a_vip_or_a_backend_keeps_existing_ids() {
        let s1 = two_vips();
        let p1 = first(&s1);
        let mut s2 = s1.clone();
        // A new backend in VIP A, and a new VIP listed *first*.
        s2.vips[0].backends.insert(0, backend("10.0.0.3", 5));
        s2.vips.insert(
            0,
            vip("192.0.2.9", 25, Protocol::Tcp, vec![backend("10.0.9.1", 1)]),
        );
        let p2 = plan(&s2, &p1.allocator).unwrap();

        let (before, after) = (backend_ids(&p1), backend_ids(&p2));
        for (k, v) in &before {
            assert_eq!(
                after.get(k),
                Some(v),
                "backend {k:?} changed id or generation"
            );
        }
        let (vb, va) = (vip_ids(&p1), vip_ids(&p2));
        for (k, v) in &vb {
            assert_eq!(va.get(k), Some(v), "VIP {k} changed id");
        }
        // The newcomers got fresh ids, distinct from every existing one.
        let old: BTreeSet<u32> = before.values().map(|v| v.0).collect();
        let new_ids: Vec<u32> = after
            .iter()
            .filter(|(k, _)| !before.contains_key(k))
            .map(|(_, v)| v.0)
            .collect();
        assert_eq!(new_ids.len(), 2);
        assert!(new_ids.iter().all(|id| !old.contains(id)), "{new_ids:?}");
        assert_eq!(after.len(), new_ids.len() + before.len());
        let new_vip = find_vip(&p2, "192.0.2.9", 25).meta.vip_id;
        assert!(!vb.values().any(|&id| id == new_vip));
        // The untouched VIP's ring is unchanged; the changed one refers to
        // the new backend.
        assert_eq!(
            find_vip(&p2, "2001:db8::1", 443).ring,
            find_vip(&p1, "2001:db8::1", 443).ring
        );
        let new_b = find_backend(&p2, 80, "10.0.0.3").id;
        assert!(find_vip(&p2, "192.0.2.1", 80).ring.contains(&new_b));
    }

    #[test]
    fn removed_backend_id_is_quarantined_for_one_plan_then_reused_with_new_generation() {
        let vip_with = |addrs: &[&str]| {
            spec(vec![vip(
                "192.0.2.1",
                80,
                Protocol::Tcp,
                addrs.iter().map(|a| backend(a, 1)).collect(),
            )])
        };
        let p1 = first(&vip_with(&["10.0.0.1", "10.0.0.2"]));
        let old = find_backend(&p1, 80, "10.0.0.1").clone();
        assert_eq!((old.id, old.entry.generation), (0, 1));

        // Plan 2 drops .1 and adds .3: the tables of plan 1, live while plan
        // 2 is written, still name .1's id, so .3 must not get it.
        let p2 = plan(&vip_with(&["10.0.0.2", "10.0.0.3"]), &p1.allocator).unwrap();
        let b3 = find_backend(&p2, 80, "10.0.0.3");
        assert_ne!(b3.id, old.id);
        assert!(!p2.backends.iter().any(|b| b.id == old.id));
        assert!(!find_vip(&p2, "192.0.2.1", 80).ring.contains(&old.id));

        // Plan 3 adds .4: plan 1's tables are gone, the id may be reused;
        // the generation differs, so connection entries of .1 miss.
        let p3 = plan(
            &vip_with(&["10.0.0.2", "10.0.0.3", "10.0.0.4"]),
            &p2.allocator,
        )
        .unwrap();
        let b4 = find_backend(&p3, 80, "10.0.0.4");
        assert_eq!(b4.id, old.id, "quarantined id not reused after one plan");
        assert_ne!(b4.entry.generation, old.entry.generation);
        assert_eq!(b4.entry.generation, 2);
        // The survivors keep theirs.
        assert_eq!(
            find_backend(&p3, 80, "10.0.0.2"),
            find_backend(&p2, 80, "10.0.0.2")
        );
    }

    #[test]
    fn removed_vip_id_is_quarantined_for_one_plan() {
        let a = vip("192.0.2.1", 80, Protocol::Tcp, vec![backend("10.0.0.1", 1)]);
        let b = vip("192.0.2.2", 80, Protocol::Tcp, vec![backend("10.0.0.1", 1)]);
        let c = vip("192.0.2.3", 80, Protocol::Tcp, vec![backend("10.0.0.1", 1)]);
        let p1 = first(&spec(vec![a.clone()]));
        let p2 = plan(&spec(vec![b.clone()]), &p1.allocator).unwrap();
        assert_ne!(p2.vips[0].meta.vip_id, p1.vips[0].meta.vip_id);
        let p3 = plan(&spec(vec![b, c]), &p2.allocator).unwrap();
        assert_eq!(
            find_vip(&p3, "192.0.2.3", 80).meta.vip_id,
            p1.vips[0].meta.vip_id
        );
    }

    #[test]
    fn a_full_vip_table_accepts_a_replacement_after_removal() {
        // 256 VIPs; remove one (applied); then add another: the freed id
        // must be usable, not stuck in quarantine forever.
        let vips: Vec<VipSpec> = (0..MAX_VIPS)
            .map(|i| VipSpec {
                table_size: 2,
                ..vip("192.0.2.1", 1000 + i as u16, Protocol::Udp, vec![])
            })
            .collect();
        let p1 = first(&spec(vips.clone()));
        let p2 = plan(&spec(vips[1..].to_vec()), &p1.allocator).unwrap();
        let mut replaced = vips[1..].to_vec();
        replaced.push(VipSpec {
            table_size: 2,
            ..vip("192.0.2.2", 80, Protocol::Udp, vec![])
        });
        let p3 = plan(&spec(replaced), &p2.allocator).expect("the removed VIP's id is free again");
        assert_eq!(
            find_vip(&p3, "192.0.2.2", 80).meta.vip_id,
            p1.vips[0].meta.vip_id
        );
    }

    // ---- keys, flags, aliases ----

    #[test]
    fn vip_key_encoding_v4() {
        let p = first(&spec(vec![vip(
            "192.0.2.10",
            8080,
            Protocol::Tcp,
            vec![backend("10.0.0.1", 1)],
        )]));
        let key = p.vips[0].key;
        // Wire order: the words' native bytes are the packet's bytes.
        assert_eq!(key.addr[0].to_ne_bytes(), [192, 0, 2, 10]);
        assert_eq!(key.addr[1..], [0, 0, 0]);
        assert_eq!(key.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(key.proto, PROTO_TCP);
        assert_eq!(key.family, FAMILY_V4);
        assert_eq!((key.addr, key.family), wire_address(ip("192.0.2.10")));
        assert_eq!(key.port, port_wire(8080));
    }

    #[test]
    fn vip_key_encoding_v6() {
        let addr = "2001:db8:aa:bb:cc:dd:ee:ff";
        let p = first(&spec(vec![vip(
            addr,
            443,
            Protocol::Udp,
            vec![backend("2001:db8::1", 1)],
        )]));
        let key = p.vips[0].key;
        let bytes: Vec<u8> = key.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, addr.parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(key.port.to_ne_bytes(), [0x01, 0xbb]);
        assert_eq!(key.proto, PROTO_UDP);
        assert_eq!(key.family, FAMILY_V6);
        assert_eq!((key.addr, key.family), wire_address(ip(addr)));
        assert_eq!(key.port, port_wire(443));
        // The backend entry uses the same encoding.
        let b = &p.backends[0].entry;
        assert_eq!((b.addr, b.family), wire_address(ip("2001:db8::1")));
    }

    #[test]
    fn fragment_aliases_one_per_address_and_protocol() {
        let b = || vec![backend("10.0.0.1", 1)];
        let s = spec(vec![
            vip("192.0.2.1", 443, Protocol::Tcp, b()),
            VipSpec {
                table_size: 101,
                ..vip("192.0.2.1", 80, Protocol::Tcp, b())
            },
            vip("192.0.2.1", 8080, Protocol::Tcp, b()),
            VipSpec {
                hash: HashMode::SourceAddress,
                ..vip("192.0.2.1", 53, Protocol::Udp, b())
            },
            vip("192.0.2.1", 5353, Protocol::Udp, b()),
            vip("192.0.2.2", 80, Protocol::Tcp, b()),
            vip(
                "2001:db8::1",
                443,
                Protocol::Tcp,
                vec![backend("2001:db8:1::1", 1)],
            ),
        ]);
        let p = first(&s);
        assert_eq!(p.aliases.len(), 4, "{:?}", p.aliases);
        let expect = [
            ("192.0.2.1", 80),
            ("192.0.2.1", 53),
            ("192.0.2.2", 80),
            ("2001:db8::1", 443),
        ];
        for (addr, port) in expect {
            let target = find_vip(&p, addr, port);
            let (key, meta) = p
                .aliases
                .iter()
                .find(|(k, _)| k.addr == target.key.addr && k.proto == target.key.proto)
                .unwrap_or_else(|| panic!("no alias for {addr}/{}", target.vip.protocol));
            assert_eq!(key.port, 0);
            assert_eq!(key.family, target.key.family);
            assert_ne!(meta.flags & VIP_F_FRAG_ALIAS, 0);
            assert_eq!(meta.flags, target.meta.flags | VIP_F_FRAG_ALIAS);
            assert_eq!(meta.vip_id, target.meta.vip_id);
            assert_eq!(meta.ring_size, target.meta.ring_size);
        }
        assert_eq!(find_vip(&p, "192.0.2.1", 80).meta.ring_size, 101);
        // Real VIPs never carry the alias flag and never use port 0.
        assert!(
            p.vips
                .iter()
                .all(|v| v.meta.flags & VIP_F_FRAG_ALIAS == 0 && v.key.port != 0)
        );
        // The lowest port wins whatever the config order.
        let mut reversed = s.clone();
        reversed.vips.reverse();
        let q = first(&reversed);
        for (key, meta) in &q.aliases {
            let target = q
                .vips
                .iter()
                .find(|v| v.meta.vip_id == meta.vip_id)
                .unwrap();
            let lowest = q
                .vips
                .iter()
                .filter(|v| v.key.addr == key.addr && v.key.proto == key.proto)
                .map(|v| v.vip.port)
                .min();
            assert_eq!(Some(target.vip.port), lowest);
        }
    }

    #[test]
    fn vip_flags_follow_mode_and_hash() {
        let b = || vec![backend("10.0.0.1", 1)];
        let s = spec(vec![
            vip("192.0.2.1", 1, Protocol::Tcp, b()),
            VipSpec {
                mode: ForwardingMode::Ipip,
                ..vip("192.0.2.1", 2, Protocol::Tcp, b())
            },
            VipSpec {
                hash: HashMode::SourceAddress,
                ..vip("192.0.2.1", 3, Protocol::Tcp, b())
            },
            VipSpec {
                mode: ForwardingMode::Ipip,
                hash: HashMode::SourceAddress,
                ..vip("192.0.2.1", 4, Protocol::Tcp, b())
            },
        ]);
        let p = first(&s);
        let flags: Vec<u32> = (1..=4)
            .map(|port| find_vip(&p, "192.0.2.1", port).meta.flags)
            .collect();
        assert_eq!(
            flags,
            [
                0,
                VIP_F_IPIP,
                VIP_F_SRC_AFFINITY,
                VIP_F_IPIP | VIP_F_SRC_AFFINITY
            ]
        );
    }

    // ---- backends and rings ----

    #[test]
    fn drain_and_down_backends() {
        let s = spec(vec![vip(
            "192.0.2.1",
            80,
            Protocol::Tcp,
            vec![
                backend("10.0.0.1", 1),
                with_state(backend("10.0.0.2", 5), BackendState::Drain),
                BackendSpec {
                    mac: None,
                    ..with_state(backend("10.0.0.3", 5), BackendState::Down)
                },
            ],
        )]);
        let p = first(&s);
        let ring = &find_vip(&p, "192.0.2.1", 80).ring;
        let (active, drain, down) = (
            find_backend(&p, 80, "10.0.0.1"),
            find_backend(&p, 80, "10.0.0.2"),
            find_backend(&p, 80, "10.0.0.3"),
        );
        // Only the active backend is in the table.
        assert!(ring.iter().all(|&s| s == active.id));
        // Drain keeps its established flows: the entry stays active.
        assert_eq!(drain.entry.flags, BACKEND_F_ACTIVE);
        assert_eq!(drain.state, BackendState::Drain);
        assert_eq!(drain.weight, 5, "the configured weight is reported");
        assert_eq!(drain.entry.mac, [2, 0, 0, 0, 0, 2]);
        // Down receives nothing: not in the table, entry inactive.
        assert_eq!(down.entry.flags, 0);
        assert_eq!(active.entry.flags, BACKEND_F_ACTIVE);
        // Every backend entry names its VIP.
        let vip_id = p.vips[0].meta.vip_id;
        assert!(p.backends.iter().all(|b| b.entry.vip_id == vip_id));

        // No active backend at all: every slot is BACKEND_NONE.
        let mut all_out = s.clone();
        all_out.vips[0].backends[0].state = BackendState::Drain;
        let p = first(&all_out);
        assert!(p.vips[0].ring.iter().all(|&s| s == BACKEND_NONE));
        assert_eq!(p.vips[0].ring.len(), SMALL as usize);
    }

    #[test]
    fn ring_holds_active_backends_in_weight_proportion() {
        let weights = [1u32, 2, 3, 10, 7];
        let mut backends: Vec<BackendSpec> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| backend(&format!("10.0.1.{}", i + 1), w))
            .collect();
        backends.push(with_state(backend("10.0.1.100", 50), BackendState::Drain));
        backends.push(with_state(backend("10.0.1.101", 50), BackendState::Down));
        let v = VipSpec {
            table_size: 65537,
            ..vip("192.0.2.1", 80, Protocol::Tcp, backends)
        };
        let p = first(&spec(vec![v]));
        let planned = &p.vips[0];
        assert_eq!(planned.ring.len(), 65537);
        assert_eq!(planned.meta.ring_size, 65537);
        assert_eq!(
            planned.ring_digest,
            crate::maglev::table_digest(&planned.ring)
        );
        let counts = slot_counts(&planned.ring);
        let active: BTreeMap<u32, u32> = p
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .map(|b| (b.id, b.weight))
            .collect();
        // Every slot is an active backend of this VIP.
        assert!(
            counts.keys().all(|id| active.contains_key(id)),
            "{counts:?}"
        );
        let total: u32 = weights.iter().sum();
        for (id, w) in &active {
            let share = counts.get(id).copied().unwrap_or(0) as f64 / 65537.0;
            let want = f64::from(*w) / f64::from(total);
            assert!(
                (share - want).abs() <= 0.01 * want,
                "id {id} weight {w}: share {share}, want {want}"
            );
        }
    }

    #[test]
    fn rings_resolve_to_the_same_backends_whatever_the_config_order() {
        // Two nodes, same config, backends listed in different orders (so
        // possibly other ids): each slot must lead to the same address.
        let backends: Vec<BackendSpec> = (1..=6)
            .map(|i| backend(&format!("10.0.2.{i}"), i))
            .collect();
        let mut reversed = backends.clone();
        reversed.reverse();
        let a = first(&spec(vec![vip("192.0.2.1", 80, Protocol::Tcp, backends)]));
        let b = first(&spec(vec![vip("192.0.2.1", 80, Protocol::Tcp, reversed)]));
        let addr_of = |p: &MapPlan| -> BTreeMap<u32, IpAddr> {
            p.backends.iter().map(|b| (b.id, b.address)).collect()
        };
        let (ma, mb) = (addr_of(&a), addr_of(&b));
        let ra: Vec<IpAddr> = a.vips[0].ring.iter().map(|id| ma[id]).collect();
        let rb: Vec<IpAddr> = b.vips[0].ring.iter().map(|id| mb[id]).collect();
        assert_eq!(ra, rb);
    }

    // ---- errors ----

    #[test]
    fn errors() {
        let ok = || vip("192.0.2.1", 80, Protocol::Tcp, vec![backend("10.0.0.1", 1)]);
        let err = |vips: Vec<VipSpec>| plan(&spec(vips), &IdAllocator::default()).unwrap_err();

        assert!(matches!(
            err(vec![ok(), ok()]),
            PlanError::DuplicateVip { .. }
        ));
        // Same address and port, other protocol: not a duplicate.
        assert!(
            plan(
                &spec(vec![
                    ok(),
                    VipSpec {
                        protocol: Protocol::Udp,
                        ..ok()
                    }
                ]),
                &IdAllocator::default()
            )
            .is_ok()
        );

        assert!(matches!(
            err(vec![VipSpec { port: 0, ..ok() }]),
            PlanError::PortZero { .. }
        ));

        let mismatch = VipSpec {
            mode: ForwardingMode::Ipip,
            backends: vec![backend("10.0.0.1", 1), backend("2001:db8::5", 1)],
            ..ok()
        };
        assert!(matches!(
            err(vec![mismatch]),
            PlanError::FamilyMismatch { backend, .. } if backend == ip("2001:db8::5")
        ));
        // ipip needs no MAC; dsr with mixed families is not an ipip error.
        let ipip = VipSpec {
            mode: ForwardingMode::Ipip,
            backends: vec![BackendSpec {
                mac: None,
                ..backend("10.0.0.1", 1)
            }],
            ..ok()
        };
        assert!(plan(&spec(vec![ipip]), &IdAllocator::default()).is_ok());

        let no_mac = |state| VipSpec {
            backends: vec![
                backend("10.0.0.1", 1),
                BackendSpec {
                    mac: None,
                    state,
                    ..backend("10.0.0.2", 1)
                },
            ],
            ..ok()
        };
        assert!(matches!(
            err(vec![no_mac(BackendState::Active)]),
            PlanError::MissingMac { backend, .. } if backend == ip("10.0.0.2")
        ));
        assert!(matches!(
            err(vec![no_mac(BackendState::Drain)]),
            PlanError::MissingMac { .. }
        ));
        assert!(
            plan(
                &spec(vec![no_mac(BackendState::Down)]),
                &IdAllocator::default()
            )
            .is_ok()
        );

        // 65539 is the next prime above the maximum.
        assert!(matches!(
            err(vec![VipSpec {
                table_size: MAX_RING_SIZE + 2,
                ..ok()
            }]),
            PlanError::TableTooLarge {
                size: 65539,
                max: MAX_RING_SIZE,
                ..
            }
        ));
        assert!(
            plan(
                &spec(vec![VipSpec {
                    table_size: MAX_RING_SIZE,
                    ..ok()
                }]),
                &IdAllocator::default()
            )
            .is_ok()
        );
        assert!(matches!(
            err(vec![VipSpec {
                table_size: 1000,
                ..ok()
            }]),
            PlanError::Maglev { .. }
        ));
        // A backend listed twice.
        let twice = VipSpec {
            backends: vec![backend("10.0.0.1", 1), backend("10.0.0.1", 2)],
            ..ok()
        };
        assert!(matches!(err(vec![twice]), PlanError::Maglev { .. }));
    }

    #[test]
    fn too_many_vips() {
        let many = |n: u32| -> Vec<VipSpec> {
            (0..n)
                .map(|i| VipSpec {
                    table_size: 2,
                    ..vip("192.0.2.1", 1 + i as u16, Protocol::Tcp, vec![])
                })
                .collect()
        };
        let p = first(&spec(many(MAX_VIPS)));
        assert_eq!(p.vips.len(), MAX_VIPS as usize);
        let e = plan(&spec(many(MAX_VIPS + 1)), &IdAllocator::default()).unwrap_err();
        assert!(
            matches!(e, PlanError::TooManyVips { vip, max: MAX_VIPS } if vip.port == 1 + MAX_VIPS as u16),
            "{e:?}"
        );
    }

    // ---- global config ----

    /// The outer source the data path derives from a flow hash `h`.
    fn outer_v4(g: &lb_common::GlobalConfig, h: u32) -> Ipv4Addr {
        Ipv4Addr::from(
            ((g.ipip_src_v4 & !g.ipip_src_v4_mask) | (h & g.ipip_src_v4_mask)).to_ne_bytes(),
        )
    }

    fn outer_v6(g: &lb_common::GlobalConfig, h: u32) -> Ipv6Addr {
        let mut w = g.ipip_src_v6;
        w[3] = (w[3] & !g.ipip_src_v6_mask) | (h & g.ipip_src_v6_mask);
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap())
    }

    /// Hash values to try: spread over all bits.
    fn hashes() -> impl Iterator<Item = u32> {
        (0..4096u32).map(|i| i.wrapping_mul(0x9e37_79b9) ^ (i << 7))
    }

    #[test]
    fn global_config_copies_seed_and_generation() {
        let mut s = two_vips();
        s.hash_seed = 0xfeed_f00d;
        s.generation = 0x1_0000_0042;
        let g = first(&s).global;
        assert_eq!(g.hash_seed, 0xfeed_f00d);
        assert_eq!(g.config_generation, 0x1_0000_0042);
        // No prefixes configured: nothing set.
        assert_eq!(
            (
                g.ipip_src_v4,
                g.ipip_src_v4_mask,
                g.ipip_src_v6,
                g.ipip_src_v6_mask
            ),
            (0, 0, [0; 4], 0)
        );
    }

    #[test]
    fn ipip_source_v4_prefix_and_mask() {
        let mut s = two_vips();
        for (prefix, len, fixed_octets) in [
            ([198, 19, 255, 0], 24, 3),
            ([198, 19, 255, 77], 24, 3), // host bits in the config are ignored
            ([10, 20, 0, 0], 16, 2),
            ([203, 0, 113, 9], 32, 4),
        ] {
            s.ipip_source_v4 = Some(Ipv4Prefix {
                addr: Ipv4Addr::from(prefix),
                len,
            });
            let g = first(&s).global;
            assert_eq!(
                g.ipip_src_v4.to_ne_bytes(),
                prefix,
                "prefix is in wire order"
            );
            let mut mask_bytes = [0u8; 4];
            mask_bytes[fixed_octets..].fill(0xff);
            assert_eq!(g.ipip_src_v4_mask.to_ne_bytes(), mask_bytes, "/{len}");
            let mut varied = BTreeSet::new();
            for h in hashes() {
                let o = outer_v4(&g, h).octets();
                assert_eq!(
                    o[..fixed_octets],
                    prefix[..fixed_octets],
                    "/{len}, h {h:#x}"
                );
                // The host bits come straight from the hash's wire bytes.
                assert_eq!(o[fixed_octets..], h.to_ne_bytes()[fixed_octets..]);
                varied.insert(o);
            }
            let expected = if len == 32 {
                1
            } else {
                256.min(1 << (32 - len))
            };
            assert!(
                varied.len() >= expected,
                "/{len}: only {} sources",
                varied.len()
            );
        }
        // 198.19.255.0/24 really yields 198.19.255.x.
        s.ipip_source_v4 = Some(Ipv4Prefix {
            addr: Ipv4Addr::new(198, 19, 255, 0),
            len: 24,
        });
        let g = first(&s).global;
        assert_eq!(
            outer_v4(&g, u32::from_ne_bytes([1, 2, 3, 42])),
            Ipv4Addr::new(198, 19, 255, 42)
        );
        assert_eq!(
            outer_v4(&g, u32::from_ne_bytes([0xff, 0xff, 0xff, 7])),
            Ipv4Addr::new(198, 19, 255, 7)
        );
    }

    #[test]
    fn ipip_source_v6_prefix_and_mask() {
        let mut s = two_vips();
        let base: Ipv6Addr = "2001:db8:ffff:1::".parse().unwrap();
        // (len, fixed bytes); lengths below 96 are treated as /96.
        for (len, fixed) in [(96u8, 12usize), (112, 14), (120, 15), (128, 16), (64, 12)] {
            s.ipip_source_v6 = Some(Ipv6Prefix { addr: base, len });
            let g = first(&s).global;
            assert_eq!(g.ipip_src_v6, wire_address(IpAddr::V6(base)).0);
            let mut mask_bytes = [0u8; 4];
            mask_bytes[fixed - 12..].fill(0xff);
            assert_eq!(g.ipip_src_v6_mask.to_ne_bytes(), mask_bytes, "/{len}");
            let mut varied = BTreeSet::new();
            for h in hashes() {
                let o = outer_v6(&g, h).octets();
                assert_eq!(o[..fixed], base.octets()[..fixed], "/{len}, h {h:#x}");
                assert_eq!(o[fixed..], h.to_ne_bytes()[fixed - 12..]);
                varied.insert(o);
            }
            // A /128 has one source; any shorter prefix at least 256.
            let expected = if fixed == 16 { 1 } else { 256 };
            assert!(
                varied.len() >= expected,
                "/{len}: only {} sources",
                varied.len()
            );
        }
        s.ipip_source_v6 = Some(Ipv6Prefix {
            addr: "2001:db8::".parse().unwrap(),
            len: 96,
        });
        let g = first(&s).global;
        assert_eq!(
            outer_v6(&g, u32::from_ne_bytes([0xc0, 0, 2, 1])),
            "2001:db8::c000:201".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn fleet_digest_is_equal_across_nodes_with_different_id_histories() {
        use crate::model::{BackendSpec, MacAddr, Protocol, VipSpec};
        let backend = |i: u8| BackendSpec {
            address: IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 2, i)),
            weight: 10,
            mac: Some(MacAddr([2, 0, 0, 0, 0, i])),
            state: BackendState::Active,
        };
        let vip = |backends: Vec<BackendSpec>| VipSpec {
            address: IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 10)),
            port: 80,
            protocol: Protocol::Tcp,
            mode: ForwardingMode::Dsr,
            hash: HashMode::FiveTuple,
            table_size: 65537,
            backends,
        };
        let spec = |backends| DataplaneSpec {
            hash_seed: 7,
            vips: vec![vip(backends)],
            ..DataplaneSpec::default()
        };
        // Node A was configured with backends 1..=3 directly; node B first had
        // 9 and 8, which took the low ids, then the same final config.
        let a = plan(
            &spec(vec![backend(1), backend(2), backend(3)]),
            &IdAllocator::default(),
        )
        .unwrap();
        let b0 = plan(&spec(vec![backend(9), backend(8)]), &IdAllocator::default()).unwrap();
        let b1 = plan(
            &spec(vec![backend(3), backend(2), backend(1)]),
            &b0.allocator,
        )
        .unwrap();
        let b = plan(
            &spec(vec![backend(3), backend(2), backend(1)]),
            &b1.allocator,
        )
        .unwrap();
        assert_ne!(
            a.vips[0].ring, b.vips[0].ring,
            "ids differ between the nodes"
        );
        assert_eq!(a.vips[0].fleet_digest, b.vips[0].fleet_digest);
        let c = plan(
            &spec(vec![backend(1), backend(2), backend(4)]),
            &IdAllocator::default(),
        )
        .unwrap();
        assert_ne!(a.vips[0].fleet_digest, c.vips[0].fleet_digest);
    }
}
