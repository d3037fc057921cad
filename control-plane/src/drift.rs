//! Drift in the plane: every inventory report an agent sends is compared with what should run
//! on its targets (`stella-drift` decides), findings are kept with their history, ignore rules
//! silence known differences, and each environment's remediation policy either notifies
//! people or reconciles — a normal signed deployment of the desired release to that target.
//!
//! Reports reach a queue from the agent session and are evaluated by one worker task, so a
//! burst of reports never blocks a session, and the latest report per target wins. A report
//! is not evaluated while a job for its target is unfinished (a deploy in progress is not
//! drift), nor when it was taken before the target's last job ended (its result arrived
//! first), nor when it is older than the last one evaluated.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use stella_drift::{
    Decision, DesiredComponent, DesiredTarget, Finding, FindingKind, IgnoreRule, IgnoreRules,
    IgnoreScope, ObservedItem, ObservedSticker, ObservedTarget, ReconcileOutcome, RemediationMode,
    RemediationPolicy, Remediator, Selector, StickerComponent, WorkloadState,
};
use stella_proto::{InventoryReport, TargetInventory};
use time::OffsetDateTime;

use crate::deployments::{self, TERMINAL_JOB_STATUSES};
use crate::environments;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, PlaneEvent, SharedState};
use crate::store::{new_id, now_ms, rfc3339};
use crate::targets;

/// Inventory reports waiting for evaluation, latest per target.
#[derive(Default)]
pub struct DriftQueue {
    pending: std::sync::Mutex<BTreeMap<String, Pending>>,
    wake: tokio::sync::Notify,
}

struct Pending {
    agent_id: String,
    observed_at_ms: i64,
    inventory: TargetInventory,
}

impl DriftQueue {
    /// Queues every target of `report` for evaluation; cheap, never waits on storage.
    pub fn submit(&self, agent_id: &str, report: &InventoryReport) {
        let observed_at_ms = if report.observed_at_unix_ms > 0 {
            report.observed_at_unix_ms
        } else {
            now_ms()
        };
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for t in &report.targets {
            let newer = pending
                .get(&t.target)
                .is_none_or(|p| p.observed_at_ms <= observed_at_ms);
            if newer {
                pending.insert(
                    t.target.clone(),
                    Pending {
                        agent_id: agent_id.to_string(),
                        observed_at_ms,
                        inventory: t.clone(),
                    },
                );
            }
        }
        drop(pending);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Pending> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *pending).into_values().collect()
    }
}

/// Evaluates queued reports until the plane shuts down.
pub fn spawn_worker(state: SharedState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = state.shutdown.clone();
        loop {
            tokio::select! {
                _ = state.drift.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            for pending in state.drift.take() {
                let target = pending.inventory.target.clone();
                if let Err(e) = evaluate(&state, pending).await {
                    tracing::error!(target, error = %e, "drift evaluation failed");
                }
            }
        }
    })
}

struct TargetRow {
    id: String,
    name: String,
    kind: String,
    environment_id: String,
    environment: String,
}

async fn target_of_agent(
    state: &AppState,
    name: &str,
    agent_id: &str,
) -> ApiResult<Option<TargetRow>> {
    let row = sqlx::query(
        "SELECT t.id, t.name, t.kind, t.environment_id, e.name AS environment
         FROM targets t JOIN environments e ON e.id = t.environment_id
         WHERE t.name = $1 AND t.agent_id = $2",
    )
    .bind(name)
    .bind(agent_id)
    .fetch_optional(&state.db)
    .await?;
    Ok(row.map(|r| TargetRow {
        id: r.get("id"),
        name: r.get("name"),
        kind: r.get("kind"),
        environment_id: r.get("environment_id"),
        environment: r.get("environment"),
    }))
}

/// A target's remediation state as stored.
#[derive(Default)]
struct Tracked {
    remediator: Remediator,
    reconcile_deployment_id: Option<String>,
    decision: Option<Decision>,
    observed_at: i64,
    evaluated_at: Option<i64>,
}

async fn load_tracked(state: &AppState, target_id: &str) -> ApiResult<Tracked> {
    let row = sqlx::query(
        "SELECT remediator, reconcile_deployment_id, decision, observed_at, evaluated_at
         FROM drift_targets WHERE target_id = $1",
    )
    .bind(target_id)
    .fetch_optional(&state.db)
    .await?;
    let Some(row) = row else {
        return Ok(Tracked::default());
    };
    let remediator: Remediator = serde_json::from_str(row.get::<&str, _>("remediator"))
        .map_err(|e| ApiError::Internal(format!("stored remediation state unreadable: {e}")))?;
    Ok(Tracked {
        remediator,
        reconcile_deployment_id: row.get("reconcile_deployment_id"),
        decision: serde_json::from_str(row.get::<&str, _>("decision")).ok(),
        observed_at: row.get("observed_at"),
        evaluated_at: Some(row.get("evaluated_at")),
    })
}

