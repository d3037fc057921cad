//! A real OCI registry per test: CNCF distribution 2.8 from Debian's `docker-registry`, on a
//! free loopback port, with its own storage (or one shared with another registry process, to
//! serve the same content under other auth), stopped when dropped.
//!
//! The Docker Engine accepts plain http for registries on 127.0.0.0/8, so images imported
//! locally can be pushed to it and pulled back by digest.

use std::fmt::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::docker::docker;
use crate::{free_port, must};

/// The registry binary (`apt-get install docker-registry`).
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";
/// Writes bcrypt htpasswd files (`apt-get install apache2-utils`).
pub const HTPASSWD: &str = "/usr/bin/htpasswd";

/// How the registry authenticates clients.
#[derive(Clone, Debug, Default)]
pub enum RegistryAuth {
    /// Anyone may pull and push.
    #[default]
    Anonymous,
    /// Basic auth against a bcrypt htpasswd file (see [`write_htpasswd`]).
    Htpasswd { file: PathBuf },
    /// The Docker token protocol: clients get a JWT from `realm`, signed by a key whose
    /// certificate chains to `root_cert_bundle` (PEM), issued by `issuer` for `service`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_bundle: PathBuf,
    },
}

/// What to start.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    pub auth: RegistryAuth,
    /// Serve https with this PEM certificate (chain) and key instead of plain http.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Storage directory; a fresh one in the registry's temp dir when `None`.
    pub storage: Option<PathBuf>,
}

/// A running registry on 127.0.0.1; killed when dropped.
#[derive(Debug)]
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub storage: PathBuf,
    tls: bool,
    child: Child,
}

/// A bcrypt htpasswd file at `path` holding one user.
pub fn write_htpasswd(path: &Path, user: &str, password: &str) {
    assert!(
        Path::new(HTPASSWD).exists(),
        "{HTPASSWD} missing: apt-get install -y apache2-utils"
    );
    let out = must(
        Command::new(HTPASSWD)
            .args(["-B", "-b", "-c"])
            .arg(path)
            .args([user, password])
            .output(),
        "htpasswd runs",
    );
    assert!(
        out.status.success(),
        "htpasswd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Registry {
    /// An anonymous plain-http registry with its own storage.
    pub fn start() -> Self {
        Self::start_with(RegistryOptions::default())
    }

    /// Starts the registry, retrying on another port when the one probed free was taken by a
    /// parallel test before the registry could bind it.
    pub fn start_with(options: RegistryOptions) -> Self {
        assert!(
            Path::new(DOCKER_REGISTRY).exists(),
            "{DOCKER_REGISTRY} missing: apt-get install -y docker-registry"
        );
        let dir = must(tempfile::tempdir(), "temp dir");
        let storage = options
            .storage
            .clone()
            .unwrap_or_else(|| dir.path().join("storage"));
        must(std::fs::create_dir_all(&storage), "registry storage");
        for attempt in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            must(
                std::fs::write(&config, config_yaml(&options, &storage, port)),
                "registry config",
            );
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let log_file = must(std::fs::File::create(&log), "registry log");
            let mut child = must(
                Command::new(DOCKER_REGISTRY)
                    .arg("serve")
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(must(log_file.try_clone(), "log handle"))
                    .stderr(log_file)
                    .spawn(),
                "docker-registry starts",
            );
            if wait_listening(&mut child, port) {
                return Self {
                    dir,
                    port,
                    storage,
                    tls: options.tls.is_some(),
                    child,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "registry did not come up on port {port}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        panic!("docker-registry did not start");
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (or https).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    /// Tags the local image `local` as `HOST/repository:tag`, pushes it and removes that tag
    /// again; returns the manifest digest the push printed, after checking that the engine
    /// agrees (the image's `RepoDigests` carry `HOST/repository@digest`).
    pub fn push(&self, local: &str, repository: &str, tag: &str) -> String {
        let remote = format!("{}/{repository}:{tag}", self.host());
        docker(&["tag", local, &remote]);
        let out = docker(&["push", &remote]);
        let digest = match out
            .split_whitespace()
            .skip_while(|w| *w != "digest:")
            .nth(1)
        {
            Some(digest) if digest.starts_with("sha256:") => digest.to_string(),
            _ => panic!("no digest in the output of docker push {remote}: {out}"),
        };
        let repo_digests = docker(&["image", "inspect", "-f", "{{json .RepoDigests}}", &remote]);
        let expected = format!("{}/{repository}@{digest}", self.host());
        assert!(
            repo_digests.contains(&expected),
            "docker push printed {digest}, but the image's RepoDigests are {repo_digests}"
        );
        docker(&["rmi", &remote]);
        digest
    }

    /// Everything the registry logged so far.
    pub fn log(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("registry-") {
                    all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                }
            }
        }
        all
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config_yaml(options: &RegistryOptions, storage: &Path, port: u16) -> String {
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: stella-test-{port}\n",
        storage.display()
    );
    if let Some((cert, key)) = &options.tls {
        let _ = write!(
            yaml,
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        );
    }
    match &options.auth {
        RegistryAuth::Anonymous => {}
        RegistryAuth::Htpasswd { file } => {
            let _ = write!(
                yaml,
                "auth:\n  htpasswd:\n    realm: stella-test\n    path: {}\n",
                file.display()
            );
        }
        RegistryAuth::Token {
            realm,
            service,
            issuer,
            root_cert_bundle,
        } => {
            let _ = write!(
                yaml,
                "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    \
                 issuer: {issuer}\n    rootcertbundle: {}\n",
                root_cert_bundle.display()
            );
        }
    }
    yaml
}

/// Waits until the registry accepts connections on `port`, or has exited.
fn wait_listening(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::Scratch;

    #[test]
    fn a_registry_takes_a_push_and_goes_away() {
        let scratch = Scratch::new("stella-kit-reg");
        let id = scratch.sleeper("v1", 3600);
        let registry = Registry::start();
        let digest = registry.push(&format!("{}:v1", scratch.repo), "kit/app", "1.0.0");
        assert!(stella_plugin_sdk::is_valid_digest(&digest), "{digest}");
        assert_ne!(digest, id, "the manifest digest is not the image id");
        assert!(
            registry.log().contains("PUT /v2/kit/app/manifests/1.0.0"),
            "{}",
            registry.log()
        );
        let port = registry.port;
        drop(registry);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
