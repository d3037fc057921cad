//! What should happen next in a run: a pure function of template, state and time.
//!
//! Actions are level-triggered: they describe what is due *now*, and calling
//! [`next_actions`] again before applying anything returns the same list. The plane carries
//! them out idempotently: a [`Action::StartStep`] carries a key that is stable per
//! (run, step, attempt), so a start re-issued after a plane restart maps to the job that
//! already exists instead of a second one.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::run::{RunError, RunState, RunStatus, SkipReason, StepStatus, add};
use crate::template::{StepKind, When, WorkflowTemplate};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Start `attempt` of the step (create its job with `idempotency_key`, or for approval,
    /// gate and wait steps do the plane's own part), then apply [`crate::Event::StepStarted`].
    /// Create the job *before* recording the start (or in the same transaction): a crash
    /// in between then re-issues the same key instead of losing the job.
    StartStep {
        step_id: String,
        attempt: u32,
        idempotency_key: String,
    },
    /// The attempt ran past its timeout: cancel its job, then apply
    /// [`crate::Event::StepTimedOut`].
    TimeoutStep { step_id: String, attempt: u32 },
    /// A wait step's duration has passed: apply [`crate::Event::WaitElapsed`].
    CompleteWait { step_id: String, attempt: u32 },
    /// The run is cancelled: stop this attempt's job, then apply its result (usually
    /// [`crate::Event::StepFailed`]).
    CancelStep { step_id: String, attempt: u32 },
    /// Nothing else is due before this instant (a retry, a timeout, the end of a wait):
    /// call [`next_actions`] again then, or earlier when an event arrives.
    WakeAt(#[serde(with = "time::serde::rfc3339")] OffsetDateTime),
    /// The run is over; this is the only action of a finished run.
    Finish(RunOutcome),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Succeeded,
    Failed,
    Cancelled,
}

/// The idempotency key of one attempt of one step of one run. Step ids cannot contain `/`,
/// so the key is unambiguous whatever the run id is.
pub fn idempotency_key(run_id: &str, step_id: &str, attempt: u32) -> String {
    format!("wf/{step_id}/{attempt}/{run_id}")
}

/// The actions due at `now`, in template order, with at most one `WakeAt` last.
///
/// Every action of one list can be carried out; then ask again. A list holds either starts
/// or actions that end running attempts (timeouts, completed waits, cancellations), never
/// both: the starts come once the endings have been applied.
pub fn next_actions(
    template: &WorkflowTemplate,
    state: &RunState,
    now: OffsetDateTime,
) -> Result<Vec<Action>, RunError> {
    state.check_template(template)?;
    let outcome = match state.status() {
        RunStatus::Running => None,
        RunStatus::Succeeded => Some(RunOutcome::Succeeded),
        RunStatus::Failed => Some(RunOutcome::Failed),
        RunStatus::Cancelled => Some(RunOutcome::Cancelled),
    };
    if let Some(outcome) = outcome {
        return Ok(vec![Action::Finish(outcome)]);
    }
    let cancelled = state.cancel_request().is_some();
    // Starts and the actions that end running attempts are never mixed in one list: ending
    // an attempt can fail the run, which would make a start computed beside it stale.
    let mut starts = Vec::new();
    let mut endings = Vec::new();
    let mut wake: Option<OffsetDateTime> = None;
    let mut wake_at = |at: OffsetDateTime| {
        wake = Some(wake.map_or(at, |earliest| earliest.min(at)));
    };
    for (index, (step, record)) in template.steps().iter().zip(state.steps()).enumerate() {
        let step_id = step.id.clone();
        match &record.status {
            StepStatus::Pending
                if !cancelled && readiness(template, state, index) == Readiness::Ready =>
            {
                starts.push(Action::StartStep {
                    idempotency_key: idempotency_key(state.run_id(), &step.id, 1),
                    step_id,
                    attempt: 1,
                });
            }
            StepStatus::WaitingRetry { attempt, at, .. } if !cancelled => {
                if *at <= now {
                    starts.push(Action::StartStep {
                        idempotency_key: idempotency_key(state.run_id(), &step.id, *attempt),
                        step_id,
                        attempt: *attempt,
                    });
                } else {
                    wake_at(*at);
                }
            }
            StepStatus::Running {
                attempt,
                started_at,
            } => {
                let attempt = *attempt;
                if cancelled {
                    endings.push(Action::CancelStep { step_id, attempt });
                } else if let StepKind::Wait(wait) = &step.kind {
                    match add(*started_at, wait.duration, &step.id) {
                        Ok(due) if due <= now => {
                            endings.push(Action::CompleteWait { step_id, attempt });
                        }
                        Ok(due) => wake_at(due),
                        // Unreachable with validated durations; such a wait never ends.
                        Err(_) => {}
                    }
                } else if let Some(timeout) = step.timeout {
                    match add(*started_at, timeout, &step.id) {
                        Ok(due) if due <= now => {
                            endings.push(Action::TimeoutStep { step_id, attempt });
                        }
                        Ok(due) => wake_at(due),
                        Err(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
    let mut actions = if endings.is_empty() { starts } else { endings };
    if let Some(at) = wake {
        actions.push(Action::WakeAt(at));
    }
    Ok(actions)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Something it needs is not settled yet.
    Waiting,
    Ready,
    Skip(SkipReason),
}

/// Whether the pending step at `index` may start, must wait, or will never run.
///
/// `on_success`: every need succeeded and no step of the run failed (a failure stops new
/// work, it does not wait for parallel branches to finish first). `on_failure` and `always`:
/// every need settled; without explicit needs, every `on_success` step settled, so a rollback
/// never runs beside a deploy still in flight.
pub(crate) fn readiness(template: &WorkflowTemplate, state: &RunState, index: usize) -> Readiness {
    if state.cancel_request().is_some() {
        return Readiness::Skip(SkipReason::Cancelled);
    }
    let step = &template.steps()[index];
    let status_of = |id: &str| state.step(id).unwrap_or(&StepStatus::Pending);
    match step.when {
        When::OnSuccess => {
            let mut waiting = false;
            for need in &step.needs {
                match status_of(need) {
                    StepStatus::Succeeded { .. } => {}
                    StepStatus::Failed { .. } | StepStatus::Skipped { .. } => {
                        return Readiness::Skip(SkipReason::NeedNotSucceeded {
                            need: need.clone(),
                        });
                    }
                    _ => waiting = true,
                }
            }
            if state.has_failure() {
                Readiness::Skip(SkipReason::RunFailed)
            } else if waiting {
                Readiness::Waiting
            } else {
                Readiness::Ready
            }
        }
        When::OnFailure | When::Always => {
            let needs: Vec<&str> = if step.needs.is_empty() {
                template
                    .steps()
                    .iter()
                    .filter(|other| other.when == When::OnSuccess)
                    .map(|other| other.id.as_str())
                    .collect()
            } else {
                step.needs.iter().map(String::as_str).collect()
            };
            if needs.iter().any(|need| !status_of(need).is_settled()) {
                return Readiness::Waiting;
            }
            let some_need_failed = needs
                .iter()
                .any(|need| matches!(status_of(need), StepStatus::Failed { .. }));
            if step.when == When::Always || some_need_failed {
                Readiness::Ready
            } else {
                Readiness::Skip(SkipReason::NoFailure)
            }
        }
    }
}
