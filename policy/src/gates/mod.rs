//! The gates. Each one reads the input document and says passed, failed or pending, with a
//! reason a person can act on. Gates are pure: same input, same result.

mod approvals;
mod dependency;
mod freeze;
mod schedule;

pub(crate) use approvals::{approvals, manual, separation_of_duties};
pub(crate) use dependency::dependency;
pub(crate) use freeze::freeze_window;
pub(crate) use schedule::schedule_window;

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    FreezeWindow,
    ScheduleWindow,
    Dependency,
    SeparationOfDuties,
    Approvals,
    Manual,
    Policy,
}

impl Gate {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::FreezeWindow => "freeze_window",
            Self::ScheduleWindow => "schedule_window",
            Self::Dependency => "dependency",
            Self::SeparationOfDuties => "separation_of_duties",
            Self::Approvals => "approvals",
            Self::Manual => "manual",
            Self::Policy => "policy",
        }
    }
}

impl fmt::Display for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateStatus {
    Passed,
    Failed,
    /// Not decided yet: waiting for an approval, a go or a deployment still running.
    Pending,
}

impl GateStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Pending => "pending",
        }
    }
}

impl fmt::Display for GateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateResult {
    pub gate: Gate,
    pub status: GateStatus,
    pub reason: String,
}

impl GateResult {
    pub(crate) fn passed(gate: Gate, reason: impl Into<String>) -> Self {
        Self {
            gate,
            status: GateStatus::Passed,
            reason: reason.into(),
        }
    }

    pub(crate) fn failed(gate: Gate, reason: impl Into<String>) -> Self {
        Self {
            gate,
            status: GateStatus::Failed,
            reason: reason.into(),
        }
    }

    pub(crate) fn pending(gate: Gate, reason: impl Into<String>) -> Self {
        Self {
            gate,
            status: GateStatus::Pending,
            reason: reason.into(),
        }
    }
}
