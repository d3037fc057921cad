//! Workflow runs: the plane's side of `stella-workflow`. One runner task drives every running
//! run: it asks the engine what is due, carries it out through deployments (signed agent jobs),
//! gate evaluations and webhooks, feeds the outcome back, and writes the run's state after
//! every transition. After a restart the runner loads the states and goes on: finished steps
//! never start again, and a step that was running finds the deployment it had started
//! (deployment ids derive from the step attempt's idempotency key).

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stella_pki::{
    DeployMode, HealthCheckJob, HttpProbe, JobKind, MAX_HEALTHY_AFTER, MAX_STEP_JOB_TIMEOUT_MS,
    ScriptJob,
};
use stella_workflow::{
    Action, DeployStrategy, Event, HealthProbe, RunOutcome, RunState, StepKind, StepStatus,
    WorkflowTemplate,
};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::deployments::{self, CreateDeployment};
use crate::error::{ApiError, ApiResult};
use crate::promotions::{self, PromotionRecord};
use crate::state::{AppState, SharedState};
use crate::store::{new_id, now_ms, rfc3339};

/// How often running steps are looked at when nothing wakes the runner earlier.
const TICK: Duration = Duration::from_millis(500);
/// How long an agent probes (HTTP health check) or lets a script run when the step sets no
/// `timeout`: agents never run a step job without a bound.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StepView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// pending, running, waiting_retry, succeeded, failed, skipped.
    pub status: String,
    pub attempt: u32,
    pub message: String,
    /// Deployments this step started, oldest first.
    pub deployments: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunView {
    pub id: String,
    pub template: String,
    /// running, succeeded, failed, cancelled.
    pub status: String,
    pub steps: Vec<StepView>,
}

/// The template a promotion into `env` runs: the environment's own, else the default.
fn template_of(settings_workflow: Option<&str>) -> ApiResult<(WorkflowTemplate, String)> {
    let source = settings_workflow.unwrap_or(stella_workflow::DEFAULT_DEPLOY_YAML);
    let template = WorkflowTemplate::parse("workflow.yaml", source)
        .map_err(|e| ApiError::Internal(format!("stored workflow template invalid: {e}")))?;
    Ok((template, source.to_string()))
}

/// Creates the run of a just-approved promotion, in the caller's transaction.
pub async fn start_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    state: &AppState,
    promotion: &PromotionRecord,
) -> ApiResult<()> {
    let env = crate::environments::find(state, &promotion.environment_id).await?;
    let (template, source) = template_of(env.settings.workflow.as_deref())?;
    let id = new_id("run");
    let run_state = RunState::new(&id, &template, OffsetDateTime::now_utc());
    let state_json =
        serde_json::to_string(&run_state).map_err(|e| ApiError::Internal(e.to_string()))?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO workflow_runs (id, promotion_id, template, state, status, created_at,
             updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(&promotion.id)
    .bind(&source)
    .bind(&state_json)
    .bind(run_state.status().as_str())
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    tracing::info!(run = %id, promotion = %promotion.id, template = template.name(), "workflow run created");
    Ok(())
}

struct LoadedRun {
    id: String,
    promotion_id: String,
    template: WorkflowTemplate,
    state: RunState,
}

async fn load(state: &AppState, promotion_id: &str) -> ApiResult<Option<LoadedRun>> {
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT id, promotion_id, template, state FROM workflow_runs WHERE promotion_id = $1",
    )
    .bind(promotion_id)
    .fetch_optional(&state.db)
    .await?;
    row.map(parse_run).transpose()
}

fn parse_run(
    (id, promotion_id, source, state_json): (String, String, String, String),
) -> ApiResult<LoadedRun> {
    let (template, _) = template_of(Some(&source))?;
    let state: RunState = serde_json::from_str(&state_json)
        .map_err(|e| ApiError::Internal(format!("workflow run {id} state unreadable: {e}")))?;
    Ok(LoadedRun {
        id,
        promotion_id,
        template,
        state,
    })
}

/// Writes the run's state, only while this replica holds its lease (or nobody does: an API
/// cancel): a replica that lost the lease while it worked must not overwrite the new holder's
/// state with its stale one.
async fn save(state: &AppState, run: &LoadedRun) -> ApiResult<()> {
    write_held(state, run, false).await
}

