//! Relays: agents that carry other agents' sessions (`stella-agent relay`).
//!
//! A relay is an enrolled agent whose join token carries the label `role=relay` (the operator's
//! word: labels an agent asks for itself do not count). Only such an agent may open virtual
//! sessions for other agents and get a TLS server certificate for the names it listens on.
//! What a relay can never do is decided elsewhere and does not depend on trusting it: jobs are
//! verified by the leaf against pinned keys, results need a receipt signed by the leaf's key
//! (`session::verify_receipt`), and a leaf's certificate is checked against the CA here.

use std::net::IpAddr;

use sqlx::Row;
use stella_proto::{RelayCertRequest, RelayCertResponse};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::now_ms;

/// The join-token label that makes an agent a relay.
pub const RELAY_LABEL: (&str, &str) = ("role", "relay");
/// A relay listens on a handful of names; more is a mistake or an attempt.
const MAX_NAMES: usize = 8;

/// Whether the join token this agent enrolled with names it a relay.
pub async fn is_relay(state: &AppState, agent_id: &str) -> ApiResult<bool> {
    let row = sqlx::query(
        "SELECT t.labels FROM agents a JOIN join_tokens t ON t.id = a.join_token_id
         WHERE a.id = $1 AND a.status != 'revoked'",
    )
    .bind(agent_id)
    .fetch_optional(&state.db)
    .await?;
    let Some(row) = row else { return Ok(false) };
    let labels: std::collections::BTreeMap<String, String> =
        serde_json::from_str(row.get::<&str, _>("labels")).unwrap_or_default();
    Ok(labels.get(RELAY_LABEL.0).map(String::as_str) == Some(RELAY_LABEL.1))
}

/// Remembers which relay an agent was last seen behind (air-gap export reads it).
pub async fn record_relayed(state: &AppState, agent_id: &str, relay_id: &str) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO relayed_agents (agent_id, relay_id, last_seen) VALUES ($1, $2, $3)
         ON CONFLICT(agent_id) DO UPDATE SET relay_id = excluded.relay_id, last_seen = excluded.last_seen",
    )
    .bind(agent_id)
    .bind(relay_id)
    .bind(now_ms())
    .execute(&state.db)
    .await?;
    Ok(())
}

/// Agents last seen behind `relay_id`, directly or behind a relay that is behind it.
pub async fn agents_behind(state: &AppState, relay_id: &str) -> ApiResult<Vec<String>> {
    let rows = sqlx::query(
        "WITH RECURSIVE behind(agent_id) AS (
             SELECT agent_id FROM relayed_agents WHERE relay_id = $1
             UNION
             SELECT r.agent_id FROM relayed_agents r JOIN behind b ON r.relay_id = b.agent_id
         )
         SELECT agent_id FROM behind ORDER BY agent_id",
    )
    .bind(relay_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows.iter().map(|r| r.get("agent_id")).collect())
}

/// Checks that a leaf certificate a relay presents was issued by a CA this plane trusts and is
/// valid now. The relay's TLS connection authenticated the relay only; this is the check TLS
/// would have made had the leaf connected directly. (Whose certificate it is, whether it is the
/// current one and whether the agent is revoked is `session::open`'s job, as for any session.)
pub fn verify_leaf_certificate(state: &AppState, cert_der: &[u8]) -> Result<(), String> {
    if cert_der.is_empty() {
        return Err("the relay sent no certificate for the agent".to_string());
    }
    let issued = state
        .keys
        .cas()
        .trusted()
        .iter()
        .any(|ca| ca.verify_issued(cert_der).is_ok());
    if !issued {
        return Err("the agent certificate was not issued by this plane's CA".to_string());
    }
    let (not_before, not_after) = stella_pki::cert_validity(cert_der)
        .ok_or_else(|| "the agent certificate has unreadable validity dates".to_string())?;
    let now = now_ms() / 1000;
    if now < not_before || now >= not_after {
        return Err(
            "the agent certificate is not valid now (expired or not yet valid)".to_string(),
        );
    }
    Ok(())
}

/// Signs a relay's server certificate for the names it listens on, if the agent is a relay.
pub async fn issue_server_certificate(
    state: &AppState,
    relay_id: &str,
    req: &RelayCertRequest,
) -> RelayCertResponse {
    match sign_server_certificate(state, relay_id, req).await {
        Ok(cert_pem) => {
            tracing::info!(relay_id, names = ?req.names, "relay server certificate issued");
            RelayCertResponse {
                cert_pem,
                error: String::new(),
            }
        }
        Err(e) => {
            tracing::warn!(relay_id, error = %e, "relay server certificate refused");
            RelayCertResponse {
                cert_pem: String::new(),
                error: e.to_string(),
            }
        }
    }
}

async fn sign_server_certificate(
    state: &AppState,
    relay_id: &str,
    req: &RelayCertRequest,
) -> ApiResult<String> {
    if !is_relay(state, relay_id).await? {
        return Err(ApiError::Forbidden(format!(
            "agent {relay_id} is not a relay: enroll it with a join token labelled {}={}",
            RELAY_LABEL.0, RELAY_LABEL.1
        )));
    }
    let (dns, ips) = split_names(&req.names)?;
    state
        .keys
        .cas()
        .active
        .sign_relay_server_csr(&req.csr_pem, &dns, &ips, state.config.agent_cert_validity)
        .map_err(|e| ApiError::BadRequest(format!("relay certificate request refused: {e}")))
}

/// DNS names and IP addresses from the names a relay asked for; wildcards and junk are refused.
fn split_names(names: &[String]) -> ApiResult<(Vec<String>, Vec<IpAddr>)> {
    if names.is_empty() || names.len() > MAX_NAMES {
        return Err(ApiError::BadRequest(format!(
            "a relay certificate needs 1 to {MAX_NAMES} names, got {}",
            names.len()
        )));
    }
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    for name in names {
        if let Ok(ip) = name.parse::<IpAddr>() {
            ips.push(ip);
            continue;
        }
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
            });
        if !valid {
            return Err(ApiError::BadRequest(format!(
                "{name:?} is not a DNS name or IP address a relay can listen on"
            )));
        }
        dns.push(name.to_ascii_lowercase());
    }
    Ok((dns, ips))
}

#[cfg(test)]
mod tests {
    use super::split_names;

    #[test]
    fn relay_names_are_dns_names_or_addresses() {
        let (dns, ips) =
            split_names(&["relay.site-a.example".to_string(), "10.0.0.7".to_string()]).unwrap();
        assert_eq!(dns, vec!["relay.site-a.example"]);
        assert_eq!(ips.len(), 1);
        for bad in ["*.example", "", "a..b", "-x.example", "relay/1"] {
            let e = split_names(&[bad.to_string()]).unwrap_err().to_string();
            assert!(e.contains("not a DNS name"), "{bad}: {e}");
        }
        assert!(split_names(&[]).is_err());
    }
}
