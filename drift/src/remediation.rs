//! What to do about a target's findings: notify people, or redeploy the desired digests,
//! within a rate limit and behind a circuit breaker.
//!
//! The [`Remediator`] is one target's state machine. It decides; the plane acts (a reconcile
//! is a normal signed deploy job of the desired release) and reports each reconcile's
//! outcome back. Its state is plain data the plane persists between reports.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::finding::Finding;
use crate::state::DesiredTarget;

const RATE_WINDOW: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemediationMode {
    /// Findings are for people; nothing is redeployed.
    #[default]
    Notify,
    /// Redeploy the desired digests through a normal signed job.
    Reconcile,
}

impl RemediationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Notify => "notify",
            Self::Reconcile => "reconcile",
        }
    }
}

impl fmt::Display for RemediationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RemediationMode {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "notify" => Ok(Self::Notify),
            "reconcile" => Ok(Self::Reconcile),
            other => Err(PolicyError::UnknownMode {
                given: other.to_string(),
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown remediation mode {given:?}: expected notify or reconcile")]
    UnknownMode { given: String },
    #[error("max_per_hour must be at least 1 (use mode notify to never reconcile)")]
    ZeroRate,
    #[error("breaker_threshold must be at least 1 failure")]
    ZeroThreshold,
    #[error("breaker_cooldown must be longer than zero")]
    ZeroCooldown,
}

/// Remediation policy of an environment. Built through [`RemediationPolicy::new`] (or
/// deserialized, which checks the same), so every policy in hand is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PolicyFields", into = "PolicyFields")]
pub struct RemediationPolicy {
    mode: RemediationMode,
    max_per_hour: u32,
    breaker_threshold: u32,
    breaker_cooldown: Duration,
}

/// Notify; were it switched to reconcile: 3 reconciles per target per hour, the breaker opens
/// after 3 consecutive failures and tries again after 15 minutes.
impl Default for RemediationPolicy {
    fn default() -> Self {
        Self {
            mode: RemediationMode::Notify,
            max_per_hour: 3,
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(15 * 60),
        }
    }
}

impl RemediationPolicy {
    pub fn new(
        mode: RemediationMode,
        max_per_hour: u32,
        breaker_threshold: u32,
        breaker_cooldown: Duration,
    ) -> Result<Self, PolicyError> {
        if max_per_hour == 0 {
            return Err(PolicyError::ZeroRate);
        }
        if breaker_threshold == 0 {
            return Err(PolicyError::ZeroThreshold);
        }
        if breaker_cooldown.is_zero() {
            return Err(PolicyError::ZeroCooldown);
        }
        Ok(Self {
            mode,
            max_per_hour,
            breaker_threshold,
            breaker_cooldown,
        })
    }

    pub fn mode(&self) -> RemediationMode {
        self.mode
    }

    /// Reconciles issued per target in any trailing hour, at most.
    pub fn max_per_hour(&self) -> u32 {
        self.max_per_hour
    }

    /// Consecutive failed reconciles of a target that open its breaker.
    pub fn breaker_threshold(&self) -> u32 {
        self.breaker_threshold
    }

    /// How long an open breaker refuses before it lets one trial reconcile through.
    pub fn breaker_cooldown(&self) -> Duration {
        self.breaker_cooldown
    }
}

#[derive(Serialize, Deserialize)]
struct PolicyFields {
    mode: RemediationMode,
    max_per_hour: u32,
    breaker_threshold: u32,
    breaker_cooldown_secs: u64,
}

impl TryFrom<PolicyFields> for RemediationPolicy {
    type Error = PolicyError;

    fn try_from(f: PolicyFields) -> Result<Self, Self::Error> {
        Self::new(
            f.mode,
            f.max_per_hour,
            f.breaker_threshold,
            Duration::from_secs(f.breaker_cooldown_secs),
        )
    }
}

impl From<RemediationPolicy> for PolicyFields {
    fn from(p: RemediationPolicy) -> Self {
        Self {
            mode: p.mode,
            max_per_hour: p.max_per_hour,
            breaker_threshold: p.breaker_threshold,
            breaker_cooldown_secs: p.breaker_cooldown.as_secs(),
        }
    }
}

/// What the plane should do with a target's current findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// No findings: nothing to do.
    InSync,
    /// Tell people. In notify mode always; in reconcile mode when no finding is one a
    /// redeploy repairs (only unmanaged extras).
    Notify,
    /// Redeploy this release to the target through a normal signed job, then report the
    /// job's outcome with [`Remediator::record_outcome`].
    Reconcile {
        target: String,
        release: String,
        deployment_id: String,
    },
    /// Reconcile mode wanted to act and did not; the findings are still to be notified, with
    /// the reason.
    Suppressed { reason: SuppressReason },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum SuppressReason {
    /// A reconcile of this target was issued and its outcome is not in yet.
    InFlight {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        deployment_id: String,
    },
    /// This very set of findings was reconciled already, successfully, and is back (or never
    /// left): one reconcile per finding set, until the target is seen in sync.
    AlreadyReconciled {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// `max_per_hour` reconciles were issued in the last hour.
    RateLimited {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// The last `failures` reconciles failed in a row.
    BreakerOpen {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        failures: u32,
        /// When one trial reconcile will be let through.
        #[serde(with = "time::serde::rfc3339")]
        retry_at: OffsetDateTime,
        last_error: Option<String>,
    },
}

/// How a reconcile job ended. A job that expired or was cancelled did not repair: `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReconcileOutcome {
    Succeeded,
    Failed { error: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        failures: u32,
        #[serde(with = "time::serde::rfc3339")]
        retry_at: OffsetDateTime,
    },
    /// The cooldown has passed: the next reconcile is a trial; its failure reopens the breaker,
    /// its success closes it.
    HalfOpen {
        failures: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemediationError {
    #[error("finding for target {finding:?} given to the remediator of target {target:?}")]
    ForeignFinding { target: String, finding: String },
    #[error("no reconcile of target {target:?} is in flight: nothing to record an outcome for")]
    NoReconcileInFlight { target: String },
}

/// One target's remediation state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remediator {
    in_flight: Option<InFlight>,
    /// The finding set last reconciled successfully; forgotten when the target is in sync.
    reconciled: Option<ReconciledSet>,
    /// Issue times of the reconciles of the trailing hour.
    #[serde(with = "rfc3339_vec")]
    issued: Vec<OffsetDateTime>,
    consecutive_failures: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    breaker_opened_at: Option<OffsetDateTime>,
    last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InFlight {
    finding_set: String,
    deployment_id: String,
    #[serde(with = "time::serde::rfc3339")]
    issued_at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ReconciledSet {
    finding_set: String,
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
}

impl Remediator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decides what to do with the findings `detect` returned for `desired.target`.
    /// Issuing a reconcile is recorded here, so the caller must act on a `Reconcile`.
    pub fn decide(
        &mut self,
        policy: &RemediationPolicy,
        desired: &DesiredTarget,
        findings: &[Finding],
        now: OffsetDateTime,
    ) -> Result<Decision, RemediationError> {
        if let Some(foreign) = findings.iter().find(|f| f.target != desired.target) {
            return Err(RemediationError::ForeignFinding {
                target: desired.target.clone(),
                finding: foreign.target.clone(),
            });
        }
        if findings.is_empty() {
            self.reconciled = None;
            return Ok(Decision::InSync);
        }
        if policy.mode == RemediationMode::Notify {
            return Ok(Decision::Notify);
        }
        let mut repairable: Vec<&str> = findings
            .iter()
            .filter(|f| f.kind.repaired_by_redeploy())
            .map(|f| f.fingerprint.as_str())
            .collect();
        if repairable.is_empty() {
            return Ok(Decision::Notify);
        }
        repairable.sort_unstable();
        repairable.dedup();
        let finding_set = stella_pki::sha256_digest(repairable.join("\n").as_bytes());

        if let Some(in_flight) = &self.in_flight {
            return Ok(suppressed(SuppressReason::InFlight {
                since: in_flight.issued_at,
                deployment_id: in_flight.deployment_id.clone(),
            }));
        }
        if let Some(done) = self
            .reconciled
            .as_ref()
            .filter(|r| r.finding_set == finding_set)
        {
            return Ok(suppressed(SuppressReason::AlreadyReconciled {
                at: done.at,
            }));
        }
        if let BreakerState::Open {
            since,
            failures,
            retry_at,
        } = self.breaker(policy, now)
        {
            return Ok(suppressed(SuppressReason::BreakerOpen {
                since,
                failures,
                retry_at,
                last_error: self.last_error.clone(),
            }));
        }
        self.issued.retain(|at| *at + RATE_WINDOW > now);
        if self.issued.len() >= policy.max_per_hour as usize {
            let oldest = self.issued.iter().min().copied().unwrap_or(now);
            return Ok(suppressed(SuppressReason::RateLimited {
                until: oldest + RATE_WINDOW,
            }));
        }

        self.issued.push(now);
        self.in_flight = Some(InFlight {
            finding_set,
            deployment_id: desired.deployment_id.clone(),
            issued_at: now,
        });
        Ok(Decision::Reconcile {
            target: desired.target.clone(),
            release: desired.release.clone(),
            deployment_id: desired.deployment_id.clone(),
        })
    }

    /// Records how the reconcile in flight ended. Without one in flight this is an error and
    /// changes nothing.
    pub fn record_outcome(
        &mut self,
        policy: &RemediationPolicy,
        target: &str,
        outcome: ReconcileOutcome,
        now: OffsetDateTime,
    ) -> Result<(), RemediationError> {
        let in_flight =
            self.in_flight
                .take()
                .ok_or_else(|| RemediationError::NoReconcileInFlight {
                    target: target.to_string(),
                })?;
        match outcome {
            ReconcileOutcome::Succeeded => {
                self.consecutive_failures = 0;
                self.breaker_opened_at = None;
                self.last_error = None;
                self.reconciled = Some(ReconciledSet {
                    finding_set: in_flight.finding_set,
                    at: now,
                });
            }
            ReconcileOutcome::Failed { error } => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = Some(error);
                self.reconciled = None;
                // Also reopens a half-open breaker whose trial failed, with a fresh cooldown.
                if self.consecutive_failures >= policy.breaker_threshold {
                    self.breaker_opened_at = Some(now);
                }
            }
        }
        Ok(())
    }

    /// The breaker as of `now`, for display and for `decide`.
    pub fn breaker(&self, policy: &RemediationPolicy, now: OffsetDateTime) -> BreakerState {
        let failures = self.consecutive_failures;
        match self.breaker_opened_at {
            Some(since) if failures >= policy.breaker_threshold => {
                let retry_at = since + policy.breaker_cooldown;
                if now < retry_at {
                    BreakerState::Open {
                        since,
                        failures,
                        retry_at,
                    }
                } else {
                    BreakerState::HalfOpen { failures }
                }
            }
            _ => BreakerState::Closed { failures },
        }
    }

    /// Whether a reconcile was issued and its outcome is not recorded yet.
    pub fn reconcile_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }
}

fn suppressed(reason: SuppressReason) -> Decision {
    Decision::Suppressed { reason }
}

mod rfc3339_vec {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use time::OffsetDateTime;

    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    struct At(#[serde(with = "time::serde::rfc3339")] OffsetDateTime);

    pub fn serialize<S: Serializer>(times: &[OffsetDateTime], s: S) -> Result<S::Ok, S::Error> {
        times
            .iter()
            .map(|t| At(*t))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<OffsetDateTime>, D::Error> {
        Ok(Vec::<At>::deserialize(d)?
            .into_iter()
            .map(|a| a.0)
            .collect())
    }
}
