//! What every request handler and agent session shares.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::hub::Hub;
use crate::keys::PlaneKeys;
use crate::store::Db;

#[derive(Debug, Clone)]
pub struct PlaneConfig {
    /// This replica's API URL (shown to the other replicas and operators).
    pub api_url: String,
    /// The agent endpoint URL handed to agents at enrollment (`https://host:port`): the
    /// first of `agent_endpoints`.
    pub agent_endpoint: String,
    /// Every agent endpoint handed to agents (enrollment answer, welcome), in order.
    pub agent_endpoints: Vec<String>,
    pub heartbeat_interval: Duration,
    pub job_ttl: Duration,
    pub agent_cert_validity: Duration,
    /// How long after expiry an agent may still renew by proving possession of its old key.
    pub renewal_grace: Duration,
    /// How long a replica's hold on a workflow run lasts without renewal: a replica that
    /// crashed hands its runs to the others this long after its last renewal.
    pub run_lease: Duration,
}

pub struct AppState {
    pub db: Db,
    /// This plane among the replicas sharing its database.
    pub replica: crate::replicas::Replica,
    pub keys: PlaneKeys,
    pub hub: Hub,
    /// The writer that group-commits what agent sessions record.
    pub writes: crate::group_commit::GroupCommit,
    pub config: PlaneConfig,
    /// Flips to true when the plane shuts down; sessions then drain their agents.
    pub shutdown: watch::Receiver<bool>,
    /// Results refused because their receipt did not verify (since start).
    pub receipt_refusals: std::sync::atomic::AtomicU64,
    /// Agent sessions refused at their start, by reason (since start).
    pub session_refusals: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Enrollments refused, by reason (since start).
    pub enrollment_refusals: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub enrollment_limiter: EnrollmentLimiter,
    /// Client certificates refused during TLS handshakes on the agent endpoint, by reason.
    pub handshake_refusals: NamedCounts,
    /// TLS configurations of the API and the agent endpoint, rebuilt when CAs rotate.
    pub tls: TlsConfigs,
    /// Live changes for `/api/v1/events` (server-sent events). Lagging subscribers lose
    /// events, never the plane: the database stays the record.
    pub events: tokio::sync::broadcast::Sender<PlaneEvent>,
    /// Wakes the workflow runner when something it waits on may have changed.
    pub runner_wake: tokio::sync::Notify,
    /// Inventory reports waiting for drift evaluation.
    pub drift: crate::drift::DriftQueue,
}

/// Something changed: `kind` (promotion, deployment, workflow_run, drift) and the id of the
/// thing. The kind is owned when the event came from another replica.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlaneEvent {
    pub kind: std::borrow::Cow<'static, str>,
    pub id: String,
    /// The promotion the change belongs to, when there is one (for filtering).
    pub promotion: Option<String>,
    pub at: String,
}

#[derive(Default)]
pub struct TlsConfigs {
    api: std::sync::RwLock<Option<std::sync::Arc<rustls::ServerConfig>>>,
    agent: std::sync::RwLock<Option<std::sync::Arc<rustls::ServerConfig>>>,
}

impl TlsConfigs {
    /// Builds both configurations from the current server certificate and trusted CAs.
    pub fn rebuild(
        &self,
        keys: &crate::keys::PlaneKeys,
        refusals: &NamedCounts,
    ) -> Result<(), stella_pki::PkiError> {
        let server = keys.server();
        let cas = keys.cas().trusted_pem();
        let api = stella_pki::server_config(&server.cert_pem, &server.key_pem, &cas)?;
        let counts = refusals.clone();
        let mut agent = stella_pki::server_config_mtls_observed(
            &server.cert_pem,
            &server.key_pem,
            &cas,
            std::sync::Arc::new(move |reason| count(&counts, reason)),
        )?;
        agent.alpn_protocols = vec![b"h2".to_vec()];
        *self.api.write().unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(api));
        *self.agent.write().unwrap_or_else(|p| p.into_inner()) = Some(std::sync::Arc::new(agent));
        Ok(())
    }

    fn get(
        lock: &std::sync::RwLock<Option<std::sync::Arc<rustls::ServerConfig>>>,
    ) -> std::sync::Arc<rustls::ServerConfig> {
        lock.read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| std::sync::Arc::new(unconfigured()))
    }

    pub fn api(&self) -> std::sync::Arc<rustls::ServerConfig> {
        Self::get(&self.api)
    }

    pub fn agent(&self) -> std::sync::Arc<rustls::ServerConfig> {
        Self::get(&self.agent)
    }
}

