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
    /// How a deploy changes the target. Left out of the payload when it is `replace`, so a
    /// replace deploy signs exactly the bytes it signed before strategies existed, and a
    /// payload without it (any older plane's) verifies as a replace.
    #[serde(default, skip_serializing_if = "DeployMode::is_replace")]
    pub strategy: DeployMode,
}

/// How a deploy job puts the release on its target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployMode {
    /// Stop what runs, start the release in its place (every executor).
    #[default]
    Replace,
    /// Start the release beside what runs, wait until it is healthy, switch to it, then stop
    /// the old one; when the new one does not become healthy the old one keeps running.
    BlueGreen,
}

/// Strategies this agent build understands (a payload naming another is
/// `unsupported_strategy`).
pub const DEPLOY_MODES: [&str; 2] = ["replace", "blue-green"];

/// Target kinds whose executor can deploy blue-green. The plane refuses a blue-green
/// deployment to any other kind before signing a job, and an agent refuses one its executor
/// cannot run (`unsupported_strategy`) before touching the target.
pub const BLUE_GREEN_TARGET_KINDS: [&str; 1] = ["docker"];

impl DeployMode {
    pub fn is_replace(&self) -> bool {
        *self == DeployMode::Replace
    }

    /// The strategy's name on the wire: `replace` or `blue-green`.
    pub fn name(&self) -> &'static str {
        match self {
            DeployMode::Replace => "replace",
            DeployMode::BlueGreen => "blue-green",
        }
    }
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

/// What a job does, with the parameters only that kind has. On the wire a deploy is
/// `"kind": "deploy"` (unchanged since the first agent), the others
/// `"kind": {"health-check": {…}}` and `"kind": {"script": {…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Put `components` (by digest) on the target with the executor of the target's kind.
    Deploy,
    /// Probe a service over HTTP from the agent host; no executor is involved.
    HealthCheck(HealthCheckJob),
    /// Run a command on the agent host; no executor is involved.
    Script(ScriptJob),
}

/// Kinds this agent build understands (a payload naming another is `unsupported_job_kind`).
pub const JOB_KINDS: [&str; 3] = ["deploy", "health-check", "script"];

/// Longest a health-check or script job may run on an agent.
pub const MAX_STEP_JOB_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// Most consecutive successes a health check may ask for.
pub const MAX_HEALTHY_AFTER: u32 = 1000;

impl JobKind {
    /// The kind's name: `deploy`, `health-check` or `script` (also the plane's `jobs.kind`).
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Deploy => "deploy",
            JobKind::HealthCheck(_) => "health-check",
            JobKind::Script(_) => "script",
        }
    }

    /// The agent capability a job of this kind needs, when it is not the target's kind:
    /// a deploy needs an executor for the target, a step job needs the step capability.
    pub fn step_capability(&self) -> Option<&'static str> {
        match self {
            JobKind::Deploy => None,
            other => Some(other.name()),
        }
    }
}

/// Capabilities an agent offers for work it does itself (no executor): never target kinds.
pub const STEP_CAPABILITIES: [&str; 2] = ["health-check", "script"];

/// An HTTP GET run by the agent until `healthy_after` consecutive answers carry
/// `expect_status`, `interval_ms` apart, or until `timeout_ms` has passed (failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckJob {
    pub http: HttpProbe,
    pub interval_ms: u64,
    pub healthy_after: u32,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// `http` or `https`, without credentials.
    pub url: String,
    pub expect_status: u16,
}

/// A command run by the agent as a child process, without a shell unless `command[0]` is one;
/// killed when `timeout_ms` has passed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptJob {
    /// argv; `command[0]` is the program.
    pub command: Vec<String>,
    pub timeout_ms: u64,
}

