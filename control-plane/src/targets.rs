//! Targets: places a release runs, each served by one agent with the matching capability;
//! and what the agents observe on them (inventory, version sticker).

use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::agents::{self, validate_resource_name};
use crate::environments;
use crate::error::{ApiError, ApiResult};
use crate::releases::ReleaseComponent;
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};

pub const KNOWN_KINDS: &[&str] = &["docker", "compose", "ssh", "winrm", "ecs", "nomad"];

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateTarget {
    pub name: String,
    pub env: String,
    pub kind: String,
    pub agent: String,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Target {
    pub id: String,
    pub name: String,
    pub environment: String,
    pub kind: String,
    pub agent_id: String,
    pub config: serde_json::Value,
    pub created_at: String,
}

pub async fn create(state: &AppState, req: CreateTarget) -> ApiResult<Target> {
    validate_resource_name("target", &req.name)?;
    if !KNOWN_KINDS.contains(&req.kind.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "unknown target kind {:?}; expected one of {}",
            req.kind,
            KNOWN_KINDS.join(", ")
        )));
    }
    let config = req
        .config
        .unwrap_or(serde_json::Value::Object(Default::default()));
    if !config.is_object() {
        return Err(ApiError::BadRequest(
            "target config must be a JSON object".to_string(),
        ));
    }
    let env = environments::find(state, &req.env).await?;
    let agent = agents::find(state, &req.agent).await?;
    if agent.status == "revoked" {
        return Err(ApiError::Unprocessable(format!(
            "agent {} is revoked",
            agent.id
        )));
    }
    if !agent.capabilities.iter().any(|c| c == &req.kind) {
        return Err(ApiError::Unprocessable(format!(
            "agent {} ({}) lacks the {:?} capability (it has: {})",
            agent.name,
            agent.id,
            req.kind,
            if agent.capabilities.is_empty() {
                "none".to_string()
            } else {
                agent.capabilities.join(", ")
            }
        )));
    }
    let id = new_id("tgt");
    let now = now_ms();
    let config_json =
        serde_json::to_string(&config).map_err(|e| ApiError::Internal(e.to_string()))?;
    let inserted = sqlx::query(
        "INSERT INTO targets (id, name, environment_id, kind, agent_id, config, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(&env.id)
    .bind(&req.kind)
    .bind(&agent.id)
    .bind(&config_json)
    .bind(now)
    .execute(&state.db)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "target {:?} already exists",
            req.name
        )));
    }
    Ok(Target {
        id,
        name: req.name,
        environment: env.name,
        kind: req.kind,
        agent_id: agent.id,
        config,
        created_at: rfc3339(now),
    })
}

const TARGET_SELECT: &str = "SELECT t.id, t.name, e.name AS environment, t.kind, t.agent_id, \
     t.config, t.created_at FROM targets t JOIN environments e ON e.id = t.environment_id";

fn target_from_row(row: &sqlx::any::AnyRow) -> Target {
    Target {
        id: row.get("id"),
        name: row.get("name"),
        environment: row.get("environment"),
        kind: row.get("kind"),
        agent_id: row.get("agent_id"),
        config: serde_json::from_str(row.get::<&str, _>("config"))
            .unwrap_or(serde_json::Value::Null),
        created_at: rfc3339(row.get("created_at")),
    }
}

pub async fn list(state: &AppState, env: Option<&str>) -> ApiResult<Vec<Target>> {
    let rows = match env {
        Some(env) => {
            let env = environments::find(state, env).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "{TARGET_SELECT} WHERE t.environment_id = $1 ORDER BY t.name"
            )))
            .bind(env.id)
            .fetch_all(&state.db)
            .await?
        }
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "{TARGET_SELECT} ORDER BY t.name"
            )))
            .fetch_all(&state.db)
            .await?
        }
    };
    Ok(rows.iter().map(target_from_row).collect())
}

pub async fn list_for_agent(state: &AppState, agent_id: &str) -> ApiResult<Vec<Target>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{TARGET_SELECT} WHERE t.agent_id = $1 ORDER BY t.name"
    )))
    .bind(agent_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows.iter().map(target_from_row).collect())
}

