//! One SSH connection to a target: connect with a bounded handshake, pin the host key,
//! authenticate with the agent host's key, and run remote commands with streamed output, a
//! deadline and a kill that really stops what was started.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle, Msg};
use russh::keys::{
    Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use russh::{Channel, ChannelMsg, Disconnect, Sig};
use stella_plugin_sdk::PluginError;
use stella_plugin_sdk::output::{OutputTail, Stream};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::{KeySource, TargetConfig};

/// How many output lines a failure report carries.
/// Captured stdout beyond this is dropped: docker's JSON answers are far smaller, and a runaway
/// command must not exhaust the agent's memory.
const MAX_CAPTURE: usize = 32 << 20;
/// A "line" without a newline is cut here, for the same reason.
const MAX_LINE: usize = 16 << 10;
/// First line every command prints: the pid of the remote shell. sshd puts each session's
/// command in a new session (setsid), so that pid is also the process group of everything the
/// command starts, which is what a timeout must kill.
const PGID_MARKER: &str = "__stella_pgid=";
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// What the server presented when it was not the pinned host key.
#[derive(Debug, Clone)]
struct Refusal {
    got: String,
}

/// russh calls this during key exchange; the connection only proceeds for the pinned key.
struct HostKeyCheck {
    expected: PublicKey,
    refusal: Arc<Mutex<Option<Refusal>>>,
}

impl HostKeyCheck {
    fn refuse(&self, got: String) {
        // A poisoned lock still holds a usable Option: the lock only guards this one write.
        let mut slot = self
            .refusal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *slot = Some(Refusal { got });
    }
}

impl client::Handler for HostKeyCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if key.key_data() == self.expected.key_data() {
                    Ok(true)
                } else {
                    self.refuse(format!(
                        "{} ({})",
                        key.fingerprint(HashAlg::Sha256),
                        key.algorithm()
                    ));
                    Ok(false)
                }
            }
            // Certificates are never asked for (no certificate algorithms are advertised); one
            // arriving anyway is not the pinned key.
            PublicKeyOrCertificate::Certificate(cert) => {
                self.refuse(format!(
                    "a certificate for {}",
                    cert.public_key().fingerprint(HashAlg::Sha256)
                ));
                Ok(false)
            }
        }
    }
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(u32),
    Signal(String),
    /// The server closed the channel without reporting either.
    Unknown,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
            Exit::Unknown => write!(f, "no exit status (the connection may have dropped)"),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Output {
    pub exit: Exit,
    /// Everything on stdout (after the pgid marker), when capture was asked for.
    pub stdout: Vec<u8>,
    /// The last lines of stdout and stderr, in arrival order.
    pub tail: OutputTail,
}

impl Output {
    pub(crate) fn success(&self) -> bool {
        self.exit == Exit::Code(0)
    }

    pub(crate) fn tail_text(&self) -> String {
        self.tail.text()
    }
}

#[derive(Debug)]
pub(crate) enum RunError {
    /// The deadline passed; the remote command was killed.
    TimedOut,
    Ssh(String),
}

/// Splits a byte stream into lines, cutting overlong ones.
#[derive(Default)]
struct Lines {
    partial: Vec<u8>,
}

impl Lines {
    fn push(&mut self, data: &[u8], mut emit: impl FnMut(&[u8])) {
        self.partial.extend_from_slice(data);
        let mut start = 0;
        while let Some(pos) = self.partial[start..].iter().position(|b| *b == b'\n') {
            emit(&self.partial[start..start + pos]);
            start += pos + 1;
        }
        self.partial.drain(..start);
        while self.partial.len() > MAX_LINE {
            let rest = self.partial.split_off(MAX_LINE);
            emit(&self.partial);
            self.partial = rest;
        }
    }

    fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(&self.partial);
            self.partial.clear();
        }
    }
}

