//! A real OpenSSH server per test: its own host key, client keys, port, temp dir and log.
//! Tests run as root (as CI does), so clients log in as `root` with a key.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, must};

/// Where the server binary is (`apt-get install openssh-server`).
pub const SSHD: &str = "/usr/sbin/sshd";

/// A running sshd on 127.0.0.1; killed when dropped.
#[derive(Debug)]
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    /// The server's public host key (`ssh-ed25519 AAAA… stella-test`).
    pub host_pub: String,
    /// Authorized for root.
    pub client_key: PathBuf,
    /// A valid key the server does not know.
    pub stranger_key: PathBuf,
    /// Public half of a host key this server does not have.
    pub other_host_pub: String,
}

/// `ssh-keygen` a key pair of type `kind` without passphrase at `path` (and `path.pub`).
pub fn keygen(path: &Path, kind: &str) {
    let out = must(
        Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-C", "stella-test", "-f"])
            .arg(path)
            .output(),
        "ssh-keygen runs",
    );
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `SHA256:…` of a public key file, as OpenSSH prints it.
pub fn fingerprint(pub_file: &Path) -> String {
    let out = must(
        Command::new("ssh-keygen").arg("-lf").arg(pub_file).output(),
        "ssh-keygen runs",
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    match text.split_whitespace().nth(1) {
        Some(fp) => fp.to_string(),
        None => panic!("no fingerprint in ssh-keygen -l output {text:?}"),
    }
}

fn read_key(path: &Path) -> String {
    must(std::fs::read_to_string(path), "read public key")
        .trim()
        .to_string()
}

impl Sshd {
    /// Generates the keys and starts the server, retrying on another port when the one probed
    /// free was taken by a parallel test before sshd could bind it.
    pub fn start() -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} missing: apt-get install -y openssh-server"
        );
        let dir = must(tempfile::tempdir(), "temp dir");
        let d = dir.path();
        keygen(&d.join("host_key"), "ed25519");
        keygen(&d.join("other_host_key"), "ed25519");
        keygen(&d.join("client_key"), "ed25519");
        keygen(&d.join("stranger_key"), "ed25519");
        must(
            std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")),
            "authorized_keys",
        );
        must(std::fs::create_dir_all("/run/sshd"), "/run/sshd");
        let host_pub = read_key(&d.join("host_key.pub"));
        let other_host_pub = read_key(&d.join("other_host_key.pub"));

        for attempt in 0..5 {
            let port = free_port();
            let config = d.join("sshd_config");
            must(
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
                ),
                "sshd_config",
            );
            let log = d.join(format!("sshd-{attempt}.log"));
            let mut child = must(
                Command::new(SSHD)
                    .arg("-D")
                    .arg("-f")
                    .arg(&config)
                    .arg("-E")
                    .arg(&log)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn(),
                "sshd starts",
            );
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

    /// `name` in the server's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        let mut all = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return all;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("sshd-") {
                all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        all
    }
}

/// Whether an SSH server answers on `port` with its banner.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_comes_up_with_its_keys_and_goes_away() {
        let sshd = Sshd::start();
        let port = sshd.port;
        assert!(banner(port));
        assert!(
            sshd.host_pub.starts_with("ssh-ed25519 "),
            "{}",
            sshd.host_pub
        );
        assert_ne!(sshd.host_pub, sshd.other_host_pub);
        assert!(sshd.client_key.exists() && sshd.stranger_key.exists());
        assert!(fingerprint(&sshd.path("client_key.pub")).starts_with("SHA256:"));
        drop(sshd);
        assert!(!banner(port), "sshd still answers after drop");
    }
}
