//! The VIP index: a table of `VIP_INDEX_SLOTS` slots found by salted
//! hashing with bounded linear probing (the same probe sequence as
//! `lb-ebpf`'s `find_vip`), two halves in one memory-mapped array, one of
//! them live (`VIP_INDEX_LIVE`).

use std::{collections::BTreeMap, os::fd::AsFd as _};

use aya::maps::Array;
use lb_common::{
    MAP_VIP_INDEX, MAP_VIP_INDEX_LIVE, VIP_INDEX_PROBES, VIP_INDEX_SLOTS, VipKey, VipMeta, VipSlot,
    vip_index_half, vip_index_home, vip_index_probe, vip_slot,
};

use super::{
    DatapathError,
    loaded::Loaded,
    map_err,
    sys::{Access, Mapping},
};
/// Builds one VIP index table holding `entries`: the first salt with which
/// every key finds a free slot within `VIP_INDEX_PROBES` of its home.
pub(super) fn build_vip_index(
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
pub(super) fn vip_index_find(table: &[VipSlot], salt: u32, key: &VipKey) -> Option<VipMeta> {
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

/// Maps the whole `VIP_INDEX` (both tables).
fn map_vip_index(loaded: &Loaded, access: Access) -> Result<Mapping, DatapathError> {
    let Some(aya::maps::Map::Array(data)) = loaded.ebpf.map(MAP_VIP_INDEX) else {
        return Err(DatapathError::MissingMap {
            name: MAP_VIP_INDEX,
        });
    };
    // Exactly the map's size: 2 tables of 64-byte slots, whole pages.
    let len = 2 * VIP_INDEX_SLOTS as usize * size_of::<VipSlot>();
    Ok(Mapping::new(data.fd().as_fd(), len, access)?)
}

/// The first slot of table `half` (0 or 1) in a `VIP_INDEX` mapping.
fn table_start(half: u32) -> usize {
    (half & 1) as usize * VIP_INDEX_SLOTS as usize
}

/// The live `VIP_INDEX_LIVE` word and a copy of the live table.
pub(super) fn read_vip_index(loaded: &Loaded) -> Result<(u64, Vec<VipSlot>), DatapathError> {
    let live: Array<_, u64> = loaded.map(MAP_VIP_INDEX_LIVE)?;
    let word = live.get(&0, 0).map_err(map_err(MAP_VIP_INDEX_LIVE))?;
    let mapping = map_vip_index(loaded, Access::Read)?;
    let mut slots = vec![VipSlot::default(); VIP_INDEX_SLOTS as usize];
    mapping.read(table_start(vip_index_half(word)), &mut slots)?;
    Ok((word, slots))
}

/// Writes `table` into VIP index table `half` (which no program reads).
pub(super) fn write_vip_index(
    loaded: &Loaded,
    half: u32,
    table: &[VipSlot],
) -> Result<(), DatapathError> {
    assert_eq!(table.len(), VIP_INDEX_SLOTS as usize);
    let mut mapping = map_vip_index(loaded, Access::ReadWrite)?;
    mapping.write(table_start(half), table)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use lb_common::{MAX_VIP_KEYS, MAX_VIPS};

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
