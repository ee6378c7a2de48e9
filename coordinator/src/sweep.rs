//! `acrf sweep`: one job per combination of loss modes and `--set` values, each trained as a data-parallel
//! group of its own (its own coordinator endpoint, ranks, collective and run folder `runs/<sweep>/<job>`), as
//! many at a time as the local workers allow.
//!
//! A job's run name is `<sweep>/<job>`, so it checkpoints, resumes and exports exactly as a run of that name
//! would: re-running the sweep skips the jobs whose last checkpoint is their last step and continues the others
//! from their newest checkpoint. A failed job is recorded and the others go on; the sweep fails at the end.
//! `sweep.json` at the sweep's root lists the jobs, their settings, status and folders, for people and for
//! `acrf report`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use acrf_common::config::{Config, is_credential_key, is_safe_run_name, is_safe_segment};
use acrf_common::store::BlockingStore;
use acrf_worker::checkpoint::{Checkpointer, ResumeRequest, Start};
use anyhow::{Context, Result, anyhow, bail};
use indicatif::MultiProgress;
use serde::{Deserialize, Serialize};
use tracing::{info_span, warn};

use crate::args::SweepArgs;
use crate::job::{self, writer_id};
use crate::launch::local::train_with_local_workers;
use crate::observe::progress_bar;

/// The manifest at the sweep's root.
pub const MANIFEST: &str = "sweep.json";
const LOSS_MODE: &str = "loss.loss_mode";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Running,
    Finished,
    /// Interrupted (SIGINT/SIGTERM) after a checkpoint; a re-run continues it.
    Stopped,
    Failed,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Finished => "finished",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    pub name: String,
    /// Each swept key with this job's value, in the order the sweep gave them.
    pub settings: Vec<(String, String)>,
    pub status: Status,
    /// The run folder, relative to the output: `runs/<sweep>/<job>`.
    pub prefix: String,
    pub steps_done: Option<u64>,
    pub lora: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub sweep: String,
    pub jobs: Vec<JobEntry>,
}

/// Splits `v1,v2,…` at the commas outside brackets and quotes, so that list values survive.
fn split_values(text: &str) -> Vec<String> {
    let (mut parts, mut current, mut depth, mut quote) = (Vec::new(), String::new(), 0i32, None);
    for c in text.chars() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('[' | '{', None) => depth += 1,
            (']' | '}', None) => depth -= 1,
            (',', None) if depth == 0 => {
                parts.push(std::mem::take(&mut current).trim().to_string());
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current.trim().to_string());
    parts
}

/// The swept keys with their values: the loss modes first, then every `--set`, in order.
fn dimensions(args: &SweepArgs) -> Result<Vec<(String, Vec<String>)>> {
    let mut dims = Vec::new();
    if !args.loss_modes.is_empty() {
        dims.push((LOSS_MODE.to_string(), args.loss_modes.iter().map(|m| m.name().to_string()).collect()));
    }
    for set in &args.sets {
        let (key, values) = set.split_once('=').with_context(|| format!("--set {set}: expected KEY=V1,V2,…"))?;
        let values = split_values(values);
        if values.iter().any(String::is_empty) {
            bail!("--set {set}: an empty value");
        }
        let key = key.trim().to_string();
        if may_hold_credentials(&key) {
            bail!(
                "--set {key}: a sweep does not vary credentials (every value would be written to {MANIFEST} and \
                 into a job's folder name); set it in the job file or the environment"
            );
        }
        if dims.iter().any(|(k, _)| *k == key) {
            bail!("`{key}` is swept twice");
        }
        dims.push((key, values));
    }
    if dims.is_empty() {
        bail!("nothing to sweep: give --loss-modes and/or --set KEY=V1,V2");
    }
    Ok(dims)
}

/// Whether a swept key is a storage credential, or a table that may hold one.
fn may_hold_credentials(key: &str) -> bool {
    matches!(key, "storage" | "storage.options") || (key.starts_with("storage.") && is_credential_key(key))
}

/// Every combination of the dimensions' values, the last dimension varying fastest.
fn combinations(dims: &[(String, Vec<String>)]) -> Vec<Vec<(String, String)>> {
    dims.iter().fold(vec![Vec::new()], |combos, (key, values)| {
        combos
            .iter()
            .flat_map(|combo| {
                values.iter().map(move |v| {
                    let mut next = combo.clone();
                    next.push((key.clone(), v.clone()));
                    next
                })
            })
            .collect()
    })
}

/// A job's folder name from its settings: the loss mode as it is, other keys as `<leaf>-<value>`, joined by
/// `_`, with anything a folder name cannot hold replaced by `-`.
fn job_name(settings: &[(String, String)]) -> String {
    let part = |(key, value): &(String, String)| {
        let raw =
            if key == LOSS_MODE { value.clone() } else { format!("{}-{value}", key.rsplit('.').next().unwrap_or(key)) };
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' }).collect()
    };
    let name: String = settings.iter().map(part).collect::<Vec<String>>().join("_");
    let name = name.trim_start_matches('.').to_string();
    if name.is_empty() { "job".into() } else { name }
}

