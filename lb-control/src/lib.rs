//! The pure control plane of the load balancer: the config model and its
//! validation, the Maglev builder, the map-content planner, the change
//! policy and the `lbctl` ↔ `lbd` protocol. Nothing here touches the kernel
//! (no aya, no build script), so `cargo test -p lb-control` runs on stable
//! without root; the agent (`lb-userspace`) writes what this crate plans.

pub mod config;
pub mod control;
pub mod digest;
pub mod maglev;
pub mod model;
pub mod plan;
pub mod policy;
