//! `acrf sweep`: one group per combination of settings (see `crate::sweep`).

use std::sync::atomic::Ordering;

use anyhow::Result;

use crate::args::SweepArgs;
use crate::console::stop_on_signals;
use crate::exit::Exit;

pub fn run(args: &SweepArgs) -> Result<Exit> {
    let stop = stop_on_signals()?;
    crate::sweep::run(args, stop.clone())?;
    Ok(Exit::of_run(stop.load(Ordering::SeqCst)))
}
