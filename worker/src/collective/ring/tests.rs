use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use sha2::{Digest, Sha256};

use super::*;

const SECRET: [u8; 32] = [7; 32];
const SLOW: Duration = Duration::from_secs(20);

fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

fn config(rank: usize, listener: TcpListener, peers: &[SocketAddr], secret: [u8; 32], timeout: Duration) -> RingConfig {
    RingConfig {
        rank,
        world: peers.len(),
        listener,
        peers: peers.to_vec(),
        secret,
        timeout,
        cancel: Default::default(),
    }
}

/// Forms a ring of `n` threads and runs `f` on each rank; results indexed by rank.
fn on_ring<T: Send>(n: usize, timeout: Duration, f: impl Fn(&mut Ring) -> T + Sync) -> Vec<T> {
    let listeners: Vec<_> = (0..n).map(|_| bind()).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    thread::scope(|s| {
        let ranks: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (f, peers) = (&f, &peers);
                s.spawn(move || f(&mut Ring::connect(config(rank, listener, peers, SECRET, timeout)).unwrap()))
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Small integers, so every summation order gives the exact sum.
fn integers(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| integer(rank, i)).collect()
}

fn integer(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13) % 17) as f32 - 8.0
}

fn exact_sum(world: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (0..world).map(|r| integer(r, i)).sum()).collect()
}

fn reduced(ring: &mut Ring, mut data: Vec<f32>) -> Vec<f32> {
    ring.all_reduce(&mut data).unwrap();
    data
}

#[test]
fn all_reduce_is_the_exact_sum() {
    for n in 2..=4 {
        let sizes = [0, 1, n - 1, 1001, (1 << 20) + 3];
        let sums = on_ring(n, SLOW, |ring| sizes.map(|len| reduced(ring, integers(ring.rank, len))));
        for (i, &len) in sizes.iter().enumerate() {
            let expected = exact_sum(n, len);
            for (rank, sum) in sums.iter().enumerate() {
                assert!(sum[i] == expected, "{n} ranks, {len} floats: rank {rank} differs");
            }
        }
    }
}

#[test]
fn all_reduce_is_bitwise_identical_and_sums_in_the_documented_order() {
    let len = 600_001;
    let values = |rank: usize| -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(rank as u64);
        (0..len).map(|_| (rng.random::<f32>() - 0.5) * 2f32.powi(rng.random_range(-20..20))).collect()
    };
    for n in 2..=4 {
        let x: Vec<_> = (0..n).map(values).collect();
        let mut documented = vec![0.0f32; len];
        for c in 0..n {
            for i in chunk(len, n, c) {
                documented[i] = (1..n).fold(x[c][i], |acc, k| acc + x[(c + k) % n][i]);
            }
        }
        let in_rank_order: Vec<f32> = (0..len).map(|i| (1..n).fold(x[0][i], |acc, k| acc + x[k][i])).collect();
        if n > 2 {
            assert!(documented.iter().zip(&in_rank_order).any(|(a, b)| a.to_bits() != b.to_bits()));
        }
        let sums = on_ring(n, SLOW, |ring| reduced(ring, x[ring.rank].clone()));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (rank, sum) in sums.iter().enumerate() {
            assert!(bits(sum) == bits(&documented), "{n} ranks: rank {rank} differs from the documented order");
        }
    }
}

#[test]
fn broadcast_delivers_the_roots_buffer_from_every_root() {
    for n in 2..=4 {
        let sizes = [0, 5, 2 * (1 << 18) + 3];
        let data = |rank: usize, len: usize| (0..len).map(|i| (i + 1000 * rank) as f32).collect::<Vec<_>>();
        let got = on_ring(n, SLOW, |ring| {
            let mut got = Vec::new();
            for root in 0..n {
                for len in sizes {
                    let mut buf = data(ring.rank, len);
                    ring.broadcast(&mut buf, root).unwrap();
                    got.push(buf);
                }
            }
            got
        });
        for got in got {
            let expected = (0..n).flat_map(|root| sizes.map(|len| data(root, len)));
            assert!(got.into_iter().eq(expected), "{n} ranks");
        }
    }
}

