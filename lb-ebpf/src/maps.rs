//! The maps, one static each. Names, capacities and layouts come from
//! `lb-common`; userspace finds them by the same names.

use aya_ebpf::{
    btf_maps::{Array, ArrayOfMaps, DevMapHash, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    BPF_F_MMAPABLE, Backend, CONN_TABLE_CAPACITY, CONN_WAYS, ConnBucket, ConnParams, Counters,
    DECAP_STAT_COUNT, GlobalConfig, MAX_BACKENDS, MAX_RINGS, MAX_TX_PORTS, MAX_VIPS, RING_CHUNKS,
    RingChunk, TrafficCounters, VIP_FILTER_WORDS, VIP_INDEX_SLOTS, VipSlot,
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

/// The connection table's parameters, kept with the pinned table. The
/// program does not read this map: it reads [`CONN_SECRET`] and
/// [`CONN_BUCKET_MASK`], which the loader sets from it.
#[btf_map]
pub static CONN_PARAMS: Array<ConnParams, 1> = Array::new();

/// Bitmap of VIP addresses (see `lb_common::vip_filter_bit`), kept with
/// the pinned maps. The program reads its own copy, [`VIP_FILTER_COPY`],
/// which userspace writes with it.
#[btf_map]
pub static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }> = Array::new();

#[btf_map]
pub static CONFIG: Array<GlobalConfig, 1> = Array::new();

#[btf_map]
pub static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

/// The global and the per-VIP counters (see `lb_common::Counters`).
#[btf_map]
pub static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficCounters, { MAX_BACKENDS as usize }> =
    PerCpuArray::new();

#[btf_map]
pub static DECAP_STATS: PerCpuArray<u64, { DECAP_STAT_COUNT as usize }> = PerCpuArray::new();

// Globals. A map lookup is a helper call to the compiler (the verifier
// inlines it, too late): the compiler spills every value that lives across
// it, and the key goes through the stack. A global is read in place
// (`ld_imm64` of its address, then a load): on the established-flow path
// that is about 25 instructions fewer, +0.7 points of the live-frame
// ceiling (A/B of 150 pairs, see the README).

/// `CONN_PARAMS.secret`, set by the loader before loading (`.rodata`, so
/// the verifier knows its value). Symbol name: `lb_common::GLOBAL_CONN_SECRET`.
#[unsafe(no_mangle)]
static CONN_SECRET: u64 = 0;

/// `CONN_PARAMS.bucket_mask`, set like [`CONN_SECRET`]. Symbol name:
/// `lb_common::GLOBAL_CONN_BUCKET_MASK`.
#[unsafe(no_mangle)]
static CONN_BUCKET_MASK: u32 = 0;

/// The program's copy of [`VIP_FILTER`], the only variable of `.bss`
/// (userspace writes it as the map `lb_common::MAP_VIP_FILTER_COPY`, one
/// value of `VIP_FILTER_WORDS` words, whenever it writes `VIP_FILTER`).
#[unsafe(no_mangle)]
static mut VIP_FILTER_COPY: [u64; VIP_FILTER_WORDS as usize] = [0; VIP_FILTER_WORDS as usize];

/// The MAC address of the interface the program is attached to, as
/// `lb_common::lb_mac_word` (`LB_MAC_UNSET` until userspace writes it), the
/// only variable of `.data` (the map `lb_common::MAP_LB_MAC`). A frame is
/// forwarded only if it is addressed to this MAC; the DSR source MAC is
/// then this MAC.
#[unsafe(no_mangle)]
static mut LB_MAC: u64 = lb_common::LB_MAC_UNSET;

/// Whether the frame (at least 8 bytes, which every caller has checked
/// through the Ethernet header) is addressed to this interface's MAC.
#[inline(always)]
pub fn addressed_to_us(ctx: &aya_ebpf::programs::XdpContext) -> bool {
    let Some(first) = crate::parse::ptr_at::<u64>(ctx, 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at; LB_MAC is read whole (volatile:
    // userspace writes it while the program runs).
    let (word, ours) = unsafe {
        (
            core::ptr::read_unaligned(first),
            core::ptr::read_volatile(&raw const LB_MAC),
        )
    };
    // One shift and one compare (see `lb_mac_word`).
    word << 16 == ours
}

/// Per-CPU ICMP "too big" rate limit: the theoretical arrival time of the
/// next message (GCRA), in `bpf_ktime_get_ns` nanoseconds.
#[btf_map]
pub static ICMP_RATE: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Takes one ICMP "too big" message from this CPU's budget: at most
/// `ICMP_TOO_BIG_BURST` at once, refilled at one per
/// `ICMP_TOO_BIG_INTERVAL_NS`. False when the budget is spent.
#[inline(always)]
pub fn icmp_budget() -> bool {
    use lb_common::{ICMP_TOO_BIG_BURST, ICMP_TOO_BIG_INTERVAL_NS};
    let Some(tat) = ICMP_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    // SAFETY: this CPU's element; no other writer on this CPU.
    let tat = unsafe { &mut *tat };
    let start = if *tat > now { *tat } else { now };
    if start - now > ICMP_TOO_BIG_INTERVAL_NS * (ICMP_TOO_BIG_BURST - 1) {
        return false;
    }
    *tat = start + ICMP_TOO_BIG_INTERVAL_NS;
    true
}

/// The connection table's secret and bucket mask, as the loader set them.
#[inline(always)]
pub fn conn_params() -> (u64, u32) {
    // SAFETY: reads of globals the program never writes; volatile, or the
    // compiler would fold the zeros the object file holds.
    unsafe {
        (
            core::ptr::read_volatile(&raw const CONN_SECRET),
            core::ptr::read_volatile(&raw const CONN_BUCKET_MASK),
        )
    }
}

/// Word `word` (taken modulo `VIP_FILTER_WORDS`) of the VIP address bitmap.
#[inline(always)]
pub fn vip_filter_word(word: u32) -> u64 {
    let i = (word % VIP_FILTER_WORDS) as usize;
    // SAFETY: `i` is inside the array; a whole aligned word is read
    // (volatile: userspace rewrites it while the program runs).
    unsafe { core::ptr::read_volatile((&raw const VIP_FILTER_COPY).cast::<u64>().add(i)) }
}

/// This CPU's counters.
#[inline(always)]
pub fn counters() -> Option<&'static mut Counters> {
    // SAFETY: this CPU's element, valid for the program's run; the program
    // runs with migration off, so no other CPU writes it (as with any
    // per-CPU counter, a program preempting this one on the same CPU could
    // lose an increment, never corrupt memory).
    COUNTERS.get_ptr_mut(0).map(|c| unsafe { &mut *c })
}

/// Adds one to a global counter.
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(c) = counters() {
        count_in(c, stat);
    }
}

/// Adds one to a global counter of `c` (an index out of range counts
/// nothing).
#[inline(always)]
pub fn count_in(c: &mut Counters, stat: u32) {
    if let Some(g) = c.global.get_mut(stat as usize) {
        *g += 1;
    }
}

/// Adds one packet of `bytes` to traffic counters.
#[inline(always)]
pub fn add_traffic(c: &mut TrafficCounters, bytes: u64, new_flow: bool) {
    c.packets += 1;
    c.bytes += bytes;
    if new_flow {
        c.new_flows += 1;
    }
}

/// Adds one packet of `bytes` to a backend's counters.
#[inline(always)]
pub fn count_backend(id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        add_traffic(unsafe { &mut *c }, bytes, new_flow);
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
