//! The audit log: every mutation through the API, with who, what, when and from where. Rows
//! are only ever inserted; nothing in the plane updates or deletes them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiResult;
use crate::state::AppState;
use crate::store::{Db, new_id, now_ms, rfc3339};

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: String,
    pub at: String,
    /// The user of the API token, or `-` when the request carried none (enrollment).
    pub actor: String,
    pub role: String,
    pub method: String,
    pub path: String,
    /// The HTTP status the request ended with (refusals are recorded too).
    pub status: u16,
    pub client_ip: String,
}

pub struct AuditRecord<'a> {
    pub actor: &'a str,
    pub role: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub client_ip: &'a str,
}

pub async fn record(db: &Db, entry: AuditRecord<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (id, at, actor, role, method, path, status, client_ip)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(new_id("au"))
    .bind(now_ms())
    .bind(entry.actor)
    .bind(entry.role)
    .bind(entry.method)
    .bind(entry.path)
    .bind(i64::from(entry.status))
    .bind(entry.client_ip)
    .execute(db)
    .await?;
    Ok(())
}

type AuditRow = (String, i64, String, String, String, String, i64, String);

/// Newest first.
pub async fn list(state: &AppState, limit: u32) -> ApiResult<Vec<AuditEntry>> {
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT id, at, actor, role, method, path, status, client_ip FROM audit_log
         ORDER BY at DESC, id DESC LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, at, actor, role, method, path, status, client_ip)| AuditEntry {
                id,
                at: rfc3339(at),
                actor,
                role,
                method,
                path,
                status: u16::try_from(status).unwrap_or(0),
                client_ip,
            },
        )
        .collect())
}
