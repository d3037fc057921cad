//! The `docker` executor: runs each component of a release as one container on the local Docker
//! Engine, pinned to the image the job's digest names.
//!
//! Digest-first: a container is always created from the image *id* a digest resolved to, never
//! from a tag, so a tag moved behind Stella's back can never change what runs. Every component is
//! resolved before the engine is touched, so a job that cannot be honoured changes nothing.

mod config;
mod naming;
mod sticker;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary,
    HealthStatusEnum, HostConfig, RestartPolicy,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, ListImagesOptions,
    LogsOptions, RemoveContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use futures_util::StreamExt;
use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec, Executor,
    ExecutorContext, InventoryItem, PluginError, ProgressSink, TargetRef, VersionSticker,
    is_valid_digest,
};
use tracing::{debug, info, warn};

use crate::config::TargetConfig;
use crate::naming::{
    container_name, repo_digest_has, repo_digest_matches, repository_of, sanitize, short_digest,
    tagged_reference,
};

/// Set to `"true"` on every container Stella creates.
pub const LABEL_MANAGED: &str = "stella.managed";
pub const LABEL_TARGET: &str = "stella.target";
pub const LABEL_COMPONENT: &str = "stella.component";
/// The digest the job asked for (what the container runs is its `Image` field).
pub const LABEL_DIGEST: &str = "stella.digest";
pub const LABEL_RELEASE_ID: &str = "stella.release.id";
pub const LABEL_RELEASE_NAME: &str = "stella.release.name";
pub const LABEL_DEPLOYMENT_ID: &str = "stella.deployment.id";
pub const LABEL_JOB_ID: &str = "stella.job.id";
/// The image reference as the job spelled it; informational only.
pub const LABEL_IMAGE: &str = "stella.image";

/// The executor kind this crate implements.
pub const KIND: &str = "docker";

const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Per-request timeout (until response headers); image pulls stream past it.
const REQUEST_TIMEOUT_SECS: u64 = 120;
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// A container without a health check counts as up once it has stayed running this long, so
/// that one crashing right after start is reported instead of being declared a success.
const SETTLE: Duration = Duration::from_secs(2);
const LOG_TAIL_LINES: usize = 50;
const LOG_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs releases as containers on one Docker Engine.
pub struct DockerExecutor {
    docker: Docker,
    ctx: ExecutorContext,
    /// Two jobs for the same target must not interleave their stop/create steps.
    target_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for DockerExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerExecutor")
            .field("state_dir", &self.ctx.state_dir)
            .finish_non_exhaustive()
    }
}

impl DockerExecutor {
    /// Connects to the engine (DOCKER_HOST unix socket if set, else /var/run/docker.sock) and pings it.
    pub async fn connect(ctx: ExecutorContext) -> Result<Self, PluginError> {
        let socket = socket_from_docker_host(std::env::var("DOCKER_HOST").ok().as_deref())?;
        Self::connect_with_socket(&socket, ctx).await
    }