/// Collects a command's output: strips the pgid marker, captures stdout, keeps the tail and
/// hands each line to the caller.
struct Collector<'a> {
    on_line: Option<&'a mut (dyn FnMut(&str) + Send)>,
    capture: bool,
    /// Bytes of stdout until its first newline, while the marker is still expected.
    first_line: Option<Vec<u8>>,
    pgid: Option<u32>,
    stdout: Vec<u8>,
    out_lines: Lines,
    err_lines: Lines,
    tail: OutputTail,
}

impl<'a> Collector<'a> {
    fn new(on_line: Option<&'a mut (dyn FnMut(&str) + Send)>, capture: bool) -> Self {
        Self {
            on_line,
            capture,
            first_line: Some(Vec::new()),
            pgid: None,
            stdout: Vec::new(),
            out_lines: Lines::default(),
            err_lines: Lines::default(),
            tail: OutputTail::default(),
        }
    }

    fn line(&mut self, stream: Stream, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end_matches('\r');
        if let Some(f) = self.on_line.as_mut() {
            f(text);
        }
        self.tail.push(stream, text);
    }

    fn stdout_data(&mut self, data: &[u8]) {
        let data = match self.first_line.as_mut() {
            None => data,
            Some(first) => {
                first.extend_from_slice(data);
                let Some(pos) = first.iter().position(|b| *b == b'\n') else {
                    if first.len() <= MAX_LINE {
                        return;
                    }
                    // Not our marker: nobody prints 16 KiB before it.
                    let pending = std::mem::take(first);
                    self.first_line = None;
                    return self.stdout_plain(&pending);
                };
                let pending = std::mem::take(first);
                self.first_line = None;
                let (line, rest) = pending.split_at(pos);
                let pgid = std::str::from_utf8(line)
                    .ok()
                    .and_then(|l| l.trim_end_matches('\r').strip_prefix(PGID_MARKER))
                    .and_then(|p| p.parse::<u32>().ok());
                match pgid {
                    Some(p) => {
                        self.pgid = Some(p);
                        // Skip the newline that ended the marker.
                        let rest = rest.get(1..).unwrap_or_default().to_vec();
                        return self.stdout_plain(&rest);
                    }
                    // The login shell printed something first (a chatty rc file); that is
                    // output like any other, and the kill falls back to the channel signal.
                    None => return self.stdout_plain(&pending),
                }
            }
        };
        self.stdout_plain(data);
    }

    fn stdout_plain(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.capture && self.stdout.len() < MAX_CAPTURE {
            let room = MAX_CAPTURE - self.stdout.len();
            self.stdout.extend_from_slice(&data[..data.len().min(room)]);
        }
        let mut lines = std::mem::take(&mut self.out_lines);
        lines.push(data, |l| self.line(Stream::Stdout, l));
        self.out_lines = lines;
    }

    fn stderr_data(&mut self, data: &[u8]) {
        let mut lines = std::mem::take(&mut self.err_lines);
        lines.push(data, |l| self.line(Stream::Stderr, l));
        self.err_lines = lines;
    }

    fn finish(mut self, exit: Exit) -> Output {
        if let Some(first) = self.first_line.take() {
            self.stdout_plain(&first);
        }
        let mut lines = std::mem::take(&mut self.out_lines);
        lines.finish(|l| self.line(Stream::Stdout, l));
        let mut lines = std::mem::take(&mut self.err_lines);
        lines.finish(|l| self.line(Stream::Stderr, l));
        Output {
            exit,
            stdout: self.stdout,
            tail: self.tail,
        }
    }
}

/// An authenticated SSH connection to one target.
pub(crate) struct Connection {
    handle: Handle<HostKeyCheck>,
    dest: String,
}

