//! The running agent: one outbound session at a time, reconnecting with capped exponential
//! backoff and full jitter; jobs verified offline before anything runs; results journaled and
//! spooled before they are sent, and dropped from the spool only when the plane acknowledges.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt as _;
use rand::Rng;
use stella_pki::{JobPayload, JobRefusal, JobVerifier};
use stella_plugin_sdk::{
    ComponentSpec, DeployMode, DeploySpec, PluginError, ProgressSink, TargetRef, VersionSticker,
};
use stella_proto::agent_message::Body as AgentBody;
use stella_proto::plane_message::Body as PlaneBody;
use stella_proto::{
    AgentMessage, Heartbeat, Hello, InventoryReport, JobAccepted, JobOffer, JobProgress, JobResult,
    JobStatus, TargetInventory,
};
use tokio::sync::mpsc;

use crate::config::{AgentConfig, DataDir, PlaneEndpoints, dial_order, read_json, write_json};
use crate::executors::{self, Executors};
use crate::identity;
use crate::journal::{Journal, JournalEntry, JournalStatus, StoredResult};
use crate::transport::{self, AfterFailure, Failover, LinkError};

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
const INVENTORY_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Executors not to start even when their backend is reachable (also `health-check` and
    /// `script`, the steps the agent runs itself).
    pub disabled_executors: Vec<String>,
    /// Offer the `script` capability: run signed script jobs on this host (`--allow-scripts`).
    pub allow_scripts: bool,
    /// How often inventory is reported without a change or a job; `None`: every 60 s.
    pub inventory_interval: Option<Duration>,
    /// Endpoints to dial before the configured ones (`stella-agent run --endpoint`).
    pub endpoints: Vec<String>,
}

struct WorkItem {
    payload: JobPayload,
    envelope_digest: String,
}

