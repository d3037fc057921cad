//! The parts of Nomad's HTTP API objects Stella reads. Field names are Nomad's; every field is
//! optional on the wire (Nomad writes `null` for empty maps and lists), and anything else in the
//! objects is ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::template::{META_COMPONENT, META_DIGEST_PREFIX, component_of_task, digest_of};

/// `null` and a missing field both become the type's default.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Job {
    #[serde(default, deserialize_with = "nullable")]
    pub version: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub stable: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub stop: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub job_modify_index: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub meta: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub task_groups: Vec<TaskGroup>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TaskGroup {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub tasks: Vec<Task>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Task {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub config: Map<String, Value>,
    #[serde(default, deserialize_with = "nullable")]
    pub meta: Map<String, Value>,
}

/// One task of a job version that runs a Stella component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ComponentTask {
    pub component: String,
    pub group: String,
    pub task: String,
    /// `Config.image` as registered.
    pub image: String,
}

impl ComponentTask {
    /// What the task pins: the digest of its image, or the image itself when it pins none (so
    /// that a comparison with a wanted digest fails and says what runs instead).
    pub(crate) fn digest(&self) -> &str {
        digest_of(&self.image).unwrap_or(&self.image)
    }
}

impl Job {
    /// Components the job version was deployed with (`stella.digest.<name>` meta).
    pub(crate) fn stella_components(&self) -> BTreeMap<&str, &str> {
        self.meta
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(META_DIGEST_PREFIX)?, v.as_str())))
            .collect()
    }

    /// The tasks running Stella components: those with `stella.component` meta, and those
    /// whose name is a component of the version.
    pub(crate) fn component_tasks(&self) -> Vec<ComponentTask> {
        let components = self.stella_components();
        let mut out = Vec::new();
        for group in &self.task_groups {
            for task in &group.tasks {
                let explicit = task.meta.get(META_COMPONENT).and_then(Value::as_str);
                let component = component_of_task(&task.name, Some(&task.meta));
                if explicit.is_none() && !components.contains_key(component) {
                    continue;
                }
                out.push(ComponentTask {
                    component: component.to_string(),
                    group: group.name.clone(),
                    task: task.name.clone(),
                    image: task
                        .config
                        .get("image")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                });
            }
        }
        out
    }

    /// Whether every wanted component runs in at least one task and every such task pins the
    /// wanted digest, and the version runs no other Stella component.
    pub(crate) fn pins_exactly(&self, wanted: &BTreeMap<&str, &str>) -> bool {
        let tasks = self.component_tasks();
        wanted
            .keys()
            .all(|c| tasks.iter().any(|t| t.component == *c))
            && tasks
                .iter()
                .all(|t| wanted.get(t.component.as_str()) == Some(&t.digest()))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct JobVersions {
    #[serde(default, deserialize_with = "nullable")]
    pub versions: Vec<Job>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RegisterResponse {
    #[serde(rename = "EvalID", default, deserialize_with = "nullable")]
    pub eval_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub warnings: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Deployment {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(rename = "JobID", default, deserialize_with = "nullable")]
    pub job_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub job_version: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub status_description: String,
    #[serde(default, deserialize_with = "nullable")]
    pub task_groups: BTreeMap<String, DeploymentState>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct DeploymentState {
    #[serde(default, deserialize_with = "nullable")]
    pub auto_promote: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub promoted: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub desired_canaries: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub desired_total: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub placed_allocs: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub healthy_allocs: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub unhealthy_allocs: u64,
}

impl Deployment {
    /// Groups whose canaries wait for a promotion.
    pub(crate) fn awaiting_promotion(&self) -> Vec<&str> {
        self.task_groups
            .iter()
            .filter(|(_, s)| s.desired_canaries > 0 && !s.promoted)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Every group awaiting promotion has all its canaries healthy (Nomad refuses to promote
    /// before that).
    pub(crate) fn canaries_healthy(&self) -> bool {
        self.task_groups
            .values()
            .filter(|s| s.desired_canaries > 0 && !s.promoted)
            .all(|s| s.healthy_allocs >= s.desired_canaries)
    }

    /// `web 1/2 healthy, 1 canary; api 2/2 healthy`.
    pub(crate) fn groups_summary(&self) -> String {
        let groups: Vec<String> = self
            .task_groups
            .iter()
            .map(|(name, s)| {
                let mut g = format!("{name} {}/{} healthy", s.healthy_allocs, s.desired_total);
                if s.unhealthy_allocs > 0 {
                    g.push_str(&format!(", {} unhealthy", s.unhealthy_allocs));
                }
                if s.desired_canaries > 0 {
                    g.push_str(&format!(
                        ", {} canar{}{}",
                        s.desired_canaries,
                        if s.desired_canaries == 1 { "y" } else { "ies" },
                        if s.promoted { " promoted" } else { "" }
                    ));
                }
                g
            })
            .collect();
        groups.join("; ")
    }

    /// `running (Deployment is running)`.
    pub(crate) fn status_text(&self) -> String {
        if self.status_description.is_empty() {
            self.status.clone()
        } else {
            format!("{} ({})", self.status, self.status_description)
        }
    }

    /// One line describing the deployment, for progress.
    pub(crate) fn summary(&self) -> String {
        let mut line = format!("deployment {} {}", short(&self.id), self.status_text());
        let groups = self.groups_summary();
        if !groups.is_empty() {
            line.push_str(": ");
            line.push_str(&groups);
        }
        line
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Allocation {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    pub id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub job_version: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub task_group: String,
    #[serde(default, deserialize_with = "nullable")]
    pub client_status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub desired_status: String,
    #[serde(default, deserialize_with = "nullable")]
    pub task_states: BTreeMap<String, TaskState>,
    #[serde(default, deserialize_with = "nullable")]
    pub deployment_status: Option<AllocDeploymentStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TaskState {
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    #[serde(default, deserialize_with = "nullable")]
    pub failed: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub events: Vec<TaskEvent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TaskEvent {
    #[serde(rename = "Type", default, deserialize_with = "nullable")]
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub display_message: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct AllocDeploymentStatus {
    #[serde(default)]
    pub healthy: Option<bool>,
}

impl Allocation {
    /// The state of one task of the allocation, in the words inventory uses.
    pub(crate) fn task_state(&self, task: &str) -> String {
        // What happened to the allocation as a whole overrides its tasks' last states.
        if matches!(
            self.client_status.as_str(),
            "failed" | "lost" | "unknown" | "complete"
        ) {
            return self.client_status.clone();
        }
        match self.task_states.get(task) {
            Some(t) if t.state == "dead" && t.failed => "failed".to_string(),
            Some(t) if t.state == "dead" => "exited".to_string(),
            Some(t) if !t.state.is_empty() => t.state.clone(),
            _ => self.client_status.clone(),
        }
    }

    pub(crate) fn health(&self) -> Option<String> {
        let status = self.deployment_status.as_ref()?;
        Some(
            match status.healthy {
                Some(true) => "healthy",
                Some(false) => "unhealthy",
                None => "starting",
            }
            .to_string(),
        )
    }

    /// The last few task events, for failure reports.
    pub(crate) fn describe_failure(&self) -> String {
        let mut parts = Vec::new();
        for (task, state) in &self.task_states {
            let events: Vec<String> = state
                .events
                .iter()
                .rev()
                .take(3)
                .rev()
                .map(|e| {
                    if e.display_message.is_empty() {
                        e.kind.clone()
                    } else {
                        format!("{}: {}", e.kind, e.display_message)
                    }
                })
                .collect();
            parts.push(format!(
                "task {task} {}{}{}",
                state.state,
                if state.failed { " (failed)" } else { "" },
                if events.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", events.join("; "))
                }
            ));
        }
        format!(
            "alloc {} (group {}, version {}) {}: {}",
            short(&self.id),
            self.task_group,
            self.job_version,
            self.client_status,
            if parts.is_empty() {
                "no task states".to_string()
            } else {
                parts.join(", ")
            }
        )
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Variable {
    #[serde(default, deserialize_with = "nullable")]
    pub items: BTreeMap<String, String>,
}

/// The first 8 characters of a Nomad UUID, as the Nomad CLI shows them.
pub(crate) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}
