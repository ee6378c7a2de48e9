//! A CPU collective between worker processes over TCP, for ranks without NCCL (CPU training, tests, mixed
//! hosts). The ranks form a ring: each sends only to its right neighbour (rank + 1) and receives only from
//! its left one, so every link carries the same load and a rank's bandwidth need does not grow with the
//! world size.
//!
//! All-reduce is reduce-scatter then all-gather over `n` chunks, pipelined in segments. In reduce-scatter
//! step `s` rank `r` receives chunk `r − s − 1`'s partial sum, adds its own values and forwards it; after
//! `n − 1` steps it holds the full sum of chunk `r + 1`. All-gather passes the full sums around once more,
//! and ranks *copy* them, never re-add, so every rank ends with the same bytes. The sum order, per chunk `c`:
//! `((x_c + x_{c+1}) + x_{c+2}) + … + x_{c+n−1}`, ranks modulo `n`, `x_k` rank `k`'s values. It differs from
//! a single process's order but is fixed for a given world size, so reruns are bitwise reproducible.
//!
//! Broadcast streams the root's buffer along the ring, each rank forwarding segments as they arrive.
//!
//! A dead or stalled peer makes the pending collective fail within the configured timeout, and the first
//! failure (or [`Ring::abort`]) shuts this rank's sockets down, so its neighbours fail at once and the
//! failure reaches every rank in one hop each: nothing hangs, and elastic recovery can rebuild the ring.

mod bootstrap;
mod error;
mod handshake;
mod layout;
mod link;
mod pipe;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use candle_core::{DType, Tensor};

pub use bootstrap::{RingConfig, tune as tune_socket};
pub use error::{Peer, RingError};
use layout::{chunk, segments};
use link::Links;
pub use pipe::Element;
use pipe::{Pipe, add_into, decode_into};

use super::api::{Abort, Collective};

pub struct Ring {
    rank: usize,
    world: usize,
    links: Arc<Links>,
    /// Collectives started, carried in each header so a rank that skipped or repeated one is caught.
    calls: u64,
    /// Segment buffers kept between collectives (see `pipe::run`).
    pool: Vec<Vec<u8>>,
}

/// Aborts a ring from another thread, e.g. a watchdog that learned a peer died while this rank is blocked in
/// a collective.
#[derive(Clone)]
pub struct RingAbort(Arc<Links>);

impl Abort for RingAbort {
    fn abort(&self) {
        self.0.break_with("aborted by this rank".into());
    }

    fn is_broken(&self) -> bool {
        self.0.check().is_err()
    }
}

impl Ring {
    /// Forms the ring: dials the right neighbour, accepts the left one, authenticates both.
    pub fn connect(cfg: RingConfig) -> Result<Ring, RingError> {
        let (rank, world) = (cfg.rank, cfg.world);
        Ok(Ring { rank, world, links: Arc::new(bootstrap::connect(cfg)?), calls: 0, pool: Vec::new() })
    }

    /// Replaces `data` with the element-wise sum of every rank's `data` (all of the same length and type), the
    /// same bytes on every rank.
    pub fn all_reduce<T: Element>(&mut self, data: &mut [T]) -> Result<(), RingError> {
        let (n, r, len) = (self.world, self.rank, data.len());
        let chunk_of = |c: usize| chunk(len, n, c % n);
        self.collective(Call { kind: Kind::AllReduce, element: T::NAME, root: 0, len }, |pipe| {
            // Chunk r is copied out first, so the all-gather may overwrite it in place; every other chunk is
            // read (reduce-scatter) before it is overwritten (all-gather, or the last reduce-scatter step).
            for seg in segments(chunk_of(r)) {
                pipe.send_values(&data[seg]);
            }
            for step in 0..n - 1 {
                let complete = step == n - 2;
                for seg in segments(chunk_of(r + n - 1 - step)) {
                    let mut bytes = pipe.receive(T::SIZE * seg.len())?;
                    add_into(&mut bytes, &data[seg.clone()]);
                    if complete {
                        decode_into(&mut data[seg], &bytes);
                    }
                    pipe.send(bytes);
                }
            }
            for step in 0..n - 1 {
                for seg in segments(chunk_of(r + n - step)) {
                    let bytes = pipe.receive(T::SIZE * seg.len())?;
                    decode_into(&mut data[seg], &bytes);
                    if step < n - 2 {
                        pipe.send(bytes);
                    } else {
                        pipe.recycle(bytes);
                    }
                }
            }
            Ok(())
        })
    }

