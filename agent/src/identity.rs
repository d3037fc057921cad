//! The agent's own identity on disk and its renewal.
//!
//! Certificates are short-lived. At about two thirds of its life the agent generates a new key,
//! sends a CSR over the open session and installs the answer; an agent that was offline past
//! expiry renews over the REST API by proving possession of its previous key (within the plane's
//! grace period). A new key and certificate are staged in `identity/next/` and promoted with
//! renames, so a crash at any point leaves either the old or the new pair usable.

use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine;

use crate::config::{DataDir, write_atomic};

/// The current key and certificate.
#[derive(Clone)]
pub struct AgentIdentity {
    pub key_pem: String,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub not_before: i64,
    pub not_after: i64,
}

fn next_dir(dir: &DataDir) -> PathBuf {
    dir.root.join("identity/next")
}

pub fn load(dir: &DataDir) -> anyhow::Result<AgentIdentity> {
    promote_staged(dir)?;
    let key_pem = dir.read_text(&dir.key_file())?;
    let cert_pem = dir.read_text(&dir.cert_file())?;
    let cert_der = stella_pki::cert_der_from_pem(&cert_pem)?;
    let (not_before, not_after) = stella_pki::cert_validity(&cert_der)
        .ok_or_else(|| anyhow::anyhow!("{}: unreadable validity", dir.cert_file().display()))?;
    Ok(AgentIdentity {
        key_pem,
        cert_pem,
        cert_der,
        not_before,
        not_after,
    })
}

impl AgentIdentity {
    /// Renewal is due at two thirds of the certificate's life.
    pub fn renewal_due(&self, now_unix: i64) -> bool {
        now_unix >= self.not_before + (self.not_after - self.not_before) * 2 / 3
    }

    pub fn expired(&self, now_unix: i64) -> bool {
        now_unix >= self.not_after
    }
}

/// Generates the next key, staged (mode 0600) but not yet in use; returns its CSR.
pub fn stage_new_key(dir: &DataDir, agent_id: &str) -> anyhow::Result<String> {
    let (key_pem, csr_pem) = stella_pki::generate_key_and_csr(agent_id)?;
    let next = next_dir(dir);
    std::fs::create_dir_all(&next).with_context(|| format!("creating {}", next.display()))?;
    let _ = std::fs::remove_file(next.join("agent.pem"));
    stella_pki::write_secret_file(&next.join("agent.key"), key_pem.as_bytes())
        .with_context(|| format!("writing {}", next.join("agent.key").display()))?;
    Ok(csr_pem)
}

/// Installs a certificate issued for the staged key, after checking it really is for this
/// agent and this key.
pub fn install_renewed(
    dir: &DataDir,
    agent_id: &str,
    trust_domain: &str,
    cert_pem: &str,
) -> anyhow::Result<()> {
    let next = next_dir(dir);
    let key_pem = std::fs::read_to_string(next.join("agent.key"))
        .context("no staged key for this renewal")?;
    let der = stella_pki::cert_der_from_pem(cert_pem)?;
    if stella_pki::agent_id_from_cert(&der, trust_domain)? != agent_id {
        bail!("the renewed certificate is for another agent");
    }
    if !stella_pki::cert_matches_key(&der, &key_pem) {
        bail!("the renewed certificate does not carry the staged key");
    }
    write_atomic(&next.join("agent.pem"), cert_pem.as_bytes())?;
    promote_staged(dir)
}

/// Moves a complete staged pair into place (key first, then certificate); finishes a promotion
/// a crash interrupted.
fn promote_staged(dir: &DataDir) -> anyhow::Result<()> {
    let next = next_dir(dir);
    let (staged_key, staged_cert) = (next.join("agent.key"), next.join("agent.pem"));
    if staged_cert.exists() {
        if staged_key.exists() {
            std::fs::rename(&staged_key, dir.key_file()).context("installing the renewed key")?;
        }
        std::fs::rename(&staged_cert, dir.cert_file())
            .context("installing the renewed certificate")?;
        tracing::info!("renewed identity installed");
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct OfflineRenewRequest<'a> {
    agent_id: &'a str,
    cert_pem: &'a str,
    csr_pem: &'a str,
    timestamp_unix_ms: i64,
    proof: String,
}

#[derive(serde::Deserialize)]
struct OfflineRenewResponse {
    cert_pem: String,
}

/// Renews an expired certificate over the REST API with a proof of possession of the old key.
pub async fn renew_offline(
    dir: &DataDir,
    agent_id: &str,
    trust_domain: &str,
    api_url: &str,
    ca_pem: &str,
    current: &AgentIdentity,
) -> anyhow::Result<()> {
    let csr_pem = stage_new_key(dir, agent_id)?;
    let timestamp = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let proof = stella_pki::sign_with_agent_key(
        &current.key_pem,
        &stella_pki::renewal_proof_message(agent_id, &csr_pem, timestamp),
    )?;
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(stella_pki::client_config_ca(ca_pem)?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let resp = http
        .post(format!("{}/api/v1/renew", api_url.trim_end_matches('/')))
        .json(&OfflineRenewRequest {
            agent_id,
            cert_pem: &current.cert_pem,
            csr_pem: &csr_pem,
            timestamp_unix_ms: timestamp,
            proof: base64::engine::general_purpose::STANDARD.encode(proof),
        })
        .send()
        .await
        .with_context(|| format!("reaching {api_url} to renew the expired certificate"))?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        let message = crate::config::api_error_message(&body);
        bail!("renewal refused: {message} (HTTP {})", status.as_u16());
    }
    let answer: OfflineRenewResponse = serde_json::from_slice(&body)?;
    install_renewed(dir, agent_id, trust_domain, &answer.cert_pem)
}
