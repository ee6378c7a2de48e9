//! Ring failures, each naming the peer it concerns: a distributed error is only actionable when the operator
//! can tell which machine to look at.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// A ring member as errors name it: its rank and the address it listens on (the one the coordinator handed
/// out, so it can be matched against the job's rank table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub rank: usize,
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rank {} at {}", self.rank, self.addr)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("invalid ring configuration: {0}")]
    Config(String),
    #[error("the ring listener failed")]
    Listen(#[source] io::Error),
    #[error("{op} {peer} failed")]
    Io { op: &'static str, peer: Peer, source: io::Error },
    #[error("{op} {peer} made no progress for {after:?}: the peer stalled or is gone")]
    Stalled { op: &'static str, peer: Peer, after: Duration },
    #[error("{peer} closed the connection")]
    Closed { peer: Peer },
    #[error("handshake with {peer} failed: {reason}")]
    Handshake { peer: Peer, reason: String },
    #[error("{peer} did not connect within {after:?}{}", refusals(refused))]
    Absent { peer: Peer, after: Duration, refused: Vec<String> },
    #[error("right neighbour: {right}; left neighbour: {left}")]
    Bootstrap { right: Box<RingError>, left: Box<RingError> },
    #[error("{peer} is in a different collective: it started {theirs}, this rank {ours}")]
    Mismatch { peer: Peer, ours: String, theirs: String },
    #[error("the ring is broken: {0}")]
    Broken(String),
    #[error("the ring carries f32 and f64 tensors, got {0:?}")]
    DType(candle_core::DType),
}

fn refusals(refused: &[String]) -> String {
    if refused.is_empty() { String::new() } else { format!(" (refused {})", refused.join("; ")) }
}

impl RingError {
    /// Sorts an I/O failure on a ring socket into what the operator needs to know: a silent peer (the socket
    /// timeout fired), a peer that went away, or anything else with the OS error attached.
    pub(super) fn from_io(op: &'static str, peer: Peer, timeout: Duration, e: io::Error) -> RingError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RingError::Stalled { op, peer, after: timeout },
            io::ErrorKind::UnexpectedEof => RingError::Closed { peer },
            _ => RingError::Io { op, peer, source: e },
        }
    }

    /// The message with its causes, for boundaries (candle's error) that keep only text.
    pub fn full_message(&self) -> String {
        let mut message = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        message
    }
}

impl From<RingError> for candle_core::Error {
    fn from(e: RingError) -> Self {
        candle_core::Error::msg(format!("TCP ring collective: {}", e.full_message()))
    }
}
