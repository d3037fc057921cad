//! Promotions: a request to move a release into an environment.
//!
//! pending → awaiting_approval → approved → deploying → deployed, or rejected / cancelled /
//! failed / rolled_back. The gates (`gates.rs`) decide at creation and at every approval or
//! rejection; every evaluation is stored as a decision record. A failing gate rejects the
//! promotion whatever the approvals say. Once approved, the environment's workflow runs it
//! (`runs.rs`); nothing here talks to agents except through the deployments the run creates.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};
use crate::users::Actor;
use crate::{environments, gates, releases, runs};

/// Statuses after which nothing changes any more.
pub const FINAL_STATUSES: &[&str] = &["deployed", "rejected", "cancelled", "failed", "rolled_back"];

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePromotion {
    pub release: String,
    /// The environment to promote into.
    pub env: String,
    #[serde(default)]
    pub reason: String,
    /// Ask to override an active freeze window (granted only to the window's override users).
    #[serde(default)]
    pub override_freeze: bool,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    #[serde(default)]
    pub comment: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RejectRequest {
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApprovalView {
    pub user: String,
    /// approve or reject.
    pub decision: String,
    pub comment: String,
    pub at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GateView {
    pub gate: String,
    /// passed, failed or pending.
    pub status: String,
    pub reason: String,
}

/// One evaluation of the gates, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DecisionView {
    pub id: String,
    pub at: String,
    /// allowed, blocked or pending.
    pub outcome: String,
    pub gates: Vec<GateView>,
    /// sha256 of the canonical JSON of every input the gates saw.
    pub input_hash: String,
    pub policy_digest: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Promotion {
    pub id: String,
    pub release: String,
    pub environment: String,
    pub status: String,
    pub requested_by: String,
    pub reason: String,
    pub override_freeze: bool,
    pub message: String,
    pub deployment_id: Option<String>,
    pub approvals: Vec<ApprovalView>,
    /// The latest decision.
    pub decision: Option<DecisionView>,
    pub workflow: Option<runs::RunView>,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

/// Why a promotion was allowed or blocked: every decision, newest last, and the input of the
/// latest one.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Explanation {
    pub promotion: String,
    pub status: String,
    pub summary: String,
    pub decisions: Vec<DecisionView>,
    /// The input document the latest decision was computed from (its hash is `input_hash`).
    pub input: Option<serde_json::Value>,
}

/// The parts of a promotion row the gates and the workflow runner need.
#[derive(Debug, Clone)]
pub struct PromotionRecord {
    pub id: String,
    pub release_id: String,
    pub environment_id: String,
    pub status: String,
    pub requested_by: String,
    pub reason: String,
    pub override_freeze: bool,
    pub created_at: i64,
}

type PromotionRow = (String, String, String, String, String, String, String, i64);

pub async fn record(state: &AppState, id: &str) -> ApiResult<PromotionRecord> {
    let row: Option<PromotionRow> = sqlx::query_as(
        "SELECT id, release_id, environment_id, status, requested_by, reason, freeze_override,
             created_at
         FROM promotions WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&state.db)
    .await?;
    let (id, release_id, environment_id, status, requested_by, reason, freeze_override, at) =
        row.ok_or_else(|| ApiError::NotFound(format!("promotion {id:?} not found")))?;
    Ok(PromotionRecord {
        id,
        release_id,
        environment_id,
        status,
        requested_by,
        reason,
        override_freeze: !freeze_override.is_empty(),
        created_at: at,
    })
}

pub async fn create(state: &AppState, actor: &Actor, req: CreatePromotion) -> ApiResult<Promotion> {
    let release = releases::find(state, &req.release).await?;
    let env = environments::find(state, &req.env).await?;
    if req.reason.len() > 1000 {
        return Err(ApiError::BadRequest(
            "reason: at most 1000 characters".to_string(),
        ));
    }
    let open: Option<(String,)> = sqlx::query_as(
        "SELECT id FROM promotions WHERE release_id = $1 AND environment_id = $2
         AND status IN ('pending', 'awaiting_approval', 'approved', 'deploying')",
    )
    .bind(&release.id)
    .bind(&env.id)
    .fetch_optional(&state.db)
    .await?;
    if let Some((id,)) = open {
        return Err(ApiError::Conflict(format!(
            "release {} already has an open promotion into {}: {id}",
            release.name, env.name
        )));
    }
    let id = new_id("prm");
    let now = now_ms();
    sqlx::query(
        "INSERT INTO promotions (id, release_id, environment_id, status, requested_by, reason,
             freeze_override, created_at, updated_at)
         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(&release.id)
    .bind(&env.id)
    .bind(&actor.user)
    .bind(&req.reason)
    .bind(if req.override_freeze {
        actor.user.as_str()
    } else {
        ""
    })
    .bind(now)
    .bind(now)
    .execute(&state.db)
    .await?;
    tracing::info!(promotion = %id, release = %release.name, env = %env.name, by = %actor.user, "promotion requested");
    decide_and_advance(state, &id).await?;
    get(state, &id).await
}

/// Evaluates the gates and moves the promotion on: rejected when a gate failed, approved (and
/// its workflow started) when all passed, awaiting approval otherwise.
pub async fn decide_and_advance(state: &AppState, id: &str) -> ApiResult<DecisionView> {
    let promotion = record(state, id).await?;
    let decision = gates::decide(state, &promotion).await?;
    let now = now_ms();
    match decision.outcome.as_str() {
        "blocked" => {
            let failed: Vec<String> = decision
                .gates
                .iter()
                .filter(|g| g.status == "failed")
                .map(|g| format!("{}: {}", g.gate, g.reason))
                .collect();
            set_status(
                state,
                id,
                &["pending", "awaiting_approval"],
                "rejected",
                &format!("blocked by gates: {}", failed.join("; ")),
                Some(now),
            )
            .await?;
        }
        "allowed" => {
            let mut tx = crate::store::write_tx(&state.db).await?;
            let moved = sqlx::query(
                "UPDATE promotions SET status = 'approved', message = '', updated_at = $1
                 WHERE id = $2 AND status IN ('pending', 'awaiting_approval')",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if moved.rows_affected() == 1 {
                runs::start_in(&mut tx, state, &promotion).await?;
            }
            tx.commit().await?;
            state.wake_runners();
        }
        _ => {
            set_status(
                state,
                id,
                &["pending"],
                "awaiting_approval",
                "waiting for approvals",
                None,
            )
            .await?;
        }
    }
    state.publish_event("promotion", id);
    Ok(decision)
}

/// Moves a promotion from one of `from` to `to`; false when it was not in one of `from`.
pub async fn set_status(
    state: &AppState,
    id: &str,
    from: &[&str],
    to: &str,
    message: &str,
    finished_at: Option<i64>,
) -> ApiResult<bool> {
    // `from` holds at most a handful of fixed statuses; match them in Rust to keep one query.
    let current = record(state, id).await?;
    if !from.contains(&current.status.as_str()) {
        return Ok(false);
    }
    let updated = sqlx::query(
        "UPDATE promotions SET status = $1, message = $2, updated_at = $3,
             finished_at = COALESCE($4, finished_at)
         WHERE id = $5 AND status = $6",
    )
    .bind(to)
    .bind(message)
    .bind(now_ms())
    .bind(finished_at)
    .bind(id)
    .bind(&current.status)
    .execute(&state.db)
    .await?;
    if updated.rows_affected() == 1 {
        tracing::info!(promotion = %id, from = %current.status, to, %message, "promotion status");
        state.publish_event("promotion", id);
    }
    Ok(updated.rows_affected() == 1)
}

pub async fn approve(
    state: &AppState,
    actor: &Actor,
    id: &str,
    req: ApproveRequest,
) -> ApiResult<Promotion> {
    record_vote(state, actor, id, "approve", &req.comment).await?;
    decide_and_advance(state, id).await?;
    get(state, id).await
}

pub async fn reject(
    state: &AppState,
    actor: &Actor,
    id: &str,
    req: RejectRequest,
) -> ApiResult<Promotion> {
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest("give a reason".to_string()));
    }
    record_vote(state, actor, id, "reject", &req.reason).await?;
    decide_and_advance(state, id).await?;
    get(state, id).await
}

async fn record_vote(
    state: &AppState,
    actor: &Actor,
    id: &str,
    decision: &str,
    comment: &str,
) -> ApiResult<()> {
    let promotion = record(state, id).await?;
    if !["pending", "awaiting_approval"].contains(&promotion.status.as_str()) {
        return Err(ApiError::Conflict(format!(
            "promotion {id} is {}; only a promotion awaiting approval can be approved or rejected",
            promotion.status
        )));
    }
    if comment.len() > 1000 {
        return Err(ApiError::BadRequest(
            "comment: at most 1000 characters".to_string(),
        ));
    }
    if decision == "approve" {
        // Refused at the door, not just outvoted by the gate, so that a self-approval is never
        // on record as an approval.
        if let Some(violation) =
            crate::gates::separation_of_duties_violation(state, &promotion, &actor.user).await?
        {
            return Err(ApiError::Forbidden(format!(
                "separation of duties: {violation}"
            )));
        }
    }
    let inserted = sqlx::query(
        "INSERT INTO approvals (promotion_id, user_name, decision, comment, at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (promotion_id, user_name) DO NOTHING",
    )
    .bind(id)
    .bind(&actor.user)
    .bind(decision)
    .bind(comment)
    .bind(now_ms())
    .execute(&state.db)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "{} has already decided on promotion {id}",
            actor.user
        )));
    }
    tracing::info!(promotion = %id, user = %actor.user, decision, "promotion vote");
    Ok(())
}

