//! The coordinator's loop: rendezvous, ranks, the start barrier, monitoring, and re-forming the group
//! when a worker dies or more workers can join.
//!
//! A formation (a *generation*) takes the live workers in join order as ranks 0..W, hands each the job, its
//! rank, the global micro-batches per step M (fixed when the run started, so a smaller or larger group
//! trains the same global batch, unevenly where W does not divide M) and the checkpoint to start from, waits
//! until every rank is ready and starts them together. A rank that disconnects, misses heartbeats, or reports
//! a broken collective ends the generation: the survivors are aborted, and a new generation forms from the
//! live workers plus any that joined, down to `min_workers`, from the last committed checkpoint. Workers that
//! join a running group (up to `max_workers`) are taken in by stopping the ranks after their current step,
//! which checkpoints it, and forming again from there, so growing costs no step. A rank that fails for a reason of the job itself (bad data, a
//! non-finite loss) ends the job with that error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use acrf_common::config::Config;
use acrf_common::protocol::{self, Assignment, StepReport, ToCoordinator, ToWorker};
use acrf_worker::checkpoint::{Checkpointer, Start};
use anyhow::{Result, bail};
use indicatif::ProgressBar;
use tracing::{info, warn};

use super::membership::{Event, Member, MemberId, accept_loop};
use crate::console::{Console, Outcome};
use crate::job::writer_id;

enum Phase {
    /// Waiting for workers; `since` is when this wait began.
    Waiting {
        since: Instant,
        first: bool,
    },
    Forming {
        ready: BTreeMap<usize, u64>,
        deadline: Instant,
    },
    Running,
}

struct Group {
    cfg: Config,
    config_toml: String,
    secret: [u8; 32],
    min: usize,
    max: usize,
    heartbeat: Duration,
    heartbeat_timeout: Duration,
    rendezvous_timeout: Duration,
    pool: BTreeMap<MemberId, Member>,
    last_seen: HashMap<MemberId, Instant>,
    ranks: Vec<MemberId>,
    generation: u64,
    /// Where the first formation starts; later ones continue from the newest checkpoint.
    start: Option<Start>,
    /// M, fixed by the first formation.
    micro_batches: Option<usize>,
    phase: Phase,
    reports: BTreeMap<u64, Vec<Option<StepReport>>>,
    done: BTreeSet<usize>,
    stop_sent: bool,
    /// The ranks were asked to stop after their step so that a larger group can form from its checkpoint.
    growing: bool,
    checkpointer: Checkpointer,
    console: Console,
    lora_url: Option<String>,
    steps_done: u64,
}

/// Coordinates `cfg` on `endpoint` from `start` (the [`Checkpointer`]'s decision) until the job ends. `stop`
/// (SIGINT/SIGTERM) makes the ranks checkpoint and stop after their current step. The network runs on the
/// current tokio runtime (which the caller has entered); this loop runs on the calling thread, so it may
/// block on the object store.
pub fn coordinate(
    cfg: Config,
    endpoint: quinn::Endpoint,
    secret: [u8; 32],
    start: Start,
    stop: Arc<AtomicBool>,
    bar: ProgressBar,
) -> Result<Outcome> {
    if let Start::Finished { step, lora_url } = start {
        return Ok(Outcome::finished_before(step, lora_url));
    }
    let d = &cfg.distributed;
    let heartbeat = Duration::from_secs(d.heartbeat_interval_s);
    let (tx, events) = std::sync::mpsc::channel();
    tokio::spawn(accept_loop(endpoint, secret, heartbeat, tx));
    let checkpointer = Checkpointer::new(&cfg, &writer_id())?;
    let console = Console::new(&cfg, checkpointer.run_folder().clone(), bar, stop.clone())?;
    let mut g = Group {
        config_toml: cfg.to_toml_string_with_credentials()?,
        secret,
        min: d.min_workers,
        max: d.effective_max_workers(),
        heartbeat,
        heartbeat_timeout: Duration::from_secs(d.heartbeat_timeout_s),
        rendezvous_timeout: Duration::from_secs(d.rendezvous_timeout_s),
        pool: BTreeMap::new(),
        last_seen: HashMap::new(),
        ranks: Vec::new(),
        generation: 0,
        start: Some(start),
        micro_batches: None,
        phase: Phase::Waiting { since: Instant::now(), first: true },
        reports: BTreeMap::new(),
        done: BTreeSet::new(),
        stop_sent: false,
        growing: false,
        checkpointer,
        console,
        lora_url: None,
        steps_done: 0,
        cfg,
    };
    info!("waiting for {}..{} workers", g.min, g.max);
    let tick = Duration::from_millis(200);
    let mut last_tick = Instant::now();
    let result = loop {
        let step = match events.recv_timeout(tick) {
            Ok(ev) => g.on_event(ev),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(anyhow::anyhow!("the control plane stopped")),
        };
        let step = match step {
            Ok(None) if last_tick.elapsed() >= tick => {
                last_tick = Instant::now();
                g.on_tick(&stop)
            }
            other => other,
        };
        match step {
            Ok(None) => {}
            Ok(Some(outcome)) => break Ok(outcome),
            Err(e) => break Err(e),
        }
    };
    g.console.finish(result.is_ok());
    let reason = match &result {
        Ok(_) => "training finished".to_string(),
        Err(e) => format!("the job failed: {e:#}"),
    };
    for m in g.pool.values() {
        let _ = m.tx.send(ToWorker::Exit { reason: reason.clone() });
    }
    std::thread::sleep(Duration::from_millis(300));
    result
}

