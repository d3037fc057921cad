//! The agent endpoint: one bidirectional stream per agent, over mTLS — a gRPC stream (this
//! module's `AgentSession` service) or a QUIC stream (`quic.rs`). Both transports hand the same
//! core (`open`, `serve_opened`) a stream of `AgentMessage`, a sink of `PlaneMessage` and the
//! verified client certificate, so every line of protocol behaviour is shared.
//!
//! The agent's identity comes from its client certificate alone (the SPIFFE URI SAN); nothing a
//! message says can change whose session it is. Jobs are pushed down the open stream as soon as
//! they are created (the hub wakes the session), and re-offered after a reconnect until the agent
//! reports an outcome. Results are persisted before they are acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use stella_proto::agent_message::Body as AgentBody;
use stella_proto::agent_session_server::AgentSession;
use stella_proto::plane_message::Body as PlaneBody;
use stella_proto::{
    AgentMessage, Drain, JobOffer, JobStatus, PlaneMessage, RelayedAgentMessage,
    RelayedPlaneMessage, RenewResponse, ResultAck, TargetInfo, TrustBundleUpdate, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::ApiError;
use crate::hub::{SetupInProgress, SetupPermit};
use crate::state::SharedState;
use crate::store::now_ms;
use crate::{agents, deployments, relays, targets, trust};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Outbound messages queued per session before the session task waits for the agent.
const OUTBOUND_QUEUE: usize = 16;

pub struct AgentSessionService {
    state: SharedState,
}

impl AgentSessionService {
    pub fn new(state: SharedState) -> Self {
        Self { state }
    }
}

type PlaneStream = Pin<Box<dyn Stream<Item = Result<PlaneMessage, Status>> + Send>>;

fn plane(body: PlaneBody) -> PlaneMessage {
    PlaneMessage { body: Some(body) }
}

/// Why a session is not opened, whatever the transport.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The certificate names no agent identity of this trust domain.
    Unauthenticated(String),
    /// Unknown, revoked, or not the certificate issued to the agent.
    PermissionDenied(String),
    /// The plane could not check (storage): the agent should retry later.
    Internal(String),
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        match r {
            Refusal::Unauthenticated(m) => Status::unauthenticated(m),
            Refusal::PermissionDenied(m) => Status::permission_denied(m),
            Refusal::Internal(m) => Status::internal(m),
        }
    }
}

/// What to do with a session that passed the identity checks.
pub(crate) enum Opening {
    /// Admission control turned it away: send this drain and close.
    Deferred(PlaneMessage),
    Admitted(Opened),
}

/// A session whose agent identity is verified, holding its admission until the welcome is sent.
pub(crate) struct Opened {
    agent_id: String,
    leaf_der: Vec<u8>,
    admitted: Admitted,
    /// The relay carrying this session, when it is a virtual session.
    relayed_by: Option<String>,
}

/// Admission and identity checks of a new session, from the verified client certificate alone.
pub(crate) async fn open(state: &SharedState, leaf: &[u8]) -> Result<Opening, Refusal> {
    // Admission first: a deferred agent costs no database work at all.
    let permit = match state.hub.admission.admit().await {
        Ok(permit) => permit,
        Err(retry_after) => {
            tracing::debug!(?retry_after, "session setup deferred (admission limit)");
            return Ok(Opening::Deferred(plane(PlaneBody::Drain(Drain {
                reconnect_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
                reason: "too many agents connecting; come back later".to_string(),
            }))));
        }
    };
    let setup = state.hub.admission.setup_started();
    let agent_id = stella_pki::agent_id_from_cert(leaf, &state.keys.trust_domain).map_err(|e| {
        state.count_session_refusal("bad_identity");
        tracing::warn!(error = %e, "session refused: bad client certificate identity");
        Refusal::Unauthenticated(format!("client certificate refused: {e}"))
    })?;
    let record = agents::get_record(state, &agent_id)
        .await
        .map_err(|e| Refusal::Internal(e.to_string()))?
        .ok_or_else(|| {
            state.count_session_refusal("unknown_agent");
            tracing::warn!(agent_id, "session refused: unknown agent");
            Refusal::PermissionDenied(format!("agent {agent_id} is not enrolled"))
        })?;
    if record.status == "revoked" {
        state.count_session_refusal("revoked");
        tracing::warn!(agent_id, "session refused: agent revoked");
        return Err(Refusal::PermissionDenied(format!(
            "agent {agent_id} is revoked"
        )));
    }
    // A certificate of a former enrollment of the same id (not possible with random ids,
    // but cheap to check) must not open a session.
    let serial = x509_serial_hex(leaf);
    let current = serial.as_deref() == Some(record.cert_serial.as_str());
    let previous = !record.previous_cert_serial.is_empty()
        && serial.as_deref() == Some(record.previous_cert_serial.as_str());
    if current && !record.previous_cert_serial.is_empty() {
        agents::retire_previous_certificate(state, &agent_id)
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))?;
    }
    if !current && !previous {
        state.count_session_refusal("certificate_mismatch");
        tracing::warn!(
            agent_id,
            "session refused: certificate serial does not match enrollment"
        );
        return Err(Refusal::PermissionDenied(
            "client certificate is not the one issued to this agent".to_string(),
        ));
    }
    Ok(Opening::Admitted(Opened {
        agent_id,
        leaf_der: leaf.to_vec(),
        admitted: Admitted {
            _permit: permit,
            _setup: setup,
        },
        relayed_by: None,
    }))
}

