//! Agents: enrollment by CSR + one-time join token, and the fleet view.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use stella_pki::PublicKeyRecord;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::store::{new_id, now_ms, rfc3339};
use crate::tokens::validate_labels;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct EnrollRequest {
    pub token: String,
    pub csr_pem: String,
    pub name: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub version: String,
}

/// What an agent pins at enrollment: the CA for mTLS and the keys that sign its jobs.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrustBundle {
    pub ca_pem: String,
    /// Ed25519 public keys: `{key_id, algorithm, public_key}`.
    #[schema(value_type = Vec<Object>)]
    pub job_signing_keys: Vec<PublicKeyRecord>,
    pub trust_domain: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnrollResponse {
    pub agent_id: String,
    pub trust_bundle_version: u64,
    pub cert_pem: String,
    pub cert_not_after: String,
    pub spiffe_id: String,
    pub agent_endpoint: String,
    /// Every agent endpoint of the plane, in order, `agent_endpoint` first: the agent fails
    /// over between them.
    pub agent_endpoints: Vec<String>,
    pub trust_bundle: TrustBundle,
    pub labels: BTreeMap<String, String>,
}

pub fn validate_name(kind: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid {kind} name {name:?}: use 1-63 characters from [A-Za-z0-9-_.]"
        )))
    }
}

pub use validate_name as validate_resource_name;

/// Metric label for a refused enrollment.
pub fn enrollment_refusal_reason(e: &ApiError) -> &'static str {
    let text = e.to_string();
    if text.contains("already been used") {
        "token_used"
    } else if text.contains("expired") {
        "token_expired"
    } else if text.contains("revoked") {
        "token_revoked"
    } else if text.contains("certificate signing request") {
        "bad_csr"
    } else if matches!(e, ApiError::BadRequest(_)) {
        "bad_request"
    } else {
        "token_invalid"
    }
}

