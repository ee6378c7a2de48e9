//! `acrf launch --hosts hosts.toml CONFIG`: the coordinator in this process and one worker per listed device
//! on other machines, each an `ssh` session that runs `acrf worker` there.
//!
//! No secret travels on a command line, where `ps` on either machine shows it to every user: the remote
//! command is a fixed shell snippet that reads `NAME=value` lines from its stdin up to an empty line, exports
//! them and becomes the worker, and the launcher writes the join token and the host's `env` table there.
//! (`ssh -o SendEnv` would keep them off the command line too, but only for the names that the remote sshd's
//! `AcceptEnv` lists, which out of the box is the locale alone.)
//!
//! After those lines stdin stays open as the worker's lifeline: a worker started with
//! `--exit-when-stdin-closes` exits when its stdin ends, which happens when the launcher closes it, and when
//! the ssh client or its connection dies (sshd then closes the session's pipes). `ssh -tt` would tie the
//! worker to the session through the terminal's hangup instead, but a terminal echoes what is written to it
//! (the token, into the logs), merges stdout with stderr and ends lines with `\r\n`.
//!
//! Each session's output is streamed here line by line behind the worker's index, host and device. The
//! sessions run in their own process group, so a Ctrl-C at the terminal reaches the launcher alone: it stops
//! the job as `acrf train` does (the ranks checkpoint after their step) and the coordinator then dismisses
//! the workers. A session that fails (the worker crashed, ssh could not connect, the binary is missing) stops
//! the whole job, as it would under torchrun or mpirun: the ranks left checkpoint if they still can, and the
//! same command continues from the newest checkpoint. `--restarts N` instead starts a failed session again up
//! to N times in all, and the group re-forms around it. However the job ends, every session is ended with it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use acrf_common::config::Config;
use acrf_common::protocol::JoinToken;
use anyhow::{Context, Result};
use serde::Deserialize;
use tracing::info;

use acrf_worker::device::cuda_ordinal;

use acrf_worker::checkpoint::ResumeRequest;

use super::cluster::TOKEN_VAR;
use super::{Launch, serve_with_workers, sized_for};
use crate::console::Outcome;
use crate::control;
use crate::observe::progress_bar;

/// Where the coordinator listens when neither the command line nor the hosts file says.
const DEFAULT_LISTEN: &str = "0.0.0.0:7600";

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("cannot read the hosts file {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("hosts file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("hosts file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Where the coordinator listens, and the machines whose devices train.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsFile {
    #[serde(default)]
    pub coordinator: CoordinatorAddrs,
    pub hosts: Vec<Host>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorAddrs {
    /// UDP address to listen on.
    pub listen: Option<SocketAddr>,
    /// Addresses the workers dial; needed where this machine is reached through NAT or by another name.
    #[serde(default)]
    pub advertise: Vec<SocketAddr>,
}

/// One machine: how to reach it over ssh, and which of its devices get a worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// What ssh connects to; without `advertise` it must also resolve here, to find the route to it.
    pub host: String,
    pub user: Option<String>,
    /// Default: ssh's own (22, or ~/.ssh/config).
    pub port: Option<u16>,
    /// One worker per entry, `cuda:N` or `cpu`.
    pub gpus: Vec<String>,
    /// The acrf binary there: an absolute path, a path relative to the login's home, or a name on the PATH
    /// of a non-interactive ssh session.
    #[serde(default = "default_binary")]
    pub binary: String,
    /// The workers' environment there (NCCL settings, object-store credentials); sent over stdin, so
    /// secrets may go here.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub identity_file: Option<PathBuf>,
    /// Extra ssh options, each passed as `-o OPTION`.
    #[serde(default)]
    pub ssh_options: Vec<String>,
    /// Pins the ring for a firewall: the worker of `gpus[i]` listens on TCP port `collective_port + i`.
    /// Default: ephemeral ports.
    pub collective_port: Option<u16>,
}

fn default_binary() -> String {
    "acrf".into()
}

/// A worker to start: its host (an index into the file's hosts) and device.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Slot {
    pub host: usize,
    pub device: String,
    pub collective_port: Option<u16>,
}

