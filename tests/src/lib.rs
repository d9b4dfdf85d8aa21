//! Test support: packet builders, netns guards.

pub mod agent;
pub mod lab;
pub mod netns;
pub mod nginx;
pub mod packet;
pub mod pins;
pub mod scenario;