struct Shared {
    config: AgentConfig,
    /// Replaced when a new trust bundle arrives (key rotation).
    verifier: Mutex<JobVerifier>,
    trust_version: Mutex<u64>,
    /// Set when a trust bundle brings a CA that did not issue our certificate: renew now.
    renew_now: std::sync::atomic::AtomicBool,
    executors: Executors,
    journal: Mutex<Journal>,
    targets: Mutex<BTreeMap<String, TargetRef>>,
    dir: DataDir,
    uplink: mpsc::UnboundedSender<AgentMessage>,
    work: mpsc::UnboundedSender<WorkItem>,
    /// Held while a job executes, so shutdown can wait for the current step to finish.
    busy: tokio::sync::Mutex<()>,
    /// Jobs handed to the worker and not finished yet (queued or running): a job is scheduled
    /// at most once, and a re-offer of an accepted job that is not here schedules it again.
    scheduled: Mutex<HashSet<String>>,
    /// Swapped when the certificate is renewed.
    receipts: Mutex<ReceiptSigner>,
    inventory_interval: Duration,
    /// The agent endpoints the plane advertised (`plane-endpoints.json`), tried after the
    /// configured ones.
    advertised: Mutex<Vec<String>>,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn msg(body: AgentBody) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

fn result_message(r: &StoredResult) -> AgentMessage {
    let status = match r.status.as_str() {
        "succeeded" => JobStatus::Succeeded,
        "refused" => JobStatus::Refused,
        _ => JobStatus::Failed,
    };
    msg(AgentBody::Result(JobResult {
        job_id: r.job_id.clone(),
        status: status as i32,
        reason_code: r.reason_code.clone(),
        message: r.message.clone(),
        outcome_json: r.outcome_json.clone(),
        envelope_digest: r.envelope_digest.clone(),
        started_at_unix_ms: r.started_at_unix_ms,
        finished_at_unix_ms: r.finished_at_unix_ms,
        receipt: r.receipt.clone().into_bytes(),
    }))
}

/// The agent's signing identity for receipts: the key behind its mTLS certificate.
struct ReceiptSigner {
    agent_id: String,
    key_pem: String,
    cert_der: Vec<u8>,
}

impl ReceiptSigner {
    /// Signs the result in place. A result that cannot be signed is still reported (unsigned):
    /// the plane then refuses to record it and says why, which beats losing it silently.
    fn sign(&self, result: &mut StoredResult) {
        let payload = stella_pki::ReceiptPayload {
            job_id: result.job_id.clone(),
            agent_id: self.agent_id.clone(),
            envelope_digest: result.envelope_digest.clone(),
            status: result.status.clone(),
            reason_code: result.reason_code.clone(),
            result_digest: stella_pki::result_digest(&result.message, &result.outcome_json),
            finished_at_unix_ms: result.finished_at_unix_ms,
        };
        match stella_pki::sign_receipt(&self.key_pem, &self.cert_der, &payload)
            .map_err(|e| e.to_string())
            .and_then(|env| serde_json::to_string(&env).map_err(|e| e.to_string()))
        {
            Ok(receipt) => result.receipt = receipt,
            Err(e) => tracing::error!(job_id = %result.job_id, error = %e, "cannot sign a receipt"),
        }
    }
}

/// Runs the agent until `shutdown` resolves, with the executors this host offers.
pub async fn run(
    dir: DataDir,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let executors = executors::detect(&dir, &options.disabled_executors).await;
    run_with(dir, executors, &options, shutdown).await
}

/// Runs the agent with the given executors (the benchmark's simulated fleet injects a no-op one).
pub async fn run_with_executors(
    dir: DataDir,
    executors: Executors,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(dir, executors, &RunOptions::default(), shutdown).await
}

async fn run_with(
    dir: DataDir,
    executors: Executors,
    options: &RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    stella_pki::install_crypto_provider();
    let config = dir.load_config()?;
    let overrides = if options.endpoints.is_empty() {
        Vec::new()
    } else {
        crate::config::validate_endpoints(&options.endpoints).context("--endpoint")?
    };
    let configured = config.endpoints();
    let advertised = dir.load_plane_endpoints().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ignoring the plane's stored endpoint list");
        Vec::new()
    });
    let dial = |advertised: &[String]| dial_order(&[&overrides, &configured, advertised]);
    let mut failover = Failover::new(dial(&advertised));
    if failover.endpoints().is_empty() {
        anyhow::bail!(
            "{} names no agent endpoint; set one with `stella-agent endpoints --set URL`",
            dir.agent_file().display()
        );
    }
    let trusted = dir.load_trust()?;
    let ident = identity::load(&dir)?;
    dir.read_text(&dir.ca_file())?;
    let journal =
        Journal::open(dir.journal_dir(), dir.spool_dir()).context("opening the job journal")?;
    let targets: BTreeMap<String, TargetRef> = if dir.targets_file().exists() {
        read_json(&dir.targets_file())?
    } else {
        BTreeMap::new()
    };

    let (uplink_tx, mut uplink_rx) = mpsc::unbounded_channel();
    let (work_tx, work_rx) = mpsc::unbounded_channel();
    let receipt_agent_id = config.agent_id.clone();
    let shared = Arc::new(Shared {
        trust_version: Mutex::new(dir.load_trust_version()),
        renew_now: std::sync::atomic::AtomicBool::new(false),
        verifier: Mutex::new(JobVerifier {
            agent_id: config.agent_id.clone(),
            trusted,
            capabilities: [
                executors::capabilities(&executors),
                executors::step_capabilities(&options.disabled_executors, options.allow_scripts),
            ]
            .concat(),
        }),
        config,
        executors,
        journal: Mutex::new(journal),
        targets: Mutex::new(targets),
        dir,
        uplink: uplink_tx,
        work: work_tx,
        busy: tokio::sync::Mutex::new(()),
        scheduled: Mutex::new(HashSet::new()),
        receipts: Mutex::new(ReceiptSigner {
            agent_id: receipt_agent_id,
            key_pem: ident.key_pem.clone(),
            cert_der: ident.cert_der.clone(),
        }),
        inventory_interval: options.inventory_interval.unwrap_or(INVENTORY_INTERVAL),
        advertised: Mutex::new(advertised),
    });
    tracing::info!(agent_id = %shared.config.agent_id, endpoints = ?failover.endpoints(),
        capabilities = ?lock(&shared.verifier).capabilities, "agent starting");

    // Jobs accepted before a restart and not finished: run them again (every step is an ensure).
    let resumed = lock(&shared.journal).in_flight();
    for entry in resumed {
        match work_item(&entry) {
            Some(item) => {
                tracing::info!(job_id = %entry.job_id, "resuming a job interrupted by a restart");
                schedule(&shared, item)?;
            }
            None => {
                tracing::error!(job_id = %entry.job_id, "journal entry unreadable; job cannot resume")
            }
        }
    }
    let worker = tokio::spawn(worker(shared.clone(), work_rx));
    let watcher = crate::watch::spawn(&shared.executors, {
        let shared = shared.clone();
        move |changes| report_changes(shared.clone(), changes)
    });

    tokio::pin!(shutdown);
    loop {
        let endpoint = failover.current().to_string();
        let mut established = false;
        let outcome = tokio::select! {
            _ = &mut shutdown => break,
            o = connect_and_serve(&shared, &endpoint, &mut established, &mut uplink_rx) => o,
        };
        if established {
            failover.established();
        }
        // The plane may have advertised endpoints in its welcome.
        failover.set_endpoints(dial(&lock(&shared.advertised)));
        let delay = match outcome {
            Ok(SessionEnd::Drained(delay)) => {
                failover.sent_away();
                tracing::info!(?delay, %endpoint, next = %failover.current(), "plane asked us to reconnect later");
                delay + jitter(Duration::from_millis(500))
            }
            Ok(SessionEnd::Renewed) => Duration::ZERO,
            Ok(SessionEnd::Refused(why)) => {
                failover.sent_away();
                tracing::error!(reason = %why, %endpoint, "the control plane refuses this agent; if it was revoked, enroll again with a new join token");
                BACKOFF_CAP + jitter(BACKOFF_CAP)
            }
            Ok(SessionEnd::Closed) => {
                tracing::warn!(%endpoint, "session closed by the plane");
                after_failure(&mut failover, &endpoint, established)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), %endpoint, "session failed");
                after_failure(&mut failover, &endpoint, established)
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!("agent stopping; waiting for the running job step to finish");
    let _ = tokio::time::timeout(Duration::from_secs(60), shared.busy.lock()).await;
    worker.abort();
    watcher.abort();
    Ok(())
}

/// The delay before the next attempt after `endpoint` failed: none when another endpoint of
/// the round is left (a short jitter after a lost session, so a fleet that lost its plane at
/// once does not arrive at the next address at once), the round's backoff otherwise.
fn after_failure(failover: &mut Failover, endpoint: &str, established: bool) -> Duration {
    match failover.failed() {
        AfterFailure::Next => {
            tracing::warn!(from = %endpoint, to = %failover.current(), "moving to the next plane endpoint");
            if established {
                jitter(BACKOFF_BASE)
            } else {
                Duration::ZERO
            }
        }
        AfterFailure::BackOff(round) => {
            let delay = backoff(round);
            if failover.endpoints().len() > 1 {
                tracing::warn!(endpoints = failover.endpoints().len(), ?delay, next = %failover.current(),
                    "no plane endpoint answered; retrying after a pause");
            }
            delay
        }
    }
}

