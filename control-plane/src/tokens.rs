//! Join tokens (one-time, expiring, stored hashed) and admin API tokens.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{Db, new_id, now_ms, rfc3339};

pub const MAX_JOIN_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateJoinToken {
    pub ttl_secs: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many agents may enroll with it (default 1: one-time).
    #[serde(default = "one")]
    pub max_uses: u32,
}

fn one() -> u32 {
    1
}

pub const MAX_JOIN_TOKEN_USES: u32 = 10_000;

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinTokenCreated {
    pub id: String,
    /// Shown once; only its hash is stored.
    pub token: String,
    pub expires_at: String,
    pub ca_fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub max_uses: u32,
}

/// A join token as listed: never its secret, which exists only as a hash.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinTokenView {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub uses: i64,
    pub max_uses: i64,
    /// active, used, expired or revoked.
    pub status: String,
    pub expires_at: String,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// id, labels, uses, max_uses, expires_at, created_at, revoked_at
type JoinTokenRow = (String, String, i64, i64, i64, i64, Option<i64>);

pub async fn list_join_tokens(state: &AppState) -> ApiResult<Vec<JoinTokenView>> {
    let rows: Vec<JoinTokenRow> = sqlx::query_as(
        "SELECT id, labels, uses, max_uses, expires_at, created_at, revoked_at FROM join_tokens
         ORDER BY created_at, id",
    )
    .fetch_all(&state.db)
    .await?;
    let now = now_ms();
    Ok(rows
        .into_iter()
        .map(
            |(id, labels, uses, max_uses, expires_at, created_at, revoked_at)| {
                let status = if revoked_at.is_some() {
                    "revoked"
                } else if uses >= max_uses {
                    "used"
                } else if expires_at <= now {
                    "expired"
                } else {
                    "active"
                };
                JoinTokenView {
                    id,
                    labels: serde_json::from_str(&labels).unwrap_or_default(),
                    uses,
                    max_uses,
                    status: status.to_string(),
                    expires_at: rfc3339(expires_at),
                    created_at: rfc3339(created_at),
                    revoked_at: revoked_at.map(rfc3339),
                }
            },
        )
        .collect())
}

/// Revokes a join token; revoking twice is not an error (idempotent).
pub async fn revoke_join_token(state: &AppState, id: &str) -> ApiResult<JoinTokenView> {
    let updated =
        sqlx::query("UPDATE join_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_ms())
            .bind(id)
            .execute(&state.db)
            .await?;
    let token = list_join_tokens(state)
        .await?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("join token {id:?} not found")))?;
    if updated.rows_affected() == 1 {
        tracing::info!(token_id = id, "join token revoked");
    }
    Ok(token)
}

pub fn validate_labels(labels: &BTreeMap<String, String>) -> ApiResult<()> {
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok {
            return Err(ApiError::BadRequest(format!(
                "invalid label key {k:?}: use 1-63 characters from [A-Za-z0-9-_./]"
            )));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(ApiError::BadRequest(format!(
                "invalid value for label {k:?}: at most 255 printable characters"
            )));
        }
    }
    Ok(())
}

pub async fn create_join_token(
    state: &AppState,
    req: CreateJoinToken,
) -> ApiResult<JoinTokenCreated> {
    if req.ttl_secs == 0 || req.ttl_secs > MAX_JOIN_TOKEN_TTL_SECS {
        return Err(ApiError::BadRequest(format!(
            "ttl must be between 1 second and {} days",
            MAX_JOIN_TOKEN_TTL_SECS / 86400
        )));
    }
    validate_labels(&req.labels)?;
    if req.max_uses == 0 || req.max_uses > MAX_JOIN_TOKEN_USES {
        return Err(ApiError::BadRequest(format!(
            "max uses must be between 1 and {MAX_JOIN_TOKEN_USES}"
        )));
    }
    let token = stella_pki::generate_join_token();
    let id = new_id("jt");
    let now = now_ms();
    let expires_at = now + (req.ttl_secs as i64) * 1000;
    let labels =
        serde_json::to_string(&req.labels).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query(
        "INSERT INTO join_tokens (id, token_hash, labels, max_uses, uses, expires_at, created_at)
         VALUES ($1, $2, $3, $4, 0, $5, $6)",
    )
    .bind(&id)
    .bind(stella_pki::hash_token(&token))
    .bind(&labels)
    .bind(i64::from(req.max_uses))
    .bind(expires_at)
    .bind(now)
    .execute(&state.db)
    .await?;
    tracing::info!(token_id = %id, ttl_secs = req.ttl_secs, "join token created");
    Ok(JoinTokenCreated {
        id,
        token,
        expires_at: rfc3339(expires_at),
        ca_fingerprint: state.keys.ca().fingerprint(),
        labels: req.labels,
        max_uses: req.max_uses,
    })
}

/// Ensures the named admin API token exists; returns the plaintext only when it was created now.
pub async fn ensure_admin_token(db: &Db, name: &str) -> Result<Option<String>, sqlx::Error> {
    let exists: Option<(String,)> = sqlx::query_as("SELECT id FROM api_tokens WHERE name = $1")
        .bind(name)
        .fetch_optional(db)
        .await?;
    if exists.is_some() {
        return Ok(None);
    }
    insert_admin_token(db, name).await.map(Some)
}

async fn insert_admin_token(db: &Db, name: &str) -> Result<String, sqlx::Error> {
    let token = stella_pki::generate_api_token();
    sqlx::query(
        "INSERT INTO api_tokens (id, name, token_hash, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(new_id("at"))
    .bind(name)
    .bind(stella_pki::hash_token(&token))
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(token)
}

/// Replaces the named admin token (used when its file was lost); returns the new plaintext.
pub async fn rotate_admin_token(db: &Db, name: &str) -> Result<String, sqlx::Error> {
    sqlx::query("DELETE FROM api_tokens WHERE name = $1")
        .bind(name)
        .execute(db)
        .await?;
    insert_admin_token(db, name).await
}
