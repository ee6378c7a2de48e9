//! `acrf sweep`: one group per combination of settings (see `crate::sweep`).

use anyhow::Result;

use crate::args::SweepArgs;
use crate::console::stop_on_signals;

pub fn run(args: &SweepArgs) -> Result<()> {
    crate::sweep::run(args, stop_on_signals()?)
}
