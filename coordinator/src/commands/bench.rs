//! `acrf bench`: times a job's steps (see `crate::bench`) and prints the measurements.

use acrf_worker::device;
use anyhow::Result;

use crate::args::BenchArgs;
use crate::{bench, job};

pub fn run(args: BenchArgs) -> Result<()> {
    let BenchArgs { config, sets, steps, warmup, device: dev, json, profile, synthetic } = args;
    let (_dir, cfg) = match config {
        Some(path) => (None, job::load_config(&path, &sets)?),
        None => {
            let (dir, mut cfg) = bench::synthetic_job(&synthetic)?;
            job::apply_sets(&mut cfg, &sets)?;
            (Some(dir), cfg)
        }
    };
    let report = bench::run(&cfg, &device::open(&dev)?, steps, warmup, profile)?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}