impl Connection {
    /// Connects, verifies the host key and authenticates, all within `connect_timeout`.
    pub(crate) async fn open(cfg: &TargetConfig) -> Result<Self, PluginError> {
        // Credentials first: a missing key is a local problem and must not look like a
        // network one.
        let key = load_private_key(&cfg.key).await?;
        let dest = cfg.destination();
        let seconds = cfg.connect_timeout.as_secs();
        match tokio::time::timeout(cfg.connect_timeout, Self::handshake(cfg, key)).await {
            Ok(Ok(handle)) => {
                info!(%dest, host_key = %cfg.host_key_fingerprint(), "ssh connection established");
                Ok(Self { handle, dest })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                warn!(%dest, seconds, "ssh connect timed out");
                Err(PluginError::Timeout {
                    what: format!(
                        "connecting to {dest} (TCP connect, SSH handshake and authentication)"
                    ),
                    seconds,
                })
            }
        }
    }

    async fn handshake(
        cfg: &TargetConfig,
        key: PrivateKey,
    ) -> Result<Handle<HostKeyCheck>, PluginError> {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let stream = tokio::net::TcpStream::connect((cfg.host.as_str(), cfg.port))
            .await
            .map_err(|e| PluginError::Backend(format!("cannot connect to {addr}: {e}")))?;
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set_nodelay failed");
        }

        let mut config = client::Config {
            // Keepalives notice a target that vanished mid-script; without them a dead peer
            // would only be noticed when the deploy deadline passes.
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_max: 3,
            ..Default::default()
        };
        // Ask only for the pinned key's algorithm: a server with several host keys then
        // presents the one the operator pinned instead of whichever russh prefers.
        config.preferred.key = host_key_algorithms(&cfg.host_key).into();
        let refusal = Arc::new(Mutex::new(None));
        let handler = HostKeyCheck {
            expected: cfg.host_key.clone(),
            refusal: refusal.clone(),
        };
        let expected = format!(
            "{} ({})",
            cfg.host_key_fingerprint(),
            cfg.host_key.algorithm()
        );
        let mut handle = match client::connect_stream(Arc::new(config), stream, handler).await {
            Ok(h) => h,
            Err(e) => {
                let refused = refusal
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .clone();
                return Err(match (refused, e) {
                    (Some(r), _) => {
                        warn!(%addr, %expected, got = %r.got, "host key mismatch");
                        PluginError::Backend(format!(
                            "host key mismatch: expected {expected} got {} from {addr}; \
                             refusing to connect",
                            r.got
                        ))
                    }
                    (
                        None,
                        russh::Error::NoCommonAlgo {
                            kind: russh::AlgorithmKind::Key,
                            theirs,
                            ..
                        },
                    ) => PluginError::Backend(format!(
                        "host key mismatch: expected {expected} but {addr} has no host key of \
                         that type (it offers {})",
                        theirs.join(", ")
                    )),
                    (None, e) => {
                        PluginError::Backend(format!("SSH handshake with {addr} failed: {e}"))
                    }
                });
            }
        };

