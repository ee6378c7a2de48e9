//! `acrf demo`: writes the demo job and trains it here, then says what came out and how to train it again.

use anyhow::Result;
use candle_core::Device;

use crate::args::DemoArgs;
use crate::console::stop_on_signals;
use crate::job::{self, ResumeFrom};
use crate::{commands, demo};

pub fn run(args: DemoArgs) -> Result<()> {
    let d = demo::write(&args.dir)?;
    print!("{}", commands::cache::summary(&d.cache));
    println!("wrote a tiny Z-Image model, {} images, their cached dataset and {}", d.cache.images, d.job.display());
    let stop = stop_on_signals()?;
    let done = job::train_here(&d.config, &Device::Cpu, ResumeFrom::Config, stop)?;
    let (first, last) = demo::first_and_last_tenth(&done.losses);
    println!("mean loss: first 10% of steps {first:.4}, last 10% {last:.4}");
    if let Some(url) = &done.outcome.lora_url {
        println!("LoRA (loads in ComfyUI and diffusers): {url}");
    }
    println!("metrics: {}/metrics.jsonl", done.run_url);
    println!("train it again with: acrf train {}", d.job.display());
    Ok(())
}
