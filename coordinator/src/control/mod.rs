//! The control plane of a distributed job: QUIC endpoints with a pinned certificate (`net`), admitting
//! workers that prove the job secret (`membership`), the coordinator's loop that forms, runs and re-forms
//! the group (`group`), and the worker's side of it (`agent`).
//!
//! The coordinator's network runs on a small tokio runtime of its own; its decisions run on the calling
//! thread, which may block on the object store. Training itself never runs here: a worker's agent trains on
//! a thread of its own and speaks to the coordinator through the network side.

pub mod agent;
pub mod group;
pub mod membership;
pub mod net;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use acrf_common::config::Config;
use acrf_common::protocol::JoinToken;
use acrf_worker::checkpoint::Start;
use anyhow::Result;
use indicatif::ProgressBar;

use crate::console::Outcome;
use crate::launch::cluster::identity_and_secret;

/// A running coordinator endpoint, the runtime that drives it, and the token that joins it.
pub struct Listening {
    runtime: tokio::runtime::Runtime,
    pub endpoint: quinn::Endpoint,
    pub token: JoinToken,
    pub secret: [u8; 32],
}

/// Listens on `listen`; the token names `advertise` (or the bound address) as where to connect.
pub fn listen(
    cfg: &Config,
    listen: SocketAddr,
    advertise: Vec<SocketAddr>,
    identity: Option<&Path>,
) -> Result<Listening> {
    let (id, secret) = identity_and_secret(identity)?;
    let idle = Duration::from_secs(cfg.distributed.heartbeat_timeout_s);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let endpoint = {
        let _inside = runtime.enter();
        net::server(listen, &id, idle)?
    };
    let bound = endpoint.local_addr()?;
    let addrs = if advertise.is_empty() { vec![bound] } else { advertise };
    Ok(Listening { runtime, endpoint, token: JoinToken { addrs, fingerprint: id.fingerprint, secret }, secret })
}

/// Runs the coordinator from `start` (see [`acrf_worker::checkpoint::Checkpointer::start`]) until the job ends.
pub fn serve(cfg: &Config, l: Listening, start: Start, stop: Arc<AtomicBool>, bar: ProgressBar) -> Result<Outcome> {
    let _inside = l.runtime.enter();
    group::coordinate(cfg.clone(), l.endpoint, l.secret, start, stop, bar)
}
