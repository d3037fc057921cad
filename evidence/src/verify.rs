//! Offline verification of a bundle: every check `stella evidence verify` runs lives here, and
//! the report renders itself for a person (`Display`) or a program (`Serialize`).
//!
//! Verification never stops at the first problem: it walks every packet and records each
//! failed check where it happened, so a person sees the whole damage and the first broken link.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use stella_pki::{
    DsseError, Envelope, PublicKeyRecord, TrustedKeys, agent_id_from_cert, cert_der_from_pem,
    cert_validity, decode_payload, fingerprint_der, is_valid_trust_domain, issued_by,
    verify_receipt,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::bundle::{
    BUNDLE_FORMAT, BUNDLE_VERSION, Bundle, BundleManifest, EvidenceKey, MANIFEST_PAYLOAD_TYPE,
    material_digest,
};
use crate::packet::{SignedPacket, packet_digest, packet_id, parse_statement};
use crate::predicate::{
    JobEvidence, PACKET_PAYLOAD_TYPE, Statement, read_receipt, receipt_mismatch, subjects_for,
};

/// Which check failed. `code()` is stable for scripts; `Display` is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// The bundle's format, version or trust domain.
    BundleFormat,
    /// An evidence key record in the bundle is unusable.
    EvidenceKey,
    /// A certificate in the bundle does not parse.
    Certificate,
    /// The signed manifest does not verify, or disagrees with the bundle.
    Manifest,
    /// The id, sequence or digest stored beside an envelope disagrees with the envelope.
    RecordedDigest,
    /// Signed only by keys the bundle does not carry.
    UnknownKey,
    /// Signed by a key the bundle carries but the caller did not pin.
    UntrustedKey,
    /// The signature does not verify (or the envelope is malformed).
    Signature,
    /// Signed by a key outside the period the bundle gives for it.
    KeyValidity,
    /// The payload is not an in-toto Statement v1 with Stella's predicate type.
    Statement,
    /// The predicate is not a well-formed packet of its kind.
    Predicate,
    /// Sequences are not contiguous: packets missing, repeated or out of order.
    Sequence,
    /// `previous` does not name the digest of the packet before.
    ChainLink,
    /// The subjects are not exactly the release components' digests.
    Subjects,
    /// A receipt's certificate is not in the bundle.
    MissingAgentCertificate,
    /// A receipt's certificate is not from a bundle CA, not the job's agent, or not valid when
    /// the receipt was made.
    AgentCertificate,
    /// A receipt does not verify, or attests another job, agent or status.
    Receipt,
}

impl Check {
    pub fn code(self) -> &'static str {
        match self {
            Self::BundleFormat => "bundle_format",
            Self::EvidenceKey => "evidence_key",
            Self::Certificate => "certificate",
            Self::Manifest => "manifest",
            Self::RecordedDigest => "recorded_digest",
            Self::UnknownKey => "unknown_key",
            Self::UntrustedKey => "untrusted_key",
            Self::Signature => "signature",
            Self::KeyValidity => "key_validity",
            Self::Statement => "statement",
            Self::Predicate => "predicate",
            Self::Sequence => "sequence",
            Self::ChainLink => "chain_link",
            Self::Subjects => "subjects",
            Self::MissingAgentCertificate => "missing_agent_certificate",
            Self::AgentCertificate => "agent_certificate",
            Self::Receipt => "receipt",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A packet as the report names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PacketRef {
    /// 0-based position in the bundle.
    pub index: usize,
    /// The sequence the packet's payload states (the stored one if the payload is unreadable).
    pub sequence: u64,
    /// The id stored with the packet.
    pub id: String,
}

impl fmt::Display for PacketRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "packet at position {} (sequence {}, id {})",
            self.index + 1,
            self.sequence,
            self.id
        )
    }
}

/// Where a problem is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "at", rename_all = "snake_case")]
pub enum Location {
    /// The bundle's own material: format, keys, certificates, manifest.
    Bundle,
    Packet(PacketRef),
    /// One job of a packet's execution.
    Job {
        packet: PacketRef,
        job_index: usize,
        job_id: String,
    },
    /// Past the last packet: packets the manifest promises are not there.
    End {
        after: Option<PacketRef>,
        expected_sequence: Option<u64>,
    },
}

