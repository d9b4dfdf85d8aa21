//! The maps, one static each. Names, capacities and layouts come from
//! `lb-common`; userspace finds them by the same names.

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, DevMapHash, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    BPF_F_MMAPABLE, Backend, CONN_TABLE_CAPACITY, CONN_WAYS, ConnBucket, ConnParams,
    DECAP_STAT_COUNT, GlobalConfig, MAX_BACKENDS, MAX_RINGS, MAX_TX_PORTS, MAX_VIPS, RING_CHUNKS,
    RingChunk, STAT_COUNT, TrafficCounters, VIP_FILTER_WORDS, VIP_INDEX_SLOTS, VipSlot,
};

/// A VIP's lookup table: 32 slots per element (`u16` backend ids, see
/// `lb_common::RING_CHUNK_SLOTS`). Memory-mappable so userspace fills a
/// table with one copy. Each VIP id has two in [`RINGS`]: userspace fills
/// the idle one, then flips the VIP's [`RING_LIVE`] entry to it.
pub type Ring = Array<RingChunk, { RING_CHUNKS as usize }, { BPF_F_MMAPABLE as usize }>;

/// The VIPs: two open-addressing tables (see `lb_common::vip_index`);
/// memory-mappable only so that every slot is one aligned cache line.
#[btf_map]
pub static VIP_INDEX: Array<
    VipSlot,
    { 2 * VIP_INDEX_SLOTS as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Which `VIP_INDEX` table is live, and its salt (one `u64`).
#[btf_map]
pub static VIP_INDEX_LIVE: Array<u64, 1> = Array::new();

#[btf_map]
pub static RINGS: ArrayOfMaps<Ring, { MAX_RINGS as usize }> = ArrayOfMaps::new();

#[btf_map]
pub static RING_LIVE: Array<u32, { MAX_VIPS as usize }> = Array::new();

/// Memory-mappable only so that every entry is one aligned cache line.
#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

/// The connection table (see `lb_common::conn`); the loader sets its
/// size. Memory-mappable only so that the kernel page-aligns the values:
/// every bucket is then exactly one cache line.
#[btf_map]
pub static CONN_TABLE: Array<
    ConnBucket,
    { CONN_TABLE_CAPACITY as usize / CONN_WAYS },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

#[btf_map]
pub static CONN_PARAMS: Array<ConnParams, 1> = Array::new();

/// Bitmap of VIP addresses (see `lb_common::vip_filter_bit`): an array
/// lookup is inlined by the verifier, so traffic to other addresses passes
/// without paying for a hash lookup.
#[btf_map]
pub static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }> = Array::new();

#[btf_map]
pub static CONFIG: Array<GlobalConfig, 1> = Array::new();

#[btf_map]
pub static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

#[btf_map]
pub static STATS: PerCpuArray<u64, { STAT_COUNT as usize }> = PerCpuArray::new();

#[btf_map]
pub static VIP_STATS: PerCpuArray<TrafficCounters, { MAX_VIPS as usize }> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static DECAP_STATS: PerCpuArray<u64, { DECAP_STAT_COUNT as usize }> = PerCpuArray::new();

/// Adds one to a global counter.
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(c) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

/// Adds one packet of `bytes` to a per-VIP or per-backend counter.
#[inline(always)]
pub fn count_traffic<const N: usize>(
    map: &PerCpuArray<TrafficCounters, N>,
    id: u32,
    bytes: u64,
    new_flow: bool,
) {
    if let Some(c) = map.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// Frames seen by the live-frame benchmark sink (`bench_sink`).
#[btf_map]
pub static BENCH_COUNT: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Adds one to the benchmark sink counter.
#[inline(always)]
pub fn count_bench() {
    if let Some(c) = BENCH_COUNT.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
