//! What deployments that start the processes themselves (SLURM, Kubernetes, a script) need from acrf: the
//! coordinator's identity kept in a file, so that a token can be handed out before the coordinator starts
//! and survives its restart, and the token written to a file instead of a terminal.

use std::path::{Path, PathBuf};

use acrf_common::protocol;
use anyhow::{Context, Result};

use crate::control::net::Identity;

/// The environment variable a worker takes its join token from.
pub const TOKEN_VAR: &str = "ACRF_JOIN_TOKEN";

/// The coordinator's certificate and job secret, kept in `path` (created on first use) so that a restarted
/// coordinator presents the same token and its workers can rejoin.
pub fn identity_and_secret(path: Option<&Path>) -> Result<(Identity, [u8; 32])> {
    let Some(path) = path else { return Ok((Identity::generate()?, protocol::random_bytes())) };
    if let Ok(bytes) = std::fs::read(path) {
        return Identity::from_bytes(&bytes).with_context(|| format!("identity file {}", path.display()));
    }
    let (id, secret) = (Identity::generate()?, protocol::random_bytes());
    write_private(path, &id.to_bytes(&secret))?;
    Ok((id, secret))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(bytes)?;
    Ok(())
}

/// Writes the join token readable by its owner only (it lets anyone join the job), under a temporary name
/// renamed into place, so that a script waiting for the file never reads half a token.
pub fn write_token_file(path: &Path, token: &str) -> Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    write_private(&partial, token.as_bytes())?;
    std::fs::rename(&partial, path).with_context(|| format!("renaming {} into place", partial.display()))
}