impl Location {
    /// The packet the problem is in, if it is in one.
    pub fn packet(&self) -> Option<&PacketRef> {
        match self {
            Self::Packet(p) | Self::Job { packet: p, .. } => Some(p),
            Self::Bundle | Self::End { .. } => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bundle => f.write_str("bundle"),
            Self::Packet(p) => write!(f, "{p}"),
            Self::Job {
                packet,
                job_index,
                job_id,
            } => write!(f, "{packet}, job #{} ({job_id})", job_index + 1),
            Self::End {
                after: Some(p),
                expected_sequence,
            } => {
                write!(f, "end of the bundle, after {p}")?;
                if let Some(s) = expected_sequence {
                    write!(f, " (expected sequence {s} next)")?;
                }
                Ok(())
            }
            Self::End { after: None, .. } => f.write_str("end of the bundle (no packets)"),
        }
    }
}

/// One failed check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub location: Location,
    pub check: Check,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: [{}] {}", self.location, self.check, self.detail)
    }
}

/// The outcome of [`verify_bundle`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerificationReport {
    pub trust_domain: String,
    #[serde(with = "time::serde::rfc3339")]
    pub exported_at: OffsetDateTime,
    pub packet_count: usize,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    /// Recomputed digest of the last packet.
    pub head_digest: Option<String>,
    /// `previous` of the first packet: set when the bundle continues an earlier export.
    pub anchor: Option<String>,
    /// The evidence keys the verdict relies on (taken from the bundle): `key_id (validity)`.
    pub evidence_keys: Vec<String>,
    /// Fingerprints of the bundle's CA certificates.
    pub ca_fingerprints: Vec<String>,
    pub receipts_verified: usize,
    /// Whether the evidence keys were pinned by the caller ([`verify_bundle_pinned`]) rather
    /// than taken from the bundle.
    pub keys_pinned: bool,
    /// In the order found: bundle material, then packets in order, then the end of the run.
    pub problems: Vec<Problem>,
}

impl VerificationReport {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }

    /// The earliest problem in the chain itself (a packet, one of its jobs, or packets missing
    /// at the end), ignoring problems with the bundle's own material.
    pub fn first_broken_link(&self) -> Option<&Problem> {
        self.problems
            .iter()
            .find(|p| !matches!(p.location, Location::Bundle))
    }
}

impl fmt::Display for VerificationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Evidence bundle of trust domain {}, exported {}",
            self.trust_domain,
            rfc3339(self.exported_at)
        )?;
        match (self.first_sequence, self.last_sequence) {
            (Some(first), Some(last)) => writeln!(
                f,
                "  packets:   {} (sequence {first} to {last})",
                self.packet_count
            )?,
            _ => writeln!(f, "  packets:   {}", self.packet_count)?,
        }
        if let Some(head) = &self.head_digest {
            writeln!(f, "  head:      {head}")?;
        }
        match &self.anchor {
            Some(anchor) => writeln!(f, "  continues: {anchor} (last packet of an earlier run)")?,
            None => writeln!(f, "  continues: nothing (the run starts the chain)")?,
        }
        for key in &self.evidence_keys {
            writeln!(f, "  key:       {key}")?;
        }
        for ca in &self.ca_fingerprints {
            writeln!(f, "  CA:        {ca}")?;
        }
        writeln!(f, "  receipts:  {} verified", self.receipts_verified)?;
        if self.keys_pinned {
            writeln!(
                f,
                "  Evidence keys are pinned; CA certificates come from the bundle itself."
            )?;
        } else {
            writeln!(
                f,
                "  Keys and CA certificates come from the bundle itself: compare them with the ones the plane publishes."
            )?;
        }
        if self.is_valid() {
            return writeln!(
                f,
                "VERIFIED: every signature, receipt and chain link checks out."
            );
        }
        writeln!(f, "FAILED: {} problem(s).", self.problems.len())?;
        if let Some(first) = self.first_broken_link() {
            writeln!(f, "First broken link: {first}")?;
        }
        writeln!(f, "All problems:")?;
        for (i, problem) in self.problems.iter().enumerate() {
            writeln!(f, "  {}. {problem}", i + 1)?;
        }
        Ok(())
    }
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

