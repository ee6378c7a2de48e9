//! Blobs by URL: the one way every part of acrf reads and writes datasets, checkpoints and run state.
//!
//! A run may keep its files in a local directory, an S3-compatible bucket, GCS or Azure, and tests keep them
//! in memory; callers name a place with a URL ([`Location`]) and see the same small set of operations
//! ([`Store`]) whatever is behind it. Object stores have no directories and no rename, so the operations are
//! the ones they all share: whole-object get and put, create-only put (the commit primitive for manifests
//! and checkpoints), prefix listing and delete.
//!
//! Transient failures (timeouts, dropped connections, 5xx and throttling) are retried here with exponential
//! backoff, on top of the HTTP client's own retries, because a training job that dies on a single flaky
//! request loses far more than a few seconds of waiting. Anything else is returned at once with the URL of
//! the object in the message.
//!
//! The training loop and the CLI are synchronous, so [`BlockingStore`] runs the same operations on a tokio
//! runtime from a plain thread.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, UpdateVersion};
use tokio::runtime::{Handle, Runtime};

use crate::config::{Addressing, StorageConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad store location `{location}`: {reason}")]
    BadLocation { location: String, reason: String },
    #[error("bad object name `{rel}` under {base}: {reason}")]
    BadName { base: String, rel: String, reason: String },
    #[error("cannot open store {url}: {source}")]
    Open { url: String, source: BoxError },
    #[error("{url} not found")]
    NotFound { url: String },
    #[error("{url} already exists")]
    AlreadyExists { url: String },
    #[error("{op} {url} failed after {attempts} attempt(s): {source}")]
    Failed { op: &'static str, url: String, attempts: u32, source: object_store::Error },
    #[error("{url} changed since it was read (compare-and-swap lost)")]
    Conflict { url: String },
    #[error("{url}: this store cannot {op}")]
    Unsupported { url: String, op: &'static str },
    #[error("{op} {url}: {source}")]
    Local { op: &'static str, url: String, source: std::io::Error },
    #[error("cannot start the runtime for blocking store access: {0}")]
    Runtime(String),
}

/// Where a store lives, parsed from a URL or a plain path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory, from a plain path or a `file://` URL.
    Local(PathBuf),
    /// `memory://name/prefix`: an in-process store, shared by every `Store` opened with the same name.
    Memory { name: String, prefix: String },
    /// `s3://bucket/prefix`, configured from the `AWS_*` environment and a job's `[storage]` section.
    S3 { bucket: String, prefix: String },
    /// `gs://bucket/prefix`, configured from the `GOOGLE_*` environment and a job's `[storage]` section.
    Gcs { bucket: String, prefix: String },
    /// `az://container/prefix`, configured from the `AZURE_*` environment and a job's `[storage]` section.
    Azure { container: String, prefix: String },
}

impl Location {
    pub fn parse(url_or_path: &str) -> Result<Location, StoreError> {
        let bad = |reason: &str| StoreError::BadLocation { location: url_or_path.to_string(), reason: reason.into() };
        if url_or_path.is_empty() {
            return Err(bad("empty"));
        }
        let Some((scheme, rest)) = url_or_path.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(url_or_path)));
        };
        if scheme == "file" {
            if !rest.starts_with('/') {
                return Err(bad("a file:// URL needs an absolute path (file:///dir)"));
            }
            return Ok(Location::Local(PathBuf::from(rest)));
        }
        let (root, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if root.is_empty() {
            return Err(bad("no bucket, container or store name after the scheme"));
        }
        let prefix = Path::parse(prefix).map_err(|e| bad(&e.to_string()))?.to_string();
        let root = root.to_string();
        match scheme {
            "memory" => Ok(Location::Memory { name: root, prefix }),
            "s3" => Ok(Location::S3 { bucket: root, prefix }),
            "gs" => Ok(Location::Gcs { bucket: root, prefix }),
            "az" => Ok(Location::Azure { container: root, prefix }),
            _ => Err(bad(&format!("unknown scheme `{scheme}`; use a path, file://, memory://, s3://, gs:// or az://"))),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, root, prefix) = match self {
            Location::Local(path) => return write!(f, "{}", path.display()),
            Location::Memory { name, prefix } => ("memory", name, prefix),
            Location::S3 { bucket, prefix } => ("s3", bucket, prefix),
            Location::Gcs { bucket, prefix } => ("gs", bucket, prefix),
            Location::Azure { container, prefix } => ("az", container, prefix),
        };
        write!(f, "{scheme}://{root}")?;
        if !prefix.is_empty() {
            write!(f, "/{prefix}")?;
        }
        Ok(())
    }
}

/// How often and how patiently a transient failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The wait before the second try; it doubles for every further one, up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 4, first_backoff: Duration::from_millis(250), max_backoff: Duration::from_secs(4) }
    }
}

impl RetryPolicy {
    fn backoff(&self, retry: u32) -> Duration {
        self.first_backoff.saturating_mul(1u32 << retry.min(20)).min(self.max_backoff)
    }
}

