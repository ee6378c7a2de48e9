//! `acrf worker --join TOKEN`: one training rank under a coordinator.
//!
//! The agent proves the job secret, reports where its collective listens, and then does what the
//! coordinator says: on an assignment it forms the ring with its peers (and NCCL on top of it between GPUs,
//! per `distributed.collective`), builds the trainer (rank 0 restores the checkpoint and shares its state),
//! reports ready, waits for the start barrier and trains, sending each step's report. On an abort (a peer
//! died) it breaks its collective at once and waits for the next assignment. Training runs on its own
//! thread; the network runs on tokio.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acrf_common::config::Config;
use acrf_common::protocol::{self, Assignment, JoinToken, PROTOCOL_VERSION, StepReport, ToCoordinator, ToWorker};
use acrf_worker::checkpoint::Checkpointer;
use acrf_worker::collective::ring::RingConfig;
use acrf_worker::collective::{self, Abort, ConnectError, Connected};
use acrf_worker::run::{self, Observer};
use acrf_worker::train::Trainer;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use tokio::sync::mpsc;
use tracing::{error, info, info_span, warn};

use super::net;
use crate::job::writer_id;

/// How long a blocked ring collective waits for a peer before it errors on its own; the coordinator's abort
/// normally comes much sooner. NCCL has no such bound: a GPU rank waits for the abort.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);

pub struct AgentOptions {
    pub device: Device,
    pub device_name: String,
    /// Keep trying to reach a coordinator that went away for this long before giving up.
    pub reconnect_for: Duration,
    /// Where the ring listens; `None`: an ephemeral port on every interface.
    pub collective_listen: Option<SocketAddr>,
    /// `host:port` names dialled instead of the token's addresses.
    pub coordinator: Vec<String>,
}

