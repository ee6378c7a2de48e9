//! `acrf cache`: the command-line edge of [`acrf_worker::cache`]: its flags, the progress bar, the worker
//! processes of `--workers N` and the summary.
//!
//! With `--workers N` this process runs N copies of its own binary with the same arguments plus
//! `--shard i/N`. Each child caches its shard, writing item files only, and reports on stdout: one
//! [`PROGRESS`] line per image and a last [`RESULT`] line with its [`Outcome`]. Once every child has
//! succeeded, the parent writes the one manifest and the report (see [`acrf_worker::cache::pipeline`] for
//! why that is safe); if any fails, nothing is committed and the previous dataset stays as it was.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use acrf_common::store::Location;
use acrf_worker::cache::bucket::BucketSpec;
use acrf_worker::cache::encode::LatentMode;
use acrf_worker::cache::pipeline::{BatchShape, Cache, CacheOptions, Outcome, REPORT, Report, Shard};
use anyhow::{Context, Result, anyhow, bail};
use indicatif::ProgressBar;

use crate::observe::progress_bar;

const PROGRESS: &str = "acrf-cache-progress";
const RESULT: &str = "acrf-cache-result ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Latent {
    /// The mean of the VAE's latent distribution.
    Mean,
    /// A sample of it, drawn per image from --seed and the image's path.
    Sample,
}

#[derive(Debug, Clone, clap::Args)]
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
    /// Processes to spread the images over.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Decoding threads per process (default: the cores, divided among the workers).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `cpu` or `cuda:N`, for the encoders.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Run as worker i of N of a parent `acrf cache`.
    #[arg(long, hide = true, value_name = "i/N")]
    pub shard: Option<String>,
}

impl CacheArgs {
    /// The library's options; `processes` share the cores for the default thread count.
    pub fn options(&self, processes: usize) -> Result<CacheOptions> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(CacheOptions {
            images: self.images.clone(),
            model: self.model.clone(),
            out: self.out.clone(),
            buckets: BucketSpec::new(self.resolution, self.bucket_step, self.min_side).map_err(|e| anyhow!(e))?,
            latent: match self.latent {
                Latent::Mean => LatentMode::Mean,
                Latent::Sample => LatentMode::Sample,
            },
            seed: self.seed,
            max_sequence_length: self.max_sequence_length,
            caption_dropout: self.caption_dropout,
            class_token: self.class_token.clone(),
            allow_empty_captions: self.allow_empty_captions,
            threads: self.threads.unwrap_or((cores / processes.max(1)).max(1)),
            device: crate::cli::device(&self.device)?,
        })
    }
}

/// `acrf cache`.
pub fn run(args: &CacheArgs) -> Result<()> {
    if let Some(shard) = &args.shard {
        return run_shard(args, Shard::parse(shard).map_err(|e| anyhow!(e))?);
    }
    if args.workers == 0 || args.batch_size == 0 || args.world_size == 0 {
        bail!("--workers, --batch-size and --world-size must be at least 1");
    }
    let cache = Cache::open(args.options(args.workers)?)?;
    let bar = progress_bar();
    bar.set_length(cache.sources().len() as u64);
    let outcomes =
        if args.workers == 1 { vec![cache.run(Shard::WHOLE, &|| bar.inc(1))?] } else { run_workers(args, &bar)? };
    bar.finish_and_clear();
    let report = cache.commit(outcomes, BatchShape { batch_size: args.batch_size, world_size: args.world_size })?;
    print!("{}", summary(&report));
    let report_url = format!("{}/{REPORT}", report.dataset.trim_end_matches('/'));
    if report.cached == 0 {
        bail!("no image could be cached (see {report_url})");
    }
    if !report.skipped.is_empty() && !args.skip_bad {
        bail!("{} image(s) skipped, listed in {report_url}; pass --skip-bad to accept that", report.skipped.len());
    }
    Ok(())
}

fn run_shard(args: &CacheArgs, shard: Shard) -> Result<()> {
    let cache = Cache::open(args.options(shard.count)?)?;
    let stdout = std::io::stdout();
    let outcome = cache.run(shard, &|| {
        let mut out = stdout.lock();
        // The parent only draws a bar from these; a lost line is not worth failing the shard for.
        let _ = writeln!(out, "{PROGRESS}").and_then(|()| out.flush());
    })?;
    println!("{RESULT}{}", serde_json::to_string(&outcome)?);
    Ok(())
}

fn run_workers(args: &CacheArgs, bar: &ProgressBar) -> Result<Vec<Outcome>> {
    let n = args.workers;
    if matches!(Location::parse(&args.out)?, Location::Memory { .. }) {
        bail!("--workers {n} needs an --out that other processes reach; a memory:// store lives in one process");
    }
    let exe = std::env::current_exe().context("finding this program to start the workers")?;
    let parent_args: Vec<_> = std::env::args_os().skip(1).collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut children = Vec::new();
    for i in 0..n {
        let mut command = Command::new(&exe);
        command.args(&parent_args).args(["--shard", &format!("{i}/{n}")]).stdout(Stdio::piped());
        // The encoders' own thread pools share the cores too.
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            command.env("RAYON_NUM_THREADS", (cores / n).max(1).to_string());
        }
        children.push(command.spawn().with_context(|| format!("starting cache worker {i}/{n}"))?);
    }
    std::thread::scope(|scope| {
        let readers: Vec<_> = children
            .iter_mut()
            .map(|child| {
                let stdout = child.stdout.take().expect("piped above");
                scope.spawn(move || -> Result<Option<Outcome>> {
                    let mut outcome = None;
                    for line in BufReader::new(stdout).lines() {
                        let line = line?;
                        if line == PROGRESS {
                            bar.inc(1);
                        } else if let Some(json) = line.strip_prefix(RESULT) {
                            outcome = Some(serde_json::from_str(json)?);
                        }
                    }
                    Ok(outcome)
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        let mut failures = Vec::new();
        for (i, (reader, child)) in readers.into_iter().zip(&mut children).enumerate() {
            let read = reader.join().map_err(|_| anyhow!("reading cache worker {i}/{n} panicked"))?;
            let status = child.wait()?;
            match read {
                Ok(Some(outcome)) if status.success() => outcomes.push(outcome),
                Ok(_) => failures.push(format!("worker {i}/{n} {status}")),
                Err(e) => failures.push(format!("worker {i}/{n}: {e}")),
            }
        }
        if !failures.is_empty() {
            bail!("cache workers failed ({}); nothing was committed", failures.join("; "));
        }
        Ok(outcomes)
    })
}

/// The end-of-run summary: counts, skipped images, warnings, buckets.
pub fn summary(report: &Report) -> String {
    let mut out = format!(
        "cached {} of {} images into {} ({} encoded, {} kept from the last run)\n",
        report.cached, report.images, report.dataset, report.encoded, report.reused
    );
    for (what, notes) in [("skipped", &report.skipped), ("warning", &report.warnings)] {
        for note in notes {
            out += &format!("{what}: {}: {}\n", note.source, note.message);
        }
    }
    out += "buckets (width x height: items):\n";
    for b in &report.buckets {
        out += &format!("  {}x{}: {}\n", b.width, b.height, b.items);
        if let Some(warning) = &b.warning {
            out += &format!("    warning: {warning}\n");
        }
    }
    out
}