/// The plane's advertised endpoints to store, if the agent should adopt them: only when it
/// reached the plane through one of them (a relay's or a proxy's address is not in the plane's
/// list, so an agent behind one keeps dialling it), when they are all valid and when they
/// differ from what is stored.
fn advertised_to_adopt(
    connected: &str,
    advertised: &[String],
    stored: &[String],
) -> Option<Vec<String>> {
    if advertised.is_empty() {
        return None;
    }
    let list = match crate::config::validate_endpoints(advertised) {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(error = %e, "the plane advertises an unusable endpoint list; ignored");
            return None;
        }
    };
    let connected = crate::config::normalize_endpoint(connected);
    (list.contains(&connected) && list != stored).then_some(list)
}

/// Reports the targets an executor saw change (all of them when it cannot tell which).
async fn report_changes(shared: Arc<Shared>, changes: crate::watch::Changes) {
    if changes.all {
        let _ = shared.uplink.send(inventory_message(&shared, None).await);
        return;
    }
    for target in &changes.targets {
        if lock(&shared.targets).contains_key(target) {
            let _ = shared
                .uplink
                .send(inventory_message(&shared, Some(target)).await);
        }
    }
}

fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis() as u64;
    Duration::from_millis(if ms == 0 {
        0
    } else {
        rand::thread_rng().gen_range(0..=ms)
    })
}

/// Full jitter: uniformly random in [0, min(cap, base * 2^attempt)], so a fleet that lost its
/// plane at the same moment does not come back at the same moment.
pub fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    jitter(exp.min(BACKOFF_CAP))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

enum SessionEnd {
    Drained(Duration),
    /// A renewed certificate was installed: reconnect now so the plane sees it in use.
    Renewed,
    /// The plane refuses this identity (revoked, unknown): retrying fast cannot help.
    Refused(String),
    /// The plane ended the stream (whether a session was established is reported apart).
    Closed,
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Loads the current identity (renewing it first if it expired while the agent was away) and
/// serves one session with it.
async fn connect_and_serve(
    shared: &Arc<Shared>,
    endpoint: &str,
    established: &mut bool,
    uplink_rx: &mut mpsc::UnboundedReceiver<AgentMessage>,
) -> anyhow::Result<SessionEnd> {
    // Read at every connection: a CA rotation changes which CAs this agent trusts.
    let ca_pem = &shared.dir.read_text(&shared.dir.ca_file())?;
    let mut ident = identity::load(&shared.dir)?;
    if ident.expired(unix_now()) {
        tracing::warn!(
            "the agent certificate expired while offline; renewing with the previous key"
        );
        let cfg = &shared.config;
        identity::renew_offline(
            &shared.dir,
            &cfg.agent_id,
            &cfg.trust_domain,
            &cfg.api_url,
            ca_pem,
            &ident,
        )
        .await?;
        ident = identity::load(&shared.dir)?;
        use_identity(shared, &ident);
    }
    session(shared, endpoint, established, &ident, ca_pem, uplink_rx).await
}

fn use_identity(shared: &Shared, ident: &identity::AgentIdentity) {
    let mut signer = lock(&shared.receipts);
    signer.key_pem = ident.key_pem.clone();
    signer.cert_der = ident.cert_der.clone();
}

async fn session(
    shared: &Arc<Shared>,
    endpoint: &str,
    established: &mut bool,
    ident: &identity::AgentIdentity,
    ca_pem: &str,
    uplink_rx: &mut mpsc::UnboundedReceiver<AgentMessage>,
) -> anyhow::Result<SessionEnd> {
    let hello = {
        let journal = lock(&shared.journal);
        Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            capabilities: lock(&shared.verifier).capabilities.clone(),
            trust_bundle_version: *lock(&shared.trust_version),
            labels: shared.config.labels.clone().into_iter().collect(),
            in_flight_job_ids: journal.in_flight().into_iter().map(|e| e.job_id).collect(),
            last_sequence: journal.last_sequence(),
            hostname: crate::enroll::hostname(),
        }
    };
    // The transport comes from the endpoint URL (https:// gRPC, quic:// QUIC); everything
    // below is the same protocol on either.
    let link = match transport::open(endpoint, ca_pem, ident, msg(AgentBody::Hello(hello))).await {
        Ok(link) => link,
        Err(LinkError::Refused(why)) => return Ok(SessionEnd::Refused(why)),
        Err(LinkError::Broken(e)) => return Err(e),
    };
    let out_tx = link.outbound.clone();
    let mut inbound = link;

