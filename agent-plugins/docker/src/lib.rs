//! The `docker` executor: runs each component of a release as one container on the local Docker
//! Engine, pinned to the image the job's digest names.
//!
//! Digest-first: a container is always created from the image *id* a digest resolved to, never
//! from a tag, so a tag moved behind Stella's back can never change what runs. Every component is
//! resolved before the engine is touched, so a job that cannot be honoured changes nothing.

mod config;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary,
    HealthStatusEnum, HostConfig, RestartPolicy,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, ListContainersOptions,
    ListImagesOptions, LogsOptions, RemoveContainerOptions, RenameContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use futures_util::StreamExt;
use stella_plugin_sdk::digest::{RunningDigests, matching_repo_digest, short_id};
use stella_plugin_sdk::engine::ImageStore;
use stella_plugin_sdk::naming::{container_name, path_segment, sanitize};
use stella_plugin_sdk::readiness::{
    self, ContainerState, LOG_FETCH_TIMEOUT, LOG_TAIL_LINES, WaitOptions,
};
use stella_plugin_sdk::validate::{self, DistinctNames};
use stella_plugin_sdk::{
    ChangeSink, ComponentAction, ComponentOutcome, ComponentSpec, DeployMode, DeployOutcome,
    DeploySpec, Executor, ExecutorContext, InventoryItem, ObservedWorkload, PluginError,
    ProgressSink, STICKER_FILE_NAME, TargetLocks, TargetRef, VersionSticker, WatchEnd, engine,
    files, labels, millis, sort_inventory,
};
use tracing::{debug, info, warn};

use crate::config::TargetConfig;

pub use stella_plugin_sdk::labels::{
    COMPONENT as LABEL_COMPONENT, DEPLOYMENT_ID as LABEL_DEPLOYMENT_ID, DIGEST as LABEL_DIGEST,
    IMAGE as LABEL_IMAGE, JOB_ID as LABEL_JOB_ID, MANAGED as LABEL_MANAGED,
    RELEASE_ID as LABEL_RELEASE_ID, RELEASE_NAME as LABEL_RELEASE_NAME, TARGET as LABEL_TARGET,
};

/// The executor kind this crate implements.
pub const KIND: &str = "docker";

