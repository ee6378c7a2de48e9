//! Every flag of the `acrf` command line, by subcommand. Public so that tests can run the recipes under
//! deploy/ through the parser (`Cli::try_parse_from`) without running them; what each subcommand does with
//! its flags is in `commands`.

use std::net::SocketAddr;
use std::path::PathBuf;

use acrf_common::config::{DeviceMemory, LossMode};
use acrf_worker::checkpoint::{ResumeFrom, ResumeRequest};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::launch::cluster::TOKEN_VAR;

/// The whole command line.
#[derive(Parser)]
#[command(name = "acrf", version, about = "AC-RF LoRA training for Z-Image Turbo on CPU, one GPU or many")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write a tiny model, a synthetic dataset and a job into DIR, then train it on the CPU.
    Demo(DemoArgs),
    /// Train the LoRA a job file describes.
    Train(TrainArgs),
    /// Predict a job's peak device memory per rank and its FLOPs per optimizer step, without loading anything.
    Plan(PlanArgs),
    /// Time a job's optimizer steps: step time, tokens/s, FLOP/s, phase shares and peak memory.
    Bench(BenchArgs),
    /// Report the CPU, the GPU, its driver and NCCL, and check every fused kernel (values and gradients)
    /// against the composed ops it replaces on random inputs; exits non-zero if one disagrees.
    Doctor(DoctorArgs),
    /// Train with one worker per GPU of the machines in a hosts file, each started over ssh, under a
    /// coordinator in this process.
    Launch(LaunchArgs),
    /// Coordinate a job whose workers run elsewhere: prints the join token and waits for them.
    Coordinator(CoordinatorArgs),
    /// Print the join token of a coordinator identity, creating the identity file first if it does not
    /// exist: for deployments that hand workers their token before the coordinator starts.
    Token(TokenArgs),
    /// Join a job as one training rank.
    Worker(WorkerArgs),
    /// Encode a folder of images and captions into the cached dataset that training reads.
    Cache(Box<CacheArgs>),
    /// Train one job per combination of loss modes and `--set` values, each a group of its own, several at a
    /// time; re-running it continues where it stopped.
    Sweep(Box<SweepArgs>),
    /// Render one image with a base model and a LoRA, as the training samples are rendered.
    Sample(Box<SampleArgs>),
    /// Write report.html (self-contained) and PNG plots of a run or a sweep.
    Report(ReportArgs),
    /// Print a LoRA file's modules, rank, alpha, dtype and metadata.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "acrf-demo")]
    pub dir: PathBuf,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The job file (TOML).
    pub config: PathBuf,
    /// Override a key, e.g. `--set training.learning_rate=5e-5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub resume: ResumeArgs,
    /// Print the effective config with every default and exit.
    #[arg(long)]
    pub print_config: bool,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Train with N local worker processes under a coordinator in this process.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Devices of the local workers, e.g. `cuda:0,cuda:1` (default: cpu for all).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Refuse the job unless its predicted peak fits in this much memory, e.g. `24GiB` (default:
    /// compute.device_memory, whose `auto` is the GPU's own memory and no check on a CPU).
    #[arg(long, value_name = "SIZE")]
    pub device_memory: Option<DeviceMemory>,
}

/// Where a run continues, on every path that trains (`train`, `train --workers`, `coordinator`, `launch`).
#[derive(Args)]
pub struct ResumeArgs {
    /// Continue from the checkpoint of step STEP (default: the newest valid one, as `checkpoint.resume =
    /// "auto"` does).
    #[arg(long, value_name = "STEP", num_args = 0..=1, default_missing_value = "latest")]
    pub resume: Option<String>,
    /// Train a finished or stopped run longer: the job's training.max_steps (or epochs) may exceed the
    /// checkpoint's, and the LR schedule spans the new length; every other training setting must match.
    #[arg(long)]
    pub extend: bool,
}

