//! Signed packets and the chain that numbers and links them.

use serde::{Deserialize, Serialize};
use stella_pki::{Envelope, SigningKey, canonical_digest, canonical_json, decode_payload};

use crate::EvidenceError;
use crate::predicate::{
    EvidencePredicate, PACKET_PAYLOAD_TYPE, PREDICATE_TYPE, PacketContent, STATEMENT_TYPE,
    Statement, is_sha256_digest, subjects_for,
};

/// A packet as the plane stores and exports it. Only `envelope` is signed; `id`, `sequence`
/// and `digest` are derived from it and kept beside it for lookups, and verification recomputes
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPacket {
    /// `ev_` + the first 24 hex digits of `digest`: content-addressed, so it cannot be moved to
    /// another packet.
    pub id: String,
    pub sequence: u64,
    /// See [`packet_digest`].
    pub digest: String,
    /// DSSE envelope (payload type [`PACKET_PAYLOAD_TYPE`]) over the statement's canonical JSON.
    pub envelope: Envelope,
}

/// The digest that identifies a packet and that the next packet names as `previous`:
/// `"sha256:" + hex(SHA-256(canonical_json(envelope)))`, where the envelope is the DSSE JSON
/// object `{"payload": <standard base64>, "payloadType": …, "signatures": [{"keyid", "sig"}]}`
/// and canonical JSON is `stella_pki::canonical_json` (keys sorted, no whitespace). The payload
/// is the base64 of the exact signed bytes, so the digest covers the statement byte for byte and
/// its signatures: changing either changes the digest.
pub fn packet_digest(envelope: &Envelope) -> Result<String, EvidenceError> {
    Ok(canonical_digest(envelope)?)
}

/// The packet id for a packet digest (see [`SignedPacket::id`]).
pub fn packet_id(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    format!("ev_{}", hex.get(..24).unwrap_or(hex))
}

impl SignedPacket {
    /// Rebuilds the stored form from an envelope, e.g. one read back from storage. The signature
    /// is NOT checked here; [`crate::verify_bundle`] does that.
    pub fn from_envelope(envelope: Envelope) -> Result<Self, EvidenceError> {
        let digest = packet_digest(&envelope)?;
        let packet = Self {
            id: packet_id(&digest),
            sequence: 0,
            digest,
            envelope,
        };
        let sequence = packet.statement()?.predicate.sequence;
        Ok(Self { sequence, ..packet })
    }

    /// The statement the envelope carries, decoded WITHOUT checking the signature: for showing
    /// and listing packets the caller already holds (from its own store or a verified bundle).
    pub fn statement(&self) -> Result<Statement, EvidenceError> {
        if self.envelope.payload_type != PACKET_PAYLOAD_TYPE {
            return Err(EvidenceError::Decode(format!(
                "payload type is {:?}, expected {PACKET_PAYLOAD_TYPE:?}",
                self.envelope.payload_type
            )));
        }
        let body =
            decode_payload(&self.envelope).map_err(|e| EvidenceError::Decode(e.to_string()))?;
        parse_statement(&body).map_err(EvidenceError::Decode)
    }

    /// The key ids that signed the envelope.
    pub fn signer_key_ids(&self) -> Vec<&str> {
        self.envelope
            .signatures
            .iter()
            .map(|s| s.keyid.as_str())
            .collect()
    }
}

/// Parses a statement payload, naming the first thing that makes it not a Stella statement.
pub(crate) fn parse_statement(body: &[u8]) -> Result<Statement, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("payload is not JSON: {e}"))?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str());
    match field("_type") {
        Some(STATEMENT_TYPE) => {}
        other => {
            return Err(format!(
                "_type is {other:?}, expected {STATEMENT_TYPE:?} (in-toto Statement v1)"
            ));
        }
    }
    match field("predicateType") {
        Some(PREDICATE_TYPE) => {}
        other => {
            return Err(format!(
                "predicateType is {other:?}, expected {PREDICATE_TYPE:?}"
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| format!("statement does not parse: {e}"))
}

/// Where a chain ends: the last packet's sequence and digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    pub sequence: u64,
    pub digest: String,
}

/// Numbers and links packets. The plane keeps the packets; this holds only the head.
///
/// The chain is linear, so appends must be serialised: resume from the stored head inside the
/// same transaction that inserts the new packet, so that a failed insert leaves nothing behind
/// and two writers cannot both take the same sequence.
#[derive(Debug, Clone, Default)]
pub struct EvidenceChain {
    head: Option<ChainHead>,
}

impl EvidenceChain {
    /// A chain with no packets yet: the next packet gets sequence 1 and no `previous`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Continues after a stored head.
    pub fn resume(head: ChainHead) -> Result<Self, EvidenceError> {
        if head.sequence == 0 {
            return Err(EvidenceError::invalid(
                "head.sequence",
                "sequences start at 1",
            ));
        }
        if !is_sha256_digest(&head.digest) {
            return Err(EvidenceError::invalid(
                "head.digest",
                format!("{:?} is not sha256:<64 lowercase hex>", head.digest),
            ));
        }
        Ok(Self { head: Some(head) })
    }

    /// Continues after `packet`, recomputing its digest rather than trusting the stored one.
    pub fn after(packet: &SignedPacket) -> Result<Self, EvidenceError> {
        let digest = packet_digest(&packet.envelope)?;
        let sequence = packet.statement()?.predicate.sequence;
        Self::resume(ChainHead { sequence, digest })
    }

    pub fn head(&self) -> Option<&ChainHead> {
        self.head.as_ref()
    }

    /// Validates `content`, signs the next packet with `key` and advances the head. On error
    /// nothing is signed and the head stays where it was.
    pub fn append(
        &mut self,
        content: PacketContent,
        key: &SigningKey,
    ) -> Result<SignedPacket, EvidenceError> {
        content.validate()?;
        let (sequence, previous) = match &self.head {
            None => (1, None),
            Some(head) => (
                head.sequence
                    .checked_add(1)
                    .ok_or(EvidenceError::SequenceExhausted(head.sequence))?,
                Some(head.digest.clone()),
            ),
        };
        let statement = Statement {
            statement_type: STATEMENT_TYPE.to_string(),
            subject: subjects_for(&content.release),
            predicate_type: PREDICATE_TYPE.to_string(),
            predicate: EvidencePredicate {
                sequence,
                previous,
                content,
            },
        };
        let payload = canonical_json(&statement)?;
        let envelope = key.sign(PACKET_PAYLOAD_TYPE, &payload);
        let digest = packet_digest(&envelope)?;
        self.head = Some(ChainHead {
            sequence,
            digest: digest.clone(),
        });
        Ok(SignedPacket {
            id: packet_id(&digest),
            sequence,
            digest,
            envelope,
        })
    }
}
