//! Fixtures shared by the fuzz targets and the seed generator (`seeds.rs`).
//!
//! Everything here is deterministic across processes, so envelopes and receipts written as seeds
//! by one process verify in the fuzzer's process: the job-signing key is derived from a fixed
//! seed, the agent certificate and key are checked-in files (`fixtures/`, regenerate with
//! `cargo run --example seeds -- --regenerate-fixtures fixtures` from `fuzz/`).

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use stella_pki::{
    HealthCheckJob, HttpProbe, JobComponent, JobKind, JobPayload, JobTarget, JobVerifier,
    ScriptJob, SigningKey, TrustedKeys,
};
use time::OffsetDateTime;

pub const TRUST_DOMAIN: &str = "stella.local";
/// The agent the job verifier runs as, and the id the CSR target asks the CA for.
pub const AGENT_ID: &str = "agent-fuzz";
/// Two executors and one step capability: health checks run here, scripts do not.
pub const CAPABILITIES: [&str; 3] = ["docker", "compose", "health-check"];

/// An agent certificate (issued by a throwaway CA for `AGENT_ID`) and its ECDSA P-256 key.
pub const AGENT_CERT_PEM: &str = include_str!("../fixtures/agent.cert.pem");
pub const AGENT_KEY_PEM: &str = include_str!("../fixtures/agent.key.pem");

/// The fuzzers' "now": 2030-01-01T12:00:00Z.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_893_499_200).expect("valid timestamp")
}

/// Ed25519 PKCS#8 v1 of a fixed 32-byte seed, as PEM.
fn fixed_key_pem(seed: u8) -> String {
    let mut der = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    der.extend_from_slice(&[seed; 32]);
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        STANDARD.encode(der)
    )
}

/// The trusted job-signing key (the same in every process).
pub fn job_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_pem(&fixed_key_pem(7)).expect("fixed Ed25519 key"))
}

/// A second fixed key that is NOT trusted (for seeds signed by an unknown key).
pub fn untrusted_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_pem(&fixed_key_pem(9)).expect("fixed Ed25519 key"))
}

pub fn verifier() -> &'static JobVerifier {
    static VERIFIER: OnceLock<JobVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| JobVerifier {
        agent_id: AGENT_ID.to_string(),
        trusted: TrustedKeys {
            keys: vec![job_key().public_key()],
        },
        capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
    })
}

pub fn agent_cert_der() -> &'static [u8] {
    static DER: OnceLock<Vec<u8>> = OnceLock::new();
    DER.get_or_init(|| stella_pki::cert_der_from_pem(AGENT_CERT_PEM).expect("fixture certificate"))
}

pub const VALID_DIGEST: &str =
    "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A job the fuzzers' verifier accepts with `last_sequence` < 5 at [`now`].
pub fn sample_job() -> JobPayload {
    JobPayload {
        job_id: "job-1".into(),
        agent_id: AGENT_ID.into(),
        target: JobTarget {
            name: "web".into(),
            kind: "docker".into(),
            config: serde_json::json!({"network": "bridge", "ports": [80, 443]}),
        },
        kind: JobKind::Deploy,
        deployment_id: "dep-1".into(),
        release_id: "rel-1".into(),
        release_name: "v1.2.3".into(),
        components: vec![JobComponent {
            name: "api".into(),
            image: "registry.example/api".into(),
            digest: VALID_DIGEST.into(),
        }],
        issued_at: now() - time::Duration::minutes(1),
        not_after: now() + time::Duration::minutes(10),
        sequence: 5,
        idempotency_key: "dep-1/agent-fuzz".into(),
        strategy: Default::default(),
    }
}

/// A health-check job the fuzzers' verifier accepts with `last_sequence` < 5 at [`now`].
pub fn sample_health_check_job() -> JobPayload {
    JobPayload {
        kind: JobKind::HealthCheck(HealthCheckJob {
            http: HttpProbe {
                url: "http://127.0.0.1:8080/healthz".into(),
                expect_status: 200,
            },
            interval_ms: 1000,
            healthy_after: 3,
            timeout_ms: 60_000,
        }),
        components: Vec::new(),
        ..sample_job()
    }
}

