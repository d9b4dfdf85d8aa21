//! Types, map layouts, constants and the flow hash shared by the XDP program
//! (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Everything the kernel and userspace must agree on is defined once, here:
//! map names and capacities, the `#[repr(C)]` key and value layouts (integer
//! and byte-array fields only, explicit padding, sizes asserted at compile
//! time), counter indexes, and [`flow_hash`], which the data path uses to pick
//! a backend and the simulator uses to predict that pick.
//!
//! Byte order: addresses and ports are kept exactly as they appear on the
//! wire. An address is `[u32; 4]` whose words are the packet's bytes read in
//! native order (`u32::from_ne_bytes(octets[i..i + 4])`); an IPv4 address uses
//! word 0 and leaves words 1..4 zero. Ports are the wire's two bytes read as a
//! native `u16`. Both the BPF target (`bpfel`) and the supported hosts
//! (x86_64, aarch64) are little-endian, so the words are identical on both
//! sides.
#![no_std]

pub mod conn;
pub mod flow;
pub mod maps;
pub mod rng;
pub mod stats;
pub mod vip_index;

pub use conn::{
    CONN_WAYS, ConnBucket, ConnParams, MAX_CONN_TABLE_CAPACITY, conn_bucket, conn_buckets,
    conn_hash, conn_tag, conn_way, way_backend, way_generation_matches, way_tag,
};
pub use flow::{
    FAMILY_V4, FAMILY_V6, FlowKey, FlowWords, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    flow_hash, flow_hash_words, ring_slot,
};
pub use maps::*;
pub use stats::*;
pub use vip_index::{
    VIP_INDEX_PROBES, VIP_INDEX_SLOTS, VipSlot, vip_index_half, vip_index_home, vip_index_home_of,
    vip_index_live, vip_index_probe, vip_index_salt, vip_slot,
};