    /// Connects to the engine listening on `socket` and pings it.
    pub async fn connect_with_socket(
        socket: &Path,
        ctx: ExecutorContext,
    ) -> Result<Self, PluginError> {
        let path = socket.to_str().ok_or_else(|| {
            PluginError::Backend(format!(
                "docker socket path {} is not valid UTF-8",
                socket.display()
            ))
        })?;
        let docker = Docker::connect_with_socket(path, REQUEST_TIMEOUT_SECS, API_DEFAULT_VERSION)
            .map_err(|e| PluginError::Backend(format!("cannot connect to {path}: {e}")))?;
        // Older engines reject requests made with a newer API version than they speak.
        let docker = docker.negotiate_version().await.map_err(|e| {
            PluginError::Backend(format!("cannot negotiate API version with {path}: {e}"))
        })?;
        docker.ping().await.map_err(|e| {
            PluginError::Backend(format!("docker engine at {path} unreachable: {e}"))
        })?;
        info!(socket = path, api = %docker.client_version(), "connected to docker engine");
        Ok(Self {
            docker,
            ctx,
            target_locks: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn target_lock(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        // A poisoned map is still a valid map: the lock only guards insertion.
        let mut locks = self
            .target_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(target.to_string()).or_default().clone()
    }

    /// Finds the local image `digest` names: either its id (locally built images have no
    /// registry digest) or an image whose RepoDigests carry exactly `repo@digest`.
    async fn find_local_image(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<String>, PluginError> {
        match self.docker.inspect_image(digest).await {
            Ok(img) if img.id.as_deref() == Some(digest) => return Ok(Some(digest.to_string())),
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(backend("inspect image", e)),
        }
        self.find_by_repo_digest(repo, digest).await
    }

    async fn find_by_repo_digest(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<String>, PluginError> {
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                digests: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| backend("list images", e))?;
        Ok(images
            .into_iter()
            .find(|img| {
                img.repo_digests
                    .iter()
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
        // A tag that exists locally with other content means the operator built or pulled
        // something else under that name; pulling would silently paper over the disagreement.
        if let Some(tagged) = tagged_reference(&c.image) {
            match self.docker.inspect_image(tagged).await {
                Ok(img) => {
                    return Err(PluginError::DigestMismatch {
                        component: c.name.clone(),
                        image: c.image.clone(),
                        expected: c.digest.clone(),
                        actual: img.id.unwrap_or_else(|| "an image without id".to_string()),
                    });
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(backend("inspect image", e)),
            }
        }
        progress.progress(&format!("{}: pulling {wanted}", c.name));
        info!(component = %c.name, repo, digest = %c.digest, "pulling image by digest");
        self.pull(repo, &c.digest)
            .await
            .map_err(|detail| PluginError::ImageUnavailable {
                component: c.name.clone(),
                digest: c.digest.clone(),
                detail,
            })?;
        match self.find_by_repo_digest(repo, &c.digest).await? {
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

    /// Returns the engine's own message on failure: it is what an operator needs to see.
    async fn pull(&self, repo: &str, digest: &str) -> Result<(), String> {
        let options = CreateImageOptions {
            from_image: Some(repo.to_string()),
            tag: Some(digest.to_string()),
            ..Default::default()
        };
        let mut stream = pin!(self.docker.create_image(Some(options), None, None));
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                return Err(engine_message(e));
            }
        }
        Ok(())
    }

    async fn check_network(&self, network: &str) -> Result<(), PluginError> {
        // `container:<id>` and `default` are network modes, not networks one can inspect.
        if network.contains(':') || network == "default" {
            return Ok(());
        }
        match self.docker.inspect_network(network, None).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Err(PluginError::InvalidConfig(format!(
                "network: {network:?} does not exist on the docker engine"
            ))),
            Err(e) => Err(backend("inspect network", e)),
        }
    }

    /// A container name held by something that is not this target's component would make the
    /// create fail after the old container is already gone; refuse up front instead.
    async fn check_name_free(&self, target: &str, component: &str) -> Result<(), PluginError> {
        let name = container_name(target, component);
        match self.docker.inspect_container(&name, None).await {
            Ok(info) => {
                let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
                let ours = labels.get(LABEL_TARGET).map(String::as_str) == Some(target)
                    && labels.get(LABEL_COMPONENT).map(String::as_str) == Some(component);
                if ours {
                    Ok(())
                } else {
                    Err(PluginError::Backend(format!(
                        "component {component}: container name {name} is taken by a container \
                         Stella does not manage for target {target}"
                    )))
                }
            }
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(backend("inspect container", e)),
        }
    }

    async fn list_target_containers(
        &self,
        target: &str,
    ) -> Result<Vec<ContainerSummary>, PluginError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_TARGET}={target}")],
        )]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| backend("list containers", e))?;
        // The engine's label filter is authoritative, but a stale or odd engine must not make
        // Stella touch containers of another target.
        Ok(list
            .into_iter()
            .filter(|s| summary_label(s, LABEL_TARGET) == Some(target))
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, PluginError> {
        match self.docker.inspect_container(id, None).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(backend("inspect container", e)),
        }
    }

    /// Whether `id` already is exactly what this component of this release should be.
    async fn is_current(
        &self,
        id: &str,
        spec: &DeploySpec,
        c: &ComponentSpec,
        image_id: &str,
        cfg: &TargetConfig,
    ) -> Result<bool, PluginError> {
        let Some(info) = self.inspect(id).await? else {
            return Ok(false);
        };
        let state = info.state.clone().unwrap_or_default();
        let running = state.status == Some(ContainerStateStatusEnum::RUNNING);
        let unhealthy = state.health.and_then(|h| h.status) == Some(HealthStatusEnum::UNHEALTHY);
        let labels = info
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let env = info
            .config
            .as_ref()
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let host = info.host_config.clone().unwrap_or_default();
        let expected_name = format!("/{}", container_name(&spec.target.name, &c.name));
        Ok(running
            && !unhealthy
            && info.image.as_deref() == Some(image_id)
            && info.name.as_deref() == Some(expected_name.as_str())
            && labels.get(LABEL_RELEASE_ID) == Some(&spec.release_id)
            && labels.get(LABEL_DIGEST) == Some(&c.digest)
            // Target settings changed since the container was made: it must be recreated.
            && host.restart_policy.and_then(|p| p.name) == Some(cfg.restart_policy)
            && cfg
                .network
                .as_ref()
                .is_none_or(|n| host.network_mode.as_ref() == Some(n))
            && cfg.env_list().iter().all(|kv| env.contains(kv)))
    }

    async fn remove(&self, id: &str) -> Result<(), PluginError> {
        // Stop first so the workload gets its graceful-shutdown window; a forced remove would
        // SIGKILL it straight away.
        match self.docker.stop_container(id, None).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => warn!(container = id, error = %e, "stop failed; removing by force"),
        }
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(backend("remove container", e)),
        }
    }

    async fn ensure_component(
        &self,
        spec: &DeploySpec,
        c: &ComponentSpec,
        image_id: &str,
        cfg: &TargetConfig,
        previous: &[&ContainerSummary],
        progress: &dyn ProgressSink,
    ) -> Result<(String, ComponentAction), PluginError> {
        let target = spec.target.name.as_str();
        let mut keep = None;
        for id in previous.iter().filter_map(|s| s.id.as_deref()) {
            if self.is_current(id, spec, c, image_id, cfg).await? {
                keep = Some(id.to_string());
                break;
            }
        }
        if let Some(id) = keep {
            // Duplicates can only come from tampering; they would run next to the real one.
            for stray in previous.iter().filter_map(|s| s.id.as_deref()) {
                if stray != id {
                    progress.progress(&format!(
                        "{}: removing stray container {}",
                        c.name,
                        short_id(stray)
                    ));
                    self.remove(stray).await?;
                }
            }
            progress.progress(&format!(
                "{}: container {} already runs this release, unchanged",
                c.name,
                short_id(&id)
            ));
            self.wait_ready(&id, &c.name, cfg.health_timeout, None)
                .await?;
            return Ok((id, ComponentAction::Unchanged));
        }

        let action = if previous.is_empty() {
            ComponentAction::Created
        } else {
            ComponentAction::Replaced
        };
        for old in previous.iter().filter_map(|s| s.id.as_deref()) {
            progress.progress(&format!(
                "{}: replacing container {}",
                c.name,
                short_id(old)
            ));
            info!(target, component = %c.name, container = old, "removing previous container");
            self.remove(old).await?;
        }

        let name = container_name(target, &c.name);
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_TARGET.to_string(), target.to_string()),
            (LABEL_COMPONENT.to_string(), c.name.clone()),
            (LABEL_DIGEST.to_string(), c.digest.clone()),
            (LABEL_RELEASE_ID.to_string(), spec.release_id.clone()),
            (LABEL_RELEASE_NAME.to_string(), spec.release_name.clone()),
            (LABEL_DEPLOYMENT_ID.to_string(), spec.deployment_id.clone()),
            (LABEL_JOB_ID.to_string(), spec.job_id.clone()),
            (LABEL_IMAGE.to_string(), c.image.clone()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image_id.to_string()),
            labels: Some(labels),
            env: (!cfg.env.is_empty()).then(|| cfg.env_list()),
            host_config: Some(HostConfig {
                restart_policy: Some(RestartPolicy {
                    name: Some(cfg.restart_policy),
                    maximum_retry_count: None,
                }),
                network_mode: cfg.network.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        progress.progress(&format!("{}: creating container {name}", c.name));
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| {
                PluginError::Backend(format!("component {}: create container: {e}", c.name))
            })?;
        let id = created.id;
        for warning in &created.warnings {
            warn!(target, component = %c.name, warning, "engine warning on create");
        }
        self.docker.start_container(&id, None).await.map_err(|e| {
            PluginError::Backend(format!("component {}: start container: {e}", c.name))
        })?;
        info!(target, component = %c.name, container = %id, image = image_id, "container started");

        let actual = self
            .inspect(&id)
            .await?
            .and_then(|info| info.image)
            .unwrap_or_default();
        if actual != image_id {
            return Err(PluginError::DigestMismatch {
                component: c.name.clone(),
                image: c.image.clone(),
                expected: c.digest.clone(),
                actual,
            });
        }

        let healthy = self
            .wait_ready(&id, &c.name, cfg.health_timeout, Some(0))
            .await?;
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

    /// Polls until the container runs (and is healthy if it has a health check). Returns whether
    /// a health check vouched for it. `baseline_restarts` is the restart count the container is
    /// allowed to have; `None` takes whatever it has when first seen.
    async fn wait_ready(
        &self,
        id: &str,
        component: &str,
        timeout: Duration,
        mut baseline_restarts: Option<i64>,
    ) -> Result<bool, PluginError> {
        let deadline = Instant::now() + timeout;
        let settle = SETTLE.min(timeout / 2);
        // (StartedAt, when this process first saw that incarnation running)
        let mut seen_running: Option<(String, Instant)> = None;
        loop {
            let Some(info) = self.inspect(id).await? else {
                return Err(PluginError::Unhealthy {
                    component: component.to_string(),
                    detail: format!("container {} disappeared", short_id(id)),
                    log_tail: String::new(),
                });
            };
            let state = info.state.unwrap_or_default();
            let status = state.status.unwrap_or(ContainerStateStatusEnum::EMPTY);
            let health = state
                .health
                .as_ref()
                .and_then(|h| h.status)
                .filter(|s| !matches!(s, HealthStatusEnum::NONE | HealthStatusEnum::EMPTY));
            let restarts = info.restart_count.unwrap_or(0);
            let baseline = *baseline_restarts.get_or_insert(restarts);
            let exit_code = state.exit_code.unwrap_or(0);

            let failure = match status {
                ContainerStateStatusEnum::RUNNING if restarts > baseline => Some(format!(
                    "container restarted {} time(s) (last exit code {exit_code})",
                    restarts - baseline
                )),
                ContainerStateStatusEnum::RUNNING => match health {
                    Some(HealthStatusEnum::HEALTHY) => return Ok(true),
                    Some(HealthStatusEnum::UNHEALTHY) => Some(format!(
                        "health check reports unhealthy{}",
                        last_health_output(&state)
                    )),
                    Some(_) => None,
                    None => {
                        let started_at = state.started_at.clone().unwrap_or_default();
                        let first_seen = match &seen_running {
                            Some((s, at)) if *s == started_at => *at,
                            _ => {
                                let now = Instant::now();
                                seen_running = Some((started_at.clone(), now));
                                now
                            }
                        };
                        if first_seen.elapsed() >= settle || engine_uptime(&started_at) >= settle {
                            return Ok(false);
                        }
                        None
                    }
                },
                ContainerStateStatusEnum::CREATED | ContainerStateStatusEnum::EMPTY => None,
                ContainerStateStatusEnum::RESTARTING => Some(format!(
                    "container keeps restarting (last exit code {exit_code})"
                )),
                ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD => {
                    let mut detail = format!("container exited with code {exit_code}");
                    if state.oom_killed == Some(true) {
                        detail.push_str(" (killed: out of memory)");
                    }
                    if let Some(err) = state.error.as_deref().filter(|e| !e.is_empty()) {
                        detail.push_str(&format!(" ({err})"));
                    }
                    Some(detail)
                }
                other => Some(format!("container is {other}")),
            };
            if let Some(detail) = failure {
                return Err(self.unhealthy(id, component, detail).await);
            }
            if Instant::now() >= deadline {
                let health = health.map_or_else(|| "none".to_string(), |h| h.to_string());
                let detail = format!(
                    "not ready within {}s (state {status}, health {health})",
                    timeout.as_secs()
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

    /// Best effort: a failure to fetch logs must not hide the failure being reported.
    async fn log_tail(&self, id: &str) -> String {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: LOG_TAIL_LINES.to_string(),
            ..Default::default()
        };
        let mut out = String::new();
        let collect = async {
            let mut stream = pin!(self.docker.logs(id, Some(options)));
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => out.push_str(&chunk.to_string()),
                    Err(e) => {
                        debug!(container = id, error = %e, "log stream ended with error");
                        break;
                    }
                }
            }
        };
        if tokio::time::timeout(LOG_FETCH_TIMEOUT, collect)
            .await
            .is_err()
        {
            debug!(container = id, "log fetch timed out");
        }
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// The digest an existing container really runs: the one Stella asked for when its image is
    /// that digest, otherwise the image id (which then shows the drift).
    async fn running_digest(
        &self,
        image_id: &str,
        label_digest: Option<&str>,
        repo_digests_cache: &mut HashMap<String, Vec<String>>,
    ) -> Result<String, PluginError> {
        let Some(wanted) = label_digest else {
            return Ok(image_id.to_string());
        };
        if wanted == image_id {
            return Ok(wanted.to_string());
        }
        if !repo_digests_cache.contains_key(image_id) {
            let digests = match self.docker.inspect_image(image_id).await {
                Ok(img) => img.repo_digests.unwrap_or_default(),
                Err(e) if is_not_found(&e) => Vec::new(),
                Err(e) => return Err(backend("inspect image", e)),
            };
            repo_digests_cache.insert(image_id.to_string(), digests);
        }
        let carries = repo_digests_cache
            .get(image_id)
            .is_some_and(|ds| ds.iter().any(|rd| repo_digest_has(rd, wanted)));
        Ok(if carries { wanted } else { image_id }.to_string())
    }
}

#[async_trait::async_trait]
impl Executor for DockerExecutor {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_config(&self, target: &TargetRef) -> Result<(), PluginError> {
        if target.kind != KIND {
            return Err(PluginError::InvalidConfig(format!(
                "target {} has kind {:?}, this executor handles {KIND:?}",
                target.name, target.kind
            )));
        }
        if target.name.is_empty() {
            return Err(PluginError::InvalidConfig(
                "target name must not be empty".to_string(),
            ));
        }
        config::parse(&target.config).map(|_| ())
    }

    async fn deploy(
        &self,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        self.validate_config(&spec.target)?;
        let cfg = config::parse(&spec.target.config)?;
        validate_components(&spec.components)?;
        let target = spec.target.name.as_str();
        let lock = self.target_lock(target);
        let _guard = lock.lock().await;
        info!(
            target,
            job = %spec.job_id,
            release = %spec.release_id,
            components = spec.components.len(),
            "deploying"
        );

        // Everything that can refuse the job runs before the first container is touched.
        if let Some(network) = &cfg.network {
            self.check_network(network).await?;
        }
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
            let previous: Vec<&ContainerSummary> = existing
                .iter()
                .filter(|s| summary_label(s, LABEL_COMPONENT) == Some(c.name.as_str()))
                .collect();
            let (workload_id, action) = self
                .ensure_component(spec, c, image_id, &cfg, &previous, progress)
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
        for s in &existing {
            let component = summary_label(s, LABEL_COMPONENT);
            if component.is_some_and(|c| wanted.contains(c)) {
                continue;
            }
            let Some(id) = s.id.as_deref() else { continue };
            progress.progress(&format!(
                "{}: removing container {} (not in this release)",
                component.unwrap_or("?"),
                short_id(id)
            ));
            info!(
                target,
                component,
                container = id,
                "removing component not in release"
            );
            self.remove(id).await?;
        }

        let duration_ms = millis(started.elapsed());
        info!(target, job = %spec.job_id, duration_ms, "deploy finished");
        Ok(DeployOutcome {
            components: outcomes,
            duration_ms,
        })
    }

    async fn inventory(&self, target: &TargetRef) -> Result<Vec<InventoryItem>, PluginError> {
        let mut items = Vec::new();
        let mut repo_digests = HashMap::new();
        for summary in self.list_target_containers(&target.name).await? {
            let Some(id) = summary.id.as_deref() else {
                continue;
            };
            // Gone between list and inspect: it no longer runs anything.
            let Some(info) = self.inspect(id).await? else {
                continue;
            };
            let labels = info
                .config
                .as_ref()
                .and_then(|c| c.labels.clone())
                .unwrap_or_default();
            let image_id = info.image.clone().unwrap_or_default();
            let digest = self
                .running_digest(
                    &image_id,
                    labels.get(LABEL_DIGEST).map(String::as_str),
                    &mut repo_digests,
                )
                .await?;
            let state = info.state.unwrap_or_default();
            items.push(InventoryItem {
                component: labels.get(LABEL_COMPONENT).cloned().unwrap_or_default(),
                digest,
                state: state
                    .status
                    .map_or_else(|| "unknown".to_string(), |s| s.to_string()),
                health: state
                    .health
                    .and_then(|h| h.status)
                    .filter(|s| !matches!(s, HealthStatusEnum::NONE | HealthStatusEnum::EMPTY))
                    .map(|s| s.to_string()),
                workload_id: info.id.unwrap_or_else(|| id.to_string()),
                release_id: labels.get(LABEL_RELEASE_ID).cloned(),
                deployment_id: labels.get(LABEL_DEPLOYMENT_ID).cloned(),
            });
        }
        items.sort_by(|a, b| {
            (a.component.as_str(), a.workload_id.as_str())
                .cmp(&(b.component.as_str(), b.workload_id.as_str()))
        });
        Ok(items)
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        let path = self.sticker_path(target);
        sticker::write(path, sticker).await
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        sticker::read(&self.sticker_path(target)).await
    }
}

impl DockerExecutor {
    /// Where the sticker of `target` lives on the agent host.
    pub fn sticker_path(&self, target: &TargetRef) -> PathBuf {
        sticker::sticker_path(&self.ctx.state_dir, &target.name)
    }
}

fn validate_components(components: &[ComponentSpec]) -> Result<(), PluginError> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for c in components {
        if c.name.is_empty() {
            return Err(PluginError::InvalidConfig(
                "component names must not be empty".to_string(),
            ));
        }
        if c.image.is_empty() {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: image must not be empty",
                c.name
            )));
        }
        if !is_valid_digest(&c.digest) {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: digest {:?} is not sha256:<64 lowercase hex>",
                c.name, c.digest
            )));
        }
        // Two components mapping to one container name would replace each other.
        if let Some(other) = seen.insert(sanitize(&c.name), &c.name) {
            return Err(PluginError::InvalidConfig(format!(
                "components {other:?} and {:?} map to the same container name",
                c.name
            )));
        }
    }
    Ok(())
}

