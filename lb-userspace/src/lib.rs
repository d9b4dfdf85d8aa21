//! Userspace side of the load balancer: the config model, the Maglev
//! builder, the map-content planner (pure, testable without a kernel), and
//! the thin datapath layer that loads, attaches and programs the XDP object.

pub mod agent;
pub mod config;
pub mod control;
pub mod datapath;
pub mod health;
pub mod maglev;
pub mod model;
pub mod plan;
pub mod policy;
pub mod simulate;

/// The compiled XDP object (built by build.rs from `lb-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