/// Runs the agent until the coordinator says the job is over.
pub fn run(token: JoinToken, opts: AgentOptions) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let any: SocketAddr = if token.addrs[0].is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid");
    let at = opts.collective_listen.unwrap_or(any);
    let listener = TcpListener::bind(at).with_context(|| format!("the collective cannot listen on {at}"))?;
    let port = listener.local_addr()?.port();
    let mut lost_since: Option<std::time::Instant> = None;
    loop {
        match rt.block_on(session(&token, &opts, &listener, port)) {
            Ok(()) => return Ok(()),
            Err(SessionEnd::Refused(reason)) => bail!("the coordinator refused this worker: {reason}"),
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Lost(why)) => {
                let since = *lost_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > opts.reconnect_for {
                    bail!("lost the coordinator ({why}) and could not reach it again for {:?}", opts.reconnect_for);
                }
                warn!("lost the coordinator ({why}); reconnecting");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

enum SessionEnd {
    Refused(String),
    Lost(String),
    Fatal(anyhow::Error),
}

/// The running training thread of one generation.
struct Training {
    generation: u64,
    abort: Arc<Mutex<Option<Arc<dyn Abort>>>>,
    /// Gives up forming the ring.
    cancel: Arc<AtomicBool>,
    /// `true` is the start barrier, `false` an abort before it.
    start: std::sync::mpsc::Sender<bool>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Training {
    fn abort_and_join(self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(a) = self.abort.lock().expect("abort lock").as_ref() {
            a.abort();
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.start.send(false);
        let _ = self.thread.join();
    }
}

async fn session(token: &JoinToken, opts: &AgentOptions, listener: &TcpListener, port: u16) -> Result<(), SessionEnd> {
    let addrs = coordinator_addrs(token, &opts.coordinator).await.map_err(|e| SessionEnd::Lost(format!("{e:#}")))?;
    let conn = net::connect(&addrs, token.fingerprint, Duration::from_secs(30)).await.map_err(|e| {
        match e.downcast::<net::CertificateMismatch>() {
            Ok(foreign) => SessionEnd::Fatal(foreign.into()),
            Err(e) => SessionEnd::Lost(format!("{e:#}")),
        }
    })?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| SessionEnd::Lost(e.to_string()))?;
    let lost = |e: protocol::ProtocolError| SessionEnd::Lost(e.to_string());
    send.write_all(&protocol::STREAM_MAGIC).await.map_err(|e| SessionEnd::Lost(e.to_string()))?;
    let nonce = match protocol::read_frame::<_, ToWorker>(&mut recv).await.map_err(lost)? {
        ToWorker::Challenge { version, nonce } if version == PROTOCOL_VERSION => nonce,
        ToWorker::Challenge { version, .. } => {
            return Err(SessionEnd::Refused(format!(
                "coordinator speaks protocol {version}, this worker {PROTOCOL_VERSION}"
            )));
        }
        other => return Err(SessionEnd::Fatal(anyhow::anyhow!("expected a challenge, got {other:?}"))),
    };
    let hello = ToCoordinator::Hello {
        version: PROTOCOL_VERSION,
        proof: protocol::mac(&token.secret, &[b"acrf-join", &nonce]),
        host: crate::console::hostname(),
        device: opts.device_name.clone(),
        collective_port: port,
    };
    protocol::write_frame(&mut send, &hello).await.map_err(lost)?;
    let beat_every = match protocol::read_frame::<_, ToWorker>(&mut recv).await.map_err(lost)? {
        ToWorker::Welcome { worker_id, heartbeat_ms } => {
            info!("joined the job as worker {worker_id}");
            Duration::from_millis(heartbeat_ms.max(100))
        }
        ToWorker::Reject { reason } => return Err(SessionEnd::Refused(reason)),
        other => return Err(SessionEnd::Fatal(anyhow::anyhow!("expected a welcome, got {other:?}"))),
    };

    let (up_tx, mut up_rx) = mpsc::unbounded_channel::<ToCoordinator>();
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut training: Option<Training> = None;
    let mut beat = tokio::time::interval(beat_every);
    let result = loop {
        tokio::select! {
            msg = protocol::read_frame::<_, ToWorker>(&mut recv) => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => break Err(SessionEnd::Lost(e.to_string())),
                };
                match msg {
                    ToWorker::Assign(a) => {
                        if let Some(t) = training.take() {
                            t.abort_and_join();
                        }
                        training = Some(spawn_training(*a, opts.device.clone(), listener, up_tx.clone(), progress.clone()));
                    }
                    ToWorker::Start { generation } => {
                        if let Some(t) = training.as_ref().filter(|t| t.generation == generation) {
                            let _ = t.start.send(true);
                        }
                    }
                    ToWorker::Stop { reason } => {
                        info!("stopping after this step: {reason}");
                        if let Some(t) = &training {
                            t.stop.store(true, Ordering::SeqCst);
                        }
                    }
                    ToWorker::Abort { generation, reason } => {
                        warn!("generation {generation} aborted: {reason}");
                        if let Some(t) = training.take_if(|t| t.generation == generation) {
                            t.abort_and_join();
                        }
                    }
                    ToWorker::Exit { reason } => {
                        info!("job over: {reason}");
                        break Ok(());
                    }
                    other => warn!("ignoring unexpected {other:?}"),
                }
            }
            Some(msg) = up_rx.recv() => {
                if let Err(e) = protocol::write_frame(&mut send, &msg).await {
                    break Err(SessionEnd::Lost(e.to_string()));
                }
            }
            _ = beat.tick() => {
                let generation = training.as_ref().map_or(0, |t| t.generation);
                let hb = ToCoordinator::Heartbeat { generation, step: progress.load(Ordering::SeqCst) };
                if let Err(e) = protocol::write_frame(&mut send, &hb).await {
                    break Err(SessionEnd::Lost(e.to_string()));
                }
            }
        }
    };
    if let Some(t) = training.take() {
        t.abort_and_join();
    }
    let _ = send.finish();
    conn.close(0u32.into(), b"bye");
    result
}

/// The token's addresses, unless `names` were given: those are looked up anew for every connection, so a
/// coordinator that comes back at another address under the same name (a rescheduled pod) is found again.
async fn coordinator_addrs(token: &JoinToken, names: &[String]) -> Result<Vec<SocketAddr>> {
    if names.is_empty() {
        return Ok(token.addrs.clone());
    }
    let mut addrs = Vec::new();
    let mut failures = Vec::new();
    for name in names {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(found) => addrs.extend(found),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if addrs.is_empty() {
        bail!("cannot look up the coordinator ({})", failures.join("; "));
    }
    Ok(addrs)
}

fn spawn_training(
    a: Assignment,
    device: Device,
    listener: &TcpListener,
    up: mpsc::UnboundedSender<ToCoordinator>,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> Training {
    let (start, start_rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let abort: Arc<Mutex<Option<Arc<dyn Abort>>>> = Arc::new(Mutex::new(None));
    let cancel = Arc::new(AtomicBool::new(false));
    let generation = a.generation;
    let listener = listener.try_clone();
    let (stop2, abort2, cancel2) = (stop.clone(), abort.clone(), cancel.clone());
    let thread = std::thread::spawn(move || {
        let span = info_span!("rank", rank = a.rank, generation);
        let _enter = span.enter();
        let result = listener
            .context("cloning the collective listener")
            .and_then(|l| train(&a, &device, l, &up, start_rx, stop2, abort2, cancel2, progress));
        let msg = match result {
            Ok(Some(done)) => done,
            Ok(None) => return,
            Err(e) => failed(&a, e, false),
        };
        let _ = up.send(msg);
    });
    Training { generation, abort, cancel, start, stop, thread }
}

/// Forms the collective, prepares the trainer, waits for the barrier and trains; `None` if aborted first.
#[allow(clippy::too_many_arguments)]
fn train(
    a: &Assignment,
    device: &Device,
    listener: TcpListener,
    up: &mpsc::UnboundedSender<ToCoordinator>,
    start: std::sync::mpsc::Receiver<bool>,
    stop: Arc<AtomicBool>,
    abort: Arc<Mutex<Option<Arc<dyn Abort>>>>,
    cancel: Arc<AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Option<ToCoordinator>> {
    let cfg = Config::parse(&a.config_toml, "the coordinator's job")?;
    let ring = RingConfig {
        rank: a.rank,
        world: a.world_size,
        listener,
        peers: a.peers.clone(),
        secret: a.collective_secret,
        timeout: COLLECTIVE_TIMEOUT,
        cancel,
    };
    let Connected { collective, abort: handle } =
        match collective::connect(cfg.distributed.collective, device, ring, &abort) {
            Ok(connected) => connected,
            Err(ConnectError::Cancelled) => return Ok(None),
            Err(e) => {
                let peer_lost = e.is_peer_lost();
                return Ok(Some(failed(a, e.into(), peer_lost)));
            }
        };
    let broken = || handle.as_ref().is_some_and(|h| h.is_broken());
    if stop.load(Ordering::SeqCst) {
        return Ok(None);
    }
    // Rank 0 alone reads the checkpoint and writes the next ones; the others take its state below.
    let checkpointer = (a.rank == 0).then(|| Checkpointer::new(&cfg, &writer_id())).transpose()?;
    let restored = match (&checkpointer, a.resume_step) {
        (Some(c), Some(step)) => Some(c.load(step, device)?),
        _ => None,
    };
    let mut trainer = Trainer::new(&cfg, collective, device, a.micro_batches)?;
    if let Some(r) = &restored {
        trainer.restore(r)?;
    }
    // From here on an error may come from the collective; whether it broke is read while the trainer, which
    // owns it, is still alive (dropping it breaks it on purpose).
    if let Err(e) = trainer.sync_from_rank0() {
        return Ok(Some(failed(a, e.into(), broken())));
    }
    let start_step = trainer.state().step;
    progress.store(start_step, Ordering::SeqCst);
    let total_steps = trainer.total_steps();
    let _ = up.send(ToCoordinator::Ready { generation: a.generation, start_step, total_steps });
    if !start.recv().unwrap_or(false) {
        return Ok(None);
    }
    let mut observer = Reporter { generation: a.generation, up: up.clone(), stop, progress };
    match run::run(&mut trainer, checkpointer.as_ref(), &mut observer) {
        Ok(outcome) => Ok(Some(ToCoordinator::Done {
            generation: a.generation,
            steps_done: outcome.steps_done,
            lora_url: outcome.lora_url,
        })),
        Err(e) => Ok(Some(failed(a, e.into(), broken()))),
    }
}

/// The failure report of this rank; `peer_lost` when the collective broke, which the coordinator recovers
/// from, as opposed to a failure of the job itself.
fn failed(a: &Assignment, e: anyhow::Error, peer_lost: bool) -> ToCoordinator {
    let error = format!("rank {} of generation {}: {e:#}", a.rank, a.generation);
    if peer_lost {
        warn!("the collective broke: {error}");
    } else {
        error!("{error}");
    }
    ToCoordinator::Failed { generation: a.generation, error, peer_lost }
}

/// Sends every step's report and checkpoint to the coordinator; stops when told to.
struct Reporter {
    generation: u64,
    up: mpsc::UnboundedSender<ToCoordinator>,
    stop: Arc<AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
}

impl Observer for Reporter {
    fn on_step(&mut self, report: &StepReport) {
        self.progress.store(report.step, Ordering::SeqCst);
        let memory_bytes = crate::observe::status_bytes("VmHWM").unwrap_or(0);
        let msg = ToCoordinator::Step { generation: self.generation, report: Box::new(report.clone()), memory_bytes };
        let _ = self.up.send(msg);
    }

    fn stop_requested(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn on_checkpoint(&mut self, step: u64, lora_url: &str) {
        let msg = ToCoordinator::Checkpointed { generation: self.generation, step, lora_url: lora_url.into() };
        let _ = self.up.send(msg);
    }
}
