//! The `acrf` command line. Each subcommand is a thin edge over the library crates; errors become one
//! readable message and a non-zero exit.

use std::path::PathBuf;

use anyhow::{Result, bail};
use candle_core::Device;
use clap::{Parser, Subcommand};

use crate::cache::CacheArgs;
use crate::job::ResumeFrom;
use crate::{agent, cache, demo, job, launch};

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
        /// Train with N local worker processes under a coordinator in this process.
        #[arg(long, value_name = "N")]
        workers: Option<usize>,
        /// Devices of the local workers, e.g. `cuda:0,cuda:1` (default: cpu for all).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
    },
    /// Coordinate a job whose workers run elsewhere: prints the join token and waits for them.
    Coordinator {
        config: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7600")]
        listen: std::net::SocketAddr,
        /// Addresses workers should dial (default: the listen address).
        #[arg(long, value_delimiter = ',')]
        advertise: Vec<std::net::SocketAddr>,
        /// Keep the certificate and secret in this file, so a restarted coordinator keeps its token.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Also write the join token to this file.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Join a job as one training rank.
    Worker {
        /// The token `acrf coordinator` printed (or the environment variable ACRF_JOIN_TOKEN).
        #[arg(long, env = "ACRF_JOIN_TOKEN", hide_env_values = true)]
        join: String,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// How long to keep trying to reach a coordinator that went away, in seconds.
        #[arg(long, default_value_t = 60)]
        reconnect_for: u64,
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

fn report_group(done: &crate::group::GroupOutcome, config: &std::path::Path) {
    if done.stopped_early {
        println!("stopped at step {}; continue with: acrf train {}", done.steps_done, config.display());
    }
    if let Some(url) = &done.lora_url {
        println!("LoRA: {url}");
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
        Command::Train { config, sets, resume, print_config, device: dev, workers, devices } => {
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
            if let Some(n) = workers {
                if from != ResumeFrom::Config {
                    bail!(
                        "--resume STEP is for single-process runs; a distributed run resumes from its newest checkpoint"
                    );
                }
                let done = launch::train_with_local_workers(&cfg, n, &devices, stop)?;
                report_group(&done, &config);
                return Ok(());
            }
            let done = job::train_here(&cfg, &device(&dev)?, from, stop)?;
            if done.outcome.stopped_early {
                println!("stopped at step {}; continue with: acrf train {}", done.outcome.steps_done, config.display());
            }
            if let Some(url) = &done.outcome.lora_url {
                println!("LoRA: {url}");
            }
            Ok(())
        }
        Command::Coordinator { config, listen, advertise, identity, token_file, sets } => {
            let cfg = job::load_config(&config, &sets)?;
            let l = launch::listen(&cfg, listen, advertise, identity.as_deref())?;
            let token = l.token.encode();
            if let Some(path) = &token_file {
                std::fs::write(path, &token)?;
            }
            println!("coordinator listening on {}", l.endpoint.local_addr()?);
            println!("join with: acrf worker --join {token}");
            let stop = job::stop_on_signals()?;
            let done = launch::serve(&cfg, l, stop)?;
            report_group(&done, &config);
            Ok(())
        }
        Command::Worker { join, device: dev, reconnect_for } => {
            let token = acrf_common::protocol::JoinToken::decode(&join)?;
            let opts = agent::AgentOptions {
                device: device(&dev)?,
                device_name: dev,
                reconnect_for: std::time::Duration::from_secs(reconnect_for),
            };
            agent::run(token, opts)
        }
        Command::Cache(args) => cache::run(&args),
        Command::Inspect { file } => {
            print!("{}", acrf_worker::lora::Lora::describe(&file)?);
            Ok(())
        }
    }
}