/// `save`, and when `finished` also gives the lease up (nothing is left to drive).
async fn write_held(state: &AppState, run: &LoadedRun, finished: bool) -> ApiResult<()> {
    let json = serde_json::to_string(&run.state).map_err(|e| ApiError::Internal(e.to_string()))?;
    let saved = sqlx::query(
        "UPDATE workflow_runs SET state = $1, status = $2, updated_at = $3,
             lease_owner = CASE WHEN $4 = 1 THEN NULL ELSE lease_owner END,
             lease_until = CASE WHEN $5 = 1 THEN 0 ELSE lease_until END
         WHERE id = $6 AND (lease_owner IS NULL OR lease_owner = $7 OR lease_until < $8)",
    )
    .bind(&json)
    .bind(run.state.status().as_str())
    .bind(now_ms())
    .bind(i64::from(finished))
    .bind(i64::from(finished))
    .bind(&run.id)
    .bind(&state.replica.id)
    .bind(now_ms())
    .execute(&state.db)
    .await?;
    if saved.rows_affected() == 0 {
        return Err(ApiError::Conflict(LEASE_LOST.to_string()));
    }
    published(state, run);
    Ok(())
}

/// Writes a state change made outside the runner (a cancellation through the API), whoever
/// holds the lease: the holder reads it back at its next tick.
async fn save_unleased(state: &AppState, run: &LoadedRun) -> ApiResult<()> {
    let json = serde_json::to_string(&run.state).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query("UPDATE workflow_runs SET state = $1, status = $2, updated_at = $3 WHERE id = $4")
        .bind(&json)
        .bind(run.state.status().as_str())
        .bind(now_ms())
        .bind(&run.id)
        .execute(&state.db)
        .await?;
    published(state, run);
    Ok(())
}

fn published(state: &AppState, run: &LoadedRun) {
    state.publish(crate::state::PlaneEvent {
        kind: "workflow_run".into(),
        id: run.id.clone(),
        promotion: Some(run.promotion_id.clone()),
        at: rfc3339(now_ms()),
    });
}

fn apply(run: &mut LoadedRun, event: Event) -> ApiResult<()> {
    run.state
        .apply(&run.template, event, OffsetDateTime::now_utc())
        .map_err(|e| ApiError::Internal(format!("workflow run {}: {e}", run.id)))
}

pub async fn cancel(state: &AppState, promotion_id: &str) -> ApiResult<()> {
    if let Some(mut run) = load(state, promotion_id).await?
        && !run.state.status().is_finished()
    {
        apply(
            &mut run,
            Event::Cancel {
                reason: "promotion cancelled".to_string(),
            },
        )?;
        save_unleased(state, &run).await?;
        state.wake_runners();
    }
    Ok(())
}

async fn step_deployments(state: &AppState, run_id: &str, step_id: &str) -> ApiResult<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT deployment_id FROM workflow_step_deployments WHERE run_id = $1 AND step_id = $2
         ORDER BY created_at, idempotency_key",
    )
    .bind(run_id)
    .bind(step_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows.into_iter().map(|(d,)| d).collect())
}

pub async fn view_for(state: &AppState, promotion_id: &str) -> ApiResult<Option<RunView>> {
    let Some(run) = load(state, promotion_id).await? else {
        return Ok(None);
    };
    let mut steps = Vec::new();
    for (step, record) in run.template.steps().iter().zip(run.state.steps()) {
        let (attempt, message) = match &record.status {
            StepStatus::Pending => (0, String::new()),
            StepStatus::Running { attempt, .. } => (*attempt, String::new()),
            StepStatus::WaitingRetry {
                attempt,
                last_failure,
                ..
            } => (*attempt, format!("retrying after: {last_failure}")),
            StepStatus::Succeeded { attempt, .. } => (*attempt, String::new()),
            StepStatus::Failed {
                attempt, reason, ..
            } => (*attempt, reason.clone()),
            StepStatus::Skipped { reason } => (
                0,
                serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.get("why").and_then(|w| w.as_str()).map(str::to_string))
                    .unwrap_or_default(),
            ),
        };
        steps.push(StepView {
            id: step.id.clone(),
            kind: step.kind.type_name().to_string(),
            status: record.status.name().to_string(),
            attempt,
            message,
            deployments: step_deployments(state, &run.id, &step.id).await?,
        });
    }
    Ok(Some(RunView {
        id: run.id,
        template: run.template.name().to_string(),
        status: run.state.status().as_str().to_string(),
        steps,
    }))
}

/// Checks a workflow template when it is set: every error with its line. (Whether the
/// environment's targets can deploy a step's strategy is checked when the step deploys,
/// since targets come and go: `deployments::create_with_strategy`.)
pub fn validate_workflow(yaml: &str) -> ApiResult<()> {
    WorkflowTemplate::parse("workflow.yaml", yaml).map_err(|e| {
        let details: Vec<serde_json::Value> = e
            .errors
            .iter()
            .map(|err| serde_json::json!({"line": err.line, "column": err.column, "message": err.message}))
            .collect();
        ApiError::Detailed(
            Box::new(ApiError::Unprocessable(format!("invalid workflow template:\n{e}"))),
            serde_json::json!({ "errors": details }),
        )
    })?;
    Ok(())
}

