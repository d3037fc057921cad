//! `stella-agent relay`: carries downstream ("leaf") agents' sessions to the plane over the
//! relay's own session, and stores and forwards both ways while the uplink is down.
//!
//! The relay is an enrolled agent (join token labelled `role=relay`). Towards its leaves it is
//! their peer (`server.rs`): it terminates their mTLS sessions (client certificates from the
//! plane's CA; its server certificate is signed by the plane for its `--listen` names), answers
//! heartbeats, keeps results durably before it acknowledges them, and hands out signed jobs it
//! holds for them. Towards the plane (`uplink` below) it opens one *virtual session* per known
//! leaf inside its own session (`RelayedAgentMessage`), replaying the leaf's hello and
//! certificate; the plane runs its ordinary session code for each, so receipts are verified
//! against the leaf's own certificates and a relay can neither forge a result nor a job.
//! Chaining needs nothing more: a relay behind a relay is a leaf whose messages happen to carry
//! relayed frames.

pub mod airgap;
pub mod quic;
pub mod server;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use prost::Message as _;
use stella_proto::agent_message::Body as AgentBody;
use stella_proto::plane_message::Body as PlaneBody;
use stella_proto::{
    AgentMessage, Heartbeat, Hello, PlaneMessage, RelayCertRequest, RelayedAgentMessage,
    RelayedPlaneMessage, Welcome,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::config::{AgentConfig, DataDir};
use crate::identity;
use crate::transport::{self, LinkError};
use store::{LeafRecord, Store};

/// How long a leaf's connect waits for the plane's welcome through the uplink before the relay
/// answers it from what it knows.
const WELCOME_WAIT: Duration = Duration::from_secs(5);
/// A virtual session the plane closed (or never answered) is opened again after this long.
const REOPEN_AFTER: Duration = Duration::from_secs(3);
/// The plane refused the leaf: try again much later (a revoked agent stays revoked).
const REOPEN_AFTER_REFUSAL: Duration = Duration::from_secs(60);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Capability a relay announces in its own hello.
pub const RELAY_CAPABILITY: &str = "relay";

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Where leaves connect (`host:port`).
    pub listen: std::net::SocketAddr,
    /// The plane's agent endpoint, or an upstream relay's; default: the one from enrollment.
    pub upstream: Option<String>,
    /// Names (DNS or IP) the relay's server certificate must carry; default: the listen address.
    pub names: Vec<String>,
    /// Where leaves holding `quic://` endpoints connect (UDP), if anywhere.
    pub quic_listen: Option<std::net::SocketAddr>,
    /// The URL leaves are told to dial after enrolling through this relay.
    pub advertise: Option<String>,
    /// Disk budget of the store (results, inventory, offers).
    pub max_backlog_bytes: u64,
}

/// Where a leaf's virtual session stands on the current uplink.
struct VirtualSession {
    link: u64,
    open: bool,
    /// When to try again if it is not open.
    retry_at: tokio::time::Instant,
}

/// Told the plane's answer to a virtual session's hello: its welcome, or why it refused.
type WelcomeWaiter = oneshot::Sender<Result<Welcome, String>>;

/// A leaf connected to this relay right now.
struct LeafConn {
    conn: u64,
    tx: mpsc::Sender<PlaneMessage>,
    /// Closing a leaf's connection (the plane refused it; the uplink of a relay-leaf broke).
    kick: Arc<Notify>,
    is_relay: bool,
}

