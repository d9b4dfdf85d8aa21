//! Map names, capacities and the key/value layouts of every map the XDP
//! program shares with userspace.
//!
//! Rules for every type here: `#[repr(C)]`, `Copy`, only integer and byte
//! array fields with explicit padding (every bit pattern is a valid value),
//! and a compile-time size assertion, so that the kernel and userspace can
//! never disagree on a layout.

/// Version of the pinned map layout. A newer agent refuses to adopt pinned
/// maps of another version instead of misreading them.
pub const LAYOUT_VERSION: u32 = 8;

use crate::flow::FlowWords;

// ---- map names (the static names in lb-ebpf) ----
/// `Array<VipSlot, 2 × VIP_INDEX_SLOTS>` (memory-mappable): the VIPs, as
/// two open-addressing tables, see [`crate::vip_index`].
pub const MAP_VIP_INDEX: &str = "VIP_INDEX";
/// `Array<u64, 1>`: which `VIP_INDEX` table is live, and its salt.
pub const MAP_VIP_INDEX_LIVE: &str = "VIP_INDEX_LIVE";
/// `ArrayOfMaps<Array<RingChunk, RING_CHUNKS>, MAX_RINGS>`: Maglev lookup
/// tables (slot → backend id, 32 slots per element), two per VIP id (see
/// [`ring_index`]).
pub const MAP_RINGS: &str = "RINGS";
/// `Array<u32, MAX_VIPS>`: which of a VIP id's two tables is live (0 or
/// 1). Switching a VIP to its other table is one aligned 4-byte store:
/// every CPU reads the old value or the new one.
pub const MAP_RING_LIVE: &str = "RING_LIVE";
/// `Array<Backend, MAX_BACKENDS>` (memory-mappable, so every entry is one
/// aligned cache line): backends by id.
pub const MAP_BACKENDS: &str = "BACKENDS";
/// `Array<ConnBucket, buckets>` (memory-mappable, so every bucket is one
/// aligned cache line): the connection table, see [`crate::conn`].
pub const MAP_CONN_TABLE: &str = "CONN_TABLE";
/// `Array<ConnParams, 1>`: the connection table's hash secret and bucket
/// mask, kept with the pinned table. The program reads them as the
/// load-time constants [`GLOBAL_CONN_SECRET`] and [`GLOBAL_CONN_BUCKET_MASK`],
/// which the loader sets from this map.
pub const MAP_CONN_PARAMS: &str = "CONN_PARAMS";
/// Global (`.rodata`, `u64`): `ConnParams::secret` of the loaded program.
pub const GLOBAL_CONN_SECRET: &str = "CONN_SECRET";
/// Global (`.rodata`, `u32`): `ConnParams::bucket_mask` of the loaded
/// program.
pub const GLOBAL_CONN_BUCKET_MASK: &str = "CONN_BUCKET_MASK";
/// `Array<u64, VIP_FILTER_WORDS>`: bitmap of VIP addresses, kept with the
/// pinned maps (the record a restarted agent adopts).
pub const MAP_VIP_FILTER: &str = "VIP_FILTER";
/// `Array<[u64; VIP_FILTER_WORDS], 1>`: the program's own copy of
/// [`MAP_VIP_FILTER`], which it reads in place. It is the program's `.bss`
/// (its only zero-initialised global), so it belongs to one loaded program
/// and is not pinned: the loader fills it from `VIP_FILTER`, and every write
/// of `VIP_FILTER` writes it too.
pub const MAP_VIP_FILTER_COPY: &str = ".bss";
/// `Array<GlobalConfig, 1>`: fleet-wide settings.
pub const MAP_CONFIG: &str = "CONFIG";
/// `Array<u64, 1>`: the program's `.data`, whose only variable is the MAC
/// address of the interface the program is attached to, as
/// [`lb_mac_word`] (written by userspace when it attaches; not pinned).
/// Until it is written no frame is forwarded: the program cannot tell a
/// frame addressed to this host from one flooded to it.
pub const MAP_LB_MAC: &str = ".data";
/// `PerCpuArray<u64, 1>`: the ICMP "too big" rate limit (see
/// [`ICMP_TOO_BIG_INTERVAL_NS`]).
pub const MAP_ICMP_RATE: &str = "ICMP_RATE";
/// `DevMapHash`: egress interfaces for IP-in-IP towards another interface.
pub const MAP_TX_PORTS: &str = "TX_PORTS";
/// `PerCpuArray<Counters, 1>`: the global counters (by outcome and reason)
/// and the per-VIP counters, one element per CPU.
pub const MAP_COUNTERS: &str = "COUNTERS";
/// `PerCpuArray<TrafficCounters, MAX_BACKENDS>`: per-backend counters.
pub const MAP_BACKEND_STATS: &str = "BACKEND_STATS";
/// `PerCpuArray<u64, DECAP_STAT_COUNT>`: counters of the decap program.
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";

