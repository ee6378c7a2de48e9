//! The checkpoint commit protocol and the store operations under it, over HTTP against an S3-compatible
//! server (`acrf_tests::s3`) and on `memory://`: a checkpoint is whole or absent, `LATEST` moves by
//! compare-and-swap, and a step has one writer.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Barrier, Mutex};

use acrf_common::checkpoint::{CheckpointError, Checkpoints, LATEST, MANIFEST};
use acrf_common::store::{BlockingStore, Location, Store, StoreError};
use acrf_tests::s3::{ACCESS_KEY, REGION, S3Server};
use anyhow::{Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

fn blobs(step: u64) -> Vec<(&'static str, Bytes)> {
    vec![
        ("lora.safetensors", Bytes::from(vec![step as u8; 1000])),
        ("state.json", Bytes::from(format!("{{\"step\":{step}}}"))),
    ]
}

fn commit(c: &Checkpoints, step: u64) -> Result<(), CheckpointError> {
    c.commit(step, "h", serde_json::json!({}), &blobs(step)).map(drop)
}

fn manifest_of(step: u64) -> String {
    format!("runs/r/ckpt/{step:010}/{MANIFEST}")
}

/// A scenario on an empty output root.
type Scenario = fn(&BlockingStore) -> Result<()>;

/// Names double as bucket names on the S3 server and as memory store names.
const SCENARIOS: [(&str, Scenario); 5] = [
    ("commit-load-cas", commit_load_and_cas),
    ("broken-checkpoints", broken_checkpoints_are_never_loaded),
    ("retention", retention),
    ("one-writer", one_writer_per_step),
    ("conditional-writes", writes_are_conditional),
];

#[test]
fn protocol_on_memory() -> Result<()> {
    for (name, scenario) in SCENARIOS {
        scenario(&BlockingStore::from_url(&format!("memory://s3-store-{name}"))?).context(name)?;
    }
    Ok(())
}

#[test]
fn protocol_on_s3() -> Result<()> {
    let server = S3Server::start();
    for (name, scenario) in SCENARIOS {
        server.create_bucket(name);
        scenario(&server.store(&format!("s3://{name}"))?).context(name)?;
    }
    Ok(())
}

/// An S3-compatible server without conditional writes (object_store told `aws_conditional_put = "disabled"`):
/// the store says so rather than writing blindly, and the protocol falls back to check, write and read
/// back, so checkpoints still commit, verify and refuse a second writer of a step.
#[test]
fn protocol_on_s3_without_conditional_writes() -> Result<()> {
    let server = S3Server::start();
    server.create_bucket("plain");
    let root = server.store_with("s3://plain", &[("aws_conditional_put", "disabled")])?;
    let err = root.put_create("x", b"1".to_vec()).unwrap_err();
    assert!(matches!(err, StoreError::Unsupported { .. }), "{err}");
    assert!(!root.exists("x")?);
    broken_checkpoints_are_never_loaded(&root.child("broken")?)?;
    one_writer_per_step(&root.child("one-writer")?)?;
    retention(&root.child("retention")?)?;
    let c = Checkpoints::new(&root, "r", "w1")?;
    commit(&c, 4)?;
    commit(&c, 8)?;
    assert_eq!(c.latest_pointer()?, Some(8));
    assert_eq!(c.latest_valid()?.map(|(m, _)| m.step), Some(8));
    Ok(())
}

/// Commits load back blob for blob, and `LATEST` moved by compare-and-swap: a version of it read before
/// the last commit no longer updates it.
fn commit_load_and_cas(root: &BlockingStore) -> Result<()> {
    let c = Checkpoints::new(root, "r", "w1")?;
    commit(&c, 4)?;
    let latest = format!("runs/r/{LATEST}");
    let (_, at_4) = root.get_versioned(&latest)?;
    commit(&c, 8)?;
    assert_eq!(c.committed_steps()?, [4, 8]);
    assert_eq!(c.latest_pointer()?, Some(8));
    for step in [4, 8] {
        let (manifest, loaded) = c.load(step)?;
        assert_eq!((manifest.step, manifest.writer.as_str()), (step, "w1"));
        let want: BTreeMap<String, Bytes> = blobs(step).into_iter().map(|(n, b)| (n.to_string(), b)).collect();
        assert_eq!(loaded, want);
    }
    let err = root.put_update(&latest, r#"{"step":2}"#, &at_4).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(c.latest_pointer()?, Some(8));
    Ok(())
}

/// A truncated or altered blob, and blobs without a manifest, are never loaded: the newest checkpoint that
/// verifies wins, whatever `LATEST` says.
fn broken_checkpoints_are_never_loaded(root: &BlockingStore) -> Result<()> {
    let c = Checkpoints::new(root, "r", "w1")?;
    for step in [4, 8, 12] {
        commit(&c, step)?;
    }
    let lora = |step: u64| format!("runs/r/ckpt/{step:010}/w1/lora.safetensors");
    root.put(&lora(12), vec![12u8; 999])?;
    root.put(&lora(8), vec![7u8; 1000])?;
    let err = c.load(12).unwrap_err();
    assert!(matches!(&err, CheckpointError::Invalid { .. }) && err.to_string().contains("999 bytes"), "{err}");
    let err = c.load(8).unwrap_err();
    assert!(matches!(&err, CheckpointError::Invalid { .. }) && err.to_string().contains("SHA-256"), "{err}");
    assert_eq!(c.latest_valid()?.map(|(m, _)| m.step), Some(4));
    // The broken ones are set aside, so that a resumed run can commit their steps again.
    assert_eq!(c.committed_steps()?, [4]);
    assert!(root.exists(&format!("{}.invalid", manifest_of(12)))?);

    // The blobs of step 16 went up, its manifest never did.
    root.put(&lora(16), vec![16u8; 1000])?;
    assert_eq!(c.committed_steps()?, [4]);
    assert!(matches!(c.load(16), Err(CheckpointError::Missing { step: 16, .. })));
    assert_eq!(c.latest_pointer()?, Some(12));
    assert_eq!(c.latest_valid()?.map(|(m, _)| m.step), Some(4));
    commit(&c, 8)?;
    assert_eq!(c.latest_valid()?.map(|(m, _)| m.step), Some(8));
    Ok(())
}

/// Retention keeps the newest `keep_last` and every multiple of `keep_every`, and clears the blobs of an
/// attempt that never committed; the manifests of what is kept still verify.
fn retention(root: &BlockingStore) -> Result<()> {
    let c = Checkpoints::new(root, "r", "w1")?;
    for step in [4, 8, 12, 16, 20] {
        commit(&c, step)?;
    }
    root.put("runs/r/ckpt/0000000006/w2/lora.safetensors", vec![6u8; 10])?;
    assert_eq!(c.prune(2, 8)?, [4, 12]);
    assert_eq!(c.committed_steps()?, [8, 16, 20]);
    for step in [8, 16, 20] {
        c.load(step)?;
    }
    let left: Vec<String> = root.list("runs/r/ckpt")?.into_iter().map(|(name, _)| name).collect();
    for gone in ["0000000004", "0000000006", "0000000012"] {
        assert!(!left.iter().any(|name| name.contains(gone)), "{gone} is left: {left:?}");
    }
    Ok(())
}

/// A second writer of a committed step is refused with a message that names the first, and leaves the
/// checkpoint as the first wrote it.
fn one_writer_per_step(root: &BlockingStore) -> Result<()> {
    let a = Checkpoints::new(root, "r", "coordinator-a")?;
    let b = Checkpoints::new(root, "r", "coordinator-b")?;
    commit(&a, 4)?;
    let err = b.commit(4, "h", serde_json::json!({}), &blobs(5)).unwrap_err();
    assert!(matches!(&err, CheckpointError::AlreadyCommitted { step: 4, by, .. } if by == "coordinator-a"), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "step 4 is already committed at {} (by writer `coordinator-a`): is another coordinator running this job?",
            root.url_of(&manifest_of(4))
        )
    );
    assert_eq!(a.load(4)?.1, b.load(4)?.1);
    assert_eq!(b.load(4)?.1["lora.safetensors"], blobs(4)[0].1);
    assert!(root.list("runs/r/ckpt/0000000004/coordinator-b")?.is_empty(), "the refused writer left no blobs");
    Ok(())
}

/// The puts that reach the store, in order: blobs as plain puts, then the manifest create-only, then
/// `LATEST` created once and after that replaced only at the version that was read, never blindly.
fn writes_are_conditional(root: &BlockingStore) -> Result<()> {
    let recorder = Arc::new(Recorder { inner: root.store().backend().clone(), puts: Mutex::default() });
    let out = BlockingStore::new(Store::new(recorder.clone(), "recorded", root.url_of("recorded"))?)?;
    let c = Checkpoints::new(&out, "r", "w")?;
    commit(&c, 4)?;
    commit(&c, 8)?;
    let puts: Vec<(String, &str)> = recorder
        .puts
        .lock()
        .unwrap()
        .iter()
        .map(|(path, mode)| {
            let mode = match mode {
                PutMode::Overwrite => "put",
                PutMode::Create => "create",
                PutMode::Update(version) if version.e_tag.is_some() || version.version.is_some() => "update",
                PutMode::Update(_) => "update without a version",
            };
            (path.strip_prefix("recorded/runs/r/").unwrap_or(path).to_string(), mode)
        })
        .collect();
    let want = [
        ("ckpt/0000000004/w/lora.safetensors", "put"),
        ("ckpt/0000000004/w/state.json", "put"),
        ("ckpt/0000000004/MANIFEST.json", "create"),
        ("LATEST", "create"),
        ("ckpt/0000000008/w/lora.safetensors", "put"),
        ("ckpt/0000000008/w/state.json", "put"),
        ("ckpt/0000000008/MANIFEST.json", "create"),
        ("LATEST", "update"),
    ];
    assert_eq!(puts, want.map(|(p, m)| (p.to_string(), m)));
    Ok(())
}

/// Passes every call on to `inner`, recording the path and mode of each put.
#[derive(Debug)]
struct Recorder {
    inner: Arc<dyn ObjectStore>,
    puts: Mutex<Vec<(String, PutMode)>>,
}

impl fmt::Display for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Recorder({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for Recorder {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.puts.lock().unwrap().push((location.to_string(), opts.mode.clone()));
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Writers racing for one step: exactly one commits, every other is told who did, and the checkpoint is
/// the winner's alone. Only on `memory://`, whose create-only put is atomic; the test server checks the
/// condition and then writes, so it could let two racers through where S3 would not.
#[test]
fn racing_writers_on_memory() -> Result<()> {
    let root = BlockingStore::from_url("memory://s3-store-race")?;
    let writers = 4;
    let barrier = Arc::new(Barrier::new(writers));
    let threads: Vec<_> = (0..writers)
        .map(|i| {
            let (root, barrier) = (root.clone(), barrier.clone());
            std::thread::spawn(move || {
                let c = Checkpoints::new(&root, "r", &format!("w{i}"))?;
                barrier.wait();
                c.commit(4, "h", serde_json::json!({}), &blobs(i as u64))
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().expect("a writer thread")).collect();
    let winners: Vec<&str> = results.iter().filter_map(|r| r.as_ref().ok()).map(|m| m.writer.as_str()).collect();
    let [winner] = winners[..] else { panic!("{} writers committed step 4", winners.len()) };
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(err, CheckpointError::AlreadyCommitted { by, .. } if by == winner), "{err}");
    }
    let (manifest, loaded) = Checkpoints::new(&root, "r", "reader")?.load(4)?;
    assert_eq!(manifest.writer, winner);
    let i: u64 = winner[1..].parse()?;
    assert_eq!(loaded["lora.safetensors"], blobs(i)[0].1);
    for (rel, _) in root.list("runs/r/ckpt/0000000004")? {
        assert!(rel.ends_with(MANIFEST) || rel.contains(&format!("/{winner}/")), "a loser's blob is left: {rel}");
    }
    Ok(())
}

#[test]
fn store_basics_on_s3() -> Result<()> {
    let server = S3Server::start();
    server.create_bucket("basics");
    let store = server.store("s3://basics/run")?;
    store.put("a/x.bin", vec![1u8, 2, 3])?;
    store.put("a/y.bin", b"yy".to_vec())?;
    store.put("ab.bin", b"z".to_vec())?;
    assert_eq!(store.get("a/x.bin")?, Bytes::from_static(&[1, 2, 3]));
    store.put("a/x.bin", b"new".to_vec())?;
    assert_eq!(store.get("a/x.bin")?, Bytes::from_static(b"new"));
    assert!(store.exists("a/y.bin")? && !store.exists("a/nope")?);
    assert_eq!(store.list("a")?, [("a/x.bin".to_string(), 3), ("a/y.bin".to_string(), 2)]);
    assert_eq!(store.list("")?.len(), 3);
    store.delete("a/x.bin")?;
    store.delete("a/x.bin")?;
    assert_eq!(store.list("a")?, [("a/y.bin".to_string(), 2)]);
    let err = store.get("a/x.bin").unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert_eq!(err.to_string(), "s3://basics/run/a/x.bin not found");
    assert_eq!(server.store("s3://basics")?.get("run/a/y.bin")?, Bytes::from_static(b"yy"));

    store.put_create("once", b"one".to_vec())?;
    let err = store.put_create("once", b"two".to_vec()).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(err.to_string(), "s3://basics/run/once already exists");
    assert_eq!(store.get("once")?, Bytes::from_static(b"one"));

    let (bytes, version) = store.get_versioned("once")?;
    assert_eq!(bytes, Bytes::from_static(b"one"));
    store.put_update("once", b"two".to_vec(), &version)?;
    let err = store.put_update("once", b"three".to_vec(), &version).unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(store.get("once")?, Bytes::from_static(b"two"));

    // Requests are really signed and checked: a wrong secret is refused.
    let endpoint = server.endpoint().to_string();
    let wrong = [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret"),
        ("AWS_REGION", REGION),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let intruder = BlockingStore::new(Store::open_with(&Location::parse("s3://basics/run")?, &wrong)?)?;
    let err = intruder.get("once").unwrap_err();
    assert!(matches!(err, StoreError::Failed { .. }) && err.to_string().contains("403"), "{err}");
    Ok(())
}
