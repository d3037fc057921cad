//! Deployments and their jobs: one signed job per target of the environment.
//!
//! A deployment and all its signed jobs are written in one transaction, so a failure leaves
//! nothing behind. Job outcomes are recorded once: the first terminal result wins and later
//! duplicates (re-sent from an agent's spool) are acknowledged without effect.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use stella_pki::{
    BLUE_GREEN_TARGET_KINDS, DeployMode, JobComponent, JobKind, JobPayload, JobTarget,
};

use crate::agents;
use crate::environments;
use crate::error::{ApiError, ApiResult};
use crate::releases;
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};
use crate::targets;

pub const TERMINAL_JOB_STATUSES: &[&str] = &["succeeded", "failed", "refused", "cancelled"];

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateDeployment {
    pub release: String,
    pub env: String,
    /// Only these targets of the environment (by name); empty: all of them.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Only targets whose agent carries all these labels; empty: no filter.
    #[serde(default)]
    pub selector: std::collections::BTreeMap<String, String>,
    /// The deployment id to use, so that a workflow step that is re-run after a restart finds
    /// the deployment it already started instead of starting another. Not settable over the API.
    #[serde(skip)]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobEvent {
    pub at: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: String,
    pub target: String,
    pub agent_id: String,
    pub kind: String,
    pub sequence: i64,
    /// queued, offered, accepted, succeeded, failed, refused.
    pub status: String,
    pub reason_code: String,
    pub message: String,
    pub outcome: Option<serde_json::Value>,
    pub events: Vec<JobEvent>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deployment {
    pub id: String,
    /// What its jobs do: `deploy` (put the release on the targets), or a workflow step run by
    /// the targets' agents: `health-check` (HTTP probe), `script`.
    pub kind: String,
    pub release: String,
    pub release_id: String,
    pub environment: String,
    /// running, succeeded, failed.
    pub status: String,
    pub message: String,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub jobs: Vec<JobView>,
}

/// The targets of `env` a deployment request names (all, a subset by name, or by agent labels).
async fn select_targets(
    state: &AppState,
    env: &environments::Environment,
    req: &CreateDeployment,
) -> ApiResult<Vec<targets::Target>> {
    let all = targets::list(state, Some(&env.id)).await?;
    for name in &req.targets {
        if !all.iter().any(|t| &t.name == name) {
            return Err(ApiError::NotFound(format!(
                "target {name:?} is not in environment {}",
                env.name
            )));
        }
    }
    let mut selected = Vec::with_capacity(all.len());
    for t in all {
        if !req.targets.is_empty() && !req.targets.contains(&t.name) {
            continue;
        }
        if !req.selector.is_empty() {
            let agent = agents::view(state, &t.agent_id).await?;
            let matches = req
                .selector
                .iter()
                .all(|(k, v)| agent.labels.get(k) == Some(v));
            if !matches {
                continue;
            }
        }
        selected.push(t);
    }
    Ok(selected)
}

pub async fn create(state: &AppState, req: CreateDeployment) -> ApiResult<Deployment> {
    create_jobs(state, req, JobKind::Deploy, DeployMode::Replace).await
}

/// A deployment whose jobs deploy with `strategy` (a workflow step's). Blue-green is refused
/// before anything is written when a selected target's kind has no executor that can switch
/// (`BLUE_GREEN_TARGET_KINDS`): its agent would refuse the job, after the other targets had
/// already switched.
pub async fn create_with_strategy(
    state: &AppState,
    req: CreateDeployment,
    strategy: DeployMode,
) -> ApiResult<Deployment> {
    create_jobs(state, req, JobKind::Deploy, strategy).await
}

/// Jobs of a workflow step that agents run themselves (an HTTP health probe, a script): a
/// deployment row of that kind with one signed job per selected target, for the release the
/// run promotes, created and settled exactly like a deployment (so the runner waits on it the
/// same way). The jobs carry no components; each target's agent needs the step's capability.
pub async fn create_step_jobs(
    state: &AppState,
    req: CreateDeployment,
    step: JobKind,
) -> ApiResult<Deployment> {
    if step == JobKind::Deploy {
        return Err(ApiError::Internal(
            "a deploy is not a step job; use deployments::create".to_string(),
        ));
    }
    create_jobs(state, req, step, DeployMode::Replace).await
}

async fn create_jobs(
    state: &AppState,
    req: CreateDeployment,
    kind: JobKind,
    strategy: DeployMode,
) -> ApiResult<Deployment> {
    let release = releases::find(state, &req.release).await?;
    let env = environments::find(state, &req.env).await?;
    let env_targets = select_targets(state, &env, &req).await?;
    if env_targets.is_empty() && !req.selector.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "no target of environment {} is served by an agent with labels {:?}",
            env.name, req.selector
        )));
    }
    if env_targets.is_empty() {
        return Err(ApiError::Unprocessable(format!(
            "environment {} has no targets; add one with `stella target create NAME --env {} --kind docker --agent AGENT`",
            env.name, env.name
        )));
    }
    if strategy == DeployMode::BlueGreen {
        let unable: Vec<String> = env_targets
            .iter()
            .filter(|t| !BLUE_GREEN_TARGET_KINDS.contains(&t.kind.as_str()))
            .map(|t| format!("{} ({})", t.name, t.kind))
            .collect();
        if !unable.is_empty() {
            return Err(ApiError::Unprocessable(format!(
                "the blue-green strategy needs targets of kind {}; environment {} has {}: deploy it \
                 with strategy all-at-once or rolling",
                BLUE_GREEN_TARGET_KINDS.join(", "),
                env.name,
                unable.join(", ")
            )));
        }
    }
    let agents = agents::records_for_environment(state, &env.id).await?;
    for t in &env_targets {
        let agent = agents
            .get(&t.agent_id)
            .ok_or_else(|| ApiError::Internal(format!("target {} has no agent", t.name)))?;
        if agent.status == "revoked" {
            return Err(ApiError::Unprocessable(format!(
                "target {}: agent {} is revoked",
                t.name, agent.id
            )));
        }
        let needed = kind.step_capability().unwrap_or(&t.kind);
        if !agent.capabilities.iter().any(|c| c == needed) {
            let hint = if needed == "script" {
                " (scripts are opt-in: start the agent with --allow-scripts)"
            } else {
                ""
            };
            return Err(ApiError::Unprocessable(format!(
                "target {}: agent {} ({}) lacks the {:?} capability{hint}",
                t.name, agent.name, agent.id, needed
            )));
        }
    }

    let deployment_id = req.id.clone().unwrap_or_else(|| new_id("dep"));
    let now = now_ms();
    let ttl_ms = state.config.job_ttl.as_millis() as i64;
    let signing_key = state.keys.job_keys().active;
    let mut tx = crate::store::write_tx(&state.db).await?;
    sqlx::query(
        "INSERT INTO deployments (id, kind, release_id, environment_id, status, message, created_at, updated_at)
         VALUES ($1, $2, $3, $4, 'running', '', $5, $6)",
    )
    .bind(&deployment_id)
    .bind(kind.name())
    .bind(&release.id)
    .bind(&env.id)
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let sequences = allocate_sequences(&mut tx, &env_targets).await?;
    let mut rows = Vec::with_capacity(env_targets.len());
    for (t, sequence) in env_targets.iter().zip(sequences) {
        let job_id = new_id("job");
        let issued_at = time::OffsetDateTime::now_utc();
        let not_after = issued_at + state.config.job_ttl;
        let payload = JobPayload {
            job_id: job_id.clone(),
            agent_id: t.agent_id.clone(),
            target: JobTarget {
                name: t.name.clone(),
                kind: t.kind.clone(),
                config: t.config.clone(),
            },
            kind: kind.clone(),
            deployment_id: deployment_id.clone(),
            release_id: release.id.clone(),
            release_name: release.name.clone(),
            // Digests are a deploy's; a step job that carried them would be refused.
            components: if kind == JobKind::Deploy {
                release
                    .components
                    .iter()
                    .map(|c| JobComponent {
                        name: c.name.clone(),
                        image: c.image.clone(),
                        digest: c.digest.clone(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            issued_at,
            not_after,
            sequence: sequence as u64,
            idempotency_key: format!("{deployment_id}/{}", t.id),
            strategy,
        };
        let envelope = stella_pki::sign_job(&signing_key, &payload)?;
        let envelope_json =
            serde_json::to_string(&envelope).map_err(|e| ApiError::Internal(e.to_string()))?;
        rows.push(NewJob {
            id: job_id,
            agent_id: &t.agent_id,
            target_id: &t.id,
            sequence,
            idempotency_key: payload.idempotency_key,
            envelope: envelope_json,
        });
    }
    // Many rows per statement: the plane pays per statement, not per row.
    for chunk in rows.chunks(INSERT_ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO jobs (id, deployment_id, agent_id, target_id, kind, sequence, idempotency_key,
                envelope, not_after, status, created_at, updated_at) VALUES {}",
            crate::store::values_placeholders(chunk.len(), 12)
        );
        let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
        for job in chunk {
            insert = insert
                .bind(&job.id)
                .bind(&deployment_id)
                .bind(job.agent_id)
                .bind(job.target_id)
                .bind(kind.name())
                .bind(job.sequence)
                .bind(&job.idempotency_key)
                .bind(&job.envelope)
                .bind(now + ttl_ms)
                .bind("queued")
                .bind(now)
                .bind(now);
        }
        insert.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    tracing::info!(deployment_id = %deployment_id, kind = kind.name(), release = %release.name, env = %env.name, jobs = env_targets.len(), "deployment created");
    for t in &env_targets {
        state.agent_has_work(&t.agent_id);
    }
    get(state, &deployment_id).await
}

/// 12 binds per row: far below SQLite's limit of 32,766 variables per statement.
const INSERT_ROWS_PER_STATEMENT: usize = 200;

/// A signed job about to be inserted.
struct NewJob<'a> {
    id: String,
    agent_id: &'a str,
    target_id: &'a str,
    sequence: i64,
    idempotency_key: String,
    envelope: String,
}

/// Allocates the next sequence number of each target's agent, in the order of `targets`, inside
/// the deployment's transaction: sequences stay gap-free and strictly increasing per agent even
/// with concurrent deployments. Agents serving one target of the deployment (the common case)
/// are updated many per statement.
async fn allocate_sequences(
    tx: &mut sqlx::AnyConnection,
    targets: &[targets::Target],
) -> Result<Vec<i64>, sqlx::Error> {
    let mut per_agent: HashMap<&str, i64> = HashMap::new();
    for t in targets {
        *per_agent.entry(t.agent_id.as_str()).or_default() += 1;
    }
    // The last sequence allocated to each agent by this deployment.
    let mut last: HashMap<String, i64> = HashMap::with_capacity(per_agent.len());
    let single: Vec<&str> = per_agent
        .iter()
        .filter(|(_, n)| **n == 1)
        .map(|(a, _)| *a)
        .collect();
    for chunk in single.chunks(500) {
        let sql = format!(
            "UPDATE agents SET next_sequence = next_sequence + 1 WHERE id IN ({}) \
             RETURNING id, next_sequence",
            crate::store::list_placeholders(1, chunk.len())
        );
        let mut update = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            update = update.bind(*id);
        }
        let allocated: Vec<(String, i64)> = update.fetch_all(&mut *tx).await?;
        last.extend(allocated);
    }
    for (agent_id, n) in per_agent.iter().filter(|(_, n)| **n > 1) {
        let (sequence,): (i64,) = sqlx::query_as(
            "UPDATE agents SET next_sequence = next_sequence + $1 WHERE id = $2 RETURNING next_sequence",
        )
        .bind(n)
        .bind(agent_id)
        .fetch_one(&mut *tx)
        .await?;
        last.insert(agent_id.to_string(), sequence);
    }
    // Hand them out in target order: an agent's first target gets its lowest new sequence.
    let mut next: HashMap<&str, i64> = per_agent
        .iter()
        .map(|(a, n)| (*a, last.get(*a).copied().unwrap_or_default() - n + 1))
        .collect();
    let mut sequences = Vec::with_capacity(targets.len());
    for t in targets {
        let slot = next
            .get_mut(t.agent_id.as_str())
            .ok_or(sqlx::Error::RowNotFound)?;
        sequences.push(*slot);
        *slot += 1;
    }
    if last.len() != per_agent.len() {
        // An agent row vanished under us (cannot happen: targets reference agents).
        return Err(sqlx::Error::RowNotFound);
    }
    Ok(sequences)
}

const DEPLOYMENT_SELECT: &str = "SELECT d.id, d.kind, r.name AS release, r.id AS release_id, \
     e.name AS environment, d.status, d.message, d.created_at, d.finished_at FROM deployments d \
     JOIN releases r ON r.id = d.release_id JOIN environments e ON e.id = d.environment_id";

fn deployment_from_row(row: &sqlx::any::AnyRow) -> Deployment {
    Deployment {
        id: row.get("id"),
        kind: row.get("kind"),
        release: row.get("release"),
        release_id: row.get("release_id"),
        environment: row.get("environment"),
        status: row.get("status"),
        message: row.get("message"),
        created_at: rfc3339(row.get("created_at")),
        finished_at: row.get::<Option<i64>, _>("finished_at").map(rfc3339),
        jobs: Vec::new(),
    }
}

pub async fn get(state: &AppState, id: &str) -> ApiResult<Deployment> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{DEPLOYMENT_SELECT} WHERE d.id = $1"
    )))
    .bind(id)
    .fetch_optional(&state.db)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("deployment {id:?} not found")))?;
    let mut deployment = deployment_from_row(&row);
    let jobs = sqlx::query(
        "SELECT j.id, t.name AS target, j.agent_id, j.kind, j.sequence, j.status, j.reason_code,
            j.message, j.outcome, j.created_at, j.finished_at
         FROM jobs j JOIN targets t ON t.id = j.target_id WHERE j.deployment_id = $1 ORDER BY t.name",
    )
    .bind(id)
    .fetch_all(&state.db)
    .await?;
    // All events of the deployment in one query: one per job made a 1,000-job answer take
    // seconds and a 10,000-job one time out on the connection pool.
    let mut events_by_job: std::collections::HashMap<String, Vec<JobEvent>> =
        std::collections::HashMap::with_capacity(jobs.len());
    let events: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT e.job_id, e.at, e.message FROM job_events e
         WHERE e.job_id IN (SELECT id FROM jobs WHERE deployment_id = $1) ORDER BY e.job_id, e.seq",
    )
    .bind(id)
    .fetch_all(&state.db)
    .await?;
    for (job_id, at, message) in events {
        events_by_job.entry(job_id).or_default().push(JobEvent {
            at: rfc3339(at),
            message,
        });
    }
    for j in &jobs {
        let job_id: String = j.get("id");
        let events = events_by_job.remove(&job_id).unwrap_or_default();
        let outcome: String = j.get("outcome");
        deployment.jobs.push(JobView {
            id: job_id,
            target: j.get("target"),
            agent_id: j.get("agent_id"),
            kind: j.get("kind"),
            sequence: j.get("sequence"),
            status: j.get("status"),
            reason_code: j.get("reason_code"),
            message: j.get("message"),
            outcome: serde_json::from_str(&outcome).ok(),
            events,
            created_at: rfc3339(j.get("created_at")),
            finished_at: j.get::<Option<i64>, _>("finished_at").map(rfc3339),
        });
    }
    Ok(deployment)
}

