//! What every request handler and agent session shares.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hub::Hub;
use crate::keys::PlaneKeys;
use crate::store::Db;

#[derive(Debug, Clone)]
pub struct PlaneConfig {
    /// The agent endpoint URL handed to agents at enrollment (`https://host:port`).
    pub agent_endpoint: String,
    pub heartbeat_interval: Duration,
    pub job_ttl: Duration,
    pub agent_cert_validity: Duration,
    /// How long after expiry an agent may still renew by proving possession of its old key.
    pub renewal_grace: Duration,
}

pub struct AppState {
    pub db: Db,
    pub keys: PlaneKeys,
    pub hub: Hub,
    pub config: PlaneConfig,
    /// Flips to true when the plane shuts down; sessions then drain their agents.
    pub shutdown: watch::Receiver<bool>,
    /// Results refused because their receipt did not verify (since start).
    pub receipt_refusals: std::sync::atomic::AtomicU64,
    /// Agent sessions refused at their start, by reason (since start).
    pub session_refusals: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl AppState {
    pub fn count_session_refusal(&self, reason: &'static str) {
        if let Ok(mut m) = self.session_refusals.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }
}

pub type SharedState = Arc<AppState>;
