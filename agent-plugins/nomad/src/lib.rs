//! The `nomad` executor: runs a release as one Nomad service job, built from an operator's JSON
//! job template with every component's task image pinned to `repository@digest`.
//!
//! - **Deploy** registers the job (check-and-set on the job's modify index) and follows the
//!   deployment Nomad creates with blocking queries until it is `successful`, promoting canaries
//!   once they are healthy (`auto_promote`). A failed or cancelled deployment is an error; one
//!   still running at `deploy_timeout_secs` is marked failed in Nomad and reported as a timeout.
//!   Registering the same release with the same template again leaves the job version alone
//!   (Nomad only versions spec changes), which is how a re-deploy is reported `unchanged`.
//! - **Rollback** is native: Nomad keeps earlier job versions, so the newest one that pins the
//!   previous release's digests is reverted to (`/v1/job/:id/revert`, check-and-set on the
//!   current version); only when none is kept is the previous release deployed from the
//!   template. A rollback promotes its canaries once healthy even with `auto_promote` off.
//! - **Inventory** reads the job and its allocations: one item per allocation and component
//!   task, with the digest the allocation's job version pins.
//! - **Sticker**: Nomad holds no file of Stella's, so the sticker lives in a Nomad Variable
//!   (`stella/<job_id>/sticker`, item `sticker`).
//!
//! Target config keys: `address`, `job_id`, `namespace` ("default"), `region`, `token_env` or
//! `token_file`, `ca_file`, `client_cert_file` + `client_key_file`, `tls_server_name`,
//! `job_template` or `job_template_file`, `deploy_timeout_secs` (600), `request_timeout_secs`
//! (30), `auto_promote` (true), `sticker_variable_path`.
//!
//! ACL policy the token needs in the job's namespace: `submit-job`, `read-job` (covers
//! versions, deployments and allocations), and variables `read`/`write` on the sticker path.
//!
//! Credentials stay on the agent host: the token is read from the named file or environment
//! variable for each operation, sent only in the `X-Nomad-Token` header and never logged.

mod api;
mod client;
mod config;
mod template;
mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};
use stella_plugin_sdk::{
    ComponentAction, ComponentHealth, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec,
    Executor, ExecutorContext, HealthReport, InventoryItem, PluginError, ProgressSink,
    STICKER_SCHEMA, TargetRef, VersionSticker, is_valid_digest,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::api::{Job, short};
use crate::client::Client;
use crate::config::{TargetConfig, TemplateSource};
use crate::template::Template;
use crate::watch::Watch;

pub use crate::config::{
    DEFAULT_DEPLOY_TIMEOUT_SECS, DEFAULT_NAMESPACE, DEFAULT_REQUEST_TIMEOUT_SECS,
};
pub use crate::template::{
    META_COMPONENT, META_DEPLOYMENT_ID, META_DIGEST_PREFIX, META_RELEASE_ID, META_SPEC_HASH,
};

/// The executor kind this crate implements.
pub const KIND: &str = "nomad";
/// The item of the sticker variable that holds the sticker's JSON.
pub const STICKER_ITEM: &str = "sticker";
/// Nomad refuses variables above 64 KiB; a sticker is a few hundred bytes.
const MAX_STICKER_BYTES: usize = 60 * 1024;

/// Runs releases as Nomad jobs.
pub struct NomadExecutor {
    ctx: ExecutorContext,
    /// Two jobs for the same target must not interleave their register/revert steps.
    target_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for NomadExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NomadExecutor")
            .field("state_dir", &self.ctx.state_dir)
            .finish_non_exhaustive()
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn validate_components(components: &[ComponentSpec]) -> Result<(), PluginError> {
    if components.is_empty() {
        return Err(PluginError::InvalidConfig(
            "the release has no components".to_string(),
        ));
    }
    let mut seen = HashSet::new();
    for c in components {
        if c.name.is_empty()
            || c.name
                .chars()
                .any(|ch| ch.is_whitespace() || ch.is_control())
        {
            return Err(PluginError::InvalidConfig(format!(
                "component {:?}: names must be non-empty, without whitespace or control characters",
                c.name
            )));
        }
        if c.image.is_empty()
            || c.image
                .chars()
                .any(|ch| ch.is_whitespace() || ch.is_control())
        {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: image {:?} is not an image reference",
                c.name, c.image
            )));
        }
        if !is_valid_digest(&c.digest) {
            return Err(PluginError::InvalidConfig(format!(
                "component {}: digest {:?} is not sha256:<64 lowercase hex>",
                c.name, c.digest
            )));
        }
        if !seen.insert(c.name.as_str()) {
            return Err(PluginError::InvalidConfig(format!(
                "component {:?} appears twice",
                c.name
            )));
        }
    }
    Ok(())
}