/// A script job: refused by the fuzzers' verifier, which does not offer `script`.
pub fn sample_script_job() -> JobPayload {
    JobPayload {
        kind: JobKind::Script(ScriptJob {
            command: vec!["/bin/sh".into(), "-c".into(), "exit 0".into()],
            timeout_ms: 10_000,
        }),
        components: Vec::new(),
        ..sample_job()
    }
}

/// Whether `d` is `sha256:` + 64 lowercase hex digits (the verifier's rule, restated).
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

// ---- structured job input for the `job_envelope` target

#[derive(Debug, Arbitrary)]
pub enum FuzzAudience {
    Ours,
    Other(String),
}

#[derive(Debug, Arbitrary)]
pub enum FuzzKind {
    Docker,
    Compose,
    /// A target kind named like a step capability (never an executor).
    Step,
    Other(String),
}

#[derive(Debug, Arbitrary)]
pub enum FuzzJobKind {
    Deploy,
    HealthCheck {
        /// A plausible URL most of the time, anything otherwise.
        url: Result<(bool, u16, String), String>,
        expect_status: u16,
        interval_ms: u64,
        healthy_after: u32,
        timeout_ms: u64,
    },
    Script {
        command: Vec<String>,
        timeout_ms: u64,
    },
}

impl FuzzJobKind {
    fn to_kind(&self) -> JobKind {
        match self {
            FuzzJobKind::Deploy => JobKind::Deploy,
            FuzzJobKind::HealthCheck {
                url,
                expect_status,
                interval_ms,
                healthy_after,
                timeout_ms,
            } => JobKind::HealthCheck(HealthCheckJob {
                http: HttpProbe {
                    url: match url {
                        Ok((tls, port, path)) => format!(
                            "{}://127.0.0.1:{port}/{path}",
                            if *tls { "https" } else { "http" }
                        ),
                        Err(raw) => raw.clone(),
                    },
                    expect_status: *expect_status,
                },
                interval_ms: *interval_ms,
                healthy_after: *healthy_after,
                timeout_ms: *timeout_ms,
            }),
            FuzzJobKind::Script {
                command,
                timeout_ms,
            } => JobKind::Script(ScriptJob {
                command: command.clone(),
                timeout_ms: *timeout_ms,
            }),
        }
    }
}

#[derive(Debug, Arbitrary)]
pub enum FuzzDigest {
    Valid([u8; 32]),
    Raw(String),
}

#[derive(Debug, Arbitrary)]
pub enum FuzzValue {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Str(String),
    Array(Vec<FuzzValue>),
    Object(Vec<(String, FuzzValue)>),
}

impl FuzzValue {
    /// JSON without floats (their text form need not round-trip exactly) and at most `depth`
    /// levels deep (serde_json refuses to parse more than 128).
    pub fn to_json(&self, depth: u32) -> serde_json::Value {
        use serde_json::Value;
        match self {
            FuzzValue::Null => Value::Null,
            FuzzValue::Bool(b) => Value::Bool(*b),
            FuzzValue::Int(i) => Value::from(*i),
            FuzzValue::Uint(u) => Value::from(*u),
            FuzzValue::Str(s) => Value::String(s.clone()),
            _ if depth == 0 => Value::Null,
            FuzzValue::Array(items) => {
                Value::Array(items.iter().map(|v| v.to_json(depth - 1)).collect())
            }
            FuzzValue::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json(depth - 1)))
                    .collect(),
            ),
        }
    }
}

#[derive(Debug, Arbitrary)]
pub struct FuzzComponent {
    pub name: String,
    pub image: String,
    pub digest: FuzzDigest,
}