#[test]
fn the_collective_trait_keeps_shapes_and_refuses_other_dtypes() {
    let out = on_ring(2, SLOW, |ring| {
        let ring: &mut dyn Collective = ring;
        let t = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu).unwrap();
        let t = (t * (ring.rank() as f64 + 1.0)).unwrap();
        let sum = ring.all_reduce_sum(&t).unwrap();
        let root = ring.broadcast(&t, 1).unwrap();
        let sum64 = ring.all_reduce_sum(&t.to_dtype(DType::F64).unwrap()).unwrap();
        let bf16_error = ring.all_reduce_sum(&t.to_dtype(DType::BF16).unwrap()).unwrap_err().to_string();
        (sum.dims().to_vec(), sum.to_vec2::<f32>().unwrap(), root.to_vec2::<f32>().unwrap(), sum64, bf16_error)
    });
    for (dims, sum, root, sum64, bf16_error) in out {
        assert_eq!(dims, [2, 3]);
        assert_eq!(sum, [[3., 6., 9.], [12., 15., 18.]]);
        assert_eq!(root, [[2., 4., 6.], [8., 10., 12.]]);
        assert_eq!(
            (sum64.dtype(), sum64.to_vec2::<f64>().unwrap()),
            (DType::F64, vec![vec![3., 6., 9.], vec![12., 15., 18.]])
        );
        assert!(bf16_error.contains("f32 and f64"), "{bf16_error}");
    }
}

/// What the trainer relies on for the same weights at any world size: f32 values (gradients) summed in f64
/// come out the same whatever the order, so the ring's sum is the sum of one process adding in rank order.
#[test]
fn f64_sums_of_f32_values_do_not_depend_on_the_order() {
    let len = 200_003;
    let values = |rank: usize| -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(rank as u64 + 100);
        (0..len).map(|_| ((rng.random::<f32>() - 0.5) * 2f32.powi(rng.random_range(-12..12))) as f64).collect()
    };
    for n in 2..=4 {
        let x: Vec<_> = (0..n).map(values).collect();
        let in_rank_order: Vec<f64> = (0..len).map(|i| (1..n).fold(x[0][i], |acc, k| acc + x[k][i])).collect();
        let sums = on_ring(n, SLOW, |ring| {
            let mut data = x[ring.rank].clone();
            ring.all_reduce(&mut data).unwrap();
            data
        });
        let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (rank, sum) in sums.iter().enumerate() {
            assert!(bits(sum) == bits(&in_rank_order), "{n} ranks: rank {rank}'s f64 sum depends on the order");
        }
    }
}

