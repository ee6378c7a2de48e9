//! `acrf report`: writes a run's or a sweep's report (see `crate::report`).

use anyhow::Result;

use crate::args::ReportArgs;

pub fn run(args: ReportArgs) -> Result<()> {
    let written = crate::report::write(&args.run, args.out.as_deref())?;
    println!("report: {}", written.display());
    Ok(())
}