async fn save_tracked(
    conn: &mut sqlx::AnyConnection,
    target_id: &str,
    tracked: &Tracked,
) -> ApiResult<()> {
    let remediator = serde_json::to_string(&tracked.remediator)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let decision = match &tracked.decision {
        Some(d) => serde_json::to_string(d).map_err(|e| ApiError::Internal(e.to_string()))?,
        None => String::new(),
    };
    sqlx::query(
        "INSERT INTO drift_targets (target_id, remediator, reconcile_deployment_id, decision,
            observed_at, evaluated_at) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (target_id) DO UPDATE SET remediator = excluded.remediator,
            reconcile_deployment_id = excluded.reconcile_deployment_id,
            decision = excluded.decision, observed_at = excluded.observed_at,
            evaluated_at = excluded.evaluated_at",
    )
    .bind(target_id)
    .bind(remediator)
    .bind(&tracked.reconcile_deployment_id)
    .bind(decision)
    .bind(tracked.observed_at)
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The last successful deployment to the target: its release and components.
async fn desired_state(state: &AppState, target: &TargetRow) -> ApiResult<Option<DesiredTarget>> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT d.id, d.release_id FROM jobs j JOIN deployments d ON d.id = j.deployment_id
         WHERE j.target_id = $1 AND j.status = 'succeeded' AND j.kind = 'deploy'
         ORDER BY j.finished_at DESC, j.sequence DESC LIMIT 1",
    )
    .bind(&target.id)
    .fetch_optional(&state.db)
    .await?;
    let Some((deployment_id, release_id)) = row else {
        return Ok(None);
    };
    let components = crate::releases::components(state, &release_id)
        .await?
        .into_iter()
        .map(|c| DesiredComponent {
            name: c.name,
            image: c.image,
            digest: c.digest,
        })
        .collect();
    Ok(Some(DesiredTarget {
        target: target.name.clone(),
        kind: target.kind.clone(),
        release: release_id,
        deployment_id,
        components,
        // Every executor writes a sticker after a successful deploy.
        sticker_expected: true,
    }))
}

/// The agent's clock when the target's last finished job ended, from its signed receipt
/// (the same clock as the reports' `observed_at`).
async fn last_job_end_on_agent_clock(state: &AppState, target_id: &str) -> ApiResult<Option<i64>> {
    let receipt: Option<(String,)> = sqlx::query_as(
        "SELECT receipt FROM jobs WHERE target_id = $1 AND finished_at IS NOT NULL
         ORDER BY finished_at DESC LIMIT 1",
    )
    .bind(target_id)
    .fetch_optional(&state.db)
    .await?;
    Ok(receipt.and_then(|(r,)| {
        let envelope: stella_pki::Envelope = serde_json::from_str(&r).ok()?;
        let payload = stella_pki::decode_payload(&envelope).ok()?;
        let receipt: stella_pki::ReceiptPayload = serde_json::from_slice(&payload).ok()?;
        Some(receipt.finished_at_unix_ms)
    }))
}