#[derive(Debug, Arbitrary)]
pub struct FuzzJob {
    pub job_id: String,
    pub audience: FuzzAudience,
    pub target_name: String,
    pub target_kind: FuzzKind,
    pub config: FuzzValue,
    pub kind: FuzzJobKind,
    pub deployment_id: String,
    pub release_id: String,
    pub release_name: String,
    pub components: Vec<FuzzComponent>,
    pub issued_at_secs: i64,
    pub issued_at_nanos: u32,
    /// not_after = now + this many seconds.
    pub not_after_offset_secs: i32,
    pub not_after_nanos: u32,
    pub sequence: u64,
    pub idempotency_key: String,
}

/// Seconds of 9999-12-31T23:59:59Z, the last instant RFC 3339 can write.
const MAX_RFC3339_SECS: i64 = 253_402_300_799;

fn timestamp(secs: i64, nanos: u32) -> OffsetDateTime {
    let secs = secs.rem_euclid(MAX_RFC3339_SECS + 1);
    OffsetDateTime::from_unix_timestamp(secs)
        .expect("in range")
        .replace_nanosecond(nanos % 1_000_000_000)
        .expect("in range")
}

impl FuzzJob {
    pub fn to_payload(&self) -> JobPayload {
        JobPayload {
            job_id: self.job_id.clone(),
            agent_id: match &self.audience {
                FuzzAudience::Ours => AGENT_ID.to_string(),
                FuzzAudience::Other(s) => s.clone(),
            },
            target: JobTarget {
                name: self.target_name.clone(),
                kind: match &self.target_kind {
                    FuzzKind::Docker => "docker".to_string(),
                    FuzzKind::Compose => "compose".to_string(),
                    FuzzKind::Step => "health-check".to_string(),
                    FuzzKind::Other(s) => s.clone(),
                },
                config: self.config.to_json(8),
            },
            kind: self.kind.to_kind(),
            deployment_id: self.deployment_id.clone(),
            release_id: self.release_id.clone(),
            release_name: self.release_name.clone(),
            components: self
                .components
                .iter()
                .map(|c| JobComponent {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    digest: match &c.digest {
                        FuzzDigest::Valid(bytes) => format!(
                            "sha256:{}",
                            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
                        ),
                        FuzzDigest::Raw(s) => s.clone(),
                    },
                })
                .collect(),
            issued_at: timestamp(self.issued_at_secs, self.issued_at_nanos),
            not_after: (now() + time::Duration::seconds(i64::from(self.not_after_offset_secs)))
                .replace_nanosecond(self.not_after_nanos % 1_000_000_000)
                .expect("in range"),
            sequence: self.sequence,
            idempotency_key: self.idempotency_key.clone(),
            strategy: Default::default(),
        }
    }
}

/// How the structured job target damages a signed envelope.
#[derive(Debug, Arbitrary)]
pub enum Mutation {
    /// XOR the byte at `at % len` with `mask`.
    Flip { at: u32, mask: u8 },
    /// Overwrite the byte at `at % len`.
    Set { at: u32, byte: u8 },
    /// Keep the first `len % (len + 1)` bytes.
    Truncate { len: u32 },
}

impl Mutation {
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len();
        match *self {
            Mutation::Flip { at, mask } => bytes[at as usize % n] ^= mask,
            Mutation::Set { at, byte } => bytes[at as usize % n] = byte,
            Mutation::Truncate { len } => bytes.truncate(len as usize % (n + 1)),
        }
    }
}

#[derive(Debug, Arbitrary)]
pub struct StructuredJobInput {
    pub job: FuzzJob,
    pub last_sequence: u64,
    /// Always at least one mutation (it may still leave the bytes as they were).
    pub first_mutation: Mutation,
    pub mutations: Vec<Mutation>,
}

impl StructuredJobInput {
    pub fn all_mutations(&self) -> impl Iterator<Item = &Mutation> {
        std::iter::once(&self.first_mutation).chain(&self.mutations)
    }
}