impl HealthCheckJob {
    /// Why these parameters cannot be run, if they cannot.
    pub fn problem(&self) -> Option<String> {
        let url = match url::Url::parse(&self.http.url) {
            Ok(url) => url,
            Err(e) => return Some(format!("probe URL {:?} is invalid: {e}", self.http.url)),
        };
        if !matches!(url.scheme(), "http" | "https") {
            return Some(format!(
                "probe URL {:?} must be http or https",
                self.http.url
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Some("probe URL must not carry credentials".to_string());
        }
        if !(100..=599).contains(&self.http.expect_status) {
            return Some(format!(
                "expect_status {} is not an HTTP status (100-599)",
                self.http.expect_status
            ));
        }
        if !(1..=MAX_HEALTHY_AFTER).contains(&self.healthy_after) {
            return Some(format!(
                "healthy_after {} must be 1-{MAX_HEALTHY_AFTER}",
                self.healthy_after
            ));
        }
        if self.interval_ms == 0 || self.interval_ms > MAX_STEP_JOB_TIMEOUT_MS {
            return Some(format!(
                "interval_ms {} must be 1-{MAX_STEP_JOB_TIMEOUT_MS}",
                self.interval_ms
            ));
        }
        timeout_problem(self.timeout_ms)
    }
}

impl ScriptJob {
    /// Why this command cannot be run, if it cannot.
    pub fn problem(&self) -> Option<String> {
        match self.command.first() {
            None => return Some("a script job needs a command".to_string()),
            Some(program) if program.is_empty() => {
                return Some("a script job's program (command[0]) is empty".to_string());
            }
            Some(_) => {}
        }
        if self.command.iter().any(|arg| arg.contains('\0')) {
            return Some("a command argument contains a NUL byte".to_string());
        }
        timeout_problem(self.timeout_ms)
    }
}

fn timeout_problem(timeout_ms: u64) -> Option<String> {
    (timeout_ms == 0 || timeout_ms > MAX_STEP_JOB_TIMEOUT_MS)
        .then(|| format!("timeout_ms {timeout_ms} must be 1-{MAX_STEP_JOB_TIMEOUT_MS}"))
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
    /// A job kind this agent does not know (a newer plane) or does not offer (capability off).
    #[error("this agent does not run {kind:?} jobs")]
    UnsupportedJobKind { kind: String },
    #[error("invalid {kind} job: {reason}")]
    InvalidParameters { kind: String, reason: String },
    /// A deploy strategy this agent build does not know (a newer plane).
    #[error("this agent does not know the deploy strategy {strategy:?}")]
    UnsupportedStrategy { strategy: String },
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
            JobRefusal::UnsupportedJobKind { .. } => "unsupported_job_kind",
            JobRefusal::InvalidParameters { .. } => "invalid_job_parameters",
            JobRefusal::UnsupportedStrategy { .. } => "unsupported_strategy",
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
    /// parses (a kind this build does not know is `unsupported_job_kind`), audience, capability
    /// (a deploy needs the target's kind, which is never a step capability; a health-check or
    /// script job needs that step capability), not expired (`now <= not_after`), sequence
    /// strictly after `last_sequence`, then the kind's parameters: a deploy names at least one
    /// component and every digest is well-formed; a step job names no components and its
    /// parameters can be run.
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
        let job: JobPayload = serde_json::from_slice(&payload).map_err(|e| {
            unknown_kind(&payload)
                .or_else(|| unknown_strategy(&payload))
                .unwrap_or_else(|| JobRefusal::Malformed(format!("payload is not a job: {e}")))
        })?;
        if job.agent_id != self.agent_id {
            return Err(JobRefusal::WrongAudience {
                expected: self.agent_id.clone(),
                got: job.agent_id,
            });
        }
        match job.kind.step_capability() {
            None => {
                if !self.capabilities.contains(&job.target.kind)
                    || STEP_CAPABILITIES.contains(&job.target.kind.as_str())
                {
                    return Err(JobRefusal::UnsupportedTarget {
                        kind: job.target.kind,
                    });
                }
            }
            Some(capability) => {
                if !self.capabilities.iter().any(|c| c == capability) {
                    return Err(JobRefusal::UnsupportedJobKind {
                        kind: capability.to_string(),
                    });
                }
            }
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
        check_parameters(&job)?;
        Ok((job, envelope))
    }
}

/// Deploy-only fields are mandatory for a deploy and refused elsewhere; step parameters must
/// be runnable.
fn check_parameters(job: &JobPayload) -> Result<(), JobRefusal> {
    let invalid = |reason: String| JobRefusal::InvalidParameters {
        kind: job.kind.name().to_string(),
        reason,
    };
    let problem = match &job.kind {
        JobKind::Deploy => {
            if job.components.is_empty() {
                return Err(invalid("a deploy job names no components".to_string()));
            }
            if let Some(bad) = job.components.iter().find(|c| !is_sha256_digest(&c.digest)) {
                return Err(JobRefusal::InvalidDigest {
                    component: bad.name.clone(),
                    digest: bad.digest.clone(),
                });
            }
            return Ok(());
        }
        _ if !job.components.is_empty() => {
            Some("components (image digests) belong to deploy jobs only".to_string())
        }
        _ if !job.strategy.is_replace() => {
            Some("a deploy strategy belongs to deploy jobs only".to_string())
        }
        JobKind::HealthCheck(check) => check.problem(),
        JobKind::Script(script) => script.problem(),
    };
    problem.map_or(Ok(()), |reason| Err(invalid(reason)))
}

/// A signed payload that failed to parse only because its `kind` is one this build does not
/// know (`"kind": "new"` or `"kind": {"new": …}`) is refused as such, not as malformed.
fn unknown_kind(payload: &[u8]) -> Option<JobRefusal> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let kind = match value.get("kind")? {
        serde_json::Value::String(name) => name.clone(),
        serde_json::Value::Object(map) if map.len() == 1 => map.keys().next()?.clone(),
        _ => return None,
    };
    (!JOB_KINDS.contains(&kind.as_str())).then(|| JobRefusal::UnsupportedJobKind {
        kind: kind.chars().take(64).collect(),
    })
}

/// A signed payload that failed to parse only because its `strategy` is one this build does
/// not know is refused as such, not as malformed.
fn unknown_strategy(payload: &[u8]) -> Option<JobRefusal> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let strategy = value.get("strategy")?.as_str()?;
    (!DEPLOY_MODES.contains(&strategy)).then(|| JobRefusal::UnsupportedStrategy {
        strategy: strategy.chars().take(64).collect(),
    })
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
            strategy: DeployMode::Replace,
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

