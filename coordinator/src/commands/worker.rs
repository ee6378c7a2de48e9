//! `acrf worker`: joins a job as one training rank (see `control::agent`).

use std::time::Duration;

use acrf_common::protocol::JoinToken;
use acrf_worker::device;
use anyhow::{Context, Result};

use crate::args::WorkerArgs;
use crate::control::agent::{self, AgentOptions};
use crate::launch::cluster::TOKEN_VAR;
use crate::launch::ssh::exit_when_stdin_closes;

pub fn run(args: WorkerArgs) -> Result<()> {
    let WorkerArgs { join, device: dev, reconnect_for, collective_listen, coordinator, exit_when_stdin_closes: tied } =
        args;
    if tied {
        exit_when_stdin_closes();
    }
    let join = join.with_context(|| format!("no join token: set {TOKEN_VAR} (or pass --join TOKEN)"))?;
    let token = JoinToken::decode(&join)?;
    let opts = AgentOptions {
        device: device::open(&dev)?,
        device_name: dev,
        reconnect_for: Duration::from_secs(reconnect_for),
        collective_listen,
        coordinator,
    };
    agent::run(token, opts)
}
