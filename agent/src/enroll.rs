//! Enrollment: the key is generated here, a CSR and the one-time join token go to the plane over
//! TLS pinned by the CA fingerprint the operator got with the token, and the certificate and
//! trust bundle come back. Nothing is written to `agent.json` until everything else is on disk,
//! so a failed enrollment can simply be retried.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stella_pki::{PublicKeyRecord, TrustedKeys};

use crate::config::{AgentConfig, DataDir, write_atomic, write_json};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "{0} already holds an enrolled agent ({1}); use another --data-dir or remove it to enroll again"
    )]
    AlreadyEnrolled(String, String),
    #[error("invalid --ca-fingerprint {0:?}: expected sha256:<64 hex digits>")]
    BadFingerprint(String),
    #[error("invalid --server {0:?}: expected https://HOST:PORT")]
    BadServer(String),
    #[error("cannot reach {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("the control plane refused enrollment: {0}")]
    Refused(String),
    #[error("the control plane's answer does not fit: {0}")]
    BadResponse(String),
    #[error(transparent)]
    Pki(#[from] stella_pki::PkiError),
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub server: String,
    pub token: String,
    pub ca_fingerprint: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capabilities: Vec<String>,
}

#[derive(Serialize)]
struct EnrollRequest<'a> {
    token: &'a str,
    csr_pem: &'a str,
    name: &'a str,
    hostname: &'a str,
    capabilities: &'a [String],
    labels: &'a BTreeMap<String, String>,
    version: &'a str,
}

#[derive(Deserialize)]
struct TrustBundle {
    ca_pem: String,
    job_signing_keys: Vec<PublicKeyRecord>,
    trust_domain: String,
}

#[derive(Deserialize)]
struct EnrollResponse {
    agent_id: String,
    #[serde(default)]
    trust_bundle_version: u64,
    cert_pem: String,
    agent_endpoint: String,
    /// Every endpoint the plane advertises, `agent_endpoint` first (planes before this field
    /// send none).
    #[serde(default)]
    agent_endpoints: Vec<String>,
    trust_bundle: TrustBundle,
    labels: BTreeMap<String, String>,
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn normalize_fingerprint(f: &str) -> Option<String> {
    let hex: String = f
        .trim()
        .strip_prefix("sha256:")
        .unwrap_or(f.trim())
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| format!("sha256:{hex}"))
}

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> EnrollError + '_ {
    move |source| EnrollError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub async fn enroll(dir: &DataDir, opts: EnrollOptions) -> Result<AgentConfig, EnrollError> {
    if let Ok(existing) = dir.load_config() {
        return Err(EnrollError::AlreadyEnrolled(
            dir.root.display().to_string(),
            existing.agent_id,
        ));
    }
    let fingerprint = normalize_fingerprint(&opts.ca_fingerprint)
        .ok_or_else(|| EnrollError::BadFingerprint(opts.ca_fingerprint.clone()))?;
    let server = opts.server.trim_end_matches('/').to_string();
    if !server.starts_with("https://") {
        return Err(EnrollError::BadServer(server));
    }

    let (key_pem, csr_pem) = stella_pki::generate_key_and_csr(&opts.name)?;
    let tls = stella_pki::client_config_pinned_fingerprint(&fingerprint)?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| EnrollError::Connect {
            url: server.clone(),
            detail: e.to_string(),
        })?;
    let host = hostname();
    let url = format!("{server}/api/v1/enroll");
    let resp = http
        .post(&url)
        .json(&EnrollRequest {
            token: &opts.token,
            csr_pem: &csr_pem,
            name: &opts.name,
            hostname: &host,
            capabilities: &opts.capabilities,
            labels: &opts.labels,
            version: env!("CARGO_PKG_VERSION"),
        })
        .send()
        .await
        .map_err(|e| EnrollError::Connect {
            url: server.clone(),
            // The TLS error (e.g. fingerprint mismatch) sits in the source chain.
            detail: error_chain(&e),
        })?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| EnrollError::Connect {
        url: server.clone(),
        detail: e.to_string(),
    })?;
    if !status.is_success() {
        let message = crate::config::api_error_message(&body);
        return Err(EnrollError::Refused(format!(
            "{message} (HTTP {})",
            status.as_u16()
        )));
    }
    let answer: EnrollResponse =
        serde_json::from_slice(&body).map_err(|e| EnrollError::BadResponse(e.to_string()))?;

    // The CA handed back must be the one we pinned: the TLS check proved the server holds a
    // certificate under it, this proves we store the same CA for later sessions.
    let ca_fp = stella_pki::fingerprint_pem(&answer.trust_bundle.ca_pem)?;
    if ca_fp != fingerprint {
        return Err(EnrollError::BadResponse(format!(
            "the trust bundle's CA has fingerprint {ca_fp}, not the pinned {fingerprint}"
        )));
    }
    let cert_der_id = {
        let certs = stella_pki::cert_der_from_pem(&answer.cert_pem)?;
        stella_pki::agent_id_from_cert(&certs, &answer.trust_bundle.trust_domain)?
    };
    if cert_der_id != answer.agent_id {
        return Err(EnrollError::BadResponse(format!(
            "certificate names agent {cert_der_id}, response says {}",
            answer.agent_id
        )));
    }
    let endpoints = enrolled_endpoints(&answer.agent_endpoint, &answer.agent_endpoints)?;
    if answer.trust_bundle.job_signing_keys.is_empty() {
        return Err(EnrollError::BadResponse(
            "no job-signing keys in the trust bundle".to_string(),
        ));
    }

    let key_file = dir.key_file();
    if let Some(identity_dir) = key_file.parent() {
        create_private_dir(identity_dir).map_err(io_err(identity_dir))?;
    }
    stella_pki::write_secret_file(&key_file, key_pem.as_bytes()).map_err(io_err(&key_file))?;
    let cert_file = dir.cert_file();
    write_atomic(&cert_file, answer.cert_pem.as_bytes()).map_err(io_err(&cert_file))?;
    let ca_file = dir.ca_file();
    write_atomic(&ca_file, answer.trust_bundle.ca_pem.as_bytes()).map_err(io_err(&ca_file))?;
    let trust_file = dir.trust_file();
    write_json(
        &trust_file,
        &TrustedKeys {
            keys: answer.trust_bundle.job_signing_keys,
        },
    )
    .map_err(io_err(&trust_file))?;
    let version_file = dir.trust_version_file();
    write_atomic(
        &version_file,
        answer.trust_bundle_version.to_string().as_bytes(),
    )
    .map_err(io_err(&version_file))?;
    let (agent_endpoint, fallback_endpoints) = endpoints;
    let config = AgentConfig {
        agent_id: answer.agent_id,
        name: opts.name,
        api_url: server,
        agent_endpoint,
        fallback_endpoints,
        trust_domain: answer.trust_bundle.trust_domain,
        labels: answer.labels,
        ca_fingerprint: fingerprint,
        enrolled_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    };
    let agent_file = dir.agent_file();
    write_json(&agent_file, &config).map_err(io_err(&agent_file))?;
    Ok(config)
}

