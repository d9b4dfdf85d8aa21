//! Backend selection: the connection table for established flows, the
//! VIP's Maglev lookup table for new ones.

use core::ptr::{read_volatile, write_volatile};

use lb_common::{
    BACKEND_F_ACTIVE, Backend, CONN_WAYS, ConnBucket, FlowWords, RING_CHUNK_SLOTS, STAT_CONN_HIT,
    STAT_CONN_INSERT_FAIL, STAT_CONN_MISS, STAT_CONN_STALE, STAT_DROP_NO_BACKEND,
    VIP_F_SRC_AFFINITY, VipMeta, conn_bucket, conn_hash, conn_tag, conn_way, flow_hash_words,
    ring_index, ring_slot, way_backend, way_generation_matches, way_tag,
};

use crate::{
    maps::{BACKENDS, CONN_TABLE, RING_LIVE, RINGS, conn_params, count},
    outcome::Outcome,
};

/// `Chosen::detail` of a packet without a detail counter (out of the
/// counters' range, so counting it counts nothing).
pub const NO_DETAIL: u32 = u32::MAX;

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
    /// The detail counter (`STAT_CONN_HIT`, `STAT_FRAGMENT`, `STAT_ICMP_PTB`)
    /// counted with the packet's traffic counters if it is sent (in
    /// `forward`); [`NO_DETAIL`] for none.
    pub detail: u32,
}

/// Picks a backend from the VIP's lookup table by the flow hash of `key`
/// (of its source address for a client-affinity VIP).
#[inline(always)]
pub fn from_ring(meta: &VipMeta, key: &FlowWords, seed: u32) -> Result<Chosen, Outcome> {
    let ring_size = meta.ring_size;
    if ring_size == 0 {
        return Err(Outcome::drop(STAT_DROP_NO_BACKEND));
    }
    let affinity = meta.flags & VIP_F_SRC_AFFINITY != 0;
    let hash = if affinity {
        flow_hash_words(&key.affinity(), seed)
    } else {
        flow_hash_words(key, seed)
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
        detail: NO_DETAIL,
    })
}

/// A flow's place in the connection table: its bucket, its tag, and the
/// way that holds its tag (`CONN_WAYS` when none does).
///
/// Every field has a value on every path (no `Option` around the slot):
/// for an undefined value (the payload of a `None`) the compiler may spill
/// any register, one a helper call just clobbered included, and the
/// verifier refuses to load a program that reads such a register
/// ("R1 !read_ok", met with the 32-bit ALU of BPF ISA v3).
struct Slot {
    /// Null only if the bucket index is outside the table (a loader fault:
    /// a bucket mask that does not fit the table; the flow is then not
    /// pinned).
    bucket: *mut ConnBucket,
    tag: u32,
    way: usize,
    /// The way's value when `way < CONN_WAYS`.
    value: u64,
}

impl Slot {
    /// Finds the bucket of the flow `key` and, in it, the way holding the
    /// flow's tag.
    #[inline(always)]
    fn find(key: &FlowWords) -> Self {
        let mut slot = Self {
            bucket: core::ptr::null_mut(),
            tag: 0,
            way: CONN_WAYS,
            value: 0,
        };
        let (secret, bucket_mask) = conn_params();
        let hash = conn_hash(key, secret);
        let Some(bucket) = CONN_TABLE.get_ptr_mut(conn_bucket(hash, bucket_mask)) else {
            return slot;
        };
        slot.bucket = bucket;
        slot.tag = conn_tag(hash);
        for i in 0..CONN_WAYS {
            // SAFETY: `bucket` points at a map value of CONN_WAYS u64s; a
            // way is read whole (one aligned 8-byte load).
            let w = unsafe { read_volatile(&raw const (*bucket)[i]) };
            if way_tag(w) == slot.tag {
                slot.way = i;
                slot.value = w;
                break;
            }
        }
        slot
    }

    /// Whether a way holds the flow's tag.
    #[inline(always)]
    fn has_entry(&self) -> bool {
        self.way < CONN_WAYS
    }

