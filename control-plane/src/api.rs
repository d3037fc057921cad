//! The REST API (HTTPS) under `/api/v1`. Every CLI command is one of these calls, so anything
//! the CLI does can be done over HTTP. The OpenAPI document (`/api/v1/openapi.json`) is
//! generated from these handlers' annotations: a route exists only if it is registered through
//! `routes!`, which also documents it, so the document cannot miss a route.
//!
//! Authentication and audit happen in one middleware: it turns the bearer token into an
//! [`Actor`] for the handlers, and records every mutating request (who, what, when, from where,
//! and its status) after the handler answered. Handlers check the actor's role.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::state::SharedState;
use crate::users::{Actor, Permission};
use crate::{
    agents, audit, components, deployments, environments, metrics, promotions, releases, targets,
    tokens, users,
};

pub const API_PREFIX: &str = "/api/v1";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Stella control plane API",
        description = "Releases, environments, targets, deployments and the agent fleet. \
Authenticate with `Authorization: Bearer TOKEN` (an API token; its role decides what it may do). \
Errors are `{code, message, details}` with a 4xx/5xx status. Lists take `limit` and `after` \
(the last id of the previous page) and announce the next page in a `Link: <…>; rel=\"next\"` header."
    ),
    modifiers(&BearerAuth),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

struct BearerAuth;

/// OpenAPI requires a description on every response; the handlers' annotations name the body,
/// and the status says the rest.
fn describe_responses(openapi: &mut utoipa::openapi::OpenApi) {
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, response) in operation.responses.responses.iter_mut() {
                if let utoipa::openapi::RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = match status.as_str() {
                        "200" => "OK",
                        "201" => "Created",
                        "400" => "Bad request: the body or a parameter is invalid",
                        "401" => "No valid API token",
                        "403" => "The token's role may not do this",
                        "404" => "Not found",
                        "409" => "Conflicts with the current state",
                        "422" => "Well-formed but impossible",
                        "429" => "Too many attempts; retry later",
                        _ => "See the error body",
                    }
                    .to_string();
                }
            }
        }
    }
}

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The routes of `/api/v1` and their OpenAPI document.
pub fn api_routes() -> OpenApiRouter<SharedState> {
    let v1 = OpenApiRouter::new()
        .routes(routes!(openapi_document))
        .routes(routes!(enroll))
        .routes(routes!(renew))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
        .routes(routes!(create_api_token, list_api_tokens))
        .routes(routes!(revoke_api_token))
        .routes(routes!(list_audit))
        .routes(routes!(list_agents))
        .routes(routes!(list_replicas))
        .routes(routes!(show_agent))
        .routes(routes!(revoke_agent))
        .routes(routes!(trust_status))
        .routes(routes!(rotate_job_key))
        .routes(routes!(rotate_ca))
        .routes(routes!(create_env, list_envs))
        .routes(routes!(show_env, update_env))
        .routes(routes!(rollback_env))
        .routes(routes!(create_target, list_targets))
        .routes(routes!(show_target))
        .routes(routes!(create_release, list_releases))
        .routes(routes!(show_release))
        .routes(routes!(diff_releases))
        .routes(routes!(create_component, list_components))
        .routes(routes!(show_component))
        .routes(routes!(sync_component))
        .routes(routes!(create_promotion, list_promotions))
        .routes(routes!(show_promotion))
        .routes(routes!(approve_promotion))
        .routes(routes!(reject_promotion))
        .routes(routes!(cancel_promotion))
        .routes(routes!(explain_promotion))
        .routes(routes!(events))
        .routes(routes!(list_evidence))
        .routes(routes!(export_evidence))
        .routes(routes!(evidence_audit))
        .routes(routes!(evidence_keys))
        .routes(routes!(show_evidence))
        .routes(routes!(create_deployment, list_deployments))
        .routes(routes!(show_deployment))
        .routes(routes!(list_drift))
        .routes(routes!(add_drift_ignore, list_drift_ignore))
        .routes(routes!(remove_drift_ignore))
        .routes(routes!(show_drift_policy, set_drift_policy))
        .routes(routes!(airgap_export))
        .routes(routes!(airgap_import));
    OpenApiRouter::with_openapi(ApiDoc::openapi()).nest(API_PREFIX, v1)
}

/// The generated OpenAPI document, as served.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_routes().into_openapi();
    describe_responses(&mut doc);
    doc
}

