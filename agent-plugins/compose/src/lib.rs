//! The `compose` executor: runs each component of a release as one service of a compose project
//! on the local Docker Engine, through the host's compose tool (`docker compose` or
//! `docker-compose`).
//!
//! Digest-first, like the docker executor: every component's digest is resolved to a local image
//! before anything is written, and the generated `compose.stella.lock.yml` pins each service to
//! the image *id* (or `repo@digest` for a registry digest), never to a tag. The lock file is the
//! whole desired state of the project; compose converges the containers to it, and the engine
//! (through bollard) is what Stella reads back for readiness, digests and inventory.

mod config;
mod lockfile;
mod naming;
mod tool;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use bollard::query_parameters::{
    ListContainersOptions, ListImagesOptions, LogsOptions, RemoveContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use futures_util::StreamExt;
use stella_plugin_sdk::digest::{
    RunningDigests, matching_repo_digest, repository_of, short_digest, short_id, tagged_reference,
};
use stella_plugin_sdk::files::{self, StagedFile};
use stella_plugin_sdk::readiness::{
    self, ContainerState, LOG_FETCH_TIMEOUT, LOG_TAIL_LINES, WaitOptions,
};
use stella_plugin_sdk::validate::{self, DistinctNames};
use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec, Executor,
    ExecutorContext, InventoryItem, PluginError, ProgressSink, STICKER_FILE_NAME, TargetLocks,
    TargetRef, VersionSticker, engine, millis, sort_inventory,
};
use tracing::{debug, info, warn};

use crate::config::TargetConfig;
use crate::lockfile::{LOCK_FILE_MODE, LOCK_FILE_NAME, LockedService};
use crate::naming::service_name;

pub use crate::lockfile::{
    COMPOSE_ONEOFF, COMPOSE_PROJECT, COMPOSE_SERVICE, LABEL_COMPONENT, LABEL_DEPLOYMENT_ID,
    LABEL_DIGEST, LABEL_MANAGED, LABEL_RELEASE_ID, LABEL_TARGET,
};
pub use crate::tool::ComposeTool;

/// The executor kind this crate implements.
pub const KIND: &str = "compose";
/// The compose file Stella generates in the project directory.
pub const LOCK_FILE: &str = LOCK_FILE_NAME;

/// Per-request timeout of engine calls (until response headers).
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// `config` only parses the file.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(60);
/// `up` stops replaced containers (up to their grace period each) and starts new ones; nothing
/// is pulled. Readiness has its own timeout afterwards.
const UP_TIMEOUT: Duration = Duration::from_secs(600);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Runs releases as compose projects on one Docker Engine.
pub struct ComposeExecutor {
    docker: Docker,
    tool: ComposeTool,
    ctx: ExecutorContext,
    /// Two jobs for the same target must not interleave their lock-file writes and `up`s.
    target_locks: TargetLocks,
}

impl std::fmt::Debug for ComposeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComposeExecutor")
            .field("tool", &self.tool)
            .field("state_dir", &self.ctx.state_dir)
            .finish_non_exhaustive()
    }
}

/// What a component's digest resolved to on this host.
struct Resolved {
    /// The local image id (what a container created from it reports as `Image`).
    image_id: String,
    /// What the lock file's `image:` says.
    pin: String,
}

impl ComposeExecutor {
    /// Connects to the engine (DOCKER_HOST unix socket if set, else /var/run/docker.sock) and
    /// finds the compose tool. The compose tool inherits the same DOCKER_HOST.
    pub async fn connect(ctx: ExecutorContext) -> Result<Self, PluginError> {
        Self::connect_with_socket(&engine::docker_socket()?, ctx).await
    }