/// Refuses, when a template is set on an environment, a blue-green deploy step the
/// environment's current targets cannot run, naming them (targets added later are checked when
/// the step deploys: `deployments::create_with_strategy`).
pub async fn check_strategies(state: &AppState, environment_id: &str, yaml: &str) -> ApiResult<()> {
    let Ok(template) = WorkflowTemplate::parse("workflow.yaml", yaml) else {
        // `validate_workflow` reports the template's errors.
        return Ok(());
    };
    let blue_green = template.steps().iter().find(
        |s| matches!(&s.kind, StepKind::Deploy(spec) if spec.strategy == DeployStrategy::BlueGreen),
    );
    let Some(step) = blue_green else {
        return Ok(());
    };
    let unable: Vec<String> = crate::targets::list(state, Some(environment_id))
        .await?
        .into_iter()
        .filter(|t| !stella_pki::BLUE_GREEN_TARGET_KINDS.contains(&t.kind.as_str()))
        .map(|t| format!("{} ({})", t.name, t.kind))
        .collect();
    if unable.is_empty() {
        return Ok(());
    }
    Err(ApiError::Unprocessable(format!(
        "workflow template: step {:?} deploys blue-green, which only targets of kind {} can; \
         this environment has {}",
        step.id,
        stella_pki::BLUE_GREEN_TARGET_KINDS.join(", "),
        unable.join(", ")
    )))
}

/// `stella rollback --env E`: the release deployed before the current one goes back on every
/// target of the environment, as a normal deployment of signed jobs.
pub async fn rollback_environment(
    state: &AppState,
    env: &str,
    requested_by: &str,
) -> ApiResult<deployments::Deployment> {
    let env = crate::environments::find(state, env).await?;
    let releases: Vec<(String,)> = sqlx::query_as(
        "SELECT release_id FROM deployments WHERE environment_id = $1 AND status = 'succeeded'
         AND kind = 'deploy' ORDER BY created_at DESC",
    )
    .bind(&env.id)
    .fetch_all(&state.db)
    .await?;
    let current = releases.first().map(|(r,)| r.clone()).ok_or_else(|| {
        ApiError::Unprocessable(format!("nothing was deployed to {} yet", env.name))
    })?;
    let previous = releases
        .iter()
        .map(|(r,)| r)
        .find(|r| **r != current)
        .cloned()
        .ok_or_else(|| {
            ApiError::Unprocessable(format!(
                "{} has had only one release; there is nothing to roll back to",
                env.name
            ))
        })?;
    let deployment = deployments::create(
        state,
        CreateDeployment {
            release: previous,
            env: env.id.clone(),
            targets: Vec::new(),
            selector: Default::default(),
            id: None,
        },
    )
    .await?;
    crate::evidence::mark_rollback(state, &deployment.id, &current, requested_by).await?;
    state.publish_event("deployment", &deployment.id);
    tracing::info!(env = %env.name, deployment = %deployment.id, release = %deployment.release, "rollback by hand");
    Ok(deployment)
}

/// Drives every running workflow run until the plane shuts down.
pub fn spawn_runner(state: SharedState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut shutdown = state.shutdown.clone();
        let mut health = HealthCounters::default();
        loop {
            if let Err(e) = tick(&state, &mut health).await {
                tracing::error!(error = %e, "workflow runner tick failed");
            }
            tokio::select! {
                _ = state.runner_wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    })
}

/// Consecutive healthy observations per (run, step, attempt), and when the last one counted.
#[derive(Default)]
struct HealthCounters(HashMap<String, (u32, std::time::Instant)>);

async fn tick(state: &AppState, health: &mut HealthCounters) -> ApiResult<()> {
    for row in claim_runs(state).await? {
        let id = row.0.clone();
        let run = parse_run(row)?;
        match drive(state, run, health).await {
            Ok(()) => {}
            Err(ApiError::Conflict(message)) if message == LEASE_LOST => {
                tracing::warn!(run = %id, "another replica took over this workflow run");
            }
            Err(e) => tracing::error!(run = %id, error = %e, "workflow run step failed to advance"),
        }
    }
    crate::evidence::record_pending(state).await
}

/// What `save` answers when this replica no longer holds the run's lease.
const LEASE_LOST: &str = "the workflow run's lease passed to another replica";

