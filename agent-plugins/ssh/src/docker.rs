//! Mode `docker`: the docker executor's semantics, driven through the remote host's `docker` CLI
//! over SSH. One container per component, named `stella-<target>-<component>`, carrying the same
//! labels the docker executor sets; created from the image *id* a digest resolves to, never from
//! a tag; every digest resolved before anything on the host changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Deserialize;
use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec, InventoryItem,
    PluginError, ProgressSink,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::conn::{Connection, Exit, Output, RunError};
use crate::naming::{
    container_name, quote, repo_digest_has, repo_digest_matches, repository_of, short_digest,
    short_id, tagged_reference,
};
use crate::{
    LABEL_COMPONENT, LABEL_DEPLOYMENT_ID, LABEL_DIGEST, LABEL_IMAGE, LABEL_JOB_ID, LABEL_MANAGED,
    LABEL_RELEASE_ID, LABEL_RELEASE_NAME, LABEL_TARGET, millis,
};

/// Stella is the only thing that should stop a deployed workload; a host reboot or a crash must
/// not leave the target silently running nothing (the docker executor's default too).
const RESTART_POLICY: &str = "unless-stopped";
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A container without a health check counts as up once it has stayed running this long, so
/// that one crashing right after start is reported instead of being declared a success.
const SETTLE: Duration = Duration::from_secs(2);
const LOG_TAIL_LINES: usize = 50;
const LOG_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

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
        self.state
            .health
            .as_ref()
            .map(|h| h.status.as_str())
            .filter(|s| !s.is_empty() && *s != "none")
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
                img.repo_digests
                    .iter()
                    .flatten()
                    .any(|rd| repo_digest_matches(rd, repo, digest))
            })
            .map(|img| img.id))
    }

    async fn resolve_image(
        &self,
        c: &ComponentSpec,
        progress: &dyn ProgressSink,
    ) -> Result<String, PluginError> {
        let repo = repository_of(&c.image);
        let wanted = format!("{repo}@{}", short_digest(&c.digest));
        if let Some(id) = self.find_local_image(repo, &c.digest).await? {
            progress.progress(&format!(
                "{}: resolved {wanted} to local image {}",
                c.name,
                short_digest(&id)
            ));
            return Ok(id);
        }
        // A tag that exists with other content means the operator built or pulled something
        // else under that name; pulling would silently paper over the disagreement.
        if let Some(tagged) = tagged_reference(&c.image)
            && let Some(img) = self.inspect_image(tagged).await?
        {
            return Err(PluginError::DigestMismatch {
                component: c.name.clone(),
                image: c.image.clone(),
                expected: c.digest.clone(),
                actual: if img.id.is_empty() {
                    "an image without id".to_string()
                } else {
                    img.id
                },
            });
        }
        progress.progress(&format!("{}: pulling {wanted}", c.name));
        info!(component = %c.name, repo, digest = %c.digest, "pulling image by digest on the remote host");
        let reference = format!("{repo}@{}", c.digest);
        let out = self
            .exec("pull image", &["pull", "--quiet", &reference])
            .await?;
        if !out.success() {
            return Err(PluginError::ImageUnavailable {
                component: c.name.clone(),
                digest: c.digest.clone(),
                detail: out.tail_text().trim().to_string(),
            });
        }
        match self.find_local_image(repo, &c.digest).await? {
            Some(id) => {
                progress.progress(&format!(
                    "{}: pulled {wanted} as image {}",
                    c.name,
                    short_digest(&id)
                ));
                Ok(id)
            }
            None => Err(PluginError::DigestMismatch {
                component: c.name.clone(),
                image: c.image.clone(),
                expected: c.digest.clone(),
                actual: "no local image carries that digest after the pull".to_string(),
            }),
        }
    }

    /// A container name held by something that is not this target's component would make the
    /// create fail after the old container is already gone; refuse up front instead.
    async fn check_name_free(&self, target: &str, component: &str) -> Result<(), PluginError> {
        let name = container_name(target, component);
        match self.inspect_container(&name).await? {
            None => Ok(()),
            Some(info)
                if info.label(LABEL_TARGET) == Some(target)
                    && info.label(LABEL_COMPONENT) == Some(component) =>
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
        let filter = format!("label={LABEL_TARGET}={target}");
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
            if info.label(LABEL_TARGET) == Some(target) {
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
            && info.label(LABEL_RELEASE_ID) == Some(spec.release_id.as_str())
            && info.label(LABEL_DIGEST) == Some(c.digest.as_str())
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
        let labels = [
            (LABEL_MANAGED, "true"),
            (LABEL_TARGET, target),
            (LABEL_COMPONENT, c.name.as_str()),
            (LABEL_DIGEST, c.digest.as_str()),
            (LABEL_RELEASE_ID, spec.release_id.as_str()),
            (LABEL_RELEASE_NAME, spec.release_name.as_str()),
            (LABEL_DEPLOYMENT_ID, spec.deployment_id.as_str()),
            (LABEL_JOB_ID, spec.job_id.as_str()),
            (LABEL_IMAGE, c.image.as_str()),
        ]
        .map(|(k, v)| format!("{k}={v}"));
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
        mut baseline_restarts: Option<i64>,
    ) -> Result<bool, PluginError> {
        let mut seen_running: Option<(String, Instant)> = None;
        loop {
            let Some(info) = self.inspect_container(id).await? else {
                return Err(PluginError::Unhealthy {
                    component: component.to_string(),
                    detail: format!("container {} disappeared", short_id(id)),
                    log_tail: String::new(),
                });
            };
            let state = &info.state;
            let restarts = info.restart_count;
            let baseline = *baseline_restarts.get_or_insert(restarts);
            let exit_code = state.exit_code;
            let failure = match state.status.as_str() {
                "running" if restarts > baseline => Some(format!(
                    "container restarted {} time(s) (last exit code {exit_code})",
                    restarts - baseline
                )),
                "running" => match info.health() {
                    Some("healthy") => return Ok(true),
                    Some("unhealthy") => Some(format!(
                        "health check reports unhealthy{}",
                        last_health_output(&info)
                    )),
                    Some(_) => None,
                    None => {
                        let first_seen = match &seen_running {
                            Some((s, at)) if *s == state.started_at => *at,
                            _ => {
                                let now = Instant::now();
                                seen_running = Some((state.started_at.clone(), now));
                                now
                            }
                        };
                        if first_seen.elapsed() >= SETTLE
                            || engine_uptime(&state.started_at) >= SETTLE
                        {
                            return Ok(false);
                        }
                        None
                    }
                },
                "created" | "" => None,
                "restarting" => Some(format!(
                    "container keeps restarting (last exit code {exit_code})"
                )),
                "exited" | "dead" => {
                    let mut detail = format!("container exited with code {exit_code}");
                    if state.oom_killed {
                        detail.push_str(" (killed: out of memory)");
                    }
                    if !state.error.is_empty() {
                        detail.push_str(&format!(" ({})", state.error));
                    }
                    Some(detail)
                }
                other => Some(format!("container is {other}")),
            };
            if let Some(detail) = failure {
                return Err(self.unhealthy(id, component, detail).await);
            }
            if Instant::now() + POLL_INTERVAL >= self.deadline {
                let detail = format!(
                    "not ready within the deploy timeout of {}s (state {}, health {})",
                    self.timeout_secs,
                    state.status,
                    info.health().unwrap_or("none")
                );
                return Err(self.unhealthy(id, component, detail).await);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn unhealthy(&self, id: &str, component: &str, detail: String) -> PluginError {
        warn!(component, container = id, %detail, "component did not become ready");
        PluginError::Unhealthy {
            component: component.to_string(),
            detail,
            log_tail: self.log_tail(id).await,
        }
    }

    /// Best effort, with its own short deadline (the job's may be spent already): a failure to
    /// fetch logs must not hide the failure being reported.
    async fn log_tail(&self, id: &str) -> String {
        let command = format!("docker logs --tail {LOG_TAIL_LINES} {} 2>&1", quote(id));
        let deadline = Instant::now() + LOG_FETCH_TIMEOUT;
        match self.conn.run(&command, deadline, None, false).await {
            Ok(out) => {
                let tail = out.tail;
                tail[tail.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(e) => {
                warn!(container = id, error = ?e, "could not fetch the log tail");
                String::new()
            }
        }
    }

    /// The digest an existing container really runs: the one Stella asked for when its image is
    /// that digest, otherwise the image id (which then shows the drift).
    async fn running_digest(
        &self,
        image_id: &str,
        label_digest: Option<&str>,
        cache: &mut HashMap<String, Vec<String>>,
    ) -> Result<String, PluginError> {
        let Some(wanted) = label_digest else {
            return Ok(image_id.to_string());
        };
        if wanted == image_id {
            return Ok(wanted.to_string());
        }
        if !cache.contains_key(image_id) {
            let digests = self
                .inspect_image(image_id)
                .await?
                .and_then(|img| img.repo_digests)
                .unwrap_or_default();
            cache.insert(image_id.to_string(), digests);
        }
        let carries = cache
            .get(image_id)
            .is_some_and(|ds| ds.iter().any(|rd| repo_digest_has(rd, wanted)));
        Ok(if carries { wanted } else { image_id }.to_string())
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
            image_ids.push(self.resolve_image(c, progress).await?);
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
                .filter(|info| info.label(LABEL_COMPONENT) == Some(c.name.as_str()))
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
            let component = info.label(LABEL_COMPONENT);
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
        let mut repo_digests = HashMap::new();
        for info in self.list_target_containers(target).await? {
            let digest = self
                .running_digest(&info.image, info.label(LABEL_DIGEST), &mut repo_digests)
                .await?;
            items.push(InventoryItem {
                component: info.label(LABEL_COMPONENT).unwrap_or_default().to_string(),
                digest,
                state: if info.state.status.is_empty() {
                    "unknown".to_string()
                } else {
                    info.state.status.clone()
                },
                health: info.health().map(str::to_string),
                workload_id: info.id.clone(),
                release_id: info.label(LABEL_RELEASE_ID).map(str::to_string),
                deployment_id: info.label(LABEL_DEPLOYMENT_ID).map(str::to_string),
            });
        }
        items.sort_by(|a, b| {
            (a.component.as_str(), a.workload_id.as_str())
                .cmp(&(b.component.as_str(), b.workload_id.as_str()))
        });
        Ok(items)
    }
}

/// How long the engine says the container has been running; zero when unknown.
fn engine_uptime(started_at: &str) -> Duration {
    // The remote clock is not ours: a skewed host only makes this estimate wrong, and the local
    // settle timer still bounds the wait.
    time::OffsetDateTime::parse(started_at, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| (time::OffsetDateTime::now_utc() - t).try_into().ok())
        .unwrap_or(Duration::ZERO)
}

fn last_health_output(info: &ContainerJson) -> String {
    let output = info
        .state
        .health
        .as_ref()
        .and_then(|h| h.log.as_ref())
        .and_then(|log| log.last())
        .map(|r| r.output.trim())
        .unwrap_or_default();
    if output.is_empty() {
        String::new()
    } else {
        let cut: String = output.chars().take(200).collect();
        format!(": {cut}")
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
        assert_eq!(c.label(LABEL_COMPONENT), Some("web"));
        assert_eq!(c.health(), Some("unhealthy"));
        assert_eq!(c.restart_count, 2);
        assert_eq!(last_health_output(&c), ": probe failed");
        assert!(engine_uptime(&c.state.started_at) > Duration::from_secs(60));
        let bare: ContainerJson =
            serde_json::from_str(r#"{"Id":"x","Config":{"Labels":null},"State":{}}"#).unwrap();
        assert_eq!(bare.label(LABEL_COMPONENT), None);
        assert_eq!(bare.health(), None);
        let img: ImageJson =
            serde_json::from_str(r#"{"Id":"sha256:1","RepoDigests":null}"#).unwrap();
        assert!(img.repo_digests.is_none());
    }
}
