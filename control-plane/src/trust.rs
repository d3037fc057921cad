//! Trust bundles and job-signing key rotation with overlap.
//!
//! `start` stages a new key and publishes a bundle trusting both keys, signed by the current one;
//! agents verify it with what they already trust and acknowledge it. `finish` — only once every
//! agent that is not revoked has acknowledged (or with `force`) — switches signing to the new key,
//! re-signs the jobs not yet accepted, and publishes a bundle with the new key alone, signed by
//! both keys so that an agent that slept through the overlap still adopts it. Running jobs are
//! never interrupted: an accepted job was verified already.
//!
//! With the keys sealed in the database (replicas sharing one database), each step first
//! reloads the keys from there ([`reload_shared_keys`]), stages a key with insert-if-absent and
//! read-back, and finishes by moving the staged row onto the active one in one transaction, so
//! the same step run through two replicas, or twice, has the effect of one.

use serde::{Deserialize, Serialize};
use stella_pki::{SigningKey, TrustBundleDocument};

use crate::error::{ApiError, ApiResult};
use crate::keys::{CaSet, JOB_KEY_FILE, JobKeys, NEXT_JOB_KEY_FILE};
use crate::sealed_keys::SealedKeysError;
use crate::state::AppState;
use crate::store::{Db, now_ms};

/// The newest bundle: version and signed envelope (JSON).
pub async fn current(db: &Db) -> Result<Option<(u64, String)>, sqlx::Error> {
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT version, document FROM trust_bundles ORDER BY version DESC LIMIT 1")
            .fetch_optional(db)
            .await?;
    Ok(row.map(|(v, d)| (v as u64, d)))
}

/// The newest bundle's version and its document (for enrollment answers).
pub async fn current_document(state: &AppState) -> ApiResult<(u64, TrustBundleDocument)> {
    let (version, json) = current(&state.db)
        .await?
        .ok_or_else(|| ApiError::Internal("no trust bundle".to_string()))?;
    let env: stella_pki::Envelope =
        serde_json::from_str(&json).map_err(|e| ApiError::Internal(e.to_string()))?;
    let body = stella_pki::decode_payload(&env).map_err(|e| ApiError::Internal(e.to_string()))?;
    let doc = serde_json::from_slice(&body).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((version, doc))
}

/// Publishes a bundle signed by every key in `signers` (the outgoing key countersigns the final
/// bundle of a rotation, so an agent that missed the overlap can still adopt it).
async fn publish(
    state: &AppState,
    signers: &[&SigningKey],
    keys: Vec<stella_pki::PublicKeyRecord>,
) -> ApiResult<u64> {
    let version = current(&state.db).await?.map(|(v, _)| v).unwrap_or(0) + 1;
    let doc = TrustBundleDocument {
        version,
        job_signing_keys: keys,
        ca_pems: state
            .keys
            .cas()
            .trusted()
            .iter()
            .map(|ca| ca.cert_pem().to_string())
            .collect(),
    };
    let mut env: Option<stella_pki::Envelope> = None;
    for signer in signers {
        let signed =
            stella_pki::sign_bundle(signer, &doc).map_err(|e| ApiError::Internal(e.to_string()))?;
        match env.as_mut() {
            Some(e) => e.signatures.extend(signed.signatures),
            None => env = Some(signed),
        }
    }
    let env = env.ok_or_else(|| ApiError::Internal("a bundle needs a signer".to_string()))?;
    let json = serde_json::to_string(&env).map_err(|e| ApiError::Internal(e.to_string()))?;
    sqlx::query("INSERT INTO trust_bundles (version, document, created_at) VALUES ($1, $2, $3)")
        .bind(version as i64)
        .bind(&json)
        .bind(now_ms())
        .execute(&state.db)
        .await?;
    state.trust_changed();
    tracing::info!(version, "trust bundle published");
    Ok(version)
}

fn bundle_keys(keys: &JobKeys) -> Vec<stella_pki::PublicKeyRecord> {
    let mut out = vec![keys.active.public_key()];
    out.extend(keys.next.as_ref().map(SigningKey::public_key));
    out
}

