//! A real OpenSSH server per test: its own host key, client keys, port, temp dir and log. Tests
//! run as root (as CI does), so they log in as `root` with a key.

#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stella_plugin_sdk::{ComponentSpec, DeploySpec, ExecutorContext, ProgressSink, TargetRef};
use stella_plugin_ssh::SshExecutor;

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    pub host_pub: String,
    /// Authorized for root.
    pub client_key: PathBuf,
    /// A valid key the server does not know.
    pub stranger_key: PathBuf,
    /// Public half of a host key this server does not have.
    pub other_host_pub: String,
}

pub fn keygen(path: &Path, kind: &str) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-N", "", "-C", "stella-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `SHA256:…` of a public key file, as OpenSSH prints it.
pub fn fingerprint(pub_file: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(pub_file)
        .output()
        .expect("ssh-keygen runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .nth(1)
        .expect("fingerprint in ssh-keygen -l output")
        .to_string()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    pub fn start() -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} missing: apt-get install -y openssh-server"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"), "ed25519");
        keygen(&d.join("other_host_key"), "ed25519");
        keygen(&d.join("client_key"), "ed25519");
        keygen(&d.join("stranger_key"), "ed25519");
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_pub = std::fs::read_to_string(d.join("host_key.pub"))
            .unwrap()
            .trim()
            .to_string();
        let other_host_pub = std::fs::read_to_string(d.join("other_host_key.pub"))
            .unwrap()
            .trim()
            .to_string();

        // The free port may be taken by a parallel test between probing and sshd's bind:
        // retry on a new one.
        for attempt in 0..5 {
            let port = free_port();
            let config = d.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress 127.0.0.1\n\
                     HostKey {d}/host_key\n\
                     AuthorizedKeysFile {d}/authorized_keys\n\
                     StrictModes no\n\
                     UsePAM no\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PubkeyAuthentication yes\n\
                     PermitRootLogin prohibit-password\n\
                     PidFile {d}/sshd.pid\n\
                     Subsystem sftp internal-sftp\n\
                     LogLevel VERBOSE\n",
                    d = d.display()
                ),
            )
            .unwrap();
            let log = d.join(format!("sshd-{attempt}.log"));
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(&config)
                .arg("-E")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("sshd starts");
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut up = false;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if banner(port) {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if up {
                return Self {
                    client_key: d.join("client_key"),
                    stranger_key: d.join("stranger_key"),
                    dir,
                    port,
                    child,
                    host_pub,
                    other_host_pub,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "sshd did not come up on port {port}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("sshd did not start");
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn sticker_path(&self) -> String {
        self.path("state/nested/stella.version.json")
            .display()
            .to_string()
    }

    /// A script-mode target config; `extra` keys override (null removes).
    pub fn config(&self, extra: Value) -> Value {
        let mut v = json!({
            "host": "127.0.0.1",
            "port": self.port,
            "user": "root",
            "private_key_file": self.client_key.display().to_string(),
            "host_key": self.host_pub,
            "sticker_path": self.sticker_path(),
            "connect_timeout_secs": 5,
            "timeout_secs": 60,
        });
        for (k, val) in extra.as_object().unwrap() {
            if val.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = val.clone();
            }
        }
        v
    }

    pub fn target(&self, name: &str, extra: Value) -> TargetRef {
        TargetRef {
            name: name.to_string(),
            kind: "ssh".to_string(),
            config: self.config(extra),
        }
    }

    pub fn log(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("sshd-") {
                all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        all
    }
}

fn banner(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 8];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"SSH-2.0")
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn executor(sshd: &Sshd) -> SshExecutor {
    SshExecutor::new(ExecutorContext {
        state_dir: sshd.path("agent-state"),
    })
}

pub fn spec(target: &TargetRef, release: &str, components: Vec<ComponentSpec>) -> DeploySpec {
    DeploySpec {
        job_id: format!("job-{release}"),
        deployment_id: format!("dep-{release}"),
        release_id: release.to_string(),
        release_name: format!("Release {release}"),
        target: target.clone(),
        components,
    }
}

#[derive(Default)]
pub struct Recorder(Mutex<Vec<String>>);

impl ProgressSink for Recorder {
    fn progress(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

impl Recorder {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}