pub struct Relay {
    pub dir: DataDir,
    pub config: AgentConfig,
    pub store: Store,
    pub options: RelayOptions,
    upstream: String,
    uplink: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    uplink_up: AtomicBool,
    virtual_sessions: Mutex<HashMap<String, VirtualSession>>,
    leaves: Mutex<HashMap<String, LeafConn>>,
    welcome_waiters: Mutex<HashMap<String, Vec<WelcomeWaiter>>>,
    next_link: AtomicU64,
    /// The downstream TLS configuration, replaced when a new server certificate arrives.
    tls: Mutex<Option<Arc<rustls::ServerConfig>>>,
    tls_ready: Notify,
    /// Dropped inventory/progress reports (store full), for the metrics.
    pub dropped: AtomicU64,
    /// Results not acknowledged to a leaf because the store was full.
    pub refused_results: AtomicU64,
    /// A new CA is being rolled out: renew the relay's own certificate under it.
    renew_now: AtomicBool,
    /// Leaves with results the store had no room for (left in their spools).
    owing: Mutex<std::collections::HashSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn msg(body: AgentBody) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Relay {
    pub fn new(dir: DataDir, options: RelayOptions) -> anyhow::Result<Arc<Self>> {
        let config = dir.load_config()?;
        let store = Store::open(dir.root.join("relay"), options.max_backlog_bytes)?;
        let upstream = options
            .upstream
            .clone()
            .unwrap_or_else(|| config.agent_endpoint.clone());
        transport::EndpointUrl::parse(&upstream)?;
        Ok(Arc::new(Self {
            dir,
            config,
            store,
            options,
            upstream,
            uplink: Mutex::new(None),
            uplink_up: AtomicBool::new(false),
            virtual_sessions: Mutex::new(HashMap::new()),
            leaves: Mutex::new(HashMap::new()),
            welcome_waiters: Mutex::new(HashMap::new()),
            next_link: AtomicU64::new(1),
            tls: Mutex::new(None),
            tls_ready: Notify::new(),
            dropped: AtomicU64::new(0),
            refused_results: AtomicU64::new(0),
            renew_now: AtomicBool::new(false),
            owing: Mutex::new(Default::default()),
        }))
    }

    pub fn uplink_up(&self) -> bool {
        self.uplink_up.load(Ordering::Relaxed)
    }

    /// The URL leaves enrolled through this relay are told to dial.
    pub fn advertised_url(&self) -> String {
        self.options
            .advertise
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.options.listen))
    }

    /// Names for the server certificate.
    fn server_names(&self) -> Vec<String> {
        if self.options.names.is_empty() {
            vec![self.options.listen.ip().to_string()]
        } else {
            self.options.names.clone()
        }
    }

    fn send_up(&self, message: AgentMessage) -> bool {
        let tx = lock(&self.uplink).clone();
        match tx {
            Some(tx) => tx.try_send(message).is_ok(),
            None => false,
        }
    }

    fn relayed(
        &self,
        agent_id: &str,
        link: u64,
        cert: &[u8],
        message: &AgentMessage,
    ) -> AgentMessage {
        msg(AgentBody::Relayed(RelayedAgentMessage {
            agent_id: agent_id.to_string(),
            leaf_cert_der: cert.to_vec(),
            agent_message: message.encode_to_vec(),
            close: false,
            link,
        }))
    }

    /// Sends a leaf's message into its open virtual session; false when there is none.
    pub fn forward(&self, agent_id: &str, message: &AgentMessage) -> bool {
        let link = lock(&self.virtual_sessions)
            .get(agent_id)
            .filter(|vs| vs.open)
            .map(|vs| vs.link);
        match link {
            Some(link) => self.send_up(self.relayed(agent_id, link, &[], message)),
            None => false,
        }
    }

    /// Opens (or re-opens) a leaf's virtual session with its stored hello; returns a receiver
    /// for the plane's answer when the uplink is up.
    fn open_virtual(&self, agent_id: &str) -> Option<oneshot::Receiver<Result<Welcome, String>>> {
        if !self.uplink_up() {
            return None;
        }
        // Records made by `relay import` for leaves never seen have no certificate yet.
        // A leaf that moved elsewhere is opened again only when it connects here (which clears
        // the mark before calling this).
        let record = self
            .store
            .leaf(agent_id)
            .filter(|r| !r.cert_der.is_empty() && !r.moved_away)?;
        let hello = AgentMessage::decode(record.hello.as_slice())
            .ok()
            .filter(|m| matches!(m.body, Some(AgentBody::Hello(_))))?;
        let link = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.welcome_waiters)
            .entry(agent_id.to_string())
            .or_default()
            .push(tx);
        lock(&self.virtual_sessions).insert(
            agent_id.to_string(),
            VirtualSession {
                link,
                open: false,
                retry_at: tokio::time::Instant::now() + REOPEN_AFTER,
            },
        );
        if !self.send_up(self.relayed(agent_id, link, &record.cert_der, &hello)) {
            return None;
        }
        Some(rx)
    }

    /// A leaf connected (or reconnected): registers it and returns what to welcome it with.
    pub async fn leaf_connected(
        &self,
        record: LeafRecord,
        is_relay: bool,
    ) -> Result<(Welcome, u64, mpsc::Receiver<PlaneMessage>, Arc<Notify>), String> {
        let agent_id = record.agent_id.clone();
        let cached = self
            .store
            .leaf(&agent_id)
            .map(|r| r.welcome)
            .unwrap_or_default();
        let mut record = record;
        record.welcome = cached;
        record.moved_away = false;
        if let Err(e) = self.store.put_leaf(&record) {
            tracing::warn!(agent_id, error = %e, "cannot store the leaf's record");
        }
        let mut welcome = None;
        if let Some(answer) = self.open_virtual(&agent_id) {
            match tokio::time::timeout(WELCOME_WAIT, answer).await {
                Ok(Ok(Ok(w))) => welcome = Some(w),
                Ok(Ok(Err(refusal))) => return Err(refusal),
                _ => tracing::info!(
                    agent_id,
                    "no welcome from the plane in time; answering from the relay's store"
                ),
            }
        }
        let welcome = welcome.unwrap_or_else(|| self.offline_welcome(&agent_id));
        let (tx, rx) = mpsc::channel(64);
        let kick = Arc::new(Notify::new());
        let conn = self.next_link.fetch_add(1, Ordering::Relaxed);
        lock(&self.leaves).insert(
            agent_id,
            LeafConn {
                conn,
                tx,
                kick: kick.clone(),
                is_relay,
            },
        );
        Ok((welcome, conn, rx, kick))
    }

    pub fn leaf_disconnected(&self, agent_id: &str, conn: u64) {
        let mut leaves = lock(&self.leaves);
        if leaves.get(agent_id).is_some_and(|c| c.conn == conn) {
            leaves.remove(agent_id);
        }
    }

    /// The plane's last welcome for the leaf, or a minimal one (no targets: the leaf keeps the
    /// ones it knows; jobs name their targets themselves).
    fn offline_welcome(&self, agent_id: &str) -> Welcome {
        let cached = self
            .store
            .leaf(agent_id)
            .and_then(|r| PlaneMessage::decode(r.welcome.as_slice()).ok())
            .and_then(|m| match m.body {
                Some(PlaneBody::Welcome(w)) => Some(w),
                _ => None,
            });
        let mut welcome = cached.unwrap_or_else(|| Welcome {
            agent_id: agent_id.to_string(),
            heartbeat_interval_ms: DEFAULT_HEARTBEAT.as_millis() as i64,
            ..Default::default()
        });
        welcome.server_time_unix_ms = now_ms();
        welcome.answers_heartbeats = true;
        welcome
    }

    fn to_leaf(&self, agent_id: &str, message: PlaneMessage) {
        let tx = lock(&self.leaves).get(agent_id).map(|c| c.tx.clone());
        if let Some(tx) = tx
            && tx.try_send(message).is_err()
        {
            tracing::debug!(
                agent_id,
                "leaf connection busy or gone; message left to the store"
            );
        }
    }

    /// A result of this leaf could not be stored: it stays in the leaf's spool.
    pub fn owes_results(&self, agent_id: &str) {
        lock(&self.owing).insert(agent_id.to_string());
    }

    fn kick_leaf(&self, agent_id: &str) {
        if let Some(conn) = lock(&self.leaves).get(agent_id) {
            conn.kick.notify_one();
        }
    }

    /// Sends everything the store holds for a leaf into its (just opened) virtual session.
    fn flush(&self, agent_id: &str) {
        for pending in self.store.outbox(agent_id) {
            if !self.forward(agent_id, &pending.message) {
                return;
            }
            if !pending.is_result {
                // Sent once: the plane does not acknowledge these.
                self.store.remove(&pending.path);
            }
        }
    }

    /// One frame of a virtual session from the plane.
    fn plane_frame(&self, frame: RelayedPlaneMessage) {
        let agent_id = frame.agent_id.clone();
        let current = lock(&self.virtual_sessions)
            .get(&agent_id)
            .is_some_and(|vs| vs.link == frame.link);
        if !current {
            return;
        }
        if frame.closed {
            let wait = if frame.refused {
                REOPEN_AFTER_REFUSAL
            } else {
                REOPEN_AFTER
            };
            if let Some(vs) = lock(&self.virtual_sessions).get_mut(&agent_id) {
                vs.open = false;
                // A drain that came first (admission control) may ask for longer.
                vs.retry_at = vs.retry_at.max(tokio::time::Instant::now() + wait);
            }
            let reason = if frame.reason.is_empty() {
                "the plane closed the session".to_string()
            } else {
                frame.reason.clone()
            };
            for waiter in lock(&self.welcome_waiters)
                .remove(&agent_id)
                .unwrap_or_default()
            {
                let _ = waiter.send(Err(reason.clone()));
            }
            if frame.refused {
                tracing::warn!(
                    agent_id,
                    reason,
                    "the plane refuses this agent; closing its connection"
                );
                self.kick_leaf(&agent_id);
            } else if frame.replaced {
                // Opening it again would take the agent's session from wherever it is now.
                tracing::info!(
                    agent_id,
                    "the agent's session moved elsewhere; not carrying it until it connects here again"
                );
                if let Some(mut record) = self.store.leaf(&agent_id) {
                    record.moved_away = true;
                    if let Err(e) = self.store.put_leaf(&record) {
                        tracing::warn!(agent_id, error = %e, "cannot store the leaf's record");
                    }
                }
                self.kick_leaf(&agent_id);
            } else {
                tracing::info!(agent_id, reason, "virtual session closed by the plane");
            }
            return;
        }
        let message = match PlaneMessage::decode(frame.plane_message.as_slice()) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(agent_id, error = %e, "undecodable frame from the plane ignored");
                return;
            }
        };
        match message.body {
            Some(PlaneBody::Welcome(welcome)) => {
                if let Some(mut record) = self.store.leaf(&agent_id) {
                    record.welcome = PlaneMessage {
                        body: Some(PlaneBody::Welcome(welcome.clone())),
                    }
                    .encode_to_vec();
                    if let Err(e) = self.store.put_leaf(&record) {
                        tracing::warn!(agent_id, error = %e, "cannot store the leaf's welcome");
                    }
                }
                if let Some(vs) = lock(&self.virtual_sessions).get_mut(&agent_id) {
                    vs.open = true;
                }
                for waiter in lock(&self.welcome_waiters)
                    .remove(&agent_id)
                    .unwrap_or_default()
                {
                    let _ = waiter.send(Ok(welcome.clone()));
                }
                tracing::info!(agent_id, "virtual session open");
                self.flush(&agent_id);
                if lock(&self.owing).remove(&agent_id) {
                    // Results the store had no room for are still in the leaf's spool, which
                    // it re-sends on a new session: give it one, now that they can go through.
                    tracing::info!(
                        agent_id,
                        "asking the agent to reconnect and re-send the results the relay could not store"
                    );
                    self.kick_leaf(&agent_id);
                }
            }
            Some(PlaneBody::Offer(offer)) => {
                match self.store.put_offer(&agent_id, &offer) {
                    Ok(_) => {}
                    Err(e) => {
                        // Not lost: the plane offers it again on the next virtual session.
                        tracing::warn!(agent_id, job_id = %offer.job_id, error = %e, "offer not stored");
                    }
                }
                self.to_leaf(
                    &agent_id,
                    PlaneMessage {
                        body: Some(PlaneBody::Offer(offer)),
                    },
                );
            }
            Some(PlaneBody::ResultAck(ack)) => {
                // The plane has it committed: only now may the relay forget it. The leaf gets
                // the acknowledgement too, for a result the relay had no room to store (it
                // stayed in the leaf's spool); for the others it is a harmless repeat.
                self.store.remove_result(&agent_id, &ack.job_id);
                self.to_leaf(
                    &agent_id,
                    PlaneMessage {
                        body: Some(PlaneBody::ResultAck(ack)),
                    },
                );
            }
            // Drains are for the virtual session (admission control, shutdown), not for the
            // leaf's connection: the relay opens it again after the delay the plane asked for.
            Some(PlaneBody::Drain(drain)) => {
                let delay = Duration::from_millis(u64::from(drain.reconnect_after_ms));
                if let Some(vs) = lock(&self.virtual_sessions).get_mut(&agent_id) {
                    vs.open = false;
                    vs.retry_at = tokio::time::Instant::now() + delay.max(REOPEN_AFTER);
                }
            }
            // The relay answers the leaf's heartbeats itself.
            Some(PlaneBody::Heartbeat(_)) | None => {}
            Some(body) => self.to_leaf(&agent_id, PlaneMessage { body: Some(body) }),
        }
    }

    /// The uplink is gone: every virtual session with it.
    fn uplink_lost(&self) {
        self.uplink_up.store(false, Ordering::Relaxed);
        *lock(&self.uplink) = None;
        lock(&self.virtual_sessions).clear();
        for (_, waiters) in lock(&self.welcome_waiters).drain() {
            for w in waiters {
                let _ = w.send(Err("the relay lost its uplink".to_string()));
            }
        }
        // A relay behind this one believes its uplink works as long as it is connected here:
        // disconnect it, so it stores and forwards on its own until this uplink is back.
        for conn in lock(&self.leaves).values() {
            if conn.is_relay {
                conn.kick.notify_one();
            }
        }
    }

    /// The TLS configuration for leaves, once the relay holds a server certificate.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        lock(&self.tls).clone()
    }

    pub async fn wait_tls(&self) -> Arc<rustls::ServerConfig> {
        loop {
            let notified = self.tls_ready.notified();
            if let Some(tls) = self.tls() {
                return tls;
            }
            notified.await;
        }
    }

    fn load_tls(&self) -> anyhow::Result<()> {
        let cert_pem = std::fs::read_to_string(self.store.server_cert_file())?;
        let key_pem = std::fs::read_to_string(self.store.server_key_file())?;
        let ca_pem = self.dir.read_text(&self.dir.ca_file())?;
        let config = server::tls_config(&cert_pem, &key_pem, &ca_pem)?;
        *lock(&self.tls) = Some(Arc::new(config));
        self.tls_ready.notify_waiters();
        Ok(())
    }

    /// Whether the stored server certificate is missing, for other names, or past two thirds
    /// of its life.
    fn server_cert_due(&self) -> bool {
        let Ok(pem) = std::fs::read_to_string(self.store.server_cert_file()) else {
            return true;
        };
        let Ok(der) = stella_pki::cert_der_from_pem(&pem) else {
            return true;
        };
        let Some((not_before, not_after)) = stella_pki::cert_validity(&der) else {
            return true;
        };
        let names_file = self.store.root().join("server.names");
        let names = std::fs::read_to_string(names_file).unwrap_or_default();
        let now = now_ms() / 1000;
        names.trim() != self.server_names().join(",")
            || now >= not_before + (not_after - not_before) * 2 / 3
    }
}

