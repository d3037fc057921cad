//! Evidence: the plane's side of `stella-evidence`. A signed, hash-chained packet is recorded
//! for every promotion decision (allowed or blocked), every finished deployment and every
//! rollback, with the agents' receipts for each job. Packets are appended in one transaction
//! with the chain head they continue from, and the database refuses to change or delete them
//! (triggers in migration 0009). Export bundles verify offline with `stella evidence verify`.

use serde::{Deserialize, Serialize};
use stella_evidence::{
    Actors, Approval, Bundle, BundleContents, ChainHead, Component, Decision, EvidenceChain,
    EvidenceKey, Execution, GateResult, JobEvidence, PacketContent, PacketKind, PreviousState,
    Release, SignedPacket, TargetRef,
};
use time::OffsetDateTime;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::promotions::DecisionView;
use crate::state::AppState;
use crate::store::rfc3339;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvidenceSummary {
    pub id: String,
    pub sequence: u64,
    /// promotion_decision, deployment or rollback.
    pub kind: String,
    pub promotion_id: Option<String>,
    pub deployment_id: Option<String>,
    pub digest: String,
    pub recorded_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvidenceDetail {
    pub summary: EvidenceSummary,
    /// The packet for a person: who, what, why, how, when.
    pub rendered: String,
    /// The signed packet (DSSE envelope of an in-toto Statement v1).
    #[schema(value_type = Object)]
    pub packet: SignedPacket,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn to_time(ms: i64) -> ApiResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).map_err(internal)
}

fn parse_time(s: &str) -> ApiResult<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(internal)
}

/// The image repository of a reference, without tag (evidence names repositories).
fn repository(image: &str) -> String {
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo.to_string(),
        _ => image.to_string(),
    }
}

async fn release_facts(state: &AppState, release_id: &str) -> ApiResult<Release> {
    let release = crate::releases::find(state, release_id).await?;
    Ok(Release {
        name: release.name,
        components: release
            .components
            .into_iter()
            .map(|c| Component {
                image: repository(&c.image),
                name: c.name,
                digest: c.digest,
            })
            .collect(),
    })
}

async fn approvers(state: &AppState, promotion_id: &str) -> ApiResult<Vec<Approval>> {
    crate::promotions::approvals(state, promotion_id)
        .await?
        .into_iter()
        .filter(|a| a.decision == "approve")
        .map(|a| {
            Ok(Approval {
                user: a.user,
                at: parse_time(&a.at)?,
                comment: a.comment,
            })
        })
        .collect()
}

