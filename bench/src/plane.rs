//! The control plane under test: the real `stella serve` binary in its own process, on loopback
//! ports chosen once and kept across restarts, with its own data directory.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::api::Api;
use crate::sys;

pub struct Plane {
    bin: PathBuf,
    pub data_dir: PathBuf,
    pub api_port: u16,
    pub agent_port: u16,
    heartbeat_interval: String,
    log_level: String,
    log_path: PathBuf,
    max_session_setups: Option<u32>,
    /// UDP port of the QUIC agent endpoint, when agents use QUIC.
    pub quic_port: Option<u16>,
    child: Option<Child>,
}

impl Plane {
    pub fn new(
        bin: PathBuf,
        data_dir: PathBuf,
        log_path: PathBuf,
        heartbeat_interval: String,
        log_level: String,
        max_session_setups: Option<u32>,
        quic: bool,
    ) -> anyhow::Result<Self> {
        let api_port = sys::free_port()?;
        let mut agent_port = sys::free_port()?;
        while agent_port == api_port {
            agent_port = sys::free_port()?;
        }
        Ok(Self {
            bin,
            data_dir,
            api_port,
            agent_port,
            heartbeat_interval,
            log_level,
            log_path,
            max_session_setups,
            quic_port: if quic {
                Some(sys::free_udp_port()?)
            } else {
                None
            },
            child: None,
        })
    }

    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    pub fn pid(&self) -> anyhow::Result<String> {
        self.child
            .as_ref()
            .map(|c| c.id().to_string())
            .context("the plane is not running")
    }

    pub fn sample(&self) -> anyhow::Result<sys::ProcSample> {
        sys::sample(&self.pid()?)
    }

    /// Starts `stella --data-dir D serve` on the chosen ports; its output goes to the log file.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the plane is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let log_err = log.try_clone()?;
        let child = Command::new(&self.bin)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("serve")
            .arg("--api-listen")
            .arg(sys::loopback(self.api_port).to_string())
            .arg("--agent-listen")
            .arg(sys::loopback(self.agent_port).to_string())
            .arg("--heartbeat-interval")
            .arg(&self.heartbeat_interval)
            .args(
                self.max_session_setups
                    .map(|n| ["--max-session-setups".to_string(), n.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .args(
                self.quic_port
                    .map(|p| {
                        [
                            "--quic-listen".to_string(),
                            sys::loopback(p).to_string(),
                            "--advertise-quic".to_string(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .env("STELLA_LOG", &self.log_level)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| {
                format!(
                    "starting the plane {} (build it with `cargo build --release --bins`, or pass --stella-bin)",
                    self.bin.display()
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the API answers /healthz; returns an API client with the admin token.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Api> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "the plane exited during startup ({status}); last lines of {}:\n{}",
                    self.log_path.display(),
                    self.log_tail()
                );
            }
            let (ca, token) = (
                self.data_dir.join("pki/ca.pem"),
                self.data_dir.join("admin.token"),
            );
            if ca.exists() && token.exists() {
                let api = Api::new(&self.api_url(), &read(&ca)?, &read(&token)?)?;
                if api.healthy().await {
                    return Ok(api);
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "the plane did not answer /healthz within {timeout:?}; last lines of {}:\n{}",
                    self.log_path.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child
            && let Ok(pid) = libc::pid_t::try_from(child.id())
        {
            // SAFETY: kill(2) on our own child's pid with a valid signal has no memory effects.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// SIGKILL: no drain, no flush; what is durable in SQLite is all that survives.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGTERM (the plane drains its sessions), SIGKILL after 15 s.
    pub async fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        while let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    self.child = None;
                    return;
                }
                Ok(None) if start.elapsed() > Duration::from_secs(15) => {
                    self.kill9();
                    return;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn log_tail(&self) -> String {
        let Ok(mut f) = std::fs::File::open(&self.log_path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(4000)));
        let mut s = String::new();
        let _ = f.read_to_string(&mut s);
        s
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}