    /// The backend of the way holding the flow's tag, if there is one and
    /// it passes [`entry_backend`]'s checks.
    #[inline(always)]
    fn backend(&self, key: &FlowWords) -> Option<Chosen> {
        if !self.has_entry() {
            return None;
        }
        entry_backend(self.value, key)
    }

    /// Puts `value` in the bucket's first way, moving the ways in front of
    /// this flow's (all of them if it has none, dropping the last) back by
    /// one: the bucket stays in most-recently-used order.
    ///
    /// The flow's way is found again by its tag rather than by `self.way`:
    /// with the index, the compiler specialises the moves for every way
    /// the lookup can end at and keeps those flags on the stack across the
    /// counter updates, a dozen stores on every packet.
    #[inline(always)]
    fn put_front(&self, value: u64) {
        let b = self.bucket;
        let mut carry = value;
        for j in 0..CONN_WAYS {
            // SAFETY: in-bounds ways of the bucket; whole-way accesses.
            let w = unsafe { read_volatile(&raw const (*b)[j]) };
            // SAFETY: as above.
            unsafe { write_volatile(&raw mut (*b)[j], carry) };
            if way_tag(w) == self.tag {
                break;
            }
            carry = w;
        }
    }
}

/// The backend a connection-table way names, if it is still active with
/// the way's generation (a reused id never captures an old flow) and
/// serves the VIP the flow `key` is addressed to (a tag shared with another
/// flow never moves a packet to another VIP, or captures one that is not
/// for a VIP).
#[inline(always)]
fn entry_backend(way: u64, key: &FlowWords) -> Option<Chosen> {
    let id = way_backend(way);
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_F_ACTIVE != 0
        && way_generation_matches(way, b.generation)
        && b.vip.matches(key)
    {
        Some(Chosen {
            id,
            backend: b,
            new_flow: false,
            hash: None,
            detail: STAT_CONN_HIT,
        })
    } else {
        None
    }
}

/// A flow's place in the connection table.
pub struct Conn(Slot);

impl Conn {
    #[inline(always)]
    pub fn find(key: &FlowWords) -> Self {
        Self(Slot::find(key))
    }

    /// The backend of an established flow, found without the VIP index:
    /// the entry's backend carries its VIP's key. `None` for a flow without
    /// a (valid) entry, which then goes through [`Conn::new_flow`].
    #[inline(always)]
    pub fn established(&self, key: &FlowWords) -> Option<Chosen> {
        let slot = &self.0;
        let chosen = slot.backend(key)?;
        if slot.way != 0 {
            slot.put_front(slot.value);
        }
        Some(chosen)
    }

    /// A new pick from the VIP's lookup table, recorded in the connection
    /// table. For a packet that is not a SYN, an entry that names the flow
    /// here failed [`Conn::established`]'s checks: it is counted stale.
    #[inline(always)]
    pub fn new_flow(
        &self,
        meta: &VipMeta,
        key: &FlowWords,
        seed: u32,
        syn: bool,
    ) -> Result<Chosen, Outcome> {
        let slot = &self.0;
        if slot.bucket.is_null() {
            count(STAT_CONN_INSERT_FAIL);
            return from_ring(meta, key, seed);
        }
        if !syn && slot.has_entry() {
            count(STAT_CONN_STALE);
        }
        let chosen = from_ring(meta, key, seed)?;
        count(STAT_CONN_MISS);
        slot.put_front(conn_way(slot.tag, chosen.id, chosen.backend.generation));
        Ok(chosen)
    }
}

/// For packets that must follow an existing flow but never create one
/// (ICMP errors): the connection entry if any, else the lookup table.
#[inline(always)]
pub fn lookup_only(meta: &VipMeta, key: &FlowWords, seed: u32) -> Result<Chosen, Outcome> {
    let slot = Slot::find(key);
    let found = if slot.has_entry() {
        let chosen = entry_backend(slot.value, key);
        if chosen.is_none() {
            count(STAT_CONN_STALE);
        }
        chosen
    } else {
        None
    };
    match found {
        Some(chosen) => Ok(chosen),
        None => from_ring(meta, key, seed),
    }
}
