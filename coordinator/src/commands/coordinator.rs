//! `acrf coordinator`: coordinates a job whose workers are started elsewhere, and hands out their token.

use anyhow::Result;

use crate::args::CoordinatorArgs;
use crate::console::stop_on_signals;
use crate::launch::cluster::{TOKEN_VAR, write_token_file};
use crate::observe::progress_bar;
use crate::{control, job};

pub fn run(args: CoordinatorArgs) -> Result<()> {
    let CoordinatorArgs { config, listen, advertise, identity, token_file, sets } = args;
    let cfg = job::load_config(&config, &sets)?;
    let l = control::listen(&cfg, listen, advertise, identity.as_deref())?;
    println!("coordinator listening on {}", l.endpoint.local_addr()?);
    let token = l.token.encode();
    match &token_file {
        Some(path) => {
            write_token_file(path, &token)?;
            println!("join token written to {}", path.display());
        }
        None => println!("join with: {TOKEN_VAR}={token} acrf worker --device cuda:0"),
    }
    let stop = stop_on_signals()?;
    let done = control::serve(&cfg, l, stop, progress_bar())?;
    done.print(&format!("acrf coordinator {}", config.display()));
    Ok(())
}