/// Per-request timeout (until response headers); image pulls stream past it.
const REQUEST_TIMEOUT_SECS: u64 = 120;
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Runs releases as containers on one Docker Engine.
pub struct DockerExecutor {
    docker: Docker,
    ctx: ExecutorContext,
    /// Two jobs for the same target must not interleave their stop/create steps.
    target_locks: TargetLocks,
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
        Self::connect_with_socket(&engine::docker_socket()?, ctx).await
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
            target_locks: TargetLocks::default(),
        })
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
            .find(|img| matching_repo_digest(&img.repo_digests, repo, digest).is_some())
            .map(|img| img.id))
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
    /// create (or a blue-green rename) fail after the old container is already gone; refuse up
    /// front instead.
    async fn check_name_free(
        &self,
        name: &str,
        target: &str,
        component: &str,
    ) -> Result<(), PluginError> {
        match self.docker.inspect_container(name, None).await {
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

    async fn list_network_containers(
        &self,
        network: &str,
    ) -> Result<Vec<ContainerSummary>, PluginError> {
        let filters = HashMap::from([("network".to_string(), vec![network.to_string()])]);
        self.docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| backend("list containers", e))
    }

    /// One container as inventory and drift see it; `None` when it went away meanwhile.
    async fn observe_container(
        &self,
        id: &str,
        digests: &mut RunningDigests,
    ) -> Result<Option<ObservedWorkload>, PluginError> {
        // Gone between list and inspect: it no longer runs anything.
        let Some(info) = self.inspect(id).await? else {
            return Ok(None);
        };
        let labels = info
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default();
        let image_id = info.image.clone().unwrap_or_default();
        let digest = digests
            .resolve(
                &image_id,
                labels.get(LABEL_DIGEST).map(String::as_str),
                || self.repo_digests(&image_id),
            )
            .await?;
        let state = info.state.unwrap_or_default();
        let workload_id = info.id.unwrap_or_else(|| id.to_string());
        let name = info
            .name
            .map(|n| n.trim_start_matches('/').to_string())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| workload_id.clone());
        let image = labels
            .get(LABEL_IMAGE)
            .cloned()
            .or_else(|| info.config.and_then(|c| c.image))
            .unwrap_or_else(|| image_id.clone());
        let item = InventoryItem {
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
            workload_id,
            release_id: labels.get(LABEL_RELEASE_ID).cloned(),
            deployment_id: labels.get(LABEL_DEPLOYMENT_ID).cloned(),
        };
        Ok(Some(ObservedWorkload {
            managed: labels.get(LABEL_MANAGED).map(String::as_str) == Some("true"),
            labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
            name,
            image,
            item,
        }))
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInspectResponse>, PluginError> {
        match self.docker.inspect_container(id, None).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(backend("inspect container", e)),
        }
    }

    /// Whether `id` already is exactly what this component of this release should be, under
    /// the container name `name`.
    async fn is_current(
        &self,
        id: &str,
        name: &str,
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
        let expected_name = format!("/{name}");
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
        let name = container_name(target, &c.name);
        let mut keep = None;
        for id in previous.iter().filter_map(|s| s.id.as_deref()) {
            if self.is_current(id, &name, spec, c, image_id, cfg).await? {
                keep = Some(id.to_string());
                break;
            }
        }
        if let Some(id) = keep {
            // Duplicates come from an interrupted blue-green switch or from tampering; they
            // would run next to the real one.
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

        progress.progress(&format!("{}: creating container {name}", c.name));
        let id = self.create_and_start(spec, c, image_id, cfg, &name).await?;
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

    /// Blue-green on one engine: every component that changes first gets a *green* container
    /// beside the running (*blue*) one, under [`green_name`]; only once every green is ready
    /// does anything switch. A switch renames blue out of the way ([`retired_name`]), renames
    /// green to the stable name, then stops and removes blue, so the stable name (and the DNS
    /// name other containers on the network use) moves to the new release while the old one
    /// still runs. A green that does not become ready is removed with the others of this job,
    /// and the blue containers were never touched.
    ///
    /// Every state an interrupted run can leave converges on a re-run: a retired blue without
    /// a stable container is renamed back first, a green of this release that still runs is
    /// reused, any other green is replaced, and a retired blue beside a stable container goes
    /// before the switch.
    async fn deploy_blue_green(
        &self,
        spec: &DeploySpec,
        cfg: &TargetConfig,
        image_ids: &[String],
        existing: &[ContainerSummary],
        progress: &dyn ProgressSink,
    ) -> Result<Vec<ComponentOutcome>, PluginError> {
        let target = spec.target.name.as_str();
        let mut plans = Vec::with_capacity(spec.components.len());
        for (c, image_id) in spec.components.iter().zip(image_ids) {
            let t0 = Instant::now();
            let plan = match self
                .prepare_green(spec, c, image_id, cfg, existing, progress)
                .await
            {
                Ok(plan) => plan,
                Err(e) => {
                    // The greens of this job go; the blues keep serving as they were.
                    for (earlier, _) in &plans {
                        self.discard_green(target, earlier, progress).await;
                    }
                    return Err(e);
                }
            };
            plans.push((plan, t0));
        }

        let mut outcomes = Vec::with_capacity(plans.len());
        for (plan, t0) in plans {
            let workload_id = self.switch(target, &plan, progress).await?;
            outcomes.push(ComponentOutcome {
                name: plan.component.clone(),
                digest: plan.digest.clone(),
                workload_id,
                action: plan.action,
                duration_ms: millis(t0.elapsed()),
            });
        }
        Ok(outcomes)
    }

    /// Phase one for component `c`: the container that will serve it, ready. Changes nothing
    /// but the component's green container (and renames a retired blue back, see
    /// [`DockerExecutor::deploy_blue_green`]).
    async fn prepare_green(
        &self,
        spec: &DeploySpec,
        c: &ComponentSpec,
        image_id: &str,
        cfg: &TargetConfig,
        existing: &[ContainerSummary],
        progress: &dyn ProgressSink,
    ) -> Result<GreenPlan, PluginError> {
        let target = spec.target.name.as_str();
        let stable = container_name(target, &c.name);
        let green = green_name(target, &c.name);
        let retired = retired_name(target, &c.name);
        let mut blue = None;
        let mut greens = Vec::new();
        let mut leftovers = Vec::new();
        let mut retired_blue = None;
        for s in of_component(existing, &c.name) {
            let Some(id) = s.id.clone() else { continue };
            match summary_name(s) {
                Some(n) if n == stable => blue = Some(id),
                Some(n) if n == green => greens.push(id),
                Some(n) if n == retired => retired_blue = Some(id),
                _ => leftovers.push(id),
            }
        }
        // A run interrupted between its two renames left the old release serving under the
        // retired name and nothing under the stable one: it is blue again.
        if blue.is_none()
            && let Some(id) = retired_blue.take()
        {
            progress.progress(&format!(
                "{}: renaming {} back to {stable} (an earlier switch was interrupted)",
                c.name,
                short_id(&id)
            ));
            self.rename(&id, &stable).await?;
            blue = Some(id);
        }
        leftovers.extend(retired_blue);

        let mut plan = GreenPlan {
            component: c.name.clone(),
            digest: c.digest.clone(),
            stable,
            action: if blue.is_some() {
                ComponentAction::Replaced
            } else {
                ComponentAction::Created
            },
            blue: None,
            green: None,
            leftovers,
        };
        if let Some(id) = &blue
            && self
                .is_current(id, &plan.stable, spec, c, image_id, cfg)
                .await?
        {
            progress.progress(&format!(
                "{}: container {} already runs this release, unchanged",
                c.name,
                short_id(id)
            ));
            plan.leftovers.extend(greens);
            self.wait_ready(id, &c.name, cfg.health_timeout, None)
                .await?;
            plan.action = ComponentAction::Unchanged;
            plan.blue = Some(id.clone());
            return Ok(plan);
        }
        plan.blue = blue;

        let mut reusable = None;
        for id in greens {
            if reusable.is_none() && self.is_current(&id, &green, spec, c, image_id, cfg).await? {
                reusable = Some(id);
            } else {
                progress.progress(&format!(
                    "{}: removing green {} left by an earlier run",
                    c.name,
                    short_id(&id)
                ));
                self.remove(&id).await?;
            }
        }
        let (id, baseline_restarts) = match reusable {
            Some(id) => {
                progress.progress(&format!(
                    "{}: reusing green {} left by an earlier run of this release",
                    c.name,
                    short_id(&id)
                ));
                (id, None)
            }
            None => {
                progress.progress(&format!("{}: starting green {green}", c.name));
                let created = self.create_and_start(spec, c, image_id, cfg, &green).await;
                let id = match created {
                    Ok(id) => id,
                    Err(e) => {
                        // A create that got as far as a container leaves it under the green
                        // name; it must not outlive the failed job.
                        if let Err(cleanup) = self.remove(&green).await {
                            warn!(target, component = %c.name, error = %cleanup, "could not remove failed green");
                        }
                        return Err(e);
                    }
                };
                (id, Some(0))
            }
        };
        plan.green = Some(id.clone());
        match self
            .wait_ready(&id, &c.name, cfg.health_timeout, baseline_restarts)
            .await
        {
            Ok(healthy) => {
                progress.progress(&format!(
                    "{}: {}",
                    c.name,
                    if healthy {
                        "green healthy"
                    } else {
                        "green running (no health check)"
                    }
                ));
                Ok(plan)
            }
            Err(e) => {
                self.discard_green(target, &plan, progress).await;
                Err(e)
            }
        }
    }

    /// Removes the green of `plan` after a failure; best effort, since the failure being
    /// reported matters more, and a green left behind is replaced by the next run.
    async fn discard_green(&self, target: &str, plan: &GreenPlan, progress: &dyn ProgressSink) {
        let Some(id) = &plan.green else { return };
        progress.progress(&format!(
            "{}: removing green {}; {} keeps running",
            plan.component,
            short_id(id),
            plan.blue.as_deref().map_or_else(
                || "nothing".to_string(),
                |b| format!("blue {}", short_id(b))
            )
        ));
        if let Err(e) = self.remove(id).await {
            warn!(target, component = %plan.component, container = %id, error = %e, "could not remove green");
        }
    }

    /// Phase two for one component: leftovers of interrupted runs go, green takes the stable
    /// name, then blue stops. Returns the id of the container that now serves.
    async fn switch(
        &self,
        target: &str,
        plan: &GreenPlan,
        progress: &dyn ProgressSink,
    ) -> Result<String, PluginError> {
        let component = plan.component.as_str();
        let Some(green) = &plan.green else {
            // Unchanged: blue stays; leftovers of interrupted runs go.
            for id in &plan.leftovers {
                progress.progress(&format!(
                    "{component}: removing stray container {}",
                    short_id(id)
                ));
                self.remove(id).await?;
            }
            return plan.blue.clone().ok_or_else(|| {
                PluginError::Backend(format!("component {component}: no container to keep"))
            });
        };
        // First, since one of them may hold the retired name blue is about to take.
        for id in &plan.leftovers {
            progress.progress(&format!(
                "{component}: removing stray container {}",
                short_id(id)
            ));
            self.remove(id).await?;
        }
        let retired = retired_name(target, component);
        if let Some(blue) = &plan.blue {
            self.rename(blue, &retired).await?;
        }
        self.rename(green, &plan.stable).await?;
        info!(target, component, container = %green, "switched to green");
        progress.progress(&format!(
            "{component}: switched: {} now runs {}",
            plan.stable,
            short_id(green)
        ));
        if let Some(blue) = &plan.blue {
            self.remove(blue).await?;
            progress.progress(&format!("{component}: stopped blue {}", short_id(blue)));
        }
        Ok(green.clone())
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), PluginError> {
        self.docker
            .rename_container(
                id,
                RenameContainerOptions {
                    name: name.to_string(),
                },
            )
            .await
            .map_err(|e| backend(&format!("rename container {} to {name}", short_id(id)), e))
    }

    /// Creates and starts the container of component `c` under `name`, from the image id the
    /// digest resolved to, and checks that the engine runs exactly that image.
    async fn create_and_start(
        &self,
        spec: &DeploySpec,
        c: &ComponentSpec,
        image_id: &str,
        cfg: &TargetConfig,
        name: &str,
    ) -> Result<String, PluginError> {
        let target = spec.target.name.as_str();
        let labels: HashMap<String, String> = labels::container_labels(spec, c)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
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
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
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
        Ok(id)
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

    /// The `RepoDigests` of image `image_id`; none when it is gone.
    async fn repo_digests(&self, image_id: &str) -> Result<Vec<String>, PluginError> {
        match self.docker.inspect_image(image_id).await {
            Ok(img) => Ok(img.repo_digests.unwrap_or_default()),
            Err(e) if is_not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(backend("inspect image", e)),
        }
    }
}

/// The engine's images as the SDK's [`engine::resolve_image`] needs them; private, so that
/// pulling stays a step of a verified deploy.
struct Images<'a>(&'a DockerExecutor);

#[async_trait::async_trait]
impl ImageStore for Images<'_> {
    async fn find_image(&self, repo: &str, digest: &str) -> Result<Option<String>, PluginError> {
        self.0.find_local_image(repo, digest).await
    }

    async fn image_id(&self, reference: &str) -> Result<Option<String>, PluginError> {
        match self.0.docker.inspect_image(reference).await {
            Ok(img) => Ok(Some(img.id.unwrap_or_default())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(backend("inspect image", e)),
        }
    }

    /// Fails with the engine's own message: it is what an operator needs to see.
    async fn pull(
        &self,
        component: &str,
        repo: &str,
        digest: &str,
    ) -> Result<Result<(), String>, PluginError> {
        info!(component, repo, digest, "pulling image by digest");
        // `repo@digest` and no tag: the engine fetches exactly that manifest and checks the
        // content against the digest; a tag could have moved since the release was made.
        let options = CreateImageOptions {
            from_image: Some(format!("{repo}@{digest}")),
            ..Default::default()
        };
        let mut stream = pin!(self.0.docker.create_image(Some(options), None, None));
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                return Ok(Err(engine_message(e)));
            }
        }
        Ok(Ok(()))
    }
}

