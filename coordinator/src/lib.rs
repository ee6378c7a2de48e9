//! The deciding side of acrf and the application around it: the `acrf` command line (`args`, `commands`),
//! single-process jobs (`job`, `console`), the control plane of a group (`control`), the launchers that
//! start its workers (`launch`), sweeps, reports, the memory estimate and benchmarks. ARCHITECTURE.md at the
//! repository's root maps how they fit together.

pub mod args;
pub mod bench;
pub mod commands;
pub mod console;
pub mod control;
pub mod demo;
pub mod estimate;
pub mod exit;
pub mod job;
pub mod launch;
pub mod observe;
pub mod report;
pub mod stats;
pub mod status;
pub mod sweep;
pub mod synthetic;
