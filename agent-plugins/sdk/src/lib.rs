//! The contract between the agent runtime and its executors.
//!
//! An executor knows how to make one kind of target (docker host, compose project, ssh host, ...)
//! run exactly the digests a verified job names. The agent has already checked the job's
//! signature, audience, expiry and sequence before it calls anything here, so executors deal
//! only with the target. Executors depend on this crate alone: never on the agent, the
//! control plane, or each other.
//!
//! Besides the contract, the SDK holds the executor-agnostic pieces several executors share, so
//! that one piece serves where the logic is the same: [`labels`], [`naming`], [`digest`],
//! [`files`], [`output`], [`config`], [`validate`], [`readiness`] and [`engine`] (the last two for executors
//! that drive a Docker Engine, whatever client they use), and [`TargetLocks`].

pub mod config;
pub mod digest;
pub mod engine;
pub mod files;
pub mod labels;
pub mod naming;
pub mod output;
pub mod readiness;
pub mod validate;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::digest::is_valid_digest;

/// File name of the version sticker written on every target after a deployment.
pub const STICKER_FILE_NAME: &str = "stella.version.json";
/// Schema tag carried inside every sticker, so readers can refuse what they do not understand.
pub const STICKER_SCHEMA: &str = "stella.version/v1";

/// Where a job runs, as the control plane defined it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetRef {
    pub name: String,
    /// Executor kind, e.g. `docker`.
    pub kind: String,
    /// Executor-specific settings, validated by the executor (`Executor::validate_config`).
    #[serde(default)]
    pub config: serde_json::Value,
}

/// One component of a release: an image repository pinned to a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentSpec {
    pub name: String,
    /// Repository, optionally with a tag (`demo/app` or `demo/app:1`). Informational: the digest decides.
    pub image: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
}

/// Everything an executor needs to put a release on a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub job_id: String,
    pub deployment_id: String,
    pub release_id: String,
    pub release_name: String,
    pub target: TargetRef,
    pub components: Vec<ComponentSpec>,
    /// How the release replaces what runs; the agent hands an executor only the modes it
    /// [`supports`](Executor::supports).
    #[serde(default)]
    pub strategy: DeployMode,
}

/// How a deploy puts the release on its target (the signed job's `strategy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployMode {
    /// Stop what runs and start the release in its place. Every executor does this.
    #[default]
    Replace,
    /// Start the release beside what runs, wait until it is ready, switch to it, then stop the
    /// old workload; a release that does not become ready is removed and the old one keeps
    /// running.
    BlueGreen,
}

impl DeployMode {
    /// The name the job and the workflow template use: `replace`, `blue-green`.
    pub fn name(&self) -> &'static str {
        match self {
            DeployMode::Replace => "replace",
            DeployMode::BlueGreen => "blue-green",
        }
    }
}

/// What happened to one component during a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentAction {
    /// Nothing ran for this component before; a new workload was started.
    Created,
    /// A workload of another release/digest was replaced.
    Replaced,
    /// The workload already ran the wanted digest for this release: nothing was touched.
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentOutcome {
    pub name: String,
    pub digest: String,
    /// Executor-specific id of the workload (container id, service ARN, ...).
    pub workload_id: String,
    pub action: ComponentAction,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployOutcome {
    pub components: Vec<ComponentOutcome>,
    pub duration_ms: u64,
}

/// One Stella-managed workload as it really is on the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryItem {
    pub component: String,
    /// The digest the workload really runs (not the one it was asked to run).
    pub digest: String,
    /// e.g. `running`, `exited`, `created`.
    pub state: String,
    /// `healthy` / `unhealthy` / `starting` where the workload has a health check.
    pub health: Option<String>,
    pub workload_id: String,
    pub release_id: Option<String>,
    pub deployment_id: Option<String>,
}

/// One workload as drift needs to see it: the inventory item plus what tells Stella's own
/// workloads from foreign ones. Foreign workloads (`managed == false`) are the ones the target's
/// watched scope holds that carry no ownership labels; their `item.component` is empty unless
/// they claim one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedWorkload {
    #[serde(flatten)]
    pub item: InventoryItem,
    /// Stable name where the executor has one (a container name); else the workload id.
    pub name: String,
    /// Image reference the workload was started from; informational, the digest decides.
    pub image: String,
    pub managed: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl From<InventoryItem> for ObservedWorkload {
    /// What an executor that knows only its own workloads can say: each one is managed, named
    /// by its workload id, with no labels.
    fn from(item: InventoryItem) -> Self {
        Self {
            name: item.workload_id.clone(),
            image: String::new(),
            managed: true,
            labels: BTreeMap::new(),
            item,
        }
    }
}

