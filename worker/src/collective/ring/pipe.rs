//! One collective's traffic. A scoped sender thread writes queued segments to the right neighbour while the
//! calling thread receives the next segment from the left one, reduces it and queues it onward: sending
//! segment k+1 overlaps receiving segment k, and neither direction waits for the other. The queue is
//! unbounded on purpose: a rank's receiving must never wait for its own sending, or a ring of full socket
//! buffers could deadlock; the data dependencies (step s of a rank needs step s−1 of its left neighbour) keep
//! what is queued to about one chunk.

use std::sync::mpsc;
use std::thread;

use super::error::RingError;
use super::link::Links;

enum Out<'a> {
    /// This rank's own values, encoded by the sender thread so the receiving thread never waits on it.
    Floats(&'a [f32]),
    /// Bytes received from the left neighbour (reduced or not), forwarded as they are; the sender hands the
    /// buffer back for reuse.
    Bytes(Vec<u8>),
}

pub(super) struct Pipe<'a> {
    links: &'a Links,
    queue: mpsc::Sender<Out<'a>>,
    spare: mpsc::Receiver<Vec<u8>>,
}

impl<'a> Pipe<'a> {
    pub(super) fn send_floats(&self, floats: &'a [f32]) {
        self.queue(Out::Floats(floats));
    }

    pub(super) fn forward(&self, bytes: Vec<u8>) {
        self.queue(Out::Bytes(bytes));
    }

    fn queue(&self, out: Out<'a>) {
        // The sender only hangs up after a failure it has already recorded; the next receive reports it.
        let _ = self.queue.send(out);
    }

    pub(super) fn receive(&self, bytes: usize) -> Result<Vec<u8>, RingError> {
        let mut buf = self.spare.try_recv().unwrap_or_default();
        buf.resize(bytes, 0);
        self.links.receive(&mut buf)?;
        Ok(buf)
    }
}

/// Runs `body` (the receiving side) with a sender thread behind its pipe. The first failure on either side
/// breaks the ring at once, which unblocks the other side; an induced failure reports the first one's cause.
pub(super) fn run<'a, T>(
    links: &'a Links,
    body: impl FnOnce(&Pipe<'a>) -> Result<T, RingError>,
) -> Result<T, RingError> {
    let settle = |e: RingError| match links.break_with(e.full_message()) {
        None => e,
        Some(cause) => RingError::Broken(cause),
    };
    let (queue, queued) = mpsc::channel();
    let (give_back, spare) = mpsc::channel();
    thread::scope(|s| {
        let sender = s.spawn(|| send(links, queued, give_back).map_err(settle));
        let pipe = Pipe { links, queue, spare };
        // Settled before the join, so a sender stuck on a stalled neighbour is released by the shutdown.
        let outcome = body(&pipe).map_err(settle);
        drop(pipe);
        let sent = sender.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let value = outcome?;
        sent.map(|()| value)
    })
}

fn send(links: &Links, queued: mpsc::Receiver<Out<'_>>, give_back: mpsc::Sender<Vec<u8>>) -> Result<(), RingError> {
    let mut scratch = Vec::new();
    for out in queued {
        match out {
            Out::Floats(floats) => {
                encode(floats, &mut scratch);
                links.send(&scratch)?;
            }
            Out::Bytes(bytes) => {
                links.send(&bytes)?;
                // The receiving side may be done and gone; the buffer is then simply freed.
                let _ = give_back.send(bytes);
            }
        }
    }
    Ok(())
}

/// Little-endian on the wire, so ranks agree on the bytes whatever the host order.
fn encode(floats: &[f32], bytes: &mut Vec<u8>) {
    bytes.resize(4 * floats.len(), 0);
    for (b, f) in bytes.as_chunks_mut::<4>().0.iter_mut().zip(floats) {
        *b = f.to_le_bytes();
    }
}

/// `bytes` (little-endian f32) += `local`, element-wise, in place.
pub(super) fn add_into(bytes: &mut [u8], local: &[f32]) {
    for (b, x) in bytes.as_chunks_mut::<4>().0.iter_mut().zip(local) {
        *b = (f32::from_le_bytes(*b) + x).to_le_bytes();
    }
}

pub(super) fn decode_into(floats: &mut [f32], bytes: &[u8]) {
    for (f, b) in floats.iter_mut().zip(bytes.as_chunks::<4>().0) {
        *f = f32::from_le_bytes(*b);
    }
}
