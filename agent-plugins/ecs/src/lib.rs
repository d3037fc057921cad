//! The `ecs` executor: puts releases on Amazon ECS services (aws-sdk-ecs, rustls on ring).
//!
//! A target is one ECS service. A deploy describes the service, takes its current task
//! definition, and registers a new revision of the same family that copies it (containers,
//! cpu/memory, network mode, compatibilities, roles, volumes, …) with each released
//! component's container image set to `repository@digest`; the release is recorded in Docker
//! labels on those containers (`stella.component`, `stella.digest`, `stella.release.id`,
//! `stella.deployment.id`, `stella.job.id`) and in the revision's tags (`stella.release.id`,
//! `stella.deployment.id`, `stella.digest.<container>`). The service is then
//! updated to the new revision and the executor polls until its deployment settles: ECS has no
//! push API for this, so polling (`poll_interval_secs`, sparingly) is the documented way.
//! If the current revision already pins exactly the release's images, nothing is registered
//! and the deploy only waits for the service to be settled (`Unchanged`).
//!
//! Rollback is native: the service goes back to the newest revision of its family that pinned
//! the previous release's digests (found by its `stella.release.id` label), and a new revision
//! is registered from the previous spec only when none is left.
//!
//! Settled means: the service's task definition is the one deployed, its deployment for that
//! revision (the PRIMARY one) has `rolloutState` COMPLETED and `runningCount == desiredCount`.
//! A FAILED rollout (deployment circuit breaker) is reported as unhealthy with the service's
//! latest events, so that the plane can roll back.
//!
//! Target config keys: `cluster`, `service`, `region` (`us-east-1`), `endpoint_url` (override,
//! e.g. a VPC endpoint), `credentials` (`{"profile": …}`, or `{"access_key_id_env": …,
//! "secret_access_key_env": …, "session_token_env": …}` naming environment variables of the
//! agent, or absent/`{}` for the SDK's default chain), `container_map` (component → container,
//! default the same name), `settle_timeout_secs` (600), `poll_interval_secs` (5),
//! `connect_timeout_secs` (10), `api_timeout_secs` (60, per API call including retries).
//!
//! Credentials come from the agent host only and are never logged.
//!
//! The version sticker is kept as tags on the ECS service itself, not on the agent host and not
//! on a task definition (revisions are immutable and a rollback reuses old ones): tag
//! [`STICKER_TAG`] (`stella.version`) holds `base64:<N>` and `stella.version.1` …
//! `stella.version.<N>` hold the base64 of the sticker's compact JSON in 256-character parts.
//! Base64 because ECS tag values allow only letters, digits, spaces and `+ - = . _ : / @`,
//! which JSON's braces and quotes are not. All parts are written in one TagResource call.
//!
//! What this executor cannot check before changing anything: that the registry holds each
//! digest (the agent has no registry access here). A digest ECS cannot pull makes the tasks
//! fail to start, which shows as a FAILED rollout or a settle timeout.

mod client;
mod config;
mod sticker;
mod taskdef;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ecs::config::SharedHttpClient;
use aws_sdk_ecs::types::{
    DeploymentControllerType, DeploymentRolloutState, Service, ServiceField, Tag, TaskDefinition,
    TaskDefinitionField, TaskDefinitionStatus,
};
use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec, Executor,
    ExecutorContext, InventoryItem, PluginError, ProgressSink, TargetRef, VersionSticker,
    is_valid_digest,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::client::Api;
use crate::config::TargetConfig;
use crate::taskdef::{
    container_pins, digest_of, label, missing_containers, pinned_containers, pinned_tags, pins,
    repository_of, revision_of, short_name,
};

