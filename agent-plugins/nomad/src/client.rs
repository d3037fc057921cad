//! A small typed client for the Nomad HTTP API endpoints Stella uses, on reqwest with rustls
//! (ring). Built per operation: the ACL token and TLS files are read from the agent host each
//! time, so rotating them needs no agent restart.
//!
//! Every request has a timeout; blocking queries (`?index=N&wait=Ns`) get theirs extended by the
//! wait plus Nomad's jitter (up to wait/16).

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use stella_plugin_sdk::PluginError;
use tracing::debug;

use crate::api::{Allocation, Deployment, Job, JobVersions, RegisterResponse, Variable};
use crate::config::{TargetConfig, TlsFiles, TokenSource};

const TOKEN_HEADER: &str = "X-Nomad-Token";
const INDEX_HEADER: &str = "X-Nomad-Index";
/// Connection setup gets at most this long, whatever the request timeout.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Error bodies are quoted in messages up to this many characters.
const MAX_ERROR_BODY: usize = 400;

/// A blocking query: return when the index passes `index`, or after `wait`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Blocking {
    pub index: u64,
    pub wait: Duration,
}

pub(crate) struct Client {
    http: reqwest::Client,
    base: Url,
    address: String,
    token: Option<HeaderValue>,
    token_origin: String,
    namespace: String,
    region: Option<String>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// A response with the index Nomad reported.
pub(crate) struct Indexed<T> {
    pub value: T,
    pub index: u64,
}

/// A failed request. `transient` when the same request may well succeed a moment later: no
/// connection, a timeout, or a 5xx such as Nomad's "No cluster leader" during an election.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: PluginError,
    pub transient: bool,
}

impl From<Failure> for PluginError {
    fn from(f: Failure) -> Self {
        f.error
    }
}

fn fatal(error: PluginError) -> Failure {
    Failure {
        error,
        transient: false,
    }
}

struct Raw {
    status: StatusCode,
    index: u64,
    body: bytes::Bytes,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(key: &str, path: &std::path::Path) -> Result<Vec<u8>, PluginError> {
    std::fs::read(path)
        .map_err(|e| PluginError::Backend(format!("{key} {}: cannot read: {e}", path.display())))
}

fn tls_error(key: &str, e: impl std::fmt::Display) -> PluginError {
    PluginError::Backend(format!("{key}: {e}"))
}

/// Full server certificate verification, against `name` instead of the address' host.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn tls_config(tls: Option<&TlsFiles>) -> Result<ClientConfig, PluginError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("tls", e))?;
    let Some(tls) = tls else {
        // Plain http: reqwest still wants a TLS config, and one without roots trusts nothing.
        return Ok(builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth());
    };
    let ca_pem = read_file("ca_file", &tls.ca_file)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| tls_error(&format!("ca_file {}", tls.ca_file.display()), e))?;
        roots
            .add(cert)
            .map_err(|e| tls_error(&format!("ca_file {}", tls.ca_file.display()), e))?;
    }
    if roots.is_empty() {
        return Err(PluginError::Backend(format!(
            "ca_file {}: no PEM certificate in it",
            tls.ca_file.display()
        )));
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| tls_error("ca_file", e))?;
    let builder = match &tls.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|e| PluginError::InvalidConfig(format!("tls_server_name: {e}")))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedNameVerifier {
                    inner: verifier,
                    name,
                }))
        }
        None => builder.with_webpki_verifier(verifier),
    };
    match &tls.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_file, key_file)) => {
            let cert_pem = read_file("client_cert_file", cert_file)?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls_error(&format!("client_cert_file {}", cert_file.display()), e))?;
            if certs.is_empty() {
                return Err(PluginError::Backend(format!(
                    "client_cert_file {}: no PEM certificate in it",
                    cert_file.display()
                )));
            }
            let key_pem = read_file("client_key_file", key_file)?;
            // The key's bytes stay out of the message: only the parse error's kind is shown.
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                PluginError::Backend(format!(
                    "client_key_file {}: no usable PEM private key ({})",
                    key_file.display(),
                    match e {
                        rustls::pki_types::pem::Error::NoItemsFound => "none found",
                        _ => "malformed",
                    }
                ))
            })?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                PluginError::Backend(format!(
                    "client_cert_file/client_key_file: cannot use them together: {e}"
                ))
            })
        }
    }
}