pub fn router(state: SharedState) -> Router {
    let (api, _) = api_routes().split_for_parts();
    Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/metrics", axum::routing::get(get_metrics))
        .merge(api)
        .fallback(|| async { ApiError::NotFound("no such API route".to_string()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate_and_audit,
        ))
        .with_state(state)
}

/// The TCP peer of an API connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

/// What the middleware learned from the `Authorization` header.
#[derive(Clone)]
enum Authentication {
    Missing,
    Refused(String),
    Actor(Actor),
}

async fn authenticate_and_audit(
    State(state): State<SharedState>,
    mut req: Request,
    next: Next,
) -> Response {
    let authentication = match req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")))
    {
        None => Authentication::Missing,
        Some(None) => Authentication::Refused("Authorization must be `Bearer TOKEN`".to_string()),
        Some(Some(token)) => match users::authenticate(&state.db, token.trim()).await {
            Ok(actor) => Authentication::Actor(actor),
            Err(ApiError::Unauthorized(message)) => Authentication::Refused(message),
            Err(e) => return e.into_response(),
        },
    };
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let client_ip = req
        .extensions()
        .get::<ClientAddr>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".to_string());
    req.extensions_mut().insert(authentication.clone());
    let response = next.run(req).await;
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if mutating && path.starts_with(API_PREFIX) {
        let (actor, role) = match &authentication {
            Authentication::Actor(a) => (a.user.as_str(), a.role.as_str()),
            _ => ("-", "-"),
        };
        let entry = audit::AuditRecord {
            actor,
            role,
            method: method.as_str(),
            path: &path,
            status: response.status().as_u16(),
            client_ip: &client_ip,
        };
        if let Err(e) = audit::record(&state.db, entry).await {
            tracing::error!(error = %e, %path, "could not write the audit log");
        }
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authentication>() {
            Some(Authentication::Actor(actor)) => Ok(actor.clone()),
            Some(Authentication::Refused(message)) => Err(ApiError::Unauthorized(message.clone())),
            _ => Err(ApiError::Unauthorized(
                "missing bearer token (Authorization header)".to_string(),
            )),
        }
    }
}

/// Bodies are parsed here so that a malformed one gets the same JSON error shape as any other.
pub struct Body<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "invalid request body: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// Pagination of list endpoints: `limit` items after the one whose id is `after`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// At most this many items (1–1000, default 100).
    pub limit: Option<u32>,
    /// The `id` of the last item of the previous page.
    pub after: Option<String>,
}

pub const DEFAULT_PAGE: u32 = 100;
pub const MAX_PAGE: u32 = 1000;

/// Answers one page of `items` (in their listed order), with a `Link` header to the next page.
pub fn page<T: Serialize>(items: Vec<T>, query: &PageQuery, path: &str) -> ApiResult<Response> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let values: Vec<serde_json::Value> = items
        .into_iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let start = match &query.after {
        None => 0,
        Some(after) => values
            .iter()
            .position(|v| v.get("id").and_then(|id| id.as_str()) == Some(after.as_str()))
            .map(|i| i + 1)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("`after`: no item with id {after:?} in this list"))
            })?,
    };
    let end = (start + limit as usize).min(values.len());
    let next = (end < values.len())
        .then(|| values[end - 1].get("id").and_then(|id| id.as_str()))
        .flatten()
        .map(str::to_string);
    let mut response = Json(&values[start..end]).into_response();
    if let Some(next) = next
        && let Ok(link) = HeaderValue::from_str(&format!(
            "<{path}?limit={limit}&after={}>; rel=\"next\"",
            url_escape(&next)
        ))
    {
        response.headers_mut().insert(header::LINK, link);
    }
    Ok(response)
}

/// Percent-encodes everything but RFC 3986 unreserved characters: one path segment or query
/// value. The CLI builds its request paths with it too.
pub fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn get_metrics(State(state): State<SharedState>) -> ApiResult<impl IntoResponse> {
    let body = metrics::render(&state).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API")))]
async fn openapi_document() -> Json<Arc<utoipa::openapi::OpenApi>> {
    static DOC: std::sync::OnceLock<Arc<utoipa::openapi::OpenApi>> = std::sync::OnceLock::new();
    Json(DOC.get_or_init(|| Arc::new(openapi())).clone())
}

/// Enroll an agent: a CSR and a join token in, a certificate and the trust bundle out.
#[utoipa::path(post, path = "/enroll", tag = "agents", request_body = agents::EnrollRequest,
    responses((status = 201, body = agents::EnrollResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody)))]