impl Group {
    /// Members heard from since `since` (and recently): after a failure, a worker that died cannot have
    /// sent anything since, while a live one sends a heartbeat every interval.
    fn live_since(&self, since: Option<Instant>) -> Vec<MemberId> {
        let fresh = 2 * self.heartbeat + Duration::from_secs(1);
        self.pool
            .keys()
            .copied()
            .filter(|id| self.last_seen.get(id).is_some_and(|t| since.is_none_or(|s| *t >= s) && t.elapsed() <= fresh))
            .collect()
    }

    /// Asks every rank to checkpoint after its current step and end the generation.
    fn stop_ranks(&self, reason: &str) {
        for id in &self.ranks {
            let _ = self.pool[id].tx.send(ToWorker::Stop { reason: reason.into() });
        }
    }

    /// Live workers without a rank that the group could take (up to `max_workers` and the global batch's M
    /// ranks): stopping the ranks after their step and forming again from that checkpoint adds them at the
    /// cost of no step.
    fn waiting(&self) -> usize {
        let room = self.max.min(self.micro_batches.unwrap_or(0)).saturating_sub(self.ranks.len());
        let idle = self.live_since(None).into_iter().filter(|id| self.rank_of(*id).is_none()).count();
        idle.min(room)
    }

    fn rank_of(&self, id: MemberId) -> Option<usize> {
        self.ranks.iter().position(|&r| r == id)
    }

    fn on_tick(&mut self, stop: &AtomicBool) -> Result<Option<Outcome>> {
        let stopping = stop.load(Ordering::SeqCst);
        match &self.phase {
            Phase::Waiting { since, first } => {
                if stopping {
                    bail!("stopped before the group formed");
                }
                let (since, first) = (*since, *first);
                // After a failure, wait long enough for every live worker to have sent a heartbeat, so the
                // dead one is known by its silence.
                let settle = 2 * self.heartbeat + Duration::from_millis(500);
                let counted_from = (!first).then_some(since);
                let live = self.live_since(counted_from).len();
                let settled = first || since.elapsed() >= settle;
                let grace = if first { self.rendezvous_timeout } else { settle + 2 * self.heartbeat };
                if settled && (live >= self.max || (live >= self.min && since.elapsed() >= grace)) {
                    self.form(counted_from)?;
                } else if since.elapsed() >= self.rendezvous_timeout {
                    bail!(
                        "only {live} worker(s) joined within distributed.rendezvous_timeout_s = {}s; \
                         distributed.min_workers is {}",
                        self.rendezvous_timeout.as_secs(),
                        self.min
                    );
                }
            }
            Phase::Forming { deadline, .. } => {
                if Instant::now() > *deadline {
                    self.reform("ranks did not get ready within distributed.rendezvous_timeout_s")?;
                } else {
                    self.drop_silent_ranks()?;
                }
            }
            Phase::Running => {
                if stopping && !self.stop_sent {
                    self.stop_sent = true;
                    info!("stopping: the ranks checkpoint after their current step");
                    self.stop_ranks("the coordinator was interrupted");
                }
                let waiting = self.waiting();
                if waiting > 0 && !self.stop_sent && !self.growing {
                    self.growing = true;
                    info!("{waiting} more worker(s) can join: the ranks checkpoint after their current step");
                    self.stop_ranks("more workers join the group");
                }
                self.drop_silent_ranks()?;
            }
        }
        Ok(None)
    }