fn read_token(source: &TokenSource) -> Result<Option<HeaderValue>, PluginError> {
    let text = match source {
        TokenSource::None => return Ok(None),
        TokenSource::Env(name) => std::env::var(name).map_err(|_| {
            PluginError::Backend(format!(
                "token_env {name}: the variable is not set (or not UTF-8) in the agent's environment"
            ))
        })?,
        TokenSource::File(path) => std::fs::read_to_string(path).map_err(|e| {
            PluginError::Backend(format!("token_file {}: cannot read: {e}", path.display()))
        })?,
    };
    let token = text.trim();
    if token.is_empty() {
        return Err(PluginError::Backend(format!(
            "{} is empty",
            source.describe()
        )));
    }
    let mut value = HeaderValue::from_str(token).map_err(|_| {
        PluginError::Backend(format!(
            "{} contains characters an HTTP header cannot carry",
            source.describe()
        ))
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The error and its causes on one line: reqwest's own message hides the TLS or socket reason.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

fn body_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.chars().count() > MAX_ERROR_BODY {
        let cut: String = text.chars().take(MAX_ERROR_BODY).collect();
        format!("{cut}…")
    } else {
        text.to_string()
    }
}

impl Client {
    pub(crate) fn new(cfg: &TargetConfig) -> Result<Self, PluginError> {
        let token = read_token(&cfg.token)?;
        let tls = tls_config(cfg.tls.as_ref())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(cfg.request_timeout.min(MAX_CONNECT_TIMEOUT))
            // Nomad's API is a cluster-internal endpoint: proxy variables set on the agent host
            // for registries or the internet must not divert it (nor, over http, see the token).
            .no_proxy()
            .build()
            .map_err(|e| {
                PluginError::Backend(format!("cannot build the HTTP client: {}", error_chain(&e)))
            })?;
        Ok(Self {
            http,
            base: cfg.address.clone(),
            address: cfg.address_text(),
            token,
            token_origin: cfg.token.describe(),
            namespace: cfg.namespace.clone(),
            region: cfg.region.clone(),
            request_timeout: cfg.request_timeout,
        })
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    fn url(&self, segments: &[&str]) -> Result<Url, PluginError> {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().map_err(|_| {
                PluginError::Backend(format!("{} cannot carry a path", self.address))
            })?;
            path.clear();
            path.push("v1");
            for s in segments {
                // One segment each, percent-encoded: a job id can never reach another endpoint.
                path.push(s);
            }
        }
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("namespace", &self.namespace);
            if let Some(region) = &self.region {
                query.append_pair("region", region);
            }
        }
        Ok(url)
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        blocking: Option<Blocking>,
        body: Option<&Value>,
    ) -> Result<Raw, Failure> {
        let mut url = self.url(segments).map_err(fatal)?;
        let mut timeout = self.request_timeout;
        if let Some(b) = blocking {
            let wait = b.wait.max(Duration::from_secs(1));
            url.query_pairs_mut()
                .append_pair("index", &b.index.max(1).to_string())
                .append_pair("wait", &format!("{}s", wait.as_secs()));
            timeout += wait + wait / 16;
        }
        let what = format!("{method} {}", url.path());
        let mut request = self.http.request(method, url).timeout(timeout);
        if let Some(token) = &self.token {
            request = request.header(TOKEN_HEADER, token.clone());
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        debug!(request = %what, "nomad request");
        let fail = |e: reqwest::Error| Failure {
            error: if e.is_timeout() {
                PluginError::Timeout {
                    what: format!("{what} on Nomad at {}", self.address),
                    seconds: timeout.as_secs().max(1),
                }
            } else {
                PluginError::Backend(format!(
                    "cannot reach Nomad at {} ({what}): {}",
                    self.address,
                    error_chain(&e)
                ))
            },
            transient: true,
        };
        let response = request.send().await.map_err(fail)?;
        let status = response.status();
        let index = index_of(response.headers());
        let body = response.bytes().await.map_err(fail)?;
        match status {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(Raw {
                status,
                index,
                body,
            }),
            StatusCode::FORBIDDEN => Err(fatal(PluginError::Backend(format!(
                "Nomad at {} refused {what} with 403 ({}): check that {} is valid and its \
                 policy grants this in namespace {:?}",
                self.address,
                body_text(&body),
                self.token_origin,
                self.namespace
            )))),
            s => Err(Failure {
                error: PluginError::Backend(format!(
                    "Nomad at {} answered {what} with {s}: {}",
                    self.address,
                    body_text(&body)
                )),
                transient: s.is_server_error(),
            }),
        }
    }

    fn decode<T: DeserializeOwned>(&self, what: &str, raw: &Raw) -> Result<T, PluginError> {
        serde_json::from_slice(&raw.body).map_err(|e| {
            PluginError::Backend(format!(
                "Nomad at {} sent an unexpected {what}: {e}",
                self.address
            ))
        })
    }

    /// The job, or None when Nomad has no job of that id.
    pub(crate) async fn job(&self, job_id: &str) -> Result<Option<Job>, PluginError> {
        let raw = self.send(Method::GET, &["job", job_id], None, None).await?;
        if raw.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.decode("job", &raw).map(Some)
    }

    /// `POST /v1/job/:id`; with `enforce_index`, Nomad refuses when the job's modify index
    /// moved (0: the job must not exist), so a concurrent change is never overwritten.
    pub(crate) async fn register(
        &self,
        job_id: &str,
        job: &Value,
        enforce_index: u64,
    ) -> Result<RegisterResponse, PluginError> {
        let body = json!({
            "Job": job,
            "EnforceIndex": true,
            "JobModifyIndex": enforce_index,
        });
        let raw = self
            .send(Method::POST, &["job", job_id], None, Some(&body))
            .await?;
        if raw.status == StatusCode::NOT_FOUND {
            return Err(PluginError::Backend(format!(
                "Nomad at {} has no job registration endpoint ({})",
                self.address,
                body_text(&raw.body)
            )));
        }
        self.decode("register response", &raw)
    }

    /// All versions Nomad keeps of the job, newest first.
    pub(crate) async fn versions(&self, job_id: &str) -> Result<Vec<Job>, PluginError> {
        let raw = self
            .send(Method::GET, &["job", job_id, "versions"], None, None)
            .await?;
        if raw.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let versions: JobVersions = self.decode("job versions", &raw)?;
        Ok(versions.versions)
    }

    /// The job's most recent deployment (Nomad answers `null` when it has none).
    pub(crate) async fn latest_deployment(
        &self,
        job_id: &str,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Option<Deployment>>, Failure> {
        let raw = self
            .send(Method::GET, &["job", job_id, "deployment"], blocking, None)
            .await?;
        let value = if raw.status == StatusCode::NOT_FOUND {
            None
        } else {
            self.decode("deployment", &raw).map_err(fatal)?
        };
        Ok(Indexed {
            value,
            index: raw.index,
        })
    }

    pub(crate) async fn deployment(
        &self,
        deployment_id: &str,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Option<Deployment>>, Failure> {
        let raw = self
            .send(Method::GET, &["deployment", deployment_id], blocking, None)
            .await?;
        let value = if raw.status == StatusCode::NOT_FOUND {
            None
        } else {
            self.decode("deployment", &raw).map_err(fatal)?
        };
        Ok(Indexed {
            value,
            index: raw.index,
        })
    }

    pub(crate) async fn promote(&self, deployment_id: &str) -> Result<(), PluginError> {
        let body = json!({"DeploymentID": deployment_id, "All": true});
        let raw = self
            .send(
                Method::POST,
                &["deployment", "promote", deployment_id],
                None,
                Some(&body),
            )
            .await?;
        self.expect_found("promote", &raw)
    }

    pub(crate) async fn fail_deployment(&self, deployment_id: &str) -> Result<(), PluginError> {
        let raw = self
            .send(
                Method::POST,
                &["deployment", "fail", deployment_id],
                None,
                None,
            )
            .await?;
        self.expect_found("fail", &raw)
    }

    fn expect_found(&self, what: &str, raw: &Raw) -> Result<(), PluginError> {
        if raw.status == StatusCode::NOT_FOUND {
            return Err(PluginError::Backend(format!(
                "Nomad at {} cannot {what} the deployment: {}",
                self.address,
                body_text(&raw.body)
            )));
        }
        Ok(())
    }

    pub(crate) async fn allocations(&self, job_id: &str) -> Result<Vec<Allocation>, PluginError> {
        let raw = self
            .send(Method::GET, &["job", job_id, "allocations"], None, None)
            .await?;
        if raw.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        self.decode("allocation list", &raw)
    }

    /// `POST /v1/job/:id/revert`: a new version with `version`'s spec, provided the job is
    /// still at `prior` (check-and-set).
    pub(crate) async fn revert(
        &self,
        job_id: &str,
        version: u64,
        prior: u64,
    ) -> Result<RegisterResponse, PluginError> {
        let body = json!({
            "JobID": job_id,
            "JobVersion": version,
            "EnforcePriorVersion": prior,
        });
        let raw = self
            .send(Method::POST, &["job", job_id, "revert"], None, Some(&body))
            .await?;
        if raw.status == StatusCode::NOT_FOUND {
            return Err(PluginError::Backend(format!(
                "Nomad at {} cannot revert job {job_id}: {}",
                self.address,
                body_text(&raw.body)
            )));
        }
        self.decode("revert response", &raw)
    }

    pub(crate) async fn variable(&self, path: &str) -> Result<Option<Variable>, PluginError> {
        let mut segments = vec!["var"];
        segments.extend(path.split('/'));
        let raw = self.send(Method::GET, &segments, None, None).await?;
        if raw.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.decode("variable", &raw).map(Some)
    }

    pub(crate) async fn put_variable(
        &self,
        path: &str,
        items: &serde_json::Map<String, Value>,
    ) -> Result<(), PluginError> {
        let mut segments = vec!["var"];
        segments.extend(path.split('/'));
        let body = json!({
            "Namespace": self.namespace,
            "Path": path,
            "Items": items,
        });
        let raw = self.send(Method::PUT, &segments, None, Some(&body)).await?;
        if raw.status == StatusCode::NOT_FOUND {
            return Err(PluginError::Sticker(format!(
                "Nomad at {} has no variables endpoint (Nomad 1.4 or later is needed): {}",
                self.address,
                body_text(&raw.body)
            )));
        }
        Ok(())
    }
}

fn index_of(headers: &HeaderMap) -> u64 {
    headers
        .get(INDEX_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
