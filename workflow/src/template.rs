//! The validated form of a workflow template. Values of these types only come out of
//! [`WorkflowTemplate::parse`] (or [`WorkflowTemplate::default_deploy`]), so the engine can rely
//! on what validation proved: ids are unique, `needs` point at existing steps, there is no cycle.

use std::time::Duration;

use url::Url;

use crate::duration::MAX_DURATION;
use crate::parse::{self, TemplateErrors};

/// A workflow template: a named DAG of steps.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowTemplate {
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) steps: Vec<Step>,
}

/// The source of [`WorkflowTemplate::default_deploy`], for environments that have no template
/// of their own (the plane can store or show it as the environment's template).
pub const DEFAULT_DEPLOY_YAML: &str = "\
name: default-deploy
description: approval, gates, deploy, health check; rollback when deploy or health check fails
steps:
  - id: approve
    type: approval
  - id: gate
    type: gate
    needs: [approve]
  - id: deploy
    type: deploy
    needs: [gate]
    with: { strategy: all-at-once }
    timeout: 30m
  - id: health
    type: health-check
    needs: [deploy]
    with: { container: true, interval: 2s, healthy_after: 3 }
    timeout: 5m
  - id: rollback
    type: rollback
    needs: [deploy, health]
    when: on_failure
";

impl WorkflowTemplate {
    /// Parses and validates a YAML template. `file_name` only labels the errors
    /// (`workflow.yaml:12:5: …`). Every problem found is reported, not only the first.
    pub fn parse(file_name: &str, source: &str) -> Result<WorkflowTemplate, TemplateErrors> {
        parse::parse_template(file_name, source)
    }

    /// approval → gate → deploy (all at once, 30m timeout) → health-check (container health,
    /// 3 healthy observations, 5m timeout), with a rollback when deploy or the health check
    /// failed. Equal to parsing [`DEFAULT_DEPLOY_YAML`].
    pub fn default_deploy() -> WorkflowTemplate {
        let step = |id: &str, kind: StepKind, needs: &[&str]| Step {
            id: id.to_owned(),
            kind,
            needs: needs.iter().map(|need| (*need).to_owned()).collect(),
            retry: Retry::NONE,
            timeout: None,
            when: When::OnSuccess,
        };
        WorkflowTemplate {
            name: "default-deploy".to_owned(),
            description: Some(
                "approval, gates, deploy, health check; rollback when deploy or health check fails"
                    .to_owned(),
            ),
            steps: vec![
                step("approve", StepKind::Approval, &[]),
                step("gate", StepKind::Gate, &["approve"]),
                Step {
                    timeout: Some(Duration::from_secs(30 * 60)),
                    ..step(
                        "deploy",
                        StepKind::Deploy(DeploySpec {
                            strategy: DeployStrategy::AllAtOnce,
                        }),
                        &["gate"],
                    )
                },
                Step {
                    timeout: Some(Duration::from_secs(5 * 60)),
                    ..step(
                        "health",
                        StepKind::HealthCheck(HealthCheckSpec {
                            probe: HealthProbe::Container,
                            interval: Duration::from_secs(2),
                            healthy_after: 3,
                        }),
                        &["deploy"],
                    )
                },
                Step {
                    when: When::OnFailure,
                    ..step("rollback", StepKind::Rollback, &["deploy", "health"])
                },
            ],
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Steps in the order the template lists them (also the order actions are emitted in).
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.iter().find(|step| step.id == id)
    }
}

/// One step of a template.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    /// Steps that must be settled before this one is considered (see [`When`]).
    pub needs: Vec<String>,
    pub retry: Retry,
    /// Measured from the start of each attempt; `None` waits indefinitely.
    pub timeout: Option<Duration>,
    pub when: When,
}

impl Step {
    /// Attempts allowed in total: the first one plus `retry.count`.
    pub fn max_attempts(&self) -> u32 {
        self.retry.count.saturating_add(1)
    }
}

/// The type of a step, with its `with` settings.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// Waits for the promotion's approvals; the plane decides.
    Approval,
    /// Evaluates the promotion's gates; the plane decides.
    Gate,
    Deploy(DeploySpec),
    HealthCheck(HealthCheckSpec),
    Script(ScriptSpec),
    Notify(NotifySpec),
    /// Handled by the engine itself: no job, it completes when its duration has passed.
    Wait(WaitSpec),
    /// Puts the previous release's digests back on the targets this run changed.
    Rollback,
}

