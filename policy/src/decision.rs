//! The decision record: every gate's result, the outcome, and what it was computed from.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::PolicyError;
use crate::gates::{self, GateResult, GateStatus};
use crate::input::PromotionInput;
use crate::rego::PolicySet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every gate passed.
    Allowed,
    /// At least one gate failed, whatever the others (approvals included) say.
    Blocked,
    /// No gate failed and at least one is still pending.
    Pending,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Blocked => "blocked",
            Self::Pending => "pending",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    /// Every gate, always in the same order, configured or not.
    pub gates: Vec<GateResult>,
    /// `sha256:…` of the canonical JSON of the input document.
    pub input_hash: String,
    /// `sha256:…` of the canonical JSON of the Rego modules (name → source).
    pub policy_digest: String,
}

/// Runs every gate over `input`. Errors only when the input or the policy set cannot be
/// hashed; a problem inside a gate (a bad policy, a bad window) fails that gate instead.
pub fn evaluate(input: &PromotionInput, policies: &PolicySet) -> Result<Decision, PolicyError> {
    let input_hash = input.hash()?;
    let policy_digest = policies.digest()?;
    let gates = vec![
        gates::freeze_window(input),
        gates::schedule_window(input),
        gates::dependency(input),
        gates::separation_of_duties(input),
        gates::approvals(input),
        gates::manual(input),
        policies.gate(input),
    ];
    let outcome = if gates.iter().any(|g| g.status == GateStatus::Failed) {
        Outcome::Blocked
    } else if gates.iter().any(|g| g.status == GateStatus::Pending) {
        Outcome::Pending
    } else {
        Outcome::Allowed
    };
    Ok(Decision {
        outcome,
        gates,
        input_hash,
        policy_digest,
    })
}

impl Decision {
    pub fn gates_with(&self, status: GateStatus) -> impl Iterator<Item = &GateResult> {
        self.gates.iter().filter(move |g| g.status == status)
    }

    /// One line: the outcome and why (the failed gates when blocked, the pending ones when
    /// pending).
    pub fn summary(&self) -> String {
        let why = |status| {
            self.gates_with(status)
                .map(|g| g.reason.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        match self.outcome {
            Outcome::Blocked => format!("blocked: {}", why(GateStatus::Failed)),
            Outcome::Pending => format!("pending: {}", why(GateStatus::Pending)),
            Outcome::Allowed => format!("allowed: all {} gates passed", self.gates.len()),
        }
    }

    /// The summary, then every gate and its reason, then the hashes that identify the inputs.
    pub fn explain(&self) -> String {
        let mut text = self.summary();
        text.push('\n');
        for gate in &self.gates {
            text.push_str(&format!(
                "  {:<7} {}: {}\n",
                gate.status.as_str(),
                gate.gate,
                gate.reason.replace('\n', "\n          ")
            ));
        }
        text.push_str(&format!(
            "input {}, policy {}\n",
            self.input_hash, self.policy_digest
        ));
        text
    }
}