pub use crate::config::{
    DEFAULT_API_TIMEOUT_SECS, DEFAULT_CONNECT_TIMEOUT_SECS, DEFAULT_POLL_INTERVAL_SECS,
    DEFAULT_REGION, DEFAULT_SETTLE_TIMEOUT_SECS,
};
pub use crate::sticker::TAG_HEADER as STICKER_TAG;
pub use crate::taskdef::{
    LABEL_COMPONENT, LABEL_DEPLOYMENT_ID, LABEL_DIGEST, LABEL_JOB_ID, LABEL_RELEASE_ID,
    TAG_DEPLOYMENT_ID, TAG_DIGEST_PREFIX, TAG_RELEASE_ID,
};

/// The executor kind this crate implements.
pub const KIND: &str = "ecs";

/// How many of a family's newest revisions a rollback looks through for the previous release.
const ROLLBACK_SEARCH_LIMIT: usize = 50;
/// ECS allows this many tags on a resource.
const MAX_TAGS_PER_RESOURCE: usize = 50;
/// Service events quoted when a rollout fails.
const EVENTS_IN_ERRORS: usize = 8;

/// Runs releases on ECS services.
pub struct EcsExecutor {
    ctx: ExecutorContext,
    http: SharedHttpClient,
    /// Two jobs for the same target must not interleave their steps.
    target_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for EcsExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcsExecutor")
            .field("state_dir", &self.ctx.state_dir)
            .finish_non_exhaustive()
    }
}

/// Where a service's rollout of one revision stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    InProgress,
    Settled,
    Failed,
}

#[derive(Debug, Clone)]
struct Observation {
    phase: Phase,
    /// Inventory state: `running`, `deploying`, `pending`, `degraded`, `stopped`, `failed`.
    state: &'static str,
    /// One line for progress and errors.
    summary: String,
    reason: Option<String>,
}

/// Reads a service's state for the revision `td_arn`.
///
/// ECS creates the revision's deployment, as PRIMARY, within the UpdateService call, so it is
/// looked up by task definition; the PRIMARY one is the fallback, for emulators (moto) that
/// keep the original deployment object.
fn observe(svc: &Service, td_arn: &str) -> Observation {
    let deployments = svc.deployments();
    let dep = deployments
        .iter()
        .find(|d| d.task_definition() == Some(td_arn))
        .or_else(|| deployments.iter().find(|d| d.status() == Some("PRIMARY")));
    let rollout = dep.and_then(|d| d.rollout_state());
    let (running, desired, pending) = (
        svc.running_count(),
        svc.desired_count(),
        svc.pending_count(),
    );
    let counts_match =
        running == desired && dep.is_none_or(|d| d.running_count() == d.desired_count());
    let completed = match rollout {
        Some(DeploymentRolloutState::Completed) => true,
        Some(_) => false,
        // Without rollout states (older services), only one deployment left means the old
        // tasks are gone.
        None => deployments.len() <= 1,
    };
    let phase = if rollout == Some(&DeploymentRolloutState::Failed) {
        Phase::Failed
    } else if counts_match && completed {
        Phase::Settled
    } else {
        Phase::InProgress
    };
    let state = match phase {
        Phase::Failed => "failed",
        _ if desired == 0 => "stopped",
        Phase::Settled => "running",
        Phase::InProgress if running == 0 => "pending",
        Phase::InProgress if running < desired => "degraded",
        Phase::InProgress => "deploying",
    };
    let rollout_text = rollout.map_or("unknown", |r| r.as_str());
    let mut summary = format!(
        "{}: rollout {rollout_text}, running {running}/{desired}, pending {pending}",
        short_name(td_arn)
    );
    if deployments.len() > 1 {
        summary.push_str(&format!(", {} deployments", deployments.len()));
    }
    Observation {
        phase,
        state,
        summary,
        reason: dep
            .and_then(|d| d.rollout_state_reason())
            .map(str::to_string),
    }
}

fn recent_events(svc: &Service) -> String {
    svc.events()
        .iter()
        .take(EVENTS_IN_ERRORS)
        .filter_map(|e| e.message())
        .collect::<Vec<_>>()
        .join("\n")
}