/// Runs the relay until `shutdown`: the downstream listener and the uplink loop.
pub async fn run(
    dir: DataDir,
    options: RelayOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let relay = Relay::new(dir, options)?;
    if let Err(e) = relay.load_tls() {
        tracing::info!(error = %format!("{e:#}"), "no server certificate yet; leaves can connect once the uplink has fetched one");
    }
    if let Some(url) = &relay.options.advertise {
        crate::transport::EndpointUrl::parse(url).with_context(|| format!("--advertise {url}"))?;
    }
    let listener = tokio::net::TcpListener::bind(relay.options.listen)
        .await
        .with_context(|| format!("listening on {}", relay.options.listen))?;
    let quic = relay.options.quic_listen.map(quic::bind).transpose()?;
    tracing::info!(listen = %relay.options.listen, quic_listen = ?relay.options.quic_listen, upstream = %relay.upstream, agent_id = %relay.config.agent_id, "relay starting");
    let server = tokio::spawn(server::serve(relay.clone(), listener));
    let quic_server = quic.map(|endpoint| tokio::spawn(quic::serve(relay.clone(), endpoint)));
    let uplink = tokio::spawn(uplink_loop(relay.clone()));
    shutdown.await;
    tracing::info!("relay stopping");
    server.abort();
    if let Some(quic_server) = quic_server {
        quic_server.abort();
    }
    uplink.abort();
    Ok(())
}

