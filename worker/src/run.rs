//! A rank's run: steps until the end or until any rank asks to stop, with checkpoints at the configured
//! cadence, at the end and before a requested stop, and sample images at theirs. Every rank runs this loop;
//! only the rank that holds an [`Output`] (rank 0) writes and samples, since all ranks hold identical weights
//! after every step.

use std::path::Path;

use acrf_common::checkpoint::Checkpoints;
use acrf_common::store::BlockingStore;
use tracing::{info, warn};

use crate::checkpoint;
use crate::sample::{self, Sampler};
use crate::train::{StepReport, TrainError, Trainer};

/// Where a run's sample images go, under its folder: `samples/step<N>-<prompt index>.png`.
pub fn sample_file(step: u64, index: usize) -> String {
    format!("samples/step{step:08}-{index}.png")
}

/// The prompts of a run's samples (a JSON list, by index), so that a report can caption them.
pub const SAMPLE_PROMPTS: &str = "samples/prompts.json";

/// Where rank 0 writes: checkpoints of the run and the user-facing LoRA files.
pub struct Output {
    pub checkpoints: Checkpoints,
    /// The output root; LoRA files go to `<run>-step<N>.safetensors` and `<run>.safetensors`.
    pub exports: BlockingStore,
    pub run_name: String,
}

/// Sees every step and decides when to stop; the progress bar, metrics file and heartbeats live behind it.
pub trait Observer {
    fn on_step(&mut self, report: &StepReport);
    /// Whether this rank wants to stop after the current step (a signal, a coordinator's order).
    fn stop_requested(&mut self) -> bool;
    fn on_checkpoint(&mut self, _step: u64, _lora_url: &str) {}
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    pub steps_done: u64,
    pub stopped_early: bool,
    /// The final or latest LoRA file (rank 0).
    pub lora_url: Option<String>,
}

fn save_due(trainer: &Trainer, done: u64) -> bool {
    let t = &trainer.config().training;
    let spe = trainer.steps_per_epoch();
    (t.save_every_n_steps > 0 && done.is_multiple_of(t.save_every_n_steps))
        || (t.save_every_n_epochs > 0 && done.is_multiple_of(spe) && (done / spe).is_multiple_of(t.save_every_n_epochs))
}

/// Commits a checkpoint of the trainer's current state and writes the LoRA file `file` next to it.
pub fn save(trainer: &Trainer, out: &Output, file: &str) -> Result<String, TrainError> {
    let state = trainer.state();
    let blobs = checkpoint::snapshot(trainer)?;
    let info = serde_json::json!({
        "epoch": state.step / trainer.steps_per_epoch(),
        "total_steps": trainer.total_steps(),
        "micro_batches": state.micro_batches,
    });
    out.checkpoints
        .commit(state.step, &trainer.config().training_hash(), info, &blobs)
        .map_err(|e| TrainError::Setup(e.to_string()))?;
    let lora = blobs.iter().find(|(n, _)| *n == checkpoint::LORA).map(|(_, b)| b.clone()).expect("snapshot has a LoRA");
    out.exports.put(file, lora)?;
    let ck = &trainer.config().checkpoint;
    out.checkpoints.prune(ck.keep_last, ck.keep_every).map_err(|e| TrainError::Setup(e.to_string()))?;
    Ok(out.exports.url_of(file))
}

/// The sampler of `sample.prompts`, when there are any.
fn sampler(trainer: &Trainer) -> Result<Option<Sampler>, TrainError> {
    let cfg = trainer.config();
    if cfg.sample.prompts.is_empty() {
        return Ok(None);
    }
    let model = trainer.model();
    let sampler = Sampler::new(
        Path::new(&cfg.model.path),
        &cfg.sample.prompts,
        cfg.training.max_sequence_length,
        (&cfg.sample).into(),
        model.dtype(),
        model.device(),
    )
    .map_err(|e| {
        TrainError::Setup(format!(
            "sample.prompts: {e} (samples need model.path to be a diffusers Z-Image folder with vae/, \
             text_encoder/ and tokenizer/)"
        ))
    })?;
    Ok(Some(sampler))
}

/// Renders every prompt with the current LoRA into the run folder. A sample that fails is reported and skipped:
/// it must not cost the run.
fn write_samples(trainer: &Trainer, sampler: &Sampler, out: &Output, step: u64) {
    let lora = trainer.lora.view(false, 1.0);
    for i in 0..sampler.prompts() {
        let written = sampler
            .render(trainer.model(), &lora, i)
            .and_then(|image| Ok(out.checkpoints.root().put(&sample_file(step, i), sample::png(&image)?)?));
        if let Err(e) = written {
            warn!(step, "sample {i} not written: {e}");
        }
    }
}

pub fn run(
    trainer: &mut Trainer,
    output: Option<&Output>,
    observer: &mut dyn Observer,
) -> Result<RunOutcome, TrainError> {
    let total = trainer.total_steps();
    let sampler = match output {
        Some(out) if trainer.state().step < total => {
            let sampler = sampler(trainer)?;
            if sampler.is_some() {
                let prompts = serde_json::to_vec_pretty(&trainer.config().sample.prompts).expect("strings serialise");
                out.checkpoints.root().put(SAMPLE_PROMPTS, prompts)?;
            }
            sampler
        }
        _ => None,
    };
    let every = trainer.config().sample.every_n_steps;
    let mut lora_url = None;
    while trainer.state().step < total {
        let report = trainer.step(observer.stop_requested())?;
        observer.on_step(&report);
        let run_of_nonfinite = trainer.state().nonfinite_run;
        if run_of_nonfinite >= trainer.config().training.max_nonfinite_steps {
            return Err(TrainError::NonFinite(run_of_nonfinite));
        }
        let done = report.step;
        let last = done == total || report.stop;
        if let Some(out) = output
            && (last || save_due(trainer, done))
        {
            let file = if done == total {
                format!("{}.safetensors", out.run_name)
            } else {
                format!("{}-step{done:08}.safetensors", out.run_name)
            };
            let url = save(trainer, out, &file)?;
            info!(step = done, "checkpoint committed; LoRA at {url}");
            observer.on_checkpoint(done, &url);
            lora_url = Some(url);
        }
        if let (Some(out), Some(sampler)) = (output, &sampler)
            && (done == total || (every > 0 && done.is_multiple_of(every)))
        {
            write_samples(trainer, sampler, out, done);
        }
        if report.stop && done < total {
            return Ok(RunOutcome { steps_done: done, stopped_early: true, lora_url });
        }
    }
    Ok(RunOutcome { steps_done: trainer.state().step, stopped_early: false, lora_url })
}
