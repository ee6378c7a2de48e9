//! The `acrf` command line. Each subcommand is a thin edge over the library crates; errors become one
//! readable message and a non-zero exit.

use std::path::PathBuf;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::{Parser, Subcommand};

use crate::cache::CacheArgs;
use crate::job::ResumeFrom;
use crate::{cache, demo, job};

#[derive(Parser)]
#[command(name = "acrf", version, about = "AC-RF LoRA training for Z-Image Turbo on CPU, one GPU or many")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a tiny model, a synthetic dataset and a job into DIR, then train it on the CPU.
    Demo {
        #[arg(long, default_value = "acrf-demo")]
        dir: PathBuf,
    },
    /// Train the LoRA a job file describes.
    Train {
        /// The job file (TOML).
        config: PathBuf,
        /// Override a key, e.g. `--set training.learning_rate=5e-5` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Continue from the checkpoint of step STEP (default: the newest valid one, as `checkpoint.resume =
        /// "auto"` does).
        #[arg(long, value_name = "STEP", num_args = 0..=1, default_missing_value = "latest")]
        resume: Option<String>,
        /// Print the effective config with every default and exit.
        #[arg(long)]
        print_config: bool,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Encode a folder of images and captions into the cached dataset that training reads.
    Cache(Box<CacheArgs>),
    /// Print a LoRA file's modules, rank, alpha, dtype and metadata.
    Inspect {
        /// A LoRA .safetensors in ComfyUI/diffusers, peft or kohya layout.
        file: PathBuf,
    },
}

/// The `acrf` binary.
pub fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

pub(crate) fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::new_cuda(i)?),
            _ => bail!("unknown device `{name}`: use cpu or cuda:N"),
        },
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo { dir } => {
            let d = demo::write(&dir)?;
            print!("{}", cache::summary(&d.cache));
            println!(
                "wrote a tiny Z-Image model, {} images, their cached dataset and {}",
                d.cache.images,
                d.job.display()
            );
            let stop = job::stop_on_signals()?;
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
        Command::Train { config, sets, resume, print_config, device: dev } => {
            let cfg = job::load_config(&config, &sets)?;
            if print_config {
                print!("{}", cfg.to_toml_string()?);
                return Ok(());
            }
            let from = match resume.as_deref() {
                None | Some("latest") => ResumeFrom::Config,
                Some(step) => {
                    ResumeFrom::Step(step.parse().map_err(|_| anyhow::anyhow!("--resume {step}: not a step number"))?)
                }
            };
            let stop = job::stop_on_signals()?;
            let done = job::train_here(&cfg, &device(&dev)?, from, stop)?;
            if done.outcome.stopped_early {
                println!("stopped at step {}; continue with: acrf train {}", done.outcome.steps_done, config.display());
            }
            if let Some(url) = &done.outcome.lora_url {
                println!("LoRA: {url}");
            }
            Ok(())
        }
        Command::Cache(args) => cache::run(&args),
        Command::Inspect { file } => {
            print!("{}", acrf_worker::lora::Lora::describe(&file)?);
            Ok(())
        }
    }
}
