//! The connection table: a set-associative flow cache in one array map.
//!
//! The table is an array of buckets. A bucket is one 64-byte cache line of
//! [`CONN_WAYS`] ways, and a way is one `u64`, so a way is always written
//! and read whole: a reader never sees half of one flow and half of
//! another.
//!
//! | bits   | field                                             |
//! |--------|---------------------------------------------------|
//! | 63..32 | tag: the high half of [`conn_hash`] (0: empty way) |
//! | 31..16 | low 16 bits of the backend's `generation`         |
//! | 15..0  | backend id                                        |
//!
//! A flow's bucket is `conn_hash(key, secret) & bucket_mask`; the tag tells the
//! flows of one bucket apart. Inside a bucket the ways are kept most
//! recently used first: a hit moves its way to the front, a new flow is put
//! in front and the last way (the least recently used of the bucket) falls
//! out. So the table is an LRU per bucket, and nothing is evicted while a
//! bucket has room.
//!
//! Why not the kernel's LRU hash map: on the bench VM a miss and an insert
//! there cost several dependent random accesses (bucket, element, LRU
//! lists, a lock) plus a 40-byte jhash per packet; here a lookup is one
//! inlined array access and one cache line, an insert is stores into that
//! same line, and the hash ([`conn_hash`]) is short enough to be off the
//! packet's critical path.
//!
//! What the compact way costs, and why it is safe:
//! - Two flows of one bucket with equal tags (a chance of about 2⁻³² per
//!   way for a flow that is not in the table) share an entry. The data path
//!   only follows an entry to an active backend of the packet's own VIP with
//!   the entry's generation, so the worst case is a new flow placed on
//!   another live backend of its VIP.
//! - The generation is kept to 16 bits: an entry could only be captured by
//!   a reused backend id after 65536 reuses of that id while the entry
//!   stays in its bucket.
//! - Two CPUs changing one bucket at the same instant can lose one of the
//!   moves (a flow then falls back to its lookup-table pick, which is the
//!   same backend unless the table changed). Ways are never torn.

use crate::flow::FlowWords;

/// Ways (flows) per bucket: one 64-byte cache line of `u64` ways.
pub const CONN_WAYS: usize = 8;

/// A bucket of [`CONN_WAYS`] ways (value of `CONN_TABLE`).
pub type ConnBucket = [u64; CONN_WAYS];
const _: () = assert!(core::mem::size_of::<ConnBucket>() == 64);
// Every backend id fits the way's 16 id bits.
const _: () = assert!(crate::maps::MAX_BACKENDS <= 1 << 16);

/// Value of `CONN_PARAMS` (index 0): how flows are placed in the table.
/// Kept with the pinned table (its entries are placed by this secret); the
/// loader gives a program these values as load-time constants (the program
/// does not read the map) and records them here after every load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnParams {
    /// Per-host random seed of [`conn_hash`], so that flows cannot be aimed
    /// at one bucket by someone who does not know it. Never 0 once set.
    pub secret: u64,
    /// Buckets − 1 (the bucket count is a power of two).
    pub bucket_mask: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ConnParams>() == 16);

/// Largest connection-table capacity (ways): 2²⁷ flows, 1 GiB.
pub const MAX_CONN_TABLE_CAPACITY: u32 = 1 << 27;

/// Buckets of a table of at least `capacity` ways: a power of two, ≥ 1.
#[must_use]
pub const fn conn_buckets(capacity: u32) -> u32 {
    let ways = CONN_WAYS as u32;
    let c = if capacity > MAX_CONN_TABLE_CAPACITY {
        MAX_CONN_TABLE_CAPACITY
    } else {
        capacity
    };
    let b = c.div_ceil(ways);
    if b <= 1 { 1 } else { b.next_power_of_two() }
}

/// Odd multipliers of [`conn_hash`]'s lanes, one per key word.
const LANE_MUL: [u64; 5] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0xd6e8_feb8_6659_fd93,
    0xff51_afd7_ed55_8ccd,
];

/// One lane of [`conn_hash`]: the word keyed by the secret, its halves
/// folded (so that flipping a word's top bit does not change the product
/// by a secret-independent 2⁶³), multiplied by the lane's constant.
#[inline(always)]
const fn lane(word: u64, secret: u64, mul: u64) -> u64 {
    let x = word ^ secret;
    (x ^ (x >> 32)).wrapping_mul(mul)
}

/// The connection table's hash of a flow: the low bits pick the bucket,
/// the high half is the tag.
///
/// It is the node's own hash, not the fleet's [`crate::flow_hash`]: it only
/// places flows in this host's table, so it can be keyed by the host's
/// secret in every word (which flows share a bucket cannot be worked out
/// without the secret) and built for latency. Each key word goes through
/// its own multiply and the five products are summed, so the bucket
/// address is known after one multiply plus a short finish instead of the
/// flow hash's chain of dependent multiplies (an established flow's packet
/// never computes the flow hash).
#[inline(always)]
#[must_use]
pub const fn conn_hash(key: &FlowWords, secret: u64) -> u64 {
    let w = &key.0;
    let src = lane(w[0], secret, LANE_MUL[0]).wrapping_add(lane(w[1], secret, LANE_MUL[1]));
    let dst = lane(w[2], secret, LANE_MUL[2]).wrapping_add(lane(w[3], secret, LANE_MUL[3]));
    let sum = src
        .wrapping_add(dst)
        .wrapping_add(lane(w[4], secret, LANE_MUL[4]));
    let h = (sum ^ (sum >> 29)).wrapping_mul(LANE_MUL[0]);
    h ^ (h >> 32)
}

/// The bucket index of a flow hash.
#[inline(always)]
#[must_use]
pub const fn conn_bucket(hash: u64, bucket_mask: u32) -> u32 {
    (hash as u32) & bucket_mask
}

