//! The two sides drift is computed from: what should run on a target and what an agent saw.
//!
//! These are the crate's own types, not the agent protocol's or the plugin SDK's: the control
//! plane never links a plugin, and drift rules should not move when a wire format does. The
//! plane maps its rows onto them (see the crate documentation for what maps to what).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// What should run on one target: the last successful deployment to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredTarget {
    /// Target name, unique in the plane.
    pub target: String,
    /// Executor kind of the target (`docker`, `compose`, `ssh`, ...). Carried into findings.
    pub kind: String,
    /// Id of the release the deployment put there.
    pub release: String,
    pub deployment_id: String,
    pub components: Vec<DesiredComponent>,
    /// Whether that deployment wrote a version sticker. `false` turns sticker checks off for
    /// the target (e.g. a deployment older than stickers), so their absence is not drift.
    pub sticker_expected: bool,
}

/// One component of the desired release: an image pinned to a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredComponent {
    pub name: String,
    /// Informational (repository, maybe with a tag): the digest decides.
    pub image: String,
    /// `sha256:<hex>`.
    pub digest: String,
}

/// One inventory report for a target: every workload the executor saw, and the sticker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedTarget {
    pub target: String,
    #[serde(with = "time::serde::rfc3339")]
    pub observed_at: OffsetDateTime,
    pub items: Vec<ObservedItem>,
    /// The version sticker as read from the target; `None` when the target has none.
    pub sticker: Option<ObservedSticker>,
}

/// One workload on a target (a container, a compose service, an ECS service, a Nomad task...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedItem {
    /// The component the workload says it runs (Stella's component label); `None` when it
    /// carries none, i.e. it is not Stella's.
    pub component: Option<String>,
    /// Workload name as the executor knows it; stable across restarts where the executor
    /// allows it (container name rather than container id).
    pub name: String,
    pub image: String,
    /// The digest the workload really runs; `None` when the executor cannot tell.
    pub digest: Option<String>,
    pub state: WorkloadState,
    /// Whether the workload carries Stella's ownership labels.
    pub managed: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Run state of a workload, reduced to what drift needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadState {
    Running,
    /// Exists but does not run (exited, created, paused, dead, failed, complete).
    Stopped,
    /// Known to the executor as gone (deleted, lost with its node).
    Missing,
    /// Transitional or unreadable (starting, pending, deploying, restarting, ...): never drift
    /// by itself, so a deploy in progress or a flaky read raises nothing.
    Unknown,
}

impl WorkloadState {
    /// Maps the state strings executors report (`InventoryItem::state` in the plugin SDK) onto
    /// drift's states. Anything not recognised is `Unknown`, never a finding.
    pub fn from_reported(state: &str) -> Self {
        match state.trim().to_ascii_lowercase().as_str() {
            "running" => Self::Running,
            "exited" | "created" | "paused" | "dead" | "stopped" | "failed" | "complete" => {
                Self::Stopped
            }
            "missing" | "lost" | "removing" | "removed" | "deleted" => Self::Missing,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Missing => "missing",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for WorkloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parts of `stella.version.json` drift compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedSticker {
    /// Release id written in the sticker.
    pub release: String,
    pub deployment_id: String,
    pub components: Vec<StickerComponent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StickerComponent {
    pub name: String,
    pub digest: String,
}