    let welcome = match tokio::time::timeout(Duration::from_secs(15), inbound.inbound.next()).await
    {
        Err(_) => anyhow::bail!("no welcome from the plane within 15s"),
        Ok(Some(Err(LinkError::Refused(why)))) => return Ok(SessionEnd::Refused(why)),
        Ok(Some(Err(LinkError::Broken(e)))) => return Err(e),
        Ok(m) => match m.and_then(|m| m.ok()).and_then(|m| m.body) {
            Some(PlaneBody::Welcome(w)) => w,
            Some(PlaneBody::Drain(d)) => {
                return Ok(SessionEnd::Drained(Duration::from_millis(u64::from(
                    d.reconnect_after_ms,
                ))));
            }
            _ => anyhow::bail!("the plane did not start with a welcome"),
        },
    };
    *established = true;
    tracing::info!(agent_id = %welcome.agent_id, %endpoint, "session established");
    let stored = lock(&shared.advertised).clone();
    if let Some(list) = advertised_to_adopt(endpoint, &welcome.agent_endpoints, &stored) {
        match write_json(
            &shared.dir.plane_endpoints_file(),
            &PlaneEndpoints {
                endpoints: list.clone(),
            },
        ) {
            Ok(()) => {
                tracing::info!(endpoints = ?list, "the plane advertises these agent endpoints; stored");
                *lock(&shared.advertised) = list;
            }
            Err(e) => tracing::warn!(error = %e, "cannot store the plane's endpoint list"),
        }
    }
    remember_targets(
        shared,
        welcome.targets.iter().map(|t| TargetRef {
            name: t.name.clone(),
            kind: t.kind.clone(),
            config: serde_json::from_str(&t.config_json).unwrap_or(serde_json::Value::Null),
        }),
    );
    if !welcome.trust_bundle.is_empty() {
        apply_trust_bundle(shared, &welcome.trust_bundle, &out_tx).await?;
    }
    let heartbeat_every = u64::try_from(welcome.heartbeat_interval_ms)
        .ok()
        .filter(|ms| *ms >= 100)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_HEARTBEAT);
    // A plane that answers heartbeats and stays silent for three intervals is gone, whatever
    // the transport still believes (half-open link, stopped process): reconnect.
    let silence_limit = welcome.answers_heartbeats.then_some(heartbeat_every * 3);
    let mut last_heard = tokio::time::Instant::now();

    // Unacknowledged results first: the plane may have lost nothing, but only it can say so.
    let spooled = lock(&shared.journal).spooled();
    for r in &spooled {
        out_tx.send(result_message(r)).await?;
    }
    out_tx.send(inventory_message(shared, None).await).await?;

    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.tick().await;
    let mut inventory = tokio::time::interval(shared.inventory_interval);
    inventory.tick().await;
    // Check often enough for short-lived certificates, rarely for long ones.
    let life = (ident.not_after - ident.not_before).max(1) as u64;
    let mut renewal_check =
        tokio::time::interval(Duration::from_millis((life * 1000 / 20).clamp(200, 60_000)));
    let mut renewal_pending = false;
    loop {
        tokio::select! {
            incoming = inbound.inbound.next() => {
                let incoming = match incoming {
                    None => return Ok(SessionEnd::Closed),
                    Some(Err(LinkError::Refused(why))) => return Ok(SessionEnd::Refused(why)),
                    Some(Err(LinkError::Broken(e))) => return Err(e.context("session stream")),
                    Some(Ok(m)) => m,
                };
                last_heard = tokio::time::Instant::now();
                match incoming.body {
                    Some(PlaneBody::Offer(offer)) => handle_offer(shared, offer, &out_tx).await?,
                    Some(PlaneBody::ResultAck(ack)) => {
                        if let Err(e) = lock(&shared.journal).acknowledge(&ack.job_id) {
                            tracing::error!(job_id = %ack.job_id, error = %e, "cannot drop acknowledged result from the spool");
                        }
                    }
                    Some(PlaneBody::Drain(d)) => {
                        return Ok(SessionEnd::Drained(Duration::from_millis(u64::from(d.reconnect_after_ms))));
                    }
                    Some(PlaneBody::Renewed(r)) => {
                        renewal_pending = false;
                        if !r.error.is_empty() {
                            tracing::warn!(error = %r.error, "the plane refused to renew the certificate; will retry");
                            continue;
                        }
                        let cfg = &shared.config;
                        match identity::install_renewed(&shared.dir, &cfg.agent_id, &cfg.trust_domain, &r.cert_pem)
                            .and_then(|()| identity::load(&shared.dir))
                        {
                            Ok(new_ident) => {
                                shared.renew_now.store(false, std::sync::atomic::Ordering::Relaxed);
                                use_identity(shared, &new_ident);
                                tracing::info!(not_after = new_ident.not_after, "certificate renewed in-band");
                                return Ok(SessionEnd::Renewed);
                            }
                            Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot install the renewed certificate; will retry"),
                        }
                    }
                    Some(PlaneBody::Trust(update)) => apply_trust_bundle(shared, &update.bundle, &out_tx).await?,
                    // Relay frames are for relays (`relay.rs`), never sent to a plain agent.
                    Some(PlaneBody::Welcome(_)) | Some(PlaneBody::Heartbeat(_)) | Some(PlaneBody::Relayed(_)) | Some(PlaneBody::RelayCert(_)) | None => {}
                }
            }
            Some(up) = uplink_rx.recv() => out_tx.send(up).await?,
            _ = tokio::time::sleep_until(last_heard + silence_limit.unwrap_or_default()), if silence_limit.is_some() => {
                anyhow::bail!("no message from the plane for {:?} (heartbeats unanswered); reconnecting", silence_limit.unwrap_or_default());
            }
            _ = heartbeat.tick() => {
                out_tx.send(msg(AgentBody::Heartbeat(Heartbeat { sent_at_unix_ms: now_ms() }))).await?;
            }
            _ = inventory.tick() => out_tx.send(inventory_message(shared, None).await).await?,
            _ = renewal_check.tick(), if !renewal_pending
                && (ident.renewal_due(unix_now()) || shared.renew_now.load(std::sync::atomic::Ordering::Relaxed)) => {
                let csr_pem = identity::stage_new_key(&shared.dir, &shared.config.agent_id)?;
                renewal_pending = true;
                tracing::info!("certificate past two thirds of its life; renewing in-band");
                out_tx.send(msg(AgentBody::Renew(stella_proto::RenewRequest { csr_pem }))).await?;
            }
        }
    }
}

