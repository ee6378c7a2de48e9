//! The `acrf` command line. Each subcommand is a thin edge over the library crates; errors become one
//! readable message and a non-zero exit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use acrf_common::config::DeviceMemory;
use acrf_worker::estimate::Workload;
use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};

use crate::cache::CacheArgs;
use crate::job::ResumeFrom;
use crate::observe::progress_bar;
use crate::sample::SampleArgs;
use crate::sweep::SweepArgs;
use crate::synthetic::SyntheticArgs;
use crate::{agent, bench, cache, demo, doctor, job, launch, plan, remote, report, sample, sweep};

/// The whole command line; public so that tests can run the recipes under deploy/ through this parser
/// (`Cli::try_parse_from`) without running them.
#[derive(Parser)]
#[command(name = "acrf", version, about = "AC-RF LoRA training for Z-Image Turbo on CPU, one GPU or many")]
pub struct Cli {
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
        /// Refuse the job unless its predicted peak fits in this much memory, e.g. `24GiB` (default:
        /// compute.device_memory, whose `auto` is the GPU's own memory and no check on a CPU).
        #[arg(long, value_name = "SIZE")]
        device_memory: Option<DeviceMemory>,
    },
    /// Predict a job's peak device memory per rank and its FLOPs per optimizer step, without loading anything.
    Plan {
        /// The job file (TOML).
        #[arg(required_unless_present = "synthetic", conflicts_with = "synthetic")]
        config: Option<PathBuf>,
        /// Override a key, e.g. `--set training.batch_size=2` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// The device to plan for, `cpu` or `cuda[:N]` (nothing is opened).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Check the plan against this much memory, e.g. `24GiB` (default: compute.device_memory).
        #[arg(long, value_name = "SIZE")]
        device_memory: Option<DeviceMemory>,
        /// Plan for images of WIDTHxHEIGHT pixels instead of the dataset's largest bucket.
        #[arg(long, value_name = "WxH")]
        resolution: Option<String>,
        /// Plan for captions this long instead of the dataset's longest.
        #[arg(long, value_name = "N")]
        caption_tokens: Option<usize>,
        #[command(flatten)]
        synthetic: SyntheticArgs,
    },
    /// Time a job's optimizer steps: step time, tokens/s, FLOP/s, phase shares and peak memory.
    Bench {
        /// The job file (TOML).
        #[arg(required_unless_present = "synthetic", conflicts_with = "synthetic")]
        config: Option<PathBuf>,
        /// Override a key, e.g. `--set compute.mode=lean` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Timed optimizer steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed optimizer steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print the measurements as one JSON object.
        #[arg(long)]
        json: bool,
        /// After the timed steps, profile a few more: time per op site (norms, projections, qk-norm + RoPE,
        /// attention, feed-forward, LoRA) and pass, GPU time from CUDA events beside the host's. On a GPU the
        /// profiled steps run between cuProfilerStart and cuProfilerStop, so `ncu --profile-from-start off`
        /// captures exactly them.
        #[arg(long)]
        profile: bool,
        #[command(flatten)]
        synthetic: SyntheticArgs,
    },
    /// Report the CPU, the GPU, its driver and NCCL, and check every fused kernel (values and gradients)
    /// against the composed ops it replaces on random inputs; exits non-zero if one disagrees.
    Doctor {
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Train with one worker per GPU of the machines in a hosts file, each started over ssh, under a
    /// coordinator in this process.
    Launch {
        /// The job file (TOML).
        config: PathBuf,
        /// The machines, their GPUs and how to reach them (deploy/ssh/hosts.example.toml).
        #[arg(long)]
        hosts: PathBuf,
        /// UDP address to listen on (default: the hosts file's `coordinator.listen`, else 0.0.0.0:7600).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Addresses the workers dial (default: the hosts file's `coordinator.advertise`, else this
        /// machine's address on its route to each host).
        #[arg(long, value_delimiter = ',')]
        advertise: Vec<SocketAddr>,
        /// Start a failed worker again up to this many times in all (the group re-forms around it); by
        /// default the first failure stops every worker, and the same command continues from the last
        /// checkpoint.
        #[arg(long, default_value_t = 0)]
        restarts: usize,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Coordinate a job whose workers run elsewhere: prints the join token and waits for them.
    Coordinator {
        config: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "0.0.0.0:7600")]
        listen: SocketAddr,
        /// Addresses workers should dial (default: the listen address).
        #[arg(long, value_delimiter = ',')]
        advertise: Vec<SocketAddr>,
        /// Keep the certificate and secret in this file, so a restarted coordinator keeps its token.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Write the join token to this file (owner-only) instead of printing it.
        #[arg(long)]
        token_file: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Print the join token of a coordinator identity, creating the identity file first if it does not
    /// exist: for deployments that hand workers their token before the coordinator starts.
    Token {
        /// The identity file `acrf coordinator --identity` will use.
        #[arg(long)]
        identity: PathBuf,
        /// Addresses the token names; workers started with `--coordinator` dial those names instead.
        #[arg(long, value_delimiter = ',', required = true)]
        advertise: Vec<SocketAddr>,
    },
    /// Join a job as one training rank.
    Worker {
        /// The token of `acrf coordinator`; rather give it in the environment, as `ps` shows arguments to
        /// every user.
        #[arg(long, env = launch::TOKEN_VAR, hide_env_values = true)]
        join: Option<String>,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// How long to keep trying to reach a coordinator that went away, in seconds.
        #[arg(long, default_value_t = 60)]
        reconnect_for: u64,
        /// Where the ring collective listens for its peers (TCP), e.g. `0.0.0.0:29500` for a firewall;
        /// peers dial its port at the address the coordinator sees this worker at. Default: an ephemeral
        /// port on every interface.
        #[arg(long, value_name = "ADDR")]
        collective_listen: Option<SocketAddr>,
        /// Dial the coordinator at HOST:PORT instead of the token's addresses, looked up again at every
        /// reconnect: a stable DNS name follows a coordinator restarted elsewhere (a Kubernetes pod).
        #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
        coordinator: Vec<String>,
        /// Exit as soon as stdin reaches its end: how `acrf launch` ties a remote worker to its ssh session.
        #[arg(long)]
        exit_when_stdin_closes: bool,
    },
    /// Encode a folder of images and captions into the cached dataset that training reads.
    Cache(Box<CacheArgs>),
    /// Train one job per combination of loss modes and `--set` values, each a group of its own, several at a
    /// time; re-running it continues where it stopped.
    Sweep(Box<SweepArgs>),
    /// Render one image with a base model and a LoRA, as the training samples are rendered.
    Sample(Box<SampleArgs>),
    /// Write report.html (self-contained) and PNG plots of a run or a sweep.
    Report {
        /// The folder of a run (`<output>/runs/<run>`) or of a sweep (`<output>/runs/<sweep>`): a path or URL.
        run: String,
        /// Where to write (default: that folder, when it is local).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a LoRA file's modules, rank, alpha, dtype and metadata.
    Inspect {
        /// A LoRA .safetensors in ComfyUI/diffusers, peft or kohya layout.
        file: PathBuf,
    },
}

/// The `acrf` binary.
pub fn main() {
    configure_cpu_threads();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = in_matmul_pool(|| run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Sets candle's CPU thread counts unless the user has: matmuls on every physical core, elementwise ops on the
/// calling thread.
///
/// candle 0.11 reads `RAYON_NUM_THREADS` before every matmul and, when it is unset, counts the physical cores
/// by parsing `/proc/cpuinfo`, about 500 times per step of a small model. Its elementwise ops run on a pool
/// whose threads spin on a barrier between ops; over ops of a few hundred kB that costs more than it
/// parallelises, and on a busy host a descheduled spinner stalls every op. Measured on 2 cores: 0.12 s per
/// step of the reference model instead of 0.15 s quiet and 0.4 s under load.
fn configure_cpu_threads() {
    let defaults = [("RAYON_NUM_THREADS", num_cpus::get_physical().max(1)), ("CANDLE_NUM_THREADS", 1)];
    for (name, value) in defaults {
        if std::env::var_os(name).is_none() {
            // SAFETY: this runs first in `main`, before any thread exists, so nothing reads the environment
            // while it changes.
            unsafe { std::env::set_var(name, value.to_string()) };
        }
    }
}

/// Runs `f` on a thread of a rayon pool as large as candle's matmul parallelism.
///
/// candle hands every CPU matmul to rayon. From outside a pool the caller blocks on a latch while the pool's
/// threads, woken for each matmul and asleep again after it, do the work: a small model's step has about 700
/// matmuls, each paying a futex wake-up. From inside the pool the caller takes a share of each matmul and the
/// other threads, still spinning from the previous one, steal the rest. Measured on 2 cores: 0.073 s per step
/// of the reference model instead of 0.093 s.
fn in_matmul_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown device `{0}`: use cpu or cuda:N")]
pub struct UnknownDevice(String);

/// The CUDA ordinal a device name asks for, `None` for the CPU; checked without touching a GPU, so that a
/// launcher can vet the devices of machines it is not on.
pub fn cuda_ordinal(name: &str) -> Result<Option<usize>, UnknownDevice> {
    match name {
        "cpu" => Ok(None),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Some(i)),
            _ => Err(UnknownDevice(name.to_string())),
        },
    }
}

pub(crate) fn device(name: &str) -> Result<Device> {
    Ok(match cuda_ordinal(name)? {
        None => Device::Cpu,
        Some(i) => {
            let device = Device::new_cuda(i)?;
            #[cfg(feature = "cuda")]
            acrf_worker::cuda::prepare(&device)?;
            device
        }
    })
}

/// Reports how a distributed run ended; `again` is the command that continues a stopped one.
fn report_group(done: &crate::group::GroupOutcome, again: &str) {
    if done.stopped_early {
        println!("stopped at step {}; continue with: {again}", done.steps_done);
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
        Command::Train { config, sets, resume, print_config, device: dev, device_memory, workers, devices } => {
            let cfg = job::load_config(&config, &sets)?;
            if print_config {
                print!("{}", cfg.to_toml_string()?);
                return Ok(());
            }
            let device = device(&dev)?;
            let limit = plan::memory_limit(&cfg, device_memory, Some(&device))?;
            if limit.is_some() {
                plan::check(&plan::job_workload(&cfg, device.is_cuda(), None, None)?, limit)?;
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
                    anyhow::bail!(
                        "--resume STEP is for single-process runs; a distributed run resumes from its newest checkpoint"
                    );
                }
                let done = launch::train_with_local_workers(&cfg, n, &devices, stop, progress_bar())?;
                report_group(&done, &format!("acrf train {} --workers {n}", config.display()));
                return Ok(());
            }
            let done = job::train_here(&cfg, &device, from, stop)?;
            if done.outcome.stopped_early {
                println!("stopped at step {}; continue with: acrf train {}", done.outcome.steps_done, config.display());
            }
            if let Some(url) = &done.outcome.lora_url {
                println!("LoRA: {url}");
            }
            Ok(())
        }
        Command::Launch { config, hosts, listen, advertise, restarts, sets } => {
            let cfg = job::load_config(&config, &sets)?;
            let file = remote::HostsFile::load(&hosts)?;
            let stop = job::stop_on_signals()?;
            let done = remote::launch(&cfg, &file, listen, advertise, restarts, stop)?;
            report_group(&done, &format!("acrf launch --hosts {} {}", hosts.display(), config.display()));
            Ok(())
        }
        Command::Plan { config, sets, device, device_memory, resolution, caption_tokens, synthetic } => {
            let gpu = cuda_ordinal(&device)?.is_some();
            let latent = resolution.as_deref().map(plan::parse_resolution).transpose()?;
            let (cfg, workload) = match config {
                Some(path) => {
                    let cfg = job::load_config(&path, &sets)?;
                    let workload = plan::job_workload(&cfg, gpu, latent, caption_tokens)?;
                    (cfg, workload)
                }
                None => {
                    let mut cfg = synthetic.config(Path::new("."));
                    job::apply_sets(&mut cfg, &sets)?;
                    let (hw, cap) = synthetic.shapes();
                    let shapes = (latent.unwrap_or(hw), caption_tokens.unwrap_or(cap));
                    let workload = Workload::new(&cfg, synthetic.model_config(), gpu, shapes.0, shapes.1);
                    (cfg, workload)
                }
            };
            print!("{}", plan::table(&workload, plan::memory_limit(&cfg, device_memory, None)?));
            Ok(())
        }
        Command::Bench { config, sets, steps, warmup, device: dev, json, profile, synthetic } => {
            let (_dir, cfg) = match config {
                Some(path) => (None, job::load_config(&path, &sets)?),
                None => {
                    let (dir, mut cfg) = bench::synthetic_job(&synthetic)?;
                    job::apply_sets(&mut cfg, &sets)?;
                    (Some(dir), cfg)
                }
            };
            let report = bench::run(&cfg, &device(&dev)?, steps, warmup, profile)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::Doctor { device: dev, json } => doctor::run(&device(&dev)?, json),
        Command::Coordinator { config, listen, advertise, identity, token_file, sets } => {
            let cfg = job::load_config(&config, &sets)?;
            let l = launch::listen(&cfg, listen, advertise, identity.as_deref())?;
            println!("coordinator listening on {}", l.endpoint.local_addr()?);
            let token = l.token.encode();
            match &token_file {
                Some(path) => {
                    launch::write_token_file(path, &token)?;
                    println!("join token written to {}", path.display());
                }
                None => println!("join with: {}={token} acrf worker --device cuda:0", launch::TOKEN_VAR),
            }
            let stop = job::stop_on_signals()?;
            let done = launch::serve(&cfg, l, stop, progress_bar())?;
            report_group(&done, &format!("acrf coordinator {}", config.display()));
            Ok(())
        }
        Command::Token { identity, advertise } => {
            let (id, secret) = launch::identity_and_secret(Some(&identity))?;
            let token = acrf_common::protocol::JoinToken { addrs: advertise, fingerprint: id.fingerprint, secret };
            println!("{}", token.encode());
            Ok(())
        }
        Command::Worker {
            join,
            device: dev,
            reconnect_for,
            collective_listen,
            coordinator,
            exit_when_stdin_closes,
        } => {
            if exit_when_stdin_closes {
                remote::exit_when_stdin_closes();
            }
            let join =
                join.with_context(|| format!("no join token: set {} (or pass --join TOKEN)", launch::TOKEN_VAR))?;
            let token = acrf_common::protocol::JoinToken::decode(&join)?;
            let opts = agent::AgentOptions {
                device: device(&dev)?,
                device_name: dev,
                reconnect_for: std::time::Duration::from_secs(reconnect_for),
                collective_listen,
                coordinator,
            };
            agent::run(token, opts)
        }
        Command::Cache(args) => cache::run(&args),
        Command::Sweep(args) => sweep::run(&args, job::stop_on_signals()?),
        Command::Sample(args) => sample::run(&args),
        Command::Report { run, out } => {
            let written = report::write(&run, out.as_deref())?;
            println!("report: {}", written.display());
            Ok(())
        }
        Command::Inspect { file } => {
            print!("{}", acrf_worker::lora::Lora::describe(&file)?);
            Ok(())
        }
    }
}
