//! The status page under a flood of connections, in a test binary (a process) of its own: the test lowers its
//! open-file limit, which would starve any other test sharing the process.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use acrf_coordinator::status::{Board, Limits, StatusServer};
use acrf_tests::http_get;
use anyhow::{Context, Result};

const HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// Half-sent requests the server accepts before the process runs out of descriptors.
const ACCEPTED: usize = 20;
/// Half-sent requests that wait in the backlog while the server cannot accept them.
const PENDING: usize = 5;
/// A request that never ends its headers (no blank line).
const HALF_SENT: &[u8] = b"GET /status HTTP/1.1\r\nHost: flood\r\n";

fn open_descriptors() -> Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// Sets this process's soft limit of open files, returning the one before.
fn set_open_files(soft: u64) -> Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        anyhow::ensure!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0, "getrlimit");
        let before = limit.rlim_cur;
        limit.rlim_cur = soft.min(limit.rlim_max);
        anyhow::ensure!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0, "setrlimit");
        Ok(before)
    }
}

/// Reads until the server closes the connection, for at most `limit`; whatever it answered on the way.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Result<Vec<u8>> {
    stream.set_read_timeout(Some(limit))?;
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => Ok(answer),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(answer),
        Err(e) => Err(e).context("the server kept a half-sent request open"),
    }
}

/// Issue 20: with the descriptors of the process used up, accepting fails with EMFILE; the server used to
/// panic there ("timers are disabled") and the page was gone. Half-sent requests were never closed. Now the
/// server backs off and keeps serving, closes each half-sent request after its header timeout, and answers
/// the page once the flood has passed.
#[test]
fn the_status_page_outlives_a_flood_of_half_sent_requests() -> Result<()> {
    let limits = Limits { max_connections: 64, header_read_timeout: HEADER_TIMEOUT, ..Limits::default() };
    let server = StatusServer::with_limits("127.0.0.1:0".parse()?, Board::new("flood"), limits)?;
    let url = server.url();
    let host = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let before = set_open_files(open_descriptors()? + 2 * ACCEPTED as u64 + 32)?;

    let flood_started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..ACCEPTED {
        let mut client = TcpStream::connect(&host)?;
        client.write_all(HALF_SENT)?;
        clients.push(client);
    }
    // Use up every descriptor left, then free one at a time for a client whose connection the server then
    // cannot accept.
    let mut filler = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => return Err(e.into()),
        }
    }
    for _ in 0..PENDING {
        // The server's accept retries race for each freed descriptor: when it wins, free another.
        let mut client = loop {
            anyhow::ensure!(filler.pop().is_some(), "no descriptor left to free for a client");
            match TcpStream::connect(&host) {
                Ok(client) => break client,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        client.write_all(HALF_SENT)?;
        clients.push(client);
    }
    // Long enough for several failed accepts and their back-off.
    std::thread::sleep(Duration::from_millis(300));
    drop(filler);
    if flood_started.elapsed() < HEADER_TIMEOUT * 4 / 5 {
        clients[0].set_nonblocking(true)?;
        let early = clients[0].read(&mut [0; 1]).map_err(|e| e.kind());
        assert_eq!(early, Err(ErrorKind::WouldBlock), "a half-sent request closed before its header timeout");
        clients[0].set_nonblocking(false)?;
    }

    for (i, client) in clients.iter_mut().enumerate() {
        let answer = read_until_closed(client, Duration::from_secs(15)).with_context(|| format!("client {i}"))?;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "client {i} got {answer}");
    }
    drop(clients);
    set_open_files(before)?;

    let (status, body) = http_get(&url, "/status").context("the page after the flood")?;
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("\"run\":\"flood\""), "{body}");
    Ok(())
}