        let user = cfg.user.as_str();
        let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
        let key = Arc::new(key);
        // RSA signatures need a hash the server accepts; `None` from the server means it
        // predates RFC 8332 and only knows SHA-1 (`ssh-rsa`).
        let hash = if key.algorithm().is_rsa() {
            handle
                .best_supported_rsa_hash()
                .await
                .map_err(|e| {
                    PluginError::Backend(format!("authentication as {user} on {addr}: {e}"))
                })?
                .flatten()
        } else {
            None
        };
        let result = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
            .await
            .map_err(|e| {
                PluginError::Backend(format!("authentication as {user} on {addr} failed: {e}"))
            })?;
        if !result.success() {
            warn!(%addr, user, key = %fingerprint, "ssh authentication refused");
            return Err(PluginError::Backend(format!(
                "authentication as {user} failed: {addr} refused the key {fingerprint}"
            )));
        }
        Ok(handle)
    }

    pub(crate) fn destination(&self) -> &str {
        &self.dest
    }

    pub(crate) async fn open_channel(&self) -> Result<Channel<Msg>, PluginError> {
        self.handle.channel_open_session().await.map_err(|e| {
            PluginError::Backend(format!("cannot open a session on {}: {e}", self.dest))
        })
    }

    /// Runs `command` (shell syntax, interpreted by the remote user's login shell) until it ends
    /// or `deadline` passes; on the deadline the command's whole process group is killed.
    /// stdin is closed at once. Each output line (stdout and stderr) goes to `on_line`.
    pub(crate) async fn run(
        &self,
        command: &str,
        deadline: Instant,
        on_line: Option<&mut (dyn FnMut(&str) + Send)>,
        capture: bool,
    ) -> Result<Output, RunError> {
        let wrapped = format!("echo {PGID_MARKER}$$; exec {command}");
        let mut channel = match tokio::time::timeout_at(deadline, self.start(&wrapped)).await {
            Ok(r) => r?,
            Err(_) => return Err(RunError::TimedOut),
        };
        let mut out = Collector::new(on_line, capture);
        let mut exit = Exit::Unknown;
        loop {
            let msg = match tokio::time::timeout_at(deadline, channel.wait()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(_) => {
                    self.kill(&channel, out.pgid).await;
                    return Err(RunError::TimedOut);
                }
            };
            match msg {
                ChannelMsg::Data { data } => out.stdout_data(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr_data(&data),
                ChannelMsg::ExitStatus { exit_status } => exit = Exit::Code(exit_status),
                ChannelMsg::ExitSignal {
                    signal_name,
                    error_message,
                    ..
                } => {
                    debug!(signal = ?signal_name, %error_message, "remote command killed by a signal");
                    exit = Exit::Signal(signal_name_of(&signal_name));
                }
                ChannelMsg::Failure => {
                    return Err(RunError::Ssh(format!(
                        "{} refused to run the command",
                        self.dest
                    )));
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        Ok(out.finish(exit))
    }

    async fn start(&self, command: &str) -> Result<Channel<Msg>, RunError> {
        let ssh = |e: russh::Error| RunError::Ssh(format!("{}: {e}", self.dest));
        let channel = self.handle.channel_open_session().await.map_err(ssh)?;
        channel.exec(true, command).await.map_err(ssh)?;
        // Nothing is ever sent to a command; a script that reads stdin gets EOF, not a hang.
        channel.eof().await.map_err(ssh)?;
        Ok(channel)
    }

    /// Best effort, bounded: the caller reports the timeout whatever happens here.
    async fn kill(&self, channel: &Channel<Msg>, pgid: Option<u32>) {
        // pgid 0 or 1 would mean "my group" or "every process": never send those.
        if let Some(pgid) = pgid.filter(|p| *p > 1) {
            let command =
                format!("kill -9 -{pgid} 2>/dev/null || kill -9 {pgid} 2>/dev/null; true");
            let killed = tokio::time::timeout(KILL_TIMEOUT, async {
                let mut ch = self.start(&command).await?;
                while ch.wait().await.is_some() {}
                Ok::<(), RunError>(())
            })
            .await;
            match killed {
                Ok(Ok(())) => info!(dest = %self.dest, pgid, "killed remote process group"),
                Ok(Err(e)) => {
                    warn!(dest = %self.dest, pgid, error = ?e, "could not kill remote process group")
                }
                Err(_) => {
                    warn!(dest = %self.dest, pgid, "killing the remote process group timed out")
                }
            }
        }
        // For servers where the marker did not come through; OpenSSH delivers it to the shell.
        if let Err(e) = channel.signal(Sig::KILL).await {
            debug!(error = %e, "signal request failed");
        }
        if let Err(e) = channel.close().await {
            debug!(error = %e, "channel close failed");
        }
    }

    /// Ends the connection politely; errors are irrelevant by then.
    pub(crate) async fn close(self) {
        if let Err(e) = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await
        {
            debug!(dest = %self.dest, error = %e, "disconnect failed");
        }
    }
}

fn signal_name_of(sig: &Sig) -> String {
    match sig {
        Sig::Custom(name) => name.clone(),
        other => format!("{other:?}"),
    }
}

fn host_key_algorithms(key: &PublicKey) -> Vec<Algorithm> {
    match key.algorithm() {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
            Algorithm::Rsa { hash: None },
        ],
        other => vec![other],
    }
}

/// Reads the key from the agent host. Messages name where the key was looked for, never what it
/// contains.
async fn load_private_key(source: &KeySource) -> Result<PrivateKey, PluginError> {
    let (text, origin) = match source {
        KeySource::File(path) => {
            let origin = format!("private_key_file {}", path.display());
            let text = tokio::fs::read_to_string(path).await.map_err(|e| {
                PluginError::Backend(format!("{origin}: cannot read it on the agent host: {e}"))
            })?;
            (text, origin)
        }
        KeySource::Env(name) => {
            let origin = format!("private_key_env {name}");
            let text = std::env::var(name).map_err(|_| {
                PluginError::Backend(format!(
                    "{origin}: the variable is not set (or not UTF-8) in the agent's environment"
                ))
            })?;
            (text, origin)
        }
    };
    russh::keys::decode_secret_key(&text, None).map_err(|e| match e {
        russh::keys::Error::KeyIsEncrypted => PluginError::Backend(format!(
            "{origin}: the key is protected by a passphrase; Stella needs an unencrypted key"
        )),
        e => PluginError::Backend(format!(
            "{origin}: not an OpenSSH private key Stella can use: {e}"
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_plugin_sdk::output::TAIL_LINES;

    fn collect(chunks: &[(&[u8], bool)]) -> (Output, Vec<String>) {
        let mut seen = Vec::new();
        let mut f = |l: &str| seen.push(l.to_string());
        let mut c = Collector::new(Some(&mut f), true);
        for (data, stderr) in chunks {
            if *stderr {
                c.stderr_data(data);
            } else {
                c.stdout_data(data);
            }
        }
        let out = c.finish(Exit::Code(0));
        (out, seen)
    }

    #[test]
    fn marker_is_stripped_across_chunks() {
        let (out, lines) = collect(&[
            (b"__stella_", false),
            (b"pgid=4242\nhel", false),
            (b"warn\n", true),
            (b"lo\r\nworld", false),
        ]);
        assert_eq!(lines, vec!["warn", "hello", "world"]);
        assert_eq!(out.stdout, b"hello\r\nworld");
        assert_eq!(
            out.tail.lines().collect::<Vec<_>>(),
            vec!["warn", "hello", "world"]
        );
    }

    #[test]
    fn output_without_marker_is_kept() {
        let mut c = Collector::new(None, true);
        c.stdout_data(b"motd line\nsecond\n");
        assert_eq!(c.pgid, None);
        let out = c.finish(Exit::Unknown);
        assert_eq!(
            out.tail.lines().collect::<Vec<_>>(),
            vec!["motd line", "second"]
        );
        assert_eq!(out.stdout, b"motd line\nsecond\n");
    }

    #[test]
    fn tail_keeps_the_last_lines_only() {
        let mut c = Collector::new(None, false);
        c.stdout_data(b"__stella_pgid=7\n");
        for i in 0..120 {
            c.stderr_data(format!("line {i}\n").as_bytes());
        }
        assert_eq!(c.pgid, Some(7));
        let out = c.finish(Exit::Code(1));
        let tail: Vec<_> = out.tail.lines().collect();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail[0], "line 70");
        assert_eq!(tail[49], "line 119");
        assert!(out.stdout.is_empty());
        assert!(!out.success());
    }

    #[test]
    fn overlong_lines_are_cut() {
        let mut c = Collector::new(None, false);
        c.stdout_data(b"__stella_pgid=7\n");
        c.stdout_data(&vec![b'x'; MAX_LINE * 2 + 10]);
        let out = c.finish(Exit::Code(0));
        assert_eq!(out.tail.len(), 3);
        assert_eq!(out.tail.last().len(), 10);
    }

    #[test]
    fn exit_display() {
        assert_eq!(Exit::Code(3).to_string(), "exit status 3");
        assert_eq!(Exit::Signal("KILL".into()).to_string(), "signal KILL");
    }
}
