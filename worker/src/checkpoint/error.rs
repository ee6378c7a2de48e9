//! Why a run cannot continue from its checkpoints as asked, and why a checkpoint could not be saved: apart from
//! the `Checkpointer`, so that the trainer can carry them without depending on it.

use acrf_common::checkpoint::CheckpointError;
use acrf_common::store::StoreError;

/// Why a run cannot continue from its checkpoints as asked.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error(
        "the checkpoint at {origin} was trained with different settings: {}. Restore them, or start a new run \
         (another run_name or output)",
        keys.join(", ")
    )]
    Settings { origin: String, keys: Vec<String> },
    #[error(
        "the checkpoint at {origin} was trained with different settings: {}. To train this run longer, \
         continue it with --extend; to start over, use another run_name or output",
        keys.join(", ")
    )]
    Length { origin: String, keys: Vec<String> },
    #[error(
        "the checkpoint at {origin} holds other settings than this job (its training hash differs) although \
         no key does: it was written by another version of acrf. Start a new run (another run_name or output)"
    )]
    Hash { origin: String },
    #[error(
        "--extend: this job is {total} steps long, which does not go past the checkpoint of step {step} at \
         {origin}; raise training.max_steps (or training.epochs)"
    )]
    NothingToExtend { origin: String, step: u64, total: u64 },
    #[error("--extend continues a run, and run `{run}` at {url} has no checkpoint")]
    NoRunToExtend { run: String, url: String },
    #[error(
        "run `{run}` at {url} already has checkpoints (up to step {step}) and checkpoint.resume = \"never\": \
         choose another run_name or output, or resume"
    )]
    Never { run: String, url: String, step: u64 },
    #[error(
        "run `{run}` has checkpoints newer than step {step} (steps {}); continuing from {step} would rewrite \
         them: delete them from {url} first, or resume into another run_name",
        newer.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
    )]
    Newer { run: String, step: u64, newer: Vec<u64>, url: String },
    #[error("checkpoint {origin}: {name}: {message}")]
    Unreadable { origin: String, name: String, message: String },
    #[error("the checkpoint at {origin} does not fit this job: {message}")]
    DoesNotFit { origin: String, message: String },
    #[error(transparent)]
    Checkpoint(Box<CheckpointError>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ResumeError {
    /// The job asks for something its checkpoints rule out (other settings, a run to extend that is not
    /// there, a resume it forbids), as opposed to checkpoints that could not be read.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ResumeError::Unreadable { .. } | ResumeError::Checkpoint(_) | ResumeError::Candle(_))
    }
}

impl From<CheckpointError> for ResumeError {
    fn from(e: CheckpointError) -> Self {
        ResumeError::Checkpoint(Box::new(e))
    }
}

/// Why a checkpoint could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("serialising the optimizer state: {0}")]
    Optimizer(String),
    #[error("writing the config into the checkpoint: {0}")]
    Config(acrf_common::config::ConfigError),
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    #[error(transparent)]
    Commit(#[from] CheckpointError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