pub async fn list(state: &AppState) -> ApiResult<Vec<Deployment>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{DEPLOYMENT_SELECT} ORDER BY d.created_at DESC LIMIT 200"
    )))
    .fetch_all(&state.db)
    .await?;
    Ok(rows.iter().map(deployment_from_row).collect())
}

/// A job waiting to be offered to its agent.
#[derive(Debug, Clone)]
pub struct PendingJob {
    pub id: String,
    pub envelope: String,
    pub not_after_ms: i64,
}

/// Jobs the agent has not finished, in sequence order (the agent refuses out-of-order sequences).
pub async fn pending_for_agent(state: &AppState, agent_id: &str) -> ApiResult<Vec<PendingJob>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT id, envelope, not_after FROM jobs
         WHERE agent_id = $1 AND status IN ('queued', 'offered', 'accepted') ORDER BY sequence",
    )
    .bind(agent_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, envelope, not_after_ms)| PendingJob {
            id,
            envelope,
            not_after_ms,
        })
        .collect())
}

async fn add_event(
    conn: &mut sqlx::AnyConnection,
    job_id: &str,
    message: &str,
) -> Result<(), sqlx::Error> {
    // Events are numbered per job; a UNIQUE clash only happens on concurrent writers, and all
    // session writes go through the one group-commit writer.
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, at, message)
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = $2), $3, $4)",
    )
    .bind(job_id)
    .bind(job_id)
    .bind(now_ms())
    .bind(message)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

