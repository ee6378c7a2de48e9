//! An sshd of its own on loopback, with a throwaway host key and client key, for the tests of what acrf
//! starts over ssh (`acrf launch`, `acrf cache --hosts`).

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// sshd re-executes itself and so must be started by its absolute path.
const SSHD: &str = "/usr/sbin/sshd";

/// An sshd on a free loopback port that lets this user in with a key made for the test.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Sshd {
    pub fn start() -> Result<Sshd> {
        if !Path::new(SSHD).exists() {
            bail!(
                "{SSHD} is missing: these tests need an ssh server; run them with .ci/test (the README's test \
                 command), which installs Debian's `openssh-server`"
            );
        }
        let dir = tempfile::tempdir()?;
        for key in ["host_key", "client_key"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "acrf-test", "-f"])
                .arg(dir.path().join(key))
                .output()
                .context("running ssh-keygen (Debian's `openssh-client`)")?;
            anyhow::ensure!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::copy(dir.path().join("client_key.pub"), dir.path().join("authorized_keys"))?;
        if std::fs::metadata("/proc/self")?.uid() == 0 {
            // A root sshd refuses to start without its privilege separation directory, which the package
            // creates only when its service starts.
            std::fs::create_dir_all("/run/sshd")?;
        }
        let port = free_port()?;
        let d = dir.path().display();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
        );
        std::fs::write(dir.path().join("sshd_config"), config)?;
        let child = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stderr(std::fs::File::create(dir.path().join("sshd.log"))?)
            .spawn()?;
        let mut sshd = Sshd { child, dir, port };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = sshd.child.try_wait()? {
                bail!("sshd exited ({status}):\n{}", sshd.log());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("sshd did not listen on {port}:\n{}", sshd.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(sshd)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// A `[[hosts]]` entry for this sshd: `gpus` workers of `binary`, environment variables `env` (TOML
    /// inline-table body), and `extra` lines.
    pub fn host(&self, gpus: &[&str], binary: &str, env: &str, extra: &str) -> Result<String> {
        let user = String::from_utf8(Command::new("id").arg("-un").output()?.stdout)?;
        Ok(format!(
            "[[hosts]]\nhost = \"127.0.0.1\"\nuser = \"{}\"\nport = {}\ngpus = {gpus:?}\nbinary = \"{binary}\"\n\
             identity_file = \"{}\"\n\
             ssh_options = [\"StrictHostKeyChecking=no\", \"UserKnownHostsFile=/dev/null\", \"LogLevel=ERROR\"]\n\
             env = {{ {env} }}\n{extra}\n",
            user.trim(),
            self.port,
            self.key().display()
        ))
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