#[test]
fn refuses_strangers_and_keeps_waiting_for_its_neighbour() {
    let (l0, l1) = (bind(), bind());
    let peers = [l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    thread::scope(|s| {
        let rank0 = s.spawn(|| Ring::connect(config(0, l0, &peers, SECRET, SLOW)));

        let mut garbage = TcpStream::connect(peers[0]).unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        garbage.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let closed = garbage.read_to_end(&mut Vec::new());
        assert!(
            closed.as_ref().map_or_else(|e| e.kind() == std::io::ErrorKind::ConnectionReset, |_| true),
            "{closed:?}"
        );

        let wrong_secret = Ring::connect(config(1, bind(), &peers, [8; 32], SLOW)).err().unwrap().to_string();
        assert!(wrong_secret.contains(&peers[0].to_string()) && wrong_secret.contains("secret"), "{wrong_secret}");

        let imp = bind();
        let imp_peers = [imp.local_addr().unwrap(), peers[0]];
        let wrong_rank = Ring::connect(config(0, imp, &imp_peers, SECRET, SLOW)).err().unwrap().to_string();
        assert!(wrong_rank.contains("it says it is rank 0, expected rank 1"), "{wrong_rank}");

        let rank1 = s.spawn(|| Ring::connect(config(1, l1, &peers, SECRET, SLOW)));
        let mut rings = [rank0.join().unwrap().unwrap(), rank1.join().unwrap().unwrap()];
        thread::scope(|s| {
            for ring in &mut rings {
                s.spawn(move || assert_eq!(reduced(ring, vec![1.0, 2.0]), [2.0, 4.0]));
            }
        });
    });
}

#[test]
fn a_neighbour_that_never_comes_times_out_naming_what_was_refused() {
    let (l0, l1) = (bind(), bind());
    let peers = [l0.local_addr().unwrap(), l1.local_addr().unwrap()];
    let started = Instant::now();
    let (error, stranger) = thread::scope(|s| {
        let rank0 = s.spawn(|| Ring::connect(config(0, l0, &peers, SECRET, Duration::from_millis(1500))));
        let mut stranger = TcpStream::connect(peers[0]).unwrap();
        stranger.write_all(b"hello? is this the database?").unwrap();
        (rank0.join().unwrap().err().unwrap().to_string(), stranger.local_addr().unwrap())
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(error.contains(&format!("refused {stranger}: not an acrf ring peer")), "{error}");
    assert!(error.contains(&format!("rank 1 at {}", peers[1])), "{error}");
    drop(l1);
}

#[test]
fn a_dropped_rank_fails_the_others_long_before_the_timeout() {
    let started = Instant::now();
    let out = on_ring(3, SLOW, |ring| {
        if ring.rank == 2 {
            thread::sleep(Duration::from_millis(200));
            return None;
        }
        let error = ring.all_reduce(&mut integers(ring.rank, 1 << 20)).unwrap_err();
        let again = ring.all_reduce(&mut [1.0]).unwrap_err();
        Some((error.to_string(), again))
    });
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    for (error, again) in out.into_iter().flatten() {
        assert!(error.contains("rank "), "{error}");
        assert!(matches!(again, RingError::Broken(_)), "{again}");
    }
}

#[test]
fn a_stalled_rank_times_out() {
    let timeout = Duration::from_millis(800);
    let done = Barrier::new(2);
    let out = on_ring(2, timeout, |ring| {
        let outcome = (ring.rank == 0).then(|| {
            let started = Instant::now();
            (ring.all_reduce(&mut [1.0; 1000]).unwrap_err(), started.elapsed())
        });
        done.wait();
        outcome
    });
    let (error, took) = out[0].as_ref().unwrap();
    assert!(matches!(error, RingError::Stalled { .. }), "{error}");
    assert!(error.to_string().contains("made no progress"), "{error}");
    assert!(*took >= timeout && *took < timeout * 4, "took {took:?}");
}

#[test]
fn abort_unblocks_a_pending_collective_here_and_at_the_neighbour() {
    let handle = Mutex::new(None);
    let (ready, done) = (Barrier::new(2), Barrier::new(2));
    let out = on_ring(2, SLOW, |ring| {
        let started = Instant::now();
        let error = if ring.rank == 0 {
            *handle.lock().unwrap() = Some(ring.abort_handle());
            ready.wait();
            ring.all_reduce(&mut [1.0; 1000]).unwrap_err()
        } else {
            ready.wait();
            let watchdog = handle.lock().unwrap().take().unwrap();
            thread::sleep(Duration::from_millis(200));
            watchdog.abort();
            ring.all_reduce(&mut [1.0; 1000]).unwrap_err()
        };
        done.wait();
        (error.to_string(), started.elapsed())
    });
    assert!(out[0].0.contains("aborted by this rank"), "{}", out[0].0);
    for (error, took) in out {
        assert!(took < Duration::from_secs(5), "{error} after {took:?}");
    }
}

#[test]
fn ranks_that_disagree_on_the_collective_both_fail() {
    let out = on_ring(2, SLOW, |ring| {
        let len = 10 + ring.rank;
        ring.all_reduce(&mut vec![1.0f32; len]).unwrap_err().to_string()
    });
    let mismatch = out.iter().find(|e| e.contains("different collective")).expect("one rank sees the other's call");
    assert!(mismatch.contains("all-reduce #1 of 10 f32") && mismatch.contains("all-reduce #1 of 11 f32"));
    // The same length in another element type is another collective too.
    let out = on_ring(2, SLOW, |ring| match ring.rank {
        0 => ring.all_reduce(&mut [1.0f32; 10]).unwrap_err().to_string(),
        _ => ring.all_reduce(&mut [1.0f64; 10]).unwrap_err().to_string(),
    });
    let mismatch = out.iter().find(|e| e.contains("different collective")).expect("one rank sees the other's call");
    assert!(mismatch.contains("all-reduce #1 of 10 f32") && mismatch.contains("all-reduce #1 of 10 f64"));
}

#[test]
fn a_ring_needs_two_ranks() {
    let listener = bind();
    let peers = [listener.local_addr().unwrap()];
    let error = Ring::connect(config(0, listener, &peers, SECRET, SLOW)).err().unwrap();
    assert!(matches!(error, RingError::Config(_)), "{error}");
}

const CHILD: &str = "ACRF_RING_TEST_CHILD";
const PROCESSES: usize = 3;

/// Three processes of this test binary, run as coordinator would: each binds a port and reports it, learns
/// everyone's address, forms the ring and all-reduces; they must agree on the exact sum.
#[test]
fn three_processes_all_reduce_over_loopback() {
    if let Ok(rank) = std::env::var(CHILD) {
        return child(rank.parse().unwrap());
    }
    let test = format!("{}::three_processes_all_reduce_over_loopback", module_path!().split_once("::").unwrap().1);
    struct Children(Vec<Child>);
    impl Drop for Children {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut children = Children(
        (0..PROCESSES)
            .map(|rank| {
                Command::new(std::env::current_exe().unwrap())
                    .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
                    .env(CHILD, rank.to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let mut outputs: Vec<_> = children.0.iter_mut().map(|c| BufReader::new(c.stdout.take().unwrap())).collect();
    let peers: Vec<String> = outputs.iter_mut().map(|out| said(out, "listening")).collect();
    for child in &mut children.0 {
        writeln!(child.stdin.as_mut().unwrap(), "{}", peers.join(" ")).unwrap();
    }
    let digests: Vec<String> = outputs.iter_mut().map(|out| said(out, "sum")).collect();
    for child in &mut children.0 {
        assert!(child.wait().unwrap().success());
    }
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
}

/// The value the child printed next after `ring-child <what> `, past the test harness's own output (which
/// shares the line: the harness prints the test's name before running it).
fn said(out: &mut BufReader<ChildStdout>, what: &str) -> String {
    let marker = format!("ring-child {what} ");
    for line in out.lines() {
        if let Some((_, value)) = line.unwrap().split_once(&marker) {
            return value.to_string();
        }
    }
    panic!("a child exited without saying `{what}`")
}

fn child(rank: usize) {
    let listener = bind();
    println!("ring-child listening {}", listener.local_addr().unwrap());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let peers: Vec<SocketAddr> = line.split_whitespace().map(|a| a.parse().unwrap()).collect();
    let mut ring = Ring::connect(config(rank, listener, &peers, SECRET, SLOW)).unwrap();
    let len = 300_001;
    let sum = reduced(&mut ring, integers(rank, len));
    assert!(sum == exact_sum(PROCESSES, len));
    let bytes: Vec<u8> = sum.iter().flat_map(|f| f.to_le_bytes()).collect();
    println!("ring-child sum {}", hex::encode(Sha256::digest(&bytes)));
}