/// Runs an opened session to its end over any transport: `inbound` yields the agent's messages
/// (an `Err` is a broken stream), `tx` carries the plane's.
/// Resolves to whether a newer session of the same agent replaced this one.
///
/// The future is boxed and named `Send` here because a relay's session starts virtual sessions
/// with this same function: without the explicit type the compiler cannot prove the recursive
/// future `Send`.
pub(crate) fn serve_opened<S>(
    state: SharedState,
    opened: Opened,
    inbound: S,
    tx: mpsc::Sender<PlaneMessage>,
) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>>
where
    S: Stream<Item = Result<AgentMessage, String>> + Unpin + Send + 'static,
{
    Box::pin(async move {
        let Opened {
            agent_id,
            leaf_der,
            admitted,
            relayed_by,
        } = opened;
        let agent_id_for_log = agent_id.clone();
        match run_session(state, agent_id, leaf_der, relayed_by, inbound, tx, admitted).await {
            Ok(()) => false,
            Err(e) => {
                tracing::info!(agent_id = %agent_id_for_log, reason = %e, "session ended");
                matches!(e, SessionEnd::Replaced)
            }
        }
    })
}

#[tonic::async_trait]
impl AgentSession for AgentSessionService {
    type SessionStream = PlaneStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let opened = match open(&self.state, leaf).await? {
            Opening::Deferred(drain) => {
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(drain)))));
            }
            Opening::Admitted(opened) => opened,
        };
        let inbound = request
            .into_inner()
            .map(|m| m.map_err(|status| status.to_string()));
        // A short queue: its first block is allocated per session up front (plane memory per
        // session, fix 7).
        let (tx, rx) = mpsc::channel::<PlaneMessage>(OUTBOUND_QUEUE);
        tokio::spawn(serve_opened(self.state.clone(), opened, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

fn x509_serial_hex(cert_der: &[u8]) -> Option<String> {
    stella_pki::cert_serial_hex(cert_der).ok()
}

#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("agent closed the stream")]
    Closed,
    #[error("stream error: {0}")]
    Stream(String),
    #[error("no hello within {0:?}")]
    NoHello(Duration),
    #[error("first message was not a hello")]
    NotHello,
    #[error("no message for {0:?} (heartbeats missed)")]
    Silent(Duration),
    #[error("a newer session of the same agent replaced this one")]
    Replaced,
    #[error("plane shutting down")]
    Shutdown,
    #[error("outbound channel closed")]
    OutboundClosed,
    #[error("storage: {0}")]
    Storage(#[from] ApiError),
}

async fn send(tx: &mpsc::Sender<PlaneMessage>, body: PlaneBody) -> Result<(), SessionEnd> {
    tx.send(plane(body))
        .await
        .map_err(|_| SessionEnd::OutboundClosed)
}

/// A session setup admitted and in progress; dropped once the agent has its welcome.
struct Admitted {
    _permit: SetupPermit,
    _setup: SetupInProgress,
}

async fn run_session<S>(
    state: SharedState,
    agent_id: String,
    leaf_der: Vec<u8>,
    relayed_by: Option<String>,
    mut inbound: S,
    tx: mpsc::Sender<PlaneMessage>,
    admitted: Admitted,
) -> Result<(), SessionEnd>
where
    S: Stream<Item = Result<AgentMessage, String>> + Unpin + Send,
{
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
        Err(_) => return Err(SessionEnd::NoHello(HELLO_TIMEOUT)),
        Ok(None) => return Err(SessionEnd::Closed),
        Ok(Some(msg)) => match msg.map_err(SessionEnd::Stream)?.body {
            Some(AgentBody::Hello(h)) => h,
            _ => return Err(SessionEnd::NotHello),
        },
    };
    // The welcome first: it needs two reads, while the bookkeeping below is written in the
    // background (group commit), so an agent is never kept waiting on the write lock.
    let bundle_sent = welcome(&state, &agent_id, relayed_by.is_some(), &tx).await?;
    drop(admitted);
    let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
    state
        .writes
        .hello(
            &agent_id,
            hello.capabilities.clone(),
            labels,
            hello.agent_version.clone(),
            hello.hostname.clone(),
        )
        .await;
    state.hub.record_heartbeat(&agent_id, now_ms());
    let registration = state.hub.register(&agent_id);
    tracing::info!(agent_id, relay = relayed_by.as_deref().unwrap_or(""), version = %hello.agent_version, last_sequence = hello.last_sequence, in_flight = hello.in_flight_job_ids.len(), "agent connected");
    state
        .writes
        .trust_ack(&agent_id, hello.trust_bundle_version)
        .await;
    let session = Session {
        state: &state,
        agent_id: &agent_id,
        leaf_der: &leaf_der,
        tx: &tx,
        last_inventory: std::sync::Mutex::new(None),
        relayed_by: relayed_by.as_deref(),
        relay: RelayMux::default(),
    };
    let result = serve_session(
        &session,
        hello,
        bundle_sent,
        &mut inbound,
        registration.wake,
        registration.evicted,
    )
    .await;
    if state.hub.unregister(&agent_id, registration.session_id) {
        // No newer session of this agent here: other replicas stop showing it connected.
        state.writes.session_closed(&agent_id).await;
    }
    result
}

/// Sends the welcome (targets, current trust bundle); returns the bundle version sent.
async fn welcome(
    state: &SharedState,
    agent_id: &str,
    relayed: bool,
    tx: &mpsc::Sender<PlaneMessage>,
) -> Result<u64, SessionEnd> {
    let targets = targets::list_for_agent(state, agent_id).await?;
    let (bundle_sent, bundle) = trust::current(&state.db)
        .await
        .map_err(ApiError::from)?
        .unwrap_or((0, String::new()));
    send(
        tx,
        PlaneBody::Welcome(Welcome {
            agent_id: agent_id.to_string(),
            heartbeat_interval_ms: state.config.heartbeat_interval.as_millis() as i64,
            server_time_unix_ms: now_ms(),
            targets: targets
                .iter()
                .map(|t| TargetInfo {
                    name: t.name.clone(),
                    kind: t.kind.clone(),
                    config_json: t.config.to_string(),
                })
                .collect(),
            trust_bundle: bundle.into_bytes(),
            answers_heartbeats: true,
            // An agent behind a relay keeps dialling its relay: no plane addresses for it.
            agent_endpoints: if relayed {
                Vec::new()
            } else {
                state.config.agent_endpoints.clone()
            },
        }),
    )
    .await?;
    Ok(bundle_sent)
}

/// One established session: whose it is and how to answer it.
struct Session<'a> {
    state: &'a SharedState,
    agent_id: &'a str,
    /// The client certificate the session was opened with: receipts must verify against it.
    leaf_der: &'a [u8],
    tx: &'a mpsc::Sender<PlaneMessage>,
    /// Digest of the last inventory written and when: an unchanged report is not rewritten.
    last_inventory: std::sync::Mutex<Option<(String, i64)>>,
    /// The relay carrying this session, when it is a virtual one.
    relayed_by: Option<&'a str>,
    /// The virtual sessions this session carries, when its agent is a relay.
    relay: RelayMux,
}

