//! Environments: the ordered stages a release moves through (dev → stage → prod), each with
//! its promotion rules (approvals, separation of duties, freeze and schedule windows, Rego
//! policies), variables, secret references and workflow template.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agents::validate_resource_name;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};

/// A period in which promotions into the environment are blocked, unless the requester (or
/// the user asking for the override) is one of `override_users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeWindow {
    /// RFC 3339 start (inclusive).
    pub start: String,
    /// RFC 3339 end (exclusive).
    pub end: String,
    pub reason: String,
    #[serde(default)]
    pub override_users: Vec<String>,
}

/// When promotions may run: on these days (mon…sun), between these UTC times (HH:MM).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScheduleWindow {
    pub days: Vec<String>,
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSettings {
    #[serde(default)]
    pub freeze_windows: Vec<FreezeWindow>,
    /// Empty: any time.
    #[serde(default)]
    pub schedule_windows: Vec<ScheduleWindow>,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Secret *references* (`env:NAME`, `file:/path`, `vault:path#key`, `aws-sm:arn`), resolved
    /// where the secret is used; the plane never stores a secret value.
    #[serde(default)]
    pub secret_refs: BTreeMap<String, String>,
    /// Rego modules by name, evaluated at every promotion (package `stella.promotion`).
    #[serde(default)]
    pub policies: BTreeMap<String, String>,
    /// The workflow template (YAML) promotions into this environment run; none: the default.
    #[serde(default)]
    pub workflow: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnvironment {
    pub name: String,
    /// The environment a release must have been deployed to before this one.
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub required_approvals: u32,
    #[serde(default)]
    pub separation_of_duties: bool,
    #[serde(default)]
    pub settings: EnvironmentSettings,
}

/// A change to an environment: only the fields given change.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEnvironment {
    /// The previous environment; `""` makes this one a first stage.
    pub after: Option<String>,
    pub required_approvals: Option<u32>,
    pub separation_of_duties: Option<bool>,
    pub freeze_windows: Option<Vec<FreezeWindow>>,
    pub schedule_windows: Option<Vec<ScheduleWindow>>,
    /// Merged into the variables; an empty value removes the variable.
    pub variables: Option<BTreeMap<String, String>>,
    /// Merged into the secret references; an empty value removes the reference.
    pub secret_refs: Option<BTreeMap<String, String>>,
    /// Merged into the policies; an empty module removes the policy.
    pub policies: Option<BTreeMap<String, String>>,
    /// The workflow template YAML; `""` returns to the default template.
    pub workflow: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Environment {
    pub id: String,
    pub name: String,
    /// The name of the previous environment, if any.
    pub after: Option<String>,
    pub required_approvals: u32,
    pub separation_of_duties: bool,
    pub settings: EnvironmentSettings,
    pub created_at: String,
}

pub const MAX_REQUIRED_APPROVALS: u32 = 10;
const SECRET_REF_SCHEMES: &[&str] = &["env", "file", "vault", "aws-sm", "gcp-sm", "azure-kv"];

fn validate_settings(settings: &EnvironmentSettings) -> ApiResult<()> {
    for w in &settings.freeze_windows {
        let start = parse_time("freeze window start", &w.start)?;
        let end = parse_time("freeze window end", &w.end)?;
        if end <= start {
            return Err(ApiError::BadRequest(format!(
                "freeze window {:?}: end {} is not after start {}",
                w.reason, w.end, w.start
            )));
        }
        if w.reason.trim().is_empty() {
            return Err(ApiError::BadRequest(
                "freeze window: give a reason".to_string(),
            ));
        }
        for user in &w.override_users {
            validate_resource_name("user", user)?;
        }
    }
    for w in &settings.schedule_windows {
        if w.days.is_empty() {
            return Err(ApiError::BadRequest(
                "schedule window: give at least one day".to_string(),
            ));
        }
        for day in &w.days {
            if !["mon", "tue", "wed", "thu", "fri", "sat", "sun"].contains(&day.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "schedule window: unknown day {day:?} (mon, tue, wed, thu, fri, sat, sun)"
                )));
            }
        }
        let start = parse_clock(&w.start)?;
        let end = parse_clock(&w.end)?;
        if end <= start {
            return Err(ApiError::BadRequest(format!(
                "schedule window: end {} is not after start {}",
                w.end, w.start
            )));
        }
    }
    for key in settings.variables.keys().chain(settings.secret_refs.keys()) {
        let ok = !key.is_empty()
            && key.len() <= 128
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "invalid variable name {key:?}: use 1-128 characters from [A-Za-z0-9_.-]"
            )));
        }
    }
    for (key, reference) in &settings.secret_refs {
        let scheme = reference
            .split_once(':')
            .map(|(s, rest)| (s, rest.is_empty()));
        match scheme {
            Some((s, false)) if SECRET_REF_SCHEMES.contains(&s) => {}
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "secret {key:?}: {reference_shown} is not a secret reference; give SCHEME:LOCATOR \
                     with SCHEME one of {} (the plane stores references, never secret values)",
                    SECRET_REF_SCHEMES.join(", "),
                    // Never echo what may be a secret value.
                    reference_shown = if reference.contains(':') {
                        "the value"
                    } else {
                        "a plain value"
                    },
                )));
            }
        }
    }
    for (name, module) in &settings.policies {
        validate_resource_name("policy", name)?;
        crate::gates::validate_policy(name, module)?;
    }
    if let Some(template) = &settings.workflow {
        crate::runs::validate_workflow(template)?;
    }
    Ok(())
}