pub async fn find(state: &AppState, id_or_name: &str) -> ApiResult<Target> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{TARGET_SELECT} WHERE t.id = $1 OR t.name = $2"
    )))
    .bind(id_or_name)
    .bind(id_or_name)
    .fetch_optional(&state.db)
    .await?;
    row.as_ref()
        .map(target_from_row)
        .ok_or_else(|| ApiError::NotFound(format!("target {id_or_name:?} not found")))
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ObservedWorkload {
    pub component: String,
    pub digest: String,
    pub state: String,
    pub health: String,
    pub workload_id: String,
    pub release_id: String,
    pub deployment_id: String,
    pub reported_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DesiredState {
    pub release_id: String,
    pub release_name: String,
    pub deployment_id: String,
    pub components: Vec<ReleaseComponent>,
}

/// A component whose observed state differs from the desired one.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Difference {
    pub component: String,
    pub desired_digest: Option<String>,
    pub observed_digest: Option<String>,
    pub observed_state: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TargetDetail {
    #[serde(flatten)]
    pub target: Target,
    pub desired: Option<DesiredState>,
    pub observed: Vec<ObservedWorkload>,
    pub sticker: Option<serde_json::Value>,
    pub observed_at: Option<String>,
    pub observation_error: Option<String>,
    pub in_sync: bool,
    pub differences: Vec<Difference>,
}

pub async fn detail(state: &AppState, id_or_name: &str) -> ApiResult<TargetDetail> {
    let target = find(state, id_or_name).await?;
    // Desired = the release of the last job that succeeded on this target.
    let desired_row = sqlx::query(
        "SELECT d.id AS deployment_id, r.id AS release_id, r.name AS release_name
         FROM jobs j JOIN deployments d ON d.id = j.deployment_id JOIN releases r ON r.id = d.release_id
         WHERE j.target_id = $1 AND j.status = 'succeeded' AND j.kind = 'deploy'
         ORDER BY j.finished_at DESC, j.sequence DESC LIMIT 1",
    )
    .bind(&target.id)
    .fetch_optional(&state.db)
    .await?;
    let desired = match desired_row {
        Some(row) => {
            let release_id: String = row.get("release_id");
            Some(DesiredState {
                components: crate::releases::components(state, &release_id).await?,
                release_id,
                release_name: row.get("release_name"),
                deployment_id: row.get("deployment_id"),
            })
        }
        None => None,
    };
    let observed: Vec<ObservedWorkload> = sqlx::query(
        "SELECT component, digest, state, health, workload_id, release_id, deployment_id, reported_at
         FROM inventory WHERE target_id = $1 ORDER BY component, workload_id",
    )
    .bind(&target.id)
    .fetch_all(&state.db)
    .await?
    .iter()
    .map(|r| ObservedWorkload {
        component: r.get("component"),
        digest: r.get("digest"),
        state: r.get("state"),
        health: r.get("health"),
        workload_id: r.get("workload_id"),
        release_id: r.get("release_id"),
        deployment_id: r.get("deployment_id"),
        reported_at: rfc3339(r.get("reported_at")),
    })
    .collect();
    let observation: Option<(String, String, i64)> = sqlx::query_as(
        "SELECT sticker, error, reported_at FROM target_observations WHERE target_id = $1",
    )
    .bind(&target.id)
    .fetch_optional(&state.db)
    .await?;

    let mut differences = Vec::new();
    if let Some(desired) = &desired {
        for c in &desired.components {
            let seen = observed.iter().find(|o| o.component == c.name);
            let ok = seen.is_some_and(|o| o.digest == c.digest && o.state == "running");
            if !ok {
                differences.push(Difference {
                    component: c.name.clone(),
                    desired_digest: Some(c.digest.clone()),
                    observed_digest: seen.map(|o| o.digest.clone()),
                    observed_state: seen.map(|o| o.state.clone()),
                });
            }
        }
        for o in &observed {
            if !desired.components.iter().any(|c| c.name == o.component) {
                differences.push(Difference {
                    component: o.component.clone(),
                    desired_digest: None,
                    observed_digest: Some(o.digest.clone()),
                    observed_state: Some(o.state.clone()),
                });
            }
        }
    }
    let (sticker, observed_at, observation_error) = match observation {
        Some((sticker, error, at)) => (
            serde_json::from_str(&sticker).ok(),
            Some(rfc3339(at)),
            (!error.is_empty()).then_some(error),
        ),
        None => (None, None, None),
    };
    Ok(TargetDetail {
        in_sync: desired.is_some() && differences.is_empty(),
        target,
        desired,
        observed,
        sticker,
        observed_at,
        observation_error,
        differences,
    })
}

/// Replaces the plane's view of the targets an agent reported on. Targets the agent does not
/// serve are ignored: an agent can only speak for its own targets.
/// Runs inside the caller's transaction (the group commit).
pub async fn record_inventory(
    tx: &mut sqlx::AnyConnection,
    agent_id: &str,
    report: &stella_proto::InventoryReport,
) -> Result<(), sqlx::Error> {
    let observed_at = if report.observed_at_unix_ms > 0 {
        report.observed_at_unix_ms
    } else {
        now_ms()
    };
    for t in &report.targets {
        let row: Option<(String,)> =
            sqlx::query_as("SELECT id FROM targets WHERE name = $1 AND agent_id = $2")
                .bind(&t.target)
                .bind(agent_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((target_id,)) = row else {
            tracing::warn!(agent_id, target = %t.target, "inventory for a target this agent does not serve; ignored");
            continue;
        };
        sqlx::query("DELETE FROM inventory WHERE target_id = $1")
            .bind(&target_id)
            .execute(&mut *tx)
            .await?;
        for w in &t.workloads {
            sqlx::query(
                "INSERT INTO inventory (target_id, agent_id, component, digest, state, health,
                    workload_id, release_id, deployment_id, reported_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (target_id, workload_id) DO NOTHING",
            )
            .bind(&target_id)
            .bind(agent_id)
            .bind(&w.component)
            .bind(&w.digest)
            .bind(&w.state)
            .bind(&w.health)
            .bind(&w.workload_id)
            .bind(&w.release_id)
            .bind(&w.deployment_id)
            .bind(observed_at)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO target_observations (target_id, sticker, error, reported_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (target_id) DO UPDATE SET sticker = excluded.sticker, error = excluded.error,
                reported_at = excluded.reported_at",
        )
        .bind(&target_id)
        .bind(&t.sticker_json)
        .bind(&t.error)
        .bind(observed_at)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
