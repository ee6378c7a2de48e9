//! Checkpoints in object storage, committed so that a crash at any instant leaves either a whole
//! checkpoint or none.
//!
//! A checkpoint of step s under `runs/<run>/` is a set of immutable blobs under `ckpt/<s>/<writer>/`,
//! followed by `ckpt/<s>/MANIFEST.json` written last with create-only semantics and listing every blob with
//! its size and SHA-256. It exists only if its manifest does and every blob verifies; anything else (a crash
//! between blobs and manifest, a truncated upload) is skipped with a warning. Blobs live under the writer's
//! own folder, so two coordinators that run the same job by mistake never overwrite each other's blobs, and
//! only one of them can create the manifest. `LATEST` names the newest committed step for people and tools;
//! it only moves forward, by compare-and-swap where the store has it. Resuming never trusts it: the newest
//! manifest that verifies, found by listing, wins.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::store::{BlockingStore, StoreError};

pub const FORMAT: &str = "acrf-ckpt/1";
pub const MANIFEST: &str = "MANIFEST.json";
pub const LATEST: &str = "LATEST";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("step {step} is already committed at {url} (by writer `{by}`): is another coordinator running this job?")]
    AlreadyCommitted { step: u64, url: String, by: String },
    #[error("checkpoint {url} is invalid: {reason}")]
    Invalid { url: String, reason: String },
    #[error("no checkpoint of step {step} under {url}")]
    Missing { step: u64, url: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    pub name: String,
    /// Relative to the checkpoint folder.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub run: String,
    pub step: u64,
    pub writer: String,
    pub created_unix_ms: u64,
    /// Hash of the training-relevant settings; a resume with other settings is refused.
    pub training_hash: String,
    pub blobs: Vec<BlobEntry>,
    /// Free-form facts for people and tools (epoch, loss, world size…).
    pub info: serde_json::Value,
}

/// A verified checkpoint: its manifest and its blobs by name.
pub type Loaded = (Manifest, BTreeMap<String, Bytes>);

/// The checkpoints of one run.
pub struct Checkpoints {
    root: BlockingStore,
    run: String,
    writer: String,
}

