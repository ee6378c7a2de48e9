//! A rank's run: steps until the end or until any rank asks to stop, with checkpoints at the configured
//! cadence, at the end and before a requested stop, and sample images at theirs. Every rank runs this loop;
//! only the rank that holds the [`Checkpointer`] (rank 0) writes and samples, since all ranks hold identical
//! weights after every step.

use std::path::Path;

use tracing::{info, warn};

use acrf_common::protocol::{PromptDrift, TurboDrift};

use crate::checkpoint::Checkpointer;
use crate::drift;
use crate::lora::{Lora, LoraView};
use crate::sample::{self, SampleError, Sampler};
use crate::train::{StepReport, TrainError, Trainer};

/// Where a run's sample images go, under its folder: `samples/step<N>-<prompt index>.png`.
pub fn sample_file(step: u64, index: usize) -> String {
    format!("samples/step{step:08}-{index}.png")
}

/// The prompts of a run's samples (a JSON list, by index), so that a report can caption them.
pub const SAMPLE_PROMPTS: &str = "samples/prompts.json";

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
    .map_err(|e| TrainError::Sampler(Box::new(e)))?;
    Ok(Some(sampler))
}

/// Where a sample rendered with `model.adapters` merged goes (`sample.with_adapters`).
pub fn adapter_sample_file(step: u64, index: usize) -> String {
    format!("samples/step{step:08}-{index}-adapters.png")
}

/// Renders every prompt with the current LoRA on the plain base (the adapters removed) into the run folder,
/// measuring Turbo drift on the way when `sample.reference_steps` is set; `baseline` holds the base model's
/// drift once measured. A sample that fails is reported and skipped: it must not cost the run.
fn write_samples(
    trainer: &Trainer,
    sampler: &Sampler,
    out: &Checkpointer,
    step: u64,
    baseline: &mut Option<Vec<PromptDrift>>,
) -> Option<TurboDrift> {
    let cfg = &trainer.config().sample;
    let (model, adapters) = (trainer.model(), trainer.adapters());
    let view = |lora: &Lora| -> Result<LoraView, SampleError> {
        if adapters.is_empty() {
            Ok(lora.view(false, 1.0))
        } else {
            adapters.cancel(lora, 1.0).map_err(|e| SampleError::Options(e.to_string()))
        }
    };
    let measured = cfg.reference_steps > 0;
    if measured && baseline.is_none() {
        let none = Lora { modules: Default::default(), metadata: Default::default() };
        let base: Result<Vec<PromptDrift>, SampleError> = view(&none).and_then(|v| {
            (0..sampler.prompts()).map(|i| Ok(drift::measure(sampler, model, &v, i, cfg.reference_steps)?.0)).collect()
        });
        match base {
            Ok(b) => *baseline = Some(b),
            Err(e) => warn!(step, "the base model's turbo drift was not measured: {e}"),
        }
    }
    let mut prompts = Vec::new();
    // Built once for every prompt: with adapters it stacks their cancellation onto the LoRA.
    let trained = view(&trainer.lora);
    for i in 0..sampler.prompts() {
        let written = trained.as_ref().map_err(|e| SampleError::Options(e.to_string())).and_then(|v| {
            let image = if measured {
                let (d, image) = drift::measure(sampler, model, v, i, cfg.reference_steps)?;
                prompts.push(d);
                image
            } else {
                sampler.render(model, v, i, &mut |_, _| {})?
            };
            Ok(out.run_folder().put(&sample_file(step, i), sample::png(&image)?)?)
        });
        if let Err(e) = written {
            warn!(step, "sample {i} not written: {e}");
        }
        if cfg.with_adapters && !adapters.is_empty() {
            let merged = sampler
                .render(model, &trainer.lora.view(false, 1.0), i, &mut |_, _| {})
                .and_then(|image| Ok(out.run_folder().put(&adapter_sample_file(step, i), sample::png(&image)?)?));
            if let Err(e) = merged {
                warn!(step, "sample {i} with adapters not written: {e}");
            }
        }
    }
    let baseline = baseline.clone()?;
    (measured && prompts.len() == sampler.prompts()).then(|| TurboDrift {
        steps: sampler.settings().steps,
        reference_steps: cfg.reference_steps,
        prompts,
        baseline,
    })
}

/// Trains until the run's last step or a stop; rank 0 passes the run's `checkpointer`, the other ranks none.
pub fn run(
    trainer: &mut Trainer,
    checkpointer: Option<&Checkpointer>,
    observer: &mut dyn Observer,
) -> Result<RunOutcome, TrainError> {
    let total = trainer.total_steps();
    let sampler = match checkpointer {
        Some(out) if trainer.state().step < total => {
            let sampler = sampler(trainer)?;
            if sampler.is_some() {
                let prompts = serde_json::to_vec_pretty(&trainer.config().sample.prompts).expect("strings serialise");
                out.run_folder().put(SAMPLE_PROMPTS, prompts)?;
            }
            sampler
        }
        _ => None,
    };
    let every = trainer.config().sample.every_n_steps;
    let mut lora_url = None;
    let mut baseline = None;
    while trainer.state().step < total {
        let mut report = trainer.step(observer.stop_requested())?;
        let done = report.step;
        // Samples come before the report, which carries their drift to the metrics.
        if let (Some(out), Some(sampler)) = (checkpointer, &sampler)
            && (done == total || (every > 0 && done.is_multiple_of(every)))
        {
            report.drift = write_samples(trainer, sampler, out, done, &mut baseline);
        }
        observer.on_step(&report);
        let run_of_nonfinite = trainer.state().nonfinite_run;
        if run_of_nonfinite >= trainer.config().training.max_nonfinite_steps {
            return Err(TrainError::NonFinite(run_of_nonfinite));
        }
        let last = done == total || report.stop;
        if let Some(out) = checkpointer
            && (last || out.due(done, trainer.steps_per_epoch()))
        {
            let url = out.save(trainer)?;
            info!(step = done, "checkpoint committed; LoRA at {url}");
            observer.on_checkpoint(done, &url);
            lora_url = Some(url);
        }
        if report.stop && done < total {
            return Ok(RunOutcome { steps_done: done, stopped_early: true, lora_url });
        }
    }
    Ok(RunOutcome { steps_done: trainer.state().step, stopped_early: false, lora_url })
}
