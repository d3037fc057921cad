//! The relay's disk store: what it keeps for its downstream ("leaf") agents while the plane
//! cannot be reached, and what it knows about them to serve them alone.
//!
//! ```text
//! relay/leaves/<agent>.json            certificate, last hello, last welcome of each leaf
//! relay/outbox/<agent>/r-<job>.msg     a leaf's result (with its receipt), until the plane acks it
//! relay/outbox/<agent>/e-<n>.msg       accepted/progress/trust acknowledgements, sent once
//! relay/outbox/<agent>/inventory.msg   the leaf's latest inventory (an older one is replaced)
//! relay/inbox/<agent>/<seq>-<job>.offer  signed jobs for the leaf, in sequence order
//! relay/server.pem, server.key         the relay's TLS server certificate (from the plane)
//! ```
//!
//! Every file is written atomically (temp, fsync, rename) before anyone is told it exists, and
//! the store is only files: `stella-agent relay import`/`export-results` work on it while the
//! relay runs, which picks up new offers on its next scan.
//!
//! Bounded by `max_bytes` (outbox + inbox): beyond it inventory and progress are dropped (a
//! newer report comes anyway), while results and offers are refused rather than dropped — a
//! refused result stays in the leaf's own spool (the relay does not acknowledge it) and a refused
//! offer is offered again by the plane later.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use stella_proto::{AgentMessage, JobOffer};

use crate::config::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the relay's store is full ({used} of {max} bytes); not stored")]
    Full { used: u64, max: u64 },
    #[error("{0:?} is not a valid agent or job id")]
    BadName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the relay knows about one leaf agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeafRecord {
    pub agent_id: String,
    /// The leaf's client certificate (DER, base64).
    #[serde(with = "b64")]
    pub cert_der: Vec<u8>,
    /// Its last hello (an encoded `AgentMessage`), replayed to open a virtual session.
    #[serde(with = "b64")]
    pub hello: Vec<u8>,
    /// The plane's last welcome for it (an encoded `PlaneMessage`), served while offline.
    #[serde(default, with = "b64")]
    pub welcome: Vec<u8>,
    /// The agent's session was taken over elsewhere (it connected to the plane or another
    /// relay): its virtual session is not opened again until it connects here.
    #[serde(default)]
    pub moved_away: bool,
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// How much is waiting, for the metric and `relay status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// Leaf messages waiting for the plane (results, events, inventory).
    pub to_plane_messages: u64,
    /// Results among them (never dropped).
    pub results: u64,
    /// Offers waiting for their leaf.
    pub to_agents_messages: u64,
    pub bytes: u64,
}

impl Backlog {
    pub fn messages(&self) -> u64 {
        self.to_plane_messages + self.to_agents_messages
    }
}

/// One stored leaf message waiting for the plane.
pub struct Pending {
    pub path: PathBuf,
    pub message: AgentMessage,
    /// Results stay until the plane acknowledges them; everything else goes once sent.
    pub is_result: bool,
}

pub struct Store {
    root: PathBuf,
    max_bytes: u64,
    next_event: std::sync::atomic::AtomicU64,
}

fn safe(name: &str) -> Result<&str, StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(name)
    } else {
        Err(StoreError::BadName(name.to_string()))
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| !n.starts_with('.'))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