// ---- program names ----
/// The load balancer's XDP program.
pub const PROG_LB: &str = "xdp_lb";
/// The IP-in-IP decapsulation program run on backends.
pub const PROG_DECAP: &str = "xdp_decap";
/// Benchmark floor: an empty XDP_PASS program.
pub const PROG_BENCH_PASS: &str = "bench_pass";
/// Benchmark ceiling for live frames: MAC swap and XDP_TX.
pub const PROG_BENCH_MACSWAP: &str = "bench_macswap";
/// Live-frame benchmark sink: counts (in [`MAP_BENCH_COUNT`]) and drops.
pub const PROG_BENCH_SINK: &str = "bench_sink";
/// `PerCpuArray<u64, 1>`: frames seen by `bench_sink`.
pub const MAP_BENCH_COUNT: &str = "BENCH_COUNT";

// ---- capacities ----
/// VIP ids are `0..MAX_VIPS`.
pub const MAX_VIPS: u32 = 256;
/// VIP entries: every VIP plus one fragment alias per
/// (address, protocol).
pub const MAX_VIP_KEYS: u32 = MAX_VIPS * 2;
/// Slots of the outer lookup-table map: two per VIP id. Userspace fills
/// the idle table of a VIP while packets read the live one, then flips the
/// VIP's [`MAP_RING_LIVE`] entry (no RCU grace period to wait for on the
/// way to live).
pub const MAX_RINGS: u32 = MAX_VIPS * 2;

/// Outer-map slot of table `buffer` (0 or 1) of VIP id `vip_id`.
pub const fn ring_index(vip_id: u32, buffer: u32) -> u32 {
    vip_id * 2 + (buffer & 1)
}
/// Backend ids are `0..MAX_BACKENDS`. A backend id names one backend of one
/// VIP, so per-backend counters are per (VIP, backend).
pub const MAX_BACKENDS: u32 = 16384;
/// Capacity of every lookup table (inner map). A VIP's table size is a
/// prime ≤ this; only the first `ring_size` slots are used.
pub const MAX_RING_SIZE: u32 = 65537;
/// Default lookup-table size (prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default connection-table capacity in flows (ways): 32768 buckets of
/// [`crate::CONN_WAYS`], 2 MiB. The loader rounds any capacity up to a
/// power-of-two number of buckets (see [`crate::conn_buckets`]).
pub const CONN_TABLE_CAPACITY: u32 = 262_144;
/// Words (u64) of the VIP address bitmap: 4096 bits.
pub const VIP_FILTER_WORDS: u32 = 64;

/// The bit of the VIP address bitmap for an address (wire-order words):
/// returns (word index, bit mask). A set bit means "some VIP may have this
/// address"; a clear bit means "certainly not a VIP".
#[inline(always)]
#[must_use]
pub const fn vip_filter_bit(addr: &[u32; 4]) -> (u32, u64) {
    vip_filter_bit_of_words(&addr_words(addr))
}

