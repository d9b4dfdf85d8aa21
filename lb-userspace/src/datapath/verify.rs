//! Reading the maps back: the live generation, the comparison of the
//! kernel's maps with a plan (used to adopt pinned maps), and the backend
//! generations an adopting agent must plan past.

use std::collections::{BTreeMap, HashSet};

use aya::maps::{Array, ArrayOfMaps, MapData, MapError};
use lb_common::{
    BACKEND_NONE, Backend, ConnParams, GlobalConfig, MAP_BACKENDS, MAP_CONFIG, MAP_CONN_PARAMS,
    MAP_RING_LIVE, MAP_RINGS, MAP_VIP_FILTER, MAP_VIP_FILTER_COPY, MAX_RING_SIZE, RING_SLOT_NONE,
    VIP_FILTER_WORDS, VipKey, VipMeta, ring_index, vip_index_salt,
};
use std::os::fd::AsFd as _;

use super::{
    Datapath, DatapathError,
    loaded::Loaded,
    map_err,
    sys::{Access, Mapping},
    vip_table::{read_vip_index, vip_index_find},
    write::{FilterCopy, ring_map_len},
};
use crate::plan::MapPlan;
impl Datapath {
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
}

/// The words of the VIP address filter's pinned record ([`MAP_VIP_FILTER`]).
pub(super) fn read_filter_record(loaded: &Loaded) -> Result<Vec<u64>, DatapathError> {
    let record: Array<_, u64> = loaded.map(MAP_VIP_FILTER)?;
    (0..VIP_FILTER_WORDS)
        .map(|i| record.get(&i, 0).map_err(map_err(MAP_VIP_FILTER)))
        .collect()
}

/// The program's copy of the VIP address filter ([`MAP_VIP_FILTER_COPY`]).
pub(super) fn read_filter_copy(loaded: &Loaded) -> Result<FilterCopy, DatapathError> {
    let copy: Array<_, FilterCopy> = loaded.map(MAP_VIP_FILTER_COPY)?;
    copy.get(&0, 0).map_err(map_err(MAP_VIP_FILTER_COPY))
}

/// Reads the first `len` slots of a lookup table (memory-mapped, read
/// only), with `RING_SLOT_NONE` read back as `BACKEND_NONE`.
pub(super) fn read_ring(inner: &MapData, len: usize) -> Result<Vec<u32>, DatapathError> {
    let mapping = Mapping::new(inner.fd().as_fd(), ring_map_len(), Access::Read)?;
    // Slot `s` is u16 entry `s` of the mapping (see `fill_ring`).
    let mut slots = vec![0u16; len.min(MAX_RING_SIZE as usize)];
    mapping.read(0, &mut slots)?;
    Ok(slots
        .into_iter()
        .map(|slot| match slot {
            RING_SLOT_NONE => BACKEND_NONE,
            id => u32::from(id),
        })
        .collect())
}