async fn uplink_loop(relay: Arc<Relay>) {
    let mut attempt: u32 = 0;
    loop {
        let delay = match uplink_session(&relay).await {
            Ok(UplinkEnd::Drained(delay)) => {
                attempt = 0;
                delay
            }
            Ok(UplinkEnd::Refused(why)) => {
                tracing::error!(reason = %why, "the plane refuses this relay");
                Duration::from_secs(30)
            }
            Ok(UplinkEnd::Closed) => {
                attempt = 0;
                crate::runtime::backoff(attempt)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "uplink failed; storing and forwarding until it is back");
                crate::runtime::backoff(attempt)
            }
        };
        relay.uplink_lost();
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

enum UplinkEnd {
    Drained(Duration),
    Refused(String),
    Closed,
}

async fn uplink_session(relay: &Arc<Relay>) -> anyhow::Result<UplinkEnd> {
    let ca_pem = relay.dir.read_text(&relay.dir.ca_file())?;
    let mut ident = identity::load(&relay.dir)?;
    if ident.expired(now_ms() / 1000) {
        let cfg = &relay.config;
        identity::renew_offline(
            &relay.dir,
            &cfg.agent_id,
            &cfg.trust_domain,
            &cfg.api_url,
            &ca_pem,
            &ident,
        )
        .await?;
        ident = identity::load(&relay.dir)?;
    }
    let hello = msg(AgentBody::Hello(Hello {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: vec![RELAY_CAPABILITY.to_string()],
        labels: relay.config.labels.clone().into_iter().collect(),
        in_flight_job_ids: Vec::new(),
        last_sequence: 0,
        hostname: crate::enroll::hostname(),
        trust_bundle_version: relay.dir.load_trust_version(),
    }));
    let mut link = match transport::open(&relay.upstream, &ca_pem, &ident, hello).await {
        Ok(link) => link,
        Err(LinkError::Refused(why)) => return Ok(UplinkEnd::Refused(why)),
        Err(LinkError::Broken(e)) => return Err(e),
    };
    let welcome = match tokio::time::timeout(Duration::from_secs(15), link.inbound.next()).await {
        Err(_) => anyhow::bail!("no welcome from upstream within 15s"),
        Ok(Some(Err(LinkError::Refused(why)))) => return Ok(UplinkEnd::Refused(why)),
        Ok(Some(Err(LinkError::Broken(e)))) => return Err(e),
        Ok(None) => return Ok(UplinkEnd::Closed),
        Ok(Some(Ok(m))) => match m.body {
            Some(PlaneBody::Welcome(w)) => w,
            Some(PlaneBody::Drain(d)) => {
                return Ok(UplinkEnd::Drained(Duration::from_millis(u64::from(
                    d.reconnect_after_ms,
                ))));
            }
            _ => anyhow::bail!("upstream did not start with a welcome"),
        },
    };
    let heartbeat_every = u64::try_from(welcome.heartbeat_interval_ms)
        .ok()
        .filter(|ms| *ms >= 100)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_HEARTBEAT);
    let silence_limit = heartbeat_every * 3;
    *lock(&relay.uplink) = Some(link.outbound.clone());
    relay.uplink_up.store(true, Ordering::Relaxed);
    tracing::info!(upstream = %relay.upstream, "uplink established");

    if !welcome.trust_bundle.is_empty()
        && let Some(version) = apply_trust_bundle(relay, &welcome.trust_bundle)
    {
        link.outbound.send(trust_ack(version)).await?;
    }
    let mut cert_pending = false;
    if relay.server_cert_due() {
        request_server_cert(relay, &link.outbound).await?;
        cert_pending = true;
    }
    // In-band renewal of the relay's own certificate, as an agent does; refused when this
    // relay is itself behind a relay, then it renews over the API once the certificate lapses.
    let mut renewal_pending = false;
    let mut next_renewal_try = tokio::time::Instant::now();
    for record in relay.store.leaves() {
        relay.open_virtual(&record.agent_id);
    }

    let mut tick = tokio::time::interval(heartbeat_every);
    tick.tick().await;
    // Forwarding never waits for a slow uplink (a full queue drops the copy, the store keeps
    // the original), so what the plane has not acknowledged is sent again now and then.
    let resend_every =
        (RESEND_UNACKNOWLEDGED.as_millis() / heartbeat_every.as_millis().max(1)).max(1);
    let mut ticks: u128 = 0;
    let mut last_heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            incoming = link.inbound.next() => {
                let incoming = match incoming {
                    None => return Ok(UplinkEnd::Closed),
                    Some(Err(LinkError::Refused(why))) => return Ok(UplinkEnd::Refused(why)),
                    Some(Err(LinkError::Broken(e))) => return Err(e.context("uplink stream")),
                    Some(Ok(m)) => m,
                };
                last_heard = tokio::time::Instant::now();
                match incoming.body {
                    Some(PlaneBody::Relayed(frame)) => relay.plane_frame(frame),
                    Some(PlaneBody::RelayCert(answer)) if cert_pending => {
                        cert_pending = false;
                        if let Err(e) = install_server_cert(relay, &answer) {
                            tracing::error!(error = %format!("{e:#}"), "no server certificate for the relay; leaves cannot connect");
                        }
                    }
                    Some(PlaneBody::Drain(d)) => {
                        return Ok(UplinkEnd::Drained(Duration::from_millis(u64::from(d.reconnect_after_ms))));
                    }
                    Some(PlaneBody::Offer(offer)) => {
                        tracing::warn!(job_id = %offer.job_id, "a job for the relay itself ignored: relays run no jobs");
                    }
                    Some(PlaneBody::Trust(update)) => {
                        if let Some(version) = apply_trust_bundle(relay, &update.bundle) {
                            link.outbound.send(trust_ack(version)).await?;
                        }
                    }
                    Some(PlaneBody::Renewed(answer)) if renewal_pending => {
                        renewal_pending = false;
                        if !answer.error.is_empty() {
                            tracing::warn!(error = %answer.error, "in-band renewal of the relay's certificate refused; retrying later");
                            next_renewal_try = tokio::time::Instant::now() + RENEWAL_RETRY;
                            continue;
                        }
                        let cfg = &relay.config;
                        identity::install_renewed(&relay.dir, &cfg.agent_id, &cfg.trust_domain, &answer.cert_pem)?;
                        tracing::info!("relay certificate renewed in-band; reconnecting with it");
                        return Ok(UplinkEnd::Closed);
                    }
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(last_heard + silence_limit) => {
                anyhow::bail!("no message from upstream for {silence_limit:?}; reconnecting");
            }
            _ = tick.tick() => {
                let beat = msg(AgentBody::Heartbeat(Heartbeat { sent_at_unix_ms: now_ms() }));
                // Never wait on a full queue here: a black-holed uplink fills it, and this loop
                // must stay free to notice the silence.
                if let Err(mpsc::error::TrySendError::Closed(_)) = link.outbound.try_send(beat.clone()) {
                    anyhow::bail!("uplink stream closed");
                }
                if !cert_pending && relay.server_cert_due() {
                    request_server_cert(relay, &link.outbound).await?;
                    cert_pending = true;
                }
                let renew_now = relay.renew_now.load(Ordering::Relaxed);
                if !renewal_pending
                    && tokio::time::Instant::now() >= next_renewal_try
                    && (ident.renewal_due(now_ms() / 1000) || renew_now)
                {
                    let csr_pem = identity::stage_new_key(&relay.dir, &relay.config.agent_id)?;
                    link.outbound.send(msg(AgentBody::Renew(stella_proto::RenewRequest { csr_pem }))).await?;
                    relay.renew_now.store(false, Ordering::Relaxed);
                    renewal_pending = true;
                }
                let now = tokio::time::Instant::now();
                let (open, due): (Vec<String>, Vec<String>) = {
                    let sessions = lock(&relay.virtual_sessions);
                    let open = sessions.iter().filter(|(_, vs)| vs.open).map(|(id, _)| id.clone()).collect();
                    let known: Vec<String> = relay.store.leaves().into_iter().map(|r| r.agent_id).collect();
                    let due = known.into_iter().filter(|id| sessions.get(id).is_none_or(|vs| !vs.open && vs.retry_at <= now)).collect();
                    (open, due)
                };
                // The plane's silence limit applies to each virtual session too.
                ticks += 1;
                for agent_id in open {
                    relay.forward(&agent_id, &beat);
                    if ticks.is_multiple_of(resend_every) {
                        relay.flush(&agent_id);
                    }
                }
                for agent_id in due {
                    relay.open_virtual(&agent_id);
                }
            }
        }
    }
}

