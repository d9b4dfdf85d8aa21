//! Test support: packet builders, netns guards.

pub mod lab;
pub mod netns;
pub mod packet;
pub mod scenario;