/// An unchanged inventory is still rewritten this often, so `reported_at` says the agent is
/// still observing its targets.
const INVENTORY_REFRESH_MS: i64 = 10 * 60 * 1000;

async fn serve_session<S>(
    session: &Session<'_>,
    hello: stella_proto::Hello,
    mut bundle_sent: u64,
    inbound: &mut S,
    wake: Arc<tokio::sync::Notify>,
    mut evicted: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), SessionEnd>
where
    S: Stream<Item = Result<AgentMessage, String>> + Unpin + Send,
{
    let (state, agent_id, tx) = (session.state, session.agent_id, session.tx);
    let silence_limit = state.config.heartbeat_interval * 3;

    // Jobs offered on this session; the agent's in-flight jobs count as offered already.
    let mut offered: HashSet<String> = hello.in_flight_job_ids.into_iter().collect();
    if let Err(e) = offer_pending(state, agent_id, tx, &mut offered).await {
        retry_offers_later(session, &wake, e)?;
    }

    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            msg = tokio::time::timeout(silence_limit, inbound.next()) => {
                let msg = match msg {
                    Err(_) => return Err(SessionEnd::Silent(silence_limit)),
                    Ok(None) => return Err(SessionEnd::Closed),
                    Ok(Some(msg)) => msg.map_err(SessionEnd::Stream)?,
                };
                handle_message(session, msg).await?;
            }
            _ = wake.notified() => {
                // A rotation may have published a bundle: push it before any job signed under it.
                match trust::current(&state.db).await {
                    Ok(Some((version, bundle))) if version > bundle_sent => {
                        send(tx, PlaneBody::Trust(TrustBundleUpdate { bundle: bundle.into_bytes() })).await?;
                        bundle_sent = version;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        retry_offers_later(session, &wake, SessionEnd::Storage(ApiError::from(e)))?;
                        continue;
                    }
                }
                if let Err(e) = offer_pending(state, agent_id, tx, &mut offered).await {
                    retry_offers_later(session, &wake, e)?;
                }
            }
            _ = &mut evicted => return Err(SessionEnd::Replaced),
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    let _ = send(tx, PlaneBody::Drain(Drain { reconnect_after_ms: 1000, reason: "plane shutting down".to_string() })).await;
                    return Err(SessionEnd::Shutdown);
                }
            }
        }
    }
}