    fn on_event(&mut self, ev: Event) -> Result<Option<Outcome>> {
        match ev {
            Event::Joined(m) => {
                self.last_seen.insert(m.id, Instant::now());
                if matches!(self.phase, Phase::Running | Phase::Forming { .. }) {
                    info!("worker {} joined; it takes part from the next formation (at the next checkpoint)", m.id);
                }
                self.pool.insert(m.id, m);
            }
            Event::Left(id, reason) => {
                self.pool.remove(&id);
                self.last_seen.remove(&id);
                if self.rank_of(id).is_some() && !matches!(self.phase, Phase::Waiting { .. }) {
                    warn!("{reason}");
                    self.reform(&reason)?;
                } else {
                    info!("{reason}");
                }
            }
            Event::Message(id, msg) => {
                self.last_seen.insert(id, Instant::now());
                return self.on_message(id, msg);
            }
        }
        Ok(None)
    }

    fn on_message(&mut self, id: MemberId, msg: ToCoordinator) -> Result<Option<Outcome>> {
        let current = |g: u64| g == self.generation;
        let Some(rank) = self.rank_of(id) else {
            if !matches!(msg, ToCoordinator::Heartbeat { .. } | ToCoordinator::Failed { .. }) {
                self.kick(id, "sent a training message without holding a rank");
            }
            return Ok(None);
        };
        match msg {
            ToCoordinator::Heartbeat { .. } | ToCoordinator::Hello { .. } => {}
            ToCoordinator::Ready { generation, start_step, total_steps } if current(generation) => {
                let Phase::Forming { ready, .. } = &mut self.phase else {
                    self.kick(id, "ready outside a formation");
                    return Ok(None);
                };
                ready.insert(rank, start_step);
                if ready.len() == self.ranks.len() {
                    let steps: BTreeSet<u64> = ready.values().copied().collect();
                    if steps.len() != 1 {
                        bail!("the ranks disagree on the starting step: {steps:?}");
                    }
                    let start = *steps.first().expect("one step");
                    self.console.start(start, total_steps)?;
                    self.console.board.set_ranks(
                        self.ranks.iter().map(|id| (self.pool[id].host.clone(), self.pool[id].device.clone())),
                    );
                    self.reports.clear();
                    for id in &self.ranks {
                        let _ = self.pool[id].tx.send(ToWorker::Start { generation: self.generation });
                    }
                    info!(
                        "generation {}: {} ranks start at step {start} of {total_steps}",
                        self.generation,
                        self.ranks.len()
                    );
                    self.phase = Phase::Running;
                }
            }
            ToCoordinator::Step { generation, report, .. } if current(generation) => {
                let w = self.ranks.len();
                let slot = self.reports.entry(report.step).or_insert_with(|| vec![None; w]);
                slot[rank] = Some(*report);
                let complete: Vec<u64> =
                    self.reports.iter().filter(|(_, v)| v.iter().all(Option::is_some)).map(|(s, _)| *s).collect();
                for s in complete {
                    let reports: Vec<StepReport> = self.reports.remove(&s).into_iter().flatten().flatten().collect();
                    self.console.record(&reports);
                }
            }
            ToCoordinator::Checkpointed { generation, step, lora_url } if current(generation) => {
                info!(step, "checkpoint committed; LoRA at {lora_url}");
                self.console.checkpointed(step, &lora_url);
                self.lora_url = Some(lora_url);
            }
            ToCoordinator::Done { generation, steps_done, lora_url } if current(generation) => {
                self.done.insert(rank);
                self.steps_done = steps_done;
                if lora_url.is_some() {
                    self.lora_url = lora_url;
                }
                if self.done.len() == self.ranks.len() {
                    let total = self.console.bar.length().unwrap_or(0);
                    if std::mem::take(&mut self.growing) && !self.stop_sent && steps_done < total {
                        self.reform(&format!("growing the group from the checkpoint of step {steps_done}"))?;
                        return Ok(None);
                    }
                    return Ok(Some(Outcome {
                        steps_done,
                        lora_url: self.lora_url.clone(),
                        stopped_early: steps_done < total,
                        already_finished: false,
                    }));
                }
            }
            ToCoordinator::Failed { generation, error, peer_lost } if current(generation) => {
                if peer_lost {
                    self.reform(&format!("rank {rank}'s collective broke"))?;
                } else {
                    bail!("rank {rank} failed: {error}");
                }
            }
            other => warn!("ignoring a message of another generation from worker {id}: {other:?}"),
        }
        Ok(None)
    }