/// A failure that survived the retries.
struct Failure {
    error: object_store::Error,
    attempts: u32,
}

/// Whether `e` may go away if the same request is sent again.
///
/// object_store keeps the HTTP status of a failed request in a private type, so a status that reaches us
/// inside `Error::Generic` is recognised by the message that type prints ("… status code: 503 …").
fn is_transient(e: &object_store::Error) -> bool {
    let object_store::Error::Generic { source, .. } = e else {
        return false;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    while let Some(err) = cause {
        if let Some(http) = err.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind::*;
            return matches!(http.kind(), Connect | Request | Timeout | Interrupted);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                TimedOut
                    | Interrupted
                    | WouldBlock
                    | ConnectionReset
                    | ConnectionAborted
                    | ConnectionRefused
                    | BrokenPipe
            ) {
                return true;
            }
        }
        if retryable_status(&err.to_string()) {
            return true;
        }
        cause = err.source();
    }
    false
}

fn retryable_status(message: &str) -> bool {
    let Some((_, after)) = message.split_once("status code: ") else {
        return false;
    };
    match after.get(..3).and_then(|code| code.parse::<u16>().ok()) {
        Some(code) => code >= 500 || code == 429 || code == 408,
        None => false,
    }
}

fn memory_store(name: &str) -> Arc<InMemory> {
    static STORES: LazyLock<Mutex<HashMap<String, Arc<InMemory>>>> = LazyLock::new(Default::default);
    let mut stores = STORES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    stores.entry(name.to_string()).or_insert_with(|| Arc::new(InMemory::new())).clone()
}

/// Where a cloud store's configuration comes from: the backend's environment variables when `env` is set,
/// then `options`, which win.
#[derive(Clone, Copy)]
struct Settings<'a> {
    env: bool,
    options: &'a [(String, String)],
}

impl Settings<'_> {
    /// A builder configured from `self`; a key in `options` the backend does not know is an error, where
    /// `from_env` passes over unrelated variables.
    fn builder<B: Default, K: FromStr<Err = object_store::Error>>(
        self,
        from_env: fn() -> B,
        set: impl Fn(B, K, &str) -> B,
    ) -> object_store::Result<B> {
        let start = if self.env { from_env() } else { B::default() };
        self.options
            .iter()
            .try_fold(start, |builder, (key, value)| Ok(set(builder, key.to_ascii_lowercase().parse()?, value)))
    }
}