impl ResumeArgs {
    pub fn request(&self) -> Result<ResumeRequest> {
        let from = match self.resume.as_deref() {
            None | Some("latest") => ResumeFrom::Config,
            Some(step) => {
                ResumeFrom::Step(step.parse().ok().with_context(|| format!("--resume {step}: not a step number"))?)
            }
        };
        Ok(ResumeRequest { from, extend: self.extend })
    }
}

#[derive(Args)]
pub struct PlanArgs {
    /// The job file (TOML).
    #[arg(required_unless_present = "synthetic", conflicts_with = "synthetic")]
    pub config: Option<PathBuf>,
    /// Override a key, e.g. `--set training.batch_size=2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// The device to plan for, `cpu` or `cuda[:N]` (nothing is opened).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Check the plan against this much memory, e.g. `24GiB` (default: compute.device_memory).
    #[arg(long, value_name = "SIZE")]
    pub device_memory: Option<DeviceMemory>,
    /// Plan for images of WIDTHxHEIGHT pixels instead of the dataset's largest bucket.
    #[arg(long, value_name = "WxH")]
    pub resolution: Option<String>,
    /// Plan for captions this long instead of the dataset's longest.
    #[arg(long, value_name = "N")]
    pub caption_tokens: Option<usize>,
    #[command(flatten)]
    pub synthetic: SyntheticArgs,
}

#[derive(Args)]
pub struct BenchArgs {
    /// The job file (TOML).
    #[arg(required_unless_present = "synthetic", conflicts_with = "synthetic")]
    pub config: Option<PathBuf>,
    /// Override a key, e.g. `--set compute.mode=lean` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed optimizer steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the measurements as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// After the timed steps, profile a few more: time per op site (norms, projections, qk-norm + RoPE,
    /// attention, feed-forward, LoRA) and pass, GPU time from CUDA events beside the host's. On a GPU the
    /// profiled steps run between cuProfilerStart and cuProfilerStop, so `ncu --profile-from-start off`
    /// captures exactly them.
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub synthetic: SyntheticArgs,
}