pub fn parse_time(what: &str, s: &str) -> ApiResult<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|e| ApiError::BadRequest(format!("{what}: {s:?} is not an RFC 3339 time ({e})")))
}

fn parse_clock(s: &str) -> ApiResult<u32> {
    let bad = || ApiError::BadRequest(format!("schedule window: {s:?} is not a UTC time HH:MM"));
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if h > 24 || m > 59 || (h == 24 && m > 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

async fn resolve_after(state: &AppState, after: Option<&str>) -> ApiResult<Option<String>> {
    match after {
        None | Some("") => Ok(None),
        Some(name) => Ok(Some(find(state, name).await?.id)),
    }
}

pub async fn create(state: &AppState, req: CreateEnvironment) -> ApiResult<Environment> {
    validate_resource_name("environment", &req.name)?;
    if req.required_approvals > MAX_REQUIRED_APPROVALS {
        return Err(ApiError::BadRequest(format!(
            "required approvals must be at most {MAX_REQUIRED_APPROVALS}"
        )));
    }
    validate_settings(&req.settings)?;
    let after_id = resolve_after(state, req.after.as_deref()).await?;
    let id = new_id("env");
    let now = now_ms();
    let settings =
        serde_json::to_string(&req.settings).map_err(|e| ApiError::Internal(e.to_string()))?;
    let inserted = sqlx::query(
        "INSERT INTO environments (id, name, created_at, after_id, required_approvals,
             separation_of_duties, settings, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(now)
    .bind(&after_id)
    .bind(i64::from(req.required_approvals))
    .bind(i64::from(req.separation_of_duties))
    .bind(&settings)
    .bind(now)
    .execute(&state.db)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "environment {:?} already exists",
            req.name
        )));
    }
    find(state, &id).await
}

pub async fn update(
    state: &AppState,
    name: &str,
    req: UpdateEnvironment,
) -> ApiResult<Environment> {
    let current = find(state, name).await?;
    let mut settings = current.settings.clone();
    if let Some(w) = req.freeze_windows {
        settings.freeze_windows = w;
    }
    if let Some(w) = req.schedule_windows {
        settings.schedule_windows = w;
    }
    merge(&mut settings.variables, req.variables);
    merge(&mut settings.secret_refs, req.secret_refs);
    merge(&mut settings.policies, req.policies);
    let workflow_set = req.workflow.is_some();
    if let Some(workflow) = req.workflow {
        settings.workflow = (!workflow.trim().is_empty()).then_some(workflow);
    }
    validate_settings(&settings)?;
    if workflow_set && let Some(template) = &settings.workflow {
        crate::runs::check_strategies(state, &current.id, template).await?;
    }
    let required_approvals = req.required_approvals.unwrap_or(current.required_approvals);
    if required_approvals > MAX_REQUIRED_APPROVALS {
        return Err(ApiError::BadRequest(format!(
            "required approvals must be at most {MAX_REQUIRED_APPROVALS}"
        )));
    }
    let after_id = match req.after.as_deref() {
        Some(after) => {
            let after_id = resolve_after(state, Some(after)).await?;
            if let Some(after_id) = &after_id {
                ensure_no_cycle(state, &current.id, after_id).await?;
            }
            after_id
        }
        None => match &current.after {
            Some(after) => Some(find(state, after).await?.id),
            None => None,
        },
    };
    let settings_json =
        serde_json::to_string(&settings).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query(
        "UPDATE environments SET after_id = $1, required_approvals = $2, separation_of_duties = $3,
             settings = $4, updated_at = $5 WHERE id = $6",
    )
    .bind(&after_id)
    .bind(i64::from(required_approvals))
    .bind(i64::from(
        req.separation_of_duties
            .unwrap_or(current.separation_of_duties),
    ))
    .bind(&settings_json)
    .bind(now_ms())
    .bind(&current.id)
    .execute(&state.db)
    .await?;
    find(state, &current.id).await
}

