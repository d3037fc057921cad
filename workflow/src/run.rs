//! The persisted state of one workflow run and the events that move it.
//!
//! `RunState` is plain data (serde JSON): the plane stores it after every [`RunState::apply`]
//! and can reload it at any time. `apply` validates an event completely before changing
//! anything, so a refused event leaves the state exactly as it was.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::duration::format_duration;
use crate::engine::{Readiness, readiness};
use crate::template::{Step, StepKind, When, WorkflowTemplate};

/// The state of one run of a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunState {
    run_id: String,
    status: RunStatus,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    finished_at: Option<OffsetDateTime>,
    cancel: Option<CancelRequest>,
    steps: Vec<StepRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn is_finished(self) -> bool {
        self != RunStatus::Running
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    pub id: String,
    pub status: StepStatus,
}

/// Where one step stands. Attempts count from 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum StepStatus {
    /// Not started: its needs are not settled yet, or it is ready and waits for the plane.
    Pending,
    Running {
        attempt: u32,
        #[serde(with = "time::serde::rfc3339")]
        started_at: OffsetDateTime,
    },
    /// An attempt failed; `attempt` (the next one) may start at `at`.
    WaitingRetry {
        attempt: u32,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        last_failure: String,
    },
    Succeeded {
        attempt: u32,
        #[serde(with = "time::serde::rfc3339")]
        finished_at: OffsetDateTime,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
    },
    Failed {
        attempt: u32,
        #[serde(with = "time::serde::rfc3339")]
        finished_at: OffsetDateTime,
        reason: String,
    },
    /// Never ran, and never will in this run.
    Skipped { reason: SkipReason },
}

impl StepStatus {
    /// Succeeded, failed or skipped: nothing more will happen to the step.
    pub fn is_settled(&self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded { .. } | StepStatus::Failed { .. } | StepStatus::Skipped { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running { .. } => "running",
            StepStatus::WaitingRetry { .. } => "waiting_retry",
            StepStatus::Succeeded { .. } => "succeeded",
            StepStatus::Failed { .. } => "failed",
            StepStatus::Skipped { .. } => "skipped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case", deny_unknown_fields)]
pub enum SkipReason {
    /// An `on_success` step whose need failed or was skipped.
    NeedNotSucceeded { need: String },
    /// An `on_success` step that had not started when another step failed.
    RunFailed,
    /// An `on_failure` step whose needs all ended without a failure.
    NoFailure,
    /// The run was cancelled before the step started.
    Cancelled,
}

/// Something that happened to a run. Results name the attempt they belong to, so a late
/// result of an attempt that already timed out cannot settle its successor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum Event {
    /// The plane started the attempt an [`Action::StartStep`](crate::Action) asked for.
    StepStarted { step_id: String, attempt: u32 },
    StepSucceeded {
        step_id: String,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
    },
    StepFailed {
        step_id: String,
        attempt: u32,
        reason: String,
    },
    /// The attempt's timeout passed (after [`Action::TimeoutStep`](crate::Action)); the plane
    /// has cancelled its job.
    StepTimedOut { step_id: String, attempt: u32 },
    /// A `wait` step's duration passed (after [`Action::CompleteWait`](crate::Action)).
    WaitElapsed { step_id: String, attempt: u32 },
    /// Stop the run: nothing new starts, running steps are asked to stop, no `on_failure` step
    /// runs (rolling back is a separate, explicit decision).
    Cancel { reason: String },
}

