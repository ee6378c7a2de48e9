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

pub(super) struct Pipe<'a> {
    links: &'a Links,
    queue: mpsc::Sender<Vec<u8>>,
    /// Buffers the sender has written, back for reuse.
    sent: mpsc::Receiver<Vec<u8>>,
    free: Vec<Vec<u8>>,
}

impl Pipe<'_> {
    /// Queues a copy of this rank's own values: the caller may overwrite them before the sender gets to them.
    pub(super) fn send_values<T: Element>(&mut self, values: &[T]) {
        let mut bytes = self.buffer(T::SIZE * values.len());
        for (b, v) in bytes.chunks_exact_mut(T::SIZE).zip(values) {
            v.write(b);
        }
        self.send(bytes);
    }

    pub(super) fn send(&self, bytes: Vec<u8>) {
        // The sender only hangs up after a failure it has already recorded; the next receive reports it.
        let _ = self.queue.send(bytes);
    }

    pub(super) fn receive(&mut self, bytes: usize) -> Result<Vec<u8>, RingError> {
        let mut buf = self.buffer(bytes);
        self.links.receive(&mut buf)?;
        Ok(buf)
    }

    /// Returns a received buffer that is not forwarded.
    pub(super) fn recycle(&mut self, bytes: Vec<u8>) {
        self.free.push(bytes);
    }

    fn buffer(&mut self, bytes: usize) -> Vec<u8> {
        let mut buf = self.free.pop().or_else(|| self.sent.try_recv().ok()).unwrap_or_default();
        buf.resize(bytes, 0);
        buf
    }
}

/// Runs `body` (the receiving side) with a sender thread behind its pipe. The first failure on either side
/// breaks the ring at once, which unblocks the other side; an induced failure reports the first one's cause.
/// `pool` lends the pipe its buffers and gets them all back after a success: the trainer reduces the same
/// size every step, and fresh buffers would cost a page fault per 4 KiB, which on loopback costs more than
/// the copies themselves. It keeps what the largest call had in flight.
pub(super) fn run<T>(
    links: &Links,
    pool: &mut Vec<Vec<u8>>,
    body: impl FnOnce(&mut Pipe<'_>) -> Result<T, RingError>,
) -> Result<T, RingError> {
    let settle = |e: RingError| match links.break_with(e.full_message()) {
        None => e,
        Some(cause) => RingError::Broken(cause),
    };
    let (queue, queued) = mpsc::channel();
    let (give_back, sent) = mpsc::channel();
    thread::scope(|s| {
        let sender = s.spawn(|| send(links, queued, give_back).map_err(settle));
        let mut pipe = Pipe { links, queue, sent, free: std::mem::take(pool) };
        // Settled before the join, so a sender stuck on a stalled neighbour is released by the shutdown.
        let outcome = body(&mut pipe).map_err(settle);
        let Pipe { queue, sent, free, .. } = pipe;
        drop(queue);
        let written = sender.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let value = outcome?;
        written?;
        *pool = free;
        pool.extend(sent.try_iter());
        Ok(value)
    })
}

fn send(links: &Links, queued: mpsc::Receiver<Vec<u8>>, give_back: mpsc::Sender<Vec<u8>>) -> Result<(), RingError> {
    for bytes in queued {
        links.send(&bytes)?;
        // A buffer that cannot go back is merely freed.
        let _ = give_back.send(bytes);
    }
    Ok(())
}

/// A number the ring carries: f32, or f64 for sums that must not depend on their order. Little-endian on the
/// wire, so ranks agree on the bytes whatever the host order.
pub trait Element: Copy + Send + Sync + std::ops::Add<Output = Self> + 'static {
    const SIZE: usize;
    /// Names the type in a collective's header, so ranks that disagree on it fail instead of misreading.
    const NAME: &'static str;
    fn read(bytes: &[u8]) -> Self;
    fn write(self, bytes: &mut [u8]);
}

macro_rules! element {
    ($t:ty, $name:literal) => {
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            const NAME: &'static str = $name;
            #[inline]
            fn read(bytes: &[u8]) -> Self {
                <$t>::from_le_bytes(bytes.try_into().expect("one element's bytes"))
            }
            #[inline]
            fn write(self, bytes: &mut [u8]) {
                bytes.copy_from_slice(&self.to_le_bytes());
            }
        }
    };
}

element!(f32, "f32");
element!(f64, "f64");

/// `bytes` (little-endian elements) += `local`, element-wise, in place.
pub(super) fn add_into<T: Element>(bytes: &mut [u8], local: &[T]) {
    for (b, &x) in bytes.chunks_exact_mut(T::SIZE).zip(local) {
        (T::read(b) + x).write(b);
    }
}

pub(super) fn decode_into<T: Element>(values: &mut [T], bytes: &[u8]) {
    for (v, b) in values.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
        *v = T::read(b);
    }
}
