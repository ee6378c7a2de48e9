//! `acrf cache`: the command-line edge of [`acrf_worker::cache`]: its flags, the progress bar, the worker
//! processes of `--workers N` and the summary.
//!
//! With `--workers N` this process runs N copies of its own binary with the same settings plus
//! `--shard i/N`; with `--hosts FILE` (the hosts file of `acrf launch`) it runs one such child per listed
//! device, each in an ssh session on its machine, the way `acrf launch` starts the workers of a distributed
//! job (see `launch::ssh`). Each child caches its shard, writing item files only, and reports on stdout: one
//! [`PROGRESS`] line per image and a last [`RESULT`] line with its [`Outcome`]. Once every child has
//! succeeded, the parent writes the one manifest and the report (see [`acrf_worker::cache::pipeline`] for
//! why that is safe); if any fails, nothing is committed and the previous dataset stays as it was.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use acrf_common::store::Location;
use acrf_worker::cache::bucket::BucketSpec;
use acrf_worker::cache::encode::LatentMode;
use acrf_worker::cache::pipeline::{BatchShape, Cache, CacheOptions, Outcome, REPORT, Report, Shard};
use acrf_worker::device;
use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use indicatif::ProgressBar;

use crate::args::{CacheArgs, Latent};
use crate::exit::{Exit, refused};
use crate::launch::die_with_parent;
use crate::launch::ssh::{self, HostsFile};
use crate::observe::progress_bar;

const PROGRESS: &str = "acrf-cache-progress";
const RESULT: &str = "acrf-cache-result ";

impl CacheArgs {
    /// The library's options; `processes` share the cores for the default thread count.
    pub fn options(&self, processes: usize) -> Result<CacheOptions> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Ok(CacheOptions {
            images: self.images.clone(),
            model: self.model.clone(),
            out: self.out.clone(),
            buckets: BucketSpec::new(self.resolution, self.bucket_step, self.min_side)
                .map_err(|e| refused(anyhow!(e)))?,
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
            max_pixels: self.max_pixels,
            device: device::open(&self.device)?,
        })
    }

    /// The arguments after `acrf` that make shard `i` of `n` of this run on `device`, `here` of the shards
    /// sharing its machine. Paths are made absolute, for a child that starts elsewhere (an ssh session starts
    /// in the home directory).
    fn shard_argv(&self, i: usize, n: usize, here: usize, device: &str) -> Result<Vec<String>> {
        let path = |flag: &str, p: &Path| -> Result<String> {
            let abs = std::path::absolute(p).with_context(|| format!("{flag} {}", p.display()))?;
            abs.to_str().map(str::to_string).with_context(|| format!("{flag} {} is not UTF-8", p.display()))
        };
        let out = match Location::parse(&self.out)? {
            Location::Local(dir) if !self.out.starts_with("file://") => path("--out", &dir)?,
            _ => self.out.clone(),
        };
        let latent = self.latent.to_possible_value().expect("no variant is skipped");
        let mut argv: Vec<String> = vec!["cache".into()];
        // `--name=value`, so that a value that starts with a hyphen is not taken for a flag.
        let mut flag = |name: &str, value: String| argv.push(format!("--{name}={value}"));
        flag("images", path("--images", &self.images)?);
        flag("model", path("--model", &self.model)?);
        flag("out", out);
        flag("resolution", self.resolution.to_string());
        flag("latent", latent.get_name().to_string());
        flag("seed", self.seed.to_string());
        flag("max-sequence-length", self.max_sequence_length.to_string());
        flag("caption-dropout", self.caption_dropout.to_string());
        flag("max-pixels", self.max_pixels.to_string());
        flag("device", device.to_string());
        flag("shard", format!("{i}/{n}"));
        flag("shards-here", here.to_string());
        for (name, value) in [
            ("bucket-step", self.bucket_step.map(|v| v.to_string())),
            ("min-side", self.min_side.map(|v| v.to_string())),
            ("class-token", self.class_token.clone()),
            ("threads", self.threads.map(|v| v.to_string())),
        ] {
            if let Some(value) = value {
                flag(name, value);
            }
        }
        if self.allow_empty_captions {
            argv.push("--allow-empty-captions".into());
        }
        Ok(argv)
    }
}

