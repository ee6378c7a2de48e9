//! `acrf demo`: writes the demo job and trains it here, then says what came out and how to train it again.

use acrf_worker::checkpoint::ResumeRequest;
use anyhow::Result;
use candle_core::Device;

use crate::args::DemoArgs;
use crate::console::stop_on_signals;
use crate::{commands, demo, job};

pub fn run(args: DemoArgs) -> Result<()> {
    let d = demo::write(&args.dir)?;
    print!("{}", commands::cache::summary(&d.cache));
    println!("wrote a tiny Z-Image model, {} images, their cached dataset and {}", d.cache.images, d.job.display());
    let stop = stop_on_signals()?;
    let done = job::train_here(&d.config, &Device::Cpu, ResumeRequest::CONFIG, stop)?;
    let again = format!("acrf train {}", d.job.display());
    if done.outcome.already_finished {
        done.outcome.print(&again);
        return Ok(());
    }
    let (first, last) = demo::first_and_last_tenth(&done.losses);
    println!("mean loss: first 10% of steps {first:.4}, last 10% {last:.4}");
    if let Some(url) = &done.outcome.lora_url {
        println!("LoRA (loads in ComfyUI and diffusers): {url}");
    }
    println!("metrics: {}/metrics.jsonl", done.run_url);
    println!("train it again with: {again}");
    let longer = 2 * d.config.training.max_steps;
    println!("train it longer with: {again} --extend --set training.max_steps={longer}");
    println!(
        "the same with caption dropout and the Turbo drift measured at sample points: acrf train {} && acrf report {}",
        d.turbo_job.display(),
        d.dir.join("output/runs/demo-turbo").display()
    );
    Ok(())
}
