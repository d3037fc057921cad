//! Workflow templates (YAML DAGs) and the run state machine.
//!
//! A pure library: no storage, no network, no clock. The control plane parses a template with
//! [`WorkflowTemplate::parse`], creates a [`RunState`], and then loops: ask [`next_actions`]
//! what is due at `now`, carry the actions out (signed agent jobs, approvals, gates), feed
//! what happened back with [`RunState::apply`], persist the state. Resuming after a restart
//! is loading the state and calling [`next_actions`] again: settled steps never start again.

mod duration;
mod engine;
mod parse;
mod run;
mod template;

pub use duration::{MAX_DURATION, format_duration, parse_duration};
pub use engine::{Action, RunOutcome, idempotency_key, next_actions};
pub use parse::{MAX_STEPS, MAX_TEMPLATE_BYTES, TemplateError, TemplateErrors};
pub use run::{
    CancelRequest, Event, RunError, RunState, RunStatus, SkipReason, StepRecord, StepStatus,
};
pub use template::{
    DEFAULT_DEPLOY_YAML, DeploySpec, DeployStrategy, HealthCheckSpec, HealthProbe, NotifySpec,
    Retry, STEP_TYPES, ScriptSpec, Step, StepKind, WaitSpec, When, WorkflowTemplate,
};
