//! Signed, hash-chained evidence packets (in-toto Statement v1 in DSSE) and offline verification.
//!
//! The control plane records a packet at every promotion decision, deployment and rollback with
//! [`EvidenceChain::append`], stores the [`SignedPacket`]s append-only, exports runs of them as a
//! self-contained [`Bundle`], and anyone can check a bundle with [`verify_bundle`] without
//! network, database or clock. [`render_packet`] and the audit export turn packets into text
//! and tables.
//!
//! The crate holds no keys and does no I/O: the signing key, the stored packets and the
//! certificates are handed in by the plane.

mod audit;
mod bundle;
mod error;
mod packet;
mod predicate;
mod render;
mod verify;

pub use audit::{AUDIT_COLUMNS, AuditRow, audit_csv, audit_json, audit_rows};
pub use bundle::{
    BUNDLE_FORMAT, BUNDLE_VERSION, Bundle, BundleContents, BundleManifest, EvidenceKey,
    MANIFEST_PAYLOAD_TYPE, material_digest, required_agent_certificates,
};
pub use error::EvidenceError;
pub use packet::{ChainHead, EvidenceChain, SignedPacket, packet_digest, packet_id};
pub use predicate::{
    Actors, Approval, Component, Decision, EvidencePredicate, Execution, GateResult, JobEvidence,
    PACKET_PAYLOAD_TYPE, PREDICATE_TYPE, PacketContent, PacketKind, PreviousState, Release,
    STATEMENT_TYPE, Statement, Subject, TargetRef, is_sha256_digest, subjects_for,
};
pub use render::render_packet;
pub use verify::{
    Check, Location, PacketRef, Problem, VerificationReport, verify_bundle, verify_bundle_pinned,
};
