//! Backend selection: the connection table for established flows, the
//! VIP's Maglev lookup table for new ones.

use lb_common::{
    BACKEND_F_ACTIVE, Backend, ConnEntry, FlowKey, RING_CHUNK_SLOTS, STAT_CONN_HIT,
    STAT_CONN_INSERT_FAIL, STAT_CONN_MISS, STAT_CONN_STALE, STAT_DROP_NO_BACKEND,
    VIP_F_SRC_AFFINITY, VipMeta, flow_hash, ring_index, ring_slot,
};

use crate::{
    maps::{BACKENDS, CONN_TABLE, RING_LIVE, RINGS, count},
    outcome::Outcome,
};

/// The backend chosen for a packet.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub id: u32,
    /// The backend's entry in `BACKENDS` (array values stay in place for
    /// the program's run; read, never written, by the program).
    pub backend: &'static Backend,
    /// Chosen from the lookup table (not from a connection entry).
    pub new_flow: bool,
    /// `flow_hash` of the flow key, when choosing computed it (IP-in-IP
    /// reuses it for the outer source instead of hashing again).
    pub hash: Option<u32>,
}

/// Picks a backend from the VIP's lookup table by the flow hash of `key`.
#[inline(always)]
pub fn from_ring(meta: &VipMeta, key: &FlowKey, seed: u32) -> Result<Chosen, Outcome> {
    let ring_size = meta.ring_size;
    if ring_size == 0 {
        return Err(Outcome::drop(STAT_DROP_NO_BACKEND));
    }
    let affinity = meta.flags & VIP_F_SRC_AFFINITY != 0;
    let hash = if affinity {
        flow_hash(&key.affinity(), seed)
    } else {
        flow_hash(key, seed)
    };
    let slot = ring_slot(hash, ring_size);
    let live = RING_LIVE.get(meta.vip_id).copied().unwrap_or(0);
    let chunk = RINGS
        .get_value(ring_index(meta.vip_id, live), &(slot / RING_CHUNK_SLOTS))
        .ok_or(Outcome::drop(STAT_DROP_NO_BACKEND))?;
    let id = u32::from(chunk[(slot % RING_CHUNK_SLOTS) as usize]);
    // RING_SLOT_NONE (0xffff) is out of the array's range: a miss.
    let backend = BACKENDS
        .get(id)
        .ok_or(Outcome::drop(STAT_DROP_NO_BACKEND))?;
    if backend.flags & BACKEND_F_ACTIVE == 0 {
        return Err(Outcome::drop(STAT_DROP_NO_BACKEND));
    }
    Ok(Chosen {
        id,
        backend,
        new_flow: true,
        hash: if affinity { None } else { Some(hash) },
    })
}

/// The backend of an established flow, if its connection entry still names
/// a live backend of the same generation (a reused id never captures an
/// old flow).
#[inline(always)]
pub fn from_conn_table(key: &FlowKey) -> Option<Chosen> {
    let entry = CONN_TABLE.get_ptr(key)?;
    // SAFETY: the pointer came from a successful lookup; the value is copied
    // out at once (an LRU entry may be reused after this program returns).
    let entry = unsafe { *entry };
    match BACKENDS.get(entry.backend_id) {
        Some(b) if b.flags & BACKEND_F_ACTIVE != 0 && b.generation == entry.backend_generation => {
            count(STAT_CONN_HIT);
            Some(Chosen {
                id: entry.backend_id,
                backend: b,
                new_flow: false,
                hash: None,
            })
        }
        _ => {
            count(STAT_CONN_STALE);
            None
        }
    }
}

/// Established flow → its backend; otherwise a new pick that is recorded in
/// the connection table. A TCP SYN always takes a fresh pick: it starts a
/// new connection even when the 5-tuple is reused.
#[inline(always)]
pub fn for_flow(meta: &VipMeta, key: &FlowKey, seed: u32, syn: bool) -> Result<Chosen, Outcome> {
    if syn {
        // The SYN's entry (if any) is replaced, not used: this lookup only
        // starts loading the key's hash bucket (and chain), so that miss
        // overlaps the flow hash and the lookup-table read instead of
        // stalling the insert below. At the default sizes both are cache
        // misses; lb-bench A/B on the bench VM: ~30 ns less per new flow.
        let _ = CONN_TABLE.get_ptr(key);
    } else if let Some(chosen) = from_conn_table(key) {
        return Ok(chosen);
    }
    count(STAT_CONN_MISS);
    let chosen = from_ring(meta, key, seed)?;
    let entry = ConnEntry {
        backend_id: chosen.id,
        backend_generation: chosen.backend.generation,
    };
    if CONN_TABLE.insert(key, &entry, 0).is_err() {
        count(STAT_CONN_INSERT_FAIL);
    }
    Ok(chosen)
}

/// For packets that must follow an existing flow but never create one
/// (ICMP errors): the connection entry if any, else the lookup table.
#[inline(always)]
pub fn lookup_only(meta: &VipMeta, key: &FlowKey, seed: u32) -> Result<Chosen, Outcome> {
    match from_conn_table(key) {
        Some(chosen) => Ok(chosen),
        None => from_ring(meta, key, seed),
    }
}