/// Appends `content` to the chain and links it from the promotion or deployment it records.
/// `None` when the promotion or deployment was already recorded: replicas sharing a database
/// each find the same "settled and not yet recorded" rows, and only the first append may count.
async fn append(state: &AppState, content: PacketContent) -> ApiResult<Option<SignedPacket>> {
    let key = state.keys.evidence_key();
    let mut tx = crate::store::write_tx(&state.db).await?;
    let recorded: Option<(Option<String>,)> = match (&content.promotion_id, &content.deployment_id)
    {
        (Some(p), _) if content.kind == PacketKind::PromotionDecision => {
            sqlx::query_as("SELECT evidence_id FROM promotions WHERE id = $1")
                .bind(p)
                .fetch_optional(&mut *tx)
                .await?
        }
        (_, Some(d)) => {
            sqlx::query_as("SELECT evidence_id FROM deployments WHERE id = $1")
                .bind(d)
                .fetch_optional(&mut *tx)
                .await?
        }
        _ => None,
    };
    if let Some((Some(existing),)) = recorded {
        tracing::debug!(evidence = %existing, "already recorded (by another replica)");
        return Ok(None);
    }
    let head: Option<(i64, String)> = sqlx::query_as(
        "SELECT sequence, digest FROM evidence_packets ORDER BY sequence DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let mut chain = match head {
        None => EvidenceChain::new(),
        Some((sequence, digest)) => EvidenceChain::resume(ChainHead {
            sequence: u64::try_from(sequence).map_err(internal)?,
            digest,
        })
        .map_err(internal)?,
    };
    let public = serde_json::to_string(&key.public_key()).map_err(internal)?;
    sqlx::query(
        "INSERT INTO evidence_keys (key_id, public_key, valid_from) VALUES ($1, $2, $3)
         ON CONFLICT (key_id) DO NOTHING",
    )
    .bind(key.key_id())
    .bind(&public)
    .bind(content.recorded_at.unix_timestamp() * 1000 - 1000)
    .execute(&mut *tx)
    .await?;
    let kind = content.kind;
    let promotion_id = content.promotion_id.clone();
    let deployment_id = content.deployment_id.clone();
    let recorded_at = (content.recorded_at.unix_timestamp_nanos() / 1_000_000) as i64;
    let packet = chain
        .append(content, key)
        .map_err(|e| ApiError::Internal(format!("evidence packet refused: {e}")))?;
    let envelope = serde_json::to_string(&packet.envelope).map_err(internal)?;
    sqlx::query(
        "INSERT INTO evidence_packets (sequence, id, digest, kind, promotion_id, deployment_id,
             envelope, recorded_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(i64::try_from(packet.sequence).map_err(internal)?)
    .bind(&packet.id)
    .bind(&packet.digest)
    .bind(kind.as_str())
    .bind(&promotion_id)
    .bind(&deployment_id)
    .bind(&envelope)
    .bind(recorded_at)
    .execute(&mut *tx)
    .await?;
    match (kind, &promotion_id, &deployment_id) {
        (PacketKind::PromotionDecision, Some(p), _) => {
            sqlx::query("UPDATE promotions SET evidence_id = $1 WHERE id = $2")
                .bind(&packet.id)
                .bind(p)
                .execute(&mut *tx)
                .await?;
        }
        (_, _, Some(d)) => {
            sqlx::query("UPDATE deployments SET evidence_id = $1 WHERE id = $2")
                .bind(&packet.id)
                .bind(d)
                .execute(&mut *tx)
                .await?;
        }
        _ => {}
    }
    tx.commit().await?;
    tracing::info!(evidence = %packet.id, sequence = packet.sequence, kind = kind.as_str(), "evidence recorded");
    Ok(Some(packet))
}

async fn environment_targets(state: &AppState, environment_id: &str) -> ApiResult<Vec<TargetRef>> {
    Ok(crate::targets::list(state, Some(environment_id))
        .await?
        .into_iter()
        .map(|t| TargetRef {
            name: t.name,
            kind: t.kind,
            agent_id: t.agent_id,
        })
        .collect())
}

/// Records the decision that let a promotion in or kept it out.
async fn record_decision(
    state: &AppState,
    promotion_id: &str,
    decision: &DecisionView,
) -> ApiResult<()> {
    let promotion = crate::promotions::record(state, promotion_id).await?;
    let env = crate::environments::find(state, &promotion.environment_id).await?;
    let outcome = match decision.outcome.as_str() {
        "allowed" => "approved",
        _ => "rejected",
    };
    let content = PacketContent {
        kind: PacketKind::PromotionDecision,
        promotion_id: Some(promotion.id.clone()),
        deployment_id: None,
        release: release_facts(state, &promotion.release_id).await?,
        environment: env.name,
        targets: environment_targets(state, &promotion.environment_id).await?,
        actors: Actors {
            requester: promotion.requested_by.clone(),
            approvers: approvers(state, &promotion.id).await?,
        },
        decision: Some(Decision {
            outcome: outcome.to_string(),
            gates: decision
                .gates
                .iter()
                .map(|g| GateResult {
                    gate: g.gate.clone(),
                    status: g.status.clone(),
                    reason: g.reason.clone(),
                })
                .collect(),
            policy_digest: Some(decision.policy_digest.clone()),
            input_hash: Some(decision.input_hash.clone()),
        }),
        execution: None,
        previous_state: None,
        recorded_at: OffsetDateTime::now_utc(),
    };
    append(state, content).await.map(|_| ())
}

/// Records what has no packet yet: promotion decisions (the decision that approved a
/// promotion, or the one that rejected it) and finished deployments and rollbacks. Called by
/// the workflow runner's loop, so a plane that died before recording catches up after a
/// restart, and nothing is recorded twice (each record is linked in the same transaction).
pub async fn record_pending(state: &AppState) -> ApiResult<()> {
    let decided: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, status FROM promotions WHERE evidence_id IS NULL
         AND status NOT IN ('pending', 'awaiting_approval')
         ORDER BY updated_at, id LIMIT 100",
    )
    .fetch_all(&state.db)
    .await?;
    for (id, status) in decided {
        let decisions = crate::gates::decisions(state, &id).await?;
        // The decision that settled the promotion: the last block for a rejection, otherwise
        // the first allowance (later gate steps re-evaluate, but this one let it in).
        let settling = if status == "rejected" {
            decisions.iter().rev().find(|d| d.outcome == "blocked")
        } else {
            decisions.iter().find(|d| d.outcome == "allowed")
        };
        if let Some(decision) = settling {
            record_decision(state, &id, decision).await?;
        }
    }
    record_finished_deployments(state).await
}

