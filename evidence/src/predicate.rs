//! What a packet says: the in-toto Statement v1 and Stella's evidence predicate.
//!
//! The same validation runs when the plane builds a packet (a malformed one is refused before
//! anything is signed) and when a bundle is verified (a signed packet can still be wrong if the
//! key signed something malformed, or if an older writer had a bug).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use stella_pki::{Envelope, RECEIPT_PAYLOAD_TYPE, ReceiptPayload, decode_payload};
use time::OffsetDateTime;

use crate::EvidenceError;

/// `_type` of an in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// `predicateType` of a Stella evidence packet; the `v1` moves when the predicate's meaning does.
pub const PREDICATE_TYPE: &str = "https://stella.dev/evidence/v1";
/// DSSE `payloadType` of a packet envelope, as in-toto prescribes for statements.
pub const PACKET_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// An in-toto Statement v1 whose predicate is a Stella evidence predicate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// One per release component: the artifacts this evidence is about.
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    pub predicate: EvidencePredicate,
}

/// An in-toto resource descriptor reduced to what Stella subjects carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// The component name.
    pub name: String,
    /// Algorithm → lowercase hex; Stella writes exactly `{"sha256": …}`.
    pub digest: BTreeMap<String, String>,
}

/// The predicate: the chain position plus what the plane recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidencePredicate {
    /// 1 for the first packet of a plane, then +1 for each packet, without gaps.
    pub sequence: u64,
    /// Digest (see [`crate::packet_digest`]) of the packet with `sequence - 1`; null for the first.
    pub previous: Option<String>,
    #[serde(flatten)]
    pub content: PacketContent,
}

/// Which decision a packet records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PacketKind {
    PromotionDecision,
    Deployment,
    Rollback,
}

impl PacketKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PromotionDecision => "promotion_decision",
            Self::Deployment => "deployment",
            Self::Rollback => "rollback",
        }
    }
}