/// A storage error while looking for work does not end the session (ending it would turn a
/// database hiccup into a reconnect storm): the lookup runs again shortly. Any other error does.
fn retry_offers_later(
    session: &Session<'_>,
    wake: &Arc<tokio::sync::Notify>,
    error: SessionEnd,
) -> Result<(), SessionEnd> {
    if !matches!(error, SessionEnd::Storage(_)) {
        return Err(error);
    }
    tracing::warn!(agent_id = session.agent_id, error = %error, "cannot look up work for the agent; retrying in 1s");
    let wake = wake.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        wake.notify_one();
    });
    Ok(())
}

async fn offer_pending(
    state: &SharedState,
    agent_id: &str,
    tx: &mpsc::Sender<PlaneMessage>,
    offered: &mut HashSet<String>,
) -> Result<(), SessionEnd> {
    let now = now_ms();
    for job in deployments::pending_for_agent(state, agent_id).await? {
        if offered.contains(&job.id) {
            continue;
        }
        if job.not_after_ms <= now {
            tracing::warn!(agent_id, job_id = %job.id, "job expired before delivery");
            deployments::expire_job(state, &job.id).await?;
            continue;
        }
        send(
            tx,
            PlaneBody::Offer(JobOffer {
                job_id: job.id.clone(),
                envelope: job.envelope.into_bytes(),
            }),
        )
        .await?;
        state.writes.offered(agent_id, &job.id).await;
        tracing::debug!(agent_id, job_id = %job.id, "job offered");
        offered.insert(job.id);
    }
    Ok(())
}