/// Results the plane has not acknowledged this long after they were sent are sent again.
const RESEND_UNACKNOWLEDGED: Duration = Duration::from_secs(30);

/// How long the relay waits after a refused in-band renewal of its own certificate.
const RENEWAL_RETRY: Duration = Duration::from_secs(600);

fn trust_ack(version: u64) -> AgentMessage {
    msg(AgentBody::TrustAck(stella_proto::TrustBundleAck {
        version,
    }))
}

/// Adopts a newer trust bundle signed by a key the relay already trusts (job-key or CA
/// rotation), as an agent does: `relay import` verifies files with these keys, and leaves'
/// certificates are checked against these CAs. Returns the version to acknowledge.
fn apply_trust_bundle(relay: &Relay, bundle: &[u8]) -> Option<u64> {
    let current = relay.dir.load_trust_version();
    let envelope: stella_pki::Envelope = serde_json::from_slice(bundle).ok()?;
    let trusted = relay.dir.load_trust().ok()?;
    match stella_pki::verify_bundle(&trusted, current, &envelope) {
        Ok(doc) => {
            let keys = stella_pki::TrustedKeys {
                keys: doc.job_signing_keys,
            };
            let written =
                crate::config::write_json(&relay.dir.trust_file(), &keys).and_then(|()| {
                    crate::config::write_atomic(
                        &relay.dir.trust_version_file(),
                        doc.version.to_string().as_bytes(),
                    )
                });
            if let Err(e) = written {
                tracing::error!(error = %e, "cannot store the trust bundle");
                return None;
            }
            if let Some(newest) = doc.ca_pems.last() {
                let all: String = doc.ca_pems.concat();
                if let Err(e) = crate::config::write_atomic(&relay.dir.ca_file(), all.as_bytes()) {
                    tracing::error!(error = %e, "cannot store the CA certificates");
                    return None;
                }
                if let Err(e) = relay.load_tls() {
                    tracing::warn!(error = %format!("{e:#}"), "cannot reload the downstream TLS configuration");
                }
                let ours = identity::load(&relay.dir).ok()?;
                if !stella_pki::issued_by(&ours.cert_der, newest) {
                    tracing::info!(
                        "a new CA is being rolled out; renewing the relay's certificates under it"
                    );
                    relay.renew_now.store(true, Ordering::Relaxed);
                    let _ = std::fs::remove_file(relay.store.root().join("server.names"));
                }
            }
            tracing::info!(version = doc.version, "trust bundle updated");
            Some(doc.version)
        }
        Err(stella_pki::BundleError::Stale { .. }) => Some(current),
        Err(e) => {
            tracing::error!(error = %e, "trust bundle refused; keeping the keys pinned so far");
            None
        }
    }
}