fn step_dir(step: u64) -> String {
    format!("ckpt/{step:010}")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Checkpoints {
    /// The checkpoints of `run` under `output`; `writer` names this process in blob paths and manifests
    /// (letters, digits, `-`, `_`, `.`).
    pub fn new(output: &BlockingStore, run: &str, writer: &str) -> Result<Checkpoints, CheckpointError> {
        Ok(Checkpoints {
            root: output.child(&format!("runs/{run}"))?,
            run: run.to_string(),
            writer: writer.to_string(),
        })
    }

    /// The run folder: `runs/<run>` under the output.
    pub fn root(&self) -> &BlockingStore {
        &self.root
    }

    /// Writes the blobs, then commits them with the manifest, then advances `LATEST`.
    pub fn commit(
        &self,
        step: u64,
        training_hash: &str,
        info: serde_json::Value,
        blobs: &[(&str, Bytes)],
    ) -> Result<Manifest, CheckpointError> {
        let dir = step_dir(step);
        let manifest_rel = format!("{dir}/{MANIFEST}");
        if let Some(existing) = self.read_manifest(step)? {
            return Err(CheckpointError::AlreadyCommitted {
                step,
                url: self.root.url_of(&manifest_rel),
                by: existing.writer,
            });
        }
        let mut entries = Vec::with_capacity(blobs.len());
        for (name, bytes) in blobs {
            let path = format!("{}/{name}", self.writer);
            self.root.put(&format!("{dir}/{path}"), bytes.clone())?;
            entries.push(BlobEntry {
                name: name.to_string(),
                path,
                size: bytes.len() as u64,
                sha256: sha256_hex(bytes),
            });
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            run: self.run.clone(),
            step,
            writer: self.writer.clone(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            training_hash: training_hash.into(),
            blobs: entries,
            info,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        let lost = match self.root.put_create(&manifest_rel, json.clone()) {
            Ok(()) => None,
            Err(StoreError::AlreadyExists { url }) => Some(url),
            Err(StoreError::Unsupported { .. }) => self.put_manifest_unconditionally(step, &manifest_rel, json)?,
            Err(e) => return Err(e.into()),
        };
        if let Some(url) = lost {
            for e in &manifest.blobs {
                self.root.delete(&format!("{dir}/{}", e.path))?;
            }
            let by = self.read_manifest(step)?.map_or_else(|| "unknown".into(), |m| m.writer);
            return Err(CheckpointError::AlreadyCommitted { step, url, by });
        }
        self.advance_latest(step)?;
        Ok(manifest)
    }

    /// The manifest write for stores without create-only puts (an S3-compatible server with
    /// `aws_conditional_put = "disabled"`): check that there is none, write, and read it back. This only
    /// narrows the window in which two writers of one step could both believe they committed; the URL of the
    /// manifest is returned when another writer's is found instead of ours.
    fn put_manifest_unconditionally(
        &self,
        step: u64,
        rel: &str,
        json: Vec<u8>,
    ) -> Result<Option<String>, CheckpointError> {
        if self.read_manifest(step)?.is_some() {
            return Ok(Some(self.root.url_of(rel)));
        }
        self.root.put(rel, json)?;
        let ours = self.read_manifest(step)?.is_some_and(|m| m.writer == self.writer);
        Ok((!ours).then(|| self.root.url_of(rel)))
    }

    /// Moves `LATEST` to `step` unless it already names a later one.
    fn advance_latest(&self, step: u64) -> Result<(), CheckpointError> {
        let body = serde_json::json!({ "step": step, "writer": self.writer }).to_string();
        loop {
            match self.root.get_versioned(LATEST) {
                Err(StoreError::NotFound { .. }) => match self.root.put_create(LATEST, body.clone()) {
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(StoreError::Unsupported { .. }) => return Ok(self.root.put(LATEST, body)?),
                    other => return Ok(other?),
                },
                Err(e) => return Err(e.into()),
                Ok((bytes, version)) => {
                    if parse_latest(&bytes).is_some_and(|s| s >= step) {
                        return Ok(());
                    }
                    match self.root.put_update(LATEST, body.clone(), &version) {
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(StoreError::Unsupported { .. }) => return Ok(self.root.put(LATEST, body)?),
                        other => return Ok(other?),
                    }
                }
            }
        }
    }

    /// The step `LATEST` names, if any.
    pub fn latest_pointer(&self) -> Result<Option<u64>, CheckpointError> {
        Ok(self.root.get_if_exists(LATEST)?.and_then(|bytes| parse_latest(&bytes)))
    }

    /// Steps that have a manifest, ascending (not yet verified).
    pub fn committed_steps(&self) -> Result<Vec<u64>, CheckpointError> {
        let mut steps: Vec<u64> = self
            .root
            .list("ckpt")?
            .into_iter()
            .filter_map(|(rel, _)| {
                let rest = rel.strip_prefix("ckpt/")?;
                let (step, file) = rest.split_once('/')?;
                (file == MANIFEST).then(|| step.parse().ok()).flatten()
            })
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    fn read_manifest(&self, step: u64) -> Result<Option<Manifest>, CheckpointError> {
        let rel = format!("{}/{MANIFEST}", step_dir(step));
        let Some(bytes) = self.root.get_if_exists(&rel)? else { return Ok(None) };
        let invalid = |reason: String| CheckpointError::Invalid { url: self.root.url_of(&rel), reason };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(format!("manifest: {e}")))?;
        if m.format != FORMAT || m.step != step {
            return Err(invalid(format!("manifest says format {} step {}", m.format, m.step)));
        }
        Ok(Some(m))
    }

    /// The checkpoint of `step` with every blob read and verified against its manifest entry.
    pub fn load(&self, step: u64) -> Result<Loaded, CheckpointError> {
        let manifest = self
            .read_manifest(step)?
            .ok_or_else(|| CheckpointError::Missing { step, url: self.root.url_of(&step_dir(step)) })?;
        let mut blobs = BTreeMap::new();
        for e in &manifest.blobs {
            let rel = format!("{}/{}", step_dir(step), e.path);
            let invalid = |reason: String| CheckpointError::Invalid { url: self.root.url_of(&rel), reason };
            let bytes = match self.root.get(&rel) {
                Ok(b) => b,
                Err(StoreError::NotFound { .. }) => return Err(invalid("blob is missing".into())),
                Err(e) => return Err(e.into()),
            };
            if bytes.len() as u64 != e.size {
                return Err(invalid(format!("{} bytes, the manifest says {}", bytes.len(), e.size)));
            }
            if sha256_hex(&bytes) != e.sha256 {
                return Err(invalid("SHA-256 does not match the manifest".into()));
            }
            blobs.insert(e.name.clone(), bytes);
        }
        Ok((manifest, blobs))
    }

    /// The newest checkpoint that verifies. A newer one that does not (a truncated or altered blob) is
    /// skipped with a warning and its manifest set aside as `MANIFEST.json.invalid`: it was never a usable
    /// checkpoint, and the resumed run must be able to commit that step again.
    pub fn latest_valid(&self) -> Result<Option<Loaded>, CheckpointError> {
        for step in self.committed_steps()?.into_iter().rev() {
            match self.load(step) {
                Ok(found) => return Ok(Some(found)),
                Err(e @ CheckpointError::Invalid { .. }) => {
                    warn!("skipping checkpoint of step {step}: {e}");
                    let manifest = format!("{}/{MANIFEST}", step_dir(step));
                    let bytes = self.root.get(&manifest)?;
                    self.root.put(&format!("{manifest}.invalid"), bytes)?;
                    self.root.delete(&manifest)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Deletes committed checkpoints beyond the newest `keep_last`, except steps that are multiples of
    /// `keep_every` (when > 0), and blobs of uncommitted attempts older than the newest commit, with the
    /// folders a killed writer left of them on a local store. A manifest goes before its blobs, so an
    /// interrupted prune never leaves a manifest without its blobs. Returns the committed steps it deleted.
    pub fn prune(&self, keep_last: usize, keep_every: u64) -> Result<Vec<u64>, CheckpointError> {
        let committed = self.committed_steps()?;
        let Some(&newest) = committed.last() else { return Ok(vec![]) };
        let keep: BTreeSet<u64> = committed.iter().rev().take(keep_last.max(1)).copied().collect();
        let mut removed = Vec::new();
        let mut by_step: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (rel, _) in self.root.list("ckpt")? {
            if let Some(step) = rel.strip_prefix("ckpt/").and_then(|r| r.split('/').next()).and_then(|s| s.parse().ok())
            {
                by_step.entry(step).or_default().push(rel);
            }
        }
        for (step, mut files) in by_step {
            let is_committed = committed.binary_search(&step).is_ok();
            let kept = keep.contains(&step) || (keep_every > 0 && step % keep_every == 0 && is_committed);
            if kept || step >= newest {
                continue;
            }
            files.sort_by_key(|f| !f.ends_with(MANIFEST));
            for f in files {
                self.root.delete(&f)?;
            }
            if is_committed {
                removed.push(step);
            }
        }
        for folder in self.root.folders("ckpt")? {
            let gone = |step: u64| committed.binary_search(&step).is_err() || removed.contains(&step);
            if folder.parse().is_ok_and(|step| step < newest && gone(step)) {
                self.root.remove_leftovers(&format!("ckpt/{folder}"))?;
            }
        }
        Ok(removed)
    }
}

fn parse_latest(bytes: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(bytes).ok()?.get("step")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> BlockingStore {
        BlockingStore::from_url(&format!("memory://{name}")).unwrap()
    }

    fn blobs(step: u64) -> Vec<(&'static str, Bytes)> {
        vec![("lora.safetensors", Bytes::from(vec![step as u8; 100])), ("state.json", Bytes::from("{}"))]
    }

    #[test]
    fn commit_load_and_latest() {
        let out = store("ckpt-commit");
        let c = Checkpoints::new(&out, "r", "w1").unwrap();
        for step in [10, 20] {
            c.commit(step, "h", serde_json::json!({}), &blobs(step)).unwrap();
        }
        assert_eq!(c.committed_steps().unwrap(), vec![10, 20]);
        assert_eq!(c.latest_pointer().unwrap(), Some(20));
        let (m, b) = c.latest_valid().unwrap().unwrap();
        assert_eq!(m.step, 20);
        assert_eq!(b["lora.safetensors"], Bytes::from(vec![20u8; 100]));
    }

    #[test]
    fn corrupt_or_partial_checkpoints_are_skipped() {
        let out = store("ckpt-corrupt");
        let c = Checkpoints::new(&out, "r", "w1").unwrap();
        c.commit(10, "h", serde_json::json!({}), &blobs(10)).unwrap();
        c.commit(20, "h", serde_json::json!({}), &blobs(20)).unwrap();
        // Truncate a blob of step 20: it must not load, and 10 wins.
        out.put("runs/r/ckpt/0000000020/w1/lora.safetensors", Bytes::from(vec![20u8; 50])).unwrap();
        assert!(matches!(c.load(20), Err(CheckpointError::Invalid { .. })));
        assert_eq!(c.latest_valid().unwrap().unwrap().0.step, 10);
        // Blobs of step 30 without a manifest: not a checkpoint.
        out.put("runs/r/ckpt/0000000030/w1/lora.safetensors", Bytes::from("x")).unwrap();
        assert_eq!(c.latest_valid().unwrap().unwrap().0.step, 10);
        // The bad one is set aside, so step 20 can be committed again by the resumed run.
        assert_eq!(c.committed_steps().unwrap(), vec![10]);
        c.commit(20, "h", serde_json::json!({}), &blobs(20)).unwrap();
        assert_eq!(c.latest_valid().unwrap().unwrap().0.step, 20);
    }

    #[test]
    fn a_second_writer_cannot_commit_the_same_step() {
        let out = store("ckpt-race");
        let a = Checkpoints::new(&out, "r", "coordinator-a").unwrap();
        let b = Checkpoints::new(&out, "r", "coordinator-b").unwrap();
        a.commit(10, "h", serde_json::json!({}), &blobs(10)).unwrap();
        let err = b.commit(10, "h", serde_json::json!({}), &blobs(11)).unwrap_err();
        assert!(matches!(&err, CheckpointError::AlreadyCommitted { by, .. } if by == "coordinator-a"), "{err}");
        assert_eq!(a.load(10).unwrap().1["lora.safetensors"], Bytes::from(vec![10u8; 100]));
    }

    #[test]
    fn latest_never_moves_backwards() {
        let out = store("ckpt-latest");
        let a = Checkpoints::new(&out, "r", "a").unwrap();
        a.commit(30, "h", serde_json::json!({}), &blobs(30)).unwrap();
        a.commit(20, "h", serde_json::json!({}), &blobs(20)).unwrap();
        assert_eq!(a.latest_pointer().unwrap(), Some(30));
    }

    #[test]
    fn prune_removes_the_folders_a_killed_writer_left_on_a_local_store() {
        let dir = tempfile::tempdir().unwrap();
        let out = BlockingStore::from_url(&dir.path().display().to_string()).unwrap();
        let c = Checkpoints::new(&out, "r", "w").unwrap();
        let ckpt = dir.path().join("runs/r/ckpt");
        // Killed writers: one before its first blob, one in the middle of a put (object_store's staging file).
        std::fs::create_dir_all(ckpt.join("0000000005/w")).unwrap();
        std::fs::create_dir_all(ckpt.join("0000000015/w")).unwrap();
        std::fs::write(ckpt.join("0000000015/w/lora.safetensors#1"), b"part").unwrap();
        for step in [10, 20, 30] {
            c.commit(step, "h", serde_json::json!({}), &blobs(step)).unwrap();
        }
        // A writer of a step after the newest commit may still be at work: its folder stays.
        std::fs::create_dir_all(ckpt.join("0000000035/w")).unwrap();
        assert_eq!(c.prune(1, 0).unwrap(), vec![10, 20]);
        let mut left: Vec<String> =
            std::fs::read_dir(&ckpt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["0000000030", "0000000035"]);
    }

    #[test]
    fn prune_keeps_the_newest_and_the_multiples() {
        let out = store("ckpt-prune");
        let c = Checkpoints::new(&out, "r", "w").unwrap();
        for step in (10..=60).step_by(10) {
            c.commit(step, "h", serde_json::json!({}), &blobs(step)).unwrap();
        }
        out.put("runs/r/ckpt/0000000015/w/lora.safetensors", Bytes::from("orphan")).unwrap();
        let removed = c.prune(2, 40).unwrap();
        assert_eq!(removed, vec![10, 20, 30]);
        assert_eq!(c.committed_steps().unwrap(), vec![40, 50, 60]);
        assert!(!out.exists("runs/r/ckpt/0000000015/w/lora.safetensors").unwrap());
        assert!(!out.exists("runs/r/ckpt/0000000010/w/state.json").unwrap());
    }
}