fn observed_target(name: &str, p: &Pending) -> ObservedTarget {
    let observed_at =
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(p.observed_at_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let items = p
        .inventory
        .workloads
        .iter()
        .map(|w| ObservedItem {
            component: non_empty(&w.component),
            name: non_empty(&w.name).unwrap_or_else(|| w.workload_id.clone()),
            image: w.image.clone(),
            digest: non_empty(&w.digest),
            state: WorkloadState::from_reported(&w.state),
            managed: !w.unmanaged,
            labels: w.labels.clone().into_iter().collect(),
        })
        .collect();
    let sticker = serde_json::from_str::<serde_json::Value>(&p.inventory.sticker_json)
        .ok()
        .filter(|v| v.is_object())
        .map(|v| ObservedSticker {
            release: v["release_id"].as_str().unwrap_or_default().to_string(),
            deployment_id: v["deployment_id"].as_str().unwrap_or_default().to_string(),
            components: v["components"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .map(|c| StickerComponent {
                            name: c["name"].as_str().unwrap_or_default().to_string(),
                            digest: c["digest"].as_str().unwrap_or_default().to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    ObservedTarget {
        target: name.to_string(),
        observed_at,
        items,
        sticker,
    }
}

async fn load_rules(state: &AppState, environment_id: &str) -> ApiResult<IgnoreRules> {
    let rows = sqlx::query(
        "SELECT r.id, t.name AS target, r.selector FROM drift_ignore_rules r
         LEFT JOIN targets t ON t.id = r.target_id WHERE r.environment_id = $1 ORDER BY r.created_at, r.id",
    )
    .bind(environment_id)
    .fetch_all(&state.db)
    .await?;
    let mut rules = IgnoreRules::default();
    for r in rows {
        let selector: &str = r.get("selector");
        let target: Option<String> = r.get("target");
        match Selector::from_str(selector) {
            Ok(selector) => rules.push(IgnoreRule::new(
                target.map_or(IgnoreScope::Environment, IgnoreScope::Target),
                selector,
            )),
            // Rules are checked when created; an unreadable one silences nothing.
            Err(e) => {
                tracing::error!(rule = %r.get::<&str, _>("id"), error = %e, "stored ignore rule unreadable")
            }
        }
    }
    Ok(rules)
}

async fn load_policy(
    state: &AppState,
    environment_id: &str,
) -> ApiResult<(RemediationPolicy, String)> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT policy, webhook FROM drift_policies WHERE environment_id = $1")
            .bind(environment_id)
            .fetch_optional(&state.db)
            .await?;
    match row {
        None => Ok((RemediationPolicy::default(), String::new())),
        Some((policy, webhook)) => Ok((
            serde_json::from_str(&policy)
                .map_err(|e| ApiError::Internal(format!("stored drift policy unreadable: {e}")))?,
            webhook,
        )),
    }
}

/// How a reconcile deployment ended; `None` while it runs.
async fn reconcile_outcome(
    state: &AppState,
    deployment_id: &str,
) -> ApiResult<Option<ReconcileOutcome>> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT d.status, COALESCE((SELECT j.reason_code || ': ' || j.message FROM jobs j
             WHERE j.deployment_id = d.id AND j.status != 'succeeded' LIMIT 1), d.message)
         FROM deployments d WHERE d.id = $1",
    )
    .bind(deployment_id)
    .fetch_optional(&state.db)
    .await?;
    Ok(match row {
        None => Some(ReconcileOutcome::Failed {
            error: format!("reconcile deployment {deployment_id} was never created"),
        }),
        Some((status, _)) if status == "running" => None,
        Some((status, _)) if status == "succeeded" => Some(ReconcileOutcome::Succeeded),
        Some((_, error)) => Some(ReconcileOutcome::Failed { error }),
    })
}

async fn evaluate(state: &AppState, p: Pending) -> ApiResult<()> {
    let Some(target) = target_of_agent(state, &p.inventory.target, &p.agent_id).await? else {
        return Ok(());
    };
    if !p.inventory.error.is_empty() {
        // An unreadable target is not a target where everything is missing.
        tracing::debug!(target = %target.name, "inventory with an error: drift not evaluated");
        return Ok(());
    }
    let mut tracked = load_tracked(state, &target.id).await?;
    if p.observed_at_ms <= tracked.observed_at {
        return Ok(());
    }
    let unfinished: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM jobs WHERE target_id = $1 AND status NOT IN ({})",
        TERMINAL_JOB_STATUSES
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
    .bind(&target.id)
    .fetch_one(&state.db)
    .await?;
    if unfinished > 0 {
        return Ok(());
    }
    if last_job_end_on_agent_clock(state, &target.id)
        .await?
        .is_some_and(|ended| p.observed_at_ms < ended)
    {
        return Ok(());
    }

    let desired = desired_state(state, &target).await?;
    let (policy, webhook) = load_policy(state, &target.environment_id).await?;
    let rules = load_rules(state, &target.environment_id).await?;
    let observed = observed_target(&target.name, &p);
    let now = OffsetDateTime::now_utc();
    let findings = match stella_drift::detect(desired.as_ref(), &observed, &rules, now) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(target = %target.name, error = %e, "drift detection refused its input");
            return Ok(());
        }
    };

    let mut settled = None;
    if let Some(deployment_id) = tracked.reconcile_deployment_id.clone() {
        match reconcile_outcome(state, &deployment_id).await? {
            None => {}
            Some(outcome) => {
                if let Err(e) =
                    tracked
                        .remediator
                        .record_outcome(&policy, &target.name, outcome.clone(), now)
                {
                    tracing::warn!(target = %target.name, error = %e, "reconcile outcome not recorded");
                }
                tracked.reconcile_deployment_id = None;
                settled = Some((deployment_id, outcome));
            }
        }
    }
    let decision = match &desired {
        Some(d) => tracked
            .remediator
            .decide(&policy, d, &findings, now)
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        None => Decision::InSync,
    };
    let reconcile = match &decision {
        Decision::Reconcile { release, .. } => Some((new_id("dep"), release.clone())),
        _ => None,
    };
    if let Some((deployment_id, _)) = &reconcile {
        tracked.reconcile_deployment_id = Some(deployment_id.clone());
    }
    let decision_changed = tracked.decision.as_ref() != Some(&decision);
    tracked.decision = Some(decision.clone());
    tracked.observed_at = p.observed_at_ms;

    let at = now_ms();
    let mut tx = crate::store::write_tx(&state.db).await?;
    let change = store_findings(&mut tx, &target.id, &findings, at).await?;
    if let Some((deployment_id, outcome)) = &settled {
        let (label, error) = match outcome {
            ReconcileOutcome::Succeeded => ("succeeded", String::new()),
            ReconcileOutcome::Failed { error } => ("failed", error.clone()),
        };
        sqlx::query(
            "UPDATE drift_reconciles SET outcome = $1, error = $2, finished_at = $3 WHERE deployment_id = $4",
        )
        .bind(label)
        .bind(error)
        .bind(at)
        .bind(deployment_id)
        .execute(&mut *tx)
        .await?;
    }
    if let Some((deployment_id, release)) = &reconcile {
        sqlx::query(
            "INSERT INTO drift_reconciles (deployment_id, target_id, release_id, issued_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(deployment_id)
        .bind(&target.id)
        .bind(release)
        .bind(at)
        .execute(&mut *tx)
        .await?;
    }
    // Persisted before the deployment exists: a plane stopped in between finds a reconcile in
    // flight whose deployment was never created, and records it as failed.
    save_tracked(&mut tx, &target.id, &tracked).await?;
    tx.commit().await?;

    if let Some((deployment_id, release)) = reconcile {
        issue_reconcile(
            state,
            &target,
            &policy,
            &mut tracked,
            deployment_id,
            release,
        )
        .await?;
    }
    if !change.opened.is_empty() || !change.resolved.is_empty() || decision_changed {
        tracing::info!(target = %target.name, opened = change.opened.len(), resolved = change.resolved.len(),
            decision = ?tracked.decision, "drift changed");
        publish(state, &target.name);
        if !webhook.is_empty() {
            let body = serde_json::json!({
                "event": "drift",
                "target": target.name,
                "environment": target.environment,
                "opened": change.opened.iter().map(finding_json).collect::<Vec<_>>(),
                "resolved": change.resolved,
                "open": findings.len(),
                "decision": tracked.decision,
            });
            tokio::spawn(post_webhook(webhook, body));
        }
    }
    Ok(())
}

fn finding_json(f: &Finding) -> serde_json::Value {
    serde_json::json!({
        "kind": f.kind, "severity": f.severity, "component": f.component,
        "workload": f.workload, "expected": f.expected, "observed": f.observed,
        "detail": f.detail, "fingerprint": f.fingerprint,
    })
}

async fn issue_reconcile(
    state: &AppState,
    target: &TargetRow,
    policy: &RemediationPolicy,
    tracked: &mut Tracked,
    deployment_id: String,
    release: String,
) -> ApiResult<()> {
    tracing::info!(target = %target.name, deployment_id, release, "drift: reconciling");
    let created = deployments::create(
        state,
        deployments::CreateDeployment {
            release,
            env: target.environment_id.clone(),
            targets: vec![target.name.clone()],
            selector: BTreeMap::new(),
            id: Some(deployment_id.clone()),
        },
    )
    .await;
    if let Err(e) = created {
        tracing::warn!(target = %target.name, error = %e, "reconcile deployment refused");
        let now = OffsetDateTime::now_utc();
        let error = format!("reconcile deployment refused: {e}");
        if let Err(e) = tracked.remediator.record_outcome(
            policy,
            &target.name,
            ReconcileOutcome::Failed {
                error: error.clone(),
            },
            now,
        ) {
            tracing::warn!(target = %target.name, error = %e, "reconcile outcome not recorded");
        }
        tracked.reconcile_deployment_id = None;
        let mut tx = crate::store::write_tx(&state.db).await?;
        sqlx::query(
            "UPDATE drift_reconciles SET outcome = 'failed', error = $1, finished_at = $2 WHERE deployment_id = $3",
        )
        .bind(error)
        .bind(now_ms())
        .bind(&deployment_id)
        .execute(&mut *tx)
        .await?;
        save_tracked(&mut tx, &target.id, tracked).await?;
        tx.commit().await?;
    }
    Ok(())
}

fn publish(state: &AppState, target: &str) {
    state.publish(PlaneEvent {
        kind: "drift".into(),
        id: target.to_string(),
        promotion: None,
        at: rfc3339(now_ms()),
    });
}

/// Best effort, off the evaluation path. The URL may carry a secret (chat webhooks do): it is
/// never logged.
async fn post_webhook(url: String, body: serde_json::Value) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "drift webhook: no HTTP client");
            return;
        }
    };
    match client.post(&url).json(&body).send().await {
        Ok(resp) if resp.status().is_success() => {}
        Ok(resp) => tracing::warn!(
            status = resp.status().as_u16(),
            "drift webhook refused the notification"
        ),
        Err(e) => tracing::warn!(error = %e.without_url(), "drift webhook unreachable"),
    }
}

