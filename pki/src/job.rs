//! Signed jobs: what the plane sends, and the checks an agent runs offline before acting.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::PkiError;
use crate::dsse::{DsseError, Envelope, SigningKey, TrustedKeys};

pub const JOB_PAYLOAD_TYPE: &str = "application/vnd.stella.job.v1+json";
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPayload {
    pub job_id: String,
    /// Audience: the only agent allowed to run this job.
    pub agent_id: String,
    pub target: JobTarget,
    pub kind: JobKind,
    pub deployment_id: String,
    pub release_id: String,
    pub release_name: String,
    pub components: Vec<JobComponent>,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// Per agent, strictly increasing, starting at 1.
    pub sequence: u64,
    pub idempotency_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobTarget {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobComponent {
    pub name: String,
    pub image: String,
    pub digest: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Deploy,
}

/// Signs the JSON serialization of `job` as a DSSE envelope of type [`JOB_PAYLOAD_TYPE`].
pub fn sign_job(key: &SigningKey, job: &JobPayload) -> Result<Envelope, PkiError> {
    let payload = serde_json::to_vec(job)?;
    Ok(key.sign(JOB_PAYLOAD_TYPE, &payload))
}

/// `"sha256:<hex>"` of the envelope bytes exactly as received.
pub fn envelope_digest(envelope_json: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(envelope_json)))
}

/// Why an agent refused a job. Each variant maps to a stable [`JobRefusal::reason_code`] that is
/// reported back to the plane.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JobRefusal {
    #[error("job envelope is {len} bytes, more than the {max}-byte limit")]
    Oversized { len: usize, max: usize },
    #[error("malformed job: {0}")]
    Malformed(String),
    #[error("job is signed by key {0:?}, which this agent does not trust")]
    UnknownKeyId(String),
    #[error("job signature by key {0} does not verify")]
    BadSignature(String),
    #[error("job envelope has payload type {0:?}, expected {JOB_PAYLOAD_TYPE:?}")]
    WrongPayloadType(String),
    #[error("job is for agent {got}, not {expected}")]
    WrongAudience { expected: String, got: String },
    #[error("job targets a {kind:?} target, which this agent does not support")]
    UnsupportedTarget { kind: String },
    #[error("job expired at {not_after}")]
    Expired { not_after: String },
    #[error("job sequence {sequence} is not after the last accepted sequence {last} (replay)")]
    Replayed { sequence: u64, last: u64 },
    #[error(
        "component {component:?} has invalid digest {digest:?}: expected sha256:<64 lowercase hex>"
    )]
    InvalidDigest { component: String, digest: String },
}

impl JobRefusal {
    pub fn reason_code(&self) -> &'static str {
        match self {
            JobRefusal::Oversized { .. } => "oversized",
            JobRefusal::Malformed(_) => "malformed",
            JobRefusal::UnknownKeyId(_) => "unknown_key_id",
            JobRefusal::BadSignature(_) => "bad_signature",
            JobRefusal::WrongPayloadType(_) => "wrong_payload_type",
            JobRefusal::WrongAudience { .. } => "wrong_audience",
            JobRefusal::UnsupportedTarget { .. } => "unsupported_target",
            JobRefusal::Expired { .. } => "expired",
            JobRefusal::Replayed { .. } => "replayed_sequence",
            JobRefusal::InvalidDigest { .. } => "invalid_digest",
        }
    }
}

impl From<DsseError> for JobRefusal {
    fn from(e: DsseError) -> Self {
        match e {
            DsseError::Malformed(m) => JobRefusal::Malformed(m),
            DsseError::WrongPayloadType { got, .. } => JobRefusal::WrongPayloadType(got),
            DsseError::NoSignatures => {
                JobRefusal::Malformed("envelope carries no signatures".into())
            }
            DsseError::UnknownKeyId(k) => JobRefusal::UnknownKeyId(k),
            DsseError::BadSignature(k) => JobRefusal::BadSignature(k),
        }
    }
}

fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Agent-side, offline job verification against keys pinned at enrollment.
#[derive(Debug, Clone)]
pub struct JobVerifier {
    pub agent_id: String,
    pub trusted: TrustedKeys,
    /// Target kinds this agent can act on.
    pub capabilities: Vec<String>,
}