// The writes below take a connection (in practice the group-commit transaction, see
// `group_commit.rs`): agent sessions never commit one statement at a time.

/// Claims a queued job for the replica whose session offered it: the first claim wins and
/// names its replica. On PostgreSQL a row another replica is claiming at this moment is skipped
/// (`FOR UPDATE SKIP LOCKED`) rather than waited for: its claim stands.
pub async fn mark_offered(
    conn: &mut sqlx::AnyConnection,
    replica: &str,
    agent_id: &str,
    job_id: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "UPDATE jobs SET status = 'offered', claimed_by = $1, updated_at = $2 WHERE id IN (
             SELECT id FROM jobs WHERE id = $3 AND agent_id = $4 AND status = 'queued'{})",
        crate::store::skip_locked(conn)
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(replica)
        .bind(now_ms())
        .bind(job_id)
        .bind(agent_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

pub async fn mark_accepted(
    conn: &mut sqlx::AnyConnection,
    agent_id: &str,
    job_id: &str,
) -> Result<(), sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE jobs SET status = 'accepted', updated_at = $1 WHERE id = $2 AND agent_id = $3
         AND status IN ('queued', 'offered')",
    )
    .bind(now_ms())
    .bind(job_id)
    .bind(agent_id)
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() == 1 {
        add_event(conn, job_id, "accepted by agent").await?;
    }
    Ok(())
}

