//! Promotion gates and decision records: whether a release may move into an environment,
//! and why.
//!
//! A pure library: the control plane gathers a [`PromotionInput`] (the promotion, the release,
//! the environment's rules, the approvals so far, the previous environment's deployment and
//! the current time), calls [`evaluate`] with the environment's [`PolicySet`], stores the
//! [`Decision`] and acts on its [`Outcome`]. Nothing here reads a clock, a database or the
//! network, so a stored input re-evaluates to the same decision.
//!
//! Gates, in the order they appear in every decision:
//! - `freeze_window`: failed inside an active freeze window unless an override was requested
//!   (`overrides.freeze_override_by`) by one of the window's `override_users`;
//! - `schedule_window`: failed outside every schedule window (none configured: passed);
//! - `dependency`: the latest deployment of this release into `environment.previous`
//!   succeeded (pending while it runs, failed otherwise; passed for the first environment);
//! - `separation_of_duties`: failed when the requester or the release's creator approved;
//! - `approvals`: N of M, pending until `required_approvals` distinct users approved (approvals
//!   breaking separation of duties are not counted), failed on any rejection;
//! - `manual`: pending until one of `environment.manual_approvers` approved;
//! - `policy`: Rego modules (a [`PolicySet`]) deciding through `data.stella.promotion.deny`
//!   and/or `allow`; fails closed. The contract is in `docs/policy.md`.
//!
//! A failed gate blocks the promotion whatever the approvals say; a pending gate (and none
//! failed) leaves it pending. The decision carries `input_hash`, the sha256 of the canonical
//! JSON of the input (`stella_pki::canonical_json`: sorted keys, no whitespace), and
//! `policy_digest`, the same over the Rego modules.
//!
//! The input document, field by field (as Rego sees it as `input`):
//! - `promotion`: `id`, `requested_by`, `requested_at` (RFC 3339 UTC), `reason`;
//! - `release`: `name`, `created_by`, `labels` (string → string), `components`
//!   (`[{name, image, digest}]`);
//! - `environment`: `name`, `previous` (name or null), `required_approvals`,
//!   `separation_of_duties`, `freeze_windows` (`[{start, end, reason, override_users}]`),
//!   `schedule_windows` (`[{days: ["mon"…"sun"], start: "HH:MM", end: "HH:MM"}]`, UTC),
//!   `manual_approvers`;
//! - `approvals`: `[{user, at, comment, decision: "approve" | "reject"}]`;
//! - `previous_environment_deployment`: `{release, status, finished_at}` or null;
//! - `overrides`: `{freeze_override_by}` (user or null);
//! - `now`: RFC 3339 UTC, the instant the decision is made for.

mod calendar;
mod decision;
mod error;
mod gates;
mod input;
mod rego;

pub use calendar::{TimeOfDay, Timestamp, Weekday};
pub use decision::{Decision, Outcome, evaluate};
pub use error::PolicyError;
pub use gates::{Gate, GateResult, GateStatus};
pub use input::{
    Approval, ApprovalDecision, EnvironmentRules, FreezeWindow, Overrides, PreviousDeployment,
    PromotionInput, PromotionRequest, ReleaseComponent, ReleaseFacts, ScheduleWindow,
    SeparationOfDutiesViolation,
};
pub use rego::{DEFAULT_TIMEOUT, PACKAGE, PolicySet};