impl std::fmt::Display for PacketKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything the plane states in a packet; the chain adds sequence and previous digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PacketContent {
    pub kind: PacketKind,
    /// The promotion this packet belongs to, if any (audit rows are keyed by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion_id: Option<String>,
    /// The deployment this packet belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    pub release: Release,
    pub environment: String,
    #[serde(default)]
    pub targets: Vec<TargetRef>,
    pub actors: Actors,
    /// Required for promotion decisions: why the release was (not) let in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    /// Required for deployments and rollbacks: how it was carried out, with agent receipts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execution: Option<Execution>,
    /// Only for rollbacks: the release rolled back from and the one rolled back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<PreviousState>,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub name: String,
    pub components: Vec<Component>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    /// Image repository, without tag or digest.
    pub image: String,
    /// `sha256:<64 lowercase hex>`.
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRef {
    pub name: String,
    /// Executor kind (docker, compose, ssh, …).
    pub kind: String,
    /// The agent that serves the target.
    pub agent_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actors {
    pub requester: String,
    #[serde(default)]
    pub approvers: Vec<Approval>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub user: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(default)]
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// e.g. `approved`, `rejected`.
    pub outcome: String,
    #[serde(default)]
    pub gates: Vec<GateResult>,
    /// `sha256:` of the policy that decided, when a policy took part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_digest: Option<String>,
    /// `sha256:` of the canonical decision input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateResult {
    pub gate: String,
    /// e.g. `passed`, `failed`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    pub workflow_run: String,
    /// e.g. `succeeded`, `failed`.
    pub outcome: String,
    pub jobs: Vec<JobEvidence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvidence {
    pub job_id: String,
    pub agent_id: String,
    /// Name of one of the packet's targets.
    pub target: String,
    /// The job's final status; must equal the status its receipt attests.
    pub status: String,
    /// `sha256:` of the signed job envelope as the plane stored and offered it
    /// (`stella_pki::envelope_digest`). When present, the receipt must answer this very envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_envelope_digest: Option<String>,
    /// The agent's receipt: a DSSE envelope signed with its certificate key.
    pub receipt: Envelope,
    /// `sha256:` digests of the job's logs.
    #[serde(default)]
    pub log_digests: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousState {
    /// What ran before the rollback.
    pub from: Release,
    /// What the rollback restored; equal to the packet's `release`.
    pub to: Release,
}

/// The subjects a packet about `release` carries: one per component, digest without prefix.
pub fn subjects_for(release: &Release) -> Vec<Subject> {
    release
        .components
        .iter()
        .map(|c| Subject {
            name: c.name.clone(),
            digest: BTreeMap::from([(
                "sha256".to_string(),
                c.digest
                    .strip_prefix("sha256:")
                    .unwrap_or(&c.digest)
                    .to_string(),
            )]),
        })
        .collect()
}

/// Whether `s` is `sha256:` followed by 64 lowercase hex digits.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn require_text(field: &str, value: &str) -> Result<(), EvidenceError> {
    if value.trim().is_empty() {
        return Err(EvidenceError::invalid(field, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(EvidenceError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn require_digest(field: &str, value: &str) -> Result<(), EvidenceError> {
    if is_sha256_digest(value) {
        Ok(())
    } else {
        Err(EvidenceError::invalid(
            field,
            format!("{value:?} is not sha256:<64 lowercase hex>"),
        ))
    }
}

fn validate_release(field: &str, release: &Release) -> Result<(), EvidenceError> {
    require_text(&format!("{field}.name"), &release.name)?;
    if release.components.is_empty() {
        return Err(EvidenceError::invalid(
            format!("{field}.components"),
            "a release has at least one component",
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, c) in release.components.iter().enumerate() {
        let at = format!("{field}.components[{i}]");
        require_text(&format!("{at}.name"), &c.name)?;
        require_text(&format!("{at}.image"), &c.image)?;
        require_digest(&format!("{at}.digest"), &c.digest)?;
        if !seen.insert(c.name.as_str()) {
            return Err(EvidenceError::invalid(
                format!("{at}.name"),
                format!("component {:?} appears twice", c.name),
            ));
        }
    }
    Ok(())
}

impl PacketContent {
    /// Checks that the content is a well-formed packet of its kind. Receipts are only read here
    /// (they must name their job, agent and status); their signatures are checked by
    /// [`crate::verify_bundle`], which has the agent certificates.
    pub fn validate(&self) -> Result<(), EvidenceError> {
        validate_release("release", &self.release)?;
        require_text("environment", &self.environment)?;
        for (field, id) in [
            ("promotion_id", &self.promotion_id),
            ("deployment_id", &self.deployment_id),
        ] {
            if let Some(id) = id {
                require_text(field, id)?;
            }
        }
        let mut target_agents = BTreeMap::new();
        for (i, t) in self.targets.iter().enumerate() {
            require_text(&format!("targets[{i}].name"), &t.name)?;
            require_text(&format!("targets[{i}].kind"), &t.kind)?;
            require_text(&format!("targets[{i}].agent_id"), &t.agent_id)?;
            if target_agents
                .insert(t.name.as_str(), t.agent_id.as_str())
                .is_some()
            {
                return Err(EvidenceError::invalid(
                    format!("targets[{i}].name"),
                    format!("target {:?} appears twice", t.name),
                ));
            }
        }
        require_text("actors.requester", &self.actors.requester)?;
        for (i, a) in self.actors.approvers.iter().enumerate() {
            require_text(&format!("actors.approvers[{i}].user"), &a.user)?;
        }
        self.validate_kind_sections()?;
        if let Some(decision) = &self.decision {
            require_text("decision.outcome", &decision.outcome)?;
            for (i, g) in decision.gates.iter().enumerate() {
                require_text(&format!("decision.gates[{i}].gate"), &g.gate)?;
                require_text(&format!("decision.gates[{i}].status"), &g.status)?;
            }
            if let Some(d) = &decision.policy_digest {
                require_digest("decision.policy_digest", d)?;
            }
            if let Some(d) = &decision.input_hash {
                require_digest("decision.input_hash", d)?;
            }
        }
        if let Some(execution) = &self.execution {
            validate_execution(execution, &target_agents)?;
        }
        if let Some(state) = &self.previous_state {
            validate_release("previous_state.from", &state.from)?;
            validate_release("previous_state.to", &state.to)?;
            if state.to != self.release {
                return Err(EvidenceError::invalid(
                    "previous_state.to",
                    "must be the release the rollback restored (the packet's release)",
                ));
            }
        }
        Ok(())
    }

    fn validate_kind_sections(&self) -> Result<(), EvidenceError> {
        let kind = self.kind;
        let needs = |field: &str, present: bool, wanted: bool| match (present, wanted) {
            (false, true) => Err(EvidenceError::invalid(
                field,
                format!("a {kind} packet must have it"),
            )),
            (true, false) => Err(EvidenceError::invalid(
                field,
                format!("a {kind} packet must not have it"),
            )),
            _ => Ok(()),
        };
        let decision_wanted = kind == PacketKind::PromotionDecision;
        let execution_wanted = kind != PacketKind::PromotionDecision;
        needs("decision", self.decision.is_some(), decision_wanted)?;
        needs("execution", self.execution.is_some(), execution_wanted)?;
        needs(
            "previous_state",
            self.previous_state.is_some(),
            kind == PacketKind::Rollback,
        )
    }
}

fn validate_execution(
    execution: &Execution,
    target_agents: &BTreeMap<&str, &str>,
) -> Result<(), EvidenceError> {
    require_text("execution.workflow_run", &execution.workflow_run)?;
    require_text("execution.outcome", &execution.outcome)?;
    let mut seen = BTreeSet::new();
    for (i, job) in execution.jobs.iter().enumerate() {
        let at = format!("execution.jobs[{i}]");
        require_text(&format!("{at}.job_id"), &job.job_id)?;
        require_text(&format!("{at}.agent_id"), &job.agent_id)?;
        require_text(&format!("{at}.status"), &job.status)?;
        if !seen.insert(job.job_id.as_str()) {
            return Err(EvidenceError::invalid(
                format!("{at}.job_id"),
                format!("job {:?} appears twice", job.job_id),
            ));
        }
        match target_agents.get(job.target.as_str()) {
            None => {
                return Err(EvidenceError::invalid(
                    format!("{at}.target"),
                    format!("{:?} is not one of the packet's targets", job.target),
                ));
            }
            Some(agent) if *agent != job.agent_id => {
                return Err(EvidenceError::invalid(
                    format!("{at}.agent_id"),
                    format!(
                        "target {:?} is served by agent {agent:?}, not {:?}",
                        job.target, job.agent_id
                    ),
                ));
            }
            Some(_) => {}
        }
        if let Some(d) = &job.job_envelope_digest {
            require_digest(&format!("{at}.job_envelope_digest"), d)?;
        }
        for (j, d) in job.log_digests.iter().enumerate() {
            require_digest(&format!("{at}.log_digests[{j}]"), d)?;
        }
        let claimed = read_receipt(&job.receipt)
            .map_err(|reason| EvidenceError::invalid(format!("{at}.receipt"), reason))?;
        if let Some(mismatch) = receipt_mismatch(job, &claimed) {
            return Err(EvidenceError::invalid(format!("{at}.receipt"), mismatch));
        }
    }
    Ok(())
}

/// Reads what a receipt claims WITHOUT checking its signature.
pub(crate) fn read_receipt(receipt: &Envelope) -> Result<ReceiptPayload, String> {
    if receipt.payload_type != RECEIPT_PAYLOAD_TYPE {
        return Err(format!(
            "payload type is {:?}, not a Stella receipt",
            receipt.payload_type
        ));
    }
    let body = decode_payload(receipt).map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("receipt payload is not a receipt: {e}"))
}

/// What differs between the job as recorded and the receipt the agent signed for it.
pub(crate) fn receipt_mismatch(job: &JobEvidence, receipt: &ReceiptPayload) -> Option<String> {
    if receipt.job_id != job.job_id {
        return Some(format!(
            "receipt is for job {:?}, not {:?}",
            receipt.job_id, job.job_id
        ));
    }
    if receipt.agent_id != job.agent_id {
        return Some(format!(
            "receipt names agent {:?}, not {:?}",
            receipt.agent_id, job.agent_id
        ));
    }
    if let Some(offered) = &job.job_envelope_digest
        && receipt.envelope_digest != *offered
    {
        return Some(format!(
            "receipt answers job envelope {}, the packet records {offered}",
            receipt.envelope_digest
        ));
    }
    if receipt.status != job.status {
        return Some(format!(
            "receipt attests status {:?}, the packet records {:?}",
            receipt.status, job.status
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_shape() {
        let hex = "a".repeat(64);
        assert!(is_sha256_digest(&format!("sha256:{hex}")));
        assert!(!is_sha256_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_sha256_digest(&format!("sha512:{hex}")));
        assert!(!is_sha256_digest(&format!("sha256:{}", &hex[1..])));
        assert!(!is_sha256_digest(&hex));
    }

    #[test]
    fn subjects_carry_the_component_digests_without_prefix() {
        let release = Release {
            name: "r1".into(),
            components: vec![Component {
                name: "web".into(),
                image: "demo/web".into(),
                digest: format!("sha256:{}", "b".repeat(64)),
            }],
        };
        let json = serde_json::to_value(subjects_for(&release)).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"name": "web", "digest": {"sha256": "b".repeat(64)}}])
        );
    }
}