#[derive(Args)]
pub struct DoctorArgs {
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct LaunchArgs {
    /// The job file (TOML).
    pub config: PathBuf,
    /// The machines, their GPUs and how to reach them (deploy/ssh/hosts.example.toml).
    #[arg(long)]
    pub hosts: PathBuf,
    /// UDP address to listen on (default: the hosts file's `coordinator.listen`, else 0.0.0.0:7600).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Addresses the workers dial (default: the hosts file's `coordinator.advertise`, else this
    /// machine's address on its route to each host).
    #[arg(long, value_delimiter = ',')]
    pub advertise: Vec<SocketAddr>,
    /// Start a failed worker again up to this many times in all (the group re-forms around it); by
    /// default the first failure stops every worker, and the same command continues from the last
    /// checkpoint.
    #[arg(long, default_value_t = 0)]
    pub restarts: usize,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub resume: ResumeArgs,
}

#[derive(Args)]
pub struct CoordinatorArgs {
    pub config: PathBuf,
    /// UDP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7600")]
    pub listen: SocketAddr,
    /// Addresses workers should dial (default: the listen address).
    #[arg(long, value_delimiter = ',')]
    pub advertise: Vec<SocketAddr>,
    /// Keep the certificate and secret in this file, so a restarted coordinator keeps its token.
    #[arg(long)]
    pub identity: Option<PathBuf>,
    /// Write the join token to this file (owner-only) instead of printing it.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[command(flatten)]
    pub resume: ResumeArgs,
}

#[derive(Args)]
pub struct TokenArgs {
    /// The identity file `acrf coordinator --identity` will use.
    #[arg(long)]
    pub identity: PathBuf,
    /// Addresses the token names; workers started with `--coordinator` dial those names instead.
    #[arg(long, value_delimiter = ',', required = true)]
    pub advertise: Vec<SocketAddr>,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The token of `acrf coordinator`; rather give it in the environment, as `ps` shows arguments to
    /// every user.
    #[arg(long, env = TOKEN_VAR, hide_env_values = true)]
    pub join: Option<String>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// How long to keep trying to reach a coordinator that went away, in seconds.
    #[arg(long, default_value_t = 60)]
    pub reconnect_for: u64,
    /// Where the ring collective listens for its peers (TCP), e.g. `0.0.0.0:29500` for a firewall;
    /// peers dial its port at the address the coordinator sees this worker at. Default: an ephemeral
    /// port on every interface.
    #[arg(long, value_name = "ADDR")]
    pub collective_listen: Option<SocketAddr>,
    /// Dial the coordinator at HOST:PORT instead of the token's addresses, looked up again at every
    /// reconnect: a stable DNS name follows a coordinator restarted elsewhere (a Kubernetes pod).
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    pub coordinator: Vec<String>,
    /// Exit as soon as stdin reaches its end: how `acrf launch` ties a remote worker to its ssh session.
    #[arg(long)]
    pub exit_when_stdin_closes: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    /// The folder of a run (`<output>/runs/<run>`) or of a sweep (`<output>/runs/<sweep>`): a path or URL.
    pub run: String,
    /// Where to write (default: that folder, when it is local).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A LoRA .safetensors in ComfyUI/diffusers, peft or kohya layout.
    pub file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Latent {
    /// The mean of the VAE's latent distribution.
    Mean,
    /// A sample of it, drawn per image from --seed and the image's path.
    Sample,
}

#[derive(Debug, Clone, PartialEq, Args)]
pub struct CacheArgs {
    /// The images (.jpg, .jpeg, .png, .webp in any case, searched recursively), each with its caption in
    /// <name>.txt or <name>.caption next to it.
    #[arg(long)]
    pub images: PathBuf,
    /// A diffusers Z-Image folder: vae/, text_encoder/ and tokenizer/ are used.
    #[arg(long)]
    pub model: PathBuf,
    /// Where the dataset goes: a directory, or a file://, s3://, gs://, az:// or memory:// URL.
    #[arg(long)]
    pub out: String,
    /// Buckets hold about RESOLUTION² pixels (smaller images are never upscaled).
    #[arg(long, default_value_t = 1024)]
    pub resolution: u32,
    /// Bucket sides are multiples of this (a multiple of 16; default resolution/16 rounded down to one, 64
    /// at 1024).
    #[arg(long, value_name = "PX")]
    pub bucket_step: Option<u32>,
    /// Images whose shorter side is under PX are skipped as too small (default resolution/4).
    #[arg(long, value_name = "PX")]
    pub min_side: Option<u32>,
    #[arg(long, value_enum, default_value = "mean")]
    pub latent: Latent,
    /// Seeds the caption dropout and latent samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Captions are cut to this many tokens, template included.
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// The probability that an image's caption is stored as the empty caption (fixed per image by --seed
    /// and its path).
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub caption_dropout: f64,
    /// Put in front of every caption, e.g. "sks".
    #[arg(long, value_name = "TEXT")]
    pub class_token: Option<String>,
    /// Encode images without a caption (no caption file, or an empty one) with the empty caption instead of
    /// skipping them.
    #[arg(long)]
    pub allow_empty_captions: bool,
    /// Exit successfully even if some images were skipped (they are listed in cache_report.json either way).
    #[arg(long)]
    pub skip_bad: bool,
    /// The training batch size, for the warning about buckets too small for it.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// The training world size, for the same warning.
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// Processes on this machine to spread the images over.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Spread the images over the devices of this hosts file (that of `acrf launch`), one process per
    /// device, started over ssh. The images, the model and a directory --out must be at the same paths there
    /// (a shared file system); an object-store --out takes its credentials from each host's `env`, where
    /// RAYON_NUM_THREADS also bounds a CPU shard's matmul threads.
    #[arg(long, value_name = "FILE", conflicts_with = "workers")]
    pub hosts: Option<PathBuf>,
    /// Decoding threads per process (default: the cores, divided among the workers).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `cpu` or `cuda:N`, for the encoders.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run as worker i of N of a parent `acrf cache`.
    #[arg(long, hide = true, value_name = "i/N")]
    pub shard: Option<String>,
    /// How many of the N shard processes share this machine's cores.
    #[arg(long, hide = true, value_name = "K")]
    pub shards_here: Option<usize>,
}

#[derive(Args)]
pub struct SweepArgs {
    /// The job file every combination starts from.
    pub config: PathBuf,
    /// Loss modes to train, e.g. `standard,frequency,style,unified`.
    #[arg(long, value_delimiter = ',')]
    pub loss_modes: Vec<LossMode>,
    /// Values of a key to sweep, e.g. `--set training.learning_rate=1e-4,5e-5` (repeatable; commas inside
    /// brackets or quotes do not split).
    #[arg(long = "set", value_name = "KEY=V1,V2")]
    pub sets: Vec<String>,
    /// Local worker processes in all.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Workers (ranks) of each job; jobs run concurrently while workers are free.
    #[arg(long, default_value_t = 1)]
    pub workers_per_job: usize,
    /// Devices of the workers, e.g. `cuda:0,cuda:1`, handed out in order: job slot s gets the s-th group of
    /// `--workers-per-job` (default: cpu for all).
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// The sweep's folder under `runs/` (default: the job file's run_name).
    #[arg(long)]
    pub sweep_id: Option<String>,
}

#[derive(Args)]
pub struct SampleArgs {
    /// A diffusers Z-Image pipeline folder (transformer/, vae/, text_encoder/, tokenizer/).
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA .safetensors (ComfyUI/diffusers, peft or kohya layout); without it, the base model alone.
    #[arg(long)]
    pub lora: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Turbo sampler steps.
    #[arg(long, default_value_t = 9)]
    pub steps: usize,
    /// Seeds the initial noise; the same seed gives the same PNG.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Scales the LoRA's update.
    #[arg(long, default_value_t = 1.0)]
    pub strength: f64,
    /// A frozen adapter merged into the base first, `FILE[:STRENGTH]` (strength 1 by default); repeatable.
    #[arg(long = "adapter", value_name = "FILE[:STRENGTH]", value_parser = acrf_worker::adapters::parse_flag)]
    pub adapters: Vec<acrf_common::config::AdapterConfig>,
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Caption tokens the transformer sees.
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Where to write the PNG.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct SyntheticArgs {
    /// Use a random model and item built from the flags below instead of a job file.
    #[arg(long)]
    pub synthetic: bool,
    /// Z-Image Turbo's own shape (dim 3840, 30 heads, 30 layers, 2 refiners, caption width 2560); overrides
    /// --dim, --heads, --layers and --refiners.
    #[arg(long, requires = "synthetic")]
    pub turbo: bool,
    /// Model width; the caption features are this wide too, as in torch_step.py.
    #[arg(long, default_value_t = 256, requires = "synthetic")]
    pub dim: usize,
    #[arg(long, default_value_t = 4, requires = "synthetic")]
    pub heads: usize,
    #[arg(long, default_value_t = 4, requires = "synthetic")]
    pub layers: usize,
    #[arg(long, default_value_t = 2, requires = "synthetic")]
    pub refiners: usize,
    /// Latent height and width (the image is 8× larger).
    #[arg(long, default_value_t = 32, requires = "synthetic")]
    pub hw: usize,
    /// Caption tokens.
    #[arg(long, default_value_t = 64, requires = "synthetic")]
    pub cap: usize,
    /// LoRA rank (alpha equals it).
    #[arg(long, default_value_t = 16, requires = "synthetic")]
    pub rank: usize,
    /// Adapters on the feed-forward linears too, not only on attention.
    #[arg(long, requires = "synthetic")]
    pub ffn: bool,
    /// Gradient checkpointing.
    #[arg(long, requires = "synthetic")]
    pub ckpt: bool,
    /// Base weights in bf16 (the LoRA stays f32).
    #[arg(long, requires = "synthetic")]
    pub bf16: bool,
}
