//! Who is in the job: accepting worker connections, checking that each proves the job secret, and turning
//! what they send into events for the coordinator's loop. A peer that fails the handshake, sends a
//! malformed or oversized frame, or speaks out of turn is disconnected with a logged reason; nothing a
//! peer sends can panic the coordinator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use acrf_common::protocol::{self, PROTOCOL_VERSION, ToCoordinator, ToWorker};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How long a connecting peer has to answer the challenge.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type MemberId = u64;

/// A worker that proved the secret.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: MemberId,
    pub addr: SocketAddr,
    pub host: String,
    pub device: String,
    /// Where its collective listens: the connection's IP and the port it reported.
    pub collective_addr: SocketAddr,
    pub tx: mpsc::UnboundedSender<ToWorker>,
    /// Closing it disconnects the worker (a protocol violation, a missed heartbeat).
    pub conn: quinn::Connection,
}

#[derive(Debug)]
pub enum Event {
    Joined(Member),
    Message(MemberId, ToCoordinator),
    /// The connection ended; `reason` says how.
    Left(MemberId, String),
}

/// Accepts connections on `endpoint` until it closes, feeding `events`.
pub async fn accept_loop(
    endpoint: quinn::Endpoint,
    secret: [u8; 32],
    heartbeat: Duration,
    events: std::sync::mpsc::Sender<Event>,
) {
    // Ids go to workers that passed the handshake, in that order, so that refused peers leave no gaps.
    let ids = Arc::new(AtomicU64::new(1));
    while let Some(incoming) = endpoint.accept().await {
        let (events, ids) = (events.clone(), ids.clone());
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve(&ids, conn, secret, heartbeat, events).await,
                Err(e) => warn!("connection attempt from {addr} failed: {e}"),
            }
        });
    }
}

async fn serve(
    ids: &AtomicU64,
    conn: quinn::Connection,
    secret: [u8; 32],
    heartbeat: Duration,
    events: std::sync::mpsc::Sender<Event>,
) {
    let addr = conn.remote_address();
    let (mut send, mut recv) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => return warn!("peer {addr} opened no stream: {e}"),
        Err(_) => return warn!("peer {addr} opened no stream within {HANDSHAKE_TIMEOUT:?}: disconnected"),
    };
    let (host, device, port) = match handshake(&mut send, &mut recv, &secret).await {
        Ok(found) => found,
        Err(reason) => {
            warn!("refused worker at {addr}: {reason}");
            let _ = protocol::write_frame(&mut send, &ToWorker::Reject { reason: reason.clone() }).await;
            let _ = send.finish();
            tokio::time::sleep(Duration::from_millis(200)).await;
            conn.close(1u32.into(), reason.as_bytes());
            return;
        }
    };

    let id = ids.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<ToWorker>();
    let collective_addr = SocketAddr::new(addr.ip(), port);
    let member = Member { id, addr, host, device, collective_addr, tx: tx.clone(), conn: conn.clone() };
    info!("worker {id} joined from {addr} ({}, {})", member.host, member.device);
    let _ = tx.send(ToWorker::Welcome { worker_id: id, heartbeat_ms: heartbeat.as_millis() as u64 });
    if events.send(Event::Joined(member)).is_err() {
        return;
    }
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if protocol::write_frame(&mut send, &msg).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    });
    let reason = loop {
        match protocol::read_frame::<_, ToCoordinator>(&mut recv).await {
            Ok(ToCoordinator::Hello { .. }) => break "a second hello: protocol violation".to_string(),
            Ok(msg) => {
                if events.send(Event::Message(id, msg)).is_err() {
                    break "coordinator stopped".into();
                }
            }
            Err(e @ (protocol::ProtocolError::Malformed(_) | protocol::ProtocolError::TooLarge(_))) => {
                break format!("worker {id} at {addr} sent a bad frame and was disconnected: {e}");
            }
            Err(e) => break format!("worker {id} at {addr} disconnected ({e})"),
        }
    };
    conn.close(0u32.into(), reason.as_bytes());
    writer.abort();
    let _ = events.send(Event::Left(id, reason));
}

/// Challenges the peer and checks its answer: the protocol version and the proof of the job secret.
async fn handshake(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    secret: &[u8; 32],
) -> Result<(String, String, u16), String> {
    let mut magic = [0u8; 4];
    let knock = tokio::time::timeout(HANDSHAKE_TIMEOUT, recv.read_exact(&mut magic)).await;
    if !matches!(knock, Ok(Ok(()))) || magic != protocol::STREAM_MAGIC {
        return Err("not an acrf worker (no stream preamble)".into());
    }
    let nonce = protocol::random_bytes();
    let exchange = async {
        protocol::write_frame(send, &ToWorker::Challenge { version: PROTOCOL_VERSION, nonce }).await?;
        protocol::read_frame::<_, ToCoordinator>(recv).await
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await {
        Err(_) => Err("no answer to the challenge in time".into()),
        Ok(Err(e)) => Err(format!("bad handshake: {e}")),
        Ok(Ok(ToCoordinator::Hello { version, proof, host, device, collective_port })) => {
            if version != PROTOCOL_VERSION {
                return Err(format!("protocol version {version}, this coordinator speaks {PROTOCOL_VERSION}"));
            }
            if !protocol::verify_mac(secret, &[b"acrf-join", &nonce], &proof) {
                return Err("wrong or missing join token (the secret does not match)".into());
            }
            Ok((host, device, collective_port))
        }
        Ok(Ok(other)) => Err(format!("expected a hello, got {}", kind(&other))),
    }
}

fn kind(msg: &ToCoordinator) -> &'static str {
    match msg {
        ToCoordinator::Hello { .. } => "hello",
        ToCoordinator::Ready { .. } => "ready",
        ToCoordinator::Step { .. } => "step",
        ToCoordinator::Heartbeat { .. } => "heartbeat",
        ToCoordinator::Checkpointed { .. } => "checkpointed",
        ToCoordinator::Done { .. } => "done",
        ToCoordinator::Failed { .. } => "failed",
    }
}