async fn enroll(
    State(state): State<SharedState>,
    client: Option<axum::Extension<ClientAddr>>,
    Body(req): Body<agents::EnrollRequest>,
) -> ApiResult<impl IntoResponse> {
    let ip = client.map(|c| c.0.0);
    let now = crate::store::now_ms();
    if let Some(ip) = ip
        && let Some(wait) = state.enrollment_limiter.blocked_for(ip, now)
    {
        state.count_enrollment_refusal("rate_limited");
        return Err(ApiError::TooManyRequests(format!(
            "too many failed enrollment attempts from {ip}; retry in {wait}s"
        )));
    }
    match agents::enroll(&state, req).await {
        Ok(answer) => Ok((StatusCode::CREATED, Json(answer))),
        Err(e) => {
            if let ApiError::Unauthorized(_) | ApiError::BadRequest(_) = &e {
                if let Some(ip) = ip {
                    state.enrollment_limiter.record_failure(ip, now);
                }
                state.count_enrollment_refusal(agents::enrollment_refusal_reason(&e));
            }
            Err(e)
        }
    }
}

/// Renew the certificate of an agent that was offline past its expiry, by proving possession
/// of its previous key.
#[utoipa::path(post, path = "/renew", tag = "agents", request_body = agents::OfflineRenewRequest,
    responses((status = 200, body = agents::OfflineRenewResponse),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
async fn renew(
    State(state): State<SharedState>,
    Body(req): Body<agents::OfflineRenewRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(agents::renew_offline(&state, req).await?))
}

/// Create a join token for enrolling agents (shown once).
#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = tokens::CreateJoinToken,
    security(("bearer" = [])),
    responses((status = 201, body = tokens::JoinTokenCreated), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn create_token(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<tokens::CreateJoinToken>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok((
        StatusCode::CREATED,
        Json(tokens::create_join_token(&state, req).await?),
    ))
}

/// List join tokens (never their secrets).
#[utoipa::path(get, path = "/tokens", tag = "tokens", security(("bearer" = [])), params(PageQuery),
    responses((status = 200, body = Vec<tokens::JoinTokenView>), (status = 401, body = ErrorBody)))]
async fn list_tokens(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Administer)?;
    page(
        tokens::list_join_tokens(&state).await?,
        &q,
        "/api/v1/tokens",
    )
}

/// Revoke a join token (idempotent).
#[utoipa::path(post, path = "/tokens/{id}/revoke", tag = "tokens", security(("bearer" = [])),
    params(("id" = String, Path, description = "join token id")),
    responses((status = 200, body = tokens::JoinTokenView), (status = 404, body = ErrorBody)))]
async fn revoke_token(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(tokens::revoke_join_token(&state, &id).await?))
}

/// Create an API token for a user with a role (shown once).
#[utoipa::path(post, path = "/api-tokens", tag = "tokens", request_body = users::CreateApiToken,
    security(("bearer" = [])),
    responses((status = 201, body = users::ApiTokenCreated), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_api_token(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<users::CreateApiToken>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok((
        StatusCode::CREATED,
        Json(users::create_api_token(&state, req).await?),
    ))
}

/// List API tokens (never their secrets).
#[utoipa::path(get, path = "/api-tokens", tag = "tokens", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = Vec<users::ApiTokenView>), (status = 403, body = ErrorBody)))]
async fn list_api_tokens(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Administer)?;
    page(
        users::list_api_tokens(&state).await?,
        &q,
        "/api/v1/api-tokens",
    )
}

/// Revoke an API token by id or name (idempotent).
#[utoipa::path(post, path = "/api-tokens/{id}/revoke", tag = "tokens", security(("bearer" = [])),
    params(("id" = String, Path, description = "API token id or name")),
    responses((status = 200, body = users::ApiTokenView), (status = 404, body = ErrorBody)))]
async fn revoke_api_token(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(users::revoke_api_token(&state, &id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// Newest entries first; at most this many (default 100, at most 1000).
    limit: Option<u32>,
}

/// The audit log: every mutation through the API, newest first.
#[utoipa::path(get, path = "/audit", tag = "audit", security(("bearer" = [])), params(AuditQuery),
    responses((status = 200, body = Vec<audit::AuditEntry>), (status = 403, body = ErrorBody)))]
async fn list_audit(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<AuditQuery>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(Json(audit::list(&state, limit).await?))
}

/// The trust state: job-signing keys, CAs, bundle versions and which agents acknowledged them.
#[utoipa::path(get, path = "/trust", tag = "trust", security(("bearer" = [])),
    responses((status = 200, body = crate::trust::TrustStatus), (status = 403, body = ErrorBody)))]
