//! The deciding side of acrf: jobs, resumes, membership and ranks, shard plans, failures, checkpoints,
//! sweeps, and the `acrf` command line that drives them.

pub mod agent;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod demo;
pub mod doctor;
pub mod group;
pub mod job;
pub mod launch;
pub mod membership;
pub mod net;
pub mod observe;
pub mod plan;
pub mod remote;
pub mod report;
pub mod sample;
pub mod status;
pub mod sweep;
pub mod synthetic;
