//! The agent's data directory: identity, pinned trust, and its own durable state.
//!
//! ```text
//! agent.json          who this agent is and where its plane is (written last at enrollment)
//! plane-endpoints.json  the agent endpoints the plane advertised in its last welcome
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
    #[error(transparent)]
    Endpoint(#[from] crate::transport::EndpointError),
    #[error("no agent endpoint given: name at least one https://host:port or quic://host:port")]
    NoEndpoints,
    #[error("agent endpoint {0:?} is listed twice")]
    DuplicateEndpoint(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    pub agent_id: String,
    pub name: String,
    pub api_url: String,
    /// The first endpoint the agent dials (`https://` gRPC or `quic://` QUIC). Kept as the
    /// first of the list, under its old name, so older agents and hand edits keep working.
    pub agent_endpoint: String,
    /// More endpoints of the same plane (other addresses, other replicas), tried in this order
    /// after `agent_endpoint` when it cannot be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_endpoints: Vec<String>,
    pub trust_domain: String,
    pub labels: BTreeMap<String, String>,
    pub ca_fingerprint: String,
    pub enrolled_at: String,
}

impl AgentConfig {
    /// The configured endpoints in dialling order: `agent_endpoint`, then the fallbacks.
    pub fn endpoints(&self) -> Vec<String> {
        dial_order(&[
            std::slice::from_ref(&self.agent_endpoint),
            &self.fallback_endpoints,
        ])
    }

    /// Replaces the configured endpoints (validated: at least one, each a valid URL, none
    /// twice); nothing changes when the list is refused.
    pub fn set_endpoints(&mut self, urls: &[String]) -> Result<(), ConfigError> {
        let mut urls = validate_endpoints(urls)?.into_iter();
        let first = urls.next().ok_or(ConfigError::NoEndpoints)?;
        self.agent_endpoint = first;
        self.fallback_endpoints = urls.collect();
        Ok(())
    }
}

/// Checks a list of agent endpoint URLs given by an operator or a plane: each must be
/// `https://host:port` or `quic://host:port`, none may appear twice, and the list is not empty.
/// Returns them normalised (no trailing `/`).
pub fn validate_endpoints(urls: &[String]) -> Result<Vec<String>, ConfigError> {
    if urls.is_empty() {
        return Err(ConfigError::NoEndpoints);
    }
    let mut out: Vec<String> = Vec::with_capacity(urls.len());
    for url in urls {
        let url = normalize_endpoint(url);
        crate::transport::EndpointUrl::parse(&url)?;
        if out.contains(&url) {
            return Err(ConfigError::DuplicateEndpoint(url));
        }
        out.push(url);
    }
    Ok(out)
}

/// The form endpoints are compared and stored in: trimmed, without a trailing `/`.
pub fn normalize_endpoint(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// Concatenates endpoint lists in priority order, keeping each URL's first occurrence.
pub fn dial_order(lists: &[&[String]]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for url in lists.iter().flat_map(|l| l.iter()) {
        let url = normalize_endpoint(url);
        if !url.is_empty() && !out.contains(&url) {
            out.push(url);
        }
    }
    out
}

/// What `plane-endpoints.json` holds: the plane's advertised endpoints from its last welcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlaneEndpoints {
    pub endpoints: Vec<String>,
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

    /// The endpoints the plane advertised in its last welcome (`plane-endpoints.json`).
    pub fn plane_endpoints_file(&self) -> PathBuf {
        self.root.join("plane-endpoints.json")
    }

    /// The plane's advertised endpoints; none when it never sent any.
    pub fn load_plane_endpoints(&self) -> Result<Vec<String>, ConfigError> {
        let path = self.plane_endpoints_file();
        if !path.exists() {
            return Ok(Vec::new());
        }
        Ok(read_json::<PlaneEndpoints>(&path)?.endpoints)
    }

    /// Replaces the configured endpoints in `agent.json` (validated first; written to a
    /// temporary file and renamed, so a refused list or a crash leaves the old file whole).
    pub fn set_endpoints(&self, urls: &[String]) -> Result<AgentConfig, ConfigError> {
        let mut config = self.load_config()?;
        config.set_endpoints(urls)?;
        let path = self.agent_file();
        write_json(&path, &config).map_err(|source| ConfigError::Io { path, source })?;
        Ok(config)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn enrolled(dir: &DataDir) -> AgentConfig {
        let config = AgentConfig {
            agent_id: "agt_1".to_string(),
            name: "a".to_string(),
            api_url: "https://plane:7443".to_string(),
            agent_endpoint: "https://plane:7444".to_string(),
            fallback_endpoints: Vec::new(),
            trust_domain: "stella.local".to_string(),
            labels: BTreeMap::new(),
            ca_fingerprint: "sha256:00".to_string(),
            enrolled_at: String::new(),
        };
        write_json(&dir.agent_file(), &config).unwrap();
        config
    }

    #[test]
    fn endpoint_lists_are_validated_with_the_offending_url() {
        assert_eq!(
            validate_endpoints(&strings(&["https://a:1/", " quic://[::1]:2 "])).unwrap(),
            strings(&["https://a:1", "quic://[::1]:2"])
        );
        for (list, expected) in [
            (vec![], "no agent endpoint given"),
            (vec!["http://a:1"], "\"http://a:1\": use https://host:port"),
            (
                vec!["https://a:1", "quic://b"],
                "\"quic://b\": expected host:port",
            ),
            (
                vec!["https://a:1", "https://a:1/"],
                "\"https://a:1\" is listed twice",
            ),
        ] {
            let e = validate_endpoints(&strings(&list)).unwrap_err().to_string();
            assert!(e.contains(expected), "{list:?}: {e}");
        }
    }

    #[test]
    fn dial_order_keeps_priority_and_drops_repeats() {
        let order = dial_order(&[
            &strings(&["quic://x:3"]),
            &strings(&["https://a:1", "https://b:2/"]),
            &strings(&["https://b:2", "https://c:3", "quic://x:3"]),
        ]);
        assert_eq!(
            order,
            strings(&["quic://x:3", "https://a:1", "https://b:2", "https://c:3"])
        );
    }

    #[test]
    fn old_config_files_and_hand_edits_keep_working() {
        // agent.json written before the list existed: one endpoint.
        let old = r#"{"agent_id":"a","name":"n","api_url":"https://p:1","agent_endpoint":"https://p:2",
            "trust_domain":"t","labels":{},"ca_fingerprint":"f","enrolled_at":""}"#;
        let config: AgentConfig = serde_json::from_str(old).unwrap();
        assert_eq!(config.endpoints(), strings(&["https://p:2"]));
        // A hand-edited agent_endpoint that is also a fallback is dialled once, first.
        let mut config = config;
        config.fallback_endpoints = strings(&["https://q:2", "https://p:2"]);
        assert_eq!(config.endpoints(), strings(&["https://p:2", "https://q:2"]));
        // An empty list is not written out, so older agents read the file unchanged.
        config.fallback_endpoints.clear();
        assert!(!serde_json::to_string(&config).unwrap().contains("fallback"));
    }

    #[test]
    fn setting_endpoints_rewrites_agent_json_or_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let before = enrolled(&dir);
        let stored = dir
            .set_endpoints(&strings(&["quic://b:7445", "https://a:7444"]))
            .unwrap();
        assert_eq!(stored.agent_endpoint, "quic://b:7445");
        assert_eq!(stored.fallback_endpoints, strings(&["https://a:7444"]));
        let reread = dir.load_config().unwrap();
        assert_eq!(
            reread.endpoints(),
            strings(&["quic://b:7445", "https://a:7444"])
        );
        assert_eq!(reread.agent_id, before.agent_id);

        let bytes = std::fs::read(dir.agent_file()).unwrap();
        for bad in [vec![], vec!["https://c:1", "tcp://d:2"]] {
            assert!(dir.set_endpoints(&strings(&bad)).is_err());
            assert_eq!(std::fs::read(dir.agent_file()).unwrap(), bytes, "{bad:?}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn setting_endpoints_needs_an_enrolled_agent() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let e = dir
            .set_endpoints(&strings(&["https://a:1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stella-agent enroll"), "{e}");
        assert!(!dir.agent_file().exists());
    }
}