async fn trust_status(
    State(state): State<SharedState>,
    actor: Actor,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(crate::trust::status(&state).await?))
}

/// Rotate the job-signing key in phases (`start`, then `finish`).
#[utoipa::path(post, path = "/trust/job-key/rotate", tag = "trust", security(("bearer" = [])),
    request_body = crate::trust::RotateRequest,
    responses((status = 200, body = crate::trust::TrustStatus), (status = 409, body = ErrorBody)))]
async fn rotate_job_key(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<crate::trust::RotateRequest>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(crate::trust::rotate(&state, req).await?))
}

/// Rotate the certificate authority in phases (`start`, then `finish`).
#[utoipa::path(post, path = "/trust/ca/rotate", tag = "trust", security(("bearer" = [])),
    request_body = crate::trust::RotateRequest,
    responses((status = 200, body = crate::trust::TrustStatus), (status = 409, body = ErrorBody)))]
async fn rotate_ca(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<crate::trust::RotateRequest>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(crate::trust::rotate_ca(&state, req).await?))
}

/// List agents.
#[utoipa::path(get, path = "/agents", tag = "agents", security(("bearer" = [])), params(PageQuery),
    responses((status = 200, body = Vec<agents::AgentView>), (status = 401, body = ErrorBody)))]
async fn list_agents(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    page(agents::list(&state).await?, &q, "/api/v1/agents")
}

/// The control-plane replicas sharing this database that are alive now, oldest first.
#[utoipa::path(get, path = "/replicas", tag = "agents", security(("bearer" = [])),
    responses((status = 200, body = Vec<crate::replicas::ReplicaView>), (status = 401, body = ErrorBody)))]
async fn list_replicas(
    State(state): State<SharedState>,
    actor: Actor,
) -> ApiResult<Json<Vec<crate::replicas::ReplicaView>>> {
    actor.require(Permission::Read)?;
    Ok(Json(crate::replicas::list(&state).await?))
}

/// One agent, by id or name.
#[utoipa::path(get, path = "/agents/{id}", tag = "agents", security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id or name")),
    responses((status = 200, body = agents::AgentView), (status = 404, body = ErrorBody)))]
async fn show_agent(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(agents::view(&state, &id).await?))
}

/// Revoke an agent: its session is cut, its certificates refused, its unfinished jobs cancelled.
#[utoipa::path(post, path = "/agents/{id}/revoke", tag = "agents", security(("bearer" = [])),
    params(("id" = String, Path, description = "agent id or name")),
    request_body = agents::RevokeAgent,
    responses((status = 200, body = agents::AgentView), (status = 404, body = ErrorBody)))]
async fn revoke_agent(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
    Body(req): Body<agents::RevokeAgent>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(agents::revoke(&state, &id, req).await?))
}

/// Create an environment.
#[utoipa::path(post, path = "/environments", tag = "environments", security(("bearer" = [])),
    request_body = environments::CreateEnvironment,
    responses((status = 201, body = environments::Environment), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_env(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<environments::CreateEnvironment>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok((
        StatusCode::CREATED,
        Json(environments::create(&state, req).await?),
    ))
}

/// List environments, in promotion order.
#[utoipa::path(get, path = "/environments", tag = "environments", security(("bearer" = [])),
    params(PageQuery),
    responses((status = 200, body = Vec<environments::Environment>)))]
async fn list_envs(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    page(
        environments::list(&state).await?,
        &q,
        "/api/v1/environments",
    )
}

/// One environment, by id or name.
#[utoipa::path(get, path = "/environments/{name}", tag = "environments", security(("bearer" = [])),
    params(("name" = String, Path, description = "environment id or name")),
    responses((status = 200, body = environments::Environment), (status = 404, body = ErrorBody)))]
async fn show_env(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(environments::find(&state, &name).await?))
}

/// Create a target served by an agent with the matching capability.
#[utoipa::path(post, path = "/targets", tag = "targets", security(("bearer" = [])),
    request_body = targets::CreateTarget,
    responses((status = 201, body = targets::Target), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_target(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<targets::CreateTarget>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok((
        StatusCode::CREATED,
        Json(targets::create(&state, req).await?),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TargetFilter {
    /// Only the targets of this environment.
    env: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
}

/// List targets.
#[utoipa::path(get, path = "/targets", tag = "targets", security(("bearer" = [])),
    params(TargetFilter), responses((status = 200, body = Vec<targets::Target>)))]
async fn list_targets(
    State(state): State<SharedState>,
    actor: Actor,
    Query(filter): Query<TargetFilter>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    let q = PageQuery {
        limit: filter.limit,
        after: filter.after,
    };
    page(
        targets::list(&state, filter.env.as_deref()).await?,
        &q,
        "/api/v1/targets",
    )
}

/// One target with its desired and observed state.
#[utoipa::path(get, path = "/targets/{name}", tag = "targets", security(("bearer" = [])),
    params(("name" = String, Path, description = "target id or name")),
    responses((status = 200, body = targets::TargetDetail), (status = 404, body = ErrorBody)))]