pub async fn enroll(state: &AppState, req: EnrollRequest) -> ApiResult<EnrollResponse> {
    validate_name("agent", &req.name)?;
    validate_labels(&req.labels)?;
    for cap in &req.capabilities {
        validate_name("capability", cap)?;
    }
    let now = now_ms();
    let hash = stella_pki::hash_token(&req.token);
    let mut tx = crate::store::write_tx(&state.db).await?;
    let row = sqlx::query(
        "SELECT id, token_hash, labels, max_uses, uses, expires_at, revoked_at FROM join_tokens WHERE token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Err(ApiError::Unauthorized(
            "join token is not valid".to_string(),
        ));
    };
    let stored: String = row.get("token_hash");
    if !stella_pki::token_matches(&req.token, &stored) {
        return Err(ApiError::Unauthorized(
            "join token is not valid".to_string(),
        ));
    }
    let token_id: String = row.get("id");
    let uses: i64 = row.get("uses");
    let max_uses: i64 = row.get("max_uses");
    let expires_at: i64 = row.get("expires_at");
    if row.get::<Option<i64>, _>("revoked_at").is_some() {
        return Err(ApiError::Unauthorized(
            "join token was revoked; create a new one with `stella token create`".to_string(),
        ));
    }
    if uses >= max_uses {
        return Err(ApiError::Unauthorized(
            "join token has already been used; create a new one with `stella token create`"
                .to_string(),
        ));
    }
    if expires_at <= now {
        return Err(ApiError::Unauthorized(format!(
            "join token expired at {}; create a new one with `stella token create`",
            rfc3339(expires_at)
        )));
    }
    // Token labels are the operator's word and override what the agent asks for.
    let token_labels: BTreeMap<String, String> =
        serde_json::from_str(row.get::<&str, _>("labels")).unwrap_or_default();
    let mut labels = req.labels.clone();
    labels.extend(token_labels);

    let agent_id = new_id("agt");
    let issued = state
        .keys
        .cas()
        .issuing()
        .sign_agent_csr(
            &req.csr_pem,
            &state.keys.trust_domain,
            &agent_id,
            state.config.agent_cert_validity,
        )
        .map_err(|e| ApiError::BadRequest(format!("certificate signing request refused: {e}")))?;
    let not_after_ms = (issued.not_after.unix_timestamp_nanos() / 1_000_000) as i64;

    // Consuming the token and creating the agent commit together: a failure leaves the token usable.
    let consumed =
        sqlx::query("UPDATE join_tokens SET uses = uses + 1 WHERE id = $1 AND uses < max_uses")
            .bind(&token_id)
            .execute(&mut *tx)
            .await?;
    if consumed.rows_affected() != 1 {
        return Err(ApiError::Unauthorized(
            "join token has already been used".to_string(),
        ));
    }
    let labels_json =
        serde_json::to_string(&labels).map_err(|e| ApiError::Internal(e.to_string()))?;
    let caps_json =
        serde_json::to_string(&req.capabilities).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query(
        "INSERT INTO agents (id, name, hostname, labels, capabilities, version, cert_serial,
            cert_not_after, cert_pem, status, join_token_id, next_sequence, enrolled_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'enrolled', $10, 0, $11)",
    )
    .bind(&agent_id)
    .bind(&req.name)
    .bind(&req.hostname)
    .bind(&labels_json)
    .bind(&caps_json)
    .bind(&req.version)
    .bind(&issued.serial_hex)
    .bind(not_after_ms)
    .bind(&issued.cert_pem)
    .bind(&token_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    record_certificate(
        &mut *tx,
        &agent_id,
        &issued.cert_pem,
        &issued.serial_hex,
        not_after_ms,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(agent_id = %agent_id, name = %req.name, "agent enrolled");
    let (bundle_version, bundle) = crate::trust::current_document(state).await?;

    Ok(EnrollResponse {
        agent_id,
        cert_pem: issued.cert_pem,
        cert_not_after: rfc3339(not_after_ms),
        spiffe_id: issued.spiffe_id,
        agent_endpoint: state.config.agent_endpoint.clone(),
        agent_endpoints: state.config.agent_endpoints.clone(),
        trust_bundle_version: bundle_version,
        trust_bundle: TrustBundle {
            // The CA of the server chain first (the agent checks it against its pin), then any
            // CA being rolled out.
            ca_pem: state.keys.cas().trusted_pem(),
            job_signing_keys: bundle.job_signing_keys,
            trust_domain: state.keys.trust_domain.clone(),
        },
        labels,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub hostname: String,
    /// `connected`, `disconnected` or `revoked`.
    pub status: String,
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub last_heartbeat: Option<String>,
    pub cert_not_after: String,
    pub enrolled_at: String,
}

/// The parts of an agent row other modules decide on.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub status: String,
    pub cert_serial: String,
    pub previous_cert_serial: String,
    pub capabilities: Vec<String>,
}

const AGENT_COLUMNS: &str = "id, name, hostname, labels, capabilities, version, cert_serial, \
     previous_cert_serial, cert_not_after, status, last_heartbeat, enrolled_at, session_replica";

/// `alive`: the replicas alive now (`replicas::alive`); an agent whose session another live
/// replica holds is connected too.
fn view_from_row(
    state: &AppState,
    alive: &std::collections::HashSet<String>,
    row: &sqlx::any::AnyRow,
) -> AgentView {
    let id: String = row.get("id");
    let status: String = row.get("status");
    let held_elsewhere = row
        .get::<Option<String>, _>("session_replica")
        .is_some_and(|r| r != state.replica.id && alive.contains(&r));
    let status = if status == "revoked" {
        status
    } else if state.hub.is_connected(&id) || held_elsewhere {
        "connected".to_string()
    } else {
        "disconnected".to_string()
    };
    AgentView {
        name: row.get("name"),
        hostname: row.get("hostname"),
        status,
        capabilities: serde_json::from_str(row.get::<&str, _>("capabilities")).unwrap_or_default(),
        labels: serde_json::from_str(row.get::<&str, _>("labels")).unwrap_or_default(),
        version: row.get("version"),
        // The hub has the latest heartbeat; the database gets it at the next flush.
        last_heartbeat: state
            .hub
            .last_heartbeat(&id)
            .or_else(|| row.get::<Option<i64>, _>("last_heartbeat"))
            .map(rfc3339),
        cert_not_after: rfc3339(row.get("cert_not_after")),
        enrolled_at: rfc3339(row.get("enrolled_at")),
        id,
    }
}

pub async fn list(state: &AppState) -> ApiResult<Vec<AgentView>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {AGENT_COLUMNS} FROM agents ORDER BY enrolled_at, id"
    )))
    .fetch_all(&state.db)
    .await?;
    let alive = crate::replicas::alive(state).await?;
    Ok(rows
        .iter()
        .map(|r| view_from_row(state, &alive, r))
        .collect())
}