fn wanted_digests(components: &[ComponentSpec]) -> BTreeMap<&str, &str> {
    components
        .iter()
        .map(|c| (c.name.as_str(), c.digest.as_str()))
        .collect()
}

/// group → components, from a job version.
fn group_components(job: &Job) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in job.component_tasks() {
        out.entry(t.group).or_default().push(t.component);
    }
    out
}

impl NomadExecutor {
    /// Nothing is contacted here: every operation reaches its target's Nomad on its own, so an
    /// unreachable cluster never keeps the agent from starting.
    pub fn new(ctx: ExecutorContext) -> Self {
        Self {
            ctx,
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

    async fn template(&self, cfg: &TargetConfig) -> Result<Template, PluginError> {
        match &cfg.template {
            TemplateSource::Inline(t) => Ok(t.clone()),
            TemplateSource::File(path) => {
                template::load(path, &cfg.job_id, &cfg.namespace, cfg.region.as_deref()).await
            }
        }
    }

    fn watch<'a>(
        cfg: &'a TargetConfig,
        client: &'a Client,
        deadline: Instant,
        job: &Job,
        promote: bool,
        progress: &'a dyn ProgressSink,
    ) -> Watch<'a> {
        Watch {
            client,
            job_id: &cfg.job_id,
            deadline,
            timeout_secs: cfg.deploy_timeout.as_secs(),
            auto_promote: promote,
            group_components: group_components(job),
            progress,
        }
    }

