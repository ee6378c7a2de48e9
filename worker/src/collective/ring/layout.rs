//! How a flat buffer is cut for the ring: one chunk per rank (the unit each rank finishes reducing) and each
//! chunk into segments (the unit of pipelining). Every rank derives the same cuts from the element count
//! alone, so segment boundaries never travel on the wire.

use std::ops::Range;

/// 256 KiB: a received segment is still in L2 when it is reduced and forwarded, and per-segment syscalls and
/// queue hops stay noise (the loopback benchmark found no gain from 1 MiB and 4 MiB segments).
const SEGMENT: usize = 1 << 16;

/// Chunk `c` of `n` over `len` elements; chunk sizes differ by at most one element.
pub(super) fn chunk(len: usize, n: usize, c: usize) -> Range<usize> {
    c * len / n..(c + 1) * len / n
}

pub(super) fn segments(range: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = range.end;
    range.step_by(SEGMENT).map(move |start| start..(start + SEGMENT).min(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_tile_the_buffer_and_segments_tile_each_chunk() {
        for (len, n) in [(0, 3), (2, 3), (10, 4), (3 * SEGMENT + 7, 2)] {
            let mut next = 0;
            for c in 0..n {
                let chunk = chunk(len, n, c);
                assert_eq!(chunk.start, next);
                assert!(chunk.len() == len / n || chunk.len() == len / n + 1);
                let mut at = chunk.start;
                for seg in segments(chunk.clone()) {
                    assert_eq!(seg.start, at);
                    assert!(!seg.is_empty() && seg.len() <= SEGMENT);
                    at = seg.end;
                }
                assert_eq!(at, chunk.end);
                next = chunk.end;
            }
            assert_eq!(next, len);
        }
    }
}