/// [`vip_filter_bit`] of an address given as [`addr_words`].
#[inline(always)]
#[must_use]
pub const fn vip_filter_bit_of_words(words: &[u64; 2]) -> (u32, u64) {
    let w = words[0] ^ words[1];
    let x = (w as u32) ^ ((w >> 32) as u32);
    // Multiplicative hashing: the top 12 bits of x·φ.
    let h = x.wrapping_mul(0x9e37_79b9) >> 20;
    (h >> 6, 1u64 << (h & 63))
}

/// An address (wire-order `u32` words, IPv4 in word 0) as two `u64`s:
/// word `2i` in the low half of `u64` `i`. On a little-endian machine this
/// is the same memory as the `u32` words. The data path keeps addresses in
/// this form: it stores and loads them whole, where 32-bit stores read back
/// as one 64-bit load stall the CPU (no store-to-load forwarding).
#[inline(always)]
#[must_use]
pub const fn addr_words(addr: &[u32; 4]) -> [u64; 2] {
    [
        (addr[0] as u64) | ((addr[1] as u64) << 32),
        (addr[2] as u64) | ((addr[3] as u64) << 32),
    ]
}

/// The value of [`MAP_LB_MAC`] for the interface MAC `mac`: its six bytes
/// in the high 48 bits, so that the frame's first eight bytes, read as one
/// little-endian word and shifted left by 16 (dropping the two bytes of the
/// source MAC), compare equal to it. The low 16 bits are zero; the unset
/// value (`u64::MAX`) therefore matches no frame.
#[inline(always)]
#[must_use]
pub const fn lb_mac_word(mac: [u8; 6]) -> u64 {
    u64::from_le_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]])
}
/// The [`MAP_LB_MAC`] value of a program that has not been told its MAC.
pub const LB_MAC_UNSET: u64 = u64::MAX;

/// The ICMP "fragmentation needed" / ICMPv6 "packet too big" messages the
/// program sends are limited per CPU to one every this many nanoseconds
/// on average (1000 per second) ...
pub const ICMP_TOO_BIG_INTERVAL_NS: u64 = 1_000_000;
/// ... with bursts of up to this many.
pub const ICMP_TOO_BIG_BURST: u64 = 50;
/// Default MTU of the path to IP-in-IP backends (`agent.ipip_mtu`).
pub const DEFAULT_IPIP_MTU: u32 = 1500;
/// Smallest `agent.ipip_mtu`: an IPv6 packet of the IPv6 minimum MTU (1280)
/// must fit after encapsulation (40 bytes).
pub const MIN_IPIP_MTU: u32 = 1320;
/// Largest `agent.ipip_mtu` (the IP length field).
pub const MAX_IPIP_MTU: u32 = 65535;

/// Capacity of the egress-interface map.
pub const MAX_TX_PORTS: u32 = 64;
/// Ring slot value meaning "no backend" (an empty VIP).
pub const BACKEND_NONE: u32 = u32::MAX;

/// Slots per element of a lookup table (inner map): one 64-byte element
/// holds 32 backend ids as `u16`, so a 65537-slot table takes 128 KiB
/// instead of 512 KiB (an array stores a `u32` value in 8 bytes), and a
/// packet's random slot touches a smaller, more cache-resident table.
pub const RING_CHUNK_SLOTS: u32 = 32;
/// Elements of every lookup table: slot `s` is `chunk[s % 32]` of element
/// `s / 32`.
pub const RING_CHUNKS: u32 = MAX_RING_SIZE.div_ceil(RING_CHUNK_SLOTS);
/// Value of a lookup-table element: 32 consecutive slots.
pub type RingChunk = [u16; RING_CHUNK_SLOTS as usize];
/// [`BACKEND_NONE`] as stored in a lookup-table slot. It is not a valid
/// backend id (ids are below [`MAX_BACKENDS`]), so the data path's
/// `BACKENDS` lookup misses on it.
pub const RING_SLOT_NONE: u16 = u16::MAX;
const _: () = assert!(MAX_BACKENDS <= RING_SLOT_NONE as u32);
const _: () = assert!(core::mem::size_of::<RingChunk>() == 64);
/// `BPF_F_MMAPABLE`: lookup tables can be memory-mapped and filled with one
/// copy instead of one syscall per slot.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// A VIP entry's key (see [`MAP_VIP_INDEX`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// Address in wire order (IPv4 in word 0).
    pub addr: [u32; 4],
    /// Destination port in wire order; 0 for a fragment alias.
    pub port: u16,
    /// IANA protocol number (TCP or UDP).
    pub proto: u8,
    /// [`crate::flow::FAMILY_V4`] or [`crate::flow::FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Forward by IP-in-IP encapsulation (otherwise L2 DSR).