    /// Disconnects a rank that missed heartbeats for `heartbeat_timeout` and re-forms without it.
    fn drop_silent_ranks(&mut self) -> Result<()> {
        let late = self
            .ranks
            .iter()
            .copied()
            .find(|id| self.last_seen.get(id).is_none_or(|t| t.elapsed() > self.heartbeat_timeout));
        if let Some(id) = late {
            warn!("worker {id} missed heartbeats for {:?}: removing it", self.heartbeat_timeout);
            self.kick(id, "missed heartbeats");
            self.reform(&format!("worker {id} stopped answering"))?;
        }
        Ok(())
    }

    fn kick(&mut self, id: MemberId, reason: &str) {
        if let Some(m) = self.pool.remove(&id) {
            warn!("disconnecting worker {id} at {}: {reason}", m.addr);
            m.conn.close(3u32.into(), reason.as_bytes());
        }
    }

    /// Ends the current generation and waits for a new group.
    fn reform(&mut self, reason: &str) -> Result<()> {
        warn!("generation {} ends: {reason}; re-forming from the last checkpoint", self.generation);
        for id in &self.ranks {
            if let Some(m) = self.pool.get(id) {
                let _ = m.tx.send(ToWorker::Abort { generation: self.generation, reason: reason.into() });
            }
        }
        self.ranks.clear();
        self.done.clear();
        self.reports.clear();
        self.growing = false;
        self.phase = Phase::Waiting { since: Instant::now(), first: false };
        self.console.board.set_state("re-forming the group");
        Ok(())
    }

    /// Assigns ranks to the workers heard from since `since` and sends them the job: the first formation
    /// starts where the checkpointer decided (and a fresh run's global batch is its ranks × accumulation),
    /// later ones continue from the newest checkpoint with the same global batch.
    fn form(&mut self, since: Option<Instant>) -> Result<()> {
        let mut live = self.live_since(since);
        live.truncate(self.max);
        let (resume_step, micro_batches) = match (self.start.take(), self.micro_batches) {
            (Some(Start::Resume { step, micro_batches }), _) => (Some(step), micro_batches),
            (Some(_), _) => (None, live.len() * self.cfg.training.gradient_accumulation),
            (None, Some(m)) => (self.checkpointer.latest()?, m),
            (None, None) => unreachable!("the first formation fixes the global batch"),
        };
        self.micro_batches = Some(micro_batches);
        if live.len() > micro_batches {
            warn!(
                "{} workers for {micro_batches} micro-batches per step: {} of them wait for the next formation",
                live.len(),
                live.len() - micro_batches
            );
            live.truncate(micro_batches);
        }
        let world = live.len();
        self.generation += 1;
        let peers: Vec<_> = live.iter().map(|id| self.pool[id].collective_addr).collect();
        let collective_secret = protocol::mac(&self.secret, &[b"acrf-collective", &self.generation.to_le_bytes()]);
        for (rank, id) in live.iter().enumerate() {
            let a = Assignment {
                generation: self.generation,
                rank,
                world_size: world,
                micro_batches,
                config_toml: self.config_toml.clone(),
                peers: peers.clone(),
                collective_secret,
                resume_step,
            };
            let _ = self.pool[id].tx.send(ToWorker::Assign(Box::new(a)));
        }
        let share = if micro_batches.is_multiple_of(world) {
            format!("{} each", micro_batches / world)
        } else {
            format!(
                "{} or {} each (uneven accumulation, the same global batch)",
                micro_batches / world,
                micro_batches.div_ceil(world)
            )
        };
        info!(
            "generation {}: {world} rank(s) {:?}, {micro_batches} micro-batches per step ({share}), starting from {}",
            self.generation,
            live,
            resume_step.map_or("scratch".to_string(), |s| format!("the checkpoint of step {s}"))
        );
        self.ranks = live;
        self.phase = Phase::Forming { ready: BTreeMap::new(), deadline: Instant::now() + self.rendezvous_timeout };
        Ok(())
    }
}
