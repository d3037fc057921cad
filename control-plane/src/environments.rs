//! Environments: the stages a release moves through (dev, stage, prod).

use serde::{Deserialize, Serialize};

use crate::agents::validate_resource_name;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateEnvironment {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Environment {
    pub id: String,
    pub name: String,
    pub created_at: String,
}

pub async fn create(state: &AppState, req: CreateEnvironment) -> ApiResult<Environment> {
    validate_resource_name("environment", &req.name)?;
    let id = new_id("env");
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO environments (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(now)
    .execute(&state.db)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "environment {:?} already exists",
            req.name
        )));
    }
    Ok(Environment {
        id,
        name: req.name,
        created_at: rfc3339(now),
    })
}

pub async fn list(state: &AppState) -> ApiResult<Vec<Environment>> {
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT id, name, created_at FROM environments ORDER BY created_at, name")
            .fetch_all(&state.db)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, at)| Environment {
            id,
            name,
            created_at: rfc3339(at),
        })
        .collect())
}

pub async fn find(state: &AppState, id_or_name: &str) -> ApiResult<Environment> {
    let row: Option<(String, String, i64)> =
        sqlx::query_as("SELECT id, name, created_at FROM environments WHERE id = ? OR name = ?")
            .bind(id_or_name)
            .bind(id_or_name)
            .fetch_optional(&state.db)
            .await?;
    row.map(|(id, name, at)| Environment {
        id,
        name,
        created_at: rfc3339(at),
    })
    .ok_or_else(|| ApiError::NotFound(format!("environment {id_or_name:?} not found")))
}