fn validity_text(key: &EvidenceKey) -> String {
    let until = key.valid_until.map_or_else(
        || "current".to_string(),
        |u| format!("until {}", rfc3339(u)),
    );
    format!(
        "{} (from {}, {until})",
        key.key.key_id,
        rfc3339(key.valid_from)
    )
}

/// Checks a bundle fully offline. See [`Check`] for what is checked; nothing here touches the
/// network, the clock or the filesystem, so the verdict depends on the bundle alone.
pub fn verify_bundle(bundle: &Bundle) -> VerificationReport {
    run(bundle, None)
}

/// [`verify_bundle`], trusting only the evidence keys in `pinned` (matched by key id and public
/// key): whoever can rewrite a bundle can also swap its keys and re-sign everything, so an
/// auditor who knows the plane's keys should pin them.
pub fn verify_bundle_pinned(bundle: &Bundle, pinned: &[PublicKeyRecord]) -> VerificationReport {
    run(bundle, Some(pinned))
}

fn run(bundle: &Bundle, pinned: Option<&[PublicKeyRecord]>) -> VerificationReport {
    let mut verifier = Verifier::new(bundle, pinned);
    verifier.check_material();
    let manifest = verifier.check_manifest();
    let tail = verifier.walk_packets(manifest.as_ref());
    if let Some(manifest) = &manifest {
        verifier.check_end(manifest, tail);
    }
    verifier.report
}

struct Verifier<'a> {
    bundle: &'a Bundle,
    /// Key records that decode; unusable ones are reported once and left out.
    usable_keys: Vec<&'a EvidenceKey>,
    pinned: Option<&'a [PublicKeyRecord]>,
    /// Whether a bundle CA issued the agent certificate, by fingerprint (asked once).
    issued_by_bundle_ca: BTreeMap<String, bool>,
    /// Agent certificates by fingerprint.
    agent_certs: BTreeMap<String, Vec<u8>>,
    report: VerificationReport,
}

/// What the walk knows about the last packet it saw.
struct Tail {
    packet: Option<PacketRef>,
    digest: Option<String>,
}

/// The result of a signature check: the key that verified, if one did.
enum Signed<'a> {
    By(&'a EvidenceKey),
    Not,
}

impl<'a> Verifier<'a> {
    fn new(bundle: &'a Bundle, pinned: Option<&'a [PublicKeyRecord]>) -> Self {
        Self {
            bundle,
            usable_keys: Vec::new(),
            pinned,
            issued_by_bundle_ca: BTreeMap::new(),
            agent_certs: BTreeMap::new(),
            report: VerificationReport {
                trust_domain: bundle.trust_domain.clone(),
                exported_at: bundle.exported_at,
                packet_count: bundle.packets.len(),
                first_sequence: None,
                last_sequence: None,
                head_digest: None,
                anchor: None,
                evidence_keys: bundle.evidence_keys.iter().map(validity_text).collect(),
                ca_fingerprints: Vec::new(),
                receipts_verified: 0,
                keys_pinned: pinned.is_some(),
                problems: Vec::new(),
            },
        }
    }

    fn problem(&mut self, location: Location, check: Check, detail: impl Into<String>) {
        self.report.problems.push(Problem {
            location,
            check,
            detail: detail.into(),
        });
    }