/// The tag of a flow hash (never 0, which marks an empty way).
#[inline(always)]
#[must_use]
pub const fn conn_tag(hash: u64) -> u32 {
    let t = (hash >> 32) as u32;
    if t == 0 { 1 } else { t }
}

/// One way: `tag`, the backend id and the low 16 bits of its generation.
#[inline(always)]
#[must_use]
pub const fn conn_way(tag: u32, backend_id: u32, generation: u32) -> u64 {
    ((tag as u64) << 32) | (((generation & 0xffff) as u64) << 16) | ((backend_id & 0xffff) as u64)
}

/// The tag of a way (0: empty).
#[inline(always)]
#[must_use]
pub const fn way_tag(way: u64) -> u32 {
    (way >> 32) as u32
}

/// The backend id of a way.
#[inline(always)]
#[must_use]
pub const fn way_backend(way: u64) -> u32 {
    (way & 0xffff) as u32
}

/// Whether a way's generation bits match a backend's generation.
#[inline(always)]
#[must_use]
pub const fn way_generation_matches(way: u64, generation: u32) -> bool {
    ((way >> 16) & 0xffff) as u32 == generation & 0xffff
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{collections::HashSet, vec::Vec};

    use super::*;
    use crate::flow::{FAMILY_V4, FlowKey, PROTO_TCP};

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: [src, 0, 0, 0],
            dst: [0x0100_12c6, 0, 0, 0],
            src_port: sport,
            dst_port: 80,
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn way_round_trip() {
        let w = conn_way(0xdead_beef, 16383, 0x0012_3456);
        assert_eq!(way_tag(w), 0xdead_beef);
        assert_eq!(way_backend(w), 16383);
        assert!(way_generation_matches(w, 0x0012_3456));
        assert!(way_generation_matches(w, 0x0099_3456));
        assert!(!way_generation_matches(w, 0x0012_3457));
    }

    #[test]
    fn bucket_counts() {
        assert_eq!(conn_buckets(0), 1);
        assert_eq!(conn_buckets(1), 1);
        assert_eq!(conn_buckets(8), 1);
        assert_eq!(conn_buckets(9), 2);
        assert_eq!(conn_buckets(262_144), 32_768);
        assert_eq!(conn_buckets(300_000), 65_536);
        assert_eq!(conn_buckets(u32::MAX), MAX_CONN_TABLE_CAPACITY / 8);
    }

    #[test]
    fn tag_is_never_empty() {
        assert_eq!(conn_tag(0x0000_0000_1234_5678), 1);
        assert_eq!(conn_tag(0xabcd_0000_0000_0000), 0xabcd_0000);
    }

    /// Sequential client ports and addresses (what a real client population
    /// looks like) spread evenly over the buckets, and the secret changes
    /// the placement.
    #[test]
    fn sequential_flows_spread_over_buckets() {
        let mask = 4095u32;
        let n = 4096 * 8;
        let mut counts = std::vec![0u32; 4096];
        for i in 0..n {
            let k = key(0x0a00_0000 + (i / 1000), 1024 + (i % 1000) as u16);
            counts[conn_bucket(conn_hash(&k.packed(), 0x1234_5678_9abc_def1), mask) as usize] += 1;
        }
        // Poisson(8): a bucket above 30 would be a placement bias.
        let max = *counts.iter().max().unwrap();
        assert!(max <= 30, "fullest bucket has {max} flows of mean 8");
        let empty = counts.iter().filter(|&&c| c == 0).count();
        assert!(empty < 20, "{empty} empty buckets (expected ≈ 1.4)");

        let a: Vec<u32> = (0..64)
            .map(|i| conn_bucket(conn_hash(&key(i, 1000).packed(), 1), mask))
            .collect();
        let b: Vec<u32> = (0..64)
            .map(|i| conn_bucket(conn_hash(&key(i, 1000).packed(), 2), mask))
            .collect();
        assert_ne!(a, b);
    }

    /// Every key field reaches the hash: changing any one word changes it.
    #[test]
    fn every_field_counts() {
        let base = key(0x0a00_0001, 40000);
        let mut seen = HashSet::new();
        seen.insert(conn_hash(&base.packed(), 7));
        let mut k = base;
        k.src[3] = 1;
        assert!(seen.insert(conn_hash(&k.packed(), 7)));
        let mut k = base;
        k.dst[2] = 1;
        assert!(seen.insert(conn_hash(&k.packed(), 7)));
        let mut k = base;
        k.src_port ^= 1;
        assert!(seen.insert(conn_hash(&k.packed(), 7)));
        let mut k = base;
        k.dst_port ^= 1;
        assert!(seen.insert(conn_hash(&k.packed(), 7)));
        let mut k = base;
        k.proto = 17;
        assert!(seen.insert(conn_hash(&k.packed(), 7)));
        let mut k = base;
        k.family = 6;
        assert!(seen.insert(conn_hash(&k.packed(), 7)));
    }

    /// Flipping the top bit of two words adds 2⁶³ twice to a plain
    /// sum of products, whatever the secret; the folded lanes do not let
    /// such pairs collide.
    #[test]
    fn top_bits_do_not_cancel() {
        let base = FlowWords([1, 2, 3, 4, 5]);
        let top = 1u64 << 63;
        for secret in [1u64, 0x1234_5678_9abc_def1, u64::MAX] {
            for (i, j) in [(0, 1), (0, 2), (1, 3), (2, 3)] {
                let mut k = base;
                k.0[i] ^= top;
                k.0[j] ^= top;
                assert_ne!(
                    conn_hash(&k, secret),
                    conn_hash(&base, secret),
                    "words {i},{j}"
                );
            }
        }
    }
}
