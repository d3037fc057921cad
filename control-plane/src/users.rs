//! API users: each API token belongs to a user and carries one role. What a role may do is
//! decided here, in one table, and nowhere else.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agents::validate_resource_name;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{Db, new_id, now_ms, rfc3339};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including tokens, agents, environments, targets and key rotation.
    Admin,
    /// Components, releases, deployments, promotions and rollbacks.
    Releaser,
    /// Approves or rejects promotions.
    Approver,
    /// Reads only.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Releaser => "releaser",
            Role::Approver => "approver",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "releaser" => Some(Role::Releaser),
            "approver" => Some(Role::Approver),
            "viewer" => Some(Role::Viewer),
            _ => None,
        }
    }
}

/// What a request wants to do, for the role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    Read,
    /// Components, releases, deployments, promotions, rollbacks.
    Release,
    /// Approve or reject a promotion.
    Approve,
    /// Fleet and configuration: tokens, agents, environments, targets, keys.
    Administer,
}

impl Permission {
    fn granted_to(self, role: Role) -> bool {
        matches!(
            (self, role),
            (_, Role::Admin)
                | (Permission::Read, _)
                | (Permission::Release, Role::Releaser)
                | (Permission::Approve, Role::Approver)
        )
    }

    fn describe(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Release => "create releases, deployments and promotions",
            Permission::Approve => "approve or reject promotions",
            Permission::Administer => "administer the plane",
        }
    }
}

/// The authenticated caller of an API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub user: String,
    pub role: Role,
    pub token_id: String,
}

impl Actor {
    pub fn require(&self, permission: Permission) -> ApiResult<()> {
        if permission.granted_to(self.role) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "user {:?} has role {}, which may not {}",
                self.user,
                self.role.as_str(),
                permission.describe()
            )))
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateApiToken {
    /// The user the token acts as (recorded in the audit log and on approvals).
    pub user: String,
    pub role: Role,
    /// A name for the token, unique; defaults to `<user>-<random>`.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenCreated {
    pub id: String,
    pub name: String,
    pub user: String,
    pub role: Role,
    /// Shown once; only its hash is stored.
    pub token: String,
}

/// An API token as listed: never its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenView {
    pub id: String,
    pub name: String,
    pub user: String,
    pub role: Role,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

pub async fn create_api_token(state: &AppState, req: CreateApiToken) -> ApiResult<ApiTokenCreated> {
    validate_resource_name("user", &req.user)?;
    let name = match req.name {
        Some(name) => {
            validate_resource_name("token name", &name)?;
            name
        }
        None => format!("{}-{}", req.user, &new_id("t")[2..10]),
    };
    let token = stella_pki::generate_api_token();
    let id = new_id("at");
    let inserted = sqlx::query(
        "INSERT INTO api_tokens (id, name, token_hash, created_at, user_name, role)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&id)
    .bind(&name)
    .bind(stella_pki::hash_token(&token))
    .bind(now_ms())
    .bind(&req.user)
    .bind(req.role.as_str())
    .execute(&state.db)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "an API token named {name:?} already exists"
        )));
    }
    tracing::info!(token_id = %id, user = %req.user, role = req.role.as_str(), "API token created");
    Ok(ApiTokenCreated {
        id,
        name,
        user: req.user,
        role: req.role,
        token,
    })
}

type ApiTokenRow = (String, String, String, String, i64, Option<i64>);

fn view((id, name, user, role, created_at, revoked_at): ApiTokenRow) -> ApiTokenView {
    ApiTokenView {
        id,
        name,
        user,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        created_at: rfc3339(created_at),
        revoked_at: revoked_at.map(rfc3339),
    }
}

pub async fn list_api_tokens(state: &AppState) -> ApiResult<Vec<ApiTokenView>> {
    let rows: Vec<ApiTokenRow> = sqlx::query_as(
        "SELECT id, name, user_name, role, created_at, revoked_at FROM api_tokens
         ORDER BY created_at, id",
    )
    .fetch_all(&state.db)
    .await?;
    Ok(rows.into_iter().map(view).collect())
}

/// Revokes an API token by id or name; revoking twice is not an error.
pub async fn revoke_api_token(state: &AppState, id_or_name: &str) -> ApiResult<ApiTokenView> {
    sqlx::query(
        "UPDATE api_tokens SET revoked_at = $1 WHERE (id = $2 OR name = $3) AND revoked_at IS NULL",
    )
    .bind(now_ms())
    .bind(id_or_name)
    .bind(id_or_name)
    .execute(&state.db)
    .await?;
    let row: Option<ApiTokenRow> = sqlx::query_as(
        "SELECT id, name, user_name, role, created_at, revoked_at FROM api_tokens
         WHERE id = $1 OR name = $2",
    )
    .bind(id_or_name)
    .bind(id_or_name)
    .fetch_optional(&state.db)
    .await?;
    row.map(view)
        .ok_or_else(|| ApiError::NotFound(format!("API token {id_or_name:?} not found")))
}

/// Checks a bearer token against the stored hashes (constant-time comparison of the hash).
pub async fn authenticate(db: &Db, token: &str) -> ApiResult<Actor> {
    let hash = stella_pki::hash_token(token);
    let row: Option<(String, String, String, String, Option<i64>)> = sqlx::query_as(
        "SELECT id, user_name, role, token_hash, revoked_at FROM api_tokens WHERE token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(db)
    .await?;
    match row {
        Some((id, user, role, stored, None)) if stella_pki::token_matches(token, &stored) => {
            let role = Role::parse(&role)
                .ok_or_else(|| ApiError::Internal(format!("token {id} has unknown role")))?;
            Ok(Actor {
                user,
                role,
                token_id: id,
            })
        }
        Some((_, _, _, _, Some(_))) => Err(ApiError::Unauthorized(
            "API token has been revoked".to_string(),
        )),
        _ => Err(ApiError::Unauthorized("invalid API token".to_string())),
    }
}
