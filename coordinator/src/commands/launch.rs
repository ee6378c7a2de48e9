//! `acrf launch`: the coordinator here and one worker per device of a hosts file, each over ssh.

use anyhow::Result;

use crate::args::LaunchArgs;
use crate::console::stop_on_signals;
use crate::exit::Exit;
use crate::job;
use crate::launch::ssh::{self, HostsFile};

pub fn run(args: LaunchArgs) -> Result<Exit> {
    let LaunchArgs { config, hosts, listen, advertise, restarts, sets, resume } = args;
    let cfg = job::load_config(&config, &sets)?;
    let file = HostsFile::load(&hosts)?;
    let stop = stop_on_signals()?;
    let done = ssh::launch(&cfg, &file, listen, advertise, restarts, resume.request()?, stop)?;
    done.print(&format!("acrf launch --hosts {} {}", hosts.display(), config.display()));
    Ok(Exit::of_run(done.stopped_early))
}