/// `acrf cache`: [`Exit::Skipped`] when the manifest it wrote leaves out images and `--skip-bad` was not given.
pub fn run(args: &CacheArgs) -> Result<Exit> {
    if let Some(shard) = &args.shard {
        run_shard(args, Shard::parse(shard).map_err(|e| anyhow!(e))?)?;
        return Ok(Exit::Finished);
    }
    if args.workers == 0 || args.batch_size == 0 || args.world_size == 0 {
        return Err(refused(anyhow!("--workers, --batch-size and --world-size must be at least 1")));
    }
    let hosts = args.hosts.as_deref().map(HostsFile::load).transpose()?;
    let cache = Cache::open(args.options(args.workers)?)?;
    let bar = progress_bar();
    bar.set_length(cache.sources().len() as u64);
    let outcomes = match &hosts {
        Some(file) => collect(remote_shards(args, file)?, &bar)?,
        None if args.workers == 1 => vec![cache.run(Shard::WHOLE, &|| bar.inc(1))?],
        None => collect(local_shards(args)?, &bar)?,
    };
    bar.finish_and_clear();
    let report = cache.commit(outcomes, BatchShape { batch_size: args.batch_size, world_size: args.world_size })?;
    print!("{}", summary(&report));
    let report_url = format!("{}/{REPORT}", report.dataset.trim_end_matches('/'));
    if report.cached == 0 {
        bail!("no image could be cached (see {report_url})");
    }
    if !report.skipped.is_empty() && !args.skip_bad {
        eprintln!(
            "{} image(s) skipped, listed in {report_url}; the dataset of the other {} is usable (exit status 3); \
             pass --skip-bad to accept that with exit status 0",
            report.skipped.len(),
            report.cached
        );
        return Ok(Exit::Skipped);
    }
    Ok(Exit::Finished)
}

fn run_shard(args: &CacheArgs, shard: Shard) -> Result<()> {
    let cache = Cache::open(args.options(args.shards_here.unwrap_or(shard.count))?)?;
    let stdout = std::io::stdout();
    let outcome = cache.run(shard, &|| {
        let mut out = stdout.lock();
        // The parent only draws a bar from these; a lost line is not worth failing the shard for.
        let _ = writeln!(out, "{PROGRESS}").and_then(|()| out.flush());
    })?;
    println!("{RESULT}{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// A shard process that runs: its name in messages, and the process whose stdout carries its reports.
type Running = (String, Child);

fn local_shards(args: &CacheArgs) -> Result<Vec<Running>> {
    let n = args.workers;
    refuse_memory_store(args, n)?;
    let exe = std::env::current_exe().context("finding this program to start the workers")?;
    // The encoders' matmul threads share this process's budget (the user's RAYON_NUM_THREADS, or the one
    // `cli` sets before anything runs); a child would otherwise take all of it.
    let budget = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok());
    let budget = budget.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    (0..n)
        .map(|i| {
            let mut command = Command::new(&exe);
            command.args(args.shard_argv(i, n, n, &args.device)?).stdout(Stdio::piped());
            command.env("RAYON_NUM_THREADS", (budget / n).max(1).to_string());
            die_with_parent(&mut command);
            let name = format!("worker {i}/{n}");
            Ok((name.clone(), command.spawn().with_context(|| format!("starting cache {name}"))?))
        })
        .collect()
}

fn remote_shards(args: &CacheArgs, file: &HostsFile) -> Result<Vec<Running>> {
    let slots = file.slots();
    let n = slots.len();
    refuse_memory_store(args, n)?;
    slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let host = &file.hosts[slot.host];
            let mut argv = vec![host.binary.clone()];
            argv.extend(args.shard_argv(i, n, host.gpus.len(), &slot.device)?);
            let name = format!("worker {i}/{n} ({} {})", host.host, slot.device);
            let child = ssh::session(host, &argv, None, &format!("[{name}]"))
                .with_context(|| format!("starting cache {name}"))?;
            Ok((name, child))
        })
        .collect()
}