/// Finds an agent by id or, when unambiguous, by name.
pub async fn find(state: &AppState, id_or_name: &str) -> ApiResult<AgentRecord> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1 OR name = $2 ORDER BY enrolled_at"
    )))
    .bind(id_or_name)
    .bind(id_or_name)
    .fetch_all(&state.db)
    .await?;
    if let Some(row) = rows.iter().find(|r| r.get::<&str, _>("id") == id_or_name) {
        return Ok(record_from_row(row));
    }
    match rows.as_slice() {
        [] => Err(ApiError::NotFound(format!(
            "agent {id_or_name:?} not found"
        ))),
        [row] => Ok(record_from_row(row)),
        _ => Err(ApiError::Conflict(format!(
            "{} agents are named {id_or_name:?}; use the agent id",
            rows.len()
        ))),
    }
}

pub async fn view(state: &AppState, id_or_name: &str) -> ApiResult<AgentView> {
    let record = find(state, id_or_name).await?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"
    )))
    .bind(&record.id)
    .fetch_one(&state.db)
    .await?;
    let alive = crate::replicas::alive(state).await?;
    Ok(view_from_row(state, &alive, &row))
}

fn record_from_row(row: &sqlx::any::AnyRow) -> AgentRecord {
    AgentRecord {
        id: row.get("id"),
        name: row.get("name"),
        status: row.get("status"),
        cert_serial: row.get("cert_serial"),
        previous_cert_serial: row.get("previous_cert_serial"),
        capabilities: serde_json::from_str(row.get::<&str, _>("capabilities")).unwrap_or_default(),
    }
}

pub async fn get_record(state: &AppState, agent_id: &str) -> ApiResult<Option<AgentRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"
    )))
    .bind(agent_id)
    .fetch_optional(&state.db)
    .await?;
    Ok(row.as_ref().map(record_from_row))
}

/// The agents serving the targets of an environment, by id, in one query (a deployment checks
/// every one of them).
pub async fn records_for_environment(
    state: &AppState,
    environment_id: &str,
) -> ApiResult<std::collections::HashMap<String, AgentRecord>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {AGENT_COLUMNS} FROM agents
         WHERE id IN (SELECT agent_id FROM targets WHERE environment_id = $1)"
    )))
    .bind(environment_id)
    .fetch_all(&state.db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let record = record_from_row(r);
            (record.id.clone(), record)
        })
        .collect())
}