struct FindingChange {
    opened: Vec<Finding>,
    /// Fingerprints no longer seen.
    resolved: Vec<String>,
}

/// Opens findings not open yet, moves `last_seen` of those still there, resolves the rest.
async fn store_findings(
    conn: &mut sqlx::AnyConnection,
    target_id: &str,
    findings: &[Finding],
    at: i64,
) -> ApiResult<FindingChange> {
    let open: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, fingerprint FROM drift_findings WHERE target_id = $1 AND resolved_at IS NULL",
    )
    .bind(target_id)
    .fetch_all(&mut *conn)
    .await?;
    let current: BTreeSet<&str> = findings.iter().map(|f| f.fingerprint.as_str()).collect();
    let mut resolved = Vec::new();
    for (id, fingerprint) in &open {
        if current.contains(fingerprint.as_str()) {
            sqlx::query("UPDATE drift_findings SET last_seen = $1 WHERE id = $2")
                .bind(at)
                .bind(id)
                .execute(&mut *conn)
                .await?;
        } else {
            sqlx::query(
                "UPDATE drift_findings SET resolved_at = $1, resolution = 'in_sync' WHERE id = $2",
            )
            .bind(at)
            .bind(id)
            .execute(&mut *conn)
            .await?;
            resolved.push(fingerprint.clone());
        }
    }
    let mut opened = Vec::new();
    let mut seen = BTreeSet::new();
    for f in findings {
        if open.iter().any(|(_, fp)| *fp == f.fingerprint) || !seen.insert(f.fingerprint.as_str()) {
            continue;
        }
        let labels =
            serde_json::to_string(&f.labels).map_err(|e| ApiError::Internal(e.to_string()))?;
        sqlx::query(
            "INSERT INTO drift_findings (id, target_id, fingerprint, kind, severity, component,
                workload, expected, observed, labels, detail, first_seen, last_seen)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(new_id("drf"))
        .bind(target_id)
        .bind(&f.fingerprint)
        .bind(f.kind.as_str())
        .bind(f.severity.as_str())
        .bind(&f.component)
        .bind(&f.workload)
        .bind(&f.expected)
        .bind(&f.observed)
        .bind(labels)
        .bind(&f.detail)
        .bind(at)
        .bind(at)
        .execute(&mut *conn)
        .await?;
        opened.push(f.clone());
    }
    Ok(FindingChange { opened, resolved })
}