    fn check_material(&mut self) {
        let bundle = self.bundle;
        if bundle.format != BUNDLE_FORMAT || bundle.version != BUNDLE_VERSION {
            self.problem(
                Location::Bundle,
                Check::BundleFormat,
                format!(
                    "format {:?} version {}, expected {BUNDLE_FORMAT:?} version {BUNDLE_VERSION}",
                    bundle.format, bundle.version
                ),
            );
        }
        if !is_valid_trust_domain(&bundle.trust_domain) {
            self.problem(
                Location::Bundle,
                Check::BundleFormat,
                format!("invalid trust domain {:?}", bundle.trust_domain),
            );
        }
        if bundle.evidence_keys.is_empty() {
            self.problem(
                Location::Bundle,
                Check::EvidenceKey,
                "the bundle carries no evidence keys: no signature can be checked",
            );
        }
        for key in &bundle.evidence_keys {
            if let Err(e) = key.key.verifying_key() {
                self.problem(
                    Location::Bundle,
                    Check::EvidenceKey,
                    format!("evidence key {} is unusable: {e}", key.key.key_id),
                );
                continue;
            }
            if key.valid_until.is_some_and(|until| until <= key.valid_from) {
                self.problem(
                    Location::Bundle,
                    Check::EvidenceKey,
                    format!(
                        "evidence key {} has an empty validity period",
                        key.key.key_id
                    ),
                );
                continue;
            }
            if let Some(pinned) = self.pinned
                && !pinned.contains(&key.key)
            {
                self.problem(
                    Location::Bundle,
                    Check::UntrustedKey,
                    format!(
                        "evidence key {} is not among the pinned keys",
                        key.key.key_id
                    ),
                );
                continue;
            }
            self.usable_keys.push(key);
        }
        for (i, pem) in bundle.ca_certificates.iter().enumerate() {
            match cert_der_from_pem(pem) {
                Ok(der) => self.report.ca_fingerprints.push(fingerprint_der(&der)),
                Err(e) => self.problem(
                    Location::Bundle,
                    Check::Certificate,
                    format!("CA certificate #{} does not parse: {e}", i + 1),
                ),
            }
        }
        for (i, pem) in bundle.agent_certificates.iter().enumerate() {
            match cert_der_from_pem(pem) {
                Ok(der) => {
                    self.agent_certs.insert(fingerprint_der(&der), der);
                }
                Err(e) => self.problem(
                    Location::Bundle,
                    Check::Certificate,
                    format!("agent certificate #{} does not parse: {e}", i + 1),
                ),
            }
        }
    }