async fn handle_message(session: &Session<'_>, msg: AgentMessage) -> Result<(), SessionEnd> {
    let (state, agent_id, tx) = (session.state, session.agent_id, session.tx);
    match msg.body {
        Some(AgentBody::Heartbeat(beat)) => {
            state.hub.record_heartbeat(agent_id, now_ms());
            // Answered so the agent can tell a live plane from a half-open link.
            send(tx, PlaneBody::Heartbeat(beat)).await?;
        }
        Some(AgentBody::Accepted(a)) => state.writes.accepted(agent_id, &a.job_id).await,
        Some(AgentBody::Progress(p)) => state.writes.progress(agent_id, &p.job_id, p.message).await,
        Some(AgentBody::Result(r)) => {
            let status = match JobStatus::try_from(r.status) {
                Ok(JobStatus::Succeeded) => "succeeded",
                Ok(JobStatus::Failed) => "failed",
                Ok(JobStatus::Refused) => "refused",
                _ => {
                    tracing::warn!(agent_id, job_id = %r.job_id, status = r.status, "result with unknown status ignored");
                    return Ok(());
                }
            };
            let receipt = match verify_receipt(session, &r, status).await {
                Ok(receipt) => receipt,
                Err(why) => {
                    // Not recorded and not acknowledged: the agent keeps it spooled, and an
                    // operator sees why in the log and the metric.
                    tracing::error!(agent_id, job_id = %r.job_id, reason = %why, "result refused: bad receipt");
                    state
                        .receipt_refusals
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(());
                }
            };
            if status == "refused" {
                tracing::warn!(agent_id, job_id = %r.job_id, reason = %r.reason_code, message = %r.message, "agent refused job");
            }
            let job_id = r.job_id.clone();
            match state.writes.result(agent_id, status, r, receipt).await {
                Ok(known) => {
                    if !known {
                        tracing::warn!(
                            agent_id,
                            job_id,
                            "result for a job this agent does not own; acknowledged and ignored"
                        );
                    }
                    // Committed (or known to be a duplicate): only now may the agent drop it
                    // from its spool.
                    send(tx, PlaneBody::ResultAck(ResultAck { job_id })).await?;
                }
                // Not acknowledged: the agent keeps it spooled and sends it again on its next
                // session. The session itself goes on.
                Err(e) => tracing::error!(agent_id, job_id, error = %e, "cannot record a result"),
            }
        }
        Some(AgentBody::Inventory(report)) => {
            // Every report, changed or not: remediation state moves with time too.
            state.drift.submit(agent_id, &report);
            if session.inventory_changed(&report) {
                state.writes.inventory(agent_id, report).await;
            }
        }
        Some(AgentBody::TrustAck(ack)) => state.writes.trust_ack(agent_id, ack.version).await,
        Some(AgentBody::Renew(_)) if session.relayed_by.is_some() => {
            // The relay could have swapped the CSR for one of its own key: in-band renewal is
            // end to end only on a direct session. Behind a relay the agent renews over the
            // API with a signature by its previous key, which the relay cannot make.
            tracing::info!(agent_id, "in-band renewal through a relay refused");
            send(
                tx,
                PlaneBody::Renewed(RenewResponse {
                    cert_pem: String::new(),
                    error: "in-band renewal is not accepted through a relay; the agent renews over the API with a proof of its previous key".to_string(),
                }),
            )
            .await?;
        }
        Some(AgentBody::Renew(req)) => {
            let presented = x509_serial_hex(session.leaf_der).unwrap_or_default();
            let response =
                match agents::renew_certificate(state, agent_id, &presented, &req.csr_pem).await {
                    Ok(cert_pem) => RenewResponse {
                        cert_pem,
                        error: String::new(),
                    },
                    Err(e) => {
                        tracing::warn!(agent_id, error = %e, "in-band renewal refused");
                        RenewResponse {
                            cert_pem: String::new(),
                            error: e.to_string(),
                        }
                    }
                };
            send(tx, PlaneBody::Renewed(response)).await?;
        }
        Some(AgentBody::Relayed(frame)) => relay_frame(session, frame).await?,
        Some(AgentBody::RelayCert(req)) => {
            let answer = relays::issue_server_certificate(state, agent_id, &req).await;
            send(tx, PlaneBody::RelayCert(answer)).await?;
        }
        Some(AgentBody::Hello(_)) => tracing::warn!(agent_id, "second hello on a session ignored"),
        None => tracing::warn!(agent_id, "empty message ignored"),
    }
    Ok(())
}