/// Told by a watching executor that workloads changed, so the agent reports inventory now
/// instead of at its next periodic report.
pub trait ChangeSink: Send + Sync {
    /// `Some(target)`: something of that target changed. `None`: something changed that may
    /// concern any target of the executor (a foreign workload whose target is not known).
    fn changed(&self, target: Option<&str>);
}

/// How [`Executor::watch`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The executor cannot watch its backend: periodic and after-job reports are all there is.
    Unsupported,
    /// The backend closed the event stream; the caller may watch again.
    Closed,
}

/// `stella.version.json`: which release, which digests, which deployment a target runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionSticker {
    pub schema: String,
    pub target: String,
    pub release_id: String,
    pub release_name: String,
    pub deployment_id: String,
    pub job_id: String,
    pub components: Vec<ComponentSpec>,
    /// RFC 3339.
    pub written_at: String,
}

impl VersionSticker {
    pub fn for_deploy(spec: &DeploySpec, written_at: String) -> Self {
        Self {
            schema: STICKER_SCHEMA.to_string(),
            target: spec.target.name.clone(),
            release_id: spec.release_id.clone(),
            release_name: spec.release_name.clone(),
            deployment_id: spec.deployment_id.clone(),
            job_id: spec.job_id.clone(),
            components: spec.components.clone(),
            written_at,
        }
    }
}

/// Health of one component as the executor observes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentHealth {
    pub name: String,
    pub healthy: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub healthy: bool,
    pub components: Vec<ComponentHealth>,
}

/// Host-side context handed to executors when the agent builds them.
#[derive(Debug, Clone)]
pub struct ExecutorContext {
    /// A directory the executor may use for its own state (stickers of local targets, caches).
    /// It lives under the agent's data directory and survives agent restarts.
    pub state_dir: PathBuf,
}

/// Receives human-readable progress lines while a job runs; the agent forwards them to the plane.
pub trait ProgressSink: Send + Sync {
    fn progress(&self, message: &str);
}

/// A sink that drops everything; handy for inventory-only callers and tests.
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn progress(&self, _message: &str) {}
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("invalid target configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "component {component}: image {image} runs as {actual} but the job requires {expected}"
    )]
    DigestMismatch {
        component: String,
        image: String,
        expected: String,
        actual: String,
    },
    #[error("component {component}: no image with digest {digest} is available ({detail})")]
    ImageUnavailable {
        component: String,
        digest: String,
        detail: String,
    },
    #[error("component {component} did not become ready: {detail}; log tail:\n{log_tail}")]
    Unhealthy {
        component: String,
        detail: String,
        log_tail: String,
    },
    #[error("timed out after {seconds}s: {what}")]
    Timeout { what: String, seconds: u64 },
    #[error("executor backend error: {0}")]
    Backend(String),
    #[error("sticker I/O: {0}")]
    Sticker(String),
    /// The executor cannot deploy this way; nothing on the target was touched.
    #[error("the {kind} executor cannot deploy {strategy}")]
    UnsupportedStrategy {
        kind: String,
        strategy: &'static str,
    },
}

impl PluginError {
    /// Stable machine-readable code, used in job results and metrics labels.
    pub fn reason_code(&self) -> &'static str {
        match self {
            PluginError::InvalidConfig(_) => "invalid_target_config",
            PluginError::DigestMismatch { .. } => "digest_mismatch",
            PluginError::ImageUnavailable { .. } => "image_unavailable",
            PluginError::Unhealthy { .. } => "unhealthy",
            PluginError::Timeout { .. } => "timeout",
            PluginError::Backend(_) => "backend_error",
            PluginError::Sticker(_) => "sticker_error",
            PluginError::UnsupportedStrategy { .. } => "unsupported_strategy",
        }
    }
}

/// One executor kind. Every operation is an "ensure": running it twice has the effect of once.
#[async_trait::async_trait]
pub trait Executor: Send + Sync {
    /// The capability this executor gives its agent, e.g. `docker`.
    fn kind(&self) -> &'static str;

    /// Checks a target's configuration without touching the target.
    fn validate_config(&self, target: &TargetRef) -> Result<(), PluginError>;

    /// Whether [`Executor::deploy`] can honour `mode`. The agent refuses a job whose mode the
    /// executor does not support before calling anything else, so an executor never sees
    /// one. The default knows only [`DeployMode::Replace`].
    fn supports(&self, mode: DeployMode) -> bool {
        mode == DeployMode::Replace
    }

