//! An S3-compatible server inside the test process, so that the S3 path (SigV4 signing, path-style
//! requests, conditional puts, listing) is tested over real HTTP without docker, Python or the network.
//!
//! The server is s3s-fs: every object is a file under a temporary folder. Like S3 it answers a create-only
//! put (`If-None-Match: *`) on an existing key and an `If-Match` put with a stale ETag with 412, which is
//! what [`acrf_common::store::Store::put_create`] and `put_update` build on. Unlike S3 it checks the
//! condition and then writes, without a lock, so two writers racing for one key may both win: it tests the
//! protocol on the wire, not races (those are tested on `memory://`).

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use acrf_common::store::{BlockingStore, Location, Store, StoreError};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tempfile::TempDir;
use tokio::sync::oneshot;

pub const ACCESS_KEY: &str = "acrf-test-access-key";
pub const SECRET_KEY: &str = "acrf-test-secret-key";
pub const REGION: &str = "us-east-1";

/// A failure the server answers in place of the real reply, as a real S3 service may: the next `times`
/// requests with `method` whose path contains `path_contains` get `status` and an S3 error body.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Method,
    pub path_contains: String,
    pub status: StatusCode,
    pub times: usize,
}

/// The faults still to serve, and how many were served.
#[derive(Debug, Default)]
struct Faults {
    pending: Vec<Fault>,
    served: usize,
}

impl Faults {
    /// The status to answer `req` with, if a pending fault matches it.
    fn take<B>(&mut self, req: &Request<B>) -> Option<StatusCode> {
        let fault = self
            .pending
            .iter_mut()
            .find(|f| f.times > 0 && f.method == req.method() && req.uri().path().contains(&f.path_contains))?;
        fault.times -= 1;
        self.served += 1;
        Some(fault.status)
    }
}

fn fault_response(status: StatusCode) -> Response<s3s::Body> {
    let code = match status {
        StatusCode::FORBIDDEN => "AccessDenied",
        StatusCode::SERVICE_UNAVAILABLE => "SlowDown",
        _ => "InternalError",
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test</Message></Error>"
    );
    let mut response = Response::new(s3s::Body::from(body));
    *response.status_mut() = status;
    response
}

/// A running server; dropping it stops the server and deletes its objects.
pub struct S3Server {
    endpoint: String,
    faults: Arc<Mutex<Faults>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    root: TempDir,
}

impl S3Server {
    /// Serves on a free loopback port from a thread of its own with its own runtime, so that plain
    /// `#[test]` functions and child processes can use it alike.
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("a folder for the S3 server");
        let mut service = S3ServiceBuilder::new(s3s_fs::FileSystem::new(root.path()).expect("s3s-fs opens its folder"));
        service.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = service.build();
        // Bound here rather than on the server thread, so the port is known before any request is sent.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let endpoint = format!("http://{}", listener.local_addr().expect("the listener's address"));
        let (stop, stopped) = oneshot::channel();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let served_faults = faults.clone();
        let thread = std::thread::Builder::new()
            .name("s3-server".into())
            .spawn(move || serve(listener, service, served_faults, stopped))
            .expect("the S3 server thread starts");
        S3Server { endpoint, faults, stop: Some(stop), thread: Some(thread), root }
    }

    /// Makes the server answer requests that match `fault` with its status from now on.
    pub fn inject(&self, fault: Fault) {
        self.faults.lock().expect("the fault list").pending.push(fault);
    }

    /// How many requests were answered with an injected fault.
    pub fn faults_served(&self) -> usize {
        self.faults.lock().expect("the fault list").served
    }

    /// Drops the faults not served yet.
    pub fn clear_faults(&self) {
        self.faults.lock().expect("the fault list").pending.clear();
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// s3s-fs keeps a bucket as a folder under its root; its CreateBucket does no more than make it.
    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir(self.root.path().join(name)).expect("the bucket folder is created");
    }

    /// The `AWS_*` variables with which an `acrf` process reaches this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", REGION.into()),
        ]
    }

    /// Points `command` at this server, and only at it: `AWS_*` variables it would inherit (a profile, a
    /// session token) are removed first.
    pub fn configure<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("AWS_")) {
                command.env_remove(key);
            }
        }
        command.envs(self.env())
    }

    /// The store at `url` (`s3://bucket/prefix`) on this server, configured with [`S3Server::env`] without
    /// touching this process's environment, which other test threads read.
    pub fn store(&self, url: &str) -> Result<BlockingStore, StoreError> {
        self.store_with(url, &[])
    }

    /// [`S3Server::store`] with more object_store settings (`aws_conditional_put`).
    pub fn store_with(&self, url: &str, extra: &[(&str, &str)]) -> Result<BlockingStore, StoreError> {
        let env = self.env().into_iter().map(|(k, v)| (k.to_string(), v));
        let options: Vec<(String, String)> =
            env.chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string()))).collect();
        BlockingStore::new(Store::open_with(&Location::parse(url)?, &options)?)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    listener: std::net::TcpListener,
    service: S3Service,
    faults: Arc<Mutex<Faults>>,
    mut stop: oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("s3-server")
        .enable_all()
        .build()
        .expect("the S3 server's runtime starts");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("the listener joins the runtime");
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((socket, _)) = accepted else { continue };
                    let (service, faults) = (service.clone(), faults.clone());
                    let answer = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let injected = faults.lock().expect("the fault list").take(&req);
                        let service = service.clone();
                        async move {
                            match injected {
                                Some(status) => Ok(fault_response(status)),
                                None => hyper::service::Service::call(&service, req).await,
                            }
                        }
                    });
                    tokio::spawn(async move {
                        // A client that hangs up mid-request fails only its own connection.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(socket), answer)
                            .await;
                    });
                }
                _ = &mut stop => break,
            }
        }
    });
}