impl Session<'_> {
    /// Whether this report differs from the last one written on this session (or that one is
    /// old enough to refresh); remembers it when it does.
    fn inventory_changed(&self, report: &stella_proto::InventoryReport) -> bool {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        for t in &report.targets {
            for field in [&t.target, &t.kind, &t.sticker_json, &t.error] {
                hash.update(field.as_bytes());
                hash.update([0]);
            }
            for w in &t.workloads {
                for field in [
                    &w.component,
                    &w.digest,
                    &w.state,
                    &w.health,
                    &w.workload_id,
                    &w.release_id,
                    &w.deployment_id,
                    &w.name,
                    &w.image,
                ] {
                    hash.update(field.as_bytes());
                    hash.update([0]);
                }
                hash.update([u8::from(w.unmanaged)]);
                let mut labels: Vec<_> = w.labels.iter().collect();
                labels.sort();
                for (k, v) in labels {
                    hash.update(k.as_bytes());
                    hash.update([0]);
                    hash.update(v.as_bytes());
                    hash.update([0]);
                }
            }
            hash.update([1]);
        }
        let digest = hex::encode(hash.finalize());
        let now = now_ms();
        let mut last = self
            .last_inventory
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let unchanged = last
            .as_ref()
            .is_some_and(|(d, at)| *d == digest && now - at < INVENTORY_REFRESH_MS);
        if !unchanged {
            *last = Some((digest, now));
        }
        !unchanged
    }
}

/// Checks that a result carries a receipt signed with the key of one of the certificates this
/// agent was issued (results spooled before a renewal are signed under the previous one), and
/// that the receipt attests exactly this result. Returns the receipt JSON to store.
async fn verify_receipt(
    session: &Session<'_>,
    r: &stella_proto::JobResult,
    status: &str,
) -> Result<String, String> {
    let json =
        String::from_utf8(r.receipt.clone()).map_err(|_| "receipt is not UTF-8".to_string())?;
    if json.is_empty() {
        return Err("result carries no receipt".to_string());
    }
    let envelope: stella_pki::Envelope =
        serde_json::from_str(&json).map_err(|e| format!("receipt is not a DSSE envelope: {e}"))?;
    let keyid = envelope
        .signatures
        .first()
        .map(|s| s.keyid.clone())
        .ok_or_else(|| "receipt has no signature".to_string())?;
    let (cert_der, not_after_ms) = if keyid == stella_pki::fingerprint_der(session.leaf_der) {
        (session.leaf_der.to_vec(), i64::MAX)
    } else {
        agents::certificate_by_fingerprint(session.state, session.agent_id, &keyid)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!("receipt is signed by {keyid}, which is no certificate of this agent")
            })?
    };
    let attested = stella_pki::verify_receipt(&cert_der, &envelope).map_err(|e| e.to_string())?;
    if attested.finished_at_unix_ms > not_after_ms {
        return Err("receipt claims a time after its certificate expired".to_string());
    }
    let expected_digest = stella_pki::result_digest(&r.message, &r.outcome_json);
    let matches = attested.job_id == r.job_id
        && attested.agent_id == session.agent_id
        && attested.status == status
        && attested.reason_code == r.reason_code
        && attested.envelope_digest == r.envelope_digest
        && attested.result_digest == expected_digest;
    if !matches {
        return Err("receipt does not attest this result".to_string());
    }
    Ok(json)
}

/// The virtual sessions a relay's session carries: per leaf agent, the relay's link number and
/// the leaf's inbound queue. Dropping it (the relay's session ends) ends them all.
#[derive(Default)]
struct RelayMux {
    links: std::sync::Mutex<HashMap<String, (u64, VirtualInbound)>>,
    /// Whether this session's agent may relay, looked up once.
    authorized: tokio::sync::OnceCell<bool>,
}

/// The queue feeding one virtual session the leaf's messages.
type VirtualInbound = mpsc::Sender<Result<AgentMessage, String>>;

/// Frames queued towards one virtual session before the relay's session waits for it.
const VIRTUAL_INBOUND_QUEUE: usize = 64;

fn relayed_closed(agent_id: &str, link: u64, refused: bool, reason: String) -> PlaneBody {
    PlaneBody::Relayed(RelayedPlaneMessage {
        agent_id: agent_id.to_string(),
        plane_message: Vec::new(),
        closed: true,
        reason,
        link,
        refused,
        replaced: false,
    })
}

