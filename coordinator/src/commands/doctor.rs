//! `acrf doctor`: what this machine offers acrf (CPU features; the GPU, its driver and NCCL) and whether every
//! fused kernel agrees with the composed ops it replaces, here, on this device.

use acrf_worker::device;
use acrf_worker::doctor::{Check, checks};
use anyhow::{Result, bail};
use candle_core::Device;

use crate::args::DoctorArgs;

/// Prints the machine's report and the checks; fails if any check does.
pub fn run(args: DoctorArgs) -> Result<()> {
    let DoctorArgs { device: name, json } = args;
    let device = &device::open(&name)?;
    let mut about = vec![("acrf".to_string(), env!("CARGO_PKG_VERSION").to_string()), ("CPU".into(), cpu_features())];
    about.extend(gpu(device)?);
    let results = checks(device)?;
    let failed = results.iter().filter(|c| !c.pass).count();
    if json {
        let about: serde_json::Map<String, serde_json::Value> = about.into_iter().map(|(k, v)| (k, v.into())).collect();
        println!("{}", serde_json::json!({ "about": about, "checks": results }));
    } else {
        for (k, v) in &about {
            println!("{k:<20} {v}");
        }
        println!();
        print!("{}", table(&results));
        match failed {
            0 => println!("all {} checks passed", results.len()),
            n => println!("{n} of {} checks FAILED", results.len()),
        }
    }
    if failed > 0 {
        bail!("{failed} fused kernel check(s) failed on {device:?}");
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn gpu(device: &Device) -> Result<Vec<(String, String)>> {
    Ok(acrf_worker::cuda::describe(device)?)
}

#[cfg(not(feature = "cuda"))]
fn gpu(device: &Device) -> Result<Vec<(String, String)>> {
    match device.is_cuda() {
        true => bail!("this acrf was built without the `cuda` feature"),
        false => Ok(Vec::new()),
    }
}

fn cpu_features() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let has = |yes: bool, name: &str| if yes { name.to_string() } else { format!("no {name}") };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!(
            "{cores} threads, {}, {}, {}",
            has(is_x86_feature_detected!("avx2"), "AVX2"),
            has(is_x86_feature_detected!("fma"), "FMA"),
            has(is_x86_feature_detected!("avx512f"), "AVX-512")
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::env::consts::ARCH.to_string()
}

fn table(results: &[Check]) -> String {
    let mut out = format!(
        "{:<28} {:<44} {:<5} {:>10} {:>10} {:>21}  result\n",
        "op", "shape", "dtype", "value err", "grad err", "bound (value, grad)"
    );
    for c in results {
        out += &format!(
            "{:<28} {:<44} {:<5} {:>10.2e} {:>10.2e} {:>10.1e} {:>10.1e}  {}\n",
            c.op,
            c.shape,
            c.dtype,
            c.value_err,
            c.grad_err,
            c.bound.0,
            c.bound.1,
            if c.pass { "ok" } else { "FAILED" }
        );
    }
    out
}
