//! Air-gap files, for relays with no link at all (their shapes: `stella_proto::airgap`).
//!
//! - Jobs, plane → relay (`stella airgap export --relay R`): a DSSE envelope signed by the
//!   plane's job-signing key over the jobs waiting for the agents behind R (each job is itself a
//!   signed envelope the leaf verifies as usual). `relay import` checks the signature against
//!   the keys pinned at enrollment and that the file is for this relay, then stores the jobs as
//!   offers.
//! - Results, relay → plane (`relay export-results`): what the leaves sent (results with their
//!   receipts, inventory, acceptances), their certificates and hellos, signed with the relay's
//!   own key. The plane feeds each leaf's messages through its ordinary session code, so every
//!   receipt is checked against the leaf's certificates; a result already known changes nothing.

use std::path::Path;

use anyhow::{Context as _, bail};
use prost::Message as _;
use stella_proto::airgap::{
    JOBS_PAYLOAD_TYPE, JobsDocument, LeafMessages, RESULTS_FORMAT, ResultsDocument, SignedResults,
};
use stella_proto::plane_message::Body as PlaneBody;
use stella_proto::{JobOffer, PlaneMessage, TargetInfo, Welcome};

use super::store::{LeafRecord, Store, b64_encode};
use crate::config::{DataDir, write_atomic};

/// What `relay import` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub agents: usize,
    pub new_jobs: usize,
    pub known_jobs: usize,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Verifies a jobs file from the plane and stores its jobs for the leaves. Nothing is stored
/// unless the whole file verifies.
pub fn import_jobs(dir: &DataDir, store: &Store, file: &Path) -> anyhow::Result<ImportSummary> {
    let config = dir.load_config()?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let envelope: stella_pki::Envelope = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an air-gap jobs file (DSSE JSON)", file.display()))?;
    let trusted = dir.load_trust()?;
    let payload = trusted
        .verify(&envelope, JOBS_PAYLOAD_TYPE)
        .with_context(|| format!("{}: signature check failed", file.display()))?;
    let doc: JobsDocument = serde_json::from_slice(&payload)
        .with_context(|| format!("{}: malformed jobs document", file.display()))?;
    doc.check_format()
        .with_context(|| file.display().to_string())?;
    if doc.relay_id != config.agent_id {
        bail!(
            "{} is for relay {}, this is {}",
            file.display(),
            doc.relay_id,
            config.agent_id
        );
    }
    for agent in &doc.agents {
        if !stella_pki::is_valid_agent_id(&agent.agent_id) {
            bail!("{}: invalid agent id {:?}", file.display(), agent.agent_id);
        }
    }
    let mut summary = ImportSummary {
        agents: doc.agents.len(),
        ..Default::default()
    };
    for agent in doc.agents {
        remember_targets(store, &agent.agent_id, &agent.targets)?;
        for job in agent.jobs {
            let offer = JobOffer {
                job_id: job.job_id,
                envelope: job.envelope.into_bytes(),
            };
            if store.put_offer(&agent.agent_id, &offer)? {
                summary.new_jobs += 1;
            } else {
                summary.known_jobs += 1;
            }
        }
    }
    Ok(summary)
}

/// The targets of a leaf go into the welcome the relay serves it offline.
fn remember_targets(
    store: &Store,
    agent_id: &str,
    targets: &[stella_proto::airgap::AirgapTarget],
) -> anyhow::Result<()> {
    let mut record = store.leaf(agent_id).unwrap_or(LeafRecord {
        agent_id: agent_id.to_string(),
        cert_der: Vec::new(),
        hello: Vec::new(),
        welcome: Vec::new(),
        moved_away: false,
    });
    let mut welcome = PlaneMessage::decode(record.welcome.as_slice())
        .ok()
        .and_then(|m| match m.body {
            Some(PlaneBody::Welcome(w)) => Some(w),
            _ => None,
        })
        .unwrap_or_else(|| Welcome {
            agent_id: agent_id.to_string(),
            heartbeat_interval_ms: 10_000,
            ..Default::default()
        });
    welcome.targets = targets
        .iter()
        .map(|t| TargetInfo {
            name: t.name.clone(),
            kind: t.kind.clone(),
            config_json: t.config_json.clone(),
        })
        .collect();
    record.welcome = PlaneMessage {
        body: Some(PlaneBody::Welcome(welcome)),
    }
    .encode_to_vec();
    store.put_leaf(&record)?;
    Ok(())
}

/// What `export-results` wrote.
#[derive(Debug, Default)]
pub struct ExportSummary {
    pub agents: usize,
    pub messages: usize,
    pub results: usize,
}

/// Writes everything the leaves sent that the plane has not acknowledged, signed by the relay,
/// and moves it out of the backlog (copies stay under `relay/exported/`).
pub fn export_results(dir: &DataDir, store: &Store, out: &Path) -> anyhow::Result<ExportSummary> {
    let config = dir.load_config()?;
    let ident = crate::identity::load(dir)?;
    let mut summary = ExportSummary::default();
    let mut leaves = Vec::new();
    let mut exported_paths = Vec::new();
    for agent_id in store.outbox_agents() {
        let Some(record) = store.leaf(&agent_id).filter(|r| !r.cert_der.is_empty()) else {
            tracing::warn!(
                agent_id,
                "messages of an agent without a known certificate left in the store"
            );
            continue;
        };
        let pending = store.outbox(&agent_id);
        if pending.is_empty() {
            continue;
        }
        summary.agents += 1;
        summary.messages += pending.len();
        summary.results += pending.iter().filter(|p| p.is_result).count();
        leaves.push(LeafMessages {
            agent_id: agent_id.clone(),
            cert_der: b64_encode(&record.cert_der),
            hello: b64_encode(&record.hello),
            messages: pending
                .iter()
                .map(|p| b64_encode(&p.message.encode_to_vec()))
                .collect(),
        });
        exported_paths.extend(pending.into_iter().map(|p| (agent_id.clone(), p.path)));
    }
    let doc = ResultsDocument {
        relay_id: config.agent_id.clone(),
        created_at_unix_ms: now_ms(),
        leaves,
    };
    let payload = serde_json::to_vec(&doc)?;
    let signature = stella_pki::sign_with_agent_key(&ident.key_pem, &payload)?;
    let file = SignedResults {
        format: RESULTS_FORMAT.to_string(),
        relay_cert_pem: ident.cert_pem.clone(),
        payload: b64_encode(&payload),
        signature: b64_encode(&signature),
    };
    write_atomic(out, &serde_json::to_vec_pretty(&file)?)
        .with_context(|| format!("writing {}", out.display()))?;
    // Written and synced: the backlog may now let go of it.
    let batch = store
        .root()
        .join("exported")
        .join(doc.created_at_unix_ms.to_string());
    for (agent_id, path) in exported_paths {
        let target = batch.join(&agent_id);
        std::fs::create_dir_all(&target)?;
        if let Some(name) = path.file_name() {
            std::fs::rename(&path, target.join(name))?;
        }
    }
    Ok(summary)
}
