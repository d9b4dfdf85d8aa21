//! Writing a plan into the maps in the order the module docs give, and
//! removing what a plan does not name.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::Instant,
};

use aya::{
    maps::{Array, ArrayOfMaps, MapData, MapError, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use lb_common::{
    BPF_F_MMAPABLE, Backend, GlobalConfig, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONFIG,
    MAP_RING_LIVE, MAP_RINGS, MAP_VIP_FILTER, MAP_VIP_FILTER_COPY, MAP_VIP_INDEX_LIVE,
    MAX_BACKENDS, RING_CHUNK_SLOTS, RING_CHUNKS, RING_SLOT_NONE, RingChunk, TrafficCounters,
    VIP_FILTER_WORDS, VipKey, VipMeta, ring_index, vip_index_half, vip_index_live,
};
use std::os::fd::{AsFd as _, AsRawFd as _};

use super::{
    Datapath, DatapathError,
    loaded::Loaded,
    map_err,
    sys::{self, Access, Mapping},
    vip_table::{build_vip_index, write_vip_index},
};
use crate::plan::{MapPlan, PlannedBackend};
impl Datapath {
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

    pub(super) fn write_plan(
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
    pub(super) fn write_backends(
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
    pub(super) fn write_vip_entries(
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
    pub(super) fn grace_period(&mut self) {
        sys::wait_for_readers();
        self.retired.clear();
        self.vip_switched = false;
    }

    /// Builds a VIP index table of `vip_entries`, writes it into the idle
    /// table (after a grace period if the index was switched since the
    /// last one) and switches `VIP_INDEX_LIVE` to it.
    pub(super) fn publish_vips(&mut self) -> Result<(), DatapathError> {
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
    pub(super) fn write_rings(
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
    pub(super) fn flip_tables(&mut self, flips: &[(u32, u32)]) -> Result<(), DatapathError> {
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
    pub(super) fn inner_ring(&self, index: u32) -> Result<Option<MapData>, DatapathError> {
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
    pub(super) fn swap_rings(&mut self, built: &[(u32, MapData)]) -> Result<(), DatapathError> {
        let map = self
            .loaded
            .ebpf
            .map(MAP_RINGS)
            .ok_or(DatapathError::MissingMap { name: MAP_RINGS })?;
        let aya::maps::Map::ArrayOfMaps(data) = map else {
            return Err(DatapathError::MissingMap { name: MAP_RINGS });
        };
        let keys: Vec<u32> = built.iter().map(|(k, _)| *k).collect();
        let values: Vec<u32> = built
            .iter()
            .map(|(_, m)| m.fd().as_fd().as_raw_fd() as u32)
            .collect();
        if matches!(sys::map_update_batch(data.fd().as_fd(), &keys, &values), Ok(n) if n == keys.len())
        {
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
    pub(super) fn write_filter(&mut self, words: &[u64]) -> Result<(), DatapathError> {
        let mut filter: Array<_, u64> = self.map_mut(MAP_VIP_FILTER)?;
        for (i, w) in words.iter().enumerate() {
            filter
                .set(i as u32, *w, 0)
                .map_err(map_err(MAP_VIP_FILTER))?;
        }
        write_filter_copy(&mut self.loaded, words)
    }
}

/// The VIP address filter as the program reads it: one value of
/// `VIP_FILTER_WORDS` words.
pub(super) type FilterCopy = [u64; VIP_FILTER_WORDS as usize];

/// Writes the program's copy of the VIP address filter (all words in one
/// update; a word the update does not change reads the same throughout).
pub(super) fn write_filter_copy(loaded: &mut Loaded, words: &[u64]) -> Result<(), DatapathError> {
    let mut value: FilterCopy = [0; VIP_FILTER_WORDS as usize];
    for (v, w) in value.iter_mut().zip(words) {
        *v = *w;
    }
    let mut copy: Array<_, FilterCopy> = loaded.map_mut(MAP_VIP_FILTER_COPY)?;
    copy.set(0, value, 0).map_err(map_err(MAP_VIP_FILTER_COPY))
}

/// The byte length of a lookup table's memory mapping: `RING_CHUNKS`
/// elements of 64 bytes (a multiple of 8, so no padding between elements),
/// rounded up to whole pages.
pub(super) fn ring_map_len() -> usize {
    let page = sys::page_size();
    (RING_CHUNKS as usize * size_of::<RingChunk>()).div_ceil(page) * page
}

/// A backend id as a lookup-table slot: ids are below `MAX_BACKENDS`
/// (asserted in `lb_common` to fit a `u16`); `BACKEND_NONE`, or anything
/// that could not be an id, becomes `RING_SLOT_NONE` (the data path then
/// finds no backend, as it would for `BACKEND_NONE`).
pub(super) fn slot_of(id: u32) -> u16 {
    if id < MAX_BACKENDS {
        id as u16
    } else {
        RING_SLOT_NONE
    }
}

/// Creates a lookup table as a memory-mappable array holding `ring`.
pub(super) fn new_ring(ring: &[u32]) -> Result<MapData, DatapathError> {
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
pub(super) fn fill_ring(table: &MapData, ring: &[u32]) -> Result<(), DatapathError> {
    let mut mapping = Mapping::new(table.fd().as_fd(), ring_map_len(), Access::ReadWrite)?;
    // Element `c`'s slots are u16 entries `32c .. 32c + 32` of the mapping,
    // so slot `s` is entry `s`.
    let slots = RING_CHUNKS as usize * RING_CHUNK_SLOTS as usize;
    let table: Vec<u16> = (0..slots)
        .map(|s| ring.get(s).map_or(RING_SLOT_NONE, |&id| slot_of(id)))
        .collect();
    mapping.write(0, &table)?;
    Ok(())
}

/// Forgets the kernel VIP entry `key` (deleted); see [`retire_if_unused`].
/// Returns whether there was one.
pub(super) fn unref(
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
pub(super) fn retire_if_unused(
    entries: &BTreeMap<VipKey, VipMeta>,
    live: &[u32],
    retired: &mut HashSet<u32>,
    vip_id: u32,
) {
    if !entries.values().any(|m| m.vip_id == vip_id) {
        retired.insert(ring_index(vip_id, live[vip_id as usize]));
    }
}