async fn record_finished_deployments(state: &AppState) -> ApiResult<()> {
    let pending: Vec<(String,)> = sqlx::query_as(
        "SELECT id FROM deployments WHERE status <> 'running' AND evidence_id IS NULL
         AND kind = 'deploy'
         ORDER BY COALESCE(finished_at, updated_at), id LIMIT 100",
    )
    .fetch_all(&state.db)
    .await?;
    for (id,) in pending {
        record_deployment(state, &id).await?;
    }
    Ok(())
}

type DeploymentRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    Option<i64>,
);

async fn record_deployment(state: &AppState, id: &str) -> ApiResult<()> {
    let (release_id, environment_id, status, purpose, replaces, requested_by, finished_at): DeploymentRow =
        sqlx::query_as(
            "SELECT release_id, environment_id, status, purpose, replaces_release_id,
                 requested_by, finished_at
             FROM deployments WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&state.db)
        .await?;
    let run: Option<(String, String)> = sqlx::query_as(
        "SELECT s.run_id, r.promotion_id FROM workflow_step_deployments s
         JOIN workflow_runs r ON r.id = s.run_id WHERE s.deployment_id = $1",
    )
    .bind(id)
    .fetch_optional(&state.db)
    .await?;
    let (requester, approvers_list, promotion_id, workflow_run) = match &run {
        Some((run_id, promotion_id)) => {
            let p = crate::promotions::record(state, promotion_id).await?;
            (
                p.requested_by,
                approvers(state, promotion_id).await?,
                Some(promotion_id.clone()),
                run_id.clone(),
            )
        }
        None => (
            if requested_by.is_empty() {
                "unknown".to_string()
            } else {
                requested_by
            },
            Vec::new(),
            None,
            "none".to_string(),
        ),
    };
    let jobs: Vec<(String, String, String, String, String, String, String)> = sqlx::query_as(
        "SELECT j.id, j.agent_id, t.name, t.kind, j.status, j.envelope, j.receipt
         FROM jobs j JOIN targets t ON t.id = j.target_id WHERE j.deployment_id = $1
         ORDER BY t.name",
    )
    .bind(id)
    .fetch_all(&state.db)
    .await?;
    let mut targets = Vec::new();
    let mut job_evidence = Vec::new();
    for (job_id, agent_id, target, kind, job_status, envelope, receipt) in jobs {
        if !targets.iter().any(|t: &TargetRef| t.name == target) {
            targets.push(TargetRef {
                name: target.clone(),
                kind,
                agent_id: agent_id.clone(),
            });
        }
        // Jobs the plane cancelled before any agent answered carry no receipt: the packet
        // lists what agents attested, and the outcome says the rest.
        let Ok(receipt) = serde_json::from_str::<stella_pki::Envelope>(&receipt) else {
            continue;
        };
        let events: Vec<(String,)> =
            sqlx::query_as("SELECT message FROM job_events WHERE job_id = $1 ORDER BY seq")
                .bind(&job_id)
                .fetch_all(&state.db)
                .await?;
        let log: String = events.into_iter().map(|(m,)| m + "\n").collect();
        job_evidence.push(JobEvidence {
            job_id,
            agent_id,
            target,
            status: job_status,
            job_envelope_digest: Some(stella_pki::envelope_digest(envelope.as_bytes())),
            receipt,
            log_digests: vec![stella_pki::sha256_digest(log.as_bytes())],
        });
    }
    let release = release_facts(state, &release_id).await?;
    let (kind, previous_state) = match (purpose.as_str(), replaces) {
        ("rollback", Some(from)) => (
            PacketKind::Rollback,
            Some(PreviousState {
                from: release_facts(state, &from).await?,
                to: release.clone(),
            }),
        ),
        _ => (PacketKind::Deployment, None),
    };
    let env = crate::environments::find(state, &environment_id).await?;
    let content = PacketContent {
        kind,
        promotion_id,
        deployment_id: Some(id.to_string()),
        release,
        environment: env.name,
        targets,
        actors: Actors {
            requester,
            approvers: approvers_list,
        },
        decision: None,
        execution: Some(Execution {
            workflow_run,
            outcome: status,
            jobs: job_evidence,
        }),
        previous_state,
        recorded_at: match finished_at {
            Some(ms) => to_time(ms)?,
            None => OffsetDateTime::now_utc(),
        },
    };
    append(state, content).await.map(|_| ())
}

