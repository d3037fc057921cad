//! The air-gap files, for relays with no link at all: their one definition, written by one side
//! and read by the other (`stella airgap export|import` on the plane, `stella-agent relay
//! import|export-results` on the relay).
//!
//! - **Jobs, plane → relay:** a DSSE envelope (payload type [`JOBS_PAYLOAD_TYPE`]) signed by the
//!   plane's job-signing key over a [`JobsDocument`]: the jobs waiting for the agents behind one
//!   relay, with their targets. Each job inside is itself the signed envelope the leaf verifies.
//! - **Results, relay → plane:** a [`SignedResults`] file, a [`ResultsDocument`] signed by the
//!   relay's certificate key: what the leaves sent, with their certificates and hellos.
//!
//! Both documents refuse unknown fields, so a file from a newer format is refused by name rather
//! than half read. Signing and checking stay with each side (the keys live there); this module
//! holds the shapes and the format checks both sides must agree on.

use serde::{Deserialize, Serialize};

/// The DSSE payload type of a jobs file.
pub const JOBS_PAYLOAD_TYPE: &str = "application/vnd.stella.airgap-jobs+json";
/// The `format` of a [`JobsDocument`].
pub const JOBS_FORMAT: &str = "stella.airgap.jobs/v1";
/// The `format` of a [`SignedResults`] file.
pub const RESULTS_FORMAT: &str = "stella.airgap.results/v1";

/// The signed payload of a jobs file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsDocument {
    pub format: String,
    pub relay_id: String,
    pub created_at_unix_ms: i64,
    pub agents: Vec<AgentJobs>,
}

/// The jobs and targets of one agent behind the relay.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentJobs {
    pub agent_id: String,
    pub targets: Vec<AirgapTarget>,
    pub jobs: Vec<AirgapJob>,
}

/// A target as the relay's offline welcome carries it to the leaf.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AirgapTarget {
    pub name: String,
    pub kind: String,
    pub config_json: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AirgapJob {
    pub job_id: String,
    /// The signed job envelope (DSSE JSON), exactly as the plane offers it.
    pub envelope: String,
}

/// The results file: a payload signed by the relay's certificate key.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SignedResults {
    pub format: String,
    /// The relay's certificate (PEM), issued by the plane's CA.
    pub relay_cert_pem: String,
    /// Base64 of the results document (JSON).
    pub payload: String,
    /// Base64 ECDSA signature of the payload bytes by the relay's certificate key.
    pub signature: String,
}

/// The signed payload of a results file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsDocument {
    pub relay_id: String,
    pub created_at_unix_ms: i64,
    pub leaves: Vec<LeafMessages>,
}

/// What one leaf sent through the relay.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeafMessages {
    pub agent_id: String,
    /// The leaf's certificate (DER, base64).
    pub cert_der: String,
    /// Its last hello (encoded `AgentMessage`, base64).
    pub hello: String,
    /// Its stored messages (encoded `AgentMessage`s, base64), in order.
    pub messages: Vec<String>,
}

/// Why a document is not one this build reads.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("unknown air-gap {what} format {found:?} (expected {expected})")]
    Unknown {
        what: &'static str,
        found: String,
        expected: &'static str,
    },
}

fn check(what: &'static str, found: &str, expected: &'static str) -> Result<(), FormatError> {
    if found == expected {
        Ok(())
    } else {
        Err(FormatError::Unknown {
            what,
            found: found.to_string(),
            expected,
        })
    }
}

impl JobsDocument {
    pub fn check_format(&self) -> Result<(), FormatError> {
        check("jobs", &self.format, JOBS_FORMAT)
    }
}

impl SignedResults {
    pub fn check_format(&self) -> Result<(), FormatError> {
        check("results", &self.format, RESULTS_FORMAT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_document_round_trips_and_refuses_unknown_fields_and_formats() {
        let doc = JobsDocument {
            format: JOBS_FORMAT.to_string(),
            relay_id: "agt_relay".to_string(),
            created_at_unix_ms: 1,
            agents: vec![AgentJobs {
                agent_id: "agt_leaf".to_string(),
                targets: vec![AirgapTarget {
                    name: "web".to_string(),
                    kind: "docker".to_string(),
                    config_json: "{}".to_string(),
                }],
                jobs: vec![AirgapJob {
                    job_id: "job_1".to_string(),
                    envelope: "{}".to_string(),
                }],
            }],
        };
        let json = serde_json::to_value(&doc).unwrap();
        let back: JobsDocument = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.agents[0].jobs[0].job_id, "job_1");
        assert_eq!(back.check_format(), Ok(()));

        let mut extra = json.clone();
        extra["agents"][0]["jobs"][0]["priority"] = 1.into();
        let err = serde_json::from_value::<JobsDocument>(extra).unwrap_err();
        assert!(err.to_string().contains("priority"), "{err}");

        let mut newer = json;
        newer["format"] = "stella.airgap.jobs/v2".into();
        let newer: JobsDocument = serde_json::from_value(newer).unwrap();
        let err = newer.check_format().unwrap_err().to_string();
        assert!(
            err.contains("stella.airgap.jobs/v2") && err.contains(JOBS_FORMAT),
            "{err}"
        );
    }

    #[test]
    fn a_results_file_names_its_format_when_unknown() {
        let file = SignedResults {
            format: "something/else".to_string(),
            relay_cert_pem: String::new(),
            payload: String::new(),
            signature: String::new(),
        };
        let err = file.check_format().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown air-gap results format \"something/else\" (expected stella.airgap.results/v1)"
        );
    }
}
