//! The exit status of `acrf`, so that a script can tell a finished run from an interrupted, failed or refused
//! one, and a usable dataset with skipped images from none. The README's "Exit codes" lists them.

use acrf_worker::checkpoint::ResumeError;
use acrf_worker::train::TrainError;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It did what was asked (a run that was already finished included).
    Finished,
    /// Something broke along the way: an unreadable file, a lost store, a crashed worker, non-finite losses.
    Failed,
    /// It refused to start: a bad config or flag, a job that does not fit the device, a resume refused for
    /// changed settings. clap's own usage errors exit with the same code.
    Refused,
    /// `acrf cache` wrote a usable manifest but skipped some images (listed in cache_report.json).
    Skipped,
    /// SIGINT or SIGTERM stopped the run after it checkpointed; the same command continues it.
    Interrupted,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Finished => 0,
            Exit::Failed => 1,
            Exit::Refused => 2,
            Exit::Skipped => 3,
            Exit::Interrupted => 130,
        }
    }

    /// A run that trained: interrupted when it stopped before its last step, else finished.
    pub fn of_run(stopped_early: bool) -> Exit {
        if stopped_early { Exit::Interrupted } else { Exit::Finished }
    }

    /// [`Exit::Refused`] when anything in `error`'s chain refuses what was asked, else [`Exit::Failed`].
    pub fn of_error(error: &anyhow::Error) -> Exit {
        let refusal = |cause: &(dyn std::error::Error + 'static)| {
            cause.is::<Refused>()
                || cause.downcast_ref::<ResumeError>().is_some_and(ResumeError::is_refusal)
                || matches!(cause.downcast_ref::<TrainError>(), Some(TrainError::Resume(r)) if r.is_refusal())
        };
        if error.chain().any(refusal) { Exit::Refused } else { Exit::Failed }
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

/// Marks an error as a refusal of what was asked (exit 2) rather than a failure along the way.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Refused(#[from] anyhow::Error);

/// `error` as a refusal, for `map_err`.
pub fn refused(error: impl Into<anyhow::Error>) -> anyhow::Error {
    Refused(error.into()).into()
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn refusals_are_found_under_context() {
        let config: anyhow::Result<()> = Err(refused(anyhow::anyhow!("config key `x`: bad")));
        assert_eq!(Exit::of_error(&config.context("loading job.toml").unwrap_err()), Exit::Refused);
        let never = ResumeError::Never { run: "r".into(), url: "u".into(), step: 3 };
        assert_eq!(Exit::of_error(&anyhow::Error::from(never)), Exit::Refused);
        let unreadable = ResumeError::Unreadable { origin: "o".into(), name: "n".into(), message: "m".into() };
        assert_eq!(Exit::of_error(&anyhow::Error::from(TrainError::from(unreadable))), Exit::Failed);
        assert_eq!(Exit::of_error(&anyhow::anyhow!("the store went away")), Exit::Failed);
    }
}