/// Takes or renews the lease of every running run that is free, expired or already this
/// replica's, and returns them oldest first. Replicas claiming at the same moment skip each
/// other's rows (`FOR UPDATE SKIP LOCKED`) instead of queueing behind them, so each run is
/// driven by one replica at a time; a replica that stops renewing (crash) loses its runs to
/// the others once `run_lease` has passed.
async fn claim_runs(state: &AppState) -> ApiResult<Vec<(String, String, String, String)>> {
    let now = now_ms();
    let until = now + i64::try_from(state.config.run_lease.as_millis()).unwrap_or(i64::MAX / 2);
    let sql = format!(
        "UPDATE workflow_runs SET lease_owner = $1, lease_until = $2 WHERE id IN (
             SELECT id FROM workflow_runs WHERE status = 'running'
             AND (lease_owner IS NULL OR lease_owner = $3 OR lease_until < $4)
             ORDER BY created_at LIMIT 200{})
         RETURNING id, promotion_id, template, state, created_at",
        crate::store::Backend::of(&state.db).skip_locked()
    );
    let mut rows: Vec<(String, String, String, String, i64)> =
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(&state.replica.id)
            .bind(until)
            .bind(&state.replica.id)
            .bind(now)
            .fetch_all(&state.db)
            .await?;
    rows.sort_by(|a, b| (a.4, &a.0).cmp(&(b.4, &b.0)));
    Ok(rows
        .into_iter()
        .map(|(id, promotion, template, state, _)| (id, promotion, template, state))
        .collect())
}

/// Gives up every lease this replica holds (graceful shutdown): the others take the runs over
/// at once. Returns how many runs were released.
pub async fn release_leases(state: &AppState) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE workflow_runs SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = $1",
    )
    .bind(&state.replica.id)
    .execute(&state.db)
    .await?
    .rows_affected())
}

/// Advances one run as far as it can go now.
async fn drive(state: &AppState, mut run: LoadedRun, health: &mut HealthCounters) -> ApiResult<()> {
    let promotion = promotions::record(state, &run.promotion_id).await?;
    // Each pass applies at least one event or stops; a template has at most MAX_STEPS steps
    // with bounded retries, so this bound is never what ends a healthy run's pass.
    for _ in 0..1000 {
        let actions =
            stella_workflow::next_actions(&run.template, &run.state, OffsetDateTime::now_utc())
                .map_err(|e| ApiError::Internal(format!("workflow run {}: {e}", run.id)))?;
        let mut progressed = false;
        for action in actions {
            match action {
                Action::StartStep {
                    step_id,
                    attempt,
                    idempotency_key,
                } => {
                    start_step(
                        state,
                        &mut run,
                        &promotion,
                        &step_id,
                        attempt,
                        &idempotency_key,
                    )
                    .await?;
                    progressed = true;
                }
                Action::TimeoutStep { step_id, attempt } => {
                    apply(&mut run, Event::StepTimedOut { step_id, attempt })?;
                    progressed = true;
                }
                Action::CompleteWait { step_id, attempt } => {
                    apply(&mut run, Event::WaitElapsed { step_id, attempt })?;
                    progressed = true;
                }
                Action::CancelStep { step_id, attempt } => {
                    apply(
                        &mut run,
                        Event::StepFailed {
                            step_id,
                            attempt,
                            reason: "cancelled".to_string(),
                        },
                    )?;
                    progressed = true;
                }
                Action::WakeAt(_) => {}
                Action::Finish(outcome) => {
                    finish(state, &run, outcome).await?;
                    return Ok(());
                }
            }
            save(state, &run).await?;
        }
        if poll_running(state, &mut run, &promotion, health).await? {
            save(state, &run).await?;
            progressed = true;
        }
        if !progressed {
            return Ok(());
        }
    }
    Ok(())
}

/// A deployment id derived from an idempotency key: the same step attempt always names the
/// same deployment, so a restarted runner finds it instead of creating a second one.
fn deployment_id_for(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    format!("dep-{}", &hex::encode(digest)[..24])
}

async fn deployment_status(state: &AppState, id: &str) -> ApiResult<Option<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT status, message FROM deployments WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.db)
            .await?,
    )
}

/// What one deployment of a step puts where, and how.
struct StepDeployment<'a> {
    release_id: &'a str,
    environment_id: &'a str,
    /// Empty: every target of the environment.
    targets: Vec<String>,
    strategy: DeployMode,
}

/// Creates the deployment for `key` unless it exists, and remembers which step started it.
async fn ensure_deployment(
    state: &AppState,
    run: &LoadedRun,
    step_id: &str,
    key: &str,
    what: StepDeployment<'_>,
) -> ApiResult<String> {
    let id = deployment_id_for(key);
    if deployment_status(state, &id).await?.is_none() {
        deployments::create_with_strategy(
            state,
            CreateDeployment {
                release: what.release_id.to_string(),
                env: what.environment_id.to_string(),
                targets: what.targets,
                selector: Default::default(),
                id: Some(id.clone()),
            },
            what.strategy,
        )
        .await?;
        state.publish_event("deployment", &id);
    }
    remember_step_deployment(state, run, step_id, key, &id).await?;
    sqlx::query("UPDATE promotions SET deployment_id = $1, updated_at = $2 WHERE id = $3")
        .bind(&id)
        .bind(now_ms())
        .bind(&run.promotion_id)
        .execute(&state.db)
        .await?;
    Ok(id)
}