/// Marks a deployment as a rollback from `from_release_id`, and who asked.
pub async fn mark_rollback(
    state: &AppState,
    deployment_id: &str,
    from_release_id: &str,
    requested_by: &str,
) -> ApiResult<()> {
    sqlx::query(
        "UPDATE deployments SET purpose = 'rollback', replaces_release_id = $1, requested_by = $2
         WHERE id = $3",
    )
    .bind(from_release_id)
    .bind(requested_by)
    .bind(deployment_id)
    .execute(&state.db)
    .await?;
    Ok(())
}

pub async fn mark_requested_by(state: &AppState, deployment_id: &str, user: &str) -> ApiResult<()> {
    sqlx::query("UPDATE deployments SET requested_by = $1 WHERE id = $2")
        .bind(user)
        .bind(deployment_id)
        .execute(&state.db)
        .await?;
    Ok(())
}

type PacketRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
);

fn packet_from(row: &PacketRow) -> ApiResult<SignedPacket> {
    let envelope: stella_pki::Envelope = serde_json::from_str(&row.6).map_err(internal)?;
    Ok(SignedPacket {
        id: row.1.clone(),
        sequence: u64::try_from(row.0).map_err(internal)?,
        digest: row.2.clone(),
        envelope,
    })
}

fn summary_from(row: &PacketRow) -> ApiResult<EvidenceSummary> {
    Ok(EvidenceSummary {
        id: row.1.clone(),
        sequence: u64::try_from(row.0).map_err(internal)?,
        kind: row.3.clone(),
        promotion_id: row.4.clone(),
        deployment_id: row.5.clone(),
        digest: row.2.clone(),
        recorded_at: rfc3339(row.7),
    })
}

async fn rows(state: &AppState, from_ms: i64, to_ms: i64) -> ApiResult<Vec<PacketRow>> {
    Ok(sqlx::query_as(
        "SELECT sequence, id, digest, kind, promotion_id, deployment_id, envelope, recorded_at
         FROM evidence_packets WHERE recorded_at >= $1 AND recorded_at <= $2 ORDER BY sequence",
    )
    .bind(from_ms)
    .bind(to_ms)
    .fetch_all(&state.db)
    .await?)
}

