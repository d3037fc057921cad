//! What detection reports: one difference between desired and observed state.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One difference between what should run on a target and what runs there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub target: String,
    pub kind: FindingKind,
    pub severity: Severity,
    /// The desired component concerned, or the component a leftover workload claims;
    /// `None` for sticker findings and for workloads that are not Stella's.
    pub component: Option<String>,
    /// The workload concerned, for findings about one workload (`unmanaged_extra`).
    pub workload: Option<String>,
    /// What should be there (a digest, a state, a sticker summary), when something should.
    pub expected: Option<String>,
    /// What is there instead, when something is.
    pub observed: Option<String>,
    /// Labels of the workloads concerned (merged); what label ignore rules match against.
    pub labels: BTreeMap<String, String>,
    /// One sentence for a person.
    pub detail: String,
    /// When the report that showed it was evaluated; the plane keeps the first one it saw.
    #[serde(with = "time::serde::rfc3339")]
    pub detected_at: OffsetDateTime,
    /// `sha256:<hex>` over target, kind, component, workload, expected and observed: equal for
    /// the same difference in every report, whatever the time or the wording of `detail`.
    pub fingerprint: String,
}

/// Kinds of drift, each with a fixed severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A workload of a desired component runs another digest.
    DigestChanged,
    /// A desired component has no workload (or only ones the executor reports gone).
    Missing,
    /// A desired component has workloads, none running, at least one stopped.
    Stopped,
    /// A workload that is not part of the desired release.
    UnmanagedExtra,
    /// The sticker names another release, deployment or digests than the desired ones.
    StickerMismatch,
    /// A sticker was expected and the target has none.
    StickerMissing,
}

impl FindingKind {
    pub const ALL: [FindingKind; 6] = [
        Self::DigestChanged,
        Self::Missing,
        Self::Stopped,
        Self::UnmanagedExtra,
        Self::StickerMismatch,
        Self::StickerMissing,
    ];

    /// digest_changed and missing: the target does not run the release → critical;
    /// stopped: the right bits are there but not serving → high; sticker_*: the record of what
    /// runs is wrong, the workloads may be fine → medium; unmanaged_extra: something else
    /// runs beside the release → low.
    pub fn severity(self) -> Severity {
        match self {
            Self::DigestChanged | Self::Missing => Severity::Critical,
            Self::Stopped => Severity::High,
            Self::StickerMismatch | Self::StickerMissing => Severity::Medium,
            Self::UnmanagedExtra => Severity::Low,
        }
    }

    /// Whether redeploying the desired digests repairs this kind. A deploy ensures the
    /// release's own workloads and rewrites the sticker; it leaves foreign workloads alone, so
    /// an unmanaged extra is only ever notified.
    pub fn repaired_by_redeploy(self) -> bool {
        !matches!(self, Self::UnmanagedExtra)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DigestChanged => "digest_changed",
            Self::Missing => "missing",
            Self::Stopped => "stopped",
            Self::UnmanagedExtra => "unmanaged_extra",
            Self::StickerMismatch => "sticker_mismatch",
            Self::StickerMissing => "sticker_missing",
        }
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown drift kind {given:?}: expected one of {}", FindingKind::ALL.map(FindingKind::as_str).join(", "))]
pub struct UnknownKind {
    pub given: String,
}

impl FromStr for FindingKind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKind {
                given: s.to_string(),
            })
    }
}

/// Ordered from least to most urgent, so `max()` over findings gives the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity of a finding. Each part is length-prefixed so no two different tuples hash
/// the same bytes, and a version tag lets the scheme change without silent collisions.
pub(crate) fn fingerprint(
    target: &str,
    kind: FindingKind,
    component: Option<&str>,
    workload: Option<&str>,
    expected: Option<&str>,
    observed: Option<&str>,
) -> String {
    let mut bytes = Vec::new();
    let mut part = |value: Option<&str>| match value {
        None => bytes.push(b'-'),
        Some(v) => {
            bytes.push(b'+');
            bytes.extend_from_slice(&(v.len() as u64).to_be_bytes());
            bytes.extend_from_slice(v.as_bytes());
        }
    };
    part(Some("stella.drift.finding/v1"));
    part(Some(target));
    part(Some(kind.as_str()));
    part(component);
    part(workload);
    part(expected);
    part(observed);
    stella_pki::sha256_digest(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_their_names_and_nothing_else() {
        for kind in FindingKind::ALL {
            assert_eq!(kind.as_str().parse::<FindingKind>(), Ok(kind));
        }
        let err = "digest-changed".parse::<FindingKind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown drift kind \"digest-changed\": expected one of digest_changed, missing, \
             stopped, unmanaged_extra, sticker_mismatch, sticker_missing"
        );
    }

    #[test]
    fn severities_order_from_low_to_critical() {
        assert!(Severity::Critical > Severity::High);
        assert!(Severity::High > Severity::Medium);
        assert!(Severity::Medium > Severity::Low);
        assert_eq!(FindingKind::DigestChanged.severity(), Severity::Critical);
        assert_eq!(FindingKind::UnmanagedExtra.severity(), Severity::Low);
    }

    #[test]
    fn fingerprint_parts_cannot_run_into_each_other() {
        let a = fingerprint("t", FindingKind::Missing, Some("ab"), None, Some("c"), None);
        let b = fingerprint("t", FindingKind::Missing, Some("a"), None, Some("bc"), None);
        let c = fingerprint("t", FindingKind::Missing, None, Some("ab"), Some("c"), None);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("sha256:"));
    }
}
