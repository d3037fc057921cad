//! Air-gap files for relays with no link at all (`stella airgap export|import`; their shapes:
//! `stella_proto::airgap`).
//!
//! Export: the jobs waiting for the agents last seen behind a relay (directly or behind a relay
//! behind it), with their targets, in a DSSE envelope signed by the job-signing key — the relay
//! checks it against the keys it pinned; each job inside is the signed envelope the agent checks
//! itself. Import: the relay's signed file of what its agents reported. Each agent's messages
//! go through the plane's ordinary session code (`session::serve_stored`), so the agent's
//! certificate is checked against the CA and its enrollment, every receipt against the agent's
//! certificates, and a result already recorded changes nothing. A file imported before is
//! recognised by its digest and changes nothing at all.

use std::collections::HashMap;

use base64::Engine as _;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use stella_proto::AgentMessage;
use stella_proto::agent_message::Body as AgentBody;
use stella_proto::airgap::{
    AgentJobs, AirgapJob, AirgapTarget, JOBS_FORMAT, JOBS_PAYLOAD_TYPE, JobsDocument,
    ResultsDocument, SignedResults,
};

use crate::error::{ApiError, ApiResult};
use crate::state::SharedState;
use crate::store::now_ms;
use crate::{agents, deployments, relays, session, targets};

/// What an import did.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportSummary {
    pub relay_id: String,
    /// Results recorded by this import.
    pub results_new: u64,
    /// Results that were recorded before (by an earlier import or a live session).
    pub results_known: u64,
    /// Results not recorded: a receipt that does not verify, a job of another agent.
    pub results_refused: u64,
    pub agents: u64,
    /// Agents whose messages were refused as a whole (certificate, enrollment, revocation).
    pub agents_refused: Vec<String>,
    /// The same file was imported before: nothing was done.
    pub already_imported: bool,
}

/// The signed jobs file for the agents behind `relay` (id or name).
pub async fn export(state: &SharedState, relay: &str) -> ApiResult<stella_pki::Envelope> {
    let relay = agents::find(state, relay).await?;
    if !relays::is_relay(state, &relay.id).await? {
        return Err(ApiError::Unprocessable(format!(
            "agent {} is not a relay (its join token has no {}={} label)",
            relay.id,
            relays::RELAY_LABEL.0,
            relays::RELAY_LABEL.1
        )));
    }
    let now = now_ms();
    let mut agents_out = Vec::new();
    for agent_id in relays::agents_behind(state, &relay.id).await? {
        let jobs = deployments::pending_for_agent(state, &agent_id)
            .await?
            .into_iter()
            .filter(|j| j.not_after_ms > now)
            .map(|j| AirgapJob {
                job_id: j.id,
                envelope: j.envelope,
            })
            .collect();
        let targets = targets::list_for_agent(state, &agent_id)
            .await?
            .into_iter()
            .map(|t| AirgapTarget {
                name: t.name,
                kind: t.kind,
                config_json: t.config.to_string(),
            })
            .collect();
        agents_out.push(AgentJobs {
            agent_id,
            targets,
            jobs,
        });
    }
    let doc = JobsDocument {
        format: JOBS_FORMAT.to_string(),
        relay_id: relay.id.clone(),
        created_at_unix_ms: now,
        agents: agents_out,
    };
    let payload = serde_json::to_vec(&doc).map_err(|e| ApiError::Internal(e.to_string()))?;
    let jobs: usize = doc.agents.iter().map(|a| a.jobs.len()).sum();
    tracing::info!(relay_id = %relay.id, agents = doc.agents.len(), jobs, "air-gap jobs exported");
    Ok(state
        .keys
        .job_keys()
        .active
        .sign(JOBS_PAYLOAD_TYPE, &payload))
}

fn b64(field: &str, what: &str) -> ApiResult<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(field.as_bytes())
        .map_err(|e| ApiError::BadRequest(format!("{what} is not base64: {e}")))
}

