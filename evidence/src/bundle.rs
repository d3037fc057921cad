//! The export format: one JSON document that carries a run of packets and everything needed to
//! check them offline (evidence public keys, agent certificates, CA certificates), plus a
//! manifest signed by the exporting plane that pins the run's ends, so packets dropped from the
//! start or the end are as visible as packets dropped from the middle.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use stella_pki::{
    Envelope, PublicKeyRecord, SigningKey, cert_der_from_pem, fingerprint_der,
    is_valid_trust_domain, issued_by,
};
use time::OffsetDateTime;

use crate::EvidenceError;
use crate::packet::{SignedPacket, packet_digest};

/// `format` of a bundle document.
pub const BUNDLE_FORMAT: &str = "stella-evidence-bundle";
/// The bundle layout this crate writes and reads.
pub const BUNDLE_VERSION: u32 = 1;
/// DSSE `payloadType` of the bundle manifest.
pub const MANIFEST_PAYLOAD_TYPE: &str = "application/vnd.stella.evidence-manifest.v1+json";

/// An evidence public key and the period in which it signed packets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceKey {
    #[serde(flatten)]
    pub key: PublicKeyRecord,
    #[serde(with = "time::serde::rfc3339")]
    pub valid_from: OffsetDateTime,
    /// None while the key is current.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub valid_until: Option<OffsetDateTime>,
}

impl EvidenceKey {
    /// The key as current from `valid_from`, with no end yet.
    pub fn current(key: &SigningKey, valid_from: OffsetDateTime) -> Self {
        Self {
            key: key.public_key(),
            valid_from,
            valid_until: None,
        }
    }

    /// Whether a packet recorded at `at` falls in the key's period (end exclusive).
    pub fn covers(&self, at: OffsetDateTime) -> bool {
        at >= self.valid_from && self.valid_until.is_none_or(|until| at < until)
    }
}

/// A self-contained export of a run of consecutive packets.
///
/// Unknown fields are refused: a damaged field name must not pass as an absent optional field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// Always [`BUNDLE_FORMAT`].
    pub format: String,
    /// Always [`BUNDLE_VERSION`] for bundles this crate writes.
    pub version: u32,
    /// Trust domain of the agent identities (`spiffe://<trust_domain>/agent/<id>`).
    pub trust_domain: String,
    #[serde(with = "time::serde::rfc3339")]
    pub exported_at: OffsetDateTime,
    pub evidence_keys: Vec<EvidenceKey>,
    /// PEM certificates of the CAs that issued the agent certificates.
    pub ca_certificates: Vec<String>,
    /// PEM certificates whose keys signed the receipts in the packets, one per receipt key.
    pub agent_certificates: Vec<String>,
    /// In sequence order.
    pub packets: Vec<SignedPacket>,
    /// DSSE envelope over a [`BundleManifest`], signed by an evidence key.
    pub manifest: Envelope,
}

/// What the exporter signs about the run it exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleManifest {
    pub format: String,
    pub version: u32,
    pub trust_domain: String,
    #[serde(with = "time::serde::rfc3339")]
    pub exported_at: OffsetDateTime,
    pub packet_count: u64,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    /// The `previous` of the first packet: where this run attaches to an earlier export.
    pub first_previous: Option<String>,
    /// Digest of the last packet.
    pub head_digest: Option<String>,
    /// See [`material_digest`]: binds the keys (with their periods) and CA certificates the
    /// bundle was exported with.
    pub evidence_keys_digest: String,
    pub ca_certificates_digest: String,
}

/// `sha256:` over the canonical JSON of `items`: how the manifest pins the bundle's keys and CA
/// certificates.
pub fn material_digest<T: Serialize>(items: &[T]) -> Result<String, EvidenceError> {
    Ok(stella_pki::canonical_digest(items)?)
}

/// What the plane hands to [`Bundle::export`].
#[derive(Debug, Clone)]
pub struct BundleContents {
    pub trust_domain: String,
    /// Every key that signed one of the packets, plus the exporting key.
    pub evidence_keys: Vec<EvidenceKey>,
    pub ca_certificates: Vec<String>,
    /// At least the certificates of [`required_agent_certificates`]; others are left out.
    pub agent_certificates: Vec<String>,
    /// Consecutive packets in sequence order.
    pub packets: Vec<SignedPacket>,
}

/// Fingerprints (`sha256:…` of the DER) of the agent certificates whose keys signed the
/// receipts in `packets`: what the plane must look up to export them.
pub fn required_agent_certificates(
    packets: &[SignedPacket],
) -> Result<BTreeSet<String>, EvidenceError> {
    let mut needed = BTreeSet::new();
    for packet in packets {
        add_receipt_signers(&packet.statement()?, &mut needed);
    }
    Ok(needed)
}

fn add_receipt_signers(statement: &crate::Statement, needed: &mut BTreeSet<String>) {
    if let Some(execution) = &statement.predicate.content.execution {
        for job in &execution.jobs {
            for signature in &job.receipt.signatures {
                needed.insert(signature.keyid.clone());
            }
        }
    }
}

fn export_error(message: impl Into<String>) -> EvidenceError {
    EvidenceError::Export(message.into())
}

