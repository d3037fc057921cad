//! The REST API (HTTPS). Every CLI command is one of these calls, so anything the CLI does can
//! be done over HTTP. All routes but enrollment, health and metrics need an admin bearer token.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::error::{ApiError, ApiResult};
use crate::state::SharedState;
use crate::{agents, deployments, environments, metrics, releases, targets, tokens};

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(get_metrics))
        .route("/v1/enroll", post(enroll))
        .route("/v1/renew", post(renew))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{id}", get(show_agent))
        .route("/v1/agents/{id}/revoke", post(revoke_agent))
        .route("/v1/trust", get(trust_status))
        .route("/v1/trust/job-key/rotate", post(rotate_job_key))
        .route("/v1/trust/ca/rotate", post(rotate_ca))
        .route("/v1/environments", post(create_env).get(list_envs))
        .route("/v1/environments/{name}", get(show_env))
        .route("/v1/targets", post(create_target).get(list_targets))
        .route("/v1/targets/{name}", get(show_target))
        .route("/v1/releases", post(create_release).get(list_releases))
        .route("/v1/releases/{name}", get(show_release))
        .route(
            "/v1/deployments",
            post(create_deployment).get(list_deployments),
        )
        .route("/v1/deployments/{id}", get(show_deployment))
        .fallback(|| async { ApiError::NotFound("no such API route".to_string()) })
        .with_state(state)
}

/// Bodies are parsed here so that a malformed one gets the same JSON error shape as any other.
struct Body<T>(T);

impl<T, S> axum::extract::FromRequest<S> for Body<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "invalid request body: {}",
                rejection.body_text()
            ))),
        }
    }
}

async fn authorize(state: &SharedState, headers: &HeaderMap) -> ApiResult<String> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized("missing bearer token (Authorization header)".to_string())
        })?;
    let token = value.strip_prefix("Bearer ").ok_or_else(|| {
        ApiError::Unauthorized("Authorization must be `Bearer TOKEN`".to_string())
    })?;
    tokens::authenticate(&state.db, token.trim()).await
}

async fn get_metrics(State(state): State<SharedState>) -> ApiResult<impl IntoResponse> {
    let body = metrics::render(&state).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body))
}

/// The TCP peer of an API connection.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

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

async fn renew(
    State(state): State<SharedState>,
    Body(req): Body<agents::OfflineRenewRequest>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(agents::renew_offline(&state, req).await?))
}

async fn create_token(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(req): Body<tokens::CreateJoinToken>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok((
        StatusCode::CREATED,
        Json(tokens::create_join_token(&state, req).await?),
    ))
}

async fn trust_status(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(crate::trust::status(&state).await?))
}

async fn rotate_job_key(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(req): Body<crate::trust::RotateRequest>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(crate::trust::rotate(&state, req).await?))
}

async fn rotate_ca(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(req): Body<crate::trust::RotateRequest>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(crate::trust::rotate_ca(&state, req).await?))
}

async fn list_tokens(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(tokens::list_join_tokens(&state).await?))
}

async fn revoke_token(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(tokens::revoke_join_token(&state, &id).await?))
}

async fn revoke_agent(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Body(req): Body<agents::RevokeAgent>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(agents::revoke(&state, &id, req).await?))
}

async fn list_agents(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(agents::list(&state).await?))
}

async fn show_agent(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(agents::view(&state, &id).await?))
}

async fn create_env(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(req): Body<environments::CreateEnvironment>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok((
        StatusCode::CREATED,
        Json(environments::create(&state, req).await?),
    ))
}

async fn list_envs(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(environments::list(&state).await?))
}

async fn show_env(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(environments::find(&state, &name).await?))
}

async fn create_target(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(req): Body<targets::CreateTarget>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok((
        StatusCode::CREATED,
        Json(targets::create(&state, req).await?),
    ))
}

#[derive(Deserialize)]
struct TargetFilter {
    env: Option<String>,
}

async fn list_targets(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Query(filter): Query<TargetFilter>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(targets::list(&state, filter.env.as_deref()).await?))
}

async fn show_target(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(targets::detail(&state, &name).await?))
}

async fn create_release(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(req): Body<releases::CreateRelease>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok((
        StatusCode::CREATED,
        Json(releases::create(&state, req).await?),
    ))
}

async fn list_releases(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(releases::list(&state).await?))
}

async fn show_release(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(releases::find(&state, &name).await?))
}

async fn create_deployment(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Body(req): Body<deployments::CreateDeployment>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok((
        StatusCode::CREATED,
        Json(deployments::create(&state, req).await?),
    ))
}

async fn list_deployments(
    State(state): State<SharedState>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(deployments::list(&state).await?))
}

async fn show_deployment(
    State(state): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    authorize(&state, &headers).await?;
    Ok(Json(deployments::get(&state, &id).await?))
}