impl HostsFile {
    pub fn load(path: &Path) -> Result<HostsFile, HostsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|cause| HostsError::Read { path: path.display().to_string(), cause })?;
        HostsFile::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<HostsFile, HostsError> {
        let file: HostsFile =
            toml::from_str(text).map_err(|e| HostsError::Parse { path: origin.into(), message: e.to_string() })?;
        file.validate().map_err(|message| HostsError::Invalid { path: origin.into(), message })?;
        Ok(file)
    }

    /// Refuses here what would fail on the far side, or be misread by ssh or the remote shell.
    fn validate(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("no [[hosts]]".into());
        }
        for (i, h) in self.hosts.iter().enumerate() {
            let at = format!("hosts[{i}] ({})", h.host);
            if h.host.is_empty() || h.host.starts_with('-') || h.host.contains(char::is_whitespace) {
                return Err(format!("{at}: `host` must be a host name or address"));
            }
            if h.user.as_deref().is_some_and(|u| u.is_empty() || u.starts_with('-') || u.contains(char::is_whitespace))
            {
                return Err(format!("{at}: `user` must be a user name"));
            }
            if h.gpus.is_empty() {
                return Err(format!("{at}: `gpus` is empty: list one device per worker"));
            }
            for g in &h.gpus {
                cuda_ordinal(g).map_err(|e| format!("{at}: {e}"))?;
            }
            if h.binary.is_empty() {
                return Err(format!("{at}: `binary` is empty"));
            }
            for (name, value) in &h.env {
                if name == TOKEN_VAR {
                    return Err(format!("{at}: `env.{TOKEN_VAR}` is the launcher's to set"));
                }
                if !is_env_name(name) {
                    return Err(format!("{at}: `env.{name}` is not an environment variable name"));
                }
                if value.contains(['\n', '\0']) {
                    return Err(format!("{at}: `env.{name}` holds a line break or a NUL"));
                }
            }
            if let Some(o) = h.ssh_options.iter().find(|o| o.is_empty() || o.contains(['\n', '\0'])) {
                return Err(format!("{at}: bad ssh option {o:?}"));
            }
            if let Some(port) = h.collective_port {
                let last = port as usize + h.gpus.len() - 1;
                if port == 0 || last > u16::MAX as usize {
                    return Err(format!("{at}: `collective_port` {port} + {} workers leaves 1..=65535", h.gpus.len()));
                }
            }
        }
        Ok(())
    }

    /// One worker per listed device, in file order.
    pub(crate) fn slots(&self) -> Vec<Slot> {
        let mut slots = Vec::new();
        for (host, h) in self.hosts.iter().enumerate() {
            for (i, device) in h.gpus.iter().enumerate() {
                let collective_port = h.collective_port.map(|p| p + i as u16);
                slots.push(Slot { host, device: device.clone(), collective_port });
            }
        }
        slots
    }
}

fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Runs the job of `cfg` with the coordinator here and one worker per device of `file`'s hosts, continuing as
/// `resume` asks. `listen` and `advertise` override the file's; `restarts` failed sessions are started again
/// before a failure stops the job.
pub fn launch(
    cfg: &Config,
    file: &HostsFile,
    listen: Option<SocketAddr>,
    advertise: Vec<SocketAddr>,
    restarts: usize,
    resume: ResumeRequest,
    stop: Arc<AtomicBool>,
) -> Result<Outcome> {
    let slots = file.slots();
    let cfg = sized_for(cfg, slots.len());
    let listen = listen.or(file.coordinator.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid"));
    let advertise = if advertise.is_empty() { file.coordinator.advertise.clone() } else { advertise };
    let per_host = advertise.is_empty() && listen.ip().is_unspecified();
    let l = control::listen(&cfg, listen, advertise, None)?;
    let bound = l.endpoint.local_addr()?;
    let tokens = file
        .hosts
        .iter()
        .map(|h| {
            let mut token = l.token.clone();
            if per_host {
                token.addrs = vec![SocketAddr::new(address_towards(h)?, bound.port())];
            }
            Ok(token)
        })
        .collect::<Result<Vec<JoinToken>>>()?;
    info!("coordinator listening on {bound}; starting {} workers on {} hosts over ssh", slots.len(), file.hosts.len());
    let hosts = file.hosts.clone();
    let workers = slots.len();
    let spawn = move |i: usize| {
        let slot = &slots[i];
        start(i, &hosts[slot.host], slot, &tokens[slot.host])
    };
    let launch = Launch { workers, max_restarts: restarts, resume, spawn: Box::new(spawn) };
    serve_with_workers(&cfg, l, launch, stop, progress_bar())
}

/// This machine's address on its route to `host`, which is the address `host` can reach it at (NAT aside).
fn address_towards(host: &Host) -> Result<IpAddr> {
    let why = || format!("finding this machine's address towards {} (or set coordinator.advertise)", host.host);
    let target =
        (host.host.as_str(), host.port.unwrap_or(22)).to_socket_addrs().with_context(why)?.next().with_context(why)?;
    let any: SocketAddr = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid");
    let probe = UdpSocket::bind(any).with_context(why)?;
    // Connecting a UDP socket sends nothing: the kernel only picks the route, and with it the source address.
    probe.connect(target).with_context(why)?;
    Ok(probe.local_addr()?.ip())
}

/// Starts the ssh session of worker `i`.
fn start(i: usize, host: &Host, slot: &Slot, token: &JoinToken) -> Result<Child> {
    let any: IpAddr = if token.addrs[0].is_ipv6() { "::" } else { "0.0.0.0" }.parse().expect("valid");
    let collective = slot.collective_port.map(|port| SocketAddr::new(any, port));
    let prefix = format!("[{i} {} {}]", host.host, slot.device);
    let mut child = session(host, &worker_argv(&host.binary, &slot.device, collective), Some(token), &prefix)?;
    stream(prefix, child.stdout.take());
    Ok(child)
}

/// Runs `argv` on `host` over ssh with the host's `env` and the join token, if any, exported from stdin,
/// which then stays open. Its stderr is copied here behind `prefix`; its stdout is the caller's to read. The
/// session has its own process group, so a Ctrl-C at the terminal reaches this process alone, and it is
/// killed if this process dies.
pub(crate) fn session(host: &Host, argv: &[String], token: Option<&JoinToken>, prefix: &str) -> Result<Child> {
    let mut cmd = ssh_command(host, &remote_command(argv));
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    super::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("starting ssh")?;
    stream(prefix.to_string(), child.stderr.take());
    // A session that died at once fails this write; the caller learns of it from its exit status.
    let _ = child.stdin.as_mut().expect("stdin is piped").write_all(environment(host, token).as_bytes());
    Ok(child)
}

fn ssh_command(host: &Host, remote: &str) -> Command {
    let mut cmd = Command::new("ssh");
    // No terminal (see the module documentation), and never a prompt: nobody is there to answer it.
    cmd.args(["-T", "-o", "BatchMode=yes"]);
    if let Some(port) = host.port {
        cmd.arg("-p").arg(port.to_string());
    }
    if let Some(key) = &host.identity_file {
        cmd.arg("-i").arg(key);
    }
    for option in &host.ssh_options {
        cmd.arg("-o").arg(option);
    }
    if let Some(user) = &host.user {
        cmd.arg("-l").arg(user);
    }
    cmd.arg(&host.host).arg(remote);
    cmd
}

fn worker_argv(binary: &str, device: &str, collective: Option<SocketAddr>) -> Vec<String> {
    let mut argv = vec![binary.to_string(), "worker".into(), "--device".into(), device.into()];
    argv.push("--exit-when-stdin-closes".into());
    if let Some(addr) = collective {
        argv.extend(["--collective-listen".into(), addr.to_string()]);
    }
    argv
}

/// The command the remote shell runs: export the `NAME=value` lines of stdin up to an empty one, then become
/// `argv`.
fn remote_command(argv: &[String]) -> String {
    let argv: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    format!("while IFS= read -r kv && [ -n \"$kv\" ]; do export \"$kv\"; done; exec {}", argv.join(" "))
}

/// What a session's stdin gets: the token, if any, the host's `env`, and the empty line that ends them.
fn environment(host: &Host, token: Option<&JoinToken>) -> String {
    let mut lines = String::new();
    if let Some(token) = token {
        lines.push_str(&format!("{TOKEN_VAR}={}\n", token.encode()));
    }
    for (name, value) in &host.env {
        lines.push_str(&format!("{name}={value}\n"));
    }
    lines.push('\n');
    lines
}

/// `s` as one word of a POSIX shell command.
fn sh_quote(s: &str) -> String {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b);
    if !s.is_empty() && s.bytes().all(plain) { s.to_string() } else { format!("'{}'", s.replace('\'', r"'\''")) }
}

/// Copies a session's output to stderr, each line behind `prefix`.
fn stream(prefix: String, from: Option<impl Read + Send + 'static>) {
    let Some(from) = from else { return };
    std::thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            eprintln!("{prefix} {}", String::from_utf8_lossy(&line).trim_end_matches('\r'));
        }
    });
}