async fn remember_step_deployment(
    state: &AppState,
    run: &LoadedRun,
    step_id: &str,
    key: &str,
    deployment_id: &str,
) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO workflow_step_deployments (idempotency_key, run_id, step_id, deployment_id,
             created_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(key)
    .bind(&run.id)
    .bind(step_id)
    .bind(deployment_id)
    .bind(now_ms())
    .execute(&state.db)
    .await?;
    Ok(())
}

/// The signed job an agent runs for `step`, when an agent runs it: an HTTP health probe or a
/// script (container health is watched here, from inventory).
fn agent_step_job(step: &stella_workflow::Step) -> Option<JobKind> {
    let ms = |d: Duration| {
        u64::try_from(d.as_millis())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_STEP_JOB_TIMEOUT_MS)
    };
    match &step.kind {
        StepKind::HealthCheck(spec) => match &spec.probe {
            HealthProbe::Http { url, expect_status } => {
                Some(JobKind::HealthCheck(HealthCheckJob {
                    http: HttpProbe {
                        url: url.to_string(),
                        expect_status: *expect_status,
                    },
                    interval_ms: ms(spec.interval),
                    healthy_after: spec.healthy_after.clamp(1, MAX_HEALTHY_AFTER),
                    timeout_ms: ms(step.timeout.unwrap_or(DEFAULT_PROBE_TIMEOUT)),
                }))
            }
            HealthProbe::Container => None,
        },
        StepKind::Script(spec) => Some(JobKind::Script(ScriptJob {
            command: spec.command.clone(),
            timeout_ms: ms(step.timeout.unwrap_or(DEFAULT_SCRIPT_TIMEOUT)),
        })),
        _ => None,
    }
}

/// Creates the jobs of an agent-run step for `key` unless they exist: one per target this run
/// deployed to, or every target of the environment when nothing was deployed yet (a step before
/// the deploy). Like a deployment, its id derives from the key, so a restart finds it.
async fn ensure_step_jobs(
    state: &AppState,
    run: &LoadedRun,
    promotion: &PromotionRecord,
    step: &stella_workflow::Step,
    key: &str,
) -> ApiResult<String> {
    let job = agent_step_job(step)
        .ok_or_else(|| ApiError::Internal(format!("step {} is not run by agents", step.id)))?;
    let id = deployment_id_for(key);
    if deployment_status(state, &id).await?.is_none() {
        deployments::create_step_jobs(
            state,
            CreateDeployment {
                release: promotion.release_id.clone(),
                env: promotion.environment_id.clone(),
                targets: touched_targets(state, &run.id).await?,
                selector: Default::default(),
                id: Some(id.clone()),
            },
            job,
        )
        .await?;
        state.publish_event("deployment", &id);
    }
    remember_step_deployment(state, run, &step.id, key, &id).await?;
    Ok(id)
}

/// How the jobs of an agent-run step ended: `None` while one still runs.
async fn step_jobs_outcome(
    state: &AppState,
    key: &str,
    step_type: &str,
) -> ApiResult<Option<Result<(), String>>> {
    Ok(
        match deployment_status(state, &deployment_id_for(key)).await? {
            Some((status, message)) => match status.as_str() {
                "succeeded" => Some(Ok(())),
                "running" => None,
                other => Some(Err(format!("{step_type} {other}: {message}"))),
            },
            None => Some(Err(format!("the {step_type} step's jobs are missing"))),
        },
    )
}

