//! The live status of a running job, served by its coordinator: `/status` (JSON: step, ETA, ranks, their
//! throughput, the last losses and checkpoint), `/metrics?since=STEP` (the loss curve from a step on, so a
//! page polls only what is new) and `/` (a page that redraws the curve as it grows, with no external script).
//!
//! The [`Board`] is what the run loop updates; the server only reads it, on a thread and runtime of its own,
//! so neither the single-process path (which has no runtime) nor the coordinator's loop waits on a client.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use acrf_common::protocol::StepReport;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::json;
use tracing::warn;

/// The page of `/`.
const PAGE: &str = include_str!("status.html");
/// Steps the ETA is averaged over.
const RATE_WINDOW: usize = 20;
/// Losses `/status` lists.
const LAST_LOSSES: usize = 10;

/// One point of the loss curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    pub step: u64,
    pub loss: f64,
    pub ema_loss: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Rank {
    rank: usize,
    host: String,
    device: String,
    /// This rank's samples per second in its last step.
    samples_per_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Checkpoint {
    step: u64,
    lora: String,
}

struct Live {
    run: String,
    state: &'static str,
    step: u64,
    total: u64,
    ranks: Vec<Rank>,
    curve: Vec<Point>,
    finished_at: VecDeque<Instant>,
    checkpoint: Option<Checkpoint>,
    /// The last Turbo drift measured, with its step.
    turbo_drift: Option<serde_json::Value>,
}

/// What a run shows of itself while it runs. Cloning shares it.
#[derive(Clone)]
pub struct Board(Arc<Mutex<Live>>);

impl Board {
    pub fn new(run: &str) -> Board {
        Board(Arc::new(Mutex::new(Live {
            run: run.to_string(),
            state: "waiting for workers",
            step: 0,
            total: 0,
            ranks: Vec::new(),
            curve: Vec::new(),
            finished_at: VecDeque::new(),
            checkpoint: None,
            turbo_drift: None,
        })))
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A (re)start at `start` of `total` steps, with the curve so far.
    pub fn start(&self, start: u64, total: u64, curve: Vec<Point>) {
        let mut l = self.live();
        (l.state, l.step, l.total, l.curve) = ("running", start, total, curve);
        l.finished_at.clear();
    }

    /// The ranks of the current group, as (host, device) in rank order.
    pub fn set_ranks(&self, ranks: impl IntoIterator<Item = (String, String)>) {
        self.live().ranks = ranks
            .into_iter()
            .enumerate()
            .map(|(rank, (host, device))| Rank { rank, host, device, samples_per_s: None })
            .collect();
    }

    /// A finished step, from every rank's report.
    pub fn step(&self, reports: &[StepReport], ema_loss: f64) {
        let Some(first) = reports.first() else { return };
        let mut l = self.live();
        l.step = first.step;
        l.curve.push(Point { step: first.step, loss: first.loss, ema_loss });
        l.finished_at.push_back(Instant::now());
        if l.finished_at.len() > RATE_WINDOW {
            l.finished_at.pop_front();
        }
        if let Some(drift) = reports.iter().find_map(|r| r.drift.as_ref()) {
            let mut value = json!(drift);
            value["step"] = json!(first.step);
            l.turbo_drift = Some(value);
        }
        for r in reports {
            if let Some(rank) = l.ranks.get_mut(r.rank) {
                rank.samples_per_s = (r.seconds > 0.0).then(|| r.rank_sigmas.len() as f64 / r.seconds);
            }
        }
    }

    pub fn checkpoint(&self, step: u64, lora: &str) {
        self.live().checkpoint = Some(Checkpoint { step, lora: lora.to_string() });
    }

    /// What the run is doing, in a few words.
    pub fn set_state(&self, state: &'static str) {
        self.live().state = state;
    }

    /// Seconds left at the pace of the last steps, once two steps have been timed.
    fn eta(l: &Live) -> Option<f64> {
        let timed = l.finished_at.len();
        if timed < 2 {
            return None;
        }
        let per_step = l.finished_at[timed - 1].duration_since(l.finished_at[0]).as_secs_f64() / (timed - 1) as f64;
        Some(per_step * l.total.saturating_sub(l.step) as f64)
    }

    pub fn status(&self) -> serde_json::Value {
        let l = self.live();
        let last: Vec<&Point> = l.curve.iter().rev().take(LAST_LOSSES).rev().collect();
        json!({
            "run": l.run,
            "state": l.state,
            "step": l.step,
            "total": l.total,
            "eta_s": Self::eta(&l),
            "ranks": l.ranks,
            "last_losses": last,
            "last_checkpoint": l.checkpoint,
            "turbo_drift": l.turbo_drift,
        })
    }

    /// The curve after step `since`.
    pub fn metrics(&self, since: u64) -> serde_json::Value {
        let l = self.live();
        let points: Vec<&Point> = l.curve.iter().filter(|p| p.step > since).collect();
        json!({ "run": l.run, "total": l.total, "points": points })
    }
}

/// What one client may hold of the status server, so that a flood of connections (or a slow client) cannot
/// take the page down or the process's file descriptors with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait in the listen backlog, holding no descriptor of ours.
    pub max_connections: usize,
    /// How long a client has to send a request's headers, the first request's or the next one's on a kept-alive
    /// connection: a half-sent request or an idle connection is closed after it.
    pub header_read_timeout: Duration,
    /// The longest one connection is served, however busy.
    pub connection_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

/// The first wait after a failed accept (out of descriptors, say); it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The HTTP server of a [`Board`]; it stops when dropped.
pub struct StatusServer {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusServer {
    /// Serves `board` on `addr` (port 0: any free port) under the default [`Limits`].
    pub fn start(addr: SocketAddr, board: Board) -> std::io::Result<StatusServer> {
        StatusServer::with_limits(addr, board, Limits::default())
    }

    /// Serves `board` on `addr` under `limits`.
    pub fn with_limits(addr: SocketAddr, board: Board, limits: Limits) -> std::io::Result<StatusServer> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || runtime.block_on(serve(listener, board, limits, rx)))?;
        Ok(StatusServer { addr, shutdown: Some(tx), thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts and serves connections until `shutdown`. A failed accept (EMFILE under a flood) is logged and
/// retried after a growing pause: the page stays up for when the flood passes.
async fn serve(
    listener: std::net::TcpListener,
    board: Board,
    limits: Limits,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return warn!("status page: {e}"),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            accepted = async {
                let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
                (listener.accept().await, slot)
            } => accepted,
            _ = &mut shutdown => return,
        };
        let (stream, slot) = match accepted {
            (Ok((stream, _)), slot) => {
                backoff = FIRST_BACKOFF;
                (stream, slot)
            }
            (Err(e), _) => {
                warn!("status page: accepting a connection: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut shutdown => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let board = board.clone();
        let service = hyper::service::service_fn(move |req| {
            let reply = respond(&board, &req);
            async move { Ok::<_, Infallible>(reply) }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A client that goes away mid-request, or outstays its time, is no concern of the run.
            let _ = tokio::time::timeout(limits.connection_lifetime, conn).await;
            drop(slot);
        });
    }
}

fn respond(board: &Board, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    let json = |v: serde_json::Value| reply(StatusCode::OK, "application/json", v.to_string());
    match req.uri().path() {
        "/" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
        "/status" => json(board.status()),
        "/metrics" => {
            let since = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            json(board.metrics(since))
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /, /status or /metrics\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: u64, rank: usize, loss: f64) -> StepReport {
        StepReport {
            step,
            epoch: 0,
            loss,
            terms: Default::default(),
            mean_weight: 1.0,
            lr: 1e-4,
            grad_norm: 0.5,
            module_grad_norms: Default::default(),
            eval_loss: None,
            sigmas: vec![0.5, 0.9],
            anchor_sigmas: vec![0.5, 0.9],
            sample_losses: vec![loss, loss],
            rank,
            rank_sigmas: vec![0.5],
            samples: 2,
            seconds: 0.5,
            skipped: false,
            stop: false,
            phases: Default::default(),
            drift: None,
        }
    }

    #[test]
    fn board_reports_progress_ranks_and_the_curve_since_a_step() {
        let board = Board::new("sweep/job");
        board.set_ranks([("h0".to_string(), "cpu".to_string()), ("h1".to_string(), "cuda:1".to_string())]);
        board.start(
            2,
            10,
            vec![Point { step: 1, loss: 1.0, ema_loss: 1.0 }, Point { step: 2, loss: 0.9, ema_loss: 0.95 }],
        );
        board.step(&[report(3, 0, 0.8), report(3, 1, 0.8)], 0.9);
        board.step(&[report(4, 0, 0.7), report(4, 1, 0.7)], 0.85);
        board.checkpoint(4, "out/x.safetensors");
        let s = board.status();
        assert_eq!(
            (s["run"].as_str(), s["step"].as_u64(), s["total"].as_u64()),
            (Some("sweep/job"), Some(4), Some(10))
        );
        assert!(s["eta_s"].as_f64().is_some_and(|e| e >= 0.0), "{s}");
        assert_eq!(s["ranks"][1]["device"], "cuda:1");
        assert_eq!(s["ranks"][0]["samples_per_s"], 2.0);
        assert_eq!(s["last_losses"].as_array().map(Vec::len), Some(4));
        assert_eq!(s["last_checkpoint"]["step"], 4);
        let m = board.metrics(2);
        let steps: Vec<u64> = m["points"].as_array().unwrap().iter().filter_map(|p| p["step"].as_u64()).collect();
        assert_eq!(steps, [3, 4]);
    }
}