/// Adopts a newer trust bundle if it is signed by a key this agent already trusts, and tells
/// the plane which version it holds. A bundle that does not verify changes nothing.
async fn apply_trust_bundle(
    shared: &Arc<Shared>,
    bundle: &[u8],
    out: &mpsc::Sender<AgentMessage>,
) -> anyhow::Result<()> {
    let current = *lock(&shared.trust_version);
    let envelope: stella_pki::Envelope = match serde_json::from_slice(bundle) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable trust bundle ignored");
            return Ok(());
        }
    };
    let trusted = lock(&shared.verifier).trusted.clone();
    let version = match stella_pki::verify_bundle(&trusted, current, &envelope) {
        Ok(doc) => {
            let keys = stella_pki::TrustedKeys {
                keys: doc.job_signing_keys,
            };
            write_json(&shared.dir.trust_file(), &keys).context("writing trust.json")?;
            crate::config::write_atomic(
                &shared.dir.trust_version_file(),
                doc.version.to_string().as_bytes(),
            )
            .context("writing trust.version")?;
            lock(&shared.verifier).trusted = keys;
            if let Some(newest) = doc.ca_pems.last() {
                let all: String = doc.ca_pems.concat();
                crate::config::write_atomic(&shared.dir.ca_file(), all.as_bytes())
                    .context("writing ca.pem")?;
                let ours = identity::load(&shared.dir)?;
                if !stella_pki::issued_by(&ours.cert_der, newest) {
                    tracing::info!("a new CA is being rolled out; renewing under it");
                    shared
                        .renew_now
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            *lock(&shared.trust_version) = doc.version;
            tracing::info!(version = doc.version, "trust bundle updated");
            doc.version
        }
        Err(stella_pki::BundleError::Stale { .. }) => current,
        Err(e) => {
            tracing::error!(error = %e, "trust bundle refused; keeping the keys pinned so far");
            return Ok(());
        }
    };
    out.send(msg(AgentBody::TrustAck(stella_proto::TrustBundleAck {
        version,
    })))
    .await?;
    Ok(())
}

fn remember_targets(shared: &Shared, targets: impl Iterator<Item = TargetRef>) {
    let mut known = lock(&shared.targets);
    let mut changed = false;
    for t in targets {
        if known.get(&t.name) != Some(&t) {
            known.insert(t.name.clone(), t);
            changed = true;
        }
    }
    if changed && let Err(e) = write_json(&shared.dir.targets_file(), &*known) {
        tracing::warn!(error = %e, "cannot persist the target list");
    }
}

async fn handle_offer(
    shared: &Arc<Shared>,
    offer: JobOffer,
    out: &mpsc::Sender<AgentMessage>,
) -> anyhow::Result<()> {
    let digest = stella_pki::envelope_digest(&offer.envelope);
    let known = lock(&shared.journal).get(&offer.job_id).cloned();
    if let Some(entry) = known {
        if entry.envelope_digest != digest {
            // Never run (nor verified), and not refused either: a refusal would be journaled
            // and spooled over this job's own record and become its outcome at the plane — a
            // "nothing executed" for a job that ran or still runs. The job id is the identity:
            // answer with the accepted job's state, as for any re-offer.
            tracing::warn!(job_id = %offer.job_id, accepted = %entry.envelope_digest, offered = %digest,
                "another envelope under the id of an accepted job is ignored; answering with that job's state");
        }
        match (&entry.status, &entry.result) {
            (JournalStatus::Finished, Some(result)) => {
                // Idempotency: a re-offer of a finished job gets its stored result, not a re-run.
                tracing::info!(job_id = %offer.job_id, "re-offered job already ran; returning its stored result");
                out.send(result_message(result)).await?;
            }
            _ => {
                // Accepted earlier but not scheduled (the worker never got it, e.g. the session
                // that accepted it closed in between): schedule it now, or it never runs.
                if !lock(&shared.scheduled).contains(&offer.job_id) {
                    match work_item(&entry) {
                        Some(item) => {
                            tracing::info!(job_id = %offer.job_id, "re-offered job was accepted but never scheduled; scheduling it");
                            schedule(shared, item)?;
                        }
                        None => {
                            tracing::error!(job_id = %offer.job_id, "journal entry unreadable; job cannot run")
                        }
                    }
                }
                out.send(msg(AgentBody::Accepted(JobAccepted {
                    job_id: offer.job_id.clone(),
                })))
                .await?;
            }
        }
        return Ok(());
    }

    let last = lock(&shared.journal).last_sequence();
    let verified =
        lock(&shared.verifier).verify(&offer.envelope, time::OffsetDateTime::now_utc(), last);
    let (payload, _envelope) = match verified {
        Ok(v) => v,
        Err(refused) => {
            let r = refusal(
                &offer.job_id,
                &digest,
                refused.reason_code(),
                refused.to_string(),
            );
            return send_refusal(shared, r, out).await;
        }
    };
    if payload.job_id != offer.job_id {
        let r = refusal(
            &offer.job_id,
            &digest,
            JobRefusal::Malformed(String::new()).reason_code(),
            format!(
                "offer names job {} but the signed envelope is for job {}",
                offer.job_id, payload.job_id
            ),
        );
        return send_refusal(shared, r, out).await;
    }

    let entry = JournalEntry {
        job_id: payload.job_id.clone(),
        sequence: payload.sequence,
        envelope_digest: digest.clone(),
        status: JournalStatus::Accepted,
        result: None,
        envelope: String::from_utf8_lossy(&offer.envelope).into_owned(),
        not_after_unix_ms: Some((payload.not_after.unix_timestamp_nanos() / 1_000_000) as i64),
    };
    lock(&shared.journal)
        .accept(entry)
        .context("journaling an accepted job")?;
    tracing::info!(job_id = %payload.job_id, sequence = payload.sequence, target = %payload.target.name, "job verified and accepted");
    let job_id = payload.job_id.clone();
    // Scheduled before the plane is told: if telling it fails (the session is closing), the
    // journaled job still runs and its result is spooled for the next session.
    schedule(
        shared,
        WorkItem {
            payload,
            envelope_digest: digest,
        },
    )?;
    out.send(msg(AgentBody::Accepted(JobAccepted { job_id })))
        .await?;
    Ok(())
}

/// Hands a job to the worker unless it is already queued or running.
fn schedule(shared: &Shared, item: WorkItem) -> anyhow::Result<()> {
    if !lock(&shared.scheduled).insert(item.payload.job_id.clone()) {
        return Ok(());
    }
    shared
        .work
        .send(item)
        .map_err(|_| anyhow::anyhow!("job worker stopped"))
}

/// Rebuilds the work item of a journaled job from its verified envelope.
fn work_item(entry: &JournalEntry) -> Option<WorkItem> {
    let envelope = serde_json::from_str::<stella_pki::Envelope>(&entry.envelope).ok()?;
    let bytes = stella_pki::decode_payload(&envelope).ok()?;
    let payload = serde_json::from_slice::<JobPayload>(&bytes).ok()?;
    Some(WorkItem {
        payload,
        envelope_digest: entry.envelope_digest.clone(),
    })
}

fn refusal(job_id: &str, digest: &str, reason: &str, message: String) -> StoredResult {
    let now = now_ms();
    StoredResult {
        job_id: job_id.to_string(),
        status: "refused".to_string(),
        reason_code: reason.to_string(),
        message,
        outcome_json: String::new(),
        envelope_digest: digest.to_string(),
        started_at_unix_ms: now,
        finished_at_unix_ms: now,
        receipt: String::new(),
    }
}

async fn send_refusal(
    shared: &Arc<Shared>,
    mut result: StoredResult,
    out: &mpsc::Sender<AgentMessage>,
) -> anyhow::Result<()> {
    lock(&shared.receipts).sign(&mut result);
    tracing::warn!(job_id = %result.job_id, reason = %result.reason_code, message = %result.message, "job refused; nothing executed");
    if Journal::can_spool(&result.job_id)
        && let Err(e) = lock(&shared.journal).finish(result.clone())
    {
        tracing::error!(error = %e, "cannot spool a refusal");
    }
    out.send(result_message(&result)).await?;
    Ok(())
}

struct UplinkProgress {
    job_id: String,
    uplink: mpsc::UnboundedSender<AgentMessage>,
}

impl ProgressSink for UplinkProgress {
    fn progress(&self, message: &str) {
        let _ = self.uplink.send(msg(AgentBody::Progress(JobProgress {
            job_id: self.job_id.clone(),
            message: message.to_string(),
            at_unix_ms: now_ms(),
        })));
    }
}

/// Executes jobs one at a time, in the order they were accepted.
async fn worker(shared: Arc<Shared>, mut work: mpsc::UnboundedReceiver<WorkItem>) {
    while let Some(item) = work.recv().await {
        let job_id = item.payload.job_id.clone();
        let mut result = {
            let _busy = shared.busy.lock().await;
            execute(&shared, &item).await
        };
        lock(&shared.receipts).sign(&mut result);
        if let Err(e) = lock(&shared.journal).finish(result.clone()) {
            // The result still goes out; only its durability across a crash is lost, and a
            // re-offer then re-runs an ensure operation.
            tracing::error!(job_id = %job_id, error = %e, "cannot journal a job result");
        }
        // Only after the journal says finished: a re-offer in between must not schedule it again.
        lock(&shared.scheduled).remove(&job_id);
        tracing::info!(job_id = %job_id, status = %result.status, reason = %result.reason_code, "job finished");
        let _ = shared.uplink.send(result_message(&result));
        let target = item.payload.target.name.clone();
        let _ = shared
            .uplink
            .send(inventory_message(&shared, Some(&target)).await);
    }
}

async fn execute(shared: &Shared, item: &WorkItem) -> StoredResult {
    let started = now_ms();
    let p = &item.payload;
    let target = TargetRef {
        name: p.target.name.clone(),
        kind: p.target.kind.clone(),
        config: p.target.config.clone(),
    };
    remember_targets(shared, std::iter::once(target.clone()));
    let finish = |status: &str, reason: &str, message: String, outcome: String| StoredResult {
        job_id: p.job_id.clone(),
        status: status.to_string(),
        reason_code: reason.to_string(),
        message,
        outcome_json: outcome,
        envelope_digest: item.envelope_digest.clone(),
        started_at_unix_ms: started,
        finished_at_unix_ms: now_ms(),
        receipt: String::new(),
    };
    // Health probes and scripts run here, without an executor.
    let step_progress = UplinkProgress {
        job_id: p.job_id.clone(),
        uplink: shared.uplink.clone(),
    };
    if let Some(r) = crate::steps::run(&shared.dir.steps_dir(), p, &step_progress).await {
        return finish(r.status, r.reason_code, r.message, r.outcome.to_string());
    }
    let Some(executor) = shared.executors.get(&target.kind) else {
        return finish(
            "refused",
            "unsupported_target",
            format!("no {} executor on this agent", target.kind),
            String::new(),
        );
    };
    let spec = DeploySpec {
        job_id: p.job_id.clone(),
        deployment_id: p.deployment_id.clone(),
        release_id: p.release_id.clone(),
        release_name: p.release_name.clone(),
        target: target.clone(),
        components: p
            .components
            .iter()
            .map(|c| ComponentSpec {
                name: c.name.clone(),
                image: c.image.clone(),
                digest: c.digest.clone(),
            })
            .collect(),
        strategy: match p.strategy {
            stella_pki::DeployMode::Replace => DeployMode::Replace,
            stella_pki::DeployMode::BlueGreen => DeployMode::BlueGreen,
        },
    };
    let progress = UplinkProgress {
        job_id: p.job_id.clone(),
        uplink: shared.uplink.clone(),
    };
    let failure = |e: PluginError| {
        // A digest the agent cannot honour is a refusal: nothing was changed on the target.
        let status = if matches!(
            e,
            PluginError::DigestMismatch { .. }
                | PluginError::InvalidConfig(_)
                | PluginError::UnsupportedStrategy { .. }
        ) {
            "refused"
        } else {
            "failed"
        };
        let outcome = serde_json::json!({ "error": e.to_string() }).to_string();
        finish(status, e.reason_code(), e.to_string(), outcome)
    };
    // Before anything else reaches the executor: one that cannot switch blue-green would
    // otherwise replace in place, which is not what the job asked for.
    if !executor.supports(spec.strategy) {
        return failure(PluginError::UnsupportedStrategy {
            kind: target.kind.clone(),
            strategy: spec.strategy.name(),
        });
    }
    if let Err(e) = executor.validate_config(&target) {
        return failure(e);
    }
    let outcome = match executor.deploy(&spec, &progress).await {
        Ok(o) => o,
        Err(e) => return failure(e),
    };
    let written_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    if let Err(e) = executor
        .write_sticker(&target, &VersionSticker::for_deploy(&spec, written_at))
        .await
    {
        return failure(e);
    }
    progress.progress("version sticker written");
    let outcome_json = serde_json::to_string(&outcome).unwrap_or_default();
    finish("succeeded", "", String::new(), outcome_json)
}

async fn inventory_message(shared: &Shared, only: Option<&str>) -> AgentMessage {
    let targets: Vec<TargetRef> = lock(&shared.targets)
        .values()
        .filter(|t| only.is_none_or(|o| o == t.name))
        .cloned()
        .collect();
    let mut report = InventoryReport {
        observed_at_unix_ms: now_ms(),
        targets: Vec::new(),
    };
    for t in targets {
        let Some(executor) = shared.executors.get(&t.kind) else {
            continue;
        };
        let mut entry = TargetInventory {
            target: t.name.clone(),
            kind: t.kind.clone(),
            ..Default::default()
        };
        match crate::inventory::workloads(executor.as_ref(), &t).await {
            Ok(workloads) => entry.workloads = workloads,
            Err(e) => entry.error = e.to_string(),
        }
        match executor.read_sticker(&t).await {
            Ok(Some(s)) => entry.sticker_json = serde_json::to_string(&s).unwrap_or_default(),
            Ok(None) => {}
            Err(e) if entry.error.is_empty() => entry.error = e.to_string(),
            Err(_) => {}
        }
        report.targets.push(entry);
    }
    msg(AgentBody::Inventory(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT_ID: &str = "agt_test";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_planes_endpoints_are_adopted_only_when_reached_through_one_of_them() {
        let advertised = strings(&["https://a:7444", "quic://b:7445"]);
        assert_eq!(
            advertised_to_adopt("https://a:7444/", &advertised, &[]),
            Some(advertised.clone())
        );
        // Already stored: nothing to write.
        assert_eq!(
            advertised_to_adopt("quic://b:7445", &advertised, &advertised),
            None
        );
        // Behind a relay or a proxy the agent dials an address the plane does not list.
        assert_eq!(
            advertised_to_adopt("https://relay:7450", &advertised, &[]),
            None
        );
        // A plane that advertises nothing, or something unusable, changes nothing.
        assert_eq!(advertised_to_adopt("https://a:7444", &[], &[]), None);
        assert_eq!(
            advertised_to_adopt(
                "https://a:7444",
                &strings(&["https://a:7444", "http://c:1"]),
                &[]
            ),
            None
        );
    }

    /// An agent's shared state over a temporary data directory, trusting `key`, with no
    /// executors (nothing runs: the tests read what was handed to the worker).
    fn test_shared(
        root: &std::path::Path,
        key: &stella_pki::SigningKey,
    ) -> (Arc<Shared>, mpsc::UnboundedReceiver<WorkItem>) {
        let dir = DataDir::new(root);
        let (uplink, _) = mpsc::unbounded_channel();
        let (work, work_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            config: AgentConfig {
                agent_id: AGENT_ID.to_string(),
                name: "test".to_string(),
                api_url: String::new(),
                agent_endpoint: String::new(),
                fallback_endpoints: Vec::new(),
                trust_domain: String::new(),
                labels: BTreeMap::new(),
                ca_fingerprint: String::new(),
                enrolled_at: String::new(),
            },
            verifier: Mutex::new(JobVerifier {
                agent_id: AGENT_ID.to_string(),
                trusted: stella_pki::TrustedKeys {
                    keys: vec![key.public_key()],
                },
                capabilities: vec!["docker".to_string()],
            }),
            trust_version: Mutex::new(0),
            renew_now: std::sync::atomic::AtomicBool::new(false),
            executors: Executors::new(),
            journal: Mutex::new(
                Journal::open(dir.journal_dir(), dir.spool_dir()).expect("journal"),
            ),
            targets: Mutex::new(BTreeMap::new()),
            dir,
            uplink,
            work,
            busy: tokio::sync::Mutex::new(()),
            scheduled: Mutex::new(HashSet::new()),
            receipts: Mutex::new(ReceiptSigner {
                agent_id: AGENT_ID.to_string(),
                key_pem: String::new(),
                cert_der: Vec::new(),
            }),
            inventory_interval: INVENTORY_INTERVAL,
            advertised: Mutex::new(Vec::new()),
        });
        (shared, work_rx)
    }

    fn signed_offer(key: &stella_pki::SigningKey, job_id: &str, sequence: u64) -> JobOffer {
        let issued_at = time::OffsetDateTime::now_utc();
        let payload = JobPayload {
            job_id: job_id.to_string(),
            agent_id: AGENT_ID.to_string(),
            target: stella_pki::JobTarget {
                name: "web".to_string(),
                kind: "docker".to_string(),
                config: serde_json::Value::Null,
            },
            kind: stella_pki::JobKind::Deploy,
            deployment_id: "dep_test".to_string(),
            release_id: "rel_test".to_string(),
            release_name: "r1".to_string(),
            components: vec![stella_pki::JobComponent {
                name: "app".to_string(),
                image: "demo/app:1".to_string(),
                digest: format!("sha256:{}", "ab".repeat(32)),
            }],
            issued_at,
            not_after: issued_at + Duration::from_secs(3600),
            sequence,
            idempotency_key: format!("dep_test/{job_id}"),
            strategy: Default::default(),
        };
        let envelope = stella_pki::sign_job(key, &payload).expect("sign");
        JobOffer {
            job_id: job_id.to_string(),
            envelope: serde_json::to_vec(&envelope).expect("json"),
        }
    }

    /// Invariant 5: the session that delivered an offer closes while the agent accepts it. The
    /// job is journaled as accepted, so the next hello lists it in flight and the plane never
    /// offers it again: it must run anyway.
    #[tokio::test]
    async fn a_job_accepted_while_its_session_closes_still_runs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = stella_pki::SigningKey::generate();
        let (shared, mut work_rx) = test_shared(tmp.path(), &key);
        let (out, out_rx) = mpsc::channel(4);
        drop(out_rx);

        let answered = handle_offer(&shared, signed_offer(&key, "job_1", 1), &out).await;

        assert!(answered.is_err(), "the closed session cannot be told");
        let entry = lock(&shared.journal)
            .get("job_1")
            .cloned()
            .expect("journaled");
        assert_eq!(entry.status, JournalStatus::Accepted);
        let item = work_rx
            .try_recv()
            .expect("the accepted job reached the worker");
        assert_eq!(item.payload.job_id, "job_1");
    }

    /// A re-offer of a job the journal holds as accepted but that is neither queued nor running
    /// schedules it (once), and answers `Accepted`.
    #[tokio::test]
    async fn a_reoffered_job_accepted_but_never_scheduled_is_scheduled_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = stella_pki::SigningKey::generate();
        let (shared, mut work_rx) = test_shared(tmp.path(), &key);
        let offer = signed_offer(&key, "job_2", 1);
        lock(&shared.journal)
            .accept(JournalEntry {
                job_id: "job_2".to_string(),
                sequence: 1,
                envelope_digest: stella_pki::envelope_digest(&offer.envelope),
                status: JournalStatus::Accepted,
                result: None,
                envelope: String::from_utf8_lossy(&offer.envelope).into_owned(),
                not_after_unix_ms: None,
            })
            .expect("journal");
        let (out, mut out_rx) = mpsc::channel(4);

        handle_offer(&shared, offer.clone(), &out)
            .await
            .expect("re-offer");
        handle_offer(&shared, offer, &out)
            .await
            .expect("second re-offer");

        let item = work_rx.try_recv().expect("scheduled");
        assert_eq!(item.payload.job_id, "job_2");
        assert!(work_rx.try_recv().is_err(), "scheduled twice");
        for _ in 0..2 {
            let answer = out_rx.try_recv().expect("an answer per offer");
            assert!(matches!(answer.body, Some(AgentBody::Accepted(a)) if a.job_id == "job_2"));
        }
    }

    /// Another envelope under the id of a job already accepted (a job re-signed by a key
    /// rotation, or an older envelope replayed) is never run, and it must not become that job's
    /// outcome either: a "refused" recorded for a job that ran — or still runs — would be the
    /// wrong one. The answer is the accepted job's own state, and its journal and spool stay.
    #[tokio::test]
    async fn another_envelope_under_an_accepted_job_id_does_not_replace_its_outcome() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key = stella_pki::SigningKey::generate();
        let (shared, mut work_rx) = test_shared(tmp.path(), &key);
        let (out, mut out_rx) = mpsc::channel(8);
        let genuine = signed_offer(&key, "job_4", 1);
        handle_offer(&shared, genuine.clone(), &out)
            .await
            .expect("offer");
        assert!(matches!(
            out_rx.try_recv().expect("answer").body,
            Some(AgentBody::Accepted(_))
        ));
        assert!(work_rx.try_recv().is_ok(), "scheduled");
        let other = signed_offer(&key, "job_4", 2);

        // While it runs.
        handle_offer(&shared, other.clone(), &out)
            .await
            .expect("other envelope");
        let answer = out_rx.try_recv().expect("an answer");
        assert!(
            matches!(answer.body, Some(AgentBody::Accepted(ref a)) if a.job_id == "job_4"),
            "{answer:?}"
        );
        let entry = lock(&shared.journal)
            .get("job_4")
            .cloned()
            .expect("journaled");
        assert_eq!(entry.status, JournalStatus::Accepted);
        assert_eq!(
            entry.envelope_digest,
            stella_pki::envelope_digest(&genuine.envelope)
        );
        assert!(
            lock(&shared.journal).spooled().is_empty(),
            "nothing to report yet"
        );

        // Once it finished.
        let done = StoredResult {
            job_id: "job_4".to_string(),
            status: "succeeded".to_string(),
            reason_code: String::new(),
            message: String::new(),
            outcome_json: "{}".to_string(),
            envelope_digest: entry.envelope_digest.clone(),
            started_at_unix_ms: 1,
            finished_at_unix_ms: 2,
            receipt: String::new(),
        };
        lock(&shared.journal).finish(done.clone()).expect("finish");
        handle_offer(&shared, other, &out)
            .await
            .expect("other envelope");
        let answer = out_rx.try_recv().expect("an answer");
        assert!(
            matches!(answer.body, Some(AgentBody::Result(ref r)) if r.status == JobStatus::Succeeded as i32),
            "{answer:?}"
        );
        assert_eq!(lock(&shared.journal).spooled(), vec![done.clone()]);
        assert_eq!(
            lock(&shared.journal)
                .get("job_4")
                .and_then(|e| e.result.clone()),
            Some(done)
        );
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= BACKOFF_CAP, "attempt {attempt}: {d:?}");
            let bound = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_CAP);
            assert!(d <= bound);
        }
        // Full jitter: over many draws at the cap, values spread over the range.
        let draws: Vec<Duration> = (0..200).map(|_| backoff(20)).collect();
        assert!(draws.iter().any(|d| *d < BACKOFF_CAP / 2));
        assert!(draws.iter().any(|d| *d > BACKOFF_CAP / 2));
    }
}