impl JobVerifier {
    /// Checks, in order: size, DSSE signature with the pinned keys (then payload type), payload
    /// parses, audience, target kind supported, not expired (`now <= not_after`), sequence
    /// strictly after `last_sequence`, every component digest well-formed.
    ///
    /// The order puts every check on unauthenticated bytes before anything that trusts the
    /// payload, so nothing from an unsigned job is ever interpreted.
    pub fn verify(
        &self,
        envelope_json: &[u8],
        now: OffsetDateTime,
        last_sequence: u64,
    ) -> Result<(JobPayload, Envelope), JobRefusal> {
        if envelope_json.len() > MAX_ENVELOPE_BYTES {
            return Err(JobRefusal::Oversized {
                len: envelope_json.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        let envelope: Envelope = serde_json::from_slice(envelope_json)
            .map_err(|e| JobRefusal::Malformed(format!("envelope is not DSSE JSON: {e}")))?;
        let payload = self.trusted.verify(&envelope, JOB_PAYLOAD_TYPE)?;
        let job: JobPayload = serde_json::from_slice(&payload)
            .map_err(|e| JobRefusal::Malformed(format!("payload is not a job: {e}")))?;
        if job.agent_id != self.agent_id {
            return Err(JobRefusal::WrongAudience {
                expected: self.agent_id.clone(),
                got: job.agent_id,
            });
        }
        if !self.capabilities.contains(&job.target.kind) {
            return Err(JobRefusal::UnsupportedTarget {
                kind: job.target.kind,
            });
        }
        if now > job.not_after {
            return Err(JobRefusal::Expired {
                not_after: job
                    .not_after
                    .format(&Rfc3339)
                    .unwrap_or_else(|_| job.not_after.to_string()),
            });
        }
        if job.sequence <= last_sequence {
            return Err(JobRefusal::Replayed {
                sequence: job.sequence,
                last: last_sequence,
            });
        }
        if let Some(bad) = job.components.iter().find(|c| !is_sha256_digest(&c.digest)) {
            return Err(JobRefusal::InvalidDigest {
                component: bad.name.clone(),
                digest: bad.digest.clone(),
            });
        }
        Ok((job, envelope))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    // 2030-01-01T12:00:00Z
    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_893_499_200).unwrap()
    }
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn job() -> JobPayload {
        JobPayload {
            job_id: "job-1".into(),
            agent_id: "agent-1".into(),
            target: JobTarget {
                name: "web".into(),
                kind: "docker".into(),
                config: serde_json::json!({"network": "bridge"}),
            },
            kind: JobKind::Deploy,
            deployment_id: "dep-1".into(),
            release_id: "rel-1".into(),
            release_name: "v1.2.3".into(),
            components: vec![JobComponent {
                name: "api".into(),
                image: "registry.example/api".into(),
                digest: DIGEST.into(),
            }],
            issued_at: now() - time::Duration::minutes(1),
            not_after: now() + time::Duration::minutes(10),
            sequence: 5,
            idempotency_key: "dep-1/agent-1".into(),
        }
    }

    fn verifier(key: &SigningKey) -> JobVerifier {
        JobVerifier {
            agent_id: "agent-1".into(),
            trusted: TrustedKeys {
                keys: vec![key.public_key()],
            },
            capabilities: vec!["docker".into(), "compose".into()],
        }
    }

    fn signed(key: &SigningKey, job: &JobPayload) -> Vec<u8> {
        serde_json::to_vec(&sign_job(key, job).unwrap()).unwrap()
    }

    fn refusal(job: &JobPayload, last: u64) -> JobRefusal {
        let key = SigningKey::generate();
        verifier(&key)
            .verify(&signed(&key, job), now(), last)
            .unwrap_err()
    }

    #[test]
    fn valid_job_is_accepted() {
        let key = SigningKey::generate();
        let bytes = signed(&key, &job());
        let (payload, env) = verifier(&key).verify(&bytes, now(), 4).unwrap();
        assert_eq!(payload, job());
        assert_eq!(env.payload_type, JOB_PAYLOAD_TYPE);
        // Expiry is inclusive of the instant itself.
        assert!(verifier(&key).verify(&bytes, job().not_after, 0).is_ok());
    }

    #[test]
    fn payload_json_shape() {
        let key = SigningKey::generate();
        let env = sign_job(&key, &job()).unwrap();
        let payload: serde_json::Value =
            serde_json::from_slice(&STANDARD.decode(env.payload).unwrap()).unwrap();
        assert_eq!(payload["kind"], "deploy");
        assert_eq!(payload["not_after"], "2030-01-01T12:10:00Z");
        assert_eq!(payload["target"]["config"]["network"], "bridge");
    }

    #[test]
    fn oversized() {
        let key = SigningKey::generate();
        let mut big = job();
        big.release_name = "x".repeat(MAX_ENVELOPE_BYTES);
        let bytes = signed(&key, &big);
        let err = verifier(&key).verify(&bytes, now(), 0).unwrap_err();
        assert_eq!(
            err,
            JobRefusal::Oversized {
                len: bytes.len(),
                max: MAX_ENVELOPE_BYTES
            }
        );
        assert_eq!(err.reason_code(), "oversized");
    }

    #[test]
    fn malformed_envelope_and_payload() {
        let key = SigningKey::generate();
        let err = verifier(&key).verify(b"{not json", now(), 0).unwrap_err();
        assert_eq!(err.reason_code(), "malformed");
        // Correctly signed, but the payload is not a job.
        let env = key.sign(JOB_PAYLOAD_TYPE, b"{\"hello\":1}");
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
            .unwrap_err();
        assert!(
            matches!(&err, JobRefusal::Malformed(m) if m.contains("payload")),
            "{err}"
        );
        let mut env = sign_job(&key, &job()).unwrap();
        env.signatures.clear();
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
            .unwrap_err();
        assert_eq!(err.reason_code(), "malformed");
    }

    #[test]
    fn unknown_key_id() {
        let pinned = SigningKey::generate();
        let other = SigningKey::generate();
        let err = verifier(&pinned)
            .verify(&signed(&other, &job()), now(), 0)
            .unwrap_err();
        assert_eq!(err, JobRefusal::UnknownKeyId(other.key_id().to_string()));
        assert_eq!(err.reason_code(), "unknown_key_id");
    }

    #[test]
    fn bad_signature_on_tampered_payload() {
        let key = SigningKey::generate();
        let mut env = sign_job(&key, &job()).unwrap();
        let mut evil = job();
        evil.components[0].image = "evil.example/api".into();
        env.payload = STANDARD.encode(serde_json::to_vec(&evil).unwrap());
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
            .unwrap_err();
        assert_eq!(err, JobRefusal::BadSignature(key.key_id().to_string()));
        assert_eq!(err.reason_code(), "bad_signature");
    }

    #[test]
    fn wrong_payload_type() {
        let key = SigningKey::generate();
        let env = key.sign("application/json", &serde_json::to_vec(&job()).unwrap());
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
            .unwrap_err();
        assert_eq!(err, JobRefusal::WrongPayloadType("application/json".into()));
        assert_eq!(err.reason_code(), "wrong_payload_type");
    }

    #[test]
    fn wrong_audience() {
        let mut j = job();
        j.agent_id = "agent-2".into();
        let err = refusal(&j, 0);
        assert_eq!(err.to_string(), "job is for agent agent-2, not agent-1");
        assert_eq!(err.reason_code(), "wrong_audience");
    }

    #[test]
    fn unsupported_target() {
        let mut j = job();
        j.target.kind = "ssh".into();
        let err = refusal(&j, 0);
        assert_eq!(err, JobRefusal::UnsupportedTarget { kind: "ssh".into() });
        assert_eq!(err.reason_code(), "unsupported_target");
    }

    #[test]
    fn expired() {
        let mut j = job();
        j.not_after = now() - time::Duration::seconds(1);
        let err = refusal(&j, 0);
        assert_eq!(
            err,
            JobRefusal::Expired {
                not_after: "2030-01-01T11:59:59Z".into()
            }
        );
        assert_eq!(err.reason_code(), "expired");
    }

    #[test]
    fn replayed_sequence() {
        let err = refusal(&job(), 5);
        assert_eq!(
            err,
            JobRefusal::Replayed {
                sequence: 5,
                last: 5
            }
        );
        assert_eq!(err.reason_code(), "replayed_sequence");
        assert_eq!(refusal(&job(), 9).reason_code(), "replayed_sequence");
    }

    #[test]
    fn invalid_digests() {
        for bad in [
            "sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0123",
            "md5:0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdeg",
        ] {
            let mut j = job();
            j.components.push(JobComponent {
                name: "worker".into(),
                image: "registry.example/worker".into(),
                digest: bad.into(),
            });
            let err = refusal(&j, 0);
            assert_eq!(
                err,
                JobRefusal::InvalidDigest {
                    component: "worker".into(),
                    digest: bad.into()
                },
                "{bad}"
            );
            assert_eq!(err.reason_code(), "invalid_digest");
        }
    }

    #[test]
    fn checks_run_in_the_documented_order() {
        // Wrong audience AND expired AND replayed: audience is reported first.
        let mut j = job();
        j.agent_id = "agent-2".into();
        j.not_after = now() - time::Duration::hours(1);
        assert_eq!(refusal(&j, 99).reason_code(), "wrong_audience");
        // Expired AND replayed: expiry first.
        let mut j = job();
        j.not_after = now() - time::Duration::hours(1);
        assert_eq!(refusal(&j, 99).reason_code(), "expired");
    }

    #[test]
    fn envelope_digest_format() {
        assert_eq!(
            envelope_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
