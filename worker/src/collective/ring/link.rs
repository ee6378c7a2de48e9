//! The two connections a rank holds in the ring: it only ever sends to its right neighbour and receives from
//! its left one, so each socket carries one direction of tensor traffic and the ring needs no framing
//! beyond the per-collective header. Both are shut down together on the first failure or on abort: a
//! neighbour blocked on either socket then errors at once instead of waiting out its timeout, and the
//! failure travels around the ring in one hop per rank.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::error::{Peer, RingError};

pub(super) struct Links {
    left: TcpStream,
    right: TcpStream,
    pub(super) left_peer: Peer,
    pub(super) right_peer: Peer,
    timeout: Duration,
    /// Why the ring was broken, once it is: a ring that lost bytes mid-collective cannot be resynchronised,
    /// so every later call fails with the original cause.
    broken: Mutex<Option<String>>,
}

impl Links {
    pub(super) fn new(
        left: (TcpStream, Peer),
        right: (TcpStream, Peer),
        timeout: Duration,
    ) -> Result<Links, RingError> {
        for (stream, peer) in [&left, &right] {
            let io = |e| RingError::Io { op: "configuring the connection with", peer: *peer, source: e };
            stream.set_read_timeout(Some(timeout)).map_err(io)?;
            stream.set_write_timeout(Some(timeout)).map_err(io)?;
        }
        Ok(Links {
            left: left.0,
            right: right.0,
            left_peer: left.1,
            right_peer: right.1,
            timeout,
            broken: Mutex::new(None),
        })
    }

    pub(super) fn receive(&self, buf: &mut [u8]) -> Result<(), RingError> {
        (&self.left).read_exact(buf).map_err(|e| RingError::from_io("receiving from", self.left_peer, self.timeout, e))
    }

    pub(super) fn send(&self, buf: &[u8]) -> Result<(), RingError> {
        (&self.right).write_all(buf).map_err(|e| RingError::from_io("sending to", self.right_peer, self.timeout, e))
    }

    pub(super) fn check(&self) -> Result<(), RingError> {
        match self.broken.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            Some(reason) => Err(RingError::Broken(reason.clone())),
            None => Ok(()),
        }
    }

    /// Breaks the ring for `reason` and shuts both sockets down, unless it is broken already: then nothing
    /// changes and the earlier reason comes back, since it, not this induced failure, is the cause.
    pub(super) fn break_with(&self, reason: String) -> Option<String> {
        let mut broken = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(earlier) = broken.as_ref() {
            return Some(earlier.clone());
        }
        *broken = Some(reason);
        // A socket the peer already closed reports ENOTCONN here; it is down either way.
        let _ = self.left.shutdown(Shutdown::Both);
        let _ = self.right.shutdown(Shutdown::Both);
        None
    }
}