fn component_names(components: &[ComponentSpec]) -> String {
    components
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn validate_components(
    components: &[ComponentSpec],
    cfg: &TargetConfig,
) -> Result<(), PluginError> {
    if components.is_empty() {
        return Err(PluginError::InvalidConfig(
            "the release has no components to deploy".to_string(),
        ));
    }
    let mut containers: HashMap<&str, &str> = HashMap::new();
    for c in components {
        if c.name.is_empty() || c.name.chars().any(char::is_control) {
            return Err(PluginError::InvalidConfig(format!(
                "component {:?}: name must be non-empty without control characters",
                c.name
            )));
        }
        let repo = repository_of(&c.image);
        if repo.is_empty() || repo.chars().any(|ch| ch.is_whitespace() || ch.is_control()) {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: image {:?} names no repository",
                c.name, c.image
            )));
        }
        if !is_valid_digest(&c.digest) {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: digest {:?} is not sha256:<64 lowercase hex>",
                c.name, c.digest
            )));
        }
        let container = cfg.container_for(&c.name);
        if let Some(other) = containers.insert(container, &c.name) {
            return Err(PluginError::InvalidConfig(format!(
                "components {other:?} and {:?} both deploy into container {container:?}",
                c.name
            )));
        }
    }
    Ok(())
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The service as ECS describes it now (with its tags). Refuses services that are not ACTIVE.
async fn describe_service(api: &Api, cfg: &TargetConfig) -> Result<Service, PluginError> {
    let out = api
        .client
        .describe_services()
        .cluster(&cfg.cluster)
        .services(&cfg.service)
        .include(ServiceField::Tags)
        .send()
        .await
        .map_err(|e| api.error("DescribeServices", e))?;
    let Some(svc) = out.services().first() else {
        let reason = out
            .failures()
            .first()
            .and_then(|f| f.reason())
            .unwrap_or("not returned");
        return Err(PluginError::Backend(format!(
            "{} not found ({reason})",
            cfg.describe()
        )));
    };
    match svc.status() {
        Some("ACTIVE") => Ok(svc.clone()),
        other => Err(PluginError::Backend(format!(
            "{} is {}, not ACTIVE",
            cfg.describe(),
            other.unwrap_or("of unknown status")
        ))),
    }
}

fn service_task_definition(svc: &Service, cfg: &TargetConfig) -> Result<String, PluginError> {
    svc.task_definition()
        .map(str::to_string)
        .ok_or_else(|| PluginError::Backend(format!("{} has no task definition", cfg.describe())))
}

async fn describe_task_definition(
    api: &Api,
    arn: &str,
) -> Result<(TaskDefinition, Vec<Tag>), PluginError> {
    let out = api
        .client
        .describe_task_definition()
        .task_definition(arn)
        .include(TaskDefinitionField::Tags)
        .send()
        .await
        .map_err(|e| api.error(&format!("DescribeTaskDefinition {arn}"), e))?;
    let td = out.task_definition().cloned().ok_or_else(|| {
        PluginError::Backend(format!("ECS returned no task definition for {arn}"))
    })?;
    Ok((td, out.tags().to_vec()))
}

fn task_definition_arn(td: &TaskDefinition) -> Result<String, PluginError> {
    td.task_definition_arn()
        .map(str::to_string)
        .ok_or_else(|| PluginError::Backend("ECS returned a task definition without ARN".into()))
}