fn refuse_memory_store(args: &CacheArgs, n: usize) -> Result<()> {
    if matches!(Location::parse(&args.out)?, Location::Memory { .. }) {
        bail!("{n} cache workers need an --out that other processes reach; a memory:// store lives in one process");
    }
    Ok(())
}

/// Draws the bar from the shards' progress lines and gathers their outcomes: all of them, or an error that
/// names each one that failed.
fn collect(mut shards: Vec<Running>, bar: &ProgressBar) -> Result<Vec<Outcome>> {
    std::thread::scope(|scope| {
        let readers: Vec<_> = shards
            .iter_mut()
            .map(|(_, child)| {
                let stdout = child.stdout.take().expect("piped when started");
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
        for (reader, (name, child)) in readers.into_iter().zip(&mut shards) {
            let read = reader.join().map_err(|_| anyhow!("reading cache {name} panicked"))?;
            let status = child.wait()?;
            match read {
                Ok(Some(outcome)) if status.success() => outcomes.push(outcome),
                Ok(_) => failures.push(format!("{name} {status}")),
                Err(e) => failures.push(format!("{name}: {e}")),
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
    if let Some(advice) = &report.too_small {
        out += &format!("{advice}\n");
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    enum Top {
        Cache(CacheArgs),
    }

    fn parse(argv: &[&str]) -> CacheArgs {
        let Top::Cache(args) = Top::try_parse_from(std::iter::once("acrf").chain(argv.iter().copied())).unwrap();
        args
    }

    #[test]
    fn a_shard_is_told_every_setting_that_shapes_its_items() {
        let full = [
            "cache",
            "--images",
            "imgs",
            "--model",
            "/m",
            "--out",
            "s3://b/p",
            "--resolution",
            "512",
            "--bucket-step",
            "32",
            "--min-side",
            "100",
            "--latent",
            "sample",
            "--seed",
            "7",
            "--max-sequence-length",
            "77",
            "--caption-dropout",
            "0.25",
            "--max-pixels",
            "1000000",
            "--class-token",
            "sks dog's",
            "--allow-empty-captions",
            "--skip-bad",
            "--batch-size",
            "4",
            "--world-size",
            "2",
            "--threads",
            "3",
            "--device",
            "cuda:0",
            "--hosts",
            "h.toml",
        ];
        // Every flag a user can give is in `full`: one added later fails here until it is passed on or left
        // out below on purpose.
        let top = Top::command();
        let cache = top.find_subcommand("cache").unwrap();
        for arg in cache.get_arguments().filter(|a| !a.is_hide_set()) {
            let long = format!("--{}", arg.get_long().unwrap());
            let given = |a: &&str| *a == long || a.starts_with(&format!("{long}="));
            assert!(long == "--workers" || full.iter().any(given), "{long} is not in the test");
        }
        let parent = parse(&full);
        let argv = parent.shard_argv(1, 4, 2, "cuda:1").unwrap();
        let child = parse(&argv.iter().map(String::as_str).collect::<Vec<_>>());
        let expected = CacheArgs {
            images: std::path::absolute("imgs").unwrap(),
            device: "cuda:1".into(),
            shard: Some("1/4".into()),
            shards_here: Some(2),
            // What only the parent acts on: the summary, the exit status and the workers.
            skip_bad: false,
            batch_size: 1,
            world_size: 1,
            hosts: None,
            ..parent.clone()
        };
        assert_eq!(child, expected);
        // A directory --out is passed on as an absolute path, a URL as it is.
        let local = parse(&["cache", "--images", "/i", "--model", "/m", "--out", "rel/out"]);
        let argv = local.shard_argv(0, 1, 1, "cpu").unwrap();
        assert!(argv.contains(&format!("--out={}", std::path::absolute("rel/out").unwrap().display())));
    }
}
