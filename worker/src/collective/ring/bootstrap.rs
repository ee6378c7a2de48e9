//! Forming the ring: each rank dials its right neighbour while it accepts its left one (both at once, or
//! every rank would wait in its dial for a neighbour that is itself still dialling). The listener keeps
//! accepting until the right peer completes the handshake or the deadline passes; whatever it refused on the
//! way is logged and named in the timeout error, since a refused connection usually is the misconfiguration.
//! Handshakes run one at a time: a stray client that sends anything but the protocol magic is refused at its
//! first bytes, but one that connects and stays silent holds the listener until the deadline (a job's ring
//! ports are cluster-internal; the handshake guards against mix-ups, not against denial of service).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::error::{Peer, RingError};
use super::handshake::{Role, handshake};
use super::link::Links;

pub struct RingConfig {
    pub rank: usize,
    pub world: usize,
    /// Bound before the ring forms, so the coordinator can learn every rank's port and hand out `peers`.
    pub listener: TcpListener,
    /// Every rank's listen address, indexed by rank.
    pub peers: Vec<SocketAddr>,
    /// The job secret: only processes holding it pass the handshake, so ranks of two jobs (or a stale rank
    /// of an earlier run on a reused port) can never exchange tensors.
    pub secret: [u8; 32],
    /// Bounds forming the ring and every blocking socket operation after it, turning a dead or stalled peer
    /// into an error. It must exceed the longest time a rank can wait for the slowest rank to reach the same
    /// collective.
    pub timeout: Duration,
    /// Set from another thread to give up forming the ring, e.g. when the coordinator re-forms the group
    /// while this rank still waits for a peer that died; it also frees the shared listener for the next try.
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// How often the listener looks for a new connection and the dialer retries a refused one.
const POLL: Duration = Duration::from_millis(10);
/// Refusals named in a timeout error; more would bury the message.
const REPORTED_REFUSALS: usize = 8;

pub(super) fn connect(cfg: RingConfig) -> Result<Links, RingError> {
    let RingConfig { rank, world, listener, peers, secret, timeout, cancel } = cfg;
    if world < 2 {
        return Err(RingError::Config(format!("a ring needs at least 2 ranks, got {world} (use Local for one)")));
    }
    if rank >= world || peers.len() != world {
        return Err(RingError::Config(format!(
            "rank {rank} in a world of {world} with {} peer addresses",
            peers.len()
        )));
    }
    if timeout.is_zero() {
        return Err(RingError::Config("the timeout must be positive".into()));
    }
    let peer = |r: usize| Peer { rank: r, addr: peers[r] };
    let (left, right) = (peer((rank + world - 1) % world), peer((rank + 1) % world));
    let deadline = Instant::now() + timeout;
    let me = Me { secret: &secret, rank, world, deadline, cancel: &cancel };

    let cancelled = AtomicBool::new(false);
    let (dialled, accepted) = thread::scope(|s| {
        let accepting = s.spawn(|| accept(&me, &listener, left, &cancelled, timeout));
        let dialled = dial(&me, right);
        // At the deadline the listener stops by itself, with the refusals that may explain the failure.
        if dialled.is_err() && me.remaining().is_some() {
            cancelled.store(true, Ordering::Relaxed);
        }
        (dialled, accepting.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    });
    match (dialled, accepted) {
        (Ok(r), Ok(Some(l))) => {
            info!(rank, world, %left, %right, "ring formed");
            Links::new((l, left), (r, right), timeout)
        }
        (Err(right), Err(left)) => Err(RingError::Bootstrap { right: Box::new(right), left: Box::new(left) }),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Ok(_), Ok(None)) => Err(RingError::Broken("forming the ring was cancelled".into())),
    }
}

struct Me<'a> {
    secret: &'a [u8; 32],
    rank: usize,
    world: usize,
    deadline: Instant,
    /// Set from outside to give up: the group is re-forming without this ring.
    cancel: &'a AtomicBool,
}

impl Me<'_> {
    fn remaining(&self) -> Option<Duration> {
        Some(self.deadline.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }

    /// Handshakes on `stream` within what is left of the deadline.
    fn greet(&self, stream: &TcpStream, role: Role, expect: usize) -> Result<(), String> {
        let left = self.remaining().ok_or("no time left before the bootstrap deadline")?;
        tune(stream)
            .and_then(|()| stream.set_read_timeout(Some(left)))
            .and_then(|()| stream.set_write_timeout(Some(left)))
            .map_err(|e| format!("configuring the socket failed: {e}"))?;
        handshake(stream, self.secret, role, self.rank, self.world, expect)
    }
}

/// Dials `right` until it answers (its listener may not be accepting yet) and handshakes once: a peer that
/// answers but fails the handshake is misconfigured, and retrying would not change that.
fn dial(me: &Me<'_>, right: Peer) -> Result<TcpStream, RingError> {
    let stream = loop {
        let failed = match TcpStream::connect_timeout(&right.addr, me.remaining().unwrap_or(POLL)) {
            Ok(stream) => break stream,
            Err(e) => e,
        };
        if me.remaining().is_none() {
            return Err(RingError::Io { op: "connecting to", peer: right, source: failed });
        }
        if me.cancel.load(Ordering::Relaxed) {
            return Err(RingError::Broken("forming the ring was cancelled".into()));
        }
        thread::sleep(POLL);
    };
    me.greet(&stream, Role::Connector, right.rank).map_err(|reason| RingError::Handshake { peer: right, reason })?;
    Ok(stream)
}

/// The settings of every ring connection (public so benchmarks can give a plain stream the same ones).
/// TCP_NODELAY, so a header or a segment's tail never waits for an ACK. Buffer sizes are left to the kernel,
/// on purpose: setting SO_SNDBUF/SO_RCVBUF turns Linux's autotuning off and is clamped to
/// net.core.{w,r}mem_max (208 KiB on stock kernels), far below the several MiB autotuning grows to when the
/// link needs them; on loopback explicit 4 MiB buffers were no faster (docs/performance.md).
pub fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)
}

/// Accepts until `left` completes the handshake; `None` when the dial failed and the ring cannot form anyway.
fn accept(
    me: &Me<'_>,
    listener: &TcpListener,
    left: Peer,
    cancelled: &AtomicBool,
    timeout: Duration,
) -> Result<Option<TcpStream>, RingError> {
    listener.set_nonblocking(true).map_err(RingError::Listen)?;
    let mut refused = Vec::new();
    loop {
        if cancelled.load(Ordering::Relaxed) || me.cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match listener.accept() {
            Ok((stream, from)) => {
                let greeted = stream
                    .set_nonblocking(false)
                    .map_err(|e| format!("configuring the socket failed: {e}"))
                    .and_then(|()| me.greet(&stream, Role::Acceptor, left.rank));
                match greeted {
                    Ok(()) => return Ok(Some(stream)),
                    Err(reason) => {
                        warn!(rank = me.rank, %from, "refused a ring connection: {reason}");
                        if refused.len() < REPORTED_REFUSALS {
                            refused.push(format!("{from}: {reason}"));
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if me.remaining().is_none() {
                    return Err(RingError::Absent { peer: left, after: timeout, refused });
                }
                thread::sleep(POLL);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(RingError::Listen(e)),
        }
    }
}