    /// Verifies `env` against the bundle's keys; reports at `location` and returns the key that
    /// verified. Payload-type mismatches are left to the caller, which knows what it expected.
    fn check_signature(
        &mut self,
        location: &Location,
        env: &Envelope,
        payload_type: &str,
    ) -> Signed<'a> {
        if env.signatures.is_empty() {
            self.problem(
                location.clone(),
                Check::Signature,
                "the envelope carries no signature",
            );
            return Signed::Not;
        }
        let mut failures = Vec::new();
        let mut known = false;
        for signature in &env.signatures {
            let candidates: Vec<&'a EvidenceKey> = self
                .usable_keys
                .iter()
                .copied()
                .filter(|k| k.key.key_id == signature.keyid)
                .collect();
            known |= !candidates.is_empty()
                || self
                    .bundle
                    .evidence_keys
                    .iter()
                    .any(|k| k.key.key_id == signature.keyid);
            for key in candidates {
                let trusted = TrustedKeys {
                    keys: vec![key.key.clone()],
                };
                match trusted.verify(env, payload_type) {
                    Ok(_) | Err(DsseError::WrongPayloadType { .. }) => return Signed::By(key),
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
        let untrusted = self.pinned.is_some_and(|pinned| {
            env.signatures.iter().any(|s| {
                self.bundle
                    .evidence_keys
                    .iter()
                    .any(|k| k.key.key_id == s.keyid && !pinned.contains(&k.key))
            })
        });
        if untrusted && failures.is_empty() {
            let signers: Vec<&str> = env.signatures.iter().map(|s| s.keyid.as_str()).collect();
            self.problem(
                location.clone(),
                Check::UntrustedKey,
                format!(
                    "signed by key {}, which the bundle carries but is not pinned",
                    signers.join(", ")
                ),
            );
        } else if !known {
            let signers: Vec<&str> = env.signatures.iter().map(|s| s.keyid.as_str()).collect();
            let carried: Vec<&str> = self
                .bundle
                .evidence_keys
                .iter()
                .map(|k| k.key.key_id.as_str())
                .collect();
            self.problem(
                location.clone(),
                Check::UnknownKey,
                format!(
                    "signed by key {}, which the bundle does not carry (it carries: {})",
                    signers.join(", "),
                    if carried.is_empty() {
                        "none".to_string()
                    } else {
                        carried.join(", ")
                    }
                ),
            );
        } else if failures.is_empty() {
            self.problem(
                location.clone(),
                Check::Signature,
                "the signing key's record in the bundle is unusable",
            );
        } else {
            self.problem(location.clone(), Check::Signature, failures.join("; "));
        }
        Signed::Not
    }

    fn check_manifest(&mut self) -> Option<BundleManifest> {
        let bundle = self.bundle;
        let env = &bundle.manifest;
        let signed = self.check_signature(&Location::Bundle, env, MANIFEST_PAYLOAD_TYPE);
        let unchecked = "the ends of the run cannot be checked";
        if env.payload_type != MANIFEST_PAYLOAD_TYPE {
            self.problem(
                Location::Bundle,
                Check::Manifest,
                format!(
                    "manifest payload type is {:?}, expected {MANIFEST_PAYLOAD_TYPE:?}; {unchecked}",
                    env.payload_type
                ),
            );
            return None;
        }
        let Signed::By(key) = signed else {
            self.problem(
                Location::Bundle,
                Check::Manifest,
                format!("the manifest signature does not verify; {unchecked}"),
            );
            return None;
        };
        let manifest: BundleManifest = match decode_payload(env)
            .map_err(|e| e.to_string())
            .and_then(|body| serde_json::from_slice(&body).map_err(|e| e.to_string()))
        {
            Ok(m) => m,
            Err(e) => {
                self.problem(
                    Location::Bundle,
                    Check::Manifest,
                    format!("the manifest does not parse ({e}); {unchecked}"),
                );
                return None;
            }
        };
        if manifest.trust_domain != bundle.trust_domain
            || manifest.exported_at != bundle.exported_at
            || manifest.format != bundle.format
            || manifest.version != bundle.version
        {
            self.problem(
                Location::Bundle,
                Check::Manifest,
                "the bundle's format, version, trust domain or export time differ from its signed manifest",
            );
        }
        let keys_match = material_digest(&bundle.evidence_keys)
            .is_ok_and(|d| d == manifest.evidence_keys_digest);
        if !keys_match {
            self.problem(
                Location::Bundle,
                Check::Manifest,
                "the bundle's evidence keys or their periods differ from those the manifest was signed over",
            );
        }
        let cas_match = material_digest(&bundle.ca_certificates)
            .is_ok_and(|d| d == manifest.ca_certificates_digest);
        if !cas_match {
            self.problem(
                Location::Bundle,
                Check::Manifest,
                "the bundle's CA certificates differ from those the manifest was signed over",
            );
        }
        if !key.covers(manifest.exported_at) {
            self.problem(
                Location::Bundle,
                Check::KeyValidity,
                format!(
                    "the manifest was signed at {} by {}, outside the key's period",
                    rfc3339(manifest.exported_at),
                    validity_text(key)
                ),
            );
        }
        Some(manifest)
    }

    fn walk_packets(&mut self, manifest: Option<&BundleManifest>) -> Tail {
        let mut tail = Tail {
            packet: None,
            digest: None,
        };
        let mut last_sequence: Option<u64> = None;
        for (index, packet) in self.bundle.packets.iter().enumerate() {
            let digest = packet_digest(&packet.envelope).ok();
            let statement = decode_statement(packet);
            let sequence = statement
                .as_ref()
                .map_or(packet.sequence, |s| s.predicate.sequence);
            let at = PacketRef {
                index,
                sequence,
                id: packet.id.clone(),
            };
            if index == 0 {
                self.report.first_sequence = Some(sequence);
                self.report.anchor = statement
                    .as_ref()
                    .ok()
                    .and_then(|s| s.predicate.previous.clone());
            }
            self.report.last_sequence = Some(sequence);
            self.report.head_digest = digest.clone();

            let location = Location::Packet(at.clone());
            // The signature first: when an envelope was altered, that is the cause, and the
            // stored digest no longer matching is its consequence.
            let signed = self.check_signature(&location, &packet.envelope, PACKET_PAYLOAD_TYPE);
            self.check_recorded(&location, packet, digest.as_deref(), &statement);
            match &statement {
                Err(e) => self.problem(location.clone(), Check::Statement, e.clone()),
                Ok(statement) => {
                    self.check_content(&at, statement, signed);
                    self.check_position(
                        &location,
                        statement,
                        last_sequence,
                        &tail,
                        manifest.filter(|_| index == 0),
                    );
                }
            }
            // An unreadable packet still occupies the next sequence, so its successor is
            // judged against the chain rather than reported as a second gap.
            last_sequence = Some(match &statement {
                Ok(s) => s.predicate.sequence,
                Err(_) => last_sequence.map_or(packet.sequence, |s| s.saturating_add(1)),
            });
            tail = Tail {
                packet: Some(at),
                digest,
            };
        }
        tail
    }

    fn check_recorded(
        &mut self,
        location: &Location,
        packet: &SignedPacket,
        digest: Option<&str>,
        statement: &Result<Statement, String>,
    ) {
        let Some(digest) = digest else {
            self.problem(
                location.clone(),
                Check::RecordedDigest,
                "the envelope cannot be hashed",
            );
            return;
        };
        let mut mismatches = Vec::new();
        if packet.digest != digest {
            mismatches.push(format!(
                "stored digest {} but the envelope hashes to {digest}",
                packet.digest
            ));
        }
        let id = packet_id(digest);
        if packet.id != id {
            mismatches.push(format!(
                "stored id {} but the envelope's id is {id}",
                packet.id
            ));
        }
        if let Ok(statement) = statement
            && statement.predicate.sequence != packet.sequence
        {
            mismatches.push(format!(
                "stored sequence {} but the payload says {}",
                packet.sequence, statement.predicate.sequence
            ));
        }
        if !mismatches.is_empty() {
            self.problem(
                location.clone(),
                Check::RecordedDigest,
                mismatches.join("; "),
            );
        }
    }

    fn check_content(&mut self, at: &PacketRef, statement: &Statement, signed: Signed<'a>) {
        let location = Location::Packet(at.clone());
        let content = &statement.predicate.content;
        if let Err(e) = content.validate() {
            self.problem(location.clone(), Check::Predicate, e.to_string());
        }
        let expected = subjects_for(&content.release);
        let mut actual = statement.subject.clone();
        actual.sort_by(|a, b| a.name.cmp(&b.name));
        let mut wanted = expected.clone();
        wanted.sort_by(|a, b| a.name.cmp(&b.name));
        if actual != wanted {
            let list = |subjects: &[crate::Subject]| {
                subjects
                    .iter()
                    .map(|s| {
                        let digests: Vec<String> = s
                            .digest
                            .iter()
                            .map(|(alg, hex)| format!("{alg}:{hex}"))
                            .collect();
                        format!("{}@{}", s.name, digests.join("+"))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            self.problem(
                location.clone(),
                Check::Subjects,
                format!(
                    "subjects [{}] are not the release components [{}]",
                    list(&statement.subject),
                    list(&expected)
                ),
            );
        }
        if let Signed::By(key) = signed
            && !key.covers(content.recorded_at)
        {
            self.problem(
                location.clone(),
                Check::KeyValidity,
                format!(
                    "recorded at {} but signed by {}",
                    rfc3339(content.recorded_at),
                    validity_text(key)
                ),
            );
        }
        if let Some(execution) = &content.execution {
            for (job_index, job) in execution.jobs.iter().enumerate() {
                let location = Location::Job {
                    packet: at.clone(),
                    job_index,
                    job_id: job.job_id.clone(),
                };
                if self.check_receipt(&location, job) {
                    self.report.receipts_verified += 1;
                }
            }
        }
    }

    fn check_position(
        &mut self,
        location: &Location,
        statement: &Statement,
        last_sequence: Option<u64>,
        tail: &Tail,
        first_of_manifest: Option<&BundleManifest>,
    ) {
        let sequence = statement.predicate.sequence;
        let previous = statement.predicate.previous.as_deref();
        match last_sequence {
            None => {
                if let Some(manifest) = first_of_manifest {
                    if let Some(first) = manifest.first_sequence
                        && first != sequence
                    {
                        let detail = if sequence > first {
                            format!(
                                "the signed manifest says the run starts at sequence {first}; {}",
                                missing(first, sequence - 1)
                            )
                        } else {
                            format!(
                                "the signed manifest says the run starts at sequence {first}, this packet has {sequence}"
                            )
                        };
                        self.problem(location.clone(), Check::Sequence, detail);
                    }
                    if manifest.first_previous.as_deref() != previous {
                        self.problem(
                            location.clone(),
                            Check::ChainLink,
                            format!(
                                "names previous {}, the signed manifest says the run continues {}",
                                previous.unwrap_or("nothing"),
                                manifest.first_previous.as_deref().unwrap_or("nothing")
                            ),
                        );
                    }
                }
                if sequence == 0 {
                    self.problem(location.clone(), Check::Sequence, "sequences start at 1");
                } else if sequence == 1 && previous.is_some() {
                    self.problem(
                        location.clone(),
                        Check::ChainLink,
                        "the first packet of a chain names a previous packet",
                    );
                } else if sequence > 1 && previous.is_none() {
                    self.problem(
                        location.clone(),
                        Check::ChainLink,
                        format!("sequence {sequence} names no previous packet"),
                    );
                }
            }
            Some(last) => {
                let expected = last.saturating_add(1);
                if sequence != expected {
                    let detail = if sequence > expected {
                        format!(
                            "sequence {sequence} follows {last}: {}",
                            missing(expected, sequence - 1)
                        )
                    } else {
                        format!(
                            "sequence {sequence} follows {last}: packets are repeated or out of order (expected {expected})"
                        )
                    };
                    self.problem(location.clone(), Check::Sequence, detail);
                }
                if let Some(before) = &tail.digest
                    && previous != Some(before.as_str())
                {
                    let by = tail
                        .packet
                        .as_ref()
                        .map_or_else(String::new, |p| format!(" ({p})"));
                    self.problem(
                        location.clone(),
                        Check::ChainLink,
                        format!(
                            "names previous {}, but the packet before it{by} has digest {before}",
                            previous.unwrap_or("nothing")
                        ),
                    );
                }
            }
        }
    }

    /// Checks one job's receipt; true when it fully verifies.
    fn check_receipt(&mut self, location: &Location, job: &JobEvidence) -> bool {
        let receipt = &job.receipt;
        let Some(signature) = receipt.signatures.first() else {
            self.problem(
                location.clone(),
                Check::Receipt,
                "the receipt carries no signature",
            );
            return false;
        };
        let fingerprint = signature.keyid.clone();
        let Some(der) = self.agent_certs.get(&fingerprint).cloned() else {
            self.problem(
                location.clone(),
                Check::MissingAgentCertificate,
                format!(
                    "the receipt is signed by certificate {fingerprint}, which the bundle does not carry"
                ),
            );
            return false;
        };
        let mut ok = true;
        let bundle = self.bundle;
        let from_bundle_ca = *self
            .issued_by_bundle_ca
            .entry(fingerprint.clone())
            .or_insert_with(|| bundle.ca_certificates.iter().any(|ca| issued_by(&der, ca)));
        if !from_bundle_ca {
            self.problem(
                location.clone(),
                Check::AgentCertificate,
                format!("certificate {fingerprint} was not issued by any CA in the bundle"),
            );
            ok = false;
        }
        match agent_id_from_cert(&der, &self.bundle.trust_domain) {
            Ok(agent) if agent == job.agent_id => {}
            Ok(agent) => {
                self.problem(
                    location.clone(),
                    Check::AgentCertificate,
                    format!(
                        "certificate {fingerprint} belongs to agent {agent:?}, the job ran on {:?}",
                        job.agent_id
                    ),
                );
                ok = false;
            }
            Err(e) => {
                self.problem(
                    location.clone(),
                    Check::AgentCertificate,
                    format!("certificate {fingerprint} carries no usable agent identity: {e}"),
                );
                ok = false;
            }
        }
        let attested = match verify_receipt(&der, receipt) {
            Ok(attested) => attested,
            Err(e) => {
                // Say what the forged receipt claims, so a reader sees what was attempted.
                let claims = read_receipt(receipt)
                    .map(|r| format!(" (it claims job {:?}, status {:?})", r.job_id, r.status))
                    .unwrap_or_default();
                self.problem(location.clone(), Check::Receipt, format!("{e}{claims}"));
                return false;
            }
        };
        if let Some(mismatch) = receipt_mismatch(job, &attested) {
            self.problem(location.clone(), Check::Receipt, mismatch);
            ok = false;
        }
        if let Some((not_before, not_after)) = cert_validity(&der) {
            let made_at = attested.finished_at_unix_ms.div_euclid(1000);
            if made_at < not_before || made_at > not_after {
                self.problem(
                    location.clone(),
                    Check::AgentCertificate,
                    format!(
                        "the receipt was made at unix time {made_at}, outside certificate {fingerprint}'s validity ({not_before} to {not_after})"
                    ),
                );
                ok = false;
            }
        }
        ok
    }

    fn check_end(&mut self, manifest: &BundleManifest, tail: Tail) {
        let actual_last = tail.packet.as_ref().map(|p| p.sequence);
        let location = Location::End {
            after: tail.packet.clone(),
            expected_sequence: match (manifest.last_sequence, actual_last) {
                (Some(last), Some(actual)) if last > actual => Some(actual + 1),
                (Some(_), None) => manifest.first_sequence,
                _ => None,
            },
        };
        if manifest.last_sequence != actual_last {
            let detail = match (manifest.last_sequence, actual_last) {
                (Some(last), Some(actual)) if last > actual => format!(
                    "the signed manifest says the run ends at sequence {last}; {}",
                    missing(actual + 1, last)
                ),
                (Some(last), None) => format!(
                    "the signed manifest says the run ends at sequence {last}, the bundle holds no packets"
                ),
                (last, actual) => format!(
                    "the signed manifest says the run ends at sequence {}, the bundle ends at {}",
                    last.map_or_else(|| "none".to_string(), |s| s.to_string()),
                    actual.map_or_else(|| "none".to_string(), |s| s.to_string()),
                ),
            };
            self.problem(location.clone(), Check::Sequence, detail);
        } else if manifest.head_digest != tail.digest {
            self.problem(
                location.clone(),
                Check::Manifest,
                format!(
                    "the last packet's digest is {}, the signed manifest says {}",
                    tail.digest.as_deref().unwrap_or("none"),
                    manifest.head_digest.as_deref().unwrap_or("none")
                ),
            );
        }
        if manifest.packet_count != self.bundle.packets.len() as u64 {
            self.problem(
                location,
                Check::Manifest,
                format!(
                    "the bundle holds {} packets, the signed manifest says {}",
                    self.bundle.packets.len(),
                    manifest.packet_count
                ),
            );
        }
    }
}

fn missing(from: u64, to: u64) -> String {
    if from == to {
        format!("packet {from} is missing")
    } else {
        format!("packets {from} to {to} are missing")
    }
}

/// The statement of a packet as the verifier reads it: payload type, base64, JSON, in-toto
/// Statement v1, Stella predicate type.
fn decode_statement(packet: &SignedPacket) -> Result<Statement, String> {
    if packet.envelope.payload_type != PACKET_PAYLOAD_TYPE {
        return Err(format!(
            "payload type is {:?}, expected {PACKET_PAYLOAD_TYPE:?}",
            packet.envelope.payload_type
        ));
    }
    let body = decode_payload(&packet.envelope).map_err(|e| e.to_string())?;
    parse_statement(&body)
}
