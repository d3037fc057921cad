//! Building an ECS client for one target, and turning SDK errors into `PluginError`s.
//!
//! A client is built per operation from the target's config: the target decides region,
//! endpoint and credentials, and building one makes no network call (credentials are resolved
//! lazily, on the first request). The HTTP client underneath is shared by all targets so that
//! connections are pooled.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ecs::config::{Credentials as StaticCredentials, Region, SharedHttpClient};
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use stella_plugin_sdk::PluginError;

use crate::config::{Credentials, TargetConfig};

/// Attempts per API call, including the first. Retries cover throttling and transient network
/// errors; the per-call timeout bounds them all together.
const MAX_ATTEMPTS: u32 = 3;

/// The one HTTP client of the executor: hyper with rustls on ring (the workspace's only crypto
/// provider), trusting the host's native roots. Plain `http://` endpoints work too (emulators,
/// proxies on loopback).
pub(crate) fn http_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// An ECS client bound to one target, with what messages need to say where it points.
pub(crate) struct Api {
    pub client: aws_sdk_ecs::Client,
    endpoint: String,
    api_timeout: Duration,
    connect_timeout: Duration,
}

/// Reads one credential variable. Its value is never logged nor put into an error.
fn env_secret(key: &str, name: &str) -> Result<String, PluginError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        Ok(_) => Err(PluginError::InvalidConfig(format!(
            "{key}: environment variable {name} is empty on the agent host"
        ))),
        Err(std::env::VarError::NotPresent) => Err(PluginError::InvalidConfig(format!(
            "{key}: environment variable {name} is not set on the agent host"
        ))),
        Err(std::env::VarError::NotUnicode(_)) => Err(PluginError::InvalidConfig(format!(
            "{key}: environment variable {name} is not valid UTF-8"
        ))),
    }
}

impl Api {
    pub(crate) async fn connect(
        cfg: &TargetConfig,
        http: &SharedHttpClient,
    ) -> Result<Self, PluginError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.api_timeout)
            .operation_attempt_timeout(cfg.api_timeout)
            .operation_timeout(cfg.api_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .http_client(http.clone())
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
        match &cfg.credentials {
            Credentials::DefaultChain => {}
            Credentials::Profile(name) => loader = loader.profile_name(name),
            Credentials::Env {
                access_key_id,
                secret_access_key,
                session_token,
            } => {
                let id = env_secret("credentials.access_key_id_env", access_key_id)?;
                let secret = env_secret("credentials.secret_access_key_env", secret_access_key)?;
                let token = session_token
                    .as_deref()
                    .map(|name| env_secret("credentials.session_token_env", name))
                    .transpose()?;
                loader = loader.credentials_provider(StaticCredentials::new(
                    id,
                    secret,
                    token,
                    None,
                    "stella-target-env",
                ));
            }
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_ecs::config::Builder::from(&shared);
        // Only ECS goes to the override: STS and SSO calls of the credential chain must still
        // reach their real endpoints.
        if let Some(url) = &cfg.endpoint_url {
            builder = builder.endpoint_url(url);
        }
        let endpoint = cfg
            .endpoint_url
            .clone()
            .unwrap_or_else(|| format!("https://ecs.{}.amazonaws.com", cfg.region));
        Ok(Self {
            client: aws_sdk_ecs::Client::from_conf(builder.build()),
            endpoint,
            api_timeout: cfg.api_timeout,
            connect_timeout: cfg.connect_timeout,
        })
    }

    /// Maps a failed call. Messages name the operation and endpoint; SDK errors never carry the
    /// secret key, so their context can be shown.
    pub(crate) fn error<E, R>(&self, op: &str, err: SdkError<E, R>) -> PluginError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + 'static,
    {
        let endpoint = &self.endpoint;
        match &err {
            SdkError::TimeoutError(_) => PluginError::Timeout {
                what: format!("no answer from ECS at {endpoint} ({op}, retries included)"),
                seconds: self.api_timeout.as_secs(),
            },
            SdkError::DispatchFailure(f) if f.is_timeout() => PluginError::Timeout {
                what: format!("connecting to ECS at {endpoint} ({op})"),
                seconds: self.connect_timeout.as_secs(),
            },
            SdkError::DispatchFailure(f) => {
                let cause = match f.as_connector_error() {
                    Some(c) => causes(c),
                    None => causes(&err),
                };
                PluginError::Backend(format!("cannot reach ECS at {endpoint} ({op}): {cause}"))
            }
            SdkError::ServiceError(_) => {
                let code = err.code().unwrap_or("unknown error");
                let message = err.message().unwrap_or("no message");
                if is_credentials_error(code) {
                    PluginError::Backend(format!(
                        "ECS at {endpoint} refused the credentials ({op}): {code}: {message}"
                    ))
                } else {
                    PluginError::Backend(format!("ECS {op} failed: {code}: {message}"))
                }
            }
            _ => PluginError::Backend(format!("ECS {op} at {endpoint}: {}", causes(&err))),
        }
    }
}

/// An error and its sources in one line, each said once (hyper repeats its cause in its own
/// message at some levels).
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = e.source();
    }
    text
}

fn is_credentials_error(code: &str) -> bool {
    matches!(
        code,
        "UnrecognizedClientException"
            | "InvalidSignatureException"
            | "ExpiredTokenException"
            | "AccessDeniedException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_variables_are_named_without_values() {
        let missing = env_secret("credentials.access_key_id_env", "STELLA_ECS_UNIT_NOPE")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("credentials.access_key_id_env"),
            "{missing}"
        );
        assert!(missing.contains("STELLA_ECS_UNIT_NOPE"), "{missing}");
        assert!(missing.contains("not set"), "{missing}");
    }

    #[test]
    fn credential_codes() {
        assert!(is_credentials_error("UnrecognizedClientException"));
        assert!(!is_credentials_error("ClusterNotFoundException"));
    }
}
