//! The agent's data directory: identity, pinned trust, and its own durable state.
//!
//! ```text
//! agent.json          who this agent is and where its plane is (written last at enrollment)
//! identity/agent.key  private key, generated here, mode 0600, never sent anywhere
//! identity/agent.pem  certificate issued by the plane's CA
//! identity/ca.pem     the plane's CA (pinned by fingerprint at enrollment)
//! trust.json          job-signing public keys the agent accepts
//! journal/, spool/    accepted jobs and results not yet acknowledged (see journal.rs)
//! targets.json        targets this agent serves, for inventory
//! executors/          executor state (e.g. docker version stickers)
//! steps/              state of the steps the agent runs itself (markers of started scripts)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stella_pki::TrustedKeys;

pub const AGENT_FILE: &str = "agent.json";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{0} is not an enrolled agent's data directory (no agent.json); run `stella-agent enroll` first"
    )]
    NotEnrolled(PathBuf),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    pub agent_id: String,
    pub name: String,
    pub api_url: String,
    pub agent_endpoint: String,
    pub trust_domain: String,
    pub labels: BTreeMap<String, String>,
    pub ca_fingerprint: String,
    pub enrolled_at: String,
}

#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn agent_file(&self) -> PathBuf {
        self.root.join(AGENT_FILE)
    }
    pub fn key_file(&self) -> PathBuf {
        self.root.join("identity/agent.key")
    }
    pub fn cert_file(&self) -> PathBuf {
        self.root.join("identity/agent.pem")
    }
    pub fn ca_file(&self) -> PathBuf {
        self.root.join("identity/ca.pem")
    }
    pub fn trust_file(&self) -> PathBuf {
        self.root.join("trust.json")
    }
    /// Version of the trust bundle `trust.json` holds (0 when never updated in-band).
    pub fn trust_version_file(&self) -> PathBuf {
        self.root.join("trust.version")
    }

    pub fn load_trust_version(&self) -> u64 {
        std::fs::read_to_string(self.trust_version_file())
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn targets_file(&self) -> PathBuf {
        self.root.join("targets.json")
    }
    pub fn journal_dir(&self) -> PathBuf {
        self.root.join("journal")
    }
    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }
    pub fn executor_dir(&self, kind: &str) -> PathBuf {
        self.root.join("executors").join(kind)
    }
    /// State of the steps the agent runs itself (`steps.rs`).
    pub fn steps_dir(&self) -> PathBuf {
        self.root.join("steps")
    }

    pub fn is_enrolled(&self) -> bool {
        self.agent_file().exists()
    }

    pub fn load_config(&self) -> Result<AgentConfig, ConfigError> {
        let path = self.agent_file();
        if !path.exists() {
            return Err(ConfigError::NotEnrolled(self.root.clone()));
        }
        read_json(&path)
    }

    pub fn load_trust(&self) -> Result<TrustedKeys, ConfigError> {
        read_json(&self.trust_file())
    }

    pub fn read_text(&self, path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a file atomically (temp file, fsync, rename), so a crash never leaves half a file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_atomic(path, &bytes)
}

/// The message of a plane's JSON error body (`{"code":…,"message":…}`), or the body itself.
pub fn api_error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}