async fn start_step(
    state: &AppState,
    run: &mut LoadedRun,
    promotion: &PromotionRecord,
    step_id: &str,
    attempt: u32,
    key: &str,
) -> ApiResult<()> {
    let step = run
        .template
        .step(step_id)
        .cloned()
        .ok_or_else(|| ApiError::Internal(format!("unknown step {step_id}")))?;
    let started = |run: &mut LoadedRun| {
        apply(
            run,
            Event::StepStarted {
                step_id: step_id.to_string(),
                attempt,
            },
        )
    };
    let settle = |run: &mut LoadedRun, result: Result<(), String>| match result {
        Ok(()) => apply(
            run,
            Event::StepSucceeded {
                step_id: step_id.to_string(),
                attempt,
                output: None,
            },
        ),
        Err(reason) => apply(
            run,
            Event::StepFailed {
                step_id: step_id.to_string(),
                attempt,
                reason,
            },
        ),
    };
    match &step.kind {
        // The run starts only once the gates allowed the promotion (approvals included).
        StepKind::Approval => {
            started(run)?;
            settle(run, Ok(()))?;
        }
        // Gates are evaluated again right before deploying: a freeze that began after the
        // approval still stops the promotion.
        StepKind::Gate => {
            started(run)?;
            let decision = crate::gates::decide(state, promotion).await?;
            let result = if decision.outcome == "allowed" {
                Ok(())
            } else {
                Err(format!(
                    "gates {}: {}",
                    decision.outcome,
                    decision
                        .gates
                        .iter()
                        .filter(|g| g.status != "passed")
                        .map(|g| format!("{}: {}", g.gate, g.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            };
            settle(run, result)?;
        }
        StepKind::Deploy(spec) => {
            promotions::set_status(
                state,
                &run.promotion_id,
                &["approved"],
                "deploying",
                "",
                None,
            )
            .await?;
            let first_batch = match spec.strategy {
                DeployStrategy::Rolling { batch_size, .. } => {
                    batches(state, &promotion.environment_id, batch_size)
                        .await?
                        .into_iter()
                        .next()
                        .unwrap_or_default()
                }
                _ => Vec::new(),
            };
            let key = batch_key(key, spec.strategy, 0);
            let created = ensure_deployment(
                state,
                run,
                step_id,
                &key,
                StepDeployment {
                    release_id: &promotion.release_id,
                    environment_id: &promotion.environment_id,
                    targets: first_batch,
                    strategy: job_strategy(spec.strategy),
                },
            )
            .await;
            match created {
                Ok(_) => started(run)?,
                Err(e) => {
                    started(run)?;
                    settle(run, Err(e.to_string()))?;
                }
            }
        }
        StepKind::Rollback => {
            started(run)?;
            match rollback_plan(state, run, promotion).await? {
                Ok((release_id, targets)) => {
                    // A rollback replaces in place whatever strategy deployed: it puts back
                    // a release that already ran on these targets.
                    let created = ensure_deployment(
                        state,
                        run,
                        step_id,
                        key,
                        StepDeployment {
                            release_id: &release_id,
                            environment_id: &promotion.environment_id,
                            targets,
                            strategy: DeployMode::Replace,
                        },
                    )
                    .await;
                    match created {
                        Ok(deployment_id) => {
                            crate::evidence::mark_rollback(
                                state,
                                &deployment_id,
                                &promotion.release_id,
                                &promotion.requested_by,
                            )
                            .await?
                        }
                        Err(e) => settle(run, Err(e.to_string()))?,
                    }
                }
                Err(why) => settle(run, Err(why))?,
            }
        }
        StepKind::HealthCheck(spec) if matches!(spec.probe, HealthProbe::Container) => {
            started(run)?
        }
        StepKind::Wait(_) => started(run)?,
        // Run by the agents of the run's targets, as signed step jobs.
        StepKind::HealthCheck(_) | StepKind::Script(_) => {
            let created = ensure_step_jobs(state, run, promotion, &step, key).await;
            started(run)?;
            if let Err(e) = created {
                settle(run, Err(e.to_string()))?;
            }
        }
        StepKind::Notify(spec) => {
            started(run)?;
            let result = notify(state, promotion, &spec.webhook, spec.message.as_deref()).await;
            settle(run, result)?;
        }
    }
    Ok(())
}

/// How each job of a deploy step changes its target. Blue-green deploys every target of the
/// step at once, like all-at-once, and each target switches from blue to green by itself;
/// rolling batches replace in place.
fn job_strategy(strategy: DeployStrategy) -> DeployMode {
    match strategy {
        DeployStrategy::BlueGreen => DeployMode::BlueGreen,
        DeployStrategy::AllAtOnce | DeployStrategy::Rolling { .. } => DeployMode::Replace,
    }
}

fn batch_key(key: &str, strategy: DeployStrategy, batch: usize) -> String {
    match strategy {
        DeployStrategy::Rolling { .. } => format!("{key}#batch-{batch}"),
        _ => key.to_string(),
    }
}

/// The environment's targets in rolling batches (by name, so the order is stable).
async fn batches(
    state: &AppState,
    environment_id: &str,
    batch_size: u32,
) -> ApiResult<Vec<Vec<String>>> {
    let mut names: Vec<String> = crate::targets::list(state, Some(environment_id))
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    Ok(names
        .chunks(batch_size.max(1) as usize)
        .map(|c| c.to_vec())
        .collect())
}

/// Looks at running steps that wait on something outside the engine; true when an event was
/// applied.
async fn poll_running(
    state: &AppState,
    run: &mut LoadedRun,
    promotion: &PromotionRecord,
    health: &mut HealthCounters,
) -> ApiResult<bool> {
    let running: Vec<(String, u32)> = run
        .state
        .steps()
        .iter()
        .filter_map(|r| match r.status {
            StepStatus::Running { attempt, .. } => Some((r.id.clone(), attempt)),
            _ => None,
        })
        .collect();
    let mut progressed = false;
    for (step_id, attempt) in running {
        let Some(step) = run.template.step(&step_id).cloned() else {
            continue;
        };
        let key = stella_workflow::idempotency_key(&run.id, &step_id, attempt);
        let outcome: Option<Result<(), String>> = match &step.kind {
            StepKind::Deploy(spec) => {
                poll_deploy(state, run, promotion, &step_id, &key, spec.strategy).await?
            }
            StepKind::Rollback => match deployment_status(state, &deployment_id_for(&key)).await? {
                Some((status, message)) => settled(&status, &message),
                None => None,
            },
            StepKind::HealthCheck(spec) if matches!(spec.probe, HealthProbe::Container) => {
                poll_health(state, run, &key, spec.interval, spec.healthy_after, health).await?
            }
            StepKind::HealthCheck(_) | StepKind::Script(_) => {
                step_jobs_outcome(state, &key, step.kind.type_name()).await?
            }
            _ => None,
        };
        if let Some(result) = outcome {
            let event = match result {
                Ok(()) => Event::StepSucceeded {
                    step_id: step_id.clone(),
                    attempt,
                    output: None,
                },
                Err(reason) => Event::StepFailed {
                    step_id: step_id.clone(),
                    attempt,
                    reason,
                },
            };
            apply(run, event)?;
            progressed = true;
        }
    }
    Ok(progressed)
}

fn settled(status: &str, message: &str) -> Option<Result<(), String>> {
    match status {
        "succeeded" => Some(Ok(())),
        "running" => None,
        other => Some(Err(format!("deployment {other}: {message}"))),
    }
}

async fn poll_deploy(
    state: &AppState,
    run: &LoadedRun,
    promotion: &PromotionRecord,
    step_id: &str,
    key: &str,
    strategy: DeployStrategy,
) -> ApiResult<Option<Result<(), String>>> {
    let DeployStrategy::Rolling { batch_size, .. } = strategy else {
        return Ok(
            match deployment_status(state, &deployment_id_for(key)).await? {
                Some((status, message)) => settled(&status, &message),
                None => Some(Err("the step's deployment is missing".to_string())),
            },
        );
    };
    let batches = batches(state, &promotion.environment_id, batch_size).await?;
    for (i, batch) in batches.iter().enumerate() {
        let batch_key = batch_key(key, strategy, i);
        match deployment_status(state, &deployment_id_for(&batch_key)).await? {
            Some((status, message)) => match settled(&status, &message) {
                None => return Ok(None),
                Some(Err(e)) => return Ok(Some(Err(format!("batch {}: {e}", i + 1)))),
                Some(Ok(())) => continue,
            },
            None => {
                // The previous batch is done: the next one starts.
                let created = ensure_deployment(
                    state,
                    run,
                    step_id,
                    &batch_key,
                    StepDeployment {
                        release_id: &promotion.release_id,
                        environment_id: &promotion.environment_id,
                        targets: batch.clone(),
                        strategy: job_strategy(strategy),
                    },
                )
                .await;
                return Ok(created.err().map(|e| Err(e.to_string())));
            }
        }
    }
    Ok(Some(Ok(())))
}

/// The targets this run's deploy steps touched.
async fn touched_targets(state: &AppState, run_id: &str) -> ApiResult<Vec<String>> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT t.name FROM workflow_step_deployments s
         JOIN jobs j ON j.deployment_id = s.deployment_id
         JOIN targets t ON t.id = j.target_id
         WHERE s.run_id = $1 AND j.kind = 'deploy'
         AND j.status NOT IN ('queued', 'refused', 'cancelled')
         ORDER BY t.name",
    )
    .bind(run_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows.into_iter().map(|(t,)| t).collect())
}

/// What a rollback puts back: the release last deployed successfully to the environment
/// before this promotion, on the targets this run changed.
async fn rollback_plan(
    state: &AppState,
    run: &LoadedRun,
    promotion: &PromotionRecord,
) -> ApiResult<Result<(String, Vec<String>), String>> {
    let previous: Option<(String,)> = sqlx::query_as(
        "SELECT release_id FROM deployments
         WHERE environment_id = $1 AND status = 'succeeded' AND kind = 'deploy'
         AND release_id <> $2 AND created_at < $3
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(&promotion.environment_id)
    .bind(&promotion.release_id)
    .bind(promotion.created_at)
    .fetch_optional(&state.db)
    .await?;
    let Some((release_id,)) = previous else {
        return Ok(Err(
            "nothing to roll back to: no earlier release was deployed to this environment"
                .to_string(),
        ));
    };
    let targets = touched_targets(state, &run.id).await?;
    if targets.is_empty() {
        return Ok(Err(
            "no target was changed, nothing to roll back".to_string()
        ));
    }
    Ok(Ok((release_id, targets)))
}

/// Container health as the agents report it in their inventory, after every job and on
/// change: healthy once every component of every touched target is running (and healthy when
/// the image has a health check) `healthy_after` times in a row, `interval` apart; failed as
/// soon as one is unhealthy or not running.
async fn poll_health(
    state: &AppState,
    run: &LoadedRun,
    key: &str,
    interval: Duration,
    healthy_after: u32,
    health: &mut HealthCounters,
) -> ApiResult<Option<Result<(), String>>> {
    let targets = touched_targets(state, &run.id).await?;
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT t.name, i.component, i.state, i.health FROM inventory i
         JOIN targets t ON t.id = i.target_id
         JOIN workflow_step_deployments s ON s.deployment_id = i.deployment_id
         WHERE s.run_id = $1",
    )
    .bind(&run.id)
    .fetch_all(&state.db)
    .await?;
    for (target, component, st, h) in &rows {
        if h == "unhealthy" || (st != "running" && st != "created" && !st.is_empty()) {
            health.0.remove(key);
            return Ok(Some(Err(format!(
                "{target}: {component} is {st}{}",
                if h.is_empty() {
                    String::new()
                } else {
                    format!(" ({h})")
                }
            ))));
        }
    }
    let all_up = !targets.is_empty()
        && targets.iter().all(|t| {
            rows.iter().any(|(target, _, st, h)| {
                target == t && st == "running" && (h.is_empty() || h == "healthy" || h == "none")
            })
        })
        && rows.iter().all(|(_, _, st, h)| {
            st == "running" && (h.is_empty() || h == "healthy" || h == "none")
        });
    let now = std::time::Instant::now();
    let entry = health.0.entry(key.to_string()).or_insert((0, now));
    if !all_up {
        *entry = (0, now);
        return Ok(None);
    }
    if entry.0 == 0 || now.duration_since(entry.1) >= interval {
        *entry = (entry.0 + 1, now);
    }
    if entry.0 >= healthy_after {
        health.0.remove(key);
        return Ok(Some(Ok(())));
    }
    Ok(None)
}

async fn notify(
    state: &AppState,
    promotion: &PromotionRecord,
    webhook: &url::Url,
    message: Option<&str>,
) -> Result<(), String> {
    let p = promotions::get(state, &promotion.id)
        .await
        .map_err(|e| e.to_string())?;
    let body = serde_json::json!({
        "promotion": p.id, "release": p.release, "environment": p.environment,
        "status": p.status, "requested_by": p.requested_by,
        "message": message.unwrap_or("stella promotion update"),
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .post(webhook.as_str())
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("webhook unreachable: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered HTTP {}", resp.status().as_u16()))
    }
}

async fn finish(state: &AppState, run: &LoadedRun, outcome: RunOutcome) -> ApiResult<()> {
    write_held(state, run, true).await?;
    let failures: Vec<String> = run
        .template
        .steps()
        .iter()
        .zip(run.state.steps())
        .filter_map(|(step, r)| match &r.status {
            StepStatus::Failed { reason, .. } => Some(format!("{}: {reason}", step.id)),
            _ => None,
        })
        .collect();
    let rolled_back = run
        .template
        .steps()
        .iter()
        .zip(run.state.steps())
        .any(|(step, r)| {
            matches!(step.kind, StepKind::Rollback)
                && matches!(r.status, StepStatus::Succeeded { .. })
        });
    let (to, message) = match outcome {
        RunOutcome::Succeeded => ("deployed", String::new()),
        RunOutcome::Failed if rolled_back => (
            "rolled_back",
            format!("rolled back after: {}", failures.join("; ")),
        ),
        RunOutcome::Failed => ("failed", failures.join("; ")),
        RunOutcome::Cancelled => ("cancelled", "workflow cancelled".to_string()),
    };
    promotions::set_status(
        state,
        &run.promotion_id,
        &["approved", "deploying"],
        to,
        &message,
        Some(now_ms()),
    )
    .await?;
    tracing::info!(run = %run.id, promotion = %run.promotion_id, outcome = to, "workflow run finished");
    Ok(())
}