/// Records what the agent announced in its hello, inside the caller's transaction (the group
/// commit).
pub async fn record_hello(
    conn: &mut sqlx::AnyConnection,
    replica: &str,
    agent_id: &str,
    capabilities: &[String],
    labels: &BTreeMap<String, String>,
    version: &str,
    hostname: &str,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    // Labels given by the join token stay authoritative: merge the agent's over the stored ones
    // only for keys the agent owns (keys not yet set).
    let stored: Option<(String,)> = sqlx::query_as("SELECT labels FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_optional(&mut *conn)
        .await?;
    let mut merged: BTreeMap<String, String> = stored
        .and_then(|(l,)| serde_json::from_str(&l).ok())
        .unwrap_or_default();
    for (k, v) in labels {
        merged.entry(k.clone()).or_insert_with(|| v.clone());
    }
    // Serializing string lists and maps cannot fail; an empty document would only lose labels.
    let capabilities = serde_json::to_string(capabilities).unwrap_or_else(|_| "[]".to_string());
    let merged = serde_json::to_string(&merged).unwrap_or_else(|_| "{}".to_string());
    sqlx::query(
        "UPDATE agents SET capabilities = $1, labels = $2, version = $3, hostname = $4,
            last_connected = $5, last_heartbeat = $6, session_replica = $7 WHERE id = $8",
    )
    .bind(capabilities)
    .bind(merged)
    .bind(version)
    .bind(hostname)
    .bind(now)
    .bind(now)
    .bind(replica)
    .bind(agent_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Writes the heartbeat times the hub collected since the last flush (agent id, unix ms).
pub async fn flush_heartbeats(
    conn: &mut sqlx::AnyConnection,
    heartbeats: &[(String, i64)],
) -> Result<(), sqlx::Error> {
    for (agent_id, at) in heartbeats {
        sqlx::query("UPDATE agents SET last_heartbeat = $1 WHERE id = $2 AND (last_heartbeat IS NULL OR last_heartbeat < $3)")
            .bind(at)
            .bind(agent_id)
            .bind(at)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RevokeAgent {
    #[serde(default)]
    pub reason: String,
}

/// Revokes an agent: new handshakes are refused, its live session is cut now, and its
/// unfinished jobs are cancelled with the reason. Revoking twice changes nothing more.
pub async fn revoke(state: &AppState, id_or_name: &str, req: RevokeAgent) -> ApiResult<AgentView> {
    let agent = find(state, id_or_name).await?;
    let reason = if req.reason.trim().is_empty() {
        "revoked by an operator".to_string()
    } else {
        req.reason.chars().take(500).collect()
    };
    if agent.status != "revoked" {
        crate::deployments::cancel_agent_jobs(state, &agent.id, &reason).await?;
        sqlx::query(
            "UPDATE agents SET status = 'revoked', revoked_at = $1, revoked_reason = $2 WHERE id = $3",
        )
        .bind(now_ms())
        .bind(&reason)
        .bind(&agent.id)
        .execute(&state.db)
        .await?;
        tracing::warn!(agent_id = %agent.id, %reason, "agent revoked");
    }
    // Cut the live session whether or not this call changed anything (a retry must also cut).
    state.evict_agent(&agent.id);
    view(state, &agent.id).await
}

/// Remembers an issued certificate (receipts name it by fingerprint).
async fn record_certificate<'e, E>(
    db: E,
    agent_id: &str,
    cert_pem: &str,
    serial: &str,
    not_after_ms: i64,
) -> ApiResult<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let der = stella_pki::cert_der_from_pem(cert_pem)?;
    sqlx::query(
        "INSERT INTO agent_certificates (fingerprint, agent_id, serial, cert_pem, not_after, issued_at)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (fingerprint) DO NOTHING",
    )
    .bind(stella_pki::fingerprint_der(&der))
    .bind(agent_id)
    .bind(serial)
    .bind(cert_pem)
    .bind(not_after_ms)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

/// The certificate (DER) an agent was issued with this fingerprint, and its expiry (unix ms).
pub async fn certificate_by_fingerprint(
    state: &AppState,
    agent_id: &str,
    fingerprint: &str,
) -> ApiResult<Option<(Vec<u8>, i64)>> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT cert_pem, not_after FROM agent_certificates WHERE agent_id = $1 AND fingerprint = $2",
    )
    .bind(agent_id)
    .bind(fingerprint)
    .fetch_optional(&state.db)
    .await?;
    match row {
        Some((pem, not_after)) => Ok(Some((stella_pki::cert_der_from_pem(&pem)?, not_after))),
        None => Ok(None),
    }
}

/// Issues a new certificate for an agent's new key. The previous serial stays valid until the
/// agent opens a session with the new one, so a crash between issue and install locks nobody out.
pub async fn renew_certificate(
    state: &AppState,
    agent_id: &str,
    presented_serial: &str,
    csr_pem: &str,
) -> ApiResult<String> {
    let record = get_record(state, agent_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("agent {agent_id:?} not found")))?;
    if record.status == "revoked" {
        return Err(ApiError::Forbidden(format!("agent {agent_id} is revoked")));
    }
    let issued = state
        .keys
        .cas()
        .issuing()
        .sign_agent_csr(
            csr_pem,
            &state.keys.trust_domain,
            agent_id,
            state.config.agent_cert_validity,
        )
        .map_err(|e| ApiError::BadRequest(format!("certificate signing request refused: {e}")))?;
    let not_after_ms = (issued.not_after.unix_timestamp_nanos() / 1_000_000) as i64;
    // Keep valid the certificate the agent actually holds: if it never installed the last
    // renewal (it presented the previous serial), that previous one must stay the fallback.
    sqlx::query(
        "UPDATE agents SET previous_cert_serial = CASE WHEN cert_serial = $1 THEN cert_serial
                ELSE previous_cert_serial END,
            cert_serial = $2, cert_not_after = $3, cert_pem = $4 WHERE id = $5 AND status != 'revoked'",
    )
    .bind(presented_serial)
    .bind(&issued.serial_hex)
    .bind(not_after_ms)
    .bind(&issued.cert_pem)
    .bind(agent_id)
    .execute(&state.db)
    .await?;
    record_certificate(
        &state.db,
        agent_id,
        &issued.cert_pem,
        &issued.serial_hex,
        not_after_ms,
    )
    .await?;
    tracing::info!(agent_id, not_after = %rfc3339(not_after_ms), "agent certificate renewed");
    Ok(issued.cert_pem)
}

/// The session presented the current certificate: the previous one is no longer needed.
pub async fn retire_previous_certificate(state: &AppState, agent_id: &str) -> ApiResult<()> {
    sqlx::query(
        "UPDATE agents SET previous_cert_serial = '' WHERE id = $1 AND previous_cert_serial != ''",
    )
    .bind(agent_id)
    .execute(&state.db)
    .await?;
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct OfflineRenewRequest {
    pub agent_id: String,
    /// The agent's last certificate (expired or not).
    pub cert_pem: String,
    pub csr_pem: String,
    pub timestamp_unix_ms: i64,
    /// Base64 signature by the previous key over `renewal_proof_message`.
    pub proof: String,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OfflineRenewResponse {
    pub cert_pem: String,
}

/// Renewal for an agent whose certificate expired while it was offline: it proves possession
/// of its previous key; accepted within the grace period unless the agent was revoked.
pub async fn renew_offline(
    state: &AppState,
    req: OfflineRenewRequest,
) -> ApiResult<OfflineRenewResponse> {
    use base64::Engine;
    let refuse = |why: &str| ApiError::Unauthorized(format!("renewal refused: {why}"));
    let der = stella_pki::cert_der_from_pem(&req.cert_pem)
        .map_err(|_| refuse("the certificate cannot be parsed"))?;
    state
        .keys
        .cas()
        .trusted()
        .iter()
        .find_map(|ca| ca.verify_issued(&der).ok())
        .ok_or(())
        .map_err(|_| refuse("the certificate was not issued by this plane's CA"))?;
    let id = stella_pki::agent_id_from_cert(&der, &state.keys.trust_domain)
        .map_err(|e| refuse(&e.to_string()))?;
    if id != req.agent_id {
        return Err(refuse("the certificate belongs to another agent"));
    }
    let skew = (now_ms() - req.timestamp_unix_ms).abs();
    if skew > 5 * 60 * 1000 {
        return Err(refuse("the proof's timestamp is more than 5 minutes off"));
    }
    let proof = base64::engine::general_purpose::STANDARD
        .decode(&req.proof)
        .map_err(|_| refuse("the proof is not base64"))?;
    stella_pki::verify_with_cert(
        &der,
        &stella_pki::renewal_proof_message(&req.agent_id, &req.csr_pem, req.timestamp_unix_ms),
        &proof,
    )
    .map_err(|_| refuse("the proof does not verify with the certificate's key"))?;
    let row: Option<(String, String, String)> = sqlx::query_as(
        "SELECT status, cert_serial, previous_cert_serial FROM agents WHERE id = $1",
    )
    .bind(&req.agent_id)
    .fetch_optional(&state.db)
    .await?;
    let Some((status, serial, previous)) = row else {
        return Err(refuse("unknown agent"));
    };
    if status == "revoked" {
        return Err(ApiError::Forbidden(format!(
            "agent {} is revoked; enroll again with a new join token",
            req.agent_id
        )));
    }
    let presented = stella_pki::cert_serial_hex(&der).map_err(|_| refuse("no serial"))?;
    if presented != serial && (previous.is_empty() || presented != previous) {
        return Err(refuse("the certificate is not this agent's current one"));
    }
    let (_, not_after) = stella_pki::cert_validity(&der).ok_or_else(|| refuse("no validity"))?;
    let grace_ms = state.config.renewal_grace.as_millis() as i64;
    if now_ms() > not_after * 1000 + grace_ms {
        return Err(ApiError::Forbidden(format!(
            "the certificate expired at {}, more than the {}-day grace period ago; enroll again with a new join token",
            rfc3339(not_after * 1000),
            state.config.renewal_grace.as_secs() / 86400
        )));
    }
    let cert_pem = renew_certificate(state, &req.agent_id, &presented, &req.csr_pem).await?;
    Ok(OfflineRenewResponse { cert_pem })
}