#[async_trait::async_trait]
impl Executor for DockerExecutor {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_config(&self, target: &TargetRef) -> Result<(), PluginError> {
        validate::target(target, KIND)?;
        config::parse(&target.config).map(|_| ())
    }

    fn supports(&self, mode: DeployMode) -> bool {
        matches!(mode, DeployMode::Replace | DeployMode::BlueGreen)
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
        let _guard = self.target_locks.lock(target).await;
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
            image_ids.push(engine::resolve_image(&Images(self), c, progress).await?);
        }
        if spec.strategy == DeployMode::BlueGreen {
            check_blue_green_network(&cfg)?;
        }
        for c in &spec.components {
            self.check_name_free(&container_name(target, &c.name), target, &c.name)
                .await?;
            if spec.strategy == DeployMode::BlueGreen {
                self.check_name_free(&green_name(target, &c.name), target, &c.name)
                    .await?;
                self.check_name_free(&retired_name(target, &c.name), target, &c.name)
                    .await?;
            }
        }
        // Only what Stella created is replaced or removed: a container someone labelled with
        // the target by hand is foreign (drift reports it as an unmanaged extra), and a deploy
        // never removes a workload it did not start.
        let existing: Vec<ContainerSummary> = self
            .list_target_containers(target)
            .await?
            .into_iter()
            .filter(|s| summary_label(s, LABEL_MANAGED) == Some("true"))
            .collect();