async fn request_server_cert(
    relay: &Relay,
    uplink: &mpsc::Sender<AgentMessage>,
) -> anyhow::Result<()> {
    let (key_pem, csr_pem) = stella_pki::generate_key_and_csr(&relay.config.agent_id)?;
    let staged = relay.store.root().join("server.next.key");
    stella_pki::write_secret_file(&staged, key_pem.as_bytes())
        .with_context(|| format!("writing {}", staged.display()))?;
    uplink
        .send(msg(AgentBody::RelayCert(RelayCertRequest {
            csr_pem,
            names: relay.server_names(),
        })))
        .await?;
    Ok(())
}

fn install_server_cert(
    relay: &Relay,
    answer: &stella_proto::RelayCertResponse,
) -> anyhow::Result<()> {
    if !answer.error.is_empty() {
        anyhow::bail!(
            "the plane refused the relay's server certificate: {}",
            answer.error
        );
    }
    let staged = relay.store.root().join("server.next.key");
    let key_pem = std::fs::read_to_string(&staged).context("no staged server key")?;
    let der = stella_pki::cert_der_from_pem(&answer.cert_pem)?;
    if !stella_pki::cert_matches_key(&der, &key_pem) {
        anyhow::bail!("the server certificate is not for the relay's key");
    }
    stella_pki::write_secret_file(&relay.store.server_key_file(), key_pem.as_bytes())?;
    crate::config::write_atomic(&relay.store.server_cert_file(), answer.cert_pem.as_bytes())?;
    crate::config::write_atomic(
        &relay.store.root().join("server.names"),
        relay.server_names().join(",").as_bytes(),
    )?;
    let _ = std::fs::remove_file(staged);
    relay.load_tls()?;
    tracing::info!(names = ?relay.server_names(), "relay server certificate installed");
    Ok(())
}