fn merge(into: &mut BTreeMap<String, String>, changes: Option<BTreeMap<String, String>>) {
    for (k, v) in changes.unwrap_or_default() {
        if v.is_empty() {
            into.remove(&k);
        } else {
            into.insert(k, v);
        }
    }
}

/// Refuses an order in which an environment would (indirectly) come after itself.
async fn ensure_no_cycle(state: &AppState, env_id: &str, new_after: &str) -> ApiResult<()> {
    let mut cursor = Some(new_after.to_string());
    let mut hops = 0;
    while let Some(id) = cursor {
        if id == env_id {
            return Err(ApiError::BadRequest(
                "environment order would form a cycle".to_string(),
            ));
        }
        hops += 1;
        if hops > 1000 {
            return Err(ApiError::Internal("environment order too deep".to_string()));
        }
        cursor = sqlx::query_scalar::<_, Option<String>>(
            "SELECT after_id FROM environments WHERE id = $1",
        )
        .bind(&id)
        .fetch_optional(&state.db)
        .await?
        .flatten();
    }
    Ok(())
}

// `separation_of_duties` is a BIGINT 0/1 on both databases (SQLite has no boolean type).
type EnvironmentRow = (String, String, i64, Option<String>, i64, i64, String);

/// The environment columns, with the name of the environment it comes after.
macro_rules! select_environments {
    ($tail:literal) => {
        concat!(
            "SELECT e.id, e.name, e.created_at, p.name, e.required_approvals,
                e.separation_of_duties, e.settings
             FROM environments e LEFT JOIN environments p ON p.id = e.after_id ",
            $tail
        )
    };
}

fn from_row(
    (id, name, at, after, required_approvals, separation_of_duties, settings): EnvironmentRow,
) -> ApiResult<Environment> {
    Ok(Environment {
        id,
        name,
        after,
        required_approvals: u32::try_from(required_approvals).unwrap_or(0),
        separation_of_duties: separation_of_duties != 0,
        settings: serde_json::from_str(&settings)
            .map_err(|e| ApiError::Internal(format!("environment settings unreadable: {e}")))?,
        created_at: rfc3339(at),
    })
}

/// Environments in promotion order: each after the one it follows, first stages first.
pub async fn list(state: &AppState) -> ApiResult<Vec<Environment>> {
    let rows: Vec<EnvironmentRow> =
        sqlx::query_as(select_environments!("ORDER BY e.created_at, e.name"))
            .fetch_all(&state.db)
            .await?;
    let all: Vec<Environment> = rows.into_iter().map(from_row).collect::<ApiResult<_>>()?;
    Ok(promotion_order(all))
}

fn promotion_order(all: Vec<Environment>) -> Vec<Environment> {
    let mut ordered: Vec<Environment> = Vec::with_capacity(all.len());
    let mut rest = all;
    while !rest.is_empty() {
        let before = rest.len();
        let (ready, waiting): (Vec<_>, Vec<_>) = rest.into_iter().partition(|e| match &e.after {
            None => true,
            Some(after) => ordered.iter().any(|o| &o.name == after),
        });
        ordered.extend(ready);
        rest = waiting;
        if rest.len() == before {
            // Unreachable with the cycle check; keep what is left rather than loop forever.
            ordered.append(&mut rest);
        }
    }
    ordered
}

pub async fn find(state: &AppState, id_or_name: &str) -> ApiResult<Environment> {
    let row: Option<EnvironmentRow> =
        sqlx::query_as(select_environments!("WHERE e.id = $1 OR e.name = $2"))
            .bind(id_or_name)
            .bind(id_or_name)
            .fetch_optional(&state.db)
            .await?;
    row.map(from_row)
        .transpose()?
        .ok_or_else(|| ApiError::NotFound(format!("environment {id_or_name:?} not found")))
}