        let outcomes = match spec.strategy {
            DeployMode::Replace => {
                let mut outcomes = Vec::with_capacity(spec.components.len());
                for (c, image_id) in spec.components.iter().zip(&image_ids) {
                    let t0 = Instant::now();
                    let previous = of_component(&existing, &c.name);
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
                outcomes
            }
            DeployMode::BlueGreen => {
                self.deploy_blue_green(spec, &cfg, &image_ids, &existing, progress)
                    .await?
            }
        };

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
        let mut digests = RunningDigests::default();
        let mut items = Vec::new();
        for summary in self.list_target_containers(&target.name).await? {
            if let Some(id) = summary.id.as_deref()
                && let Some(observed) = self.observe_container(id, &mut digests).await?
            {
                items.push(observed.item);
            }
        }
        sort_inventory(&mut items);
        Ok(items)
    }

    /// The target's containers (managed or not: a container someone labelled
    /// `stella.target=<target>` by hand is foreign) and, when the target names a `network`,
    /// every container on it that is not another target's managed container.
    async fn observe(&self, target: &TargetRef) -> Result<Vec<ObservedWorkload>, PluginError> {
        let cfg = config::parse(&target.config)?;
        let mut candidates = self.list_target_containers(&target.name).await?;
        if let Some(network) = cfg.network.as_deref().filter(|n| is_network_name(n)) {
            for s in self.list_network_containers(network).await? {
                let other_targets = summary_label(&s, LABEL_MANAGED) == Some("true")
                    && summary_label(&s, LABEL_TARGET) != Some(target.name.as_str());
                if !other_targets && !candidates.iter().any(|c| c.id == s.id) {
                    candidates.push(s);
                }
            }
        }
        let mut digests = RunningDigests::default();
        let mut observed = Vec::with_capacity(candidates.len());
        for summary in candidates {
            if let Some(id) = summary.id.as_deref()
                && let Some(o) = self.observe_container(id, &mut digests).await?
            {
                observed.push(o);
            }
        }
        observed.sort_by(|a, b| {
            (!a.managed, a.item.component.as_str(), a.name.as_str()).cmp(&(
                !b.managed,
                b.item.component.as_str(),
                b.name.as_str(),
            ))
        });
        Ok(observed)
    }

