//! Ring all-reduce bandwidth on loopback next to what one plain TCP stream moves between two threads (issue #6
//! "Must show"). Bandwidths as nccl-tests defines them: algbw = bytes / time, busbw = algbw · 2(n−1)/n, the
//! per-link traffic of a ring, comparable across world sizes and with the plain copy.
//!
//! `cargo bench -p acrf-worker --bench ring`; `RING_BENCH_FLOATS` (default 40 M, a large LoRA's gradient) and
//! `RING_BENCH_ITERS` (default 5, after one warm-up) shrink it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use acrf_worker::collective::ring::{Ring, RingConfig, tune_socket};

fn main() {
    let floats = env("RING_BENCH_FLOATS", 40_000_000);
    let iters = env("RING_BENCH_ITERS", 5);
    let bytes = 4 * floats;
    println!("buffer: {floats} f32 = {:.1} MB, median of {iters} runs after a warm-up", bytes as f64 / 1e6);

    let tcp = gbps(bytes, plain_copy(bytes, iters));
    println!("plain TCP copy, one stream between two threads: {tcp:.2} GB/s");
    for world in [2, 4] {
        let time = all_reduce(world, floats, iters);
        let algbw = gbps(bytes, time);
        let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
        println!(
            "ring all-reduce, {world} ranks: {:.1} ms, algbw {algbw:.2} GB/s, busbw {busbw:.2} GB/s, busbw / TCP copy \
             {:.2}",
            time.as_secs_f64() * 1e3,
            busbw / tcp
        );
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a count")))
}

fn gbps(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Per run: rank 0 times from a barrier all ranks pass to a barrier after every rank has its result; the
/// warm-up run also fills the ring's buffer pool, as the trainer's first step does.
fn all_reduce(world: usize, floats: usize, iters: usize) -> Duration {
    let listeners: Vec<_> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let (start, end) = (Barrier::new(world), Barrier::new(world));
    thread::scope(|s| {
        let ranks: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (peers, start, end) = (peers.clone(), &start, &end);
                s.spawn(move || {
                    let cfg = RingConfig {
                        rank,
                        world,
                        listener,
                        peers,
                        secret: [0; 32],
                        timeout: Duration::from_secs(60),
                        cancel: Default::default(),
                    };
                    let mut ring = Ring::connect(cfg).unwrap();
                    let input: Vec<f32> = (0..floats).map(|i| (i % 1000) as f32).collect();
                    let mut data = input.clone();
                    (0..=iters)
                        .map(|_| {
                            data.copy_from_slice(&input);
                            start.wait();
                            let started = Instant::now();
                            ring.all_reduce(&mut data).unwrap();
                            end.wait();
                            started.elapsed()
                        })
                        .skip(1)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut times: Vec<_> = ranks.into_iter().map(|r| r.join().unwrap()).collect();
        median(times.swap_remove(0))
    })
}

/// One direction over one connection with the ring's socket settings; the receiver's one-byte ack ends a run.
fn plain_copy(bytes: usize, iters: usize) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::scope(|s| {
        s.spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            tune_socket(&stream).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for _ in 0..=iters {
                let mut left = bytes;
                while left > 0 {
                    let n = buf.len().min(left);
                    stream.read_exact(&mut buf[..n]).unwrap();
                    left -= n;
                }
                stream.write_all(&[1]).unwrap();
            }
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        tune_socket(&stream).unwrap();
        let data = vec![7u8; bytes];
        let times = (0..=iters)
            .map(|_| {
                let started = Instant::now();
                stream.write_all(&data).unwrap();
                stream.read_exact(&mut [0]).unwrap();
                started.elapsed()
            })
            .skip(1)
            .collect();
        median(times)
    })
}