pub const VIP_F_IPIP: u32 = 1 << 0;
/// Hash on the source address only (client affinity).
pub const VIP_F_SRC_AFFINITY: u32 = 1 << 1;
/// This entry only matches IP fragments (key port 0): it routes every
/// fragment sent to the address and protocol to the VIP it names.
pub const VIP_F_FRAG_ALIAS: u32 = 1 << 2;

/// A VIP entry's value (see [`MAP_VIP_INDEX`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index of the per-VIP counters and of [`MAP_RING_LIVE`]; owns tables
    /// `ring_index(vip_id, 0)` and `ring_index(vip_id, 1)`.
    pub vip_id: u32,
    /// Number of lookup-table slots in use (a prime ≤ [`MAX_RING_SIZE`]).
    pub ring_size: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 16);

/// The backend accepts traffic of established flows. Cleared when a backend
/// is removed or unhealthy, so connection entries pointing at it miss.
pub const BACKEND_F_ACTIVE: u8 = 1 << 0;

/// A VIP key's port (wire order), protocol and family as one word: `port |
/// proto << 16 | family << 24`, the bits of a packed flow's last word
/// above its source port ([`FlowWords`]).
#[inline(always)]
#[must_use]
pub const fn vip_l4_word(port: u16, proto: u8, family: u8) -> u32 {
    (port as u32) | ((proto as u32) << 16) | ((family as u32) << 24)
}

/// The VIP a backend serves, in the packed form the data path holds a flow
/// in ([`FlowWords`]): a packet of an established flow is checked against
/// its backend's copy instead of being looked up in the VIP index.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMatch {
    /// The VIP address as [`addr_words`].
    pub addr: [u64; 2],
    /// The VIP's [`vip_l4_word`].
    pub l4: u32,
    /// The VIP's `VIP_F_*` bits (its forwarding mode).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipMatch>() == 24);

impl VipMatch {
    /// The match of a VIP key with the VIP's flags.
    #[must_use]
    pub const fn new(key: &VipKey, flags: u32) -> Self {
        Self {
            addr: addr_words(&key.addr),
            l4: vip_l4_word(key.port, key.proto, key.family),
            flags,
        }
    }

    /// Whether `flow` is addressed to this VIP (address, port, protocol and
    /// family all equal).
    #[inline(always)]
    #[must_use]
    pub const fn matches(&self, flow: &FlowWords) -> bool {
        (flow.0[4] >> 16) as u32 == self.l4
            && flow.0[2] == self.addr[0]
            && flow.0[3] == self.addr[1]
    }
}

/// Value of [`MAP_BACKENDS`]: one 64-byte cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Address in wire order (IPv4 in word 0).
    pub addr: [u32; 4],
    /// MAC address for L2 DSR.
    pub mac: [u8; 6],
    /// Address family of `addr`.
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// Bumped every time the id is given to a different backend; connection
    /// entries remember it, so a reused id never captures old flows.
    pub generation: u32,
    /// VIP this backend id belongs to.
    pub vip_id: u32,
    /// That VIP's key and forwarding mode (an id belongs to one VIP key for
    /// its whole life; the mode is rewritten when the VIP's changes).
    pub vip: VipMatch,
    pub _pad: u64,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 64);