pub async fn cancel(state: &AppState, actor: &Actor, id: &str) -> ApiResult<Promotion> {
    let promotion = record(state, id).await?;
    let cancelled = set_status(
        state,
        id,
        &["pending", "awaiting_approval", "approved"],
        "cancelled",
        &format!("cancelled by {}", actor.user),
        Some(now_ms()),
    )
    .await?;
    if !cancelled {
        return Err(ApiError::Conflict(format!(
            "promotion {id} is {} and can no longer be cancelled",
            promotion.status
        )));
    }
    runs::cancel(state, id).await?;
    get(state, id).await
}

pub async fn approvals(state: &AppState, id: &str) -> ApiResult<Vec<ApprovalView>> {
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT user_name, decision, comment, at FROM approvals WHERE promotion_id = $1
         ORDER BY at, user_name",
    )
    .bind(id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(user, decision, comment, at)| ApprovalView {
            user,
            decision,
            comment,
            at: rfc3339(at),
        })
        .collect())
}

type ViewRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    Option<i64>,
);

macro_rules! select_promotions {
    ($tail:literal) => {
        concat!(
            "SELECT p.id, r.name, e.name, p.status, p.requested_by, p.reason, p.freeze_override,
                p.message, p.deployment_id, p.created_at, p.updated_at, p.finished_at
             FROM promotions p JOIN releases r ON r.id = p.release_id
             JOIN environments e ON e.id = p.environment_id ",
            $tail
        )
    };
}