impl StepKind {
    /// The name used for `type:` in templates.
    pub fn type_name(&self) -> &'static str {
        match self {
            StepKind::Approval => "approval",
            StepKind::Gate => "gate",
            StepKind::Deploy(_) => "deploy",
            StepKind::HealthCheck(_) => "health-check",
            StepKind::Script(_) => "script",
            StepKind::Notify(_) => "notify",
            StepKind::Wait(_) => "wait",
            StepKind::Rollback => "rollback",
        }
    }
}

/// Every accepted `type:` value, in the order error messages list them.
pub const STEP_TYPES: [&str; 8] = [
    "approval",
    "gate",
    "deploy",
    "health-check",
    "script",
    "notify",
    "wait",
    "rollback",
];

#[derive(Debug, Clone, PartialEq)]
pub struct DeploySpec {
    pub strategy: DeployStrategy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployStrategy {
    AllAtOnce,
    /// Targets are updated `batch_size` at a time, with at most `max_unavailable` of them out
    /// of service at once (`max_unavailable <= batch_size`).
    Rolling {
        batch_size: u32,
        max_unavailable: u32,
    },
    /// Start the new release beside the old one, check health, switch, stop the old one.
    BlueGreen,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckSpec {
    pub probe: HealthProbe,
    /// Time between two probes.
    pub interval: Duration,
    /// Consecutive healthy probes needed to succeed.
    pub healthy_after: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HealthProbe {
    /// An HTTP GET run by the agent; healthy when the status equals `expect_status`.
    Http { url: Url, expect_status: u16 },
    /// The container engine's own health status (or "running" when the image has none).
    Container,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScriptSpec {
    /// argv, run by the agent without a shell unless the command names one.
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NotifySpec {
    pub webhook: Url,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitSpec {
    pub duration: Duration,
}

/// Retries after a failed or timed-out attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first attempt (0..=10).
    pub count: u32,
    /// Delay before the first retry.
    pub backoff: Duration,
    /// Each further retry waits `factor` times longer than the previous one (1..=10).
    pub factor: u32,
}

impl Retry {
    pub const NONE: Retry = Retry {
        count: 0,
        backoff: Duration::ZERO,
        factor: 1,
    };
    pub const MAX_COUNT: u32 = 10;
    pub const MAX_FACTOR: u32 = 10;
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);
    pub const DEFAULT_FACTOR: u32 = 2;

    /// The delay between the end of attempt `failed_attempt` (1-based) and the next one:
    /// `backoff × factor^(failed_attempt − 1)`, capped at the longest template duration.
    pub fn delay_after(&self, failed_attempt: u32) -> Duration {
        let exponent = failed_attempt.saturating_sub(1);
        let multiplier = u64::from(self.factor)
            .checked_pow(exponent)
            .unwrap_or(u64::MAX);
        let millis = u64::try_from(self.backoff.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(multiplier);
        Duration::from_millis(millis).min(MAX_DURATION)
    }
}

/// When a step runs, once everything it `needs` is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Default: every need succeeded and no step of the run has failed.
    OnSuccess,
    /// At least one need failed (without `needs`: any `on_success` step failed).
    OnFailure,
    /// Whatever the needs' outcomes (without `needs`: after every `on_success` step).
    Always,
}

impl When {
    pub fn as_str(self) -> &'static str {
        match self {
            When::OnSuccess => "on_success",
            When::OnFailure => "on_failure",
            When::Always => "always",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_factor_and_is_capped() {
        let retry = Retry {
            count: 3,
            backoff: Duration::from_secs(5),
            factor: 2,
        };
        assert_eq!(retry.delay_after(1), Duration::from_secs(5));
        assert_eq!(retry.delay_after(2), Duration::from_secs(10));
        assert_eq!(retry.delay_after(3), Duration::from_secs(20));
        let steep = Retry {
            count: 10,
            backoff: Duration::from_secs(3600),
            factor: 10,
        };
        assert_eq!(steep.delay_after(10), MAX_DURATION);
    }

    #[test]
    fn default_deploy_equals_its_documented_yaml() {
        let parsed = WorkflowTemplate::parse("default.yaml", DEFAULT_DEPLOY_YAML)
            .unwrap_or_else(|errors| panic!("{errors}"));
        assert_eq!(parsed, WorkflowTemplate::default_deploy());
    }
}