fn socket_from_docker_host(docker_host: Option<&str>) -> Result<PathBuf, PluginError> {
    match docker_host.map(str::trim).filter(|h| !h.is_empty()) {
        None => Ok(PathBuf::from(DEFAULT_SOCKET)),
        Some(host) => match host.strip_prefix("unix://") {
            Some(path) if !path.is_empty() => Ok(PathBuf::from(path)),
            _ => Err(PluginError::Backend(format!(
                "DOCKER_HOST={host} is not supported: only unix:// sockets are"
            ))),
        },
    }
}

fn summary_label<'a>(s: &'a ContainerSummary, key: &str) -> Option<&'a str> {
    s.labels.as_ref()?.get(key).map(String::as_str)
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn engine_message(e: BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message,
        BollardError::DockerStreamError { error } => error,
        other => other.to_string(),
    }
}

fn backend(what: &str, e: BollardError) -> PluginError {
    PluginError::Backend(format!("{what}: {e}"))
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    hex.get(..12).unwrap_or(hex)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How long the engine says the container has been running; zero when unknown.
fn engine_uptime(started_at: &str) -> Duration {
    time::OffsetDateTime::parse(started_at, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| (time::OffsetDateTime::now_utc() - t).try_into().ok())
        .unwrap_or(Duration::ZERO)
}

fn last_health_output(state: &bollard::models::ContainerState) -> String {
    let output = state
        .health
        .as_ref()
        .and_then(|h| h.log.as_ref())
        .and_then(|log| log.last())
        .and_then(|r| r.output.as_deref())
        .map(str::trim)
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
    fn docker_host_parsing() {
        assert_eq!(
            socket_from_docker_host(None).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            socket_from_docker_host(Some("")).unwrap(),
            PathBuf::from("/var/run/docker.sock")
        );
        assert_eq!(
            socket_from_docker_host(Some("unix:///run/user/1/docker.sock")).unwrap(),
            PathBuf::from("/run/user/1/docker.sock")
        );
        assert!(socket_from_docker_host(Some("tcp://1.2.3.4:2375")).is_err());
    }

    #[test]
    fn components_are_validated() {
        let d = format!("sha256:{}", "b".repeat(64));
        let c = |name: &str, digest: &str| ComponentSpec {
            name: name.to_string(),
            image: "demo/app:1".to_string(),
            digest: digest.to_string(),
        };
        assert!(validate_components(&[c("web", &d), c("api", &d)]).is_ok());
        assert!(validate_components(&[c("web", "latest")]).is_err());
        assert!(validate_components(&[c("", &d)]).is_err());
        assert!(validate_components(&[c("a/b", &d), c("a_b", &d)]).is_err());
    }

    #[test]
    fn short_ids() {
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
    }
}