async fn view(state: &AppState, row: ViewRow) -> ApiResult<Promotion> {
    let (
        id,
        release,
        environment,
        status,
        requested_by,
        reason,
        freeze_override,
        message,
        deployment_id,
        created_at,
        updated_at,
        finished_at,
    ) = row;
    let decision = gates::decisions(state, &id).await?.pop();
    Ok(Promotion {
        approvals: approvals(state, &id).await?,
        workflow: runs::view_for(state, &id).await?,
        id,
        release,
        environment,
        status,
        requested_by,
        reason,
        override_freeze: !freeze_override.is_empty(),
        message,
        deployment_id,
        decision,
        created_at: rfc3339(created_at),
        updated_at: rfc3339(updated_at),
        finished_at: finished_at.map(rfc3339),
    })
}

pub async fn get(state: &AppState, id: &str) -> ApiResult<Promotion> {
    let row: Option<ViewRow> = sqlx::query_as(select_promotions!("WHERE p.id = $1"))
        .bind(id)
        .fetch_optional(&state.db)
        .await?;
    let row = row.ok_or_else(|| ApiError::NotFound(format!("promotion {id:?} not found")))?;
    view(state, row).await
}

pub async fn list(state: &AppState) -> ApiResult<Vec<Promotion>> {
    let rows: Vec<ViewRow> = sqlx::query_as(select_promotions!("ORDER BY p.created_at, p.id"))
        .fetch_all(&state.db)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(view(state, row).await?);
    }
    Ok(out)
}

pub async fn explain(state: &AppState, id: &str) -> ApiResult<Explanation> {
    let promotion = get(state, id).await?;
    let decisions = gates::decisions(state, id).await?;
    let input = gates::latest_input(state, id).await?;
    let summary = match decisions.last() {
        None => format!("promotion {id} has no decision yet"),
        Some(d) => gates::explain(d, &promotion.status, &promotion.message),
    };
    Ok(Explanation {
        promotion: promotion.id,
        status: promotion.status,
        summary,
        decisions,
        input,
    })
}