async fn show_target(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(targets::detail(&state, &name).await?))
}

/// Create a release: an immutable set of component@digest.
#[utoipa::path(post, path = "/releases", tag = "releases", security(("bearer" = [])),
    request_body = releases::CreateRelease,
    responses((status = 201, body = releases::Release), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_release(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<releases::CreateRelease>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Release)?;
    Ok((
        StatusCode::CREATED,
        Json(releases::create(&state, req, &actor.user).await?),
    ))
}

/// List releases.
#[utoipa::path(get, path = "/releases", tag = "releases", security(("bearer" = [])),
    params(PageQuery), responses((status = 200, body = Vec<releases::Release>)))]
async fn list_releases(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    page(releases::list(&state).await?, &q, "/api/v1/releases")
}

/// One release, by id or name.
#[utoipa::path(get, path = "/releases/{name}", tag = "releases", security(("bearer" = [])),
    params(("name" = String, Path, description = "release id or name")),
    responses((status = 200, body = releases::Release), (status = 404, body = ErrorBody)))]
async fn show_release(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(releases::find(&state, &name).await?))
}

/// Deploy a release to every target of an environment: one signed job per target.
#[utoipa::path(post, path = "/deployments", tag = "deployments", security(("bearer" = [])),
    request_body = deployments::CreateDeployment,
    responses((status = 201, body = deployments::Deployment), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn create_deployment(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<deployments::CreateDeployment>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Release)?;
    let deployment = deployments::create(&state, req).await?;
    crate::evidence::mark_requested_by(&state, &deployment.id, &actor.user).await?;
    Ok((StatusCode::CREATED, Json(deployment)))
}

/// List deployments.
#[utoipa::path(get, path = "/deployments", tag = "deployments", security(("bearer" = [])),
    params(PageQuery), responses((status = 200, body = Vec<deployments::Deployment>)))]
async fn list_deployments(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    page(deployments::list(&state).await?, &q, "/api/v1/deployments")
}

/// One deployment with its jobs and their events.
#[utoipa::path(get, path = "/deployments/{id}", tag = "deployments", security(("bearer" = [])),
    params(("id" = String, Path, description = "deployment id")),
    responses((status = 200, body = deployments::Deployment), (status = 404, body = ErrorBody)))]
async fn show_deployment(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(deployments::get(&state, &id).await?))
}

/// Change an environment's order, approval rules, windows, variables, secret references,
/// policies or workflow; only the fields given change.
#[utoipa::path(patch, path = "/environments/{name}", tag = "environments", security(("bearer" = [])),
    params(("name" = String, Path, description = "environment id or name")),
    request_body = environments::UpdateEnvironment,
    responses((status = 200, body = environments::Environment), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn update_env(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
    Body(req): Body<environments::UpdateEnvironment>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(environments::update(&state, &name, req).await?))
}

/// How release `name` differs from release `other`, component by component.
#[utoipa::path(get, path = "/releases/{name}/diff/{other}", tag = "releases",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "the release compared from"),
        ("other" = String, Path, description = "the release compared to")),
    responses((status = 200, body = releases::ReleaseDiff), (status = 404, body = ErrorBody)))]
async fn diff_releases(
    State(state): State<SharedState>,
    actor: Actor,
    Path((name, other)): Path<(String, String)>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(releases::diff(&state, &name, &other).await?))
}

/// Register a component: an image repository in an OCI registry.
#[utoipa::path(post, path = "/components", tag = "components", security(("bearer" = [])),
    request_body = components::CreateComponent,
    responses((status = 201, body = components::Component), (status = 400, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn create_component(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<components::CreateComponent>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Release)?;
    Ok((
        StatusCode::CREATED,
        Json(components::create(&state, req).await?),
    ))
}

/// List components with their synced versions.
#[utoipa::path(get, path = "/components", tag = "components", security(("bearer" = [])),
    params(PageQuery), responses((status = 200, body = Vec<components::Component>)))]
async fn list_components(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    page(components::list(&state).await?, &q, "/api/v1/components")
}