    /// Container lifecycle events from the engine: each names its target through its
    /// `stella.target` label; a container without one may sit on a target's network, so its
    /// change concerns every target.
    async fn watch(&self, sink: &dyn ChangeSink) -> Result<WatchEnd, PluginError> {
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "event".to_string(),
                WATCHED_EVENTS.iter().map(|e| (*e).to_string()).collect(),
            ),
        ]);
        let mut events = pin!(self.docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        })));
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| backend("engine events", e))?;
            let attributes = event.actor.and_then(|a| a.attributes).unwrap_or_default();
            debug!(
                action = event.action.as_deref().unwrap_or(""),
                "container event"
            );
            sink.changed(attributes.get(LABEL_TARGET).map(String::as_str));
        }
        Ok(WatchEnd::Closed)
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        files::write_sticker(self.sticker_path(target), sticker).await
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        files::read_sticker(&self.sticker_path(target)).await
    }
}

impl DockerExecutor {
    /// Where the sticker of `target` lives: on the agent host, since a docker target has no
    /// filesystem of its own that outlives its containers.
    pub fn sticker_path(&self, target: &TargetRef) -> PathBuf {
        self.ctx
            .state_dir
            .join("targets")
            .join(path_segment(&target.name))
            .join(STICKER_FILE_NAME)
    }
}