// ---- API -----------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FindingView {
    pub id: String,
    pub target: String,
    pub environment: String,
    /// digest_changed, missing, stopped, unmanaged_extra, sticker_mismatch, sticker_missing.
    pub kind: String,
    /// low, medium, high, critical.
    pub severity: String,
    pub component: Option<String>,
    pub workload: Option<String>,
    pub expected: Option<String>,
    pub observed: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub detail: String,
    pub fingerprint: String,
    pub first_seen: String,
    pub last_seen: String,
    pub resolved_at: Option<String>,
    /// `in_sync` or `ignored:<rule id>` once resolved.
    pub resolution: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReconcileView {
    pub deployment_id: String,
    pub release_id: String,
    pub issued_at: String,
    /// in_flight, succeeded, failed.
    pub outcome: String,
    pub error: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RemediationView {
    /// notify or reconcile.
    pub mode: String,
    /// closed, open or half_open.
    pub breaker: String,
    /// Consecutive failed reconciles.
    pub failures: u32,
    pub breaker_open_since: Option<String>,
    pub breaker_retry_at: Option<String>,
    /// The last decision, e.g. `{"decision":"suppressed","reason":{"reason":"breaker_open",...}}`.
    #[schema(value_type = Object)]
    pub decision: Option<serde_json::Value>,
    /// One sentence for a person.
    pub summary: String,
    pub reconcile_in_flight: Option<String>,
    /// The latest reconciles of the target, newest first.
    pub reconciles: Vec<ReconcileView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TargetDrift {
    pub target: String,
    pub environment: String,
    pub kind: String,
    /// Whether a report was evaluated and nothing is open.
    pub in_sync: bool,
    pub evaluated_at: Option<String>,
    pub findings: Vec<FindingView>,
    pub remediation: RemediationView,
}

const FINDING_SELECT: &str = "SELECT f.id, t.name AS target, e.name AS environment, f.kind, \
     f.severity, f.component, f.workload, f.expected, f.observed, f.labels, f.detail, \
     f.fingerprint, f.first_seen, f.last_seen, f.resolved_at, f.resolution FROM drift_findings f \
     JOIN targets t ON t.id = f.target_id JOIN environments e ON e.id = t.environment_id";

fn finding_from_row(r: &sqlx::any::AnyRow) -> FindingView {
    FindingView {
        id: r.get("id"),
        target: r.get("target"),
        environment: r.get("environment"),
        kind: r.get("kind"),
        severity: r.get("severity"),
        component: r.get("component"),
        workload: r.get("workload"),
        expected: r.get("expected"),
        observed: r.get("observed"),
        labels: serde_json::from_str(r.get::<&str, _>("labels")).unwrap_or_default(),
        detail: r.get("detail"),
        fingerprint: r.get("fingerprint"),
        first_seen: rfc3339(r.get("first_seen")),
        last_seen: rfc3339(r.get("last_seen")),
        resolved_at: r.get::<Option<i64>, _>("resolved_at").map(rfc3339),
        resolution: r.get("resolution"),
    }
}

/// Drift of every target (of `env`, of one `target`), open findings only unless `history`.
pub async fn report(
    state: &AppState,
    env: Option<&str>,
    target: Option<&str>,
    history: bool,
) -> ApiResult<Vec<TargetDrift>> {
    let env_id = match env {
        Some(e) => Some(environments::find(state, e).await?.id),
        None => None,
    };
    let mut targets = targets::list(state, env_id.as_deref()).await?;
    if let Some(name) = target {
        let t = targets::find(state, name).await?;
        targets.retain(|x| x.id == t.id);
        if targets.is_empty() {
            return Err(ApiError::NotFound(format!(
                "target {name:?} is not in environment {}",
                env.unwrap_or_default()
            )));
        }
    }
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{FINDING_SELECT} WHERE f.target_id = $1 {} ORDER BY f.first_seen DESC, f.id",
            if history {
                ""
            } else {
                "AND f.resolved_at IS NULL"
            }
        )))
        .bind(&t.id)
        .fetch_all(&state.db)
        .await?;
        let findings: Vec<FindingView> = rows.iter().map(finding_from_row).collect();
        let tracked = load_tracked(state, &t.id).await?;
        let env = environments::find(state, &t.environment).await?;
        let (policy, _) = load_policy(state, &env.id).await?;
        let reconciles: Vec<ReconcileView> = sqlx::query(
            "SELECT deployment_id, release_id, issued_at, outcome, error, finished_at
             FROM drift_reconciles WHERE target_id = $1 ORDER BY issued_at DESC LIMIT 10",
        )
        .bind(&t.id)
        .fetch_all(&state.db)
        .await?
        .iter()
        .map(|r| ReconcileView {
            deployment_id: r.get("deployment_id"),
            release_id: r.get("release_id"),
            issued_at: rfc3339(r.get("issued_at")),
            outcome: r.get("outcome"),
            error: r.get("error"),
            finished_at: r.get::<Option<i64>, _>("finished_at").map(rfc3339),
        })
        .collect();
        let open = findings.iter().filter(|f| f.resolved_at.is_none()).count();
        out.push(TargetDrift {
            in_sync: tracked.evaluated_at.is_some() && open == 0,
            evaluated_at: tracked.evaluated_at.map(rfc3339),
            remediation: remediation_view(&policy, &tracked, reconciles, now),
            target: t.name,
            environment: t.environment,
            kind: t.kind,
            findings,
        });
    }
    Ok(out)
}