    /// Makes the target run exactly `spec.components` at their digests, replacing what the
    /// previous release ran (the way `spec.strategy` says), and waits until the workloads are
    /// running (and healthy where they declare a health check). Refuses before changing
    /// anything when a digest cannot be honoured.
    async fn deploy(
        &self,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError>;

    /// What Stella-managed workloads really run on the target.
    async fn inventory(&self, target: &TargetRef) -> Result<Vec<InventoryItem>, PluginError>;

    /// Every workload drift should know about on the target: the managed ones (as
    /// [`Executor::inventory`] reports them) and, where the executor can tell, foreign ones in
    /// the target's watched scope. The default knows the managed ones only.
    async fn observe(&self, target: &TargetRef) -> Result<Vec<ObservedWorkload>, PluginError> {
        Ok(self
            .inventory(target)
            .await?
            .into_iter()
            .map(ObservedWorkload::from)
            .collect())
    }

    /// Follows the backend's change events and calls `sink` for each change to a workload of
    /// interest, until the stream ends (`Closed`) or fails; the caller watches again after a
    /// pause. The default cannot watch and returns `Unsupported` at once.
    async fn watch(&self, sink: &dyn ChangeSink) -> Result<WatchEnd, PluginError> {
        let _ = sink;
        Ok(WatchEnd::Unsupported)
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError>;

    async fn read_sticker(&self, target: &TargetRef)
    -> Result<Option<VersionSticker>, PluginError>;

    /// Puts the target back on a previous release's digests. For most executors this is a
    /// deploy of the previous spec (deploys are ensures); executors with native rollback
    /// (ECS task definition revisions, Nomad job versions) override it.
    async fn rollback(
        &self,
        previous: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        self.deploy(previous, progress).await
    }

    /// Checks that each wanted component runs its digest and is not unhealthy, from inventory.
    async fn health_check(
        &self,
        target: &TargetRef,
        components: &[ComponentSpec],
    ) -> Result<HealthReport, PluginError> {
        let observed = self.inventory(target).await?;
        let components: Vec<ComponentHealth> = components
            .iter()
            .map(|c| match observed.iter().find(|o| o.component == c.name) {
                None => ComponentHealth {
                    name: c.name.clone(),
                    healthy: false,
                    detail: "not running".to_string(),
                },
                Some(o) if o.digest != c.digest => ComponentHealth {
                    name: c.name.clone(),
                    healthy: false,
                    detail: format!("runs {} instead of {}", o.digest, c.digest),
                },
                Some(o) if o.state != "running" => ComponentHealth {
                    name: c.name.clone(),
                    healthy: false,
                    detail: format!("state {}", o.state),
                },
                Some(o) if o.health.as_deref() == Some("unhealthy") => ComponentHealth {
                    name: c.name.clone(),
                    healthy: false,
                    detail: "health check failing".to_string(),
                },
                Some(_) => ComponentHealth {
                    name: c.name.clone(),
                    healthy: true,
                    detail: "running".to_string(),
                },
            })
            .collect();
        Ok(HealthReport {
            healthy: components.iter().all(|c| c.healthy),
            components,
        })
    }
}

/// Serializes the jobs of one target: two jobs for the same target must not interleave their
/// steps (stop/create, file writes, `up`s), while jobs for different targets may run at once.
#[derive(Debug, Default)]
pub struct TargetLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl TargetLocks {
    /// Waits until no other job holds `target`, and holds it until the guard is dropped.
    pub async fn lock(&self, target: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            // A poisoned map is still a valid map: the lock only guards insertion.
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            locks.entry(target.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// A duration in whole milliseconds, as outcomes report them (saturating).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Puts inventory items in the order every executor reports them: by component, then workload.
pub fn sort_inventory(items: &mut [InventoryItem]) {
    items.sort_by(|a, b| {
        (a.component.as_str(), a.workload_id.as_str())
            .cmp(&(b.component.as_str(), b.workload_id.as_str()))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_job_per_target_at_a_time() {
        let locks = TargetLocks::default();
        let a = locks.lock("a").await;
        // Another target is free; the same one is not until the guard goes.
        let _b = locks.lock("b").await;
        let pending = tokio::time::timeout(Duration::from_millis(20), locks.lock("a")).await;
        assert!(pending.is_err());
        drop(a);
        let _a = locks.lock("a").await;
    }

    #[test]
    fn helpers() {
        assert_eq!(millis(Duration::from_micros(2500)), 2);
        let item = |component: &str, workload_id: &str| InventoryItem {
            component: component.to_string(),
            digest: String::new(),
            state: "running".to_string(),
            health: None,
            workload_id: workload_id.to_string(),
            release_id: None,
            deployment_id: None,
        };
        let mut items = vec![item("web", "2"), item("api", "9"), item("web", "1")];
        sort_inventory(&mut items);
        let order: Vec<(&str, &str)> = items
            .iter()
            .map(|i| (i.component.as_str(), i.workload_id.as_str()))
            .collect();
        assert_eq!(order, vec![("api", "9"), ("web", "1"), ("web", "2")]);
    }
}