struct Job {
    cfg: Config,
    entry: JobEntry,
}

/// The jobs of the sweep, their configs checked before anything runs.
fn plan(args: &SweepArgs, base: &Config, sweep: &str) -> Result<Vec<Job>> {
    let mut jobs: Vec<Job> = Vec::new();
    for (i, settings) in combinations(&dimensions(args)?).into_iter().enumerate() {
        let mut cfg = base.clone();
        for (key, value) in &settings {
            cfg.set_dotted(key, value).with_context(|| format!("--set {key}={value}"))?;
        }
        let mut name = job_name(&settings);
        if jobs.iter().any(|j| j.entry.name == name) || !is_safe_segment(&name) {
            name = format!("job{i:03}");
        }
        cfg.run_name = format!("{sweep}/{name}");
        cfg.validate().with_context(|| format!("job {name}"))?;
        // Concurrent jobs cannot share one port: each serves its page on a port of its own.
        if let Some(addr) = cfg.status.address()? {
            cfg.status.listen = std::net::SocketAddr::new(addr.ip(), 0).to_string();
        }
        let entry = JobEntry {
            prefix: format!("runs/{}", cfg.run_name),
            name,
            settings,
            status: Status::Pending,
            steps_done: None,
            lora: None,
            error: None,
        };
        jobs.push(Job { cfg, entry });
    }
    Ok(jobs)
}

/// The last step of a finished job; a job that cannot resume as it is says why when it runs.
fn finished_at(cfg: &Config) -> Result<Option<u64>> {
    Ok(match Checkpointer::new(cfg, &writer_id())?.start(ResumeRequest::CONFIG) {
        Ok(Start::Finished { step, .. }) => Some(step),
        _ => None,
    })
}

/// The manifest, shared by the job threads and rewritten whenever a job changes state.
struct Ledger {
    root: BlockingStore,
    manifest: Mutex<Manifest>,
}

impl Ledger {
    fn new(root: BlockingStore, manifest: Manifest) -> Ledger {
        let ledger = Ledger { root, manifest: Mutex::new(manifest) };
        ledger.write(&ledger.snapshot());
        ledger
    }

    fn write(&self, m: &Manifest) {
        let json = serde_json::to_vec_pretty(m).expect("the manifest serialises");
        if let Err(e) = self.root.put(MANIFEST, json) {
            warn!("writing {}: {e}", self.root.url_of(MANIFEST));
        }
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut JobEntry)) {
        let mut m = self.manifest.lock().unwrap_or_else(PoisonError::into_inner);
        change(&mut m.jobs[index]);
        self.write(&m);
    }

    fn snapshot(&self) -> Manifest {
        self.manifest.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Runs the sweep to its end (or to a stop) and prints its summary; an error when a job failed.
pub fn run(args: &SweepArgs, stop: Arc<AtomicBool>) -> Result<()> {
    if args.workers_per_job == 0 || args.workers < args.workers_per_job {
        bail!(
            "--workers ({}) must be at least --workers-per-job ({}), which must be at least 1",
            args.workers,
            args.workers_per_job
        );
    }
    let base = job::load_config(&args.config, &[])?;
    let sweep = args.sweep_id.clone().unwrap_or_else(|| base.run_name.clone());
    if !is_safe_run_name(&sweep) {
        bail!("sweep id {sweep:?}: must be `/`-separated segments of A–Z, a–z, 0–9, `-`, `_`, `.`");
    }
    let jobs = plan(args, &base, &sweep)?;
    let output = job::output_store(&base)?;
    let root = output.child(&format!("runs/{sweep}"))?;
    let mut entries: Vec<JobEntry> = jobs.iter().map(|j| j.entry.clone()).collect();
    for (entry, job) in entries.iter_mut().zip(&jobs) {
        if let Some(step) = finished_at(&job.cfg)? {
            entry.status = Status::Finished;
            entry.steps_done = Some(step);
            entry.lora = Some(output.url_of(&format!("{}.safetensors", job.cfg.run_name)));
        }
    }
    let root_url = root.url().to_string();
    let ledger = Ledger::new(root, Manifest { sweep: sweep.clone(), jobs: entries });
    let queue: VecDeque<usize> = ledger
        .snapshot()
        .jobs
        .iter()
        .enumerate()
        .filter(|(_, e)| e.status != Status::Finished)
        .map(|(i, _)| i)
        .collect();
    println!(
        "sweep {sweep}: {} job(s), {} to run, {} at a time on {} worker(s) each",
        jobs.len(),
        queue.len(),
        args.workers / args.workers_per_job,
        args.workers_per_job
    );
    let queue = Mutex::new(queue);
    let bars = MultiProgress::new();
    let devices: Vec<String> = if args.devices.is_empty() { vec!["cpu".into()] } else { args.devices.clone() };
    std::thread::scope(|scope| {
        for slot in 0..args.workers / args.workers_per_job {
            let slot_devices: Vec<String> = (0..args.workers_per_job)
                .map(|k| devices[(slot * args.workers_per_job + k) % devices.len()].clone())
                .collect();
            let (queue, ledger, jobs, bars, stop) = (&queue, &ledger, &jobs, &bars, &stop);
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Some(i) = queue.lock().unwrap_or_else(PoisonError::into_inner).pop_front() else { break };
                    run_job(&jobs[i], i, args.workers_per_job, &slot_devices, ledger, bars, stop);
                }
            });
        }
    });
    let manifest = ledger.snapshot();
    print!("{}", summary(&manifest));
    println!("report: acrf report {root_url}");
    if manifest.jobs.iter().any(|j| matches!(j.status, Status::Pending | Status::Stopped)) {
        println!("interrupted: run the same command again to continue");
    }
    let failed: Vec<&str> =
        manifest.jobs.iter().filter(|j| j.status == Status::Failed).map(|j| j.name.as_str()).collect();
    if !failed.is_empty() {
        bail!("{} of {} job(s) failed: {}", failed.len(), manifest.jobs.len(), failed.join(", "));
    }
    Ok(())
}

