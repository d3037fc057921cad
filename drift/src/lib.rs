//! Drift findings: desired vs observed state, ignore rules, remediation policy.
//!
//! A pure library: no storage, no network, no clock (time is an input). The control plane
//! feeds it the desired state of a target and the latest inventory an agent reported, stores
//! the [`Finding`]s it returns (de-duplicated by [`Finding::fingerprint`]), and carries out a
//! [`Decision`] of the target's [`Remediator`] — a reconcile is a normal signed deploy job.
//!
//! # What maps to what
//! The inputs are this crate's own types; the plane maps onto them:
//! - [`DesiredTarget`]: the target and its kind; `release` = release id and `deployment_id`
//!   of the target's last succeeded job; `components` = that release's components (name,
//!   image, digest); `sticker_expected` = whether that deployment writes a sticker (every
//!   executor does today).
//! - [`ObservedTarget`]: one `TargetInventory` of an `InventoryReport` (`observed_at` =
//!   `observed_at_unix_ms`). Each `Workload` / SDK `InventoryItem` becomes an [`ObservedItem`]:
//!   `component` (empty → `None`), `name` = the workload's stable name (the workload id where
//!   the executor has nothing steadier), `digest` (empty → `None`), `state` through
//!   [`WorkloadState::from_reported`], `managed` and `labels` from the executor's labels.
//!   `sticker_json` (an SDK `VersionSticker`) becomes an [`ObservedSticker`]: `release_id`,
//!   `deployment_id`, component names and digests; empty → `None`.
//!   A report whose `error` is set observed nothing and must not be fed to [`detect`]: an
//!   unreadable target is not a target where everything is missing.

mod detect;
mod finding;
mod ignore;
mod remediation;
mod state;

pub use detect::{DetectError, detect};
pub use finding::{Finding, FindingKind, Severity, UnknownKind};
pub use ignore::{Condition, IgnoreRule, IgnoreRuleError, IgnoreRules, IgnoreScope, Selector};
pub use remediation::{
    BreakerState, Decision, PolicyError, ReconcileOutcome, RemediationError, RemediationMode,
    RemediationPolicy, Remediator, SuppressReason,
};
pub use state::{
    DesiredComponent, DesiredTarget, ObservedItem, ObservedSticker, ObservedTarget,
    StickerComponent, WorkloadState,
};