/// Value of [`MAP_CONFIG`] (index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Seed of [`crate::flow_hash`]; equal on every node of a fleet.
    pub hash_seed: u32,
    /// Host bits of the IPv4 outer source (wire order): the outer source is
    /// `(ipip_src_v4 & !mask) | (flow_hash & mask)`.
    pub ipip_src_v4_mask: u32,
    /// Generation of the applied config, carried so that counters can prove
    /// which generation is live.
    pub config_generation: u64,
    /// IPv4 outer source prefix for IP-in-IP (wire order).
    pub ipip_src_v4: u32,
    /// Host bits of the last word of the IPv6 outer source.
    pub ipip_src_v6_mask: u32,
    /// IPv6 outer source prefix for IP-in-IP (wire order).
    pub ipip_src_v6: [u32; 4],
    /// MTU of the path to the IP-in-IP backends (`agent.ipip_mtu`): an
    /// encapsulated packet longer than this is not sent; its client gets
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" (0: only the
    /// route's MTU counts).
    pub ipip_mtu: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 48);

/// Per-VIP and per-backend traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Flows whose backend was chosen from the lookup table (no connection
    /// entry).
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<TrafficCounters>() == 24);

/// Value of `COUNTERS` (one element, per CPU): the global counters,
/// indexed by the `STAT_*` constants, and the per-VIP counters, indexed by
/// VIP id. One element, so that a forwarded packet updates its VIP's
/// counters, its outcome and its connection-table hit through one map
/// lookup (three separate per-CPU maps took three; about +1 point of the
/// live-frame ceiling, see the README benchmarks).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub global: [u64; crate::STAT_COUNT as usize],
    pub vips: [TrafficCounters; MAX_VIPS as usize],
}
const _: () = assert!(
    core::mem::size_of::<Counters>() == crate::STAT_COUNT as usize * 8 + MAX_VIPS as usize * 24
);
// The kernel's limit for one per-CPU value (PCPU_MIN_UNIT_SIZE).
const _: () = assert!(core::mem::size_of::<Counters>() <= 32 * 1024);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers and
    // byte arrays with explicit padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for crate::conn::ConnParams {}
    unsafe impl aya::Pod for super::GlobalConfig {}
    unsafe impl aya::Pod for super::TrafficCounters {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for crate::flow::FlowKey {}
    unsafe impl aya::Pod for crate::vip_index::VipSlot {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

    /// A backend's VIP match accepts exactly the flows addressed to its VIP:
    /// any other address, port, protocol or family is refused, whatever the
    /// source.
    #[test]
    fn vip_match_is_exact() {
        let v4 = VipKey {
            addr: [0x0100_12c6, 0, 0, 0],
            port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        };
        let v6 = VipKey {
            addr: [0xb80d_0120, 0, 0, 0x0100_0000],
            port: 443u16.to_be(),
            proto: PROTO_UDP,
            family: FAMILY_V6,
        };
        for key in [v4, v6] {
            let m = VipMatch::new(&key, VIP_F_IPIP);
            let flow = |dst: &[u32; 4], port: u16, proto: u8, family: u8| {
                FlowWords::new(
                    [0x0a00_0001, 7],
                    addr_words(dst),
                    40000u16.to_be(),
                    port,
                    proto,
                    family,
                )
            };
            assert!(m.matches(&flow(&key.addr, key.port, key.proto, key.family)));
            let mut other = key.addr;
            other[3] ^= 1;
            assert!(!m.matches(&flow(&other, key.port, key.proto, key.family)));
            let mut other = key.addr;
            other[0] ^= 0x100;
            assert!(!m.matches(&flow(&other, key.port, key.proto, key.family)));
            assert!(!m.matches(&flow(&key.addr, key.port ^ 1, key.proto, key.family)));
            assert!(!m.matches(&flow(&key.addr, 0, key.proto, key.family)));
            assert!(!m.matches(&flow(&key.addr, key.port, key.proto ^ 0x17, key.family)));
            assert!(!m.matches(&flow(&key.addr, key.port, key.proto, key.family ^ 2)));
            assert_eq!(m.flags, VIP_F_IPIP);
        }
    }
}