/// `from`/`to` as RFC 3339 (inclusive); absent: the beginning / now.
pub fn window(from: Option<&str>, to: Option<&str>) -> ApiResult<(i64, i64)> {
    let parse = |what: &str, s: &str| crate::environments::parse_time(what, s);
    Ok((
        from.map(|f| parse("from", f)).transpose()?.unwrap_or(0),
        to.map(|t| parse("to", t)).transpose()?.unwrap_or(i64::MAX),
    ))
}

pub async fn list(state: &AppState, from_ms: i64, to_ms: i64) -> ApiResult<Vec<EvidenceSummary>> {
    rows(state, from_ms, to_ms)
        .await?
        .iter()
        .map(summary_from)
        .collect()
}

pub async fn show(state: &AppState, id: &str) -> ApiResult<EvidenceDetail> {
    let row: Option<PacketRow> = sqlx::query_as(
        "SELECT sequence, id, digest, kind, promotion_id, deployment_id, envelope, recorded_at
         FROM evidence_packets WHERE id = $1 OR deployment_id = $2 OR promotion_id = $3
         ORDER BY sequence DESC LIMIT 1",
    )
    .bind(id)
    .bind(id)
    .bind(id)
    .fetch_optional(&state.db)
    .await?;
    let row = row.ok_or_else(|| ApiError::NotFound(format!("evidence {id:?} not found")))?;
    let packet = packet_from(&row)?;
    Ok(EvidenceDetail {
        summary: summary_from(&row)?,
        rendered: stella_evidence::render_packet(&packet),
        packet,
    })
}

/// A self-contained bundle of the packets recorded in the window, with every key and
/// certificate needed to verify it offline.
pub async fn export(state: &AppState, from_ms: i64, to_ms: i64) -> ApiResult<Bundle> {
    let packets: Vec<SignedPacket> = rows(state, from_ms, to_ms)
        .await?
        .iter()
        .map(packet_from)
        .collect::<ApiResult<_>>()?;
    if packets.is_empty() {
        return Err(ApiError::NotFound(
            "no evidence was recorded in that window".to_string(),
        ));
    }
    let keys: Vec<(String, i64, Option<i64>)> =
        sqlx::query_as("SELECT public_key, valid_from, valid_until FROM evidence_keys")
            .fetch_all(&state.db)
            .await?;
    let evidence_keys = keys
        .into_iter()
        .map(|(public, from, until)| {
            Ok(EvidenceKey {
                key: serde_json::from_str(&public).map_err(internal)?,
                valid_from: to_time(from)?,
                valid_until: until.map(to_time).transpose()?,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let mut agent_certificates = Vec::new();
    for fingerprint in stella_evidence::required_agent_certificates(&packets).map_err(internal)? {
        let pem: Option<(String,)> =
            sqlx::query_as("SELECT cert_pem FROM agent_certificates WHERE fingerprint = $1")
                .bind(&fingerprint)
                .fetch_optional(&state.db)
                .await?;
        if let Some((pem,)) = pem {
            agent_certificates.push(pem);
        }
    }
    let ca_certificates = state
        .keys
        .cas()
        .trusted()
        .iter()
        .map(|ca| ca.cert_pem().to_string())
        .collect();
    Bundle::export(
        BundleContents {
            trust_domain: state.keys.trust_domain.clone(),
            evidence_keys,
            ca_certificates,
            agent_certificates,
            packets,
        },
        OffsetDateTime::now_utc(),
        state.keys.evidence_key(),
    )
    .map_err(|e| ApiError::Unprocessable(format!("evidence export: {e}")))
}

/// The public evidence keys, to pin when verifying a bundle.
pub fn public_keys(state: &AppState) -> Vec<stella_pki::PublicKeyRecord> {
    vec![state.keys.evidence_key().public_key()]
}

pub async fn audit(
    state: &AppState,
    from_ms: i64,
    to_ms: i64,
) -> ApiResult<Vec<stella_evidence::AuditRow>> {
    let packets: Vec<SignedPacket> = rows(state, from_ms, to_ms)
        .await?
        .iter()
        .map(packet_from)
        .collect::<ApiResult<_>>()?;
    stella_evidence::audit_rows(&packets).map_err(internal)
}