/// One frame of a leaf's session, carried by the relay this session belongs to. A hello opens
/// (or replaces) the leaf's virtual session; anything else goes to the open one.
async fn relay_frame(session: &Session<'_>, frame: RelayedAgentMessage) -> Result<(), SessionEnd> {
    let (state, relay_id, tx) = (session.state, session.agent_id, session.tx);
    let leaf_id = frame.agent_id.clone();
    if frame.close {
        let mut links = lock(&session.relay.links);
        if links
            .get(&leaf_id)
            .is_some_and(|(link, _)| *link == frame.link)
        {
            links.remove(&leaf_id);
        }
        return Ok(());
    }
    let message = match AgentMessage::decode(frame.agent_message.as_slice()) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(relay_id, agent_id = %leaf_id, error = %e, "undecodable relayed frame");
            let reason = format!("relayed frame is not an agent message: {e}");
            return send(tx, relayed_closed(&leaf_id, frame.link, false, reason)).await;
        }
    };
    if !matches!(message.body, Some(AgentBody::Hello(_))) {
        let target = lock(&session.relay.links)
            .get(&leaf_id)
            .filter(|(link, _)| *link == frame.link)
            .map(|(_, queue)| queue.clone());
        let delivered = match target {
            Some(queue) => queue.send(Ok(message)).await.is_ok(),
            None => false,
        };
        if !delivered {
            // The relay believes in a virtual session that is gone: tell it, so it opens a new
            // one (with a hello) and keeps the frame's content until then.
            lock(&session.relay.links).remove(&leaf_id);
            let reason = "no open virtual session for this agent".to_string();
            send(tx, relayed_closed(&leaf_id, frame.link, false, reason)).await?;
        }
        return Ok(());
    }

    let authorized = *session
        .relay
        .authorized
        .get_or_try_init(|| relays::is_relay(state, relay_id))
        .await?;
    if !authorized {
        state.count_session_refusal("not_a_relay");
        tracing::warn!(relay_id, agent_id = %leaf_id, "relayed session refused: the agent is not a relay");
        let reason = format!(
            "agent {relay_id} is not a relay (its join token has no {}={} label)",
            relays::RELAY_LABEL.0,
            relays::RELAY_LABEL.1
        );
        return send(tx, relayed_closed(&leaf_id, frame.link, true, reason)).await;
    }
    match open_virtual(state, relay_id, &frame.leaf_cert_der, &leaf_id).await {
        Err(reason) => send(tx, relayed_closed(&leaf_id, frame.link, true, reason)).await,
        Ok(Opening::Deferred(drain)) => {
            send(tx, relayed_body(&leaf_id, frame.link, &drain)).await?;
            let reason = "admission control deferred the session".to_string();
            send(tx, relayed_closed(&leaf_id, frame.link, false, reason)).await
        }
        Ok(Opening::Admitted(opened)) => {
            let (in_tx, in_rx) = mpsc::channel(VIRTUAL_INBOUND_QUEUE);
            // Cannot fail: the receiver is right here and the queue is empty.
            let _ = in_tx.send(Ok(message)).await;
            // Replacing an older link drops its queue, which ends that virtual session.
            lock(&session.relay.links).insert(leaf_id.clone(), (frame.link, in_tx));
            let (out_tx, out_rx) = mpsc::channel::<PlaneMessage>(OUTBOUND_QUEUE);
            let (ended_tx, ended_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(forward_virtual(
                leaf_id.clone(),
                frame.link,
                out_rx,
                ended_rx,
                tx.clone(),
            ));
            let serving = serve_opened(state.clone(), opened, ReceiverStream::new(in_rx), out_tx);
            tokio::spawn(async move {
                let _ = ended_tx.send(serving.await);
            });
            let (state, relay_id) = (state.clone(), relay_id.to_string());
            tokio::spawn(async move {
                if let Err(e) = relays::record_relayed(&state, &leaf_id, &relay_id).await {
                    tracing::warn!(agent_id = %leaf_id, relay_id, error = %e, "cannot record the agent's relay");
                }
            });
            Ok(())
        }
    }
}

fn relayed_body(agent_id: &str, link: u64, message: &PlaneMessage) -> PlaneBody {
    PlaneBody::Relayed(RelayedPlaneMessage {
        agent_id: agent_id.to_string(),
        plane_message: message.encode_to_vec(),
        closed: false,
        reason: String::new(),
        link,
        refused: false,
        replaced: false,
    })
}