    /// A replace deploy signs the bytes it signed before strategies existed, so agents of any
    /// age read it; a payload without the field verifies as a replace.
    #[test]
    fn a_replace_deploy_carries_no_strategy_and_blue_green_travels_signed() {
        let key = SigningKey::generate();
        let plain = serde_json::to_value(job()).unwrap();
        assert!(plain.get("strategy").is_none(), "{plain}");
        let (payload, _) = verifier(&key)
            .verify(&signed(&key, &job()), now(), 0)
            .unwrap();
        assert_eq!(payload.strategy, DeployMode::Replace);

        let blue_green = JobPayload {
            strategy: DeployMode::BlueGreen,
            ..job()
        };
        let value = serde_json::to_value(&blue_green).unwrap();
        assert_eq!(value["strategy"], "blue-green");
        let (payload, _) = verifier(&key)
            .verify(&signed(&key, &blue_green), now(), 0)
            .unwrap();
        assert_eq!(payload.strategy, DeployMode::BlueGreen);
        assert_eq!(DeployMode::BlueGreen.name(), "blue-green");
        assert_eq!(
            DEPLOY_MODES,
            [DeployMode::Replace.name(), DeployMode::BlueGreen.name()]
        );
    }

    /// A newer plane's strategy is refused by name, not as a malformed payload; it is signed
    /// like anything else, so the refusal only comes after the signature checked out.
    #[test]
    fn a_strategy_this_build_does_not_know_is_unsupported() {
        let key = SigningKey::generate();
        let mut value = serde_json::to_value(job()).unwrap();
        value["strategy"] = serde_json::json!("canary");
        let envelope = key.sign(JOB_PAYLOAD_TYPE, &serde_json::to_vec(&value).unwrap());
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&envelope).unwrap(), now(), 0)
            .unwrap_err();
        assert_eq!(
            err,
            JobRefusal::UnsupportedStrategy {
                strategy: "canary".into()
            }
        );
        assert_eq!(err.reason_code(), "unsupported_strategy");

        value["strategy"] = serde_json::json!(7);
        let envelope = key.sign(JOB_PAYLOAD_TYPE, &serde_json::to_vec(&value).unwrap());
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&envelope).unwrap(), now(), 0)
            .unwrap_err();
        assert_eq!(err.reason_code(), "malformed");
    }

    #[test]
    fn a_step_job_with_a_strategy_is_refused() {
        let job = JobPayload {
            strategy: DeployMode::BlueGreen,
            ..health_job()
        };
        let key = SigningKey::generate();
        let err = step_verifier(&key, &["health-check"])
            .verify(&signed(&key, &job), now(), 0)
            .unwrap_err();
        assert_eq!(err.reason_code(), "invalid_job_parameters");
        assert!(err.to_string().contains("strategy"), "{err}");
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

    fn health_job() -> JobPayload {
        JobPayload {
            kind: JobKind::HealthCheck(HealthCheckJob {
                http: HttpProbe {
                    url: "http://127.0.0.1:8080/healthz".into(),
                    expect_status: 200,
                },
                interval_ms: 500,
                healthy_after: 3,
                timeout_ms: 60_000,
            }),
            components: Vec::new(),
            ..job()
        }
    }

    fn script_job() -> JobPayload {
        JobPayload {
            kind: JobKind::Script(ScriptJob {
                command: vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
                timeout_ms: 10_000,
            }),
            components: Vec::new(),
            ..job()
        }
    }

    fn step_verifier(key: &SigningKey, capabilities: &[&str]) -> JobVerifier {
        JobVerifier {
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            ..verifier(key)
        }
    }

    fn step_refusal(job: &JobPayload, capabilities: &[&str]) -> JobRefusal {
        let key = SigningKey::generate();
        step_verifier(&key, capabilities)
            .verify(&signed(&key, job), now(), 0)
            .unwrap_err()
    }

    #[test]
    fn step_jobs_are_accepted_with_their_capability() {
        let key = SigningKey::generate();
        let v = step_verifier(&key, &["docker", "health-check", "script"]);
        for j in [health_job(), script_job()] {
            let (got, _) = v.verify(&signed(&key, &j), now(), 0).unwrap();
            assert_eq!(got, j);
        }
    }

    #[test]
    fn deploy_stays_a_plain_string_on_the_wire_and_step_kinds_carry_their_parameters() {
        let key = SigningKey::generate();
        let decode = |j: &JobPayload| -> serde_json::Value {
            let env = sign_job(&key, j).unwrap();
            serde_json::from_slice(&STANDARD.decode(env.payload).unwrap()).unwrap()
        };
        assert_eq!(decode(&job())["kind"], "deploy");
        let health = decode(&health_job());
        assert_eq!(
            health["kind"],
            serde_json::json!({"health-check": {
                "http": {"url": "http://127.0.0.1:8080/healthz", "expect_status": 200},
                "interval_ms": 500, "healthy_after": 3, "timeout_ms": 60000,
            }})
        );
        assert_eq!(health["components"], serde_json::json!([]));
        assert_eq!(
            decode(&script_job())["kind"],
            serde_json::json!({"script": {"command": ["/bin/sh", "-c", "exit 0"], "timeout_ms": 10000}})
        );
    }

    #[test]
    fn a_step_job_without_its_capability_is_refused() {
        let err = step_refusal(&script_job(), &["docker", "health-check"]);
        assert_eq!(
            err,
            JobRefusal::UnsupportedJobKind {
                kind: "script".into()
            }
        );
        assert_eq!(err.reason_code(), "unsupported_job_kind");
        assert_eq!(err.to_string(), "this agent does not run \"script\" jobs");
        let err = step_refusal(&health_job(), &["docker", "script"]);
        assert_eq!(err.reason_code(), "unsupported_job_kind");
        // The target's executor is not needed for a step job.
        assert!(
            step_verifier(&SigningKey::generate(), &["health-check"])
                .capabilities
                .iter()
                .all(|c| c != "docker")
        );
        let key = SigningKey::generate();
        step_verifier(&key, &["health-check"])
            .verify(&signed(&key, &health_job()), now(), 0)
            .unwrap();
    }

    #[test]
    fn a_deploy_to_a_target_named_like_a_step_capability_is_refused() {
        let mut j = job();
        j.target.kind = "script".into();
        let err = step_refusal(&j, &["script"]);
        assert_eq!(
            err,
            JobRefusal::UnsupportedTarget {
                kind: "script".into()
            }
        );
    }

    #[test]
    fn a_kind_this_build_does_not_know_is_unsupported_not_malformed() {
        let key = SigningKey::generate();
        let mut value = serde_json::to_value(job()).unwrap();
        for kind in [
            serde_json::json!("reboot"),
            serde_json::json!({"reboot": {"force": true}}),
        ] {
            value["kind"] = kind;
            let env = key.sign(JOB_PAYLOAD_TYPE, &serde_json::to_vec(&value).unwrap());
            let err = verifier(&key)
                .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
                .unwrap_err();
            assert_eq!(
                err,
                JobRefusal::UnsupportedJobKind {
                    kind: "reboot".into()
                }
            );
        }
        // A known kind with unknown parameters is malformed (never silently ignored).
        value["kind"] =
            serde_json::json!({"script": {"command": ["true"], "timeout_ms": 5, "user": "root"}});
        let env = key.sign(JOB_PAYLOAD_TYPE, &serde_json::to_vec(&value).unwrap());
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
            .unwrap_err();
        assert!(
            matches!(&err, JobRefusal::Malformed(m) if m.contains("user")),
            "{err}"
        );
    }

    /// What an agent built before step jobs existed does with one: its `JobKind` had only
    /// `Deploy`, so the payload does not parse and the job is refused as `malformed`, naming
    /// the kind. (The plane does not send them such jobs: they lack the capability.)
    #[test]
    fn an_agent_that_predates_step_jobs_refuses_them_as_malformed() {
        #[derive(Debug, Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[allow(dead_code)]
        enum OldJobKind {
            Deploy,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct OldPayload {
            kind: OldJobKind,
        }
        let bytes = serde_json::to_vec(&script_job()).unwrap();
        let err = serde_json::from_slice::<OldPayload>(&bytes).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `script`"),
            "{err}"
        );
        assert!(serde_json::from_slice::<OldPayload>(&serde_json::to_vec(&job()).unwrap()).is_ok());
    }

    #[test]
    fn deploy_only_fields_are_mandatory_for_deploys_and_refused_elsewhere() {
        let mut j = job();
        j.components.clear();
        let err = refusal(&j, 0);
        assert_eq!(err.reason_code(), "invalid_job_parameters");
        assert_eq!(
            err.to_string(),
            "invalid deploy job: a deploy job names no components"
        );
        // The field itself stays mandatory: a payload without it does not parse.
        let key = SigningKey::generate();
        let mut value = serde_json::to_value(job()).unwrap();
        value.as_object_mut().unwrap().remove("components");
        let env = key.sign(JOB_PAYLOAD_TYPE, &serde_json::to_vec(&value).unwrap());
        let err = verifier(&key)
            .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
            .unwrap_err();
        assert_eq!(err.reason_code(), "malformed");

        for mut j in [health_job(), script_job()] {
            j.components = job().components;
            let err = step_refusal(&j, &["health-check", "script"]);
            assert_eq!(err.reason_code(), "invalid_job_parameters", "{err}");
            assert!(err.to_string().contains("deploy jobs only"), "{err}");
        }
    }

    #[test]
    fn unrunnable_step_parameters_are_refused() {
        let health = |f: fn(&mut HealthCheckJob)| {
            let mut j = health_job();
            if let JobKind::HealthCheck(h) = &mut j.kind {
                f(h);
            }
            j
        };
        let script = |f: fn(&mut ScriptJob)| {
            let mut j = script_job();
            if let JobKind::Script(s) = &mut j.kind {
                f(s);
            }
            j
        };
        let cases = [
            (health(|h| h.http.url = "ftp://x/".into()), "http or https"),
            (health(|h| h.http.url = "not a url".into()), "invalid"),
            (
                health(|h| h.http.url = "http://u:p@x/".into()),
                "credentials",
            ),
            (health(|h| h.http.expect_status = 99), "expect_status"),
            (health(|h| h.http.expect_status = 600), "expect_status"),
            (health(|h| h.healthy_after = 0), "healthy_after"),
            (
                health(|h| h.healthy_after = MAX_HEALTHY_AFTER + 1),
                "healthy_after",
            ),
            (health(|h| h.interval_ms = 0), "interval_ms"),
            (health(|h| h.timeout_ms = 0), "timeout_ms"),
            (
                health(|h| h.timeout_ms = MAX_STEP_JOB_TIMEOUT_MS + 1),
                "timeout_ms",
            ),
            (script(|s| s.command.clear()), "needs a command"),
            (script(|s| s.command[0].clear()), "command[0]"),
            (script(|s| s.command.push("a\0b".into())), "NUL"),
            (script(|s| s.timeout_ms = 0), "timeout_ms"),
        ];
        for (j, want) in cases {
            let err = step_refusal(&j, &["health-check", "script"]);
            assert_eq!(err.reason_code(), "invalid_job_parameters", "{want}: {err}");
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn step_jobs_are_checked_for_audience_expiry_and_sequence_like_deploys() {
        let mut j = script_job();
        j.agent_id = "agent-2".into();
        assert_eq!(
            step_refusal(&j, &["script"]).reason_code(),
            "wrong_audience"
        );
        let mut j = script_job();
        j.not_after = now() - time::Duration::seconds(1);
        assert_eq!(step_refusal(&j, &["script"]).reason_code(), "expired");
        let key = SigningKey::generate();
        let err = step_verifier(&key, &["script"])
            .verify(&signed(&key, &script_job()), now(), 5)
            .unwrap_err();
        assert_eq!(err.reason_code(), "replayed_sequence");
        // And a tampered command does not verify.
        let mut env = sign_job(&key, &script_job()).unwrap();
        let mut evil = script_job();
        evil.kind = JobKind::Script(ScriptJob {
            command: vec!["/bin/rm".into(), "-rf".into(), "/".into()],
            timeout_ms: 10_000,
        });
        env.payload = STANDARD.encode(serde_json::to_vec(&evil).unwrap());
        let err = step_verifier(&key, &["script"])
            .verify(&serde_json::to_vec(&env).unwrap(), now(), 0)
            .unwrap_err();
        assert_eq!(err.reason_code(), "bad_signature");
    }

    #[test]
    fn envelope_digest_format() {
        assert_eq!(
            envelope_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