/// Makes sure a first bundle exists (first start, or a data directory from before bundles).
pub async fn ensure_initial_bundle(state: &AppState) -> ApiResult<()> {
    if current(&state.db).await?.is_none() {
        let keys = state.keys.job_keys();
        publish(state, &[&keys.active], bundle_keys(&keys)).await?;
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentTrust {
    pub id: String,
    pub name: String,
    pub trust_bundle_version: u64,
    pub up_to_date: bool,
    /// Whether the agent's current certificate comes from the newest CA.
    pub on_newest_ca: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrustStatus {
    pub bundle_version: u64,
    pub ca_fingerprint: String,
    /// The CA being rolled out, during a CA rotation.
    pub next_ca_fingerprint: Option<String>,
    /// `idle` or `rotating` (a new key is staged and being distributed).
    pub phase: String,
    pub active_key_id: String,
    pub next_key_id: Option<String>,
    pub agents: Vec<AgentTrust>,
}

pub async fn status(state: &AppState) -> ApiResult<TrustStatus> {
    let keys = state.keys.job_keys();
    let version = current(&state.db).await?.map(|(v, _)| v).unwrap_or(0);
    let rows: Vec<(String, String, i64, String)> = sqlx::query_as(
        "SELECT id, name, trust_bundle_version, cert_pem FROM agents WHERE status != 'revoked' ORDER BY enrolled_at, id",
    )
    .fetch_all(&state.db)
    .await?;
    let cas = state.keys.cas();
    let newest = cas.issuing();
    Ok(TrustStatus {
        bundle_version: version,
        ca_fingerprint: cas.active.fingerprint(),
        next_ca_fingerprint: cas.next.as_ref().map(|c| c.fingerprint()),
        phase: if keys.next.is_some() {
            "rotating"
        } else {
            "idle"
        }
        .to_string(),
        active_key_id: keys.active.key_id().to_string(),
        next_key_id: keys.next.as_ref().map(|k| k.key_id().to_string()),
        agents: rows
            .into_iter()
            .map(|(id, name, v, cert_pem)| AgentTrust {
                on_newest_ca: stella_pki::cert_der_from_pem(&cert_pem)
                    .map(|der| newest.verify_issued(&der).is_ok())
                    .unwrap_or(false),
                id,
                name,
                trust_bundle_version: v as u64,
                up_to_date: v as u64 >= version,
            })
            .collect(),
    })
}

fn sealed_err(e: SealedKeysError) -> ApiError {
    match e {
        SealedKeysError::Conflict(message) => ApiError::Conflict(message),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Re-reads the keys sealed in the database and swaps in those that differ from this process's:
/// the job-signing keys, the CAs (re-issuing this replica's server certificate and rewriting
/// `pki/ca.pem` when the active CA changed) and the TLS configurations. Returns whether anything
/// changed; always `Ok(false)` when the keys are files (one plane, nothing shared). When the
/// signing key changed, waiting jobs signed with another key are signed again with it. Call it
/// when another replica may have changed the keys (a trust-bundle change it announced); the
/// rotation steps below call it first.
pub async fn reload_shared_keys(state: &AppState) -> ApiResult<bool> {
    let _changes = state.keys.lock_changes().await;
    reload_locked(state).await
}

/// [`reload_shared_keys`] for a caller that holds the key-change lock.
async fn reload_locked(state: &AppState) -> ApiResult<bool> {
    let Some(store) = state.keys.sealed() else {
        return Ok(false);
    };
    let stored = store.material().await.map_err(sealed_err)?;
    let mut changed = false;

    let keys = state.keys.job_keys();
    let next_id = |k: &Option<SigningKey>| k.as_ref().map(|k| k.key_id().to_string());
    let signing_changed = keys.active.key_id() != stored.job.key_id();
    if signing_changed || next_id(&keys.next) != next_id(&stored.next_job) {
        state.keys.set_job_keys(JobKeys {
            active: stored.job.clone(),
            next: stored.next_job.clone(),
        });
        changed = true;
    }
    if signing_changed {
        // Jobs this replica signed with the withdrawn key after another replica finished the
        // rotation (before this reload) would be refused by agents that adopted the final
        // bundle: sign them again, as finishing does.
        resign_waiting_jobs(state, &stored.job).await?;
    }

    let cas = state.keys.cas();
    let fingerprint = |c: &Option<std::sync::Arc<stella_pki::CertificateAuthority>>| {
        c.as_ref().map(|c| c.fingerprint())
    };
    let active_changed = cas.active.fingerprint() != stored.ca.fingerprint();
    if active_changed || fingerprint(&cas.next) != fingerprint(&stored.next_ca) {
        state.keys.set_cas(CaSet {
            active: stored.ca.clone(),
            next: stored.next_ca.clone(),
        });
        if active_changed {
            present_active_ca(state, &cas.active)?;
        } else {
            state.tls.rebuild(&state.keys, &state.handshake_refusals)?;
        }
        changed = true;
    }
    if changed {
        let cas = state.keys.cas();
        let keys = state.keys.job_keys();
        tracing::info!(
            ca = %cas.active.fingerprint(),
            next_ca = fingerprint(&cas.next).unwrap_or_default(),
            job_key = keys.active.key_id(),
            next_job_key = next_id(&keys.next).unwrap_or_default(),
            "reloaded the plane keys another replica changed"
        );
    }
    Ok(changed)
}

/// Presents a server certificate from the newly active CA (sealed mode) in an order that keeps
/// `pki/ca.pem`, which the CLI trusts, valid for the certificate served at every moment: the
/// file trusts both CAs while the certificate changes, then the new CA alone. (Written in the
/// other order, a CLI call to a replica reloading a rotation another replica finished could
/// find the new CA in the file and the old certificate on the wire.)
fn present_active_ca(
    state: &AppState,
    previous: &stella_pki::CertificateAuthority,
) -> ApiResult<()> {
    let internal = |e: crate::keys::KeysError| ApiError::Internal(e.to_string());
    state.keys.write_ca_pem(Some(previous)).map_err(internal)?;
    state.keys.reissue_server().map_err(internal)?;
    state.tls.rebuild(&state.keys, &state.handshake_refusals)?;
    state.keys.write_ca_pem(None).map_err(internal)
}

fn write_key(state: &AppState, file: &str, key: &SigningKey) -> ApiResult<()> {
    let pem = key.to_pem()?;
    stella_pki::write_secret_file(&state.keys.pki_dir.join(file), pem.as_bytes())
        .map_err(|e| ApiError::Internal(format!("writing {file}: {e}")))
}

/// Stages a new job-signing key and distributes it. Idempotent while a rotation is under way.
pub async fn rotate_start(state: &AppState) -> ApiResult<TrustStatus> {
    let _changes = state.keys.lock_changes().await;
    reload_locked(state).await?;
    let mut keys = state.keys.job_keys();
    if keys.next.is_none() {
        let generated = SigningKey::generate();
        // Stored before anyone is told about it: a restart keeps the rotation going.
        let next = match state.keys.sealed() {
            // Another replica may have staged one a moment ago: then that one is the next key,
            // and that replica publishes its bundle.
            Some(store) => store
                .stage_signing_key(crate::sealed_keys::NEXT_JOB_KEY, &generated)
                .await
                .map_err(sealed_err)?,
            None => {
                write_key(state, NEXT_JOB_KEY_FILE, &generated)?;
                generated.clone()
            }
        };
        let ours = next.key_id() == generated.key_id();
        keys.next = Some(next);
        state.keys.set_job_keys(keys.clone());
        if ours {
            publish(state, &[&keys.active], bundle_keys(&keys)).await?;
            tracing::warn!(
                next_key = keys.next.as_ref().map(|k| k.key_id()).unwrap_or_default(),
                "job-signing key rotation started"
            );
        }
    }
    status(state).await
}

/// Switches signing to the staged key once every agent has it, re-signs waiting jobs, and
/// withdraws the old key.
pub async fn rotate_finish(state: &AppState, force: bool) -> ApiResult<TrustStatus> {
    let _changes = state.keys.lock_changes().await;
    reload_locked(state).await?;
    let keys = state.keys.job_keys();
    let Some(next) = keys.next.clone() else {
        return Err(ApiError::Conflict(
            "no key rotation is under way; run `stella keys rotate start` first".to_string(),
        ));
    };
    let before = status(state).await?;
    let lagging: Vec<String> = before
        .agents
        .iter()
        .filter(|a| !a.up_to_date)
        .map(|a| {
            format!(
                "{} ({}) has bundle {}",
                a.name, a.id, a.trust_bundle_version
            )
        })
        .collect();
    if !lagging.is_empty() && !force {
        return Err(ApiError::Conflict(format!(
            "{} agent(s) do not trust the new key yet (bundle {}): {}; wait for them to connect, or --force (the final bundle is countersigned by the old key, so they adopt it when they return)",
            lagging.len(),
            before.bundle_version,
            lagging.join("; ")
        )));
    }
    // The new key becomes the signing key in storage first; a crash after this point restarts
    // with the new key active and the bundle below is published again by `finish`.
    match state.keys.sealed() {
        Some(store) => {
            if !store
                .promote_signing_key(next.key_id())
                .await
                .map_err(sealed_err)?
            {
                // Another replica finished this rotation between our reload and now.
                reload_locked(state).await?;
                return status(state).await;
            }
        }
        None => {
            write_key(state, JOB_KEY_FILE, &next)?;
            let _ = std::fs::remove_file(state.keys.pki_dir.join(NEXT_JOB_KEY_FILE));
        }
    }
    state.keys.set_job_keys(JobKeys {
        active: next.clone(),
        next: None,
    });
    resign_waiting_jobs(state, &next).await?;
    publish(state, &[&next, &keys.active], vec![next.public_key()]).await?;
    tracing::warn!(
        active_key = next.key_id(),
        "job-signing key rotation finished"
    );
    status(state).await
}

/// Jobs not yet accepted by their agent are signed again with the new key (same payload, same
/// sequence), so nothing waiting is stranded by the rotation. Jobs signed by that key alone
/// already are left as they are.
async fn resign_waiting_jobs(state: &AppState, key: &SigningKey) -> ApiResult<()> {
    let mut tx = crate::store::write_tx(&state.db).await?;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT id, envelope FROM jobs WHERE status IN ('queued', 'offered')")
            .fetch_all(&mut *tx)
            .await?;
    for (id, envelope) in rows {
        let env: stella_pki::Envelope =
            serde_json::from_str(&envelope).map_err(|e| ApiError::Internal(e.to_string()))?;
        if !env.signatures.is_empty() && env.signatures.iter().all(|s| s.keyid == key.key_id()) {
            continue;
        }
        let body =
            stella_pki::decode_payload(&env).map_err(|e| ApiError::Internal(e.to_string()))?;
        let payload: stella_pki::JobPayload =
            serde_json::from_slice(&body).map_err(|e| ApiError::Internal(e.to_string()))?;
        let resigned = stella_pki::sign_job(key, &payload)?;
        let json =
            serde_json::to_string(&resigned).map_err(|e| ApiError::Internal(e.to_string()))?;
        sqlx::query("UPDATE jobs SET envelope = $1, updated_at = $2 WHERE id = $3")
            .bind(&json)
            .bind(now_ms())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub async fn record_ack(state: &AppState, agent_id: &str, version: u64) -> ApiResult<()> {
    sqlx::query(
        "UPDATE agents SET trust_bundle_version = $1 WHERE id = $2 AND trust_bundle_version < $3",
    )
    .bind(version as i64)
    .bind(agent_id)
    .bind(version as i64)
    .execute(&state.db)
    .await?;
    Ok(())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RotateRequest {
    /// `start` or `finish`.
    pub phase: String,
    #[serde(default)]
    pub force: bool,
}

pub async fn rotate(state: &AppState, req: RotateRequest) -> ApiResult<TrustStatus> {
    match req.phase.as_str() {
        "start" => rotate_start(state).await,
        "finish" => rotate_finish(state, req.force).await,
        other => Err(ApiError::BadRequest(format!(
            "unknown rotation phase {other:?}; expected start or finish"
        ))),
    }
}

/// Stages a new CA: agents trust it next to the current one and renew under it.
pub async fn rotate_ca_start(state: &AppState) -> ApiResult<TrustStatus> {
    let _changes = state.keys.lock_changes().await;
    reload_locked(state).await?;
    let mut cas = state.keys.cas();
    if cas.next.is_none() {
        let name = format!(
            "Stella control plane CA {}",
            crate::store::rfc3339(now_ms())
        );
        let generated = stella_pki::CertificateAuthority::generate(&name)?;
        let generated_fingerprint = generated.fingerprint();
        let next = match state.keys.sealed() {
            // As for job keys: the first replica's staged CA wins, and that replica publishes.
            Some(store) => store
                .stage_ca(crate::sealed_keys::NEXT_CA, &generated)
                .await
                .map_err(sealed_err)?,
            None => {
                crate::keys::store_ca(
                    &state.keys.pki_dir,
                    &generated,
                    crate::keys::NEXT_CA_CERT_FILE,
                    crate::keys::NEXT_CA_KEY_FILE,
                )
                .map_err(|e| ApiError::Internal(e.to_string()))?;
                generated
            }
        };
        let ours = next.fingerprint() == generated_fingerprint;
        cas.next = Some(std::sync::Arc::new(next));
        state.keys.set_cas(cas.clone());
        state.tls.rebuild(&state.keys, &state.handshake_refusals)?;
        if !ours {
            return status(state).await;
        }
        let keys = state.keys.job_keys();
        publish(state, &[&keys.active], bundle_keys(&keys)).await?;
        tracing::warn!(
            next_ca = cas
                .next
                .as_ref()
                .map(|c| c.fingerprint())
                .unwrap_or_default(),
            "CA rotation started"
        );
    }
    status(state).await
}

/// Makes the new CA the only one once every agent holds a certificate from it (or `force`):
/// the server certificate switches, the old CA leaves the trust bundle.
pub async fn rotate_ca_finish(state: &AppState, force: bool) -> ApiResult<TrustStatus> {
    let _changes = state.keys.lock_changes().await;
    reload_locked(state).await?;
    let cas = state.keys.cas();
    let Some(next) = cas.next.clone() else {
        return Err(ApiError::Conflict(
            "no CA rotation is under way; run `stella ca rotate start` first".to_string(),
        ));
    };
    let before = status(state).await?;
    let lagging: Vec<String> = before
        .agents
        .iter()
        .filter(|a| !a.on_newest_ca)
        .map(|a| format!("{} ({})", a.name, a.id))
        .collect();
    if !lagging.is_empty() && !force {
        return Err(ApiError::Conflict(format!(
            "{} agent(s) still hold a certificate from the old CA: {}; wait for them to renew, or --force (they will need a new join token)",
            lagging.len(),
            lagging.join("; ")
        )));
    }
    match state.keys.sealed() {
        Some(store) => {
            if !store
                .promote_ca(&next.fingerprint())
                .await
                .map_err(sealed_err)?
            {
                // Another replica finished this rotation between our reload and now.
                reload_locked(state).await?;
                return status(state).await;
            }
        }
        None => {
            let dir = &state.keys.pki_dir;
            crate::keys::store_ca(
                dir,
                &next,
                crate::keys::CA_CERT_FILE,
                crate::keys::CA_KEY_FILE,
            )
            .map_err(|e| ApiError::Internal(e.to_string()))?;
            let _ = std::fs::remove_file(dir.join(crate::keys::NEXT_CA_CERT_FILE));
            let _ = std::fs::remove_file(dir.join(crate::keys::NEXT_CA_KEY_FILE));
        }
    }
    let previous = state.keys.ca();
    state.keys.set_cas(CaSet {
        active: next,
        next: None,
    });
    if state.keys.sealed().is_some() {
        present_active_ca(state, &previous)?;
    } else {
        // File mode wrote ca.pem with the CA above (it is the CA's own file).
        state
            .keys
            .reissue_server()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        state.tls.rebuild(&state.keys, &state.handshake_refusals)?;
    }
    let keys = state.keys.job_keys();
    publish(state, &[&keys.active], bundle_keys(&keys)).await?;
    tracing::warn!(ca = state.keys.ca().fingerprint(), "CA rotation finished");
    status(state).await
}

pub async fn rotate_ca(state: &AppState, req: RotateRequest) -> ApiResult<TrustStatus> {
    match req.phase.as_str() {
        "start" => rotate_ca_start(state).await,
        "finish" => rotate_ca_finish(state, req.force).await,
        other => Err(ApiError::BadRequest(format!(
            "unknown rotation phase {other:?}; expected start or finish"
        ))),
    }
}
