//! The memory estimate of `acrf plan` and the memory check of `acrf train`: a job's predicted peak memory per rank and FLOPs per
//! optimizer step, and the decision whether it fits the device.

use acrf_common::config::{Config, DeviceMemory};
use acrf_worker::estimate::{Estimate, Workload, device_memory, human_bytes};
use anyhow::{Result, bail};
use candle_core::Device;

pub use acrf_worker::estimate::job_workload;

/// Latent (height, width) of an image of `WxH` pixels: the VAE downsamples by 8 and the transformer cuts 2×2
/// patches, so both sides must be multiples of 16.
pub fn parse_resolution(text: &str) -> Result<(usize, usize)> {
    let (w, h) = text.split_once(['x', 'X']).unwrap_or((text, text));
    let side = |s: &str| -> Result<usize> {
        match s.trim().parse::<usize>() {
            Ok(n) if n > 0 && n % 16 == 0 => Ok(n / 8),
            _ => bail!("--resolution {text}: expected WIDTHxHEIGHT in pixels, multiples of 16 (e.g. 1024x1024)"),
        }
    };
    Ok((side(h)?, side(w)?))
}

/// The memory a job must fit in: `--device-memory`, else `compute.device_memory`, where `auto` means the
/// GPU's own memory, and no limit on a CPU or where no `device` is opened (`acrf plan`).
pub fn memory_limit(cfg: &Config, flag: Option<DeviceMemory>, device: Option<&Device>) -> Result<Option<u64>> {
    match (flag.unwrap_or(cfg.compute.device_memory), device) {
        (DeviceMemory::Bytes(b), _) => Ok(Some(b)),
        (DeviceMemory::Auto, Some(device)) => Ok(device_memory(device)?.map(|m| m.total)),
        (DeviceMemory::Auto, None) => Ok(None),
    }
}

/// Refuses a job whose predicted peak exceeds `limit`, naming the knobs that would make it fit.
pub fn check(workload: &Workload, limit: Option<u64>) -> Result<()> {
    match limit {
        Some(available) => Ok(workload.check_fits(available)?),
        None => Ok(()),
    }
}

/// The plan as a table: the workload, each memory item, the total, and the FLOPs.
pub fn table(w: &Workload, limit: Option<u64>) -> String {
    let e = Estimate::new(w);
    let a = w.compute.attention;
    let mode = if a.fused && w.compute.fused_norm && w.tiled_attention() {
        "lean (attention in tiles with an online softmax)".to_string()
    } else if a.fused && w.compute.fused_norm {
        format!("lean (attention {} head(s) × {} query rows at a time)", chunk(a.head_chunk), chunk(a.query_chunk))
    } else {
        "plain".into()
    };
    let mut out = format!(
        "workload: {} parameters in {:?}, LoRA rank {} on {} in {}, batch {} × {} micro-batch(es), latent {}x{} \
         + {} caption tokens = {} tokens per sample, {}checkpointing, {mode}, {}\n\n",
        w.model.parameter_count(),
        w.dtype,
        w.lora.rank,
        w.lora.targets.join(", "),
        w.lora.blocks.join(", "),
        w.batch,
        w.accumulation,
        w.latent.0,
        w.latent.1,
        w.caption_tokens,
        w.tokens_per_sample(),
        if w.checkpoint { "" } else { "no " },
        if w.gpu { "GPU" } else { "CPU" },
    );
    let width = e.memory.iter().map(|i| i.name.len()).max().unwrap_or(0).max(24);
    out.push_str(&format!("{:<width$}  {:>11}  how\n", "memory per rank", "bytes"));
    for i in &e.memory {
        out.push_str(&format!("{:<width$}  {:>11}  {}\n", i.name, human_bytes(i.bytes), i.detail));
    }
    out.push_str(&format!("{:<width$}  {:>11}\n", "predicted peak", human_bytes(e.peak())));
    if let Some(available) = limit {
        let verdict = match w.check_fits(available) {
            Ok(()) => format!("fits in {}", human_bytes(available)),
            Err(e) => e.to_string(),
        };
        out.push_str(&format!("{:<width$}  {verdict}\n", "device memory"));
    }
    let f = e.flops;
    out.push_str(&format!(
        "\nFLOPs per optimizer step: {:.3} TFLOP = forward {:.3} + recompute {:.3} + backward {:.3}\n",
        f.total() / 1e12,
        f.forward / 1e12,
        f.recompute / 1e12,
        f.backward / 1e12
    ));
    out
}

fn chunk(n: usize) -> String {
    if n == 0 { "all".into() } else { n.to_string() }
}