fn remediation_view(
    policy: &RemediationPolicy,
    tracked: &Tracked,
    reconciles: Vec<ReconcileView>,
    now: OffsetDateTime,
) -> RemediationView {
    let fmt = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    let (breaker, failures, since, retry_at) = match tracked.remediator.breaker(policy, now) {
        stella_drift::BreakerState::Closed { failures } => ("closed", failures, None, None),
        stella_drift::BreakerState::Open {
            since,
            failures,
            retry_at,
        } => ("open", failures, Some(fmt(since)), Some(fmt(retry_at))),
        stella_drift::BreakerState::HalfOpen { failures } => ("half_open", failures, None, None),
    };
    let last_error = reconciles
        .iter()
        .find(|r| r.outcome == "failed")
        .map(|r| r.error.clone());
    let summary = match (&tracked.decision, breaker) {
        (_, "open") => format!(
            "circuit breaker open: {failures} consecutive reconciles failed (since {}); no reconcile before {}{}",
            since.clone().unwrap_or_default(),
            retry_at.clone().unwrap_or_default(),
            last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ),
        (None, _) => "not evaluated yet".to_string(),
        (Some(Decision::InSync), _) => "in sync".to_string(),
        (Some(Decision::Notify), _) => match policy.mode() {
            RemediationMode::Notify => "notify only (policy mode notify)".to_string(),
            RemediationMode::Reconcile => "notify only (no finding a redeploy repairs)".to_string(),
        },
        (Some(Decision::Reconcile { deployment_id, .. }), _) => {
            format!("reconciling: redeploying the release of deployment {deployment_id}")
        }
        (Some(Decision::Suppressed { reason }), _) => match reason {
            stella_drift::SuppressReason::InFlight { deployment_id, .. } => {
                format!("a reconcile of deployment {deployment_id} is in flight")
            }
            stella_drift::SuppressReason::AlreadyReconciled { at } => format!(
                "these findings were reconciled at {} and came back: not reconciling again until the target is seen in sync",
                fmt(*at)
            ),
            stella_drift::SuppressReason::RateLimited { until } => {
                format!("rate limited: no reconcile before {}", fmt(*until))
            }
            stella_drift::SuppressReason::BreakerOpen {
                failures,
                retry_at,
                last_error,
                ..
            } => format!(
                "circuit breaker open: {failures} consecutive reconciles failed; no reconcile before {}{}",
                fmt(*retry_at),
                last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            ),
        },
    };
    RemediationView {
        mode: policy.mode().as_str().to_string(),
        breaker: breaker.to_string(),
        failures,
        breaker_open_since: since,
        breaker_retry_at: retry_at,
        decision: tracked
            .decision
            .as_ref()
            .and_then(|d| serde_json::to_value(d).ok()),
        summary,
        reconcile_in_flight: tracked.reconcile_deployment_id.clone(),
        reconciles,
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateIgnoreRule {
    /// The environment whose targets the rule covers.
    pub env: String,
    /// Only this target of the environment; absent: all of them.
    #[serde(default)]
    pub target: Option<String>,
    /// Conditions that must all hold, e.g. `kind=unmanaged_extra` or
    /// `component=sidecar,kind=stopped` or `label:team=ops`.
    pub selector: String,
    /// Why the difference is known and fine (shown with the rule).
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IgnoreRuleView {
    pub id: String,
    pub environment: String,
    pub target: Option<String>,
    pub selector: String,
    pub reason: String,
    pub created_by: String,
    pub created_at: String,
    /// Open findings the rule silenced when it was created.
    #[serde(default)]
    pub silenced: Vec<String>,
}

/// Adds a rule and resolves the open findings it silences at once (resolution
/// `ignored:<rule id>`): the next report would leave them out anyway.
pub async fn add_ignore_rule(
    state: &AppState,
    req: CreateIgnoreRule,
    created_by: &str,
) -> ApiResult<IgnoreRuleView> {
    let selector =
        Selector::from_str(req.selector.trim()).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let env = environments::find(state, &req.env).await?;
    let target = match &req.target {
        Some(name) => {
            let t = targets::find(state, name).await?;
            if t.environment != env.name {
                return Err(ApiError::Unprocessable(format!(
                    "target {} is in environment {}, not {}",
                    t.name, t.environment, env.name
                )));
            }
            Some(t)
        }
        None => None,
    };
    let reason = req.reason.unwrap_or_default();
    if reason.len() > 1000 {
        return Err(ApiError::BadRequest(
            "reason: at most 1000 characters".to_string(),
        ));
    }
    let rule = IgnoreRule::new(
        target.as_ref().map_or(IgnoreScope::Environment, |t| {
            IgnoreScope::Target(t.name.clone())
        }),
        selector.clone(),
    );
    let id = new_id("drr");
    let now = now_ms();
    let mut tx = crate::store::write_tx(&state.db).await?;
    sqlx::query(
        "INSERT INTO drift_ignore_rules (id, environment_id, target_id, selector, reason, created_by, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(&env.id)
    .bind(target.as_ref().map(|t| t.id.clone()))
    .bind(selector.to_string())
    .bind(&reason)
    .bind(created_by)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let open = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{FINDING_SELECT} WHERE t.environment_id = $1 AND f.resolved_at IS NULL"
    )))
    .bind(&env.id)
    .fetch_all(&mut *tx)
    .await?;
    let mut silenced = Vec::new();
    let mut touched = BTreeSet::new();
    for row in &open {
        let view = finding_from_row(row);
        if let Some(finding) = as_finding(&view)
            && rule.silences(&finding)
        {
            sqlx::query(
                "UPDATE drift_findings SET resolved_at = $1, resolution = $2 WHERE id = $3",
            )
            .bind(now)
            .bind(format!("ignored:{id}"))
            .bind(&view.id)
            .execute(&mut *tx)
            .await?;
            touched.insert(view.target.clone());
            silenced.push(view.id);
        }
    }
    tx.commit().await?;
    for t in &touched {
        publish(state, t);
    }
    Ok(IgnoreRuleView {
        id,
        environment: env.name,
        target: target.map(|t| t.name),
        selector: selector.to_string(),
        reason,
        created_by: created_by.to_string(),
        created_at: rfc3339(now),
        silenced,
    })
}

fn as_finding(v: &FindingView) -> Option<Finding> {
    let kind = FindingKind::from_str(&v.kind).ok()?;
    Some(Finding {
        target: v.target.clone(),
        kind,
        severity: kind.severity(),
        component: v.component.clone(),
        workload: v.workload.clone(),
        expected: v.expected.clone(),
        observed: v.observed.clone(),
        labels: v.labels.clone(),
        detail: v.detail.clone(),
        detected_at: OffsetDateTime::UNIX_EPOCH,
        fingerprint: v.fingerprint.clone(),
    })
}

pub async fn list_ignore_rules(
    state: &AppState,
    env: Option<&str>,
) -> ApiResult<Vec<IgnoreRuleView>> {
    let env_id = match env {
        Some(e) => Some(environments::find(state, e).await?.id),
        None => None,
    };
    let rows = sqlx::query(
        "SELECT r.id, e.name AS environment, t.name AS target, r.selector, r.reason, r.created_by,
            r.created_at FROM drift_ignore_rules r JOIN environments e ON e.id = r.environment_id
         LEFT JOIN targets t ON t.id = r.target_id
         WHERE ($1 IS NULL OR r.environment_id = $1) ORDER BY r.created_at, r.id",
    )
    .bind(env_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| IgnoreRuleView {
            id: r.get("id"),
            environment: r.get("environment"),
            target: r.get("target"),
            selector: r.get("selector"),
            reason: r.get("reason"),
            created_by: r.get("created_by"),
            created_at: rfc3339(r.get("created_at")),
            silenced: Vec::new(),
        })
        .collect())
}