/// Registers a revision of `current`'s family that runs the spec's digests. Every field a
/// revision is registered with is copied, except inference accelerators, which ECS no longer
/// offers (the SDK deprecates them).
async fn register_pinned(
    api: &Api,
    cfg: &TargetConfig,
    current: &TaskDefinition,
    current_tags: &[Tag],
    spec: &DeploySpec,
) -> Result<TaskDefinition, PluginError> {
    let tags = pinned_tags(current_tags, cfg, spec);
    let out = api
        .client
        .register_task_definition()
        .set_family(current.family().map(str::to_string))
        .set_task_role_arn(current.task_role_arn().map(str::to_string))
        .set_execution_role_arn(current.execution_role_arn().map(str::to_string))
        .set_network_mode(current.network_mode().cloned())
        .set_container_definitions(Some(pinned_containers(current, cfg, spec)))
        .set_volumes(current.volumes.clone())
        .set_placement_constraints(current.placement_constraints.clone())
        .set_requires_compatibilities(current.requires_compatibilities.clone())
        .set_cpu(current.cpu().map(str::to_string))
        .set_memory(current.memory().map(str::to_string))
        .set_pid_mode(current.pid_mode().cloned())
        .set_ipc_mode(current.ipc_mode().cloned())
        .set_proxy_configuration(current.proxy_configuration().cloned())
        .set_ephemeral_storage(current.ephemeral_storage().cloned())
        .set_runtime_platform(current.runtime_platform().cloned())
        .set_enable_fault_injection(current.enable_fault_injection())
        .set_tags((!tags.is_empty()).then_some(tags))
        .send()
        .await
        .map_err(|e| api.error("RegisterTaskDefinition", e))?;
    out.task_definition()
        .cloned()
        .ok_or_else(|| PluginError::Backend("ECS registered no task definition".to_string()))
}

async fn update_service(api: &Api, cfg: &TargetConfig, td_arn: &str) -> Result<(), PluginError> {
    api.client
        .update_service()
        .cluster(&cfg.cluster)
        .service(&cfg.service)
        .task_definition(td_arn)
        .send()
        .await
        .map_err(|e| api.error("UpdateService", e))?;
    Ok(())
}

/// The newest ACTIVE revision of `family` (other than `skip`) that pins the spec, if any.
async fn find_pinned_revision(
    api: &Api,
    cfg: &TargetConfig,
    family: &str,
    skip: &str,
    spec: &DeploySpec,
) -> Result<Option<TaskDefinition>, PluginError> {
    let mut arns = Vec::new();
    let mut token = None;
    loop {
        let out = api
            .client
            .list_task_definitions()
            .family_prefix(family)
            .status(TaskDefinitionStatus::Active)
            .set_next_token(token)
            .send()
            .await
            .map_err(|e| api.error("ListTaskDefinitions", e))?;
        arns.extend(
            out.task_definition_arns()
                .iter()
                .filter(|a| short_name(a).rsplit_once(':').map(|(f, _)| f) == Some(family))
                .cloned(),
        );
        token = out.next_token().map(str::to_string);
        if token.is_none() {
            break;
        }
    }
    // Newest first, whatever order the API used.
    arns.sort_by_key(|a| std::cmp::Reverse(revision_of(a).unwrap_or(0)));
    for arn in arns
        .iter()
        .filter(|a| a.as_str() != skip)
        .take(ROLLBACK_SEARCH_LIMIT)
    {
        let (td, _) = describe_task_definition(api, arn).await?;
        if pins(&td, cfg, spec) {
            return Ok(Some(td));
        }
    }
    Ok(None)
}