/// One component with its versions (highest semantic version first).
#[utoipa::path(get, path = "/components/{name}", tag = "components", security(("bearer" = [])),
    params(("name" = String, Path, description = "component id or name")),
    responses((status = 200, body = components::Component), (status = 404, body = ErrorBody)))]
async fn show_component(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(components::find(&state, &name).await?))
}

/// List the repository's tags, resolve each to its manifest digest and store the versions.
#[utoipa::path(post, path = "/components/{name}/sync", tag = "components",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "component id or name")),
    responses((status = 200, body = components::SyncResult), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn sync_component(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Release)?;
    Ok(Json(components::sync(&state, &name).await?))
}

/// Request a promotion of a release into an environment; the gates decide at once.
#[utoipa::path(post, path = "/promotions", tag = "promotions", security(("bearer" = [])),
    request_body = promotions::CreatePromotion,
    responses((status = 201, body = promotions::Promotion), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_promotion(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<promotions::CreatePromotion>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Release)?;
    Ok((
        StatusCode::CREATED,
        Json(promotions::create(&state, &actor, req).await?),
    ))
}

/// List promotions, oldest first.
#[utoipa::path(get, path = "/promotions", tag = "promotions", security(("bearer" = [])),
    params(PageQuery), responses((status = 200, body = Vec<promotions::Promotion>)))]
async fn list_promotions(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<PageQuery>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    page(promotions::list(&state).await?, &q, "/api/v1/promotions")
}

/// One promotion with its approvals, latest decision and workflow run.
#[utoipa::path(get, path = "/promotions/{id}", tag = "promotions", security(("bearer" = [])),
    params(("id" = String, Path, description = "promotion id")),
    responses((status = 200, body = promotions::Promotion), (status = 404, body = ErrorBody)))]
async fn show_promotion(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(promotions::get(&state, &id).await?))
}

/// Approve a promotion (role approver; separation of duties applies).
#[utoipa::path(post, path = "/promotions/{id}/approve", tag = "promotions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "promotion id")),
    request_body = promotions::ApproveRequest,
    responses((status = 200, body = promotions::Promotion), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn approve_promotion(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
    Body(req): Body<promotions::ApproveRequest>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Approve)?;
    Ok(Json(promotions::approve(&state, &actor, &id, req).await?))
}

/// Reject a promotion with a reason.
#[utoipa::path(post, path = "/promotions/{id}/reject", tag = "promotions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "promotion id")),
    request_body = promotions::RejectRequest,
    responses((status = 200, body = promotions::Promotion), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn reject_promotion(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
    Body(req): Body<promotions::RejectRequest>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Approve)?;
    Ok(Json(promotions::reject(&state, &actor, &id, req).await?))
}

/// Cancel a promotion that has not started deploying.
#[utoipa::path(post, path = "/promotions/{id}/cancel", tag = "promotions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "promotion id")),
    responses((status = 200, body = promotions::Promotion), (status = 409, body = ErrorBody)))]
async fn cancel_promotion(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Release)?;
    Ok(Json(promotions::cancel(&state, &actor, &id).await?))
}

/// Why a promotion was allowed or blocked: each decision with every gate's result.
#[utoipa::path(get, path = "/promotions/{id}/explain", tag = "promotions",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "promotion id")),
    responses((status = 200, body = promotions::Explanation), (status = 404, body = ErrorBody)))]
