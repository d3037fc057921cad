//! The input document: everything the gates look at, gathered by the control plane. Rego
//! policies see it, serialized as below, as `input`; its canonical JSON is hashed into the
//! decision record. Field-by-field documentation for policy authors: `docs/policy.md`.
//!
//! Optional parts default when absent, but every field is always serialized (absent options
//! as `null`, empty lists as `[]`), so policies never have to guess whether a field exists.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::calendar::{TimeOfDay, Timestamp, Weekday};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionInput {
    pub promotion: PromotionRequest,
    pub release: ReleaseFacts,
    pub environment: EnvironmentRules,
    /// Every approval or rejection recorded so far, in the order they were given.
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// The latest deployment of this release into `environment.previous`; `None` when it
    /// was never deployed there (or there is no previous environment).
    #[serde(default)]
    pub previous_environment_deployment: Option<PreviousDeployment>,
    #[serde(default)]
    pub overrides: Overrides,
    /// The instant the decision is made for; the gates never read a clock themselves.
    pub now: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionRequest {
    pub id: String,
    pub requested_by: String,
    pub requested_at: Timestamp,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseFacts {
    pub name: String,
    pub created_by: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub components: Vec<ReleaseComponent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseComponent {
    pub name: String,
    /// The image repository, without tag or digest.
    pub image: String,
    /// `sha256:…`: a release is a set of digests.
    pub digest: String,
}

/// The promotion rules of the environment promoted into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentRules {
    pub name: String,
    /// The environment a release must have been deployed to first; `None` for the first stage.
    #[serde(default)]
    pub previous: Option<String>,
    /// N of the N-of-M approvals gate; 0: no approval needed.
    #[serde(default)]
    pub required_approvals: u32,
    /// Requester ≠ approver and release creator ≠ approver.
    #[serde(default)]
    pub separation_of_duties: bool,
    #[serde(default)]
    pub freeze_windows: Vec<FreezeWindow>,
    /// When promotions may happen; empty: at any time.
    #[serde(default)]
    pub schedule_windows: Vec<ScheduleWindow>,
    /// Users one of whom must give an explicit go (an approval); empty: no manual gate.
    #[serde(default)]
    pub manual_approvers: Vec<String>,
}

/// `[start, end)`: promotions are blocked unless a user in `override_users` asks to override.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeWindow {
    pub start: Timestamp,
    pub end: Timestamp,
    /// Names the window in explanations, e.g. `holiday`.
    pub reason: String,
    #[serde(default)]
    pub override_users: Vec<String>,
}

impl FreezeWindow {
    pub fn is_active(&self, now: Timestamp) -> bool {
        self.start <= now && now < self.end
    }
}

/// On any of `days`, from `start` (inclusive) to `end` (exclusive), UTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleWindow {
    pub days: Vec<Weekday>,
    pub start: TimeOfDay,
    pub end: TimeOfDay,
}

impl fmt::Display for ScheduleWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days: Vec<&str> = self.days.iter().map(Weekday::as_str).collect();
        write!(f, "{} {}-{} UTC", days.join(","), self.start, self.end)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    pub user: String,
    pub at: Timestamp,
    #[serde(default)]
    pub comment: String,
    pub decision: ApprovalDecision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    Approve,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousDeployment {
    pub release: String,
    /// The control plane's deployment status: `succeeded` passes the dependency gate,
    /// `pending`/`queued`/`running` keep it pending, anything else fails it.
    pub status: String,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
}

/// What the requester asked to bypass; each override is still checked against who may.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// The user asking to override active freeze windows.
    #[serde(default)]
    pub freeze_override_by: Option<String>,
}

/// Why an approval breaks separation of duties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeparationOfDutiesViolation {
    Requester { user: String },
    ReleaseCreator { user: String, release: String },
}

impl fmt::Display for SeparationOfDutiesViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Requester { user } => {
                write!(f, "{user} requested this promotion and cannot approve it")
            }
            Self::ReleaseCreator { user, release } => {
                write!(
                    f,
                    "{user} created release {release} and cannot approve its promotion"
                )
            }
        }
    }
}

impl PromotionInput {
    /// Whether `user`'s approval would break separation of duties (always `None` when the
    /// environment does not require it). The control plane can refuse such an approval
    /// up front; the gates refuse it again if it is recorded anyway.
    pub fn separation_of_duties_violation(
        &self,
        user: &str,
    ) -> Option<SeparationOfDutiesViolation> {
        if !self.environment.separation_of_duties {
            return None;
        }
        if user == self.promotion.requested_by {
            return Some(SeparationOfDutiesViolation::Requester {
                user: user.to_string(),
            });
        }
        if user == self.release.created_by {
            return Some(SeparationOfDutiesViolation::ReleaseCreator {
                user: user.to_string(),
                release: self.release.name.clone(),
            });
        }
        None
    }

    /// `sha256:…` of the canonical JSON of this document: equal documents, equal hashes,
    /// whatever order their fields were written in.
    pub fn hash(&self) -> Result<String, crate::PolicyError> {
        Ok(stella_pki::canonical_digest(self)?)
    }
}