/// Polls the service until it has settled on `td_arn`, its rollout failed, or the settle
/// timeout passes. Progress is reported when what is seen changes.
async fn settle(
    api: &Api,
    cfg: &TargetConfig,
    td_arn: &str,
    components: &[ComponentSpec],
    progress: &dyn ProgressSink,
) -> Result<(), PluginError> {
    let deadline = Instant::now() + cfg.settle_timeout;
    let mut last = String::new();
    loop {
        let svc = describe_service(api, cfg).await?;
        let now_on = service_task_definition(&svc, cfg)?;
        if now_on != td_arn {
            return Err(PluginError::Backend(format!(
                "{} was moved to {} by someone else while waiting for {} to settle",
                cfg.describe(),
                short_name(&now_on),
                short_name(td_arn)
            )));
        }
        let seen = observe(&svc, td_arn);
        if seen.summary != last {
            progress.progress(&seen.summary);
            last = seen.summary.clone();
        }
        match seen.phase {
            Phase::Settled => return Ok(()),
            Phase::Failed => {
                return Err(PluginError::Unhealthy {
                    component: component_names(components),
                    detail: format!(
                        "ECS rollout of {} on {} failed: {}",
                        short_name(td_arn),
                        cfg.describe(),
                        seen.reason.as_deref().unwrap_or("no reason given")
                    ),
                    log_tail: recent_events(&svc),
                });
            }
            Phase::InProgress => {}
        }
        let now = Instant::now();
        if now >= deadline {
            let events = recent_events(&svc);
            let events = if events.is_empty() {
                String::new()
            } else {
                format!("; latest service events:\n{events}")
            };
            return Err(PluginError::Timeout {
                what: format!(
                    "{} to settle on {} (last seen: {}){events}",
                    cfg.describe(),
                    short_name(td_arn),
                    seen.summary,
                ),
                seconds: cfg.settle_timeout.as_secs(),
            });
        }
        tokio::time::sleep_until(deadline.min(now + cfg.poll_interval)).await;
    }
}

/// Whether deploying means registering from the current revision or returning to an earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Deploy,
    Rollback,
}