/// The endpoints an enrollment answer hands the agent: `agent_endpoint` first, then the other
/// advertised ones. The list counts only when it holds `agent_endpoint`: a relay rewrites that
/// field to its own address and passes the plane's list through untouched, and an agent
/// enrolled through a relay must keep dialling the relay.
fn enrolled_endpoints(
    agent_endpoint: &str,
    advertised: &[String],
) -> Result<(String, Vec<String>), EnrollError> {
    let bad = |e: crate::config::ConfigError| {
        EnrollError::BadResponse(format!(
            "the plane hands out an unusable agent endpoint: {e}"
        ))
    };
    let first = crate::config::validate_endpoints(&[agent_endpoint.to_string()])
        .map_err(bad)?
        .remove(0);
    if advertised.is_empty() {
        return Ok((first, Vec::new()));
    }
    let list = crate::config::validate_endpoints(advertised).map_err(bad)?;
    if !list.contains(&first) {
        return Ok((first, Vec::new()));
    }
    let rest = list.into_iter().filter(|e| *e != first).collect();
    Ok((first, rest))
}

/// The identity directory holds the private key: owner-only from the start.
fn create_private_dir(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::enrolled_endpoints;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_advertised_list_follows_the_endpoint_it_contains() {
        let (first, rest) = enrolled_endpoints(
            "https://b:7444",
            &strings(&["https://a:7444", "https://b:7444/", "quic://c:7445"]),
        )
        .unwrap();
        assert_eq!(first, "https://b:7444");
        assert_eq!(rest, strings(&["https://a:7444", "quic://c:7445"]));
        // An older plane sends no list.
        let (first, rest) = enrolled_endpoints("https://a:7444", &[]).unwrap();
        assert_eq!((first.as_str(), rest.len()), ("https://a:7444", 0));
    }

    #[test]
    fn a_relay_rewritten_endpoint_drops_the_planes_list() {
        // The relay rewrote agent_endpoint and passed the plane's list through.
        let (first, rest) = enrolled_endpoints(
            "https://relay.site:7450",
            &strings(&["https://a:7444", "https://b:7444"]),
        )
        .unwrap();
        assert_eq!(first, "https://relay.site:7450");
        assert!(rest.is_empty(), "{rest:?}");
    }

    #[test]
    fn unusable_endpoints_refuse_the_answer() {
        let e = enrolled_endpoints("http://a:7444", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unusable agent endpoint") && e.contains("http://a:7444"),
            "{e}"
        );
        let e = enrolled_endpoints("https://a:7444", &strings(&["https://a:7444", "ftp://b:1"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ftp://b:1"), "{e}");
    }
}