async fn explain_promotion(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(promotions::explain(&state, &id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventFilter {
    /// Only events of this promotion (and its deployments and workflow run).
    promotion: Option<String>,
    /// Only events of this deployment.
    deployment: Option<String>,
}

/// Live changes as server-sent events (`event: promotion|deployment|workflow_run`, data: JSON
/// `{kind, id, promotion, at}`); fetch the object for its new state.
#[utoipa::path(get, path = "/events", tag = "events", security(("bearer" = [])),
    params(EventFilter),
    responses((status = 200, description = "text/event-stream of change events")))]
async fn events(
    State(state): State<SharedState>,
    actor: Actor,
    Query(filter): Query<EventFilter>,
) -> ApiResult<impl IntoResponse> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt;
    actor.require(Permission::Read)?;
    let rx = state.events.subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| {
        let keep = match &item {
            Ok(e) => {
                filter
                    .promotion
                    .as_ref()
                    .is_none_or(|p| e.promotion.as_ref() == Some(p))
                    && filter
                        .deployment
                        .as_ref()
                        .is_none_or(|d| e.kind == "deployment" && &e.id == d)
            }
            // A lagging client is told so and can re-read the objects it follows.
            Err(_) => true,
        };
        let event = match item {
            Ok(e) => Event::default()
                .event(e.kind.as_ref())
                .json_data(&e)
                .unwrap_or_else(|_| Event::default().comment("unserializable event")),
            Err(_) => Event::default().event("lagged").data("{}"),
        };
        std::future::ready(keep.then_some(Ok::<_, std::convert::Infallible>(event)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Put the release deployed before the current one back on every target of the environment.
#[utoipa::path(post, path = "/environments/{name}/rollback", tag = "environments",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "environment id or name")),
    responses((status = 201, body = deployments::Deployment), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn rollback_env(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Release)?;
    Ok((
        StatusCode::CREATED,
        Json(crate::runs::rollback_environment(&state, &name, &actor.user).await?),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EvidenceWindow {
    /// RFC 3339; packets recorded at or after it.
    from: Option<String>,
    /// RFC 3339; packets recorded at or before it.
    to: Option<String>,
    /// For the audit export: `json` (default) or `csv`.
    format: Option<String>,
}

/// Evidence packets recorded in the window, in chain order.
#[utoipa::path(get, path = "/evidence", tag = "evidence", security(("bearer" = [])),
    params(EvidenceWindow),
    responses((status = 200, body = Vec<crate::evidence::EvidenceSummary>),
        (status = 400, body = ErrorBody)))]
async fn list_evidence(
    State(state): State<SharedState>,
    actor: Actor,
    Query(w): Query<EvidenceWindow>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    let (from, to) = crate::evidence::window(w.from.as_deref(), w.to.as_deref())?;
    Ok(Json(crate::evidence::list(&state, from, to).await?))
}

/// One packet (by evidence id, or the latest of a promotion or deployment), rendered.
#[utoipa::path(get, path = "/evidence/{id}", tag = "evidence", security(("bearer" = [])),
    params(("id" = String, Path, description = "evidence, promotion or deployment id")),
    responses((status = 200, body = crate::evidence::EvidenceDetail),
        (status = 404, body = ErrorBody)))]
async fn show_evidence(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(crate::evidence::show(&state, &id).await?))
}

/// A self-contained, signed bundle of the window's packets with the keys and certificates
/// needed to verify it offline (`stella evidence verify`).
#[utoipa::path(get, path = "/evidence/export", tag = "evidence", security(("bearer" = [])),
    params(EvidenceWindow),
    responses((status = 200, description = "The bundle (JSON)"),
        (status = 404, body = ErrorBody)))]
async fn export_evidence(
    State(state): State<SharedState>,
    actor: Actor,
    Query(w): Query<EvidenceWindow>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    let (from, to) = crate::evidence::window(w.from.as_deref(), w.to.as_deref())?;
    Ok(Json(crate::evidence::export(&state, from, to).await?))
}

/// The evidence public keys, to pin when verifying a bundle.
#[utoipa::path(get, path = "/evidence/keys", tag = "evidence", security(("bearer" = [])),
    responses((status = 200, description = "Public key records")))]
async fn evidence_keys(
    State(state): State<SharedState>,
    actor: Actor,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(crate::evidence::public_keys(&state)))
}

/// Deployments, rollbacks and promotion decisions with their evidence ids (CSV or JSON).
#[utoipa::path(get, path = "/evidence/audit", tag = "evidence", security(("bearer" = [])),
    params(EvidenceWindow),
    responses((status = 200, description = "Audit rows, JSON or CSV"),
        (status = 400, body = ErrorBody)))]
async fn evidence_audit(
    State(state): State<SharedState>,
    actor: Actor,
    Query(w): Query<EvidenceWindow>,
) -> ApiResult<Response> {
    actor.require(Permission::Read)?;
    let (from, to) = crate::evidence::window(w.from.as_deref(), w.to.as_deref())?;
    let rows = crate::evidence::audit(&state, from, to).await?;
    match w.format.as_deref().unwrap_or("json") {
        "json" => Ok(Json(rows).into_response()),
        "csv" => Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            stella_evidence::audit_csv(&rows),
        )
            .into_response()),
        other => Err(ApiError::BadRequest(format!(
            "format {other:?}: use json or csv"
        ))),
    }
}

// ---- drift (`crate::drift`) ----------------------------------------------------------------

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DriftQuery {
    /// Only the targets of this environment.
    env: Option<String>,
    /// Only this target.
    target: Option<String>,
    /// Resolved findings too (the history), not only the open ones.
    #[serde(default)]
    history: bool,
}