/// Why an event was refused. The state is unchanged when `apply` returns one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    #[error("run state does not match template {template:?}: {detail}")]
    TemplateMismatch { template: String, detail: String },
    #[error("unknown step {step_id:?}")]
    UnknownStep { step_id: String },
    #[error("run already {}", status.as_str())]
    RunFinished { status: RunStatus },
    #[error("run is cancelled; step {step_id:?} cannot start")]
    RunCancelled { step_id: String },
    #[error("step {step_id:?} cannot start: {why}")]
    NotStartable { step_id: String, why: String },
    #[error("step {step_id:?} is {status}, not running")]
    NotRunning {
        step_id: String,
        status: &'static str,
    },
    #[error("step {step_id:?}: event is for attempt {got}, the step is at attempt {current}")]
    WrongAttempt {
        step_id: String,
        current: u32,
        got: u32,
    },
    #[error("step {step_id:?}: not due before {due}")]
    NotDue {
        step_id: String,
        due: OffsetDateTime,
    },
    #[error("step {step_id:?}: {why}")]
    WrongEvent { step_id: String, why: String },
    #[error("step {step_id:?}: time out of range")]
    TimeOutOfRange { step_id: String },
}

impl RunState {
    /// A new run with every step pending.
    pub fn new(
        run_id: impl Into<String>,
        template: &WorkflowTemplate,
        now: OffsetDateTime,
    ) -> Self {
        let mut state = RunState {
            run_id: run_id.into(),
            status: RunStatus::Running,
            created_at: now,
            finished_at: None,
            cancel: None,
            steps: template
                .steps()
                .iter()
                .map(|step| StepRecord {
                    id: step.id.clone(),
                    status: StepStatus::Pending,
                })
                .collect(),
        };
        // A template whose steps all depend on a failure settles at once.
        state.settle(template, now);
        state
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn status(&self) -> RunStatus {
        self.status
    }

    pub fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }

    pub fn finished_at(&self) -> Option<OffsetDateTime> {
        self.finished_at
    }

    pub fn cancel_request(&self) -> Option<&CancelRequest> {
        self.cancel.as_ref()
    }

    /// Steps in template order.
    pub fn steps(&self) -> &[StepRecord] {
        &self.steps
    }

    pub fn step(&self, step_id: &str) -> Option<&StepStatus> {
        self.steps
            .iter()
            .find(|record| record.id == step_id)
            .map(|record| &record.status)
    }

    /// Whether some step has failed (the run will end failed, unless cancelled).
    pub fn has_failure(&self) -> bool {
        self.steps
            .iter()
            .any(|record| matches!(record.status, StepStatus::Failed { .. }))
    }

    /// Checks the state was made from this template (same steps, same order): a run keeps
    /// the template it started with, and the plane must hand the same one back.
    pub fn check_template(&self, template: &WorkflowTemplate) -> Result<(), RunError> {
        let mismatch = |detail: String| RunError::TemplateMismatch {
            template: template.name().to_owned(),
            detail,
        };
        if self.steps.len() != template.steps().len() {
            return Err(mismatch(format!(
                "{} steps in the run, {} in the template",
                self.steps.len(),
                template.steps().len()
            )));
        }
        for (record, step) in self.steps.iter().zip(template.steps()) {
            if record.id != step.id {
                return Err(mismatch(format!(
                    "run has step {:?} where the template has {:?}",
                    record.id, step.id
                )));
            }
        }
        Ok(())
    }