/// The worker's end of the lifeline (see the module documentation): exits this process once stdin ends.
pub fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        tracing::warn!("stdin closed: the launcher is gone; exiting");
        std::process::exit(1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
        [coordinator]
        listen = "0.0.0.0:7600"
        advertise = ["10.0.0.1:7600"]

        [[hosts]]
        host = "gpu1"
        user = "train"
        port = 2222
        gpus = ["cuda:0", "cuda:1"]
        binary = "/opt/acrf/bin/acrf"
        identity_file = "~/.ssh/id_ed25519"
        ssh_options = ["StrictHostKeyChecking=accept-new"]
        collective_port = 29500
        env = { NCCL_SOCKET_IFNAME = "=eth0", AWS_SECRET_ACCESS_KEY = "it's secret" }

        [[hosts]]
        host = "10.0.0.3"
        gpus = ["cpu"]
    "#;

    fn invalid(text: &str) -> String {
        match HostsFile::parse(text, "test") {
            Err(HostsError::Invalid { message, .. }) => message,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn a_full_file_parses_into_one_slot_per_device() {
        let f = HostsFile::parse(FULL, "test").unwrap();
        assert_eq!(f.coordinator.advertise, vec!["10.0.0.1:7600".parse::<SocketAddr>().unwrap()]);
        assert_eq!(f.hosts[1].binary, "acrf");
        let slots = f.slots();
        assert_eq!(
            slots,
            vec![
                Slot { host: 0, device: "cuda:0".into(), collective_port: Some(29500) },
                Slot { host: 0, device: "cuda:1".into(), collective_port: Some(29501) },
                Slot { host: 1, device: "cpu".into(), collective_port: None },
            ]
        );
    }

    #[test]
    fn mistakes_are_named_before_anything_starts() {
        let one = |host: &str| format!("[[hosts]]\n{host}\n");
        assert!(invalid("hosts = []").contains("no [[hosts]]"));
        assert!(
            invalid(&one(r#"host = "a"
gpus = []"#))
            .contains("`gpus` is empty")
        );
        assert!(
            invalid(&one(r#"host = "a"
gpus = ["gpu0"]"#))
            .contains("unknown device `gpu0`")
        );
        assert!(
            invalid(&one(r#"host = "-oProxyCommand=x"
gpus = ["cpu"]"#))
            .contains("`host`")
        );
        assert!(
            invalid(&one(r#"host = "a"
gpus = ["cpu"]
env = { "BAD-NAME" = "1" }"#))
            .contains("BAD-NAME")
        );
        assert!(
            invalid(&one(r#"host = "a"
gpus = ["cpu"]
env = { ACRF_JOIN_TOKEN = "x" }"#))
            .contains("launcher's")
        );
        assert!(
            invalid(&one(r#"host = "a"
gpus = ["cpu"]
env = { A = "two\nlines" }"#))
            .contains("line break")
        );
        assert!(
            invalid(&one(r#"host = "a"
gpus = ["cpu", "cpu"]
collective_port = 65535"#))
            .contains("collective_port")
        );
        assert!(matches!(
            HostsFile::parse("[[hosts]]\nhost = \"a\"\ngpu = [\"cpu\"]\n", "t"),
            Err(HostsError::Parse { .. })
        ));
    }

    #[test]
    fn the_remote_command_holds_no_secret_and_survives_the_shell() {
        let f = HostsFile::parse(FULL, "test").unwrap();
        let token = JoinToken { addrs: vec!["10.0.0.1:7600".parse().unwrap()], fingerprint: [1; 32], secret: [2; 32] };
        let collective = Some("0.0.0.0:29500".parse().unwrap());
        let cmd = remote_command(&worker_argv("/opt/my acrf/acrf", "cuda:1", collective));
        assert!(!cmd.contains(&token.encode()) && !cmd.contains("secret"), "{cmd}");
        // The snippet, run by a real shell with the launcher's stdin, exports every line and keeps argv intact.
        let probe =
            cmd.replace("exec '/opt/my acrf/acrf'", "printf '%s|' \"$ACRF_JOIN_TOKEN\" \"$AWS_SECRET_ACCESS_KEY\"");
        let mut sh =
            Command::new("sh").args(["-c", &probe]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        sh.stdin.take().unwrap().write_all(environment(&f.hosts[0], Some(&token)).as_bytes()).unwrap();
        let out = String::from_utf8(sh.wait_with_output().unwrap().stdout).unwrap();
        let expected = format!(
            "{}|it's secret|worker|--device|cuda:1|--exit-when-stdin-closes|--collective-listen|0.0.0.0:29500|",
            token.encode()
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn quoting_keeps_any_word_whole() {
        for word in ["plain", "", "two words", "it's", "$HOME", "a\"b", "`x`", "*"] {
            let out = Command::new("sh").args(["-c", &format!("printf %s {}", sh_quote(word))]).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), word);
        }
    }
}
