//! With the `cuda` feature, compiles acrf's CUDA kernels (src/cuda/kernels.cu) into one fatbin that the
//! library embeds.
//!
//! The fatbin carries SASS for the GPUs acrf is built for, sm_80 (A100), sm_89 (RTX 4090, L40) and sm_90
//! (H100, H200), which loads on any driver of the same CUDA major version, and PTX for compute_80, which any
//! newer GPU's driver compiles when it loads the module (a driver at least as new as this nvcc).
//! `ACRF_CUDA_ARCHS` (e.g. `89` or `80,90`) replaces the SASS list. nvcc is found as candle's build finds it:
//! `$CUDA_HOME/bin/nvcc`, else on PATH.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda/kernels.cu");
    println!("cargo::rerun-if-env-changed=ACRF_CUDA_ARCHS");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("acrf_kernels.fatbin");
    let nvcc = match env::var_os("CUDA_HOME") {
        Some(home) => PathBuf::from(home).join("bin").join("nvcc"),
        None => PathBuf::from("nvcc"),
    };
    let archs = env::var("ACRF_CUDA_ARCHS").unwrap_or_else(|_| "80,89,90".into());
    let mut cmd = Command::new(&nvcc);
    cmd.args(["--fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-o"]).arg(&out);
    for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        cmd.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    cmd.arg("-gencode=arch=compute_80,code=compute_80").arg("src/cuda/kernels.cu");
    let status =
        cmd.status().unwrap_or_else(|e| panic!("running {}: {e} (set CUDA_HOME or put nvcc on PATH)", nvcc.display()));
    assert!(status.success(), "nvcc failed to compile src/cuda/kernels.cu: {status}");
}