/// One component's blue-green switch, prepared: `green` is ready (or `None` when `blue`
/// already runs this release).
#[derive(Debug)]
struct GreenPlan {
    component: String,
    digest: String,
    stable: String,
    action: ComponentAction,
    blue: Option<String>,
    green: Option<String>,
    /// Other containers of the component (greens or retired blues of interrupted runs) that
    /// go once the switch is done.
    leftovers: Vec<String>,
}

/// The name a green container has while it starts beside blue. Stable names start with
/// `stella-`, so a green or retired name can never be one of them.
pub fn green_name(target: &str, component: &str) -> String {
    format!("stella_green-{}-{}", sanitize(target), sanitize(component))
}

/// The name blue has for the moment between the two renames of a switch.
pub fn retired_name(target: &str, component: &str) -> String {
    format!("stella_blue-{}-{}", sanitize(target), sanitize(component))
}

/// Blue and green run at once; sharing one network namespace they would fight over the ports
/// the workload listens on, and green would fail on what blue holds. (The executor publishes
/// no host ports, so on a bridge or user-defined network they never collide.)
fn check_blue_green_network(cfg: &TargetConfig) -> Result<(), PluginError> {
    match cfg.network.as_deref() {
        Some(n) if n == "host" || n.starts_with("container:") => {
            Err(PluginError::InvalidConfig(format!(
                "network: {n:?} makes blue and green share one network namespace, so the new \
                 release could not listen where the old one does; blue-green needs a bridge or \
                 user-defined network (or deploy this target with strategy all-at-once)"
            )))
        }
        _ => Ok(()),
    }
}

fn of_component<'a>(
    existing: &'a [ContainerSummary],
    component: &str,
) -> Vec<&'a ContainerSummary> {
    existing
        .iter()
        .filter(|s| summary_label(s, LABEL_COMPONENT) == Some(component))
        .collect()
}

/// A container's name without the engine's leading slash.
fn summary_name(s: &ContainerSummary) -> Option<&str> {
    s.names.as_ref()?.first().map(|n| n.trim_start_matches('/'))
}

fn validate_components(components: &[ComponentSpec]) -> Result<(), PluginError> {
    let mut names = DistinctNames::default();
    for c in components {
        validate::component(c)?;
        // Two components mapping to one container name would replace each other.
        names.insert(sanitize(&c.name), &c.name, "container name")?;
    }
    Ok(())
}

/// Engine events that change what a container is or whether it runs.
const WATCHED_EVENTS: &[&str] = &[
    "create", "start", "restart", "stop", "die", "kill", "oom", "pause", "unpause", "destroy",
    "rename", "update",
];

/// Whether `network` names a network whose members can be listed (not a network mode).
fn is_network_name(network: &str) -> bool {
    !network.contains(':') && !matches!(network, "default" | "host" | "none")
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
        assert!(validate_components(&[c("web", &d), c("api", &d)]).is_ok());
        assert!(validate_components(&[c("web", "latest")]).is_err());
        assert!(validate_components(&[c("", &d)]).is_err());
        assert!(validate_components(&[c("a/b", &d), c("a_b", &d)]).is_err());
    }
}
