//! One error type for every API operation: a stable code, an HTTP status and a message that
//! names what is wrong. Storage errors are logged in full and shown to callers only as `internal`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Well-formed but impossible, e.g. a target whose agent lacks the capability.
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// Any of the above with structured details for the caller (e.g. line-numbered errors).
    #[error("{0}")]
    Detailed(Box<ApiError>, serde_json::Value),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::Internal(_) => "internal",
            ApiError::Detailed(inner, _) => inner.code(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Detailed(inner, _) => inner.status(),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        tracing::error!(error = %err, "storage error");
        ApiError::Internal("storage error".to_string())
    }
}

impl From<stella_pki::PkiError> for ApiError {
    fn from(err: stella_pki::PkiError) -> Self {
        tracing::error!(error = %err, "pki error");
        ApiError::Internal("pki error".to_string())
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable machine-readable code: bad_request, unauthorized, forbidden, not_found, conflict,
    /// unprocessable, too_many_requests, internal.
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
    /// Structured details where there are any (e.g. every error of a document with its line).
    pub details: Option<serde_json::Value>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if !matches!(self, ApiError::Internal(_)) {
            tracing::info!(code = self.code(), message = %self, "request refused");
        }
        let status = self.status();
        let code = self.code().to_string();
        let (message, details) = match self {
            ApiError::Detailed(inner, details) => (inner.to_string(), Some(details)),
            other => (other.to_string(), None),
        };
        (
            status,
            Json(ErrorBody {
                code,
                message,
                details,
            }),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