impl Store {
    pub fn open(root: PathBuf, max_bytes: u64) -> Result<Self, StoreError> {
        for sub in ["leaves", "outbox", "inbox"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Ok(Self {
            root,
            max_bytes,
            // Event files sort by this counter; starting at the clock keeps them after the
            // events a previous run left behind.
            next_event: std::sync::atomic::AtomicU64::new(now),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn server_cert_file(&self) -> PathBuf {
        self.root.join("server.pem")
    }

    pub fn server_key_file(&self) -> PathBuf {
        self.root.join("server.key")
    }

    fn leaf_file(&self, agent_id: &str) -> Result<PathBuf, StoreError> {
        Ok(self
            .root
            .join("leaves")
            .join(format!("{}.json", safe(agent_id)?)))
    }

    fn outbox_dir(&self, agent_id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("outbox").join(safe(agent_id)?))
    }

    fn inbox_dir(&self, agent_id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("inbox").join(safe(agent_id)?))
    }

    pub fn leaf(&self, agent_id: &str) -> Option<LeafRecord> {
        let path = self.leaf_file(agent_id).ok()?;
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn put_leaf(&self, record: &LeafRecord) -> Result<(), StoreError> {
        let path = self.leaf_file(&record.agent_id)?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(io(&path))
    }

    pub fn leaves(&self) -> Vec<LeafRecord> {
        files(&self.root.join("leaves"))
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    pub fn backlog(&self) -> Backlog {
        let mut backlog = Backlog::default();
        for agent_dir in files(&self.root.join("outbox")) {
            for f in files(&agent_dir) {
                backlog.to_plane_messages += 1;
                backlog.bytes += size(&f);
                if f.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("r-"))
                {
                    backlog.results += 1;
                }
            }
        }
        for agent_dir in files(&self.root.join("inbox")) {
            for f in files(&agent_dir) {
                backlog.to_agents_messages += 1;
                backlog.bytes += size(&f);
            }
        }
        backlog
    }

    /// Room for `incoming` more bytes once `freed` bytes are replaced.
    fn room_for(&self, incoming: u64, freed: u64) -> Result<(), StoreError> {
        let used = self.backlog().bytes.saturating_sub(freed);
        if used + incoming > self.max_bytes {
            return Err(StoreError::Full {
                used,
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomic(path, bytes).map_err(io(path))
    }

    /// Keeps a leaf's result until the plane acknowledges it. A second copy of the same
    /// job's result replaces the first (the leaf re-sends from its spool).
    pub fn put_result(
        &self,
        agent_id: &str,
        job_id: &str,
        message: &AgentMessage,
    ) -> Result<(), StoreError> {
        let path = self
            .outbox_dir(agent_id)?
            .join(format!("r-{}.msg", safe(job_id)?));
        let bytes = message.encode_to_vec();
        self.room_for(bytes.len() as u64, size(&path))?;
        self.write(&path, &bytes)
    }

    pub fn has_result(&self, agent_id: &str, job_id: &str) -> bool {
        match (self.outbox_dir(agent_id), safe(job_id)) {
            (Ok(dir), Ok(job)) => dir.join(format!("r-{job}.msg")).exists(),
            _ => false,
        }
    }

    pub fn remove_result(&self, agent_id: &str, job_id: &str) {
        if let (Ok(dir), Ok(job)) = (self.outbox_dir(agent_id), safe(job_id)) {
            let _ = std::fs::remove_file(dir.join(format!("r-{job}.msg")));
        }
    }

    /// The leaf's latest inventory; returns false when it was dropped for lack of room.
    pub fn put_inventory(
        &self,
        agent_id: &str,
        message: &AgentMessage,
    ) -> Result<bool, StoreError> {
        let path = self.outbox_dir(agent_id)?.join("inventory.msg");
        let bytes = message.encode_to_vec();
        if self.room_for(bytes.len() as u64, size(&path)).is_err() {
            return Ok(false);
        }
        self.write(&path, &bytes)?;
        Ok(true)
    }

    /// Accepted/progress/trust acknowledgements: dropped when there is no room.
    pub fn put_event(&self, agent_id: &str, message: &AgentMessage) -> Result<bool, StoreError> {
        let n = self
            .next_event
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.outbox_dir(agent_id)?.join(format!("e-{n:020}.msg"));
        let bytes = message.encode_to_vec();
        if self.room_for(bytes.len() as u64, 0).is_err() {
            return Ok(false);
        }
        self.write(&path, &bytes)?;
        Ok(true)
    }

    /// Agents with anything waiting for the plane.
    pub fn outbox_agents(&self) -> Vec<String> {
        files(&self.root.join("outbox"))
            .into_iter()
            .filter(|d| !files(d).is_empty())
            .filter_map(|d| d.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .collect()
    }

    /// A leaf's waiting messages: events in order, then results, then the inventory.
    pub fn outbox(&self, agent_id: &str) -> Vec<Pending> {
        let Ok(dir) = self.outbox_dir(agent_id) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let all = files(&dir);
        let rank = |p: &PathBuf| match p.file_name().and_then(|n| n.to_str()) {
            Some(n) if n.starts_with("e-") => 0,
            Some(n) if n.starts_with("r-") => 1,
            _ => 2,
        };
        let mut sorted = all;
        sorted.sort_by_key(|p| (rank(p), p.clone()));
        for path in sorted {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match AgentMessage::decode(bytes.as_slice()) {
                Ok(message) => out.push(Pending {
                    is_result: rank(&path) == 1,
                    path,
                    message,
                }),
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable stored message; removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out
    }

    pub fn remove(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
    }

    /// Keeps a signed job for a leaf; false when it is already here or already answered.
    pub fn put_offer(&self, agent_id: &str, offer: &JobOffer) -> Result<bool, StoreError> {
        let job = safe(&offer.job_id)?;
        if self.has_result(agent_id, job) {
            return Ok(false);
        }
        let dir = self.inbox_dir(agent_id)?;
        let suffix = format!("-{job}.offer");
        if files(&dir).iter().any(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix))
        }) {
            return Ok(false);
        }
        let bytes = offer.encode_to_vec();
        self.room_for(bytes.len() as u64, 0)?;
        // Named by the signed sequence number, so offers go out in the order the leaf accepts
        // them (it refuses a sequence lower than one it has seen).
        let path = dir.join(format!("{:020}{suffix}", offer_sequence(offer)));
        self.write(&path, &bytes)?;
        Ok(true)
    }

    /// A leaf's waiting offers, in sequence order.
    pub fn offers(&self, agent_id: &str) -> Vec<JobOffer> {
        let Ok(dir) = self.inbox_dir(agent_id) else {
            return Vec::new();
        };
        files(&dir)
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter_map(|b| JobOffer::decode(b.as_slice()).ok())
            .collect()
    }

    pub fn remove_offer(&self, agent_id: &str, job_id: &str) {
        let Ok(dir) = self.inbox_dir(agent_id) else {
            return;
        };
        let suffix = format!("-{job_id}.offer");
        for p in files(&dir) {
            if p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix))
            {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// The sequence number inside a signed job envelope (0 when unreadable: the leaf decides).
fn offer_sequence(offer: &JobOffer) -> u64 {
    let Ok(envelope) = serde_json::from_slice::<stella_pki::Envelope>(&offer.envelope) else {
        return 0;
    };
    let Ok(payload) = stella_pki::decode_payload(&envelope) else {
        return 0;
    };
    serde_json::from_slice::<serde_json::Value>(&payload)
        .ok()
        .and_then(|v| v.get("sequence").and_then(|s| s.as_u64()))
        .unwrap_or(0)
}

/// Base64 of bytes, for the air-gap files.
pub fn b64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stella_proto::agent_message::Body;

    fn result(job: &str) -> AgentMessage {
        AgentMessage {
            body: Some(Body::Result(stella_proto::JobResult {
                job_id: job.to_string(),
                message: "x".repeat(100),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn results_are_refused_not_dropped_when_full_and_inventory_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 300).unwrap();
        store
            .put_result("agt_a", "job-1", &result("job-1"))
            .unwrap();
        store
            .put_result("agt_a", "job-2", &result("job-2"))
            .unwrap();
        // The same job again replaces its copy: no growth, no refusal.
        store
            .put_result("agt_a", "job-2", &result("job-2"))
            .unwrap();
        let full = store.put_result("agt_a", "job-3", &result("job-3"));
        assert!(matches!(full, Err(StoreError::Full { .. })), "{full:?}");
        let inventory = AgentMessage {
            body: Some(Body::Inventory(stella_proto::InventoryReport {
                observed_at_unix_ms: 1,
                targets: vec![stella_proto::TargetInventory {
                    target: "t".repeat(200),
                    ..Default::default()
                }],
            })),
        };
        assert!(!store.put_inventory("agt_a", &inventory).unwrap());
        let backlog = store.backlog();
        assert_eq!((backlog.results, backlog.to_plane_messages), (2, 2));
        store.remove_result("agt_a", "job-1");
        assert_eq!(store.backlog().results, 1);
        assert!(store.put_result("agt_a", "../x", &result("x")).is_err());
    }

    #[test]
    fn an_answered_or_known_offer_is_not_stored_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_path_buf(), 1 << 20).unwrap();
        let offer = JobOffer {
            job_id: "job-1".to_string(),
            envelope: b"{}".to_vec(),
        };
        assert!(store.put_offer("agt_a", &offer).unwrap());
        assert!(!store.put_offer("agt_a", &offer).unwrap());
        assert_eq!(store.offers("agt_a").len(), 1);
        store.remove_offer("agt_a", "job-1");
        store
            .put_result("agt_a", "job-1", &result("job-1"))
            .unwrap();
        assert!(!store.put_offer("agt_a", &offer).unwrap());
        assert!(store.offers("agt_a").is_empty());
    }
}