    /// Applies one event at `now`, then settles what follows from it (skipped dependents,
    /// abandoned retries, the run's own status).
    pub fn apply(
        &mut self,
        template: &WorkflowTemplate,
        event: Event,
        now: OffsetDateTime,
    ) -> Result<(), RunError> {
        self.check_template(template)?;
        if self.status.is_finished() {
            return Err(RunError::RunFinished {
                status: self.status,
            });
        }
        let (index, new_status) = match event {
            Event::Cancel { reason } => {
                if self.cancel.is_none() {
                    self.cancel = Some(CancelRequest { reason, at: now });
                    self.settle(template, now);
                }
                return Ok(());
            }
            Event::StepStarted { step_id, attempt } => {
                let index = self.index_of(&step_id)?;
                match self.start(template, index, attempt, now)? {
                    Some(status) => (index, status),
                    None => return Ok(()),
                }
            }
            Event::StepSucceeded {
                step_id,
                attempt,
                output,
            } => {
                let index = self.index_of(&step_id)?;
                let step = &template.steps()[index];
                if matches!(step.kind, StepKind::Wait(_)) {
                    return Err(RunError::WrongEvent {
                        step_id,
                        why: "a wait step completes with wait_elapsed".to_owned(),
                    });
                }
                self.running_attempt(index, attempt)?;
                let status = StepStatus::Succeeded {
                    attempt,
                    finished_at: now,
                    output,
                };
                (index, status)
            }
            Event::StepFailed {
                step_id,
                attempt,
                reason,
            } => {
                let index = self.index_of(&step_id)?;
                self.running_attempt(index, attempt)?;
                (
                    index,
                    self.after_failure(template, index, attempt, reason, now)?,
                )
            }
            Event::StepTimedOut { step_id, attempt } => {
                let index = self.index_of(&step_id)?;
                let started_at = self.running_attempt(index, attempt)?;
                let step = &template.steps()[index];
                let Some(timeout) = step.timeout else {
                    return Err(RunError::WrongEvent {
                        step_id,
                        why: "the step has no timeout".to_owned(),
                    });
                };
                let due = add(started_at, timeout, &step.id)?;
                if now < due {
                    return Err(RunError::NotDue { step_id, due });
                }
                let reason = format!("timed out after {}", format_duration(timeout));
                (
                    index,
                    self.after_failure(template, index, attempt, reason, now)?,
                )
            }
            Event::WaitElapsed { step_id, attempt } => {
                let index = self.index_of(&step_id)?;
                let started_at = self.running_attempt(index, attempt)?;
                let StepKind::Wait(wait) = &template.steps()[index].kind else {
                    return Err(RunError::WrongEvent {
                        step_id,
                        why: "not a wait step".to_owned(),
                    });
                };
                let due = add(started_at, wait.duration, &step_id)?;
                if now < due {
                    return Err(RunError::NotDue { step_id, due });
                }
                let status = StepStatus::Succeeded {
                    attempt,
                    finished_at: now,
                    output: None,
                };
                (index, status)
            }
        };
        self.steps[index].status = new_status;
        self.settle(template, now);
        Ok(())
    }

    fn index_of(&self, step_id: &str) -> Result<usize, RunError> {
        self.steps
            .iter()
            .position(|record| record.id == step_id)
            .ok_or_else(|| RunError::UnknownStep {
                step_id: step_id.to_owned(),
            })
    }

    /// The status a start moves the step to, or `None` when this attempt is already running
    /// (a re-issued start after a plane restart is harmless).
    fn start(
        &self,
        template: &WorkflowTemplate,
        index: usize,
        attempt: u32,
        now: OffsetDateTime,
    ) -> Result<Option<StepStatus>, RunError> {
        let step_id = &self.steps[index].id;
        if self.cancel.is_some() {
            return Err(RunError::RunCancelled {
                step_id: step_id.clone(),
            });
        }
        let running = StepStatus::Running {
            attempt,
            started_at: now,
        };
        match &self.steps[index].status {
            StepStatus::Pending => {
                if attempt != 1 {
                    return Err(RunError::WrongAttempt {
                        step_id: step_id.clone(),
                        current: 1,
                        got: attempt,
                    });
                }
                match readiness(template, self, index) {
                    Readiness::Ready => Ok(Some(running)),
                    Readiness::Waiting => Err(RunError::NotStartable {
                        step_id: step_id.clone(),
                        why: "its needs are not settled".to_owned(),
                    }),
                    Readiness::Skip(reason) => Err(RunError::NotStartable {
                        step_id: step_id.clone(),
                        why: format!("it will be skipped ({reason:?})"),
                    }),
                }
            }
            StepStatus::WaitingRetry {
                attempt: next, at, ..
            } => {
                if attempt != *next {
                    return Err(RunError::WrongAttempt {
                        step_id: step_id.clone(),
                        current: *next,
                        got: attempt,
                    });
                }
                if now < *at {
                    return Err(RunError::NotDue {
                        step_id: step_id.clone(),
                        due: *at,
                    });
                }
                Ok(Some(running))
            }
            StepStatus::Running {
                attempt: current, ..
            } if *current == attempt => Ok(None),
            other => Err(RunError::NotStartable {
                step_id: step_id.clone(),
                why: format!("it is {}", other.name()),
            }),
        }
    }