    /// Connects to the engine listening on `socket` and finds the compose tool.
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
        let tool = ComposeTool::detect().await?;
        info!(
            socket = path,
            api = %docker.client_version(),
            compose = %tool.command_line(),
            version = tool.version(),
            "compose executor ready"
        );
        Ok(Self {
            docker,
            tool,
            ctx,
            target_locks: TargetLocks::default(),
        })
    }

    /// The compose tool this executor runs.
    pub fn tool(&self) -> &ComposeTool {
        &self.tool
    }

    /// The compose project name of `target` (`project` in its config, else `stella-<target>`).
    pub fn project_name(&self, target: &TargetRef) -> Result<String, PluginError> {
        Ok(self.config(target)?.project)
    }

    /// Where `target`'s lock file and sticker live.
    pub fn project_dir(&self, target: &TargetRef) -> Result<PathBuf, PluginError> {
        Ok(self.config(target)?.directory)
    }

    /// `<project dir>/compose.stella.lock.yml`.
    pub fn lock_file_path(&self, target: &TargetRef) -> Result<PathBuf, PluginError> {
        Ok(self.project_dir(target)?.join(LOCK_FILE_NAME))
    }

    /// `<project dir>/stella.version.json`.
    pub fn sticker_path(&self, target: &TargetRef) -> Result<PathBuf, PluginError> {
        Ok(self.project_dir(target)?.join(STICKER_FILE_NAME))
    }

    fn config(&self, target: &TargetRef) -> Result<TargetConfig, PluginError> {
        config::parse(target, &self.ctx.state_dir)
    }

    /// Finds the local image `digest` names: its id (locally built images have no registry
    /// digest), or an image whose RepoDigests carry exactly `repo@digest`.
    async fn find_local_image(
        &self,
        repo: &str,
        digest: &str,
    ) -> Result<Option<Resolved>, PluginError> {
        match self.docker.inspect_image(digest).await {
            Ok(img) if img.id.as_deref() == Some(digest) => {
                return Ok(Some(Resolved {
                    image_id: digest.to_string(),
                    pin: digest.to_string(),
                }));
            }
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(backend("inspect image", e)),
        }
        let images = self
            .docker
            .list_images(Some(ListImagesOptions {
                digests: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| backend("list images", e))?;
        Ok(images.into_iter().find_map(|img| {
            // The engine's own spelling of `repo@digest`: it is what the engine resolves.
            matching_repo_digest(&img.repo_digests, repo, digest).map(|rd| Resolved {
                pin: rd.to_string(),
                image_id: img.id.clone(),
            })
        }))
    }

    async fn resolve_image(
        &self,
        c: &ComponentSpec,
        progress: &dyn ProgressSink,
    ) -> Result<Resolved, PluginError> {
        let repo = repository_of(&c.image);
        if let Some(found) = self.find_local_image(repo, &c.digest).await? {
            progress.progress(&format!(
                "{}: resolved {repo}@{} to local image {}",
                c.name,
                short_digest(&c.digest),
                short_digest(&found.image_id)
            ));
            return Ok(found);
        }
        // A tag that exists locally with other content means the operator built or loaded
        // something else under that name.
        if let Some(tagged) = tagged_reference(&c.image) {
            match self.docker.inspect_image(tagged).await {
                Ok(img) => {
                    return Err(engine::other_content_under_tag(
                        c,
                        img.id.unwrap_or_default(),
                    ));
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(backend("inspect image", e)),
            }
        }
        // Compose would pull a missing image by itself; Stella decides what runs, so images
        // must be on the host (loaded or pulled by digest) before the deployment.
        Err(PluginError::ImageUnavailable {
            component: c.name.clone(),
            digest: c.digest.clone(),
            detail: format!(
                "no local image has that id or a {repo}@digest repo digest; the compose \
                 executor does not pull"
            ),
        })
    }

    async fn list_ids(&self, label: String) -> Result<Vec<String>, PluginError> {
        let filters = HashMap::from([("label".to_string(), vec![label])]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| backend("list containers", e))?;
        Ok(list.into_iter().filter_map(|s| s.id).collect())
    }

    /// Every container that belongs to the project or says it belongs to the target, except
    /// compose's one-off (`run`) containers, which are not services.
    async fn observe(
        &self,
        project: &str,
        target: &str,
    ) -> Result<Vec<ContainerInspectResponse>, PluginError> {
        let mut ids = self
            .list_ids(format!("{COMPOSE_PROJECT}={project}"))
            .await?;
        ids.extend(self.list_ids(format!("{LABEL_TARGET}={target}")).await?);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for id in ids {
            if !seen.insert(id.clone()) {
                continue;
            }
            // Gone between list and inspect: it no longer runs anything.
            let Some(info) = self.inspect(&id).await? else {
                continue;
            };
            // The engine's label filter is authoritative, but a stale or odd engine must not
            // make Stella touch containers of another project or target.
            let ours = label(&info, COMPOSE_PROJECT) == Some(project)
                || label(&info, LABEL_TARGET) == Some(target);
            if ours && label(&info, COMPOSE_ONEOFF) != Some("True") {
                out.push(info);
            }
        }
        Ok(out)
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, PluginError> {
        match self.docker.inspect_container(id, None).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(backend("inspect container", e)),
        }
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

    /// Writes the lock file only once compose has accepted its content, so a file compose
    /// rejects never replaces a working one.
    async fn write_lock_file(
        &self,
        cfg: &TargetConfig,
        path: &Path,
        text: String,
    ) -> Result<(), PluginError> {
        let target = path.to_path_buf();
        let staged = tokio::task::spawn_blocking(move || {
            StagedFile::stage(&target, text.as_bytes(), LOCK_FILE_MODE)
        })
        .await
        .map_err(|e| PluginError::Backend(format!("lock file writer failed: {e}")))?
        .map_err(|e| PluginError::Backend(format!("cannot write {}: {e}", path.display())))?;
        let check = self
            .tool
            .run(
                &cfg.directory,
                &cfg.project,
                staged.temp_path(),
                &["config", "-q"],
                None,
                CONFIG_TIMEOUT,
            )
            .await?;
        if !check.status.success() {
            return Err(PluginError::InvalidConfig(format!(
                "{} refuses the generated compose file ({}): {}",
                self.tool.command_line(),
                check.status,
                check.tail_text()
            )));
        }
        tokio::task::spawn_blocking(move || staged.commit())
            .await
            .map_err(|e| PluginError::Backend(format!("lock file writer failed: {e}")))?
            .map_err(|e| PluginError::Backend(format!("cannot replace {}: {e}", path.display())))
    }

    /// Polls until the container runs (and is healthy if it has a health check). Returns whether
    /// a health check vouched for it. `baseline_restarts` is the restart count the container is
    /// allowed to have; `None` takes whatever it has when first seen.
    async fn wait_ready(
        &self,
        id: &str,
        component: &str,
        timeout: Duration,
        baseline_restarts: Option<i64>,
    ) -> Result<bool, PluginError> {
        readiness::wait_ready(
            id,
            component,
            WaitOptions::for_timeout(timeout, POLL_INTERVAL, baseline_restarts),
            || async move { Ok(self.inspect(id).await?.as_ref().map(container_state)) },
            |detail: &str| {
                warn!(component, container = id, %detail, "component did not become ready");
                self.log_tail(id)
            },
        )
        .await
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
        readiness::last_lines(&lines, LOG_TAIL_LINES)
    }

    /// Turns a failed `up` into the error an operator can act on: the first component whose
    /// container is not running, with its logs and compose's own output.
    async fn up_failed(
        &self,
        spec: &DeploySpec,
        services: &[String],
        cfg: &TargetConfig,
        run: &tool::RunOutput,
    ) -> PluginError {
        let after = match self.observe(&cfg.project, &spec.target.name).await {
            Ok(after) => after,
            Err(e) => {
                warn!(error = %e, "cannot list containers after a failed compose up");
                Vec::new()
            }
        };
        let compose_output = format!(
            "--- {} output ---\n{}",
            self.tool.command_line(),
            run.tail_text()
        );
        let detail = format!(
            "{} up failed ({}): {}",
            self.tool.command_line(),
            run.status,
            run.last_line()
        );
        for (c, svc) in spec.components.iter().zip(services) {
            let container = service_containers(&after, &cfg.project, svc)
                .into_iter()
                .find(|i| label(i, LABEL_DEPLOYMENT_ID) == Some(spec.deployment_id.as_str()));
            let running = container.is_some_and(|i| {
                i.state.as_ref().and_then(|s| s.status) == Some(ContainerStateStatusEnum::RUNNING)
            });
            if running {
                continue;
            }
            let logs = match container.and_then(|i| i.id.as_deref()) {
                Some(id) => self.log_tail(id).await,
                None => String::new(),
            };
            let log_tail = if logs.is_empty() {
                compose_output
            } else {
                format!("{logs}\n{compose_output}")
            };
            warn!(component = %c.name, %detail, "compose up failed");
            return PluginError::Unhealthy {
                component: c.name.clone(),
                detail,
                log_tail,
            };
        }
        PluginError::Backend(format!("{detail}\n{compose_output}"))
    }

    /// The `RepoDigests` of image `image_id`; none when it is gone.
    async fn repo_digests(&self, image_id: &str) -> Result<Vec<String>, PluginError> {
        match self.docker.inspect_image(image_id).await {
            Ok(img) => Ok(img.repo_digests.unwrap_or_default()),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(backend("inspect image", e)),
        }
    }
}

#[async_trait::async_trait]
impl Executor for ComposeExecutor {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_config(&self, target: &TargetRef) -> Result<(), PluginError> {
        validate::target(target, KIND)?;
        self.config(target).map(|_| ())
    }

    async fn deploy(
        &self,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        self.validate_config(&spec.target)?;
        let cfg = self.config(&spec.target)?;
        let services = validate_components(&spec.components)?;
        let target = spec.target.name.as_str();
        let _guard = self.target_locks.lock(target).await;
        info!(
            target,
            project = %cfg.project,
            job = %spec.job_id,
            release = %spec.release_id,
            components = spec.components.len(),
            "deploying"
        );

        // Everything that can refuse the job runs before the first byte is written.
        let mut resolved = Vec::with_capacity(spec.components.len());
        for c in &spec.components {
            resolved.push(self.resolve_image(c, progress).await?);
        }
        let before = self.observe(&cfg.project, target).await?;
        if let Some(foreign) = before.iter().find(|i| {
            label(i, COMPOSE_PROJECT) == Some(cfg.project.as_str())
                && label(i, LABEL_TARGET) != Some(target)
        }) {
            return Err(PluginError::InvalidConfig(format!(
                "project: compose project {:?} already has container {} that Stella does not \
                 manage for target {target}; choose another project name",
                cfg.project,
                container_name(foreign)
            )));
        }

        let locked: Vec<LockedService<'_>> = spec
            .components
            .iter()
            .zip(&services)
            .zip(&resolved)
            .map(|((c, svc), r)| LockedService {
                component: &c.name,
                service: svc,
                digest: &c.digest,
                pin: &r.pin,
                settings: cfg.services.get(&c.name),
            })
            .collect();
        let text = lockfile::render(spec, &cfg, &locked);
        let lock_path = cfg.directory.join(LOCK_FILE_NAME);
        let on_disk = files::read_optional_string(&lock_path).await.map_err(|e| {
            PluginError::Backend(format!("cannot read {}: {e}", lock_path.display()))
        })?;

        let wanted: HashSet<&str> = services.iter().map(String::as_str).collect();
        // Containers claiming the target outside its project (a renamed project, or planted
        // behind Stella's back), and project containers of services no longer in the release.
        let strays: Vec<&ContainerInspectResponse> = before
            .iter()
            .filter(|i| {
                label(i, COMPOSE_PROJECT) != Some(cfg.project.as_str())
                    || !label(i, COMPOSE_SERVICE).is_some_and(|s| wanted.contains(s))
            })
            .collect();
        let current: Option<Vec<&ContainerInspectResponse>> = spec
            .components
            .iter()
            .zip(&services)
            .zip(&resolved)
            .map(
                |((c, svc), r)| match service_containers(&before, &cfg.project, svc)[..] {
                    [only] if is_current(only, spec, c, &r.image_id) => Some(only),
                    _ => None,
                },
            )
            .collect();

        // Unchanged only when compose was already told exactly this and the engine agrees:
        // the lock file alone cannot tell a stopped or swapped container.
        let told = on_disk.as_deref() == Some(text.as_str()) && strays.is_empty();
        if let Some(current) = current.filter(|_| told) {
            let mut outcomes = Vec::with_capacity(current.len());
            for (c, info) in spec.components.iter().zip(current) {
                let t0 = Instant::now();
                let id = info.id.clone().unwrap_or_default();
                progress.progress(&format!(
                    "{}: container {} already runs this release, unchanged",
                    c.name,
                    short_id(&id)
                ));
                self.wait_ready(&id, &c.name, cfg.health_timeout, None)
                    .await?;
                outcomes.push(ComponentOutcome {
                    name: c.name.clone(),
                    digest: c.digest.clone(),
                    workload_id: id,
                    action: ComponentAction::Unchanged,
                    duration_ms: millis(t0.elapsed()),
                });
            }
            let duration_ms = millis(started.elapsed());
            info!(target, job = %spec.job_id, duration_ms, "deploy finished: unchanged");
            return Ok(DeployOutcome {
                components: outcomes,
                duration_ms,
            });
        }

        progress.progress(&format!("writing {}", lock_path.display()));
        self.write_lock_file(&cfg, &lock_path, text).await?;
        progress.progress(&format!(
            "running {} up -d --remove-orphans (project {})",
            self.tool.command_line(),
            cfg.project
        ));
        let up_started = Instant::now();
        let up = self
            .tool
            .run(
                &cfg.directory,
                &cfg.project,
                &lock_path,
                &["up", "-d", "--remove-orphans"],
                Some(progress),
                UP_TIMEOUT,
            )
            .await?;
        if !up.status.success() {
            return Err(self.up_failed(spec, &services, &cfg, &up).await);
        }
        let up_ms = millis(up_started.elapsed());

        let after = self.observe(&cfg.project, target).await?;
        let mut outcomes = Vec::with_capacity(spec.components.len());
        let mut keep: HashSet<String> = HashSet::new();
        for ((c, svc), r) in spec.components.iter().zip(&services).zip(&resolved) {
            let t0 = Instant::now();
            let candidates = service_containers(&after, &cfg.project, svc);
            // Compose created or kept one container for the service; should there be more
            // (planted copies), the one made from this lock file is the workload.
            let Some(info) = candidates
                .iter()
                .find(|i| is_current(i, spec, c, &r.image_id))
                .or_else(|| candidates.first())
            else {
                return Err(PluginError::Unhealthy {
                    component: c.name.clone(),
                    detail: format!(
                        "{} up left no container for service {svc}",
                        self.tool.command_line()
                    ),
                    log_tail: up.tail_text(),
                });
            };
            let id = info.id.clone().unwrap_or_default();
            keep.insert(id.clone());
            let actual = info.image.clone().unwrap_or_default();
            if actual != r.image_id {
                return Err(PluginError::DigestMismatch {
                    component: c.name.clone(),
                    image: c.image.clone(),
                    expected: c.digest.clone(),
                    actual,
                });
            }
            let previous = service_containers(&before, &cfg.project, svc);
            let kept = previous
                .iter()
                .find(|p| p.id.as_deref() == Some(id.as_str()));
            let action = match kept {
                Some(p) if is_running(p) => ComponentAction::Unchanged,
                // Same container, but it was stopped and compose started it again.
                Some(_) => ComponentAction::Replaced,
                None if previous.is_empty() => ComponentAction::Created,
                None => ComponentAction::Replaced,
            };
            // A new container may not restart at all; one found running keeps its history.
            let baseline = if kept.is_some() { None } else { Some(0) };
            let healthy = self
                .wait_ready(&id, &c.name, cfg.health_timeout, baseline)
                .await?;
            progress.progress(&format!(
                "{}: container {} {}{}",
                c.name,
                short_id(&id),
                match action {
                    ComponentAction::Created => "created",
                    ComponentAction::Replaced => "replaced",
                    ComponentAction::Unchanged => "unchanged",
                },
                if healthy {
                    ", running, healthy"
                } else {
                    ", running"
                }
            ));
            outcomes.push(ComponentOutcome {
                name: c.name.clone(),
                digest: c.digest.clone(),
                workload_id: id,
                action,
                // `up` converged all services at once; each component carries its share.
                duration_ms: up_ms / (spec.components.len() as u64).max(1) + millis(t0.elapsed()),
            });
        }

        // A release is the full set. Done last, so that a failed deploy never removes more than
        // compose replaced.
        for info in &after {
            let Some(id) = info.id.as_deref() else {
                continue;
            };
            if keep.contains(id) {
                continue;
            }
            progress.progress(&format!(
                "removing container {} ({}): not part of this release",
                short_id(id),
                container_name(info)
            ));
            info!(target, container = id, "removing stray container");
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
        let cfg = self.config(target)?;
        let mut items = Vec::new();
        let mut digests = RunningDigests::default();
        for info in self.observe(&cfg.project, &target.name).await? {
            let image_id = info.image.clone().unwrap_or_default();
            let digest = digests
                .resolve(&image_id, label(&info, LABEL_DIGEST), || {
                    self.repo_digests(&image_id)
                })
                .await?;
            let component = label(&info, LABEL_COMPONENT)
                .or_else(|| label(&info, COMPOSE_SERVICE))
                .unwrap_or_default()
                .to_string();
            let release_id = label(&info, LABEL_RELEASE_ID).map(str::to_string);
            let deployment_id = label(&info, LABEL_DEPLOYMENT_ID).map(str::to_string);
            let state = info.state.unwrap_or_default();
            items.push(InventoryItem {
                component,
                digest,
                state: state
                    .status
                    .map_or_else(|| "unknown".to_string(), |s| s.to_string()),
                health: state
                    .health
                    .and_then(|h| h.status)
                    .filter(|s| !matches!(s, HealthStatusEnum::NONE | HealthStatusEnum::EMPTY))
                    .map(|s| s.to_string()),
                workload_id: info.id.unwrap_or_default(),
                release_id,
                deployment_id,
            });
        }
        sort_inventory(&mut items);
        Ok(items)
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        files::write_sticker(self.sticker_path(target)?, sticker).await
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        files::read_sticker(&self.sticker_path(target)?).await
    }
}

/// Checks the components and returns their compose service names, in order.
fn validate_components(components: &[ComponentSpec]) -> Result<Vec<String>, PluginError> {
    let mut names = DistinctNames::default();
    let mut out = Vec::with_capacity(components.len());
    for c in components {
        validate::component(c)?;
        let svc = service_name(&c.name);
        // Two components mapping to one service would silently merge into one.
        names.insert(
            svc.clone(),
            &c.name,
            &format!("compose service name {svc:?}"),
        )?;
        out.push(svc);
    }
    Ok(out)
}

fn label<'a>(info: &'a ContainerInspectResponse, key: &str) -> Option<&'a str> {
    info.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn container_name(info: &ContainerInspectResponse) -> &str {
    info.name
        .as_deref()
        .map(|n| n.trim_start_matches('/'))
        .or(info.id.as_deref())
        .unwrap_or("?")
}

fn is_running(info: &ContainerInspectResponse) -> bool {
    info.state.as_ref().and_then(|s| s.status) == Some(ContainerStateStatusEnum::RUNNING)
}

/// The containers compose counts as `svc` of `project`.
fn service_containers<'a>(
    all: &'a [ContainerInspectResponse],
    project: &str,
    svc: &str,
) -> Vec<&'a ContainerInspectResponse> {
    all.iter()
        .filter(|i| {
            label(i, COMPOSE_PROJECT) == Some(project) && label(i, COMPOSE_SERVICE) == Some(svc)
        })
        .collect()
}

/// Whether `info` already is exactly what this component of this deployment should be.
fn is_current(
    info: &ContainerInspectResponse,
    spec: &DeploySpec,
    c: &ComponentSpec,
    image_id: &str,
) -> bool {
    let unhealthy = info
        .state
        .as_ref()
        .and_then(|s| s.health.as_ref())
        .and_then(|h| h.status)
        == Some(HealthStatusEnum::UNHEALTHY);
    is_running(info)
        && !unhealthy
        && info.image.as_deref() == Some(image_id)
        && lockfile::labels(spec, &c.name, &c.digest)
            .iter()
            .all(|(k, v)| label(info, k) == Some(v.as_str()))
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

fn backend(what: &str, e: BollardError) -> PluginError {
    PluginError::Backend(format!("{what}: {e}"))
}

/// A bollard container inspection as the SDK's readiness rules read it.
fn container_state(info: &ContainerInspectResponse) -> ContainerState {
    let state = info.state.clone().unwrap_or_default();
    let health = state.health.as_ref();
    ContainerState {
        status: state
            .status
            .unwrap_or(ContainerStateStatusEnum::EMPTY)
            .to_string(),
        health: health
            .and_then(|h| h.status)
            .filter(|s| !matches!(s, HealthStatusEnum::NONE | HealthStatusEnum::EMPTY))
            .map(|s| s.to_string()),
        restart_count: info.restart_count.unwrap_or(0),
        exit_code: state.exit_code.unwrap_or(0),
        oom_killed: state.oom_killed == Some(true),
        error: state.error.clone().unwrap_or_default(),
        started_at: state.started_at.clone().unwrap_or_default(),
        health_output: health
            .and_then(|h| h.log.as_ref())
            .and_then(|log| log.last())
            .and_then(|r| r.output.clone())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_validated() {
        let d = format!("sha256:{}", "b".repeat(64));
        let c = |name: &str, digest: &str| ComponentSpec {
            name: name.to_string(),
            image: "demo/app:1".to_string(),
            digest: digest.to_string(),
        };
        assert_eq!(
            validate_components(&[c("web", &d), c("a/b", &d)]).unwrap(),
            vec!["web".to_string(), "a_b".to_string()]
        );
        assert!(validate_components(&[c("web", "latest")]).is_err());
        assert!(validate_components(&[c("", &d)]).is_err());
        assert!(validate_components(&[c("a/b", &d), c("a_b", &d)]).is_err());
        assert!(validate_components(&[c("web", &d), c("web", &d)]).is_err());
    }
}
