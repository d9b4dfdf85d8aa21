//! Userspace side of the load balancer: the config model, the Maglev
//! builder, the map-content planner (pure, testable without a kernel), and
//! the thin datapath layer that loads, attaches and programs the XDP object.

pub mod agent;
pub mod datapath;
pub mod health;
pub mod simulate;
pub mod testing;

// The pure control plane lives in `lb-control`; these re-exports keep every
// `lb_userspace::config::...` (and `crate::plan::...`) path working.
pub use lb_control::{config, control, digest, maglev, model, plan, policy};

/// The compiled XDP object (built by build.rs from `lb-ebpf`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