pub async fn record_progress(
    conn: &mut sqlx::AnyConnection,
    agent_id: &str,
    job_id: &str,
    message: &str,
) -> Result<(), sqlx::Error> {
    let owned: Option<(String,)> =
        sqlx::query_as("SELECT id FROM jobs WHERE id = $1 AND agent_id = $2")
            .bind(job_id)
            .bind(agent_id)
            .fetch_optional(&mut *conn)
            .await?;
    if owned.is_some() {
        let message: String = message.chars().take(2000).collect();
        add_event(conn, job_id, &message).await?;
    }
    Ok(())
}

/// Records a job's terminal outcome (first one wins) and settles its deployment, inside the
/// caller's transaction. Returns false when the job is unknown to this agent (nothing is
/// written then).
pub async fn record_result(
    conn: &mut sqlx::AnyConnection,
    agent_id: &str,
    status: &str,
    result: &stella_proto::JobResult,
    receipt: &str,
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT deployment_id, status FROM jobs WHERE id = $1 AND agent_id = $2")
            .bind(&result.job_id)
            .bind(agent_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((deployment_id, current)) = row else {
        return Ok(false);
    };
    if TERMINAL_JOB_STATUSES.contains(&current.as_str()) {
        // A duplicate from the agent's spool: already recorded, acknowledge without effect.
        return Ok(true);
    }
    let message: String = result.message.chars().take(8000).collect();
    sqlx::query(
        "UPDATE jobs SET status = $1, reason_code = $2, message = $3, outcome = $4, receipt = $5,
            updated_at = $6, finished_at = $7 WHERE id = $8",
    )
    .bind(status)
    .bind(&result.reason_code)
    .bind(&message)
    .bind(&result.outcome_json)
    .bind(receipt)
    .bind(now)
    .bind(now)
    .bind(&result.job_id)
    .execute(&mut *conn)
    .await?;
    settle_deployment(conn, &deployment_id, now).await?;
    Ok(true)
}

/// Fails a job the plane gave up on before delivery (its not-after passed), with the reason.
pub async fn expire_job(state: &AppState, job_id: &str) -> ApiResult<()> {
    let now = now_ms();
    let mut tx = crate::store::write_tx(&state.db).await?;
    let row: Option<(String,)> = sqlx::query_as(
        "SELECT deployment_id FROM jobs WHERE id = $1 AND status IN ('queued', 'offered')",
    )
    .bind(job_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((deployment_id,)) = row else {
        return Ok(());
    };
    sqlx::query(
        "UPDATE jobs SET status = 'failed', reason_code = 'expired_before_delivery',
            message = 'the job expired before its agent received it', updated_at = $1, finished_at = $2
         WHERE id = $3",
    )
    .bind(now)
    .bind(now)
    .bind(job_id)
    .execute(&mut *tx)
    .await?;
    settle_deployment(&mut tx, &deployment_id, now).await?;
    tx.commit().await?;
    Ok(())
}

/// Cancels every unfinished job of an agent (it was revoked) and settles their deployments.
pub async fn cancel_agent_jobs(state: &AppState, agent_id: &str, reason: &str) -> ApiResult<()> {
    let now = now_ms();
    let mut tx = crate::store::write_tx(&state.db).await?;
    let affected: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT deployment_id FROM jobs WHERE agent_id = $1 AND status IN ('queued', 'offered', 'accepted')",
    )
    .bind(agent_id)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE jobs SET status = 'cancelled', reason_code = 'agent_revoked', message = $1,
            updated_at = $2, finished_at = $3
         WHERE agent_id = $4 AND status IN ('queued', 'offered', 'accepted')",
    )
    .bind(format!("agent {agent_id} was revoked: {reason}"))
    .bind(now)
    .bind(now)
    .bind(agent_id)
    .execute(&mut *tx)
    .await?;
    for (deployment_id,) in &affected {
        settle_deployment(&mut tx, deployment_id, now).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn settle_deployment(
    tx: &mut sqlx::AnyConnection,
    deployment_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    // Whether any job is still unfinished: three seeks on jobs(deployment_id, status), so each
    // result costs O(log N). (Counting them with NOT IN scanned the unfinished rows: O(N) per
    // result, O(N²) per fan-out, most of the plane's SQLite time at 10,000 agents.) The outcome
    // rows are read only once, when the last job of the deployment finishes.
    // CASE: EXISTS is a boolean on PostgreSQL and an integer on SQLite.
    let (unfinished,): (i64,) = sqlx::query_as(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE deployment_id = $1
         AND status IN ('queued', 'offered', 'accepted')) THEN 1 ELSE 0 END",
    )
    .bind(deployment_id)
    .fetch_one(&mut *tx)
    .await?;
    if unfinished != 0 {
        return Ok(());
    }
    let jobs: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT t.name, j.status, j.reason_code, j.message FROM jobs j JOIN targets t ON t.id = j.target_id
         WHERE j.deployment_id = $1 ORDER BY t.name",
    )
    .bind(deployment_id)
    .fetch_all(&mut *tx)
    .await?;
    let failures: Vec<String> = jobs
        .iter()
        .filter(|(_, s, _, _)| s != "succeeded")
        .map(|(target, status, reason, message)| {
            let first_line = message.lines().next().unwrap_or_default();
            format!("{target}: {status} ({reason}): {first_line}")
        })
        .collect();
    let (status, message) = if failures.is_empty() {
        ("succeeded", String::new())
    } else {
        ("failed", failures.join("; "))
    };
    sqlx::query(
        "UPDATE deployments SET status = $1, message = $2, updated_at = $3, finished_at = $4
         WHERE id = $5 AND status = 'running'",
    )
    .bind(status)
    .bind(&message)
    .bind(now)
    .bind(now)
    .bind(deployment_id)
    .execute(&mut *tx)
    .await?;
    tracing::info!(deployment_id, status, "deployment finished");
    Ok(())
}