/// A configuration that completes no handshake: used only if a listener runs before `rebuild`.
fn unconfigured() -> rustls::ServerConfig {
    #[derive(Debug)]
    struct NoCert;
    impl rustls::server::ResolvesServerCert for NoCert {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
    rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.with_no_client_auth()
            .with_cert_resolver(std::sync::Arc::new(NoCert))
    })
    .unwrap_or_else(|_| {
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(std::sync::Arc::new(NoCert))
    })
}

/// Counts by name (refusal reasons, signals), shared with code that runs outside request
/// handlers (TLS verifiers, the replicas' listener).
pub type NamedCounts =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>>;

/// A snapshot of `counts`, by name.
pub fn counts(counts: &NamedCounts) -> Vec<(&'static str, u64)> {
    counts
        .lock()
        .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
        .unwrap_or_default()
}

pub fn count(counts: &NamedCounts, reason: &'static str) {
    if let Ok(mut m) = counts.lock() {
        *m.entry(reason).or_default() += 1;
    }
}

/// Failed enrollments per source address, to slow down token guessing.
#[derive(Default)]
pub struct EnrollmentLimiter {
    windows: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (i64, u32)>>,
}

impl EnrollmentLimiter {
    pub const WINDOW_MS: i64 = 60_000;
    pub const MAX_FAILURES: u32 = 10;

    /// Seconds to wait when `ip` used up its failures in the current window.
    pub fn blocked_for(&self, ip: std::net::IpAddr, now_ms: i64) -> Option<i64> {
        let windows = self.windows.lock().ok()?;
        let (start, failures) = windows.get(&ip)?;
        (now_ms - start < Self::WINDOW_MS && *failures >= Self::MAX_FAILURES)
            .then(|| (Self::WINDOW_MS - (now_ms - start) + 999) / 1000)
    }

    pub fn record_failure(&self, ip: std::net::IpAddr, now_ms: i64) {
        if let Ok(mut windows) = self.windows.lock() {
            // Old windows go, so the map stays as small as the set of recent offenders.
            windows.retain(|_, (start, _)| now_ms - *start < Self::WINDOW_MS);
            let entry = windows.entry(ip).or_insert((now_ms, 0));
            entry.1 = entry.1.saturating_add(1);
        }
    }
}

impl AppState {
    pub fn publish_event(&self, kind: &'static str, id: &str) {
        self.publish(PlaneEvent {
            kind: kind.into(),
            id: id.to_string(),
            promotion: (kind == "promotion").then(|| id.to_string()),
            at: crate::store::rfc3339(crate::store::now_ms()),
        });
    }

    /// Publishes `event` to this replica's subscribers and the other replicas'.
    pub fn publish(&self, event: PlaneEvent) {
        self.replica.signal(crate::replicas::event_signal(&event));
        self.publish_local(event);
    }

    pub fn publish_local(&self, event: PlaneEvent) {
        // No subscriber is not an error: events are a convenience over the database.
        let _ = self.events.send(event);
    }

    pub fn count_enrollment_refusal(&self, reason: &'static str) {
        if let Ok(mut m) = self.enrollment_refusals.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn count_session_refusal(&self, reason: &'static str) {
        if let Ok(mut m) = self.session_refusals.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }
}

pub type SharedState = Arc<AppState>;