    /// The start time of the running attempt `attempt`, or why the step is not in it.
    fn running_attempt(&self, index: usize, attempt: u32) -> Result<OffsetDateTime, RunError> {
        let record = &self.steps[index];
        match &record.status {
            StepStatus::Running {
                attempt: current,
                started_at,
            } => {
                if *current == attempt {
                    Ok(*started_at)
                } else {
                    Err(RunError::WrongAttempt {
                        step_id: record.id.clone(),
                        current: *current,
                        got: attempt,
                    })
                }
            }
            other => Err(RunError::NotRunning {
                step_id: record.id.clone(),
                status: other.name(),
            }),
        }
    }

    /// A failed attempt is retried when attempts remain and the run still wants the step;
    /// otherwise the step has failed.
    fn after_failure(
        &self,
        template: &WorkflowTemplate,
        index: usize,
        attempt: u32,
        reason: String,
        now: OffsetDateTime,
    ) -> Result<StepStatus, RunError> {
        let step = &template.steps()[index];
        if attempt < step.max_attempts() && self.cancel.is_none() && !self.abandons(step) {
            let at = add(now, step.retry.delay_after(attempt), &step.id)?;
            return Ok(StepStatus::WaitingRetry {
                attempt: attempt + 1,
                at,
                last_failure: reason,
            });
        }
        Ok(StepStatus::Failed {
            attempt,
            finished_at: now,
            reason,
        })
    }

    /// `on_success` work is not retried once another step failed.
    fn abandons(&self, step: &Step) -> bool {
        step.when == When::OnSuccess && self.has_failure()
    }

    /// Moves every step whose fate is now decided, then the run itself.
    fn settle(&mut self, template: &WorkflowTemplate, now: OffsetDateTime) {
        loop {
            let mut changed = false;
            for index in 0..self.steps.len() {
                let step = &template.steps()[index];
                let next = match &self.steps[index].status {
                    StepStatus::Pending => match readiness(template, self, index) {
                        Readiness::Skip(reason) => Some(StepStatus::Skipped { reason }),
                        Readiness::Ready | Readiness::Waiting => None,
                    },
                    StepStatus::WaitingRetry {
                        attempt,
                        last_failure,
                        ..
                    } => {
                        let why = if self.cancel.is_some() {
                            Some("run cancelled")
                        } else if self.abandons(step) {
                            Some("run failed")
                        } else {
                            None
                        };
                        why.map(|why| StepStatus::Failed {
                            attempt: attempt.saturating_sub(1),
                            finished_at: now,
                            reason: format!("{last_failure}; not retried: {why}"),
                        })
                    }
                    // Nothing outside the engine runs a wait, so cancelling ends it here.
                    StepStatus::Running { attempt, .. }
                        if self.cancel.is_some() && matches!(step.kind, StepKind::Wait(_)) =>
                    {
                        Some(StepStatus::Failed {
                            attempt: *attempt,
                            finished_at: now,
                            reason: "cancelled".to_owned(),
                        })
                    }
                    _ => None,
                };
                if let Some(status) = next {
                    self.steps[index].status = status;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        if self.steps.iter().all(|record| record.status.is_settled()) {
            self.status = if self.cancel.is_some() {
                RunStatus::Cancelled
            } else if self.has_failure() {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            };
            self.finished_at = Some(now);
        }
    }
}

pub(crate) fn add(
    at: OffsetDateTime,
    duration: std::time::Duration,
    step_id: &str,
) -> Result<OffsetDateTime, RunError> {
    time::Duration::try_from(duration)
        .ok()
        .and_then(|duration| at.checked_add(duration))
        .ok_or_else(|| RunError::TimeOutOfRange {
            step_id: step_id.to_owned(),
        })
}