/// The `[storage]` section as object_store keys of the backend at `location`; keys that do not apply to it
/// (the S3 region for a GCS bucket) are left out, since one section serves every URL of a job.
fn storage_options(location: &Location, storage: &StorageConfig) -> Vec<(String, String)> {
    let (endpoint, s3) = match location {
        Location::S3 { .. } => ("aws_endpoint", true),
        Location::Gcs { .. } => ("google_base_url", false),
        Location::Azure { .. } => ("azure_storage_endpoint", false),
        Location::Local(_) | Location::Memory { .. } => return Vec::new(),
    };
    let mut out = Vec::new();
    if let Some(url) = &storage.endpoint {
        out.push((endpoint.to_string(), url.clone()));
    }
    if let Some(allow) = storage.allow_http {
        out.push(("allow_http".to_string(), allow.to_string()));
    }
    if s3 {
        if let Some(region) = &storage.region {
            out.push(("aws_region".to_string(), region.clone()));
        }
        if let Some(addressing) = storage.addressing {
            let virtual_hosted = addressing == Addressing::VirtualHosted;
            out.push(("aws_virtual_hosted_style_request".to_string(), virtual_hosted.to_string()));
        }
    }
    out.extend(storage.options.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// A store and a prefix in it: every name handed to its methods is relative to the prefix.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    retry: RetryPolicy,
    /// The directory of a local store, whose folders outlive their objects (see [`Store::remove_leftovers`]).
    local_root: Option<PathBuf>,
}

impl Store {
    /// Opens `location`, creating a local directory if it does not exist yet.
    ///
    /// S3 is configured from the environment (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION` or `AWS_DEFAULT_REGION`, …). object_store's defaults are the ones
    /// S3-compatible servers need: path-style requests unless `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true`, and
    /// conditional puts by ETag, which [`Store::put_create`] relies on.
    pub fn open(location: &Location) -> Result<Store, StoreError> {
        Store::open_configured(location, Settings { env: true, options: &[] })
    }

    /// Opens `location` for a job: the environment, overridden by the job's `[storage]` section.
    pub fn open_for_job(location: &Location, storage: &StorageConfig) -> Result<Store, StoreError> {
        Store::open_configured(location, Settings { env: true, options: &storage_options(location, storage) })
    }

    /// Opens a cloud store configured by `options` alone, ignoring the environment, for a process that talks
    /// to more than one endpoint (tests do, against their own S3 server; setting the environment there would
    /// race between test threads). Keys are the environment's names (`AWS_ENDPOINT`) or object_store's
    /// (`endpoint`), in any case. Local and memory stores have no options and ignore them.
    pub fn open_with(location: &Location, options: &[(String, String)]) -> Result<Store, StoreError> {
        Store::open_configured(location, Settings { env: false, options })
    }

    fn open_configured(location: &Location, settings: Settings) -> Result<Store, StoreError> {
        let opened = |e: object_store::Error| StoreError::Open { url: location.to_string(), source: Box::new(e) };
        let (inner, prefix, url): (Arc<dyn ObjectStore>, &str, String) = match location {
            Location::Local(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Open { url: location.to_string(), source: Box::new(e) })?;
                // fsync makes a returned put as durable as on a remote store; cleanup keeps deleted
                // "directories" from lingering, since object stores have none.
                let fs = LocalFileSystem::new_with_prefix(dir)
                    .map_err(opened)?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
                let url = dir.display().to_string();
                return Ok(Store { local_root: Some(dir), ..Store::new(Arc::new(fs), "", url)? });
            }
            Location::Memory { name, prefix } => (memory_store(name), prefix, location.to_string()),
            Location::S3 { bucket, prefix } => {
                let s3 = settings
                    .builder(AmazonS3Builder::from_env, |b: AmazonS3Builder, k, v| b.with_config(k, v))
                    .map_err(opened)?
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(opened)?;
                (Arc::new(s3), prefix, location.to_string())
            }
            Location::Gcs { bucket, prefix } => {
                let gcs = settings
                    .builder(GoogleCloudStorageBuilder::from_env, |b: GoogleCloudStorageBuilder, k, v| {
                        b.with_config(k, v)
                    })
                    .map_err(opened)?
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(opened)?;
                (Arc::new(gcs), prefix, location.to_string())
            }
            Location::Azure { container, prefix } => {
                let azure = settings
                    .builder(MicrosoftAzureBuilder::from_env, |b: MicrosoftAzureBuilder, k, v| b.with_config(k, v))
                    .map_err(opened)?
                    .with_container_name(container)
                    .build()
                    .map_err(opened)?;
                (Arc::new(azure), prefix, location.to_string())
            }
        };
        Store::new(inner, prefix, url)
    }

    pub fn from_url(url_or_path: &str) -> Result<Store, StoreError> {
        Store::open(&Location::parse(url_or_path)?)
    }

    /// A store over any object_store backend; `url` is what messages call its root.
    pub fn new(inner: Arc<dyn ObjectStore>, prefix: &str, url: impl Into<String>) -> Result<Store, StoreError> {
        let url = url.into();
        let prefix = Path::parse(prefix)
            .map_err(|e| StoreError::BadLocation { location: url.clone(), reason: e.to_string() })?;
        Ok(Store { inner, prefix, url, retry: RetryPolicy::default(), local_root: None })
    }

    pub fn with_retry(self, retry: RetryPolicy) -> Store {
        Store { retry, ..self }
    }

    /// The store rooted at `rel` inside this one.
    pub fn child(&self, rel: &str) -> Result<Store, StoreError> {
        Ok(Store { prefix: self.path(rel)?, url: self.url_of(rel), ..self.clone() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object_store behind this one, without the prefix and the retries.
    pub fn backend(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// The full name of `rel`, for messages.
    pub fn url_of(&self, rel: &str) -> String {
        let rel = rel.trim_matches('/');
        if rel.is_empty() { self.url.clone() } else { format!("{}/{rel}", self.url.trim_end_matches('/')) }
    }

    fn path(&self, rel: &str) -> Result<Path, StoreError> {
        let bad = |reason: String| StoreError::BadName { base: self.url.clone(), rel: rel.to_string(), reason };
        let rel_path = Path::parse(rel).map_err(|e| bad(e.to_string()))?;
        Ok(rel_path.parts().fold(self.prefix.clone(), Path::join))
    }

    /// Like [`Store::path`], but the name of an object rather than of a prefix, so it cannot be empty.
    fn object(&self, rel: &str) -> Result<Path, StoreError> {
        let path = self.path(rel)?;
        if path == self.prefix {
            return Err(StoreError::BadName {
                base: self.url.clone(),
                rel: rel.into(),
                reason: "empty object name".into(),
            });
        }
        Ok(path)
    }

    async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match op().await {
                Ok(v) => return Ok(v),
                Err(error) if attempts < self.retry.attempts && is_transient(&error) => {
                    tokio::time::sleep(self.retry.backoff(attempts - 1)).await;
                }
                Err(error) => return Err(Failure { error, attempts }),
            }
        }
    }

    fn failed(&self, op: &'static str, rel: &str, f: Failure) -> StoreError {
        let url = self.url_of(rel);
        match f.error {
            object_store::Error::NotFound { .. } => StoreError::NotFound { url },
            object_store::Error::AlreadyExists { .. } => StoreError::AlreadyExists { url },
            object_store::Error::Precondition { .. } => StoreError::Conflict { url },
            object_store::Error::NotImplemented { .. } => StoreError::Unsupported { url, op },
            error => StoreError::Failed { op, url, attempts: f.attempts, source: error },
        }
    }

    pub async fn get(&self, rel: &str) -> Result<Bytes, StoreError> {
        let path = self.object(rel)?;
        self.retrying(|| async { self.inner.get(&path).await?.bytes().await })
            .await
            .map_err(|f| self.failed("get", rel, f))
    }

    /// Writes `bytes` at `rel`, replacing whatever was there; readers see the old or the new object, never
    /// a mix.
    pub async fn put(&self, rel: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let path = self.object(rel)?;
        let bytes = bytes.into();
        self.retrying(|| self.inner.put(&path, bytes.clone().into()))
            .await
            .map(drop)
            .map_err(|f| self.failed("put", rel, f))
    }

    /// Writes `bytes` at `rel` only if nothing is there yet, atomically: of several writers racing for the
    /// same name exactly one succeeds and the others get [`StoreError::AlreadyExists`].
    ///
    /// A retry after an ambiguous failure (a timeout after the server stored the object) finds the object
    /// in place; if it holds exactly `bytes`, that is taken as this call's own write.
    pub async fn put_create(&self, rel: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        let path = self.object(rel)?;
        let bytes = bytes.into();
        let created = self.retrying(|| self.inner.put_opts(&path, bytes.clone().into(), PutMode::Create.into())).await;
        match created {
            Ok(_) => Ok(()),
            Err(f) if f.attempts > 1 && matches!(f.error, object_store::Error::AlreadyExists { .. }) => {
                if self.get(rel).await? == bytes { Ok(()) } else { Err(self.failed("create", rel, f)) }
            }
            Err(f) => Err(self.failed("create", rel, f)),
        }
    }

    /// The object and the version it was read at, for [`Store::put_update`].
    pub async fn get_versioned(&self, rel: &str) -> Result<(Bytes, Version), StoreError> {
        let path = self.object(rel)?;
        self.retrying(|| async {
            let result = self.inner.get(&path).await?;
            let version = UpdateVersion { e_tag: result.meta.e_tag.clone(), version: result.meta.version.clone() };
            Ok((result.bytes().await?, Version(version)))
        })
        .await
        .map_err(|f| self.failed("get", rel, f))
    }

    /// Replaces `rel` only if it is still at `version` (compare-and-swap): [`StoreError::Conflict`] if another
    /// writer moved it, [`StoreError::Unsupported`] on stores without conditional updates (local files).
    pub async fn put_update(&self, rel: &str, bytes: impl Into<Bytes>, version: &Version) -> Result<(), StoreError> {
        let path = self.object(rel)?;
        let bytes = bytes.into();
        self.retrying(|| self.inner.put_opts(&path, bytes.clone().into(), PutMode::Update(version.0.clone()).into()))
            .await
            .map(drop)
            .map_err(|f| self.failed("update", rel, f))
    }

    /// The objects under the prefix `rel_prefix` (whole path segments: `a` holds `a/x`, not `ab`), with
    /// their sizes in bytes, sorted by name; names are relative to this store.
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let path = self.path(rel_prefix)?;
        let prefix = (!path.is_root()).then_some(&path);
        let metas = self
            .retrying(|| self.inner.list(prefix).try_collect::<Vec<_>>())
            .await
            .map_err(|f| self.failed("list", rel_prefix, f))?;
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .filter_map(|meta| {
                let rel: Vec<_> =
                    meta.location.prefix_match(&self.prefix)?.map(|part| part.as_ref().to_string()).collect();
                Some((rel.join("/"), meta.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The names of the folders directly under `rel` (on an object store: the prefixes that hold objects; on
    /// a local store also empty directories), sorted.
    pub async fn folders(&self, rel: &str) -> Result<Vec<String>, StoreError> {
        let path = self.path(rel)?;
        let prefix = (!path.is_root()).then_some(&path);
        let listed =
            self.retrying(|| self.inner.list_with_delimiter(prefix)).await.map_err(|f| self.failed("list", rel, f))?;
        let mut names: Vec<String> =
            listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_string)).collect();
        names.sort();
        Ok(names)
    }

    /// Removes the local folder `rel` if it holds no object: what a writer killed mid-put leaves behind
    /// (empty directories, a partly written staging file) once the objects around it are deleted. Object
    /// stores have no folders; there, and where an object remains, this does nothing.
    pub async fn remove_leftovers(&self, rel: &str) -> Result<(), StoreError> {
        let Some(root) = &self.local_root else { return Ok(()) };
        if !self.list(rel).await?.is_empty() {
            return Ok(());
        }
        let dir = root.join(self.path(rel)?.as_ref());
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StoreError::Local { op: "removing", url: self.url_of(rel), source: e })
            }
            _ => Ok(()),
        }
    }

    /// Deletes `rel`; deleting what is not there succeeds, as it does on S3, whatever the backend.
    pub async fn delete(&self, rel: &str) -> Result<(), StoreError> {
        let path = self.object(rel)?;
        match self.retrying(|| self.inner.delete(&path)).await {
            Ok(()) => Ok(()),
            Err(Failure { error: object_store::Error::NotFound { .. }, .. }) => Ok(()),
            Err(f) => Err(self.failed("delete", rel, f)),
        }
    }

    pub async fn exists(&self, rel: &str) -> Result<bool, StoreError> {
        let path = self.object(rel)?;
        match self.retrying(|| self.inner.head(&path)).await {
            Ok(_) => Ok(true),
            Err(Failure { error: object_store::Error::NotFound { .. }, .. }) => Ok(false),
            Err(f) => Err(self.failed("head", rel, f)),
        }
    }
}

/// The version of an object as read by [`Store::get_versioned`].
#[derive(Debug, Clone)]
pub struct Version(UpdateVersion);

/// The runtime behind [`BlockingStore::new`]: one per process, started on first use and never shut down,
/// so that dropping a store can never drop a runtime (which tokio forbids inside async code).
fn shared_runtime() -> Result<Handle, StoreError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("acrf-store")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map(|rt| rt.handle().clone())
        .map_err(|e| StoreError::Runtime(e.clone()))
}

/// [`Store`] for synchronous code: each call blocks the calling thread until the operation is done.
///
/// # Panics
/// Every operation panics when called from inside an async task (tokio cannot block a thread that drives
/// a runtime); async code uses [`BlockingStore::store`] instead.
#[derive(Debug, Clone)]
pub struct BlockingStore {
    store: Store,
    handle: Handle,
}

impl BlockingStore {
    /// Runs on a runtime shared by the whole process.
    pub fn new(store: Store) -> Result<BlockingStore, StoreError> {
        Ok(BlockingStore { store, handle: shared_runtime()? })
    }

    /// Runs on the caller's runtime, which must be a multi-thread one: a current-thread runtime only makes
    /// progress inside its own `block_on`.
    pub fn with_handle(store: Store, handle: Handle) -> BlockingStore {
        BlockingStore { store, handle }
    }

    pub fn from_url(url_or_path: &str) -> Result<BlockingStore, StoreError> {
        BlockingStore::new(Store::from_url(url_or_path)?)
    }

    /// The store at a job's URL (its output or data), configured as [`Store::open_for_job`] says.
    pub fn for_job(url_or_path: &str, storage: &StorageConfig) -> Result<BlockingStore, StoreError> {
        BlockingStore::new(Store::open_for_job(&Location::parse(url_or_path)?, storage)?)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn child(&self, rel: &str) -> Result<BlockingStore, StoreError> {
        Ok(BlockingStore { store: self.store.child(rel)?, handle: self.handle.clone() })
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    pub fn url_of(&self, rel: &str) -> String {
        self.store.url_of(rel)
    }

    pub fn get(&self, rel: &str) -> Result<Bytes, StoreError> {
        self.handle.block_on(self.store.get(rel))
    }

    /// [`BlockingStore::get`], with a missing object as `None` rather than an error: for the files a run or a
    /// sweep may not have written yet.
    pub fn get_if_exists(&self, rel: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get(rel) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn put(&self, rel: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        self.handle.block_on(self.store.put(rel, bytes))
    }

    pub fn put_create(&self, rel: &str, bytes: impl Into<Bytes>) -> Result<(), StoreError> {
        self.handle.block_on(self.store.put_create(rel, bytes))
    }

    pub fn get_versioned(&self, rel: &str) -> Result<(Bytes, Version), StoreError> {
        self.handle.block_on(self.store.get_versioned(rel))
    }

    pub fn put_update(&self, rel: &str, bytes: impl Into<Bytes>, version: &Version) -> Result<(), StoreError> {
        self.handle.block_on(self.store.put_update(rel, bytes, version))
    }

    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.handle.block_on(self.store.list(rel_prefix))
    }

    pub fn delete(&self, rel: &str) -> Result<(), StoreError> {
        self.handle.block_on(self.store.delete(rel))
    }

    pub fn folders(&self, rel: &str) -> Result<Vec<String>, StoreError> {
        self.handle.block_on(self.store.folders(rel))
    }

    pub fn remove_leftovers(&self, rel: &str) -> Result<(), StoreError> {
        self.handle.block_on(self.store.remove_leftovers(rel))
    }

    pub fn exists(&self, rel: &str) -> Result<bool, StoreError> {
        self.handle.block_on(self.store.exists(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::client::{HttpError, HttpErrorKind};
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, PutMultipartOptions, PutOptions,
        PutPayload, PutResult,
    };
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fast() -> RetryPolicy {
        RetryPolicy { attempts: 3, first_backoff: Duration::from_millis(1), max_backoff: Duration::from_millis(2) }
    }

    #[derive(Debug)]
    struct StatusMessage(u16);

    impl fmt::Display for StatusMessage {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "Error performing PUT http://s3/b/k in 2ms - Server returned non-2xx status code: {} Whatever: ",
                self.0
            )
        }
    }

    impl std::error::Error for StatusMessage {}

    #[derive(Debug, Clone, Copy)]
    enum Fault {
        Timeout,
        Status(u16),
    }

    impl Fault {
        fn error(self) -> object_store::Error {
            let source: BoxError = match self {
                Fault::Timeout => Box::new(HttpError::new(HttpErrorKind::Timeout, std::io::Error::other("deadline"))),
                Fault::Status(code) => Box::new(StatusMessage(code)),
            };
            object_store::Error::Generic { store: "flaky", source }
        }
    }

    /// InMemory with scripted failures of put and get; a fault marked `after` fails only once the
    /// operation is done, like a reply lost on the way back.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: InMemory,
        faults: Mutex<VecDeque<(Fault, bool)>>,
        calls: AtomicUsize,
    }

    impl Flaky {
        fn new(faults: &[(Fault, bool)]) -> Arc<Flaky> {
            Arc::new(Flaky { faults: Mutex::new(faults.iter().copied().collect()), ..Flaky::default() })
        }

        async fn scripted<T>(&self, op: impl Future<Output = object_store::Result<T>>) -> object_store::Result<T> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let fault = self.faults.lock().unwrap().pop_front();
            match fault {
                None => op.await,
                Some((fault, true)) => op.await.and(Err(fault.error())),
                Some((fault, false)) => Err(fault.error()),
            }
        }
    }

    impl fmt::Display for Flaky {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "Flaky")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.scripted(self.inner.put_opts(location, payload, opts)).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
            self.scripted(self.inner.get_opts(location, options)).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(&self, prefix: Option<&Path>) -> futures::stream::BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    fn flaky_store(faults: &[(Fault, bool)]) -> (Arc<Flaky>, Store) {
        let flaky = Flaky::new(faults);
        let store = Store::new(flaky.clone(), "run", "flaky://b/run").unwrap().with_retry(fast());
        (flaky, store)
    }

    #[test]
    fn parses_locations() {
        let memory = |name: &str, prefix: &str| Location::Memory { name: name.into(), prefix: prefix.into() };
        let cases = [
            ("data/cache", Location::Local("data/cache".into())),
            ("/abs/dir", Location::Local("/abs/dir".into())),
            ("file:///abs/dir", Location::Local("/abs/dir".into())),
            ("memory://t", memory("t", "")),
            ("memory://t/a/b/", memory("t", "a/b")),
            ("s3://bucket/runs/x", Location::S3 { bucket: "bucket".into(), prefix: "runs/x".into() }),
            ("gs://bucket", Location::Gcs { bucket: "bucket".into(), prefix: "".into() }),
            ("az://box/p", Location::Azure { container: "box".into(), prefix: "p".into() }),
        ];
        for (text, want) in cases {
            assert_eq!(Location::parse(text).unwrap(), want, "{text}");
        }
        assert_eq!(Location::parse("memory://t/a/b/").unwrap().to_string(), "memory://t/a/b");
        assert_eq!(Location::parse("s3://bucket/runs/x").unwrap().to_string(), "s3://bucket/runs/x");
        for bad in ["", "ftp://host/x", "file://relative/x", "s3://", "s3:///x", "memory://t/a//b", "gs://b/../x"] {
            let err = Location::parse(bad).unwrap_err();
            assert!(matches!(err, StoreError::BadLocation { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
    }

    #[tokio::test]
    async fn memory_round_trip() {
        let store = Store::from_url("memory://store-round-trip/run").unwrap();
        store.put("a/x.bin", vec![1u8, 2, 3]).await.unwrap();
        store.put("a/y.bin", b"yy".to_vec()).await.unwrap();
        store.put("ab.bin", b"z".to_vec()).await.unwrap();
        assert_eq!(store.get("a/x.bin").await.unwrap(), Bytes::from_static(&[1, 2, 3]));
        store.put("a/x.bin", b"new".to_vec()).await.unwrap();
        assert_eq!(store.get("a/x.bin").await.unwrap(), Bytes::from_static(b"new"));
        assert!(store.exists("a/y.bin").await.unwrap());
        assert!(!store.exists("a/nope").await.unwrap());
        assert_eq!(store.list("a").await.unwrap(), [("a/x.bin".to_string(), 3), ("a/y.bin".to_string(), 2)]);
        assert_eq!(store.list("").await.unwrap().len(), 3);
        store.delete("a/x.bin").await.unwrap();
        store.delete("a/x.bin").await.unwrap();
        assert_eq!(store.list("a").await.unwrap(), [("a/y.bin".to_string(), 2)]);

        let err = store.get("a/x.bin").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }));
        assert_eq!(err.to_string(), "memory://store-round-trip/run/a/x.bin not found");

        // The same name is the same store, another name another one, and a prefix isolates.
        let again = Store::from_url("memory://store-round-trip").unwrap();
        assert_eq!(again.get("run/a/y.bin").await.unwrap(), Bytes::from_static(b"yy"));
        assert!(!Store::from_url("memory://store-round-trip-2/run").unwrap().exists("a/y.bin").await.unwrap());
        let child = again.child("run/a").unwrap();
        assert_eq!(child.url(), "memory://store-round-trip/run/a");
        assert_eq!(child.list("").await.unwrap(), [("y.bin".to_string(), 2)]);
    }

    #[tokio::test]
    async fn put_create_is_create_only() {
        let store = Store::from_url("memory://store-create").unwrap();
        store.put_create("MANIFEST.json", b"one".to_vec()).await.unwrap();
        let err = store.put_create("MANIFEST.json", b"two".to_vec()).await.unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
        assert_eq!(err.to_string(), "memory://store-create/MANIFEST.json already exists");
        assert_eq!(store.get("MANIFEST.json").await.unwrap(), Bytes::from_static(b"one"));
    }

    fn pairs(options: &[(&str, &str)]) -> Vec<(String, String)> {
        options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn explicit_options_replace_the_environment() {
        let s3 = Location::parse("s3://b/p").unwrap();
        let options = pairs(&[("AWS_ENDPOINT", "http://127.0.0.1:9"), ("aws_allow_http", "true"), ("region", "x")]);
        assert_eq!(Store::open_with(&s3, &options).unwrap().url_of("k"), "s3://b/p/k");
        let err = Store::open_with(&s3, &pairs(&[("AWS_NO_SUCH_THING", "1")])).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }) && err.to_string().contains("aws_no_such_thing"), "{err}");
        let memory = Location::parse("memory://store-options").unwrap();
        assert_eq!(Store::open_with(&memory, &options).unwrap().url(), "memory://store-options");
    }

    #[test]
    fn storage_section_becomes_backend_keys() {
        use object_store::aws::AmazonS3ConfigKey;
        use object_store::azure::AzureConfigKey;
        use object_store::gcp::GoogleConfigKey;
        let storage = StorageConfig {
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: Some("eu-west-1".into()),
            addressing: Some(Addressing::Path),
            allow_http: Some(true),
            options: [("aws_conditional_put".to_string(), "etag".to_string())].into(),
        };
        let at = |url: &str| storage_options(&Location::parse(url).unwrap(), &storage);
        let s3 = at("s3://b/p");
        let want = [
            ("aws_endpoint", "http://127.0.0.1:9000"),
            ("allow_http", "true"),
            ("aws_region", "eu-west-1"),
            ("aws_virtual_hosted_style_request", "false"),
            ("aws_conditional_put", "etag"),
        ];
        assert_eq!(s3, pairs(&want));
        for (key, _) in &s3 {
            key.parse::<AmazonS3ConfigKey>().unwrap();
        }
        let gcs = at("gs://b");
        assert_eq!(gcs[..2], pairs(&[("google_base_url", "http://127.0.0.1:9000"), ("allow_http", "true")]));
        for (key, _) in &gcs[..2] {
            key.parse::<GoogleConfigKey>().unwrap();
        }
        let azure = at("az://c");
        assert_eq!(azure[..2], pairs(&[("azure_storage_endpoint", "http://127.0.0.1:9000"), ("allow_http", "true")]));
        for (key, _) in &azure[..2] {
            key.parse::<AzureConfigKey>().unwrap();
        }
        assert!(at("memory://m").is_empty() && at("/tmp/x").is_empty());

        // An S3 option given to a GCS bucket is refused with its name.
        let err = Store::open_for_job(&Location::parse("gs://b").unwrap(), &storage).unwrap_err();
        assert!(err.to_string().contains("aws_conditional_put"), "{err}");
        let s3 = Store::open_for_job(&Location::parse("s3://b/p").unwrap(), &storage).unwrap();
        assert_eq!(s3.url(), "s3://b/p");
    }

    #[tokio::test]
    async fn bad_object_names() {
        let store = Store::from_url("memory://store-names/p").unwrap();
        for rel in ["", "/", "a/../b", "a//b", "./a"] {
            let err = store.get(rel).await.unwrap_err();
            assert!(matches!(err, StoreError::BadName { .. }), "{rel:?}: {err}");
            assert!(err.to_string().contains("memory://store-names/p"), "{err}");
        }
    }

    #[tokio::test]
    async fn local_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("not/yet/there");
        let store = Store::from_url(dir.to_str().unwrap()).unwrap();
        assert!(dir.is_dir());
        store.put("ckpt/0001/lora.safetensors", b"w".to_vec()).await.unwrap();
        assert!(dir.join("ckpt/0001/lora.safetensors").is_file());
        assert_eq!(store.list("ckpt").await.unwrap(), [("ckpt/0001/lora.safetensors".to_string(), 1)]);
        assert!(store.list("nothing/here").await.unwrap().is_empty());
        store.put_create("LATEST", b"1".to_vec()).await.unwrap();
        assert!(matches!(store.put_create("LATEST", b"2".to_vec()).await, Err(StoreError::AlreadyExists { .. })));

        let via_url = Store::from_url(&format!("file://{}", dir.display())).unwrap();
        assert_eq!(via_url.get("LATEST").await.unwrap(), Bytes::from_static(b"1"));
        let canonical = std::fs::canonicalize(&dir).unwrap();
        assert_eq!(via_url.url_of("LATEST"), format!("{}/LATEST", canonical.display()));

        store.delete("ckpt/0001/lora.safetensors").await.unwrap();
        store.delete("ckpt/0001/lora.safetensors").await.unwrap();
        assert!(!dir.join("ckpt").exists(), "empty directories are cleaned up");
    }

    #[test]
    fn s3_is_configured_without_touching_the_network() {
        let store = Store::from_url("s3://some-bucket/runs/r1").unwrap();
        assert_eq!(store.url_of("ckpt/LATEST"), "s3://some-bucket/runs/r1/ckpt/LATEST");
    }

    #[test]
    fn transient_errors() {
        assert!(is_transient(&Fault::Timeout.error()));
        assert!(is_transient(&Fault::Status(503).error()));
        assert!(is_transient(&Fault::Status(429).error()));
        assert!(!is_transient(&Fault::Status(400).error()));
        let io = |kind| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(kind)),
        };
        assert!(is_transient(&io(std::io::ErrorKind::TimedOut)));
        assert!(!is_transient(&io(std::io::ErrorKind::PermissionDenied)));
        let connect = HttpError::new(HttpErrorKind::Connect, std::io::Error::other("refused"));
        assert!(is_transient(&object_store::Error::Generic { store: "S3", source: Box::new(connect) }));
        let decode = HttpError::new(HttpErrorKind::Decode, std::io::Error::other("garbage"));
        assert!(!is_transient(&object_store::Error::Generic { store: "S3", source: Box::new(decode) }));
        let missing = object_store::Error::NotFound { path: "x".into(), source: Box::new(StatusMessage(503)) };
        assert!(!is_transient(&missing));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p =
            RetryPolicy { attempts: 9, first_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(1) };
        let waits: Vec<u128> = (0..6).map(|r| p.backoff(r).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn transient_failures_are_retried() {
        let (flaky, store) = flaky_store(&[(Fault::Timeout, false), (Fault::Status(503), false)]);
        store.put("k", b"v".to_vec()).await.unwrap();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
        assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"v"));
    }

    #[tokio::test]
    async fn retries_run_out() {
        let (flaky, store) = flaky_store(&[(Fault::Status(500), false); 5]);
        let err = store.put("k", b"v".to_vec()).await.unwrap_err();
        assert!(matches!(err, StoreError::Failed { attempts: 3, .. }), "{err}");
        assert!(err.to_string().starts_with("put flaky://b/run/k failed after 3 attempt(s)"), "{err}");
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn permanent_failures_are_not_retried() {
        let (flaky, store) = flaky_store(&[(Fault::Status(400), false)]);
        let err = store.get("k").await.unwrap_err();
        assert!(matches!(err, StoreError::Failed { attempts: 1, .. }), "{err}");
        assert!(err.to_string().contains("flaky://b/run/k"), "{err}");
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn create_retried_after_a_lost_reply_succeeds() {
        let (flaky, store) = flaky_store(&[(Fault::Timeout, true)]);
        store.put_create("MANIFEST.json", b"mine".to_vec()).await.unwrap();
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3, "create, retried create, get");

        // Someone else's object found by the retry is still a conflict.
        store.put("LATEST", b"theirs".to_vec()).await.unwrap();
        flaky.faults.lock().unwrap().push_back((Fault::Timeout, false));
        let calls = flaky.calls.load(Ordering::SeqCst);
        let err = store.put_create("LATEST", b"mine".to_vec()).await.unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
        assert_eq!(flaky.calls.load(Ordering::SeqCst) - calls, 3);
    }

    #[test]
    fn blocking_from_plain_threads() {
        let store = BlockingStore::from_url("memory://store-blocking").unwrap();
        let writer = store.clone();
        std::thread::spawn(move || writer.put("from-thread", b"t".to_vec()).unwrap()).join().unwrap();
        assert_eq!(store.get("from-thread").unwrap(), Bytes::from_static(b"t"));
        assert_eq!(store.list("").unwrap(), [("from-thread".to_string(), 1)]);
        store.put_create("once", b"1".to_vec()).unwrap();
        assert!(matches!(store.put_create("once", b"1".to_vec()), Err(StoreError::AlreadyExists { .. })));
        store.delete("once").unwrap();
        assert!(!store.exists("once").unwrap());

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let borrowed = BlockingStore::with_handle(store.store().clone(), rt.handle().clone());
        assert_eq!(borrowed.child("").unwrap().get("from-thread").unwrap(), Bytes::from_static(b"t"));
    }
}