/// Imports a relay's results file. The whole file is checked (format, relay certificate and
/// signature, every message decodes) before anything is fed to the plane.
pub async fn import(state: &SharedState, file: SignedResults) -> ApiResult<ImportSummary> {
    file.check_format()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let payload = b64(&file.payload, "payload")?;
    let signature = b64(&file.signature, "signature")?;
    let relay_der = stella_pki::cert_der_from_pem(&file.relay_cert_pem)
        .map_err(|e| ApiError::BadRequest(format!("relay certificate: {e}")))?;
    let issued = state
        .keys
        .cas()
        .trusted()
        .iter()
        .any(|ca| ca.verify_issued(&relay_der).is_ok());
    if !issued {
        return Err(ApiError::BadRequest(
            "the relay certificate was not issued by this plane's CA".to_string(),
        ));
    }
    let relay_id = stella_pki::agent_id_from_cert(&relay_der, &state.keys.trust_domain)
        .map_err(|e| ApiError::BadRequest(format!("relay certificate: {e}")))?;
    stella_pki::verify_with_cert(&relay_der, &payload, &signature).map_err(|_| {
        ApiError::BadRequest(
            "the file's signature does not verify with the relay's certificate".to_string(),
        )
    })?;
    if !relays::is_relay(state, &relay_id).await? {
        return Err(ApiError::Unprocessable(format!(
            "agent {relay_id} is not a relay"
        )));
    }
    let doc: ResultsDocument = serde_json::from_slice(&payload)
        .map_err(|e| ApiError::BadRequest(format!("malformed results document: {e}")))?;
    if doc.relay_id != relay_id {
        return Err(ApiError::BadRequest(format!(
            "the document names relay {}, the certificate {relay_id}",
            doc.relay_id
        )));
    }
    let digest = stella_pki::sha256_digest(&payload);
    let mut summary = ImportSummary {
        relay_id: relay_id.clone(),
        agents: doc.leaves.len() as u64,
        ..Default::default()
    };
    if let Some(row) =
        sqlx::query("SELECT results_new, results_known FROM airgap_imports WHERE digest = $1")
            .bind(&digest)
            .fetch_optional(&state.db)
            .await?
    {
        let (new, known): (i64, i64) = (row.get("results_new"), row.get("results_known"));
        summary.results_known = (new + known) as u64;
        summary.already_imported = true;
        return Ok(summary);
    }

    // Decode everything first: a bad message refuses the file before anything is recorded.
    let mut leaves = Vec::with_capacity(doc.leaves.len());
    for leaf in &doc.leaves {
        let cert = b64(&leaf.cert_der, "certificate")?;
        let hello = AgentMessage::decode(b64(&leaf.hello, "hello")?.as_slice())
            .map_err(|e| ApiError::BadRequest(format!("{}: hello: {e}", leaf.agent_id)))?;
        if !matches!(hello.body, Some(AgentBody::Hello(_))) {
            return Err(ApiError::BadRequest(format!(
                "{}: the stored hello is not a hello",
                leaf.agent_id
            )));
        }
        let mut messages = vec![hello];
        for m in &leaf.messages {
            let message = AgentMessage::decode(b64(m, "message")?.as_slice())
                .map_err(|e| ApiError::BadRequest(format!("{}: message: {e}", leaf.agent_id)))?;
            if matches!(
                message.body,
                Some(AgentBody::Hello(_) | AgentBody::Renew(_) | AgentBody::RelayCert(_))
            ) {
                // Renewals need a live answer; a file cannot carry one.
                continue;
            }
            messages.push(message);
        }
        leaves.push((leaf.agent_id.clone(), cert, messages));
    }

    for (agent_id, cert, messages) in leaves {
        let results: Vec<String> = messages
            .iter()
            .filter_map(|m| match &m.body {
                Some(AgentBody::Result(r)) => Some(r.job_id.clone()),
                _ => None,
            })
            .collect();
        let before = finished_jobs(state, &agent_id, &results).await?;
        if let Err(why) = session::serve_stored(state, &relay_id, &cert, &agent_id, messages).await
        {
            tracing::warn!(relay_id, agent_id, reason = %why, "air-gap messages of an agent refused");
            summary.agents_refused.push(format!("{agent_id}: {why}"));
            summary.results_refused += results.len() as u64;
            continue;
        }
        // Seen behind this relay, even if only ever through files: the next export has its jobs.
        relays::record_relayed(state, &agent_id, &relay_id).await?;
        let after = finished_jobs(state, &agent_id, &results).await?;
        for job in &results {
            match (before.get(job), after.get(job)) {
                (Some(_), _) => summary.results_known += 1,
                (None, Some(_)) => summary.results_new += 1,
                (None, None) => summary.results_refused += 1,
            }
        }
    }
    sqlx::query(
        "INSERT INTO airgap_imports (digest, relay_id, imported_at, results_new, results_known)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT(digest) DO NOTHING",
    )
    .bind(&digest)
    .bind(&relay_id)
    .bind(now_ms())
    .bind(summary.results_new as i64)
    .bind(summary.results_known as i64)
    .execute(&state.db)
    .await?;
    tracing::info!(
        relay_id,
        new = summary.results_new,
        known = summary.results_known,
        refused = summary.results_refused,
        "air-gap results imported"
    );
    Ok(summary)
}

/// Which of `job_ids` are jobs of `agent_id` with a recorded outcome.
async fn finished_jobs(
    state: &SharedState,
    agent_id: &str,
    job_ids: &[String],
) -> ApiResult<HashMap<String, String>> {
    let mut out = HashMap::new();
    for job_id in job_ids {
        let status: Option<(String,)> = sqlx::query_as(
            "SELECT status FROM jobs WHERE id = $1 AND agent_id = $2
             AND status NOT IN ('queued', 'offered', 'accepted')",
        )
        .bind(job_id)
        .bind(agent_id)
        .fetch_optional(&state.db)
        .await?;
        if let Some((status,)) = status {
            out.insert(job_id.clone(), status);
        }
    }
    Ok(out)
}