fn run_job(
    job: &Job,
    index: usize,
    workers: usize,
    devices: &[String],
    ledger: &Ledger,
    bars: &MultiProgress,
    stop: &Arc<AtomicBool>,
) {
    let span = info_span!("job", name = %job.entry.name);
    let _enter = span.enter();
    ledger.update(index, |e| (e.status, e.error) = (Status::Running, None));
    let bar = bars.add(progress_bar());
    bar.set_prefix(format!("{} ", job.entry.name));
    let outcome =
        train_with_local_workers(&job.cfg, workers, devices, ResumeRequest::CONFIG, stop.clone(), bar.clone());
    bar.finish_and_clear();
    bars.remove(&bar);
    ledger.update(index, |e| match outcome {
        Ok(done) => {
            e.status = if done.stopped_early { Status::Stopped } else { Status::Finished };
            e.steps_done = Some(done.steps_done);
            e.lora = done.lora_url;
        }
        Err(err) => {
            warn!("job {} failed: {err:#}", job.entry.name);
            e.status = Status::Failed;
            e.error = Some(format!("{err:#}"));
        }
    });
}

/// One line per job: name, status, steps, and the LoRA or the error.
pub fn summary(m: &Manifest) -> String {
    let width = m.jobs.iter().map(|j| j.name.len()).max().unwrap_or(0);
    let mut out = format!("sweep {}:\n", m.sweep);
    for j in &m.jobs {
        let status = j.status.name();
        let steps = j.steps_done.map_or("-".into(), |s| s.to_string());
        let detail = j.error.as_deref().or(j.lora.as_deref()).unwrap_or("");
        out.push_str(&format!("  {:width$}  {status:8}  {steps:>6} steps  {detail}\n", j.name));
    }
    out
}

/// Reads the manifest of the sweep at `root`, if it is one.
pub fn read_manifest(root: &BlockingStore) -> Result<Option<Manifest>> {
    root.get_if_exists(MANIFEST)?
        .map(|bytes| serde_json::from_slice(&bytes).map_err(|e| anyhow!("{}: {e}", root.url_of(MANIFEST))))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_outside_brackets_and_quotes() {
        assert_eq!(split_values("1e-4, 5e-5"), ["1e-4", "5e-5"]);
        assert_eq!(split_values("[\"to_q\", \"to_k\"],[\"w1\"]"), ["[\"to_q\", \"to_k\"]", "[\"w1\"]"]);
        assert_eq!(split_values("\"a,b\",c"), ["\"a,b\"", "c"]);
    }

    #[test]
    fn credentials_are_not_swept() {
        let args = |set: &str| SweepArgs {
            config: "job.toml".into(),
            loss_modes: vec![],
            sets: vec![set.into()],
            workers: 1,
            workers_per_job: 1,
            devices: vec![],
            sweep_id: None,
        };
        for set in [
            "storage.options.aws_secret_access_key=a,b",
            "storage.options.sas_token=a,b",
            "storage.options={ account_key = \"k\" }",
        ] {
            let err = dimensions(&args(set)).unwrap_err().to_string();
            assert!(err.contains("does not vary credentials"), "{set}: {err}");
        }
        assert!(dimensions(&args("storage.options.aws_conditional_put=etag,disabled")).is_ok());
        assert!(dimensions(&args("training.learning_rate=1e-4,5e-5")).is_ok());
    }

    #[test]
    fn combinations_are_the_cartesian_product_with_readable_names() {
        let dims = vec![
            (LOSS_MODE.to_string(), vec!["standard".to_string(), "style".to_string()]),
            ("training.learning_rate".to_string(), vec!["1e-4".to_string(), "5e-5".to_string(), "1e-5".to_string()]),
        ];
        let combos = combinations(&dims);
        assert_eq!(combos.len(), 6);
        assert_eq!(job_name(&combos[0]), "standard_learning_rate-1e-4");
        assert_eq!(job_name(&combos[5]), "style_learning_rate-1e-5");
        let list = [("lora.targets".to_string(), "[\"to_q\"]".to_string())];
        assert!(is_safe_segment(&job_name(&list)), "{}", job_name(&list));
    }
}