impl EcsExecutor {
    /// Nothing is contacted here: every operation builds its client from its target's config,
    /// so an unreachable AWS endpoint never keeps the agent from starting.
    pub fn new(ctx: ExecutorContext) -> Self {
        Self {
            ctx,
            http: client::http_client(),
            target_locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn target_lock(&self, target: &str) -> Arc<tokio::sync::Mutex<()>> {
        // A poisoned map is still a valid map: the lock only guards insertion.
        let mut locks = self
            .target_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(target.to_string()).or_default().clone()
    }

    fn parse(&self, target: &TargetRef) -> Result<TargetConfig, PluginError> {
        if target.kind != KIND {
            return Err(PluginError::InvalidConfig(format!(
                "target {} has kind {:?}, this executor handles {KIND:?}",
                target.name, target.kind
            )));
        }
        config::parse(&target.config)
    }

    async fn run(
        &self,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
        intent: Intent,
    ) -> Result<DeployOutcome, PluginError> {
        let cfg = self.parse(&spec.target)?;
        validate_components(&spec.components, &cfg)?;
        let target = spec.target.name.as_str();
        let lock = self.target_lock(target);
        let _guard = lock.lock().await;
        info!(
            target,
            job = %spec.job_id,
            release = %spec.release_id,
            components = spec.components.len(),
            ?intent,
            "deploying to ECS"
        );
        let api = Api::connect(&cfg, &self.http).await?;
        let result = self.ensure(&api, &cfg, spec, progress, intent).await;
        match &result {
            Ok(out) => {
                info!(target, job = %spec.job_id, duration_ms = out.duration_ms, "ECS deploy finished")
            }
            Err(e) => warn!(target, job = %spec.job_id, error = %e, "ECS deploy failed"),
        }
        result
    }

    async fn ensure(
        &self,
        api: &Api,
        cfg: &TargetConfig,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
        intent: Intent,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        let svc = describe_service(api, cfg).await?;
        if let Some(kind) = svc.deployment_controller().map(|d| d.r#type())
            && *kind != DeploymentControllerType::Ecs
        {
            return Err(PluginError::Backend(format!(
                "{} uses the {} deployment controller; Stella deploys through ECS rolling \
                 updates only",
                cfg.describe(),
                kind.as_str()
            )));
        }
        let service_arn = svc.service_arn().unwrap_or(&cfg.service).to_string();
        let current_arn = service_task_definition(&svc, cfg)?;
        let (current, current_tags) = describe_task_definition(api, &current_arn).await?;
        progress.progress(&format!(
            "{} runs {}",
            cfg.describe(),
            short_name(&current_arn)
        ));
        let actions: Vec<ComponentAction> = spec
            .components
            .iter()
            .map(|c| {
                if container_pins(&current, cfg, c, &spec.release_id) {
                    ComponentAction::Unchanged
                } else {
                    ComponentAction::Replaced
                }
            })
            .collect();

        let target_arn = if pins(&current, cfg, spec) {
            progress.progress(&format!(
                "{} already pins release {}; nothing to register",
                short_name(&current_arn),
                spec.release_id
            ));
            current_arn
        } else {
            let family = current.family().unwrap_or_default().to_string();
            let earlier = match intent {
                Intent::Rollback => {
                    find_pinned_revision(api, cfg, &family, &current_arn, spec).await?
                }
                Intent::Deploy => None,
            };
            let next = match earlier {
                Some(td) => {
                    let arn = task_definition_arn(&td)?;
                    progress.progress(&format!(
                        "rolling back to {}, which pinned release {}",
                        short_name(&arn),
                        spec.release_id
                    ));
                    arn
                }
                None => {
                    let missing = missing_containers(&current, cfg, spec);
                    if let Some((component, container)) = missing.first() {
                        return Err(PluginError::InvalidConfig(format!(
                            "component {component}: task definition {} has no container named \
                             {container:?} (map it with container_map)",
                            short_name(&current_arn)
                        )));
                    }
                    let td = register_pinned(api, cfg, &current, &current_tags, spec).await?;
                    let arn = task_definition_arn(&td)?;
                    let pinned: Vec<String> = spec
                        .components
                        .iter()
                        .map(|c| format!("{}={}", c.name, c.digest))
                        .collect();
                    progress.progress(&format!(
                        "registered {} pinning {}",
                        short_name(&arn),
                        pinned.join(", ")
                    ));
                    arn
                }
            };
            update_service(api, cfg, &next).await?;
            progress.progress(&format!(
                "updated {} to {}; waiting up to {}s for it to settle",
                cfg.describe(),
                short_name(&next),
                cfg.settle_timeout.as_secs()
            ));
            next
        };

        settle(api, cfg, &target_arn, &spec.components, progress).await?;
        progress.progress(&format!(
            "{} settled on {}",
            cfg.describe(),
            short_name(&target_arn)
        ));
        let duration_ms = millis(started.elapsed());
        Ok(DeployOutcome {
            components: spec
                .components
                .iter()
                .zip(actions)
                .map(|(c, action)| ComponentOutcome {
                    name: c.name.clone(),
                    digest: c.digest.clone(),
                    workload_id: format!("{service_arn}#{}", cfg.container_for(&c.name)),
                    action,
                    duration_ms,
                })
                .collect(),
            duration_ms,
        })
    }
}

#[async_trait::async_trait]
impl Executor for EcsExecutor {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn validate_config(&self, target: &TargetRef) -> Result<(), PluginError> {
        self.parse(target).map(|_| ())
    }

    async fn deploy(
        &self,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        self.run(spec, progress, Intent::Deploy).await
    }

    /// Native rollback: back to the revision that pinned `previous` when the family still has
    /// it, so that everything else in that revision comes back too; otherwise a deploy.
    async fn rollback(
        &self,
        previous: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        self.run(previous, progress, Intent::Rollback).await
    }

    /// The containers of the service's current task definition that Stella deployed (those with
    /// a `stella.component` label), with the digest their image is pinned to and the service's
    /// state for that revision.
    async fn inventory(&self, target: &TargetRef) -> Result<Vec<InventoryItem>, PluginError> {
        let cfg = self.parse(target)?;
        let api = Api::connect(&cfg, &self.http).await?;
        let svc = describe_service(&api, &cfg).await?;
        let arn = service_task_definition(&svc, &cfg)?;
        let (td, _) = describe_task_definition(&api, &arn).await?;
        let seen = observe(&svc, &arn);
        let service_arn = svc.service_arn().unwrap_or(&cfg.service);
        let mut seen_components = HashSet::new();
        let mut items: Vec<InventoryItem> = td
            .container_definitions()
            .iter()
            .filter_map(|def| {
                let component = label(def, LABEL_COMPONENT)?;
                let container = def.name().unwrap_or(component);
                if !seen_components.insert(component.to_string()) {
                    return None;
                }
                Some(InventoryItem {
                    component: component.to_string(),
                    // An image someone re-tagged by hand runs no known digest.
                    digest: def
                        .image()
                        .and_then(digest_of)
                        .unwrap_or_default()
                        .to_string(),
                    state: seen.state.to_string(),
                    health: (seen.phase == Phase::Failed).then(|| "unhealthy".to_string()),
                    workload_id: format!("{service_arn}#{container}"),
                    release_id: label(def, LABEL_RELEASE_ID).map(str::to_string),
                    deployment_id: label(def, LABEL_DEPLOYMENT_ID).map(str::to_string),
                })
            })
            .collect();
        items.sort_by(|a, b| a.component.cmp(&b.component));
        Ok(items)
    }

    /// Writes the sticker as tags on the ECS service (format in the crate documentation).
    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        let cfg = self.parse(target)?;
        let tags = sticker::encode(sticker)?;
        let api = Api::connect(&cfg, &self.http).await?;
        let svc = describe_service(&api, &cfg).await?;
        let arn = svc
            .service_arn()
            .ok_or_else(|| PluginError::Sticker(format!("{} has no ARN", cfg.describe())))?;
        let others = svc
            .tags()
            .iter()
            .filter_map(|t| t.key())
            .filter(|k| !sticker::is_sticker_key(k) && !k.to_ascii_lowercase().starts_with("aws:"))
            .count();
        if others + tags.len() > MAX_TAGS_PER_RESOURCE {
            return Err(PluginError::Sticker(format!(
                "the sticker needs {} tags but {} already has {others} other tags \
                 (ECS allows {MAX_TAGS_PER_RESOURCE})",
                tags.len(),
                cfg.describe()
            )));
        }
        let parts = tags.len() - 1;
        let as_sticker = |e: PluginError| match e {
            PluginError::Backend(m) => PluginError::Sticker(m),
            other => other,
        };
        api.client
            .tag_resource()
            .resource_arn(arn)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| as_sticker(api.error("TagResource", e)))?;
        let stale = sticker::stale_keys(svc.tags(), parts);
        if !stale.is_empty() {
            api.client
                .untag_resource()
                .resource_arn(arn)
                .set_tag_keys(Some(stale))
                .send()
                .await
                .map_err(|e| as_sticker(api.error("UntagResource", e)))?;
        }
        Ok(())
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        let cfg = self.parse(target)?;
        let api = Api::connect(&cfg, &self.http).await?;
        let svc = describe_service(&api, &cfg).await?;
        sticker::decode(svc.tags())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ecs::types::Deployment;

    fn cfg() -> TargetConfig {
        config::parse(&serde_json::json!({"cluster": "c", "service": "s"})).unwrap()
    }

    fn component(name: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: "registry:5000/demo/app:1".to_string(),
            digest: format!("sha256:{}", "b".repeat(64)),
        }
    }

    const TD: &str = "arn:aws:ecs:us-east-1:1:task-definition/fam:2";
    const OLD: &str = "arn:aws:ecs:us-east-1:1:task-definition/fam:1";

    fn deployment(
        td: &str,
        status: &str,
        rollout: Option<&str>,
        run: i32,
        want: i32,
    ) -> Deployment {
        Deployment::builder()
            .task_definition(td)
            .status(status)
            .set_rollout_state(rollout.map(DeploymentRolloutState::from))
            .rollout_state_reason("because")
            .running_count(run)
            .desired_count(want)
            .build()
    }

    fn service(run: i32, want: i32, deployments: Vec<Deployment>) -> Service {
        Service::builder()
            .task_definition(TD)
            .running_count(run)
            .desired_count(want)
            .set_deployments(Some(deployments))
            .build()
    }

    #[test]
    fn settled_needs_completed_rollout_and_full_counts() {
        let s = service(
            2,
            2,
            vec![deployment(TD, "PRIMARY", Some("COMPLETED"), 2, 2)],
        );
        let o = observe(&s, TD);
        assert_eq!((o.phase, o.state), (Phase::Settled, "running"));
        assert_eq!(
            o.summary,
            "fam:2: rollout COMPLETED, running 2/2, pending 0"
        );

        let s = service(
            1,
            2,
            vec![
                deployment(TD, "PRIMARY", Some("IN_PROGRESS"), 0, 2),
                deployment(OLD, "ACTIVE", Some("COMPLETED"), 1, 0),
            ],
        );
        let o = observe(&s, TD);
        assert_eq!((o.phase, o.state), (Phase::InProgress, "degraded"));
        assert!(o.summary.ends_with(", 2 deployments"), "{}", o.summary);

        let s = service(
            0,
            2,
            vec![deployment(TD, "PRIMARY", Some("IN_PROGRESS"), 0, 2)],
        );
        assert_eq!(observe(&s, TD).state, "pending");

        let s = service(0, 2, vec![deployment(TD, "PRIMARY", Some("FAILED"), 0, 2)]);
        let o = observe(&s, TD);
        assert_eq!((o.phase, o.state), (Phase::Failed, "failed"));
        assert_eq!(o.reason.as_deref(), Some("because"));

        // No rollout state: settled once the old deployment is gone.
        let s = service(
            2,
            2,
            vec![
                deployment(TD, "PRIMARY", None, 2, 2),
                deployment(OLD, "ACTIVE", None, 0, 0),
            ],
        );
        assert_eq!(observe(&s, TD).phase, Phase::InProgress);
        let s = service(2, 2, vec![deployment(TD, "PRIMARY", None, 2, 2)]);
        assert_eq!(observe(&s, TD).phase, Phase::Settled);

        // Scaled to zero is settled but does not run.
        let s = service(
            0,
            0,
            vec![deployment(OLD, "PRIMARY", Some("COMPLETED"), 0, 0)],
        );
        let o = observe(&s, TD);
        assert_eq!((o.phase, o.state), (Phase::Settled, "stopped"));
    }

    #[test]
    fn components_are_validated() {
        let cfg = cfg();
        assert!(validate_components(&[component("web"), component("api")], &cfg).is_ok());
        assert!(validate_components(&[], &cfg).is_err());
        let mut bad = component("web");
        bad.digest = "latest".to_string();
        assert!(validate_components(&[bad], &cfg).is_err());
        assert!(validate_components(&[component("")], &cfg).is_err());
        assert!(validate_components(&[component("web"), component("web")], &cfg).is_err());
        let mut no_repo = component("web");
        no_repo.image = ":1".to_string();
        assert!(validate_components(&[no_repo], &cfg).is_err());
        let mapped = config::parse(
            &serde_json::json!({"cluster": "c", "service": "s", "container_map": {"api": "web"}}),
        )
        .unwrap();
        let err = validate_components(&[component("web"), component("api")], &mapped).unwrap_err();
        assert!(err.to_string().contains("container \"web\""), "{err}");
    }

    #[test]
    fn construction_contacts_nothing() {
        let exec = EcsExecutor::new(ExecutorContext {
            state_dir: std::env::temp_dir(),
        });
        assert_eq!(exec.kind(), "ecs");
        let target = TargetRef {
            name: "t".to_string(),
            kind: "docker".to_string(),
            config: serde_json::json!({"cluster": "c", "service": "s"}),
        };
        assert!(matches!(
            exec.validate_config(&target),
            Err(PluginError::InvalidConfig(_))
        ));
    }
}