impl Bundle {
    /// Builds a bundle and signs its manifest with `key`. Refuses material that would make the
    /// bundle unverifiable for reasons unrelated to the packets themselves: a signer without its
    /// public key, a receipt without its certificate, a certificate from none of the given CAs.
    /// The packets are exported as they are: judging them is [`crate::verify_bundle`]'s job.
    pub fn export(
        contents: BundleContents,
        exported_at: OffsetDateTime,
        key: &SigningKey,
    ) -> Result<Bundle, EvidenceError> {
        let BundleContents {
            trust_domain,
            evidence_keys,
            ca_certificates,
            agent_certificates,
            packets,
        } = contents;
        if !is_valid_trust_domain(&trust_domain) {
            return Err(export_error(format!(
                "invalid trust domain {trust_domain:?}"
            )));
        }
        for record in &evidence_keys {
            record
                .key
                .verifying_key()
                .map_err(|e| export_error(e.to_string()))?;
        }
        let has_key = |key_id: &str| evidence_keys.iter().any(|k| k.key.key_id == key_id);
        if !evidence_keys.iter().any(|k| k.key == key.public_key()) {
            return Err(export_error(format!(
                "the exporting key {} is not among the evidence keys",
                key.key_id()
            )));
        }
        for packet in &packets {
            for signer in packet.signer_key_ids() {
                if !has_key(signer) {
                    return Err(export_error(format!(
                        "packet {} (sequence {}) is signed by key {signer}, which is not among the evidence keys",
                        packet.id, packet.sequence
                    )));
                }
            }
        }
        for (i, pem) in ca_certificates.iter().enumerate() {
            cert_der_from_pem(pem)
                .map_err(|e| export_error(format!("CA certificate #{}: {e}", i + 1)))?;
        }
        let mut by_fingerprint = std::collections::BTreeMap::new();
        for (i, pem) in agent_certificates.iter().enumerate() {
            let der = cert_der_from_pem(pem)
                .map_err(|e| export_error(format!("agent certificate #{}: {e}", i + 1)))?;
            by_fingerprint.insert(fingerprint_der(&der), (der, pem));
        }
        // Unreadable packets are exported as they are, for the verifier to point at.
        let mut needed = BTreeSet::new();
        for statement in packets.iter().filter_map(|p| p.statement().ok()) {
            add_receipt_signers(&statement, &mut needed);
        }
        let mut needed_pems = Vec::new();
        for fingerprint in needed {
            let (der, pem) = by_fingerprint.get(&fingerprint).ok_or_else(|| {
                export_error(format!(
                    "a receipt is signed by certificate {fingerprint}, which was not provided"
                ))
            })?;
            if !ca_certificates.iter().any(|ca| issued_by(der, ca)) {
                return Err(export_error(format!(
                    "agent certificate {fingerprint} was not issued by any of the provided CA certificates"
                )));
            }
            needed_pems.push((*pem).clone());
        }

        let mut digests = Vec::with_capacity(packets.len());
        for packet in &packets {
            digests.push(packet_digest(&packet.envelope)?);
        }
        let first_previous = packets
            .first()
            .and_then(|first| first.statement().ok())
            .and_then(|statement| statement.predicate.previous);
        let manifest = BundleManifest {
            format: BUNDLE_FORMAT.to_string(),
            version: BUNDLE_VERSION,
            trust_domain: trust_domain.clone(),
            exported_at,
            packet_count: packets.len() as u64,
            first_sequence: packets.first().map(|p| p.sequence),
            last_sequence: packets.last().map(|p| p.sequence),
            first_previous,
            head_digest: digests.last().cloned(),
            evidence_keys_digest: material_digest(&evidence_keys)?,
            ca_certificates_digest: material_digest(&ca_certificates)?,
        };
        let manifest = key.sign(
            MANIFEST_PAYLOAD_TYPE,
            &stella_pki::canonical_json(&manifest)?,
        );
        Ok(Bundle {
            format: BUNDLE_FORMAT.to_string(),
            version: BUNDLE_VERSION,
            trust_domain,
            exported_at,
            evidence_keys,
            ca_certificates,
            agent_certificates: needed_pems,
            packets,
            manifest,
        })
    }

    /// The bundle file's text (pretty-printed JSON).
    pub fn to_json(&self) -> Result<String, EvidenceError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Reads a bundle file, refusing other formats and versions by name before reading further.
    pub fn from_json(text: &str) -> Result<Bundle, EvidenceError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| EvidenceError::BundleFormat(format!("not JSON: {e}")))?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(BUNDLE_FORMAT) => {}
            other => {
                return Err(EvidenceError::BundleFormat(format!(
                    "format is {other:?}, expected {BUNDLE_FORMAT:?}"
                )));
            }
        }
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(BUNDLE_VERSION) => {}
            Some(v) => {
                return Err(EvidenceError::BundleFormat(format!(
                    "bundle version {v}; this verifier reads version {BUNDLE_VERSION}"
                )));
            }
            None => {
                return Err(EvidenceError::BundleFormat(
                    "bundle has no numeric version".to_string(),
                ));
            }
        }
        // Decode packets one by one first so that a damaged one is named by its position.
        if let Some(packets) = value.get("packets").and_then(|p| p.as_array()) {
            for (index, packet) in packets.iter().enumerate() {
                SignedPacket::deserialize(packet).map_err(|e| {
                    EvidenceError::BundleFormat(format!(
                        "packet at position {} cannot be read: {e}",
                        index + 1
                    ))
                })?;
            }
        }
        serde_json::from_value(value).map_err(|e| EvidenceError::BundleFormat(e.to_string()))
    }
}