/// Carries a virtual session's plane messages to its relay, then says it ended (and whether a
/// newer session of the agent replaced it).
async fn forward_virtual(
    agent_id: String,
    link: u64,
    mut from_session: mpsc::Receiver<PlaneMessage>,
    ended: tokio::sync::oneshot::Receiver<bool>,
    relay_tx: mpsc::Sender<PlaneMessage>,
) {
    while let Some(message) = from_session.recv().await {
        if relay_tx
            .send(plane(relayed_body(&agent_id, link, &message)))
            .await
            .is_err()
        {
            return;
        }
    }
    let replaced = ended.await.unwrap_or(false);
    let mut closed = relayed_closed(
        &agent_id,
        link,
        false,
        if replaced {
            "a newer session of the agent replaced this one".to_string()
        } else {
            "session ended".to_string()
        },
    );
    if let PlaneBody::Relayed(frame) = &mut closed {
        frame.replaced = replaced;
    }
    let _ = relay_tx.send(plane(closed)).await;
}

/// The checks of a direct session, for a leaf a relay (or an air-gap file) presents: its
/// certificate must chain to this plane's CA — TLS did not check it — and name `claimed_id`;
/// then `open` checks identity, enrollment, revocation and admission as for anyone.
async fn open_virtual(
    state: &SharedState,
    relay_id: &str,
    leaf_der: &[u8],
    claimed_id: &str,
) -> Result<Opening, String> {
    if let Err(e) = relays::verify_leaf_certificate(state, leaf_der) {
        state.count_session_refusal("bad_relayed_certificate");
        tracing::warn!(relay_id, agent_id = claimed_id, error = %e, "relayed session refused");
        return Err(e);
    }
    match open(state, leaf_der).await {
        Ok(Opening::Admitted(mut opened)) => {
            if opened.agent_id != claimed_id {
                state.count_session_refusal("bad_relayed_certificate");
                return Err(format!(
                    "the certificate is agent {}'s, not {claimed_id}'s",
                    opened.agent_id
                ));
            }
            if opened.agent_id == relay_id {
                return Err("a relay cannot carry its own session".to_string());
            }
            opened.relayed_by = Some(relay_id.to_string());
            Ok(Opening::Admitted(opened))
        }
        Ok(deferred) => Ok(deferred),
        Err(Refusal::Internal(m)) => Err(format!("the plane could not check the agent: {m}")),
        Err(Refusal::Unauthenticated(m) | Refusal::PermissionDenied(m)) => Err(m),
    }
}

/// What feeding a stored leaf session through the plane did.
pub(crate) struct VirtualOutcome {
    /// Plane messages the session produced (welcome, acknowledgements, offers...).
    pub messages: Vec<PlaneMessage>,
}

/// Runs one complete session of a leaf from stored messages (an air-gap file): the same checks
/// and the same code as a live session, so receipts are verified against the leaf's
/// certificates and results are recorded once. Returns when every message was handled and
/// every write committed.
pub(crate) async fn serve_stored(
    state: &SharedState,
    relay_id: &str,
    leaf_der: &[u8],
    claimed_id: &str,
    messages: Vec<AgentMessage>,
) -> Result<VirtualOutcome, String> {
    let opened = match open_virtual(state, relay_id, leaf_der, claimed_id).await? {
        Opening::Admitted(opened) => opened,
        Opening::Deferred(_) => {
            return Err("the plane is busy admitting sessions; import again shortly".to_string());
        }
    };
    let (in_tx, in_rx) = mpsc::channel(messages.len().max(1));
    for message in messages {
        // Cannot fail: capacity for every message and the receiver is alive.
        let _ = in_tx.send(Ok(message)).await;
    }
    drop(in_tx);
    let (out_tx, mut out_rx) = mpsc::channel::<PlaneMessage>(OUTBOUND_QUEUE);
    let serving = tokio::spawn(serve_opened(
        state.clone(),
        opened,
        ReceiverStream::new(in_rx),
        out_tx,
    ));
    let mut outcome = VirtualOutcome {
        messages: Vec::new(),
    };
    while let Some(message) = out_rx.recv().await {
        outcome.messages.push(message);
    }
    let _ = serving.await;
    state.writes.barrier().await;
    Ok(outcome)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