    /// Follows the latest deployment of `job`'s current version, if Nomad made one: a job left
    /// alone is only fine when its rollout is.
    async fn settle_current(
        cfg: &TargetConfig,
        client: &Client,
        deadline: Instant,
        job: &Job,
        promote: bool,
        progress: &dyn ProgressSink,
    ) -> Result<(), PluginError> {
        let latest = client
            .latest_deployment(&cfg.job_id, None)
            .await
            .map_err(PluginError::from)?
            .value;
        match latest {
            Some(d) if d.job_version == job.version => {
                if d.status != "successful" {
                    Self::watch(cfg, client, deadline, job, promote, progress)
                        .follow(d)
                        .await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn outcome(
        cfg: &TargetConfig,
        components: &[ComponentSpec],
        job: &Job,
        action_for: impl Fn(&str) -> ComponentAction,
        started: Instant,
    ) -> DeployOutcome {
        let tasks = job.component_tasks();
        let duration_ms = millis(started.elapsed());
        DeployOutcome {
            components: components
                .iter()
                .map(|c| {
                    let places: Vec<String> = tasks
                        .iter()
                        .filter(|t| t.component == c.name)
                        .map(|t| {
                            format!(
                                "nomad://{}/{}/{}/{}",
                                cfg.namespace, cfg.job_id, t.group, t.task
                            )
                        })
                        .collect();
                    ComponentOutcome {
                        name: c.name.clone(),
                        digest: c.digest.clone(),
                        workload_id: places.join(" "),
                        action: action_for(&c.name),
                        duration_ms,
                    }
                })
                .collect(),
            duration_ms,
        }
    }

    /// Deploy with the target lock held; `promote`: promote healthy canaries.
    async fn deploy_locked(
        &self,
        cfg: &TargetConfig,
        spec: &DeploySpec,
        promote: bool,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        // Everything that can refuse the job runs before Nomad is contacted.
        let template = self.template(cfg).await?;
        let mut built = template.build(spec, &cfg.job_id, &cfg.namespace, cfg.region.as_deref())?;
        let client = Client::new(cfg)?;
        let deadline = started + cfg.deploy_timeout;

        let current = client.job(&cfg.job_id).await?;
        if let Some(cur) = &current
            && cur.meta.get(META_SPEC_HASH) == Some(&built.spec_hash)
            && let Some(previous_deployment) = cur.meta.get(META_DEPLOYMENT_ID)
        {
            // Same release, same template: keep the deployment that put it there, so the
            // registration is identical and Nomad keeps the version (and the allocations).
            built.reuse_deployment_id(previous_deployment);
        }
        let registered = client
            .register(
                &cfg.job_id,
                &built.job,
                current.as_ref().map_or(0, |c| c.job_modify_index),
            )
            .await?;
        if !registered.warnings.is_empty() {
            progress.progress(&format!("Nomad warnings: {}", registered.warnings));
        }
        let job = client.job(&cfg.job_id).await?.ok_or_else(|| {
            PluginError::Backend(format!(
                "job {} is gone right after it was registered",
                cfg.job_id
            ))
        })?;
        let unchanged = current.as_ref().is_some_and(|c| c.version == job.version);
        let before: HashSet<String> = current
            .as_ref()
            .map(|c| {
                c.component_tasks()
                    .into_iter()
                    .map(|t| t.component)
                    .collect()
            })
            .unwrap_or_default();

        if unchanged {
            progress.progress(&format!(
                "job {} version {} already is this release (deployment {}): unchanged",
                cfg.job_id,
                job.version,
                built.deployment_id().unwrap_or("?")
            ));
            Self::settle_current(cfg, &client, deadline, &job, promote, progress).await?;
            return Ok(Self::outcome(
                cfg,
                &spec.components,
                &job,
                |_| ComponentAction::Unchanged,
                started,
            ));
        }

        progress.progress(&format!(
            "registered job {} version {} at {} (evaluation {})",
            cfg.job_id,
            job.version,
            client.address(),
            short(&registered.eval_id)
        ));
        let watch = Self::watch(cfg, &client, deadline, &job, promote, progress);
        let deployment = watch.find_deployment(job.version).await?;
        watch.follow(deployment).await?;
        Ok(Self::outcome(
            cfg,
            &spec.components,
            &job,
            |name| {
                if before.contains(name) {
                    ComponentAction::Replaced
                } else {
                    ComponentAction::Created
                }
            },
            started,
        ))
    }

    /// Rollback with the target lock held. Canaries are promoted once healthy whatever
    /// `auto_promote` says: the plane asked for the previous, known-good release, and a rollback
    /// that waits for a human defeats its purpose.
    async fn rollback_locked(
        &self,
        cfg: &TargetConfig,
        previous: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        let client = Client::new(cfg)?;
        let deadline = started + cfg.deploy_timeout;
        let wanted = wanted_digests(&previous.components);

        let Some(current) = client.job(&cfg.job_id).await? else {
            progress.progress(&format!(
                "job {} does not exist; deploying release {} from the template",
                cfg.job_id, previous.release_name
            ));
            return self.deploy_locked(cfg, previous, true, progress).await;
        };
        if current.pins_exactly(&wanted) {
            progress.progress(&format!(
                "job {} version {} already runs release {}'s digests",
                cfg.job_id, current.version, previous.release_name
            ));
            Self::settle_current(cfg, &client, deadline, &current, true, progress).await?;
            return Ok(Self::outcome(
                cfg,
                &previous.components,
                &current,
                |_| ComponentAction::Unchanged,
                started,
            ));
        }

        let versions = client.versions(&cfg.job_id).await?;
        let candidate = versions
            .iter()
            .filter(|v| v.version != current.version && v.pins_exactly(&wanted))
            .max_by_key(|v| {
                (
                    v.meta.get(META_RELEASE_ID) == Some(&previous.release_id),
                    v.stable,
                    v.version,
                )
            });
        let Some(target_version) = candidate else {
            progress.progress(&format!(
                "Nomad keeps no version of job {} with release {}'s digests; deploying it from \
                 the template",
                cfg.job_id, previous.release_name
            ));
            return self.deploy_locked(cfg, previous, true, progress).await;
        };

        progress.progress(&format!(
            "reverting job {} from version {} to version {} (release {}{})",
            cfg.job_id,
            current.version,
            target_version.version,
            target_version
                .meta
                .get(META_RELEASE_ID)
                .map_or("?", String::as_str),
            if target_version.stable {
                ", stable"
            } else {
                ""
            }
        ));
        let reverted = client
            .revert(&cfg.job_id, target_version.version, current.version)
            .await?;
        let job = client.job(&cfg.job_id).await?.ok_or_else(|| {
            PluginError::Backend(format!("job {} is gone right after the revert", cfg.job_id))
        })?;
        progress.progress(&format!(
            "job {} is now version {} (evaluation {})",
            cfg.job_id,
            job.version,
            short(&reverted.eval_id)
        ));
        let watch = Self::watch(cfg, &client, deadline, &job, true, progress);
        let deployment = watch.find_deployment(job.version).await?;
        watch.follow(deployment).await?;
        Ok(Self::outcome(
            cfg,
            &previous.components,
            &job,
            |_| ComponentAction::Replaced,
            started,
        ))
    }

    async fn inventory_of(cfg: &TargetConfig) -> Result<Vec<InventoryItem>, PluginError> {
        let client = Client::new(cfg)?;
        let Some(job) = client.job(&cfg.job_id).await? else {
            return Ok(Vec::new());
        };
        let allocs = client.allocations(&cfg.job_id).await?;
        let mut versions: BTreeMap<u64, Job> = BTreeMap::new();
        if allocs.iter().any(|a| a.job_version != job.version) {
            for v in client.versions(&cfg.job_id).await? {
                versions.insert(v.version, v);
            }
        }
        versions.insert(job.version, job.clone());

        let mut items = Vec::new();
        for alloc in &allocs {
            let active = matches!(alloc.client_status.as_str(), "pending" | "running");
            let current_failure = alloc.job_version == job.version && alloc.desired_status == "run";
            if !active && !current_failure {
                continue;
            }
            let Some(version) = versions.get(&alloc.job_version) else {
                warn!(alloc = %alloc.id, version = alloc.job_version, "allocation of a job version Nomad no longer keeps");
                continue;
            };
            for t in version
                .component_tasks()
                .into_iter()
                .filter(|t| t.group == alloc.task_group)
            {
                items.push(InventoryItem {
                    digest: t.digest().to_string(),
                    state: alloc.task_state(&t.task),
                    health: alloc.health(),
                    workload_id: format!("{}/{}", alloc.id, t.task),
                    release_id: version.meta.get(META_RELEASE_ID).cloned(),
                    deployment_id: version.meta.get(META_DEPLOYMENT_ID).cloned(),
                    component: t.component,
                });
            }
        }
        // A component of the job with no allocation at all is reported too: it should run.
        for t in job.component_tasks() {
            if items.iter().any(|i| i.component == t.component) {
                continue;
            }
            items.push(InventoryItem {
                digest: t.digest().to_string(),
                state: if job.stop { "stopped" } else { "pending" }.to_string(),
                health: None,
                workload_id: format!(
                    "nomad://{}/{}/{}/{}",
                    cfg.namespace, cfg.job_id, t.group, t.task
                ),
                release_id: job.meta.get(META_RELEASE_ID).cloned(),
                deployment_id: job.meta.get(META_DEPLOYMENT_ID).cloned(),
                component: t.component,
            });
        }
        items.sort_by(|a, b| {
            (a.component.as_str(), a.workload_id.as_str())
                .cmp(&(b.component.as_str(), b.workload_id.as_str()))
        });
        Ok(items)
    }
}

#[async_trait::async_trait]
impl Executor for NomadExecutor {
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
        let cfg = self.parse(&spec.target)?;
        validate_components(&spec.components)?;
        let target = spec.target.name.as_str();
        let lock = self.target_lock(target);
        let _guard = lock.lock().await;
        info!(
            target,
            job = %spec.job_id,
            release = %spec.release_id,
            nomad_job = %cfg.job_id,
            "deploying to nomad"
        );
        let result = self
            .deploy_locked(&cfg, spec, cfg.auto_promote, progress)
            .await;
        match &result {
            Ok(out) => {
                info!(target, job = %spec.job_id, duration_ms = out.duration_ms, "deploy finished")
            }
            Err(e) => warn!(target, job = %spec.job_id, error = %e, "deploy failed"),
        }
        result
    }

    async fn rollback(
        &self,
        previous: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let cfg = self.parse(&previous.target)?;
        validate_components(&previous.components)?;
        let target = previous.target.name.as_str();
        let lock = self.target_lock(target);
        let _guard = lock.lock().await;
        info!(
            target,
            job = %previous.job_id,
            release = %previous.release_id,
            nomad_job = %cfg.job_id,
            "rolling back on nomad"
        );
        let result = self.rollback_locked(&cfg, previous, progress).await;
        if let Err(e) = &result {
            warn!(target, job = %previous.job_id, error = %e, "rollback failed");
        }
        result
    }

    async fn inventory(&self, target: &TargetRef) -> Result<Vec<InventoryItem>, PluginError> {
        let cfg = self.parse(target)?;
        Self::inventory_of(&cfg).await
    }

    /// Every allocation of a wanted component must run its digest and be running and not
    /// unhealthy (the default looks at one workload per component; a job has many).
    async fn health_check(
        &self,
        target: &TargetRef,
        components: &[ComponentSpec],
    ) -> Result<HealthReport, PluginError> {
        let observed = self.inventory(target).await?;
        let components: Vec<ComponentHealth> = components
            .iter()
            .map(|c| {
                let items: Vec<&InventoryItem> =
                    observed.iter().filter(|o| o.component == c.name).collect();
                let (healthy, detail) = if items.is_empty() {
                    (false, "not running".to_string())
                } else if let Some(o) = items.iter().find(|o| o.digest != c.digest) {
                    (
                        false,
                        format!(
                            "{} runs {} instead of {}",
                            o.workload_id, o.digest, c.digest
                        ),
                    )
                } else if let Some(o) = items.iter().find(|o| o.state != "running") {
                    (false, format!("{} is {}", o.workload_id, o.state))
                } else if let Some(o) = items
                    .iter()
                    .find(|o| o.health.as_deref() == Some("unhealthy"))
                {
                    (false, format!("{} fails its health checks", o.workload_id))
                } else {
                    (true, format!("{} allocation(s) running", items.len()))
                };
                ComponentHealth {
                    name: c.name.clone(),
                    healthy,
                    detail,
                }
            })
            .collect();
        Ok(HealthReport {
            healthy: components.iter().all(|c| c.healthy),
            components,
        })
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        let cfg = self.parse(target)?;
        let text = serde_json::to_string(sticker)
            .map_err(|e| PluginError::Sticker(format!("cannot encode the sticker: {e}")))?;
        if text.len() > MAX_STICKER_BYTES {
            return Err(PluginError::Sticker(format!(
                "the sticker is {} bytes; Nomad variables hold at most 64 KiB",
                text.len()
            )));
        }
        let client = Client::new(&cfg)?;
        let mut items = Map::new();
        items.insert(STICKER_ITEM.to_string(), Value::String(text));
        client.put_variable(&cfg.sticker_path, &items).await?;
        info!(target = %target.name, path = %cfg.sticker_path, "sticker written to a Nomad variable");
        Ok(())
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        let cfg = self.parse(target)?;
        let client = Client::new(&cfg)?;
        let Some(variable) = client.variable(&cfg.sticker_path).await? else {
            return Ok(None);
        };
        let path = &cfg.sticker_path;
        let text = variable.items.get(STICKER_ITEM).ok_or_else(|| {
            PluginError::Sticker(format!(
                "Nomad variable {path} has no {STICKER_ITEM:?} item"
            ))
        })?;
        let sticker: VersionSticker = serde_json::from_str(text).map_err(|e| {
            PluginError::Sticker(format!("Nomad variable {path}: not a Stella sticker: {e}"))
        })?;
        if sticker.schema != STICKER_SCHEMA {
            return Err(PluginError::Sticker(format!(
                "Nomad variable {path} has schema {:?}, expected {STICKER_SCHEMA:?}",
                sticker.schema
            )));
        }
        Ok(Some(sticker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(name: &str, digest: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: "demo/app:1".to_string(),
            digest: digest.to_string(),
        }
    }

    #[test]
    fn components_are_validated() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(validate_components(&[component("web", &d), component("api", &d)]).is_ok());
        assert!(validate_components(&[]).is_err());
        assert!(validate_components(&[component("web", &d), component("web", &d)]).is_err());
        assert!(validate_components(&[component("a b", &d)]).is_err());
        assert!(validate_components(&[component("", &d)]).is_err());
        assert!(validate_components(&[component("web", "latest")]).is_err());
        let mut bad = component("web", &d);
        bad.image = String::new();
        assert!(validate_components(&[bad]).is_err());
    }
}
