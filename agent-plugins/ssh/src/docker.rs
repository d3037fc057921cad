//! Mode `docker`: the docker executor's semantics, driven through the remote host's `docker` CLI
//! over SSH. One container per component, named `stella-<target>-<component>`, carrying the same
//! labels the docker executor sets; created from the image *id* a digest resolves to, never from
//! a tag; every digest resolved before anything on the host changes.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use stella_plugin_sdk::digest::{RunningDigests, matching_repo_digest, short_id};
use stella_plugin_sdk::engine::{self, ImageStore, RESTART_POLICY};
use stella_plugin_sdk::labels::{self, COMPONENT, DEPLOYMENT_ID, DIGEST, RELEASE_ID, TARGET};
use stella_plugin_sdk::naming::container_name;
use stella_plugin_sdk::readiness::{
    self, ContainerState, LOG_FETCH_TIMEOUT, LOG_TAIL_LINES, SETTLE, WaitOptions,
};
use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec, InventoryItem,
    PluginError, ProgressSink, millis, sort_inventory,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::conn::{Connection, Exit, Output, RunError};
use crate::naming::quote;

const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ImageJson {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "RepoDigests")]
    repo_digests: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ContainerJson {
    #[serde(rename = "Id")]
    id: String,
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "Image")]
    image: String,
    #[serde(rename = "RestartCount")]
    restart_count: i64,
    #[serde(rename = "Config")]
    config: ConfigJson,
    #[serde(rename = "State")]
    state: StateJson,
    #[serde(rename = "HostConfig")]
    host_config: HostConfigJson,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConfigJson {
    #[serde(rename = "Labels")]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StateJson {
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "ExitCode")]
    exit_code: i64,
    #[serde(rename = "OOMKilled")]
    oom_killed: bool,
    #[serde(rename = "Error")]
    error: String,
    #[serde(rename = "StartedAt")]
    started_at: String,
    #[serde(rename = "Health")]
    health: Option<HealthJson>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HealthJson {
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "Log")]
    log: Option<Vec<HealthLogJson>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HealthLogJson {
    #[serde(rename = "Output")]
    output: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HostConfigJson {
    #[serde(rename = "RestartPolicy")]
    restart_policy: Option<RestartPolicyJson>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RestartPolicyJson {
    #[serde(rename = "Name")]
    name: String,
}

impl ContainerJson {
    fn label(&self, key: &str) -> Option<&str> {
        self.config.labels.as_ref()?.get(key).map(String::as_str)
    }

    /// `healthy` / `unhealthy` / `starting`, or None without a health check.
    fn health(&self) -> Option<&str> {
        readiness::health_status(self.state.health.as_ref()?.status.as_str())
    }

    /// This inspection as the SDK's readiness rules read it.
    fn readiness_state(&self) -> ContainerState {
        let health_output = self
            .state
            .health
            .as_ref()
            .and_then(|h| h.log.as_ref())
            .and_then(|log| log.last())
            .map(|r| r.output.clone())
            .unwrap_or_default();
        ContainerState {
            status: self.state.status.clone(),
            health: self.health().map(str::to_string),
            restart_count: self.restart_count,
            exit_code: self.state.exit_code,
            oom_killed: self.state.oom_killed,
            error: self.state.error.clone(),
            started_at: self.state.started_at.clone(),
            health_output,
        }
    }
}

/// One line of `docker ps --format '{{json .}}'`.
#[derive(Debug, Deserialize)]
struct PsLine {
    #[serde(rename = "ID")]
    id: String,
}

/// The remote host's Docker CLI, bounded by the job's deadline.
pub(crate) struct RemoteDocker<'a> {
    conn: &'a Connection,
    deadline: Instant,
    timeout_secs: u64,
}

impl<'a> RemoteDocker<'a> {
    pub(crate) fn new(conn: &'a Connection, deadline: Instant, timeout_secs: u64) -> Self {
        Self {
            conn,
            deadline,
            timeout_secs,
        }
    }

    async fn exec(&self, what: &str, args: &[&str]) -> Result<Output, PluginError> {
        let command = std::iter::once("docker")
            .chain(args.iter().copied())
            .map(quote)
            .collect::<Vec<_>>()
            .join(" ");
        self.conn
            .run(&command, self.deadline, None, true)
            .await
            .map_err(|e| match e {
                RunError::TimedOut => PluginError::Timeout {
                    what: format!("{what} on {}", self.conn.destination()),
                    seconds: self.timeout_secs,
                },
                RunError::Ssh(m) => PluginError::Backend(format!("{what}: {m}")),
            })
    }

    fn failed(&self, what: &str, out: &Output) -> PluginError {
        let hint = if out.exit == Exit::Code(127) {
            " (is the docker CLI installed and on the PATH of the ssh user?)"
        } else {
            ""
        };
        PluginError::Backend(format!(
            "{what} on {}: docker ended with {}{hint}: {}",
            self.conn.destination(),
            out.exit,
            out.tail_text().trim()
        ))
    }

    async fn ok(&self, what: &str, args: &[&str]) -> Result<Vec<u8>, PluginError> {
        let out = self.exec(what, args).await?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(self.failed(what, &out))
        }
    }

    fn not_found(out: &Output) -> bool {
        let text = out.tail_text().to_ascii_lowercase();
        text.contains("no such image")
            || text.contains("no such container")
            || text.contains("no such object")
    }

    async fn inspect_image(&self, reference: &str) -> Result<Option<ImageJson>, PluginError> {
        let out = self
            .exec(
                "inspect image",
                &["image", "inspect", "--format", "{{json .}}", reference],
            )
            .await?;
        if !out.success() {
            return if Self::not_found(&out) {
                Ok(None)
            } else {
                Err(self.failed("inspect image", &out))
            };
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| PluginError::Backend(format!("inspect image: unexpected output: {e}")))
    }

    async fn inspect_container(&self, id: &str) -> Result<Option<ContainerJson>, PluginError> {
        let out = self
            .exec(
                "inspect container",
                &["container", "inspect", "--format", "{{json .}}", id],
            )
            .await?;
        if !out.success() {
            return if Self::not_found(&out) {
                Ok(None)
            } else {
                Err(self.failed("inspect container", &out))
            };
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| PluginError::Backend(format!("inspect container: unexpected output: {e}")))
    }

    /// The local image `digest` names: its id (locally built images have no registry digest)
    /// or an image whose RepoDigests carry exactly `repo@digest`.
    async fn find_local_image(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<String>, PluginError> {
        if let Some(img) = self.inspect_image(digest).await?
            && img.id == digest
        {
            return Ok(Some(img.id));
        }
        let by_repo = self.inspect_image(&format!("{repo}@{digest}")).await?;
        Ok(by_repo
            .filter(|img| {
                let rds = img.repo_digests.as_deref().unwrap_or_default();
                matching_repo_digest(rds, repo, digest).is_some()
            })
            .map(|img| img.id))
    }

    /// A container name held by something that is not this target's component would make the
    /// create fail after the old container is already gone; refuse up front instead.
    async fn check_name_free(&self, target: &str, component: &str) -> Result<(), PluginError> {
        let name = container_name(target, component);
        match self.inspect_container(&name).await? {
            None => Ok(()),
            Some(info)
                if info.label(TARGET) == Some(target)
                    && info.label(COMPONENT) == Some(component) =>
            {
                Ok(())
            }
            Some(_) => Err(PluginError::Backend(format!(
                "component {component}: container name {name} is taken by a container Stella \
                 does not manage for target {target}"
            ))),
        }
    }

    async fn list_target_containers(
        &self,
        target: &str,
    ) -> Result<Vec<ContainerJson>, PluginError> {
        let filter = format!("label={TARGET}={target}");
        let stdout = self
            .ok(
                "list containers",
                &[
                    "ps",
                    "-a",
                    "--no-trunc",
                    "--filter",
                    &filter,
                    "--format",
                    "{{json .}}",
                ],
            )
            .await?;
        let mut out = Vec::new();
        for line in String::from_utf8_lossy(&stdout).lines() {
            if line.trim().is_empty() {
                continue;
            }
            let ps: PsLine = serde_json::from_str(line).map_err(|e| {
                PluginError::Backend(format!("list containers: unexpected output: {e}"))
            })?;
            // Gone between list and inspect: it no longer runs anything.
            let Some(info) = self.inspect_container(&ps.id).await? else {
                continue;
            };
            // The CLI's label filter is authoritative, but an odd engine must not make Stella
            // touch containers of another target.
            if info.label(TARGET) == Some(target) {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Whether `info` already is exactly what this component of this release should be.
    fn is_current(
        info: &ContainerJson,
        spec: &DeploySpec,
        c: &ComponentSpec,
        image_id: &str,
    ) -> bool {
        let expected_name = format!("/{}", container_name(&spec.target.name, &c.name));
        info.state.status == "running"
            && info.health() != Some("unhealthy")
            && info.image == image_id
            && info.name == expected_name
            && info.label(RELEASE_ID) == Some(spec.release_id.as_str())
            && info.label(DIGEST) == Some(c.digest.as_str())
            && info
                .host_config
                .restart_policy
                .as_ref()
                .is_some_and(|p| p.name == RESTART_POLICY)
    }

    async fn remove(&self, id: &str) -> Result<(), PluginError> {
        // Stop first so the workload gets its graceful-shutdown window; a forced remove would
        // SIGKILL it straight away.
        let out = self.exec("stop container", &["stop", id]).await?;
        if !out.success() {
            if Self::not_found(&out) {
                return Ok(());
            }
            warn!(container = id, detail = %out.tail_text(), "stop failed; removing by force");
        }
        let out = self.exec("remove container", &["rm", "-f", id]).await?;
        if out.success() || Self::not_found(&out) {
            Ok(())
        } else {
            Err(self.failed("remove container", &out))
        }
    }

    async fn ensure_component(
        &self,
        spec: &DeploySpec,
        c: &ComponentSpec,
        image_id: &str,
        previous: &[&ContainerJson],
        progress: &dyn ProgressSink,
    ) -> Result<(String, ComponentAction), PluginError> {
        let target = spec.target.name.as_str();
        if let Some(keep) = previous
            .iter()
            .find(|info| Self::is_current(info, spec, c, image_id))
        {
            // Duplicates can only come from tampering; they would run next to the real one.
            for stray in previous.iter().filter(|p| p.id != keep.id) {
                progress.progress(&format!(
                    "{}: removing stray container {}",
                    c.name,
                    short_id(&stray.id)
                ));
                self.remove(&stray.id).await?;
            }
            progress.progress(&format!(
                "{}: container {} already runs this release, unchanged",
                c.name,
                short_id(&keep.id)
            ));
            self.wait_ready(&keep.id, &c.name, None).await?;
            return Ok((keep.id.clone(), ComponentAction::Unchanged));
        }

        let action = if previous.is_empty() {
            ComponentAction::Created
        } else {
            ComponentAction::Replaced
        };
        for old in previous {
            progress.progress(&format!(
                "{}: replacing container {}",
                c.name,
                short_id(&old.id)
            ));
            info!(target, component = %c.name, container = %old.id, "removing previous container");
            self.remove(&old.id).await?;
        }

        let name = container_name(target, &c.name);
        let labels = labels::container_labels(spec, c).map(|(k, v)| format!("{k}={v}"));
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            name.as_str(),
            "--restart",
            RESTART_POLICY,
        ];
        for label in &labels {
            args.push("--label");
            args.push(label);
        }
        args.push(image_id);
        progress.progress(&format!("{}: creating container {name}", c.name));
        let stdout = self
            .ok(&format!("component {}: run container", c.name), &args)
            .await?;
        let id = String::from_utf8_lossy(&stdout).trim().to_string();
        info!(target, component = %c.name, container = %id, image = image_id, "container started");

        let actual = self
            .inspect_container(&id)
            .await?
            .map(|info| info.image)
            .unwrap_or_default();
        if actual != image_id {
            return Err(PluginError::DigestMismatch {
                component: c.name.clone(),
                image: c.image.clone(),
                expected: c.digest.clone(),
                actual,
            });
        }

        let healthy = self.wait_ready(&id, &c.name, Some(0)).await?;
        progress.progress(&format!(
            "{}: {}",
            c.name,
            if healthy {
                "running, healthy"
            } else {
                "running"
            }
        ));
        Ok((id, action))
    }

    /// Polls until the container runs (and is healthy if it has a health check), at most until
    /// the job's deadline. Returns whether a health check vouched for it. `baseline_restarts`
    /// is the restart count the container may have; `None` takes whatever it has when first seen.
    async fn wait_ready(
        &self,
        id: &str,
        component: &str,
        baseline_restarts: Option<i64>,
    ) -> Result<bool, PluginError> {
        let options = WaitOptions {
            baseline_restarts,
            settle: SETTLE,
            poll_interval: POLL_INTERVAL,
            // Another poll would end past the job's deadline.
            give_up_at: self
                .deadline
                .checked_sub(POLL_INTERVAL)
                .unwrap_or_else(Instant::now),
            within: format!("within the deploy timeout of {}s", self.timeout_secs),
        };
        readiness::wait_ready(
            id,
            component,
            options,
            || async move {
                Ok(self
                    .inspect_container(id)
                    .await?
                    .map(|info| info.readiness_state()))
            },
            |detail: &str| {
                warn!(component, container = id, %detail, "component did not become ready");
                self.log_tail(id)
            },
        )
        .await
    }

    /// Best effort, with its own short deadline (the job's may be spent already): a failure to
    /// fetch logs must not hide the failure being reported.
    async fn log_tail(&self, id: &str) -> String {
        let command = format!("docker logs --tail {LOG_TAIL_LINES} {} 2>&1", quote(id));
        let deadline = Instant::now() + LOG_FETCH_TIMEOUT;
        match self.conn.run(&command, deadline, None, false).await {
            Ok(out) => readiness::last_lines(&out.tail.lines().collect::<Vec<_>>(), LOG_TAIL_LINES),
            Err(e) => {
                warn!(container = id, error = ?e, "could not fetch the log tail");
                String::new()
            }
        }
    }

    /// The `RepoDigests` of image `image_id`; none when it is gone.
    async fn repo_digests(&self, image_id: &str) -> Result<Vec<String>, PluginError> {
        Ok(self
            .inspect_image(image_id)
            .await?
            .and_then(|img| img.repo_digests)
            .unwrap_or_default())
    }

    pub(crate) async fn deploy(
        &self,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        let target = spec.target.name.as_str();

        // Everything that can refuse the job runs before the first container is touched.
        let mut image_ids = Vec::with_capacity(spec.components.len());
        for c in &spec.components {
            image_ids.push(engine::resolve_image(self, c, progress).await?);
        }
        for c in &spec.components {
            self.check_name_free(target, &c.name).await?;
        }
        let existing = self.list_target_containers(target).await?;

        let mut outcomes = Vec::with_capacity(spec.components.len());
        for (c, image_id) in spec.components.iter().zip(&image_ids) {
            let t0 = Instant::now();
            let previous: Vec<&ContainerJson> = existing
                .iter()
                .filter(|info| info.label(COMPONENT) == Some(c.name.as_str()))
                .collect();
            let (workload_id, action) = self
                .ensure_component(spec, c, image_id, &previous, progress)
                .await?;
            outcomes.push(ComponentOutcome {
                name: c.name.clone(),
                digest: c.digest.clone(),
                workload_id,
                action,
                duration_ms: millis(t0.elapsed()),
            });
        }

        // A release is the full set: what the previous one ran beyond it must go. Done last so
        // that a failed deploy never removes more than it replaced.
        let wanted: HashSet<&str> = spec.components.iter().map(|c| c.name.as_str()).collect();
        for info in &existing {
            let component = info.label(COMPONENT);
            if component.is_some_and(|c| wanted.contains(c)) {
                continue;
            }
            progress.progress(&format!(
                "{}: removing container {} (not in this release)",
                component.unwrap_or("?"),
                short_id(&info.id)
            ));
            info!(target, component, container = %info.id, "removing component not in release");
            self.remove(&info.id).await?;
        }

        Ok(DeployOutcome {
            components: outcomes,
            duration_ms: millis(started.elapsed()),
        })
    }

    pub(crate) async fn inventory(&self, target: &str) -> Result<Vec<InventoryItem>, PluginError> {
        let mut items = Vec::new();
        let mut digests = RunningDigests::default();
        for info in self.list_target_containers(target).await? {
            let digest = digests
                .resolve(&info.image, info.label(DIGEST), || {
                    self.repo_digests(&info.image)
                })
                .await?;
            items.push(InventoryItem {
                component: info.label(COMPONENT).unwrap_or_default().to_string(),
                digest,
                state: if info.state.status.is_empty() {
                    "unknown".to_string()
                } else {
                    info.state.status.clone()
                },
                health: info.health().map(str::to_string),
                workload_id: info.id.clone(),
                release_id: info.label(RELEASE_ID).map(str::to_string),
                deployment_id: info.label(DEPLOYMENT_ID).map(str::to_string),
            });
        }
        sort_inventory(&mut items);
        Ok(items)
    }
}

#[async_trait::async_trait]
impl ImageStore for RemoteDocker<'_> {
    async fn find_image(&self, repo: &str, digest: &str) -> Result<Option<String>, PluginError> {
        self.find_local_image(repo, digest).await
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, PluginError> {
        Ok(self.inspect_image(reference).await?.map(|img| img.id))
    }

    async fn pull(
        &self,
        component: &str,
        repo: &str,
        digest: &str,
    ) -> Result<Result<(), String>, PluginError> {
        info!(
            component,
            repo, digest, "pulling image by digest on the remote host"
        );
        let reference = format!("{repo}@{digest}");
        let out = self
            .exec("pull image", &["pull", "--quiet", &reference])
            .await?;
        Ok(if out.success() {
            Ok(())
        } else {
            Err(out.tail_text().trim().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inspect_json_parses() {
        let raw = r#"{"Id":"abc","Name":"/stella-t-web","Image":"sha256:1","RestartCount":2,
            "Config":{"Labels":{"stella.target":"t","stella.component":"web"}},
            "State":{"Status":"running","ExitCode":0,"OOMKilled":false,"Error":"",
                     "StartedAt":"2025-01-01T00:00:00.123456789Z",
                     "Health":{"Status":"unhealthy","Log":[{"Output":"probe failed\n"}]}},
            "HostConfig":{"RestartPolicy":{"Name":"unless-stopped","MaximumRetryCount":0}}}"#;
        let c: ContainerJson = serde_json::from_str(raw).unwrap();
        assert_eq!(c.label(COMPONENT), Some("web"));
        assert_eq!(c.health(), Some("unhealthy"));
        assert_eq!(c.restart_count, 2);
        let state = c.readiness_state();
        assert_eq!(state.status, "running");
        assert_eq!(state.restart_count, 2);
        assert_eq!(state.health_output, "probe failed\n");
        assert_eq!(state.started_at, "2025-01-01T00:00:00.123456789Z");
        let bare: ContainerJson =
            serde_json::from_str(r#"{"Id":"x","Config":{"Labels":null},"State":{}}"#).unwrap();
        assert_eq!(bare.label(COMPONENT), None);
        assert_eq!(bare.health(), None);
        assert_eq!(bare.readiness_state(), ContainerState::default());
        let img: ImageJson =
            serde_json::from_str(r#"{"Id":"sha256:1","RepoDigests":null}"#).unwrap();
        assert!(img.repo_digests.is_none());
    }
}