    /// Replaces `data` with `root`'s `data` on every rank; the lengths and types must match.
    pub fn broadcast<T: Element>(&mut self, data: &mut [T], root: usize) -> Result<(), RingError> {
        if root >= self.world {
            return Err(RingError::Config(format!("broadcast root {root} in a world of {}", self.world)));
        }
        let (r, forward) = (self.rank, (self.rank + 1) % self.world != root);
        self.collective(Call { kind: Kind::Broadcast, element: T::NAME, root, len: data.len() }, |pipe| {
            if r == root {
                for seg in segments(0..data.len()) {
                    pipe.send_values(&data[seg]);
                }
                return Ok(());
            }
            for seg in segments(0..data.len()) {
                let bytes = pipe.receive(T::SIZE * seg.len())?;
                decode_into(&mut data[seg], &bytes);
                if forward {
                    pipe.send(bytes);
                } else {
                    pipe.recycle(bytes);
                }
            }
            Ok(())
        })
    }

    /// Shuts this rank's sockets down: its pending and later collectives fail, and so do its neighbours'.
    pub fn abort(&self) {
        self.abort_handle().abort();
    }

    pub fn abort_handle(&self) -> RingAbort {
        RingAbort(self.links.clone())
    }

    /// Exchanges headers with the neighbours before any data, so ranks that disagree on the collective,
    /// its length or its root fail with both calls named instead of reducing misaligned bytes.
    fn collective(
        &mut self,
        call: Call,
        body: impl FnOnce(&mut Pipe<'_>) -> Result<(), RingError>,
    ) -> Result<(), RingError> {
        self.links.check()?;
        self.calls += 1;
        let ours = call.encode(self.calls);
        let links = &*self.links;
        pipe::run(links, &mut self.pool, |pipe| {
            pipe.send(ours.to_vec());
            let theirs = pipe.receive(HEADER)?;
            if theirs != ours {
                return Err(RingError::Mismatch {
                    peer: links.left_peer,
                    ours: describe(&ours),
                    theirs: describe(&theirs),
                });
            }
            pipe.recycle(theirs);
            body(pipe)
        })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.abort();
    }
}

#[derive(Clone, Copy)]
enum Kind {
    AllReduce = 1,
    Broadcast = 2,
}

struct Call {
    kind: Kind,
    /// [`Element::NAME`] of the values.
    element: &'static str,
    root: usize,
    len: usize,
}

const HEADER: usize = 24;

/// The element types a header can name, by their code in its second byte.
const ELEMENTS: [&str; 2] = [<f32 as Element>::NAME, <f64 as Element>::NAME];

impl Call {
    fn encode(&self, number: u64) -> [u8; HEADER] {
        let element = ELEMENTS.iter().position(|&e| e == self.element).expect("every Element is listed") as u8;
        [
            &[self.kind as u8, element, 0, 0][..],
            &(self.root as u32).to_le_bytes(),
            &(self.len as u64).to_le_bytes(),
            &number.to_le_bytes(),
        ]
        .concat()
        .try_into()
        .expect("the fields add up to HEADER bytes")
    }
}

fn describe(header: &[u8]) -> String {
    let field = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
    let (len, number) = (field(8), field(16));
    let root = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let element = ELEMENTS.get(header[1] as usize).copied().unwrap_or("unknown");
    match header[0] {
        1 => format!("all-reduce #{number} of {len} {element}"),
        2 => format!("broadcast #{number} of {len} {element} from rank {root}"),
        kind => format!("unknown collective kind {kind}"),
    }
}

/// Runs `op` on `t`'s values on the host, as f32 or f64: the trainer's tensors are one or the other, and
/// anything else would need a lossy or silent conversion.
fn on_host(t: &Tensor, op: impl FnOnce(&mut HostValues) -> Result<(), RingError>) -> candle_core::Result<Tensor> {
    let mut values = match t.dtype() {
        DType::F32 => HostValues::F32(t.flatten_all()?.to_vec1()?),
        DType::F64 => HostValues::F64(t.flatten_all()?.to_vec1()?),
        other => return Err(RingError::DType(other).into()),
    };
    op(&mut values)?;
    match values {
        HostValues::F32(v) => Tensor::from_vec(v, t.shape(), t.device()),
        HostValues::F64(v) => Tensor::from_vec(v, t.shape(), t.device()),
    }
}

enum HostValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &Tensor) -> candle_core::Result<Tensor> {
        on_host(t, |values| match values {
            HostValues::F32(v) => self.all_reduce(v),
            HostValues::F64(v) => self.all_reduce(v),
        })
    }

    fn broadcast(&mut self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        on_host(t, |values| match values {
            HostValues::F32(v) => Ring::broadcast(self, v, root),
            HostValues::F64(v) => Ring::broadcast(self, v, root),
        })
    }
}