/// Drift per target: open findings (or their history), remediation mode, circuit breaker and
/// reconciles.
#[utoipa::path(get, path = "/drift", tag = "drift", security(("bearer" = [])),
    params(DriftQuery),
    responses((status = 200, body = Vec<crate::drift::TargetDrift>), (status = 404, body = ErrorBody)))]
async fn list_drift(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<DriftQuery>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(
        crate::drift::report(&state, q.env.as_deref(), q.target.as_deref(), q.history).await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DriftRuleQuery {
    /// Only the rules of this environment.
    env: Option<String>,
}

/// Add an ignore rule; open findings it matches are resolved as ignored at once.
#[utoipa::path(post, path = "/drift/ignore", tag = "drift", security(("bearer" = [])),
    request_body = crate::drift::CreateIgnoreRule,
    responses((status = 201, body = crate::drift::IgnoreRuleView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn add_drift_ignore(
    State(state): State<SharedState>,
    actor: Actor,
    Body(req): Body<crate::drift::CreateIgnoreRule>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok((
        StatusCode::CREATED,
        Json(crate::drift::add_ignore_rule(&state, req, &actor.user).await?),
    ))
}

/// List ignore rules.
#[utoipa::path(get, path = "/drift/ignore", tag = "drift", security(("bearer" = [])),
    params(DriftRuleQuery),
    responses((status = 200, body = Vec<crate::drift::IgnoreRuleView>), (status = 404, body = ErrorBody)))]
async fn list_drift_ignore(
    State(state): State<SharedState>,
    actor: Actor,
    Query(q): Query<DriftRuleQuery>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(
        crate::drift::list_ignore_rules(&state, q.env.as_deref()).await?,
    ))
}

/// Remove an ignore rule; what it silenced shows again at the next report.
#[utoipa::path(delete, path = "/drift/ignore/{id}", tag = "drift", security(("bearer" = [])),
    params(("id" = String, Path, description = "ignore rule id")),
    responses((status = 204, description = "Removed"), (status = 404, body = ErrorBody)))]
async fn remove_drift_ignore(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    crate::drift::remove_ignore_rule(&state, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An environment's drift remediation policy (notify by default) and webhook.
#[utoipa::path(get, path = "/environments/{name}/drift", tag = "drift", security(("bearer" = [])),
    params(("name" = String, Path, description = "environment id or name")),
    responses((status = 200, body = crate::drift::DriftPolicyView), (status = 404, body = ErrorBody)))]
async fn show_drift_policy(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Read)?;
    Ok(Json(crate::drift::get_policy(&state, &name).await?))
}

/// Set an environment's drift remediation policy: notify, or reconcile with a rate limit and a
/// circuit breaker; optionally a webhook.
#[utoipa::path(put, path = "/environments/{name}/drift", tag = "drift", security(("bearer" = [])),
    params(("name" = String, Path, description = "environment id or name")),
    request_body = crate::drift::SetDriftPolicy,
    responses((status = 200, body = crate::drift::DriftPolicyView), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn set_drift_policy(
    State(state): State<SharedState>,
    actor: Actor,
    Path(name): Path<String>,
    Body(req): Body<crate::drift::SetDriftPolicy>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(
        crate::drift::set_policy(&state, &name, req, &actor.user).await?,
    ))
}

/// The signed jobs waiting for the agents behind a relay, for a site with no link at all
/// (`stella-agent relay import`): a DSSE envelope signed by the job-signing key.
#[utoipa::path(post, path = "/relays/{id}/airgap-export", tag = "agents", security(("bearer" = [])),
    params(("id" = String, Path, description = "relay agent id or name")),
    responses((status = 200, description = "The jobs file (DSSE envelope JSON)"),
        (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn airgap_export(
    State(state): State<SharedState>,
    actor: Actor,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(crate::airgap::export(&state, &id).await?))
}

/// Import a relay's results file (`stella-agent relay export-results`): results are checked
/// against their agents' receipts exactly as on a live session; a file imported before changes
/// nothing.
#[utoipa::path(post, path = "/airgap/import", tag = "agents", security(("bearer" = [])),
    request_body = stella_proto::airgap::SignedResults,
    responses((status = 200, body = crate::airgap::ImportSummary), (status = 400, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
async fn airgap_import(
    State(state): State<SharedState>,
    actor: Actor,
    Body(file): Body<stella_proto::airgap::SignedResults>,
) -> ApiResult<impl IntoResponse> {
    actor.require(Permission::Administer)?;
    Ok(Json(crate::airgap::import(&state, file).await?))
}
