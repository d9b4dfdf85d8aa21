//! Userspace side of the load balancer: the thin kernel layer that loads,
//! attaches and programs the XDP object (`datapath`), health checks, the
//! agent `lbd` and what `lbctl` needs. The pure part (config, Maglev,
//! planner, policy, protocol) is the `lb-control` crate, re-exported here.

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