/// Removes a rule; what it silenced shows again at the next report.
pub async fn remove_ignore_rule(state: &AppState, id: &str) -> ApiResult<()> {
    let done = sqlx::query("DELETE FROM drift_ignore_rules WHERE id = $1")
        .bind(id)
        .execute(&state.db)
        .await?;
    if done.rows_affected() == 0 {
        return Err(ApiError::NotFound(format!("ignore rule {id:?} not found")));
    }
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDriftPolicy {
    /// notify (default) or reconcile.
    pub mode: String,
    /// Reconciles per target in any trailing hour (default 3).
    #[serde(default)]
    pub max_per_hour: Option<u32>,
    /// Consecutive failed reconciles that open a target's circuit breaker (default 3).
    #[serde(default)]
    pub breaker_threshold: Option<u32>,
    /// How long an open breaker waits before one trial reconcile (default 900).
    #[serde(default)]
    pub breaker_cooldown_secs: Option<u64>,
    /// http(s) URL that gets a JSON POST when a target's drift changes; empty string removes it.
    #[serde(default)]
    pub webhook: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DriftPolicyView {
    pub environment: String,
    pub mode: String,
    pub max_per_hour: u32,
    pub breaker_threshold: u32,
    pub breaker_cooldown_secs: u64,
    /// Scheme, host and port of the webhook only: its path and query may hold a secret.
    pub webhook: Option<String>,
}

fn policy_view(environment: String, policy: &RemediationPolicy, webhook: &str) -> DriftPolicyView {
    DriftPolicyView {
        environment,
        mode: policy.mode().as_str().to_string(),
        max_per_hour: policy.max_per_hour(),
        breaker_threshold: policy.breaker_threshold(),
        breaker_cooldown_secs: policy.breaker_cooldown().as_secs(),
        webhook: url::Url::parse(webhook).ok().map(|u| {
            format!(
                "{}://{}{}/…",
                u.scheme(),
                u.host_str().unwrap_or_default(),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            )
        }),
    }
}

pub async fn get_policy(state: &AppState, env: &str) -> ApiResult<DriftPolicyView> {
    let env = environments::find(state, env).await?;
    let (policy, webhook) = load_policy(state, &env.id).await?;
    Ok(policy_view(env.name, &policy, &webhook))
}

pub async fn set_policy(
    state: &AppState,
    env: &str,
    req: SetDriftPolicy,
    updated_by: &str,
) -> ApiResult<DriftPolicyView> {
    let env = environments::find(state, env).await?;
    let defaults = RemediationPolicy::default();
    let mode =
        RemediationMode::from_str(&req.mode).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let policy = RemediationPolicy::new(
        mode,
        req.max_per_hour.unwrap_or(defaults.max_per_hour()),
        req.breaker_threshold
            .unwrap_or(defaults.breaker_threshold()),
        req.breaker_cooldown_secs
            .map(Duration::from_secs)
            .unwrap_or(defaults.breaker_cooldown()),
    )
    .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let (_, current_webhook) = load_policy(state, &env.id).await?;
    let webhook = match req.webhook {
        None => current_webhook,
        Some(w) if w.is_empty() => String::new(),
        Some(w) => {
            let url = url::Url::parse(&w)
                .map_err(|e| ApiError::BadRequest(format!("webhook: not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(ApiError::BadRequest(
                    "webhook: must be an http or https URL with a host".to_string(),
                ));
            }
            w
        }
    };
    let json = serde_json::to_string(&policy).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query(
        "INSERT INTO drift_policies (environment_id, policy, webhook, updated_by, updated_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (environment_id) DO UPDATE SET policy = excluded.policy,
            webhook = excluded.webhook, updated_by = excluded.updated_by, updated_at = excluded.updated_at",
    )
    .bind(&env.id)
    .bind(json)
    .bind(&webhook)
    .bind(updated_by)
    .bind(now_ms())
    .execute(&state.db)
    .await?;
    Ok(policy_view(env.name, &policy, &webhook))
}

/// Open findings by kind and severity, for the `stella_drift_findings` gauge.
pub async fn open_counts(state: &AppState) -> ApiResult<Vec<(FindingKind, i64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT kind, COUNT(*) FROM drift_findings WHERE resolved_at IS NULL GROUP BY kind",
    )
    .fetch_all(&state.db)
    .await?;
    Ok(FindingKind::ALL
        .iter()
        .map(|k| {
            let n = rows
                .iter()
                .find(|(kind, _)| kind == k.as_str())
                .map_or(0, |(_, n)| *n);
            (*k, n)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(sticker: &str) -> Pending {
        Pending {
            agent_id: "agt".to_string(),
            observed_at_ms: 1_700_000_000_000,
            inventory: TargetInventory {
                target: "web".to_string(),
                kind: "docker".to_string(),
                workloads: vec![
                    stella_proto::Workload {
                        component: "app".to_string(),
                        digest: format!("sha256:{}", "a".repeat(64)),
                        state: "exited".to_string(),
                        workload_id: "c1".to_string(),
                        name: "stella-web-app".to_string(),
                        ..Default::default()
                    },
                    stella_proto::Workload {
                        workload_id: "c2".to_string(),
                        state: "running".to_string(),
                        unmanaged: true,
                        labels: [("team".to_string(), "ops".to_string())].into(),
                        ..Default::default()
                    },
                ],
                sticker_json: sticker.to_string(),
                error: String::new(),
            },
        }
    }

    #[test]
    fn reports_map_onto_drift_input_as_the_crate_documents() {
        let sticker = r#"{"release_id":"rel","deployment_id":"dep","components":[{"name":"app","digest":"sha256:x","image":"i"}]}"#;
        let o = observed_target("web", &pending(sticker));
        assert_eq!(o.items.len(), 2);
        assert_eq!(o.items[0].component.as_deref(), Some("app"));
        assert_eq!(o.items[0].name, "stella-web-app");
        assert_eq!(o.items[0].state, WorkloadState::Stopped);
        assert!(o.items[0].managed);
        // Empty component and digest are "none"; a missing name falls back to the id.
        assert_eq!(o.items[1].component, None);
        assert_eq!(o.items[1].digest, None);
        assert_eq!(o.items[1].name, "c2");
        assert!(!o.items[1].managed);
        assert_eq!(
            o.items[1].labels.get("team").map(String::as_str),
            Some("ops")
        );
        let s = o.sticker.expect("sticker");
        assert_eq!(s.release, "rel");
        assert_eq!(s.deployment_id, "dep");
        assert_eq!(s.components[0].name, "app");
        assert!(observed_target("web", &pending("")).sticker.is_none());
    }

    #[test]
    fn the_latest_report_per_target_wins_in_the_queue() {
        let q = DriftQueue::default();
        let report = |at: i64, state: &str| InventoryReport {
            observed_at_unix_ms: at,
            targets: vec![TargetInventory {
                target: "web".to_string(),
                workloads: vec![stella_proto::Workload {
                    state: state.to_string(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        q.submit("agt", &report(20, "running"));
        q.submit("agt", &report(10, "exited"));
        let taken = q.take();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].observed_at_ms, 20);
        assert_eq!(taken[0].inventory.workloads[0].state, "running");
        assert!(q.take().is_empty());
    }

    #[test]
    fn webhook_urls_are_shown_without_path_or_query() {
        let v = policy_view(
            "dev".to_string(),
            &RemediationPolicy::default(),
            "https://hooks.example.com:8443/services/T000/SECRET?token=x",
        );
        assert_eq!(
            v.webhook.as_deref(),
            Some("https://hooks.example.com:8443/…")
        );
        assert_eq!(v.mode, "notify");
        assert!(
            policy_view("dev".to_string(), &RemediationPolicy::default(), "")
                .webhook
                .is_none()
        );
    }
}
