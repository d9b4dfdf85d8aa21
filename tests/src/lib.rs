//! Test support: packet builders, netns guards.

pub mod packet;
pub mod scenario;
