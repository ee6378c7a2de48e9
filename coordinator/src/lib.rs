//! The deciding side of acrf: jobs, resumes, membership and ranks, shard plans, failures, checkpoints,
//! sweeps, and the `acrf` command line that drives them.

pub mod bench;
pub mod cli;
pub mod demo;
pub mod job;
pub mod observe;
pub mod plan;
pub mod synthetic;
