//! The `ssh` executor: puts releases on hosts the agent reaches over SSH (russh, ring crypto).
//!
//! Two modes:
//! - `script` (the default when `deploy_script` is set): runs the operator's script on the
//!   remote host with `/bin/sh -c`, handing it the release in environment variables
//!   (`STELLA_RELEASE_ID`, `STELLA_RELEASE_NAME`, `STELLA_DEPLOYMENT_ID`, `STELLA_JOB_ID`,
//!   `STELLA_TARGET`, `STELLA_COMPONENTS` as JSON, and `STELLA_IMAGE_<NAME>=repo@digest` per
//!   component). Its output is streamed as progress.
//! - `docker`: the docker executor's semantics through the remote host's `docker` CLI.
//!
//! Target config keys: `host`, `port` (22), `user`, `private_key_file` or `private_key_env`,
//! `host_key` (pinned: any other server key is refused), `sticker_path`
//! (`/var/lib/stella/stella.version.json`), `mode`, `deploy_script`, `inventory_script`,
//! `timeout_secs` (300), `connect_timeout_secs` (10).
//!
//! Remote requirements: a POSIX login shell for the user (commands are sent as shell text and
//! the release travels as `env NAME='value'` arguments, since sshd drops `env` requests not in
//! its `AcceptEnv`), `/bin/sh`, `kill`, SFTP enabled (`Subsystem sftp`) for the sticker, and in
//! mode `docker` the `docker` CLI on the user's PATH.
//!
//! Credentials live on the agent host only: the key is read from a file or the agent's
//! environment when a connection is made and is never logged; neither are environment values.
//! The sticker is kept on the target host, written over SFTP (temp file, then rename).

mod config;
mod conn;
mod docker;
mod naming;
mod sticker;

use stella_plugin_sdk::digest::repository_of;
use stella_plugin_sdk::naming::{container_name, sanitize};
use stella_plugin_sdk::validate::{self, DistinctNames};
use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, ComponentSpec, DeployOutcome, DeploySpec, Executor,
    ExecutorContext, InventoryItem, PluginError, ProgressSink, TargetLocks, TargetRef,
    VersionSticker, millis, sort_inventory,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{Mode, TargetConfig};
use crate::conn::{Connection, RunError};
use crate::docker::RemoteDocker;
use crate::naming::{image_env_name, quote};

pub use crate::config::{
    DEFAULT_CONNECT_TIMEOUT_SECS, DEFAULT_PORT, DEFAULT_STICKER_PATH, DEFAULT_TIMEOUT_SECS,
};

/// The executor kind this crate implements.
pub const KIND: &str = "ssh";

/// Labels of containers created in mode `docker`; the same as the docker executor's (the SDK's
/// [`stella_plugin_sdk::labels`]).
pub use stella_plugin_sdk::labels::{
    COMPONENT as LABEL_COMPONENT, DEPLOYMENT_ID as LABEL_DEPLOYMENT_ID, DIGEST as LABEL_DIGEST,
    IMAGE as LABEL_IMAGE, JOB_ID as LABEL_JOB_ID, MANAGED as LABEL_MANAGED,
    RELEASE_ID as LABEL_RELEASE_ID, RELEASE_NAME as LABEL_RELEASE_NAME, TARGET as LABEL_TARGET,
};

/// Runs releases on hosts reached over SSH.
pub struct SshExecutor {
    ctx: ExecutorContext,
    /// Two jobs for the same target must not interleave their steps.
    target_locks: TargetLocks,
}

impl std::fmt::Debug for SshExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshExecutor")
            .field("state_dir", &self.ctx.state_dir)
            .finish_non_exhaustive()
    }
}

/// One line an `inventory_script` prints.
/// Further fields are ignored, so that scripts may print more than Stella reads.
#[derive(Debug, serde::Deserialize)]
struct InventoryLine {
    component: String,
    digest: String,
    state: String,
    #[serde(default)]
    health: Option<String>,
    #[serde(default)]
    workload_id: Option<String>,
}

impl SshExecutor {
    /// Nothing is contacted here: every operation connects to its target on its own, so an
    /// unreachable host never keeps the agent from starting.
    pub fn new(ctx: ExecutorContext) -> Self {
        Self {
            ctx,
            target_locks: TargetLocks::default(),
        }
    }

    fn parse(&self, target: &TargetRef) -> Result<TargetConfig, PluginError> {
        validate::target(target, KIND)?;
        config::parse(&target.config)
    }

    async fn deploy_script(
        &self,
        conn: &Connection,
        cfg: &TargetConfig,
        script: &str,
        spec: &DeploySpec,
        progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let started = Instant::now();
        let dest = conn.destination().to_string();
        let command = script_command(spec, script)?;
        // One budget for the whole job, so that a stalled SFTP server cannot stretch it.
        let deadline = Instant::now() + cfg.timeout;
        // Only to tell created from replaced; the script runs either way (it is the ensure).
        let previous = match tokio::time::timeout_at(
            deadline,
            sticker::read(conn, &cfg.sticker_path, cfg.timeout.as_secs()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                warn!(%dest, error = %e, "cannot read the previous sticker; reporting components as created");
                None
            }
            Err(_) => {
                return Err(PluginError::Timeout {
                    what: format!("reading the sticker on {dest}"),
                    seconds: cfg.timeout.as_secs(),
                });
            }
        };
        progress.progress(&format!("running deploy script on {dest}"));
        info!(%dest, job = %spec.job_id, "running deploy script");
        let mut forward = |line: &str| progress.progress(line);
        let out = conn
            .run(&command, deadline, Some(&mut forward), false)
            .await
            .map_err(|e| match e {
                RunError::TimedOut => {
                    warn!(%dest, seconds = cfg.timeout.as_secs(), "deploy script timed out; killed");
                    PluginError::Timeout {
                        what: format!("deploy script on {dest} (killed)"),
                        seconds: cfg.timeout.as_secs(),
                    }
                }
                RunError::Ssh(m) => PluginError::Backend(format!("deploy script: {m}")),
            })?;
        if !out.success() {
            warn!(%dest, exit = %out.exit, "deploy script failed");
            return Err(PluginError::Backend(format!(
                "deploy script on {dest} failed with {}; last {} line(s) of output:\n{}",
                out.exit,
                out.tail.len(),
                out.tail_text()
            )));
        }
        progress.progress(&format!("deploy script on {dest} succeeded"));
        let duration_ms = millis(started.elapsed());
        let components = spec
            .components
            .iter()
            .map(|c| {
                let before = previous
                    .as_ref()
                    .and_then(|s| s.components.iter().find(|p| p.name == c.name));
                let action = match before {
                    None => ComponentAction::Created,
                    // The script ran again as an ensure, but the component's digest and
                    // release did not change.
                    Some(p)
                        if p.digest == c.digest
                            && previous
                                .as_ref()
                                .is_some_and(|s| s.release_id == spec.release_id) =>
                    {
                        ComponentAction::Unchanged
                    }
                    Some(_) => ComponentAction::Replaced,
                };
                ComponentOutcome {
                    name: c.name.clone(),
                    digest: c.digest.clone(),
                    workload_id: script_workload_id(cfg, &c.name),
                    action,
                    duration_ms,
                }
            })
            .collect();
        Ok(DeployOutcome {
            components,
            duration_ms,
        })
    }

    async fn script_inventory(
        &self,
        conn: &Connection,
        cfg: &TargetConfig,
        inventory_script: Option<&str>,
    ) -> Result<Vec<InventoryItem>, PluginError> {
        let dest = conn.destination().to_string();
        let deadline = Instant::now() + cfg.timeout;
        let sticker = tokio::time::timeout_at(
            deadline,
            sticker::read(conn, &cfg.sticker_path, cfg.timeout.as_secs()),
        )
        .await
        .map_err(|_| PluginError::Timeout {
            what: format!("reading the sticker on {dest}"),
            seconds: cfg.timeout.as_secs(),
        })??;
        let Some(script) = inventory_script else {
            // Without a way to look, the sticker is all there is: what was deployed, in an
            // unknown state.
            return Ok(sticker
                .map(|s| {
                    s.components
                        .iter()
                        .map(|c| InventoryItem {
                            component: c.name.clone(),
                            digest: c.digest.clone(),
                            state: "unknown".to_string(),
                            health: None,
                            workload_id: script_workload_id(cfg, &c.name),
                            release_id: Some(s.release_id.clone()),
                            deployment_id: Some(s.deployment_id.clone()),
                        })
                        .collect()
                })
                .unwrap_or_default());
        };
        let command = format!("/bin/sh -c {}", quote(script));
        let out = conn
            .run(&command, deadline, None, true)
            .await
            .map_err(|e| match e {
                RunError::TimedOut => PluginError::Timeout {
                    what: format!("inventory script on {dest} (killed)"),
                    seconds: cfg.timeout.as_secs(),
                },
                RunError::Ssh(m) => PluginError::Backend(format!("inventory script: {m}")),
            })?;
        if !out.success() {
            return Err(PluginError::Backend(format!(
                "inventory script on {dest} failed with {}; last {} line(s) of output:\n{}",
                out.exit,
                out.tail.len(),
                out.tail_text()
            )));
        }
        let mut items = Vec::new();
        for (n, line) in String::from_utf8_lossy(&out.stdout).lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let item: InventoryLine = serde_json::from_str(line).map_err(|e| {
                PluginError::Backend(format!(
                    "inventory script on {dest}: line {} is not {{\"component\",\"digest\",\"state\"}} JSON: {e}",
                    n + 1
                ))
            })?;
            if item.component.is_empty() {
                return Err(PluginError::Backend(format!(
                    "inventory script on {dest}: line {} has an empty component",
                    n + 1
                )));
            }
            // The sticker says which release put a digest there; it only applies while the
            // component still runs that digest.
            let deployed = sticker.as_ref().filter(|s| {
                s.components
                    .iter()
                    .any(|c| c.name == item.component && c.digest == item.digest)
            });
            items.push(InventoryItem {
                workload_id: item
                    .workload_id
                    .unwrap_or_else(|| script_workload_id(cfg, &item.component)),
                component: item.component,
                digest: item.digest,
                state: item.state,
                health: item.health,
                release_id: deployed.map(|s| s.release_id.clone()),
                deployment_id: deployed.map(|s| s.deployment_id.clone()),
            });
        }
        sort_inventory(&mut items);
        Ok(items)
    }
}

/// How script-mode components are named in outcomes and inventory: there is no workload id the
/// executor could know, so the host and component stand in for one.
fn script_workload_id(cfg: &TargetConfig, component: &str) -> String {
    format!("ssh://{}/{component}", cfg.destination())
}

/// `env VAR='value' … /bin/sh -c '<script>'`. The values travel on the command line rather than
/// through SSH `env` requests, which sshd refuses unless each name is in its `AcceptEnv`.
fn script_command(spec: &DeploySpec, script: &str) -> Result<String, PluginError> {
    let components = serde_json::to_string(&spec.components)
        .map_err(|e| PluginError::Backend(format!("cannot encode components: {e}")))?;
    let mut vars: Vec<(String, String)> = vec![
        ("STELLA_TARGET".to_string(), spec.target.name.clone()),
        ("STELLA_JOB_ID".to_string(), spec.job_id.clone()),
        ("STELLA_RELEASE_ID".to_string(), spec.release_id.clone()),
        ("STELLA_RELEASE_NAME".to_string(), spec.release_name.clone()),
        (
            "STELLA_DEPLOYMENT_ID".to_string(),
            spec.deployment_id.clone(),
        ),
        ("STELLA_COMPONENTS".to_string(), components),
    ];
    for c in &spec.components {
        vars.push((
            image_env_name(&c.name),
            format!("{}@{}", repository_of(&c.image), c.digest),
        ));
    }
    let mut command = String::from("env");
    for (name, value) in &vars {
        if value.contains('\0') {
            return Err(PluginError::InvalidConfig(format!(
                "{name}: value must not contain NUL"
            )));
        }
        command.push(' ');
        command.push_str(name);
        command.push('=');
        command.push_str(&quote(value));
    }
    command.push_str(" /bin/sh -c ");
    command.push_str(&quote(script));
    Ok(command)
}

fn validate_components(components: &[ComponentSpec], mode: &Mode) -> Result<(), PluginError> {
    let mut names = DistinctNames::default();
    for c in components {
        // A command line cannot carry NUL. (An empty name is reported as such first.)
        if !c.name.is_empty() && (c.name.contains('\0') || c.image.contains('\0')) {
            return Err(PluginError::InvalidConfig(format!(
                "component {:?}: name and image must not contain NUL",
                c.name
            )));
        }
        validate::component(c)?;
        // Two components mapping to one container (docker) or one variable (script) would
        // overwrite each other.
        let (key, what) = match mode {
            Mode::Docker => (sanitize(&c.name), "container name"),
            Mode::Script { .. } => (image_env_name(&c.name), "environment variable"),
        };
        names.insert(key, &c.name, what)?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Executor for SshExecutor {
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
        validate_components(&spec.components, &cfg.mode)?;
        let target = spec.target.name.as_str();
        let _guard = self.target_locks.lock(target).await;
        info!(
            target,
            job = %spec.job_id,
            release = %spec.release_id,
            components = spec.components.len(),
            "deploying over ssh"
        );
        let conn = Connection::open(&cfg).await?;
        progress.progress(&format!(
            "connected to {} (host key {})",
            conn.destination(),
            cfg.host_key_fingerprint()
        ));
        let result = match &cfg.mode {
            Mode::Script { deploy_script, .. } => {
                self.deploy_script(&conn, &cfg, deploy_script, spec, progress)
                    .await
            }
            Mode::Docker => {
                let deadline = Instant::now() + cfg.timeout;
                RemoteDocker::new(&conn, deadline, cfg.timeout.as_secs())
                    .deploy(spec, progress)
                    .await
            }
        };
        conn.close().await;
        match &result {
            Ok(out) => {
                info!(target, job = %spec.job_id, duration_ms = out.duration_ms, "deploy finished")
            }
            Err(e) => warn!(target, job = %spec.job_id, error = %e, "deploy failed"),
        }
        result
    }

    async fn inventory(&self, target: &TargetRef) -> Result<Vec<InventoryItem>, PluginError> {
        let cfg = self.parse(target)?;
        let conn = Connection::open(&cfg).await?;
        let result = match &cfg.mode {
            Mode::Docker => {
                let deadline = Instant::now() + cfg.timeout;
                RemoteDocker::new(&conn, deadline, cfg.timeout.as_secs())
                    .inventory(&target.name)
                    .await
            }
            Mode::Script {
                inventory_script, ..
            } => {
                self.script_inventory(&conn, &cfg, inventory_script.as_deref())
                    .await
            }
        };
        conn.close().await;
        result
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        let cfg = self.parse(target)?;
        let conn = Connection::open(&cfg).await?;
        let seconds = cfg.timeout.as_secs();
        let result = tokio::time::timeout(
            cfg.timeout,
            sticker::write(&conn, &cfg.sticker_path, sticker, seconds),
        )
        .await
        .unwrap_or_else(|_| {
            Err(PluginError::Timeout {
                what: format!("writing the sticker on {}", conn.destination()),
                seconds,
            })
        });
        conn.close().await;
        result
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        let cfg = self.parse(target)?;
        let conn = Connection::open(&cfg).await?;
        let seconds = cfg.timeout.as_secs();
        let result = tokio::time::timeout(
            cfg.timeout,
            sticker::read(&conn, &cfg.sticker_path, seconds),
        )
        .await
        .unwrap_or_else(|_| {
            Err(PluginError::Timeout {
                what: format!("reading the sticker on {}", conn.destination()),
                seconds,
            })
        });
        conn.close().await;
        result
    }
}

impl SshExecutor {
    /// The container name mode `docker` gives a component of a target.
    pub fn container_name(target: &str, component: &str) -> String {
        container_name(target, component)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(components: Vec<ComponentSpec>) -> DeploySpec {
        DeploySpec {
            job_id: "job-1".to_string(),
            deployment_id: "dep-1".to_string(),
            release_id: "rel-1".to_string(),
            release_name: "it's release 1".to_string(),
            target: TargetRef {
                name: "web-1".to_string(),
                kind: KIND.to_string(),
                config: serde_json::Value::Null,
            },
            components,
            strategy: Default::default(),
        }
    }

    fn component(name: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: "registry:5000/demo/app:1".to_string(),
            digest: format!("sha256:{}", "b".repeat(64)),
        }
    }

    #[test]
    fn script_command_exports_the_release() {
        let s = spec(vec![component("web-api")]);
        let cmd = script_command(&s, "echo \"$STELLA_RELEASE_NAME\"; env").unwrap();
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .env_clear()
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("it's release 1\n"), "{text}");
        assert!(text.contains("STELLA_RELEASE_ID=rel-1\n"), "{text}");
        assert!(text.contains("STELLA_DEPLOYMENT_ID=dep-1\n"), "{text}");
        assert!(
            text.contains(&format!(
                "STELLA_IMAGE_WEB_API=registry:5000/demo/app@sha256:{}\n",
                "b".repeat(64)
            )),
            "{text}"
        );
        let components = text
            .lines()
            .find_map(|l| l.strip_prefix("STELLA_COMPONENTS="))
            .unwrap();
        let parsed: Vec<ComponentSpec> = serde_json::from_str(components).unwrap();
        assert_eq!(parsed, s.components);
    }

    #[test]
    fn components_are_validated() {
        let script = Mode::Script {
            deploy_script: "true".to_string(),
            inventory_script: None,
        };
        assert!(validate_components(&[component("web"), component("api")], &script).is_ok());
        // Same variable in script mode, different containers in docker mode.
        assert!(validate_components(&[component("a-b"), component("a_b")], &script).is_err());
        assert!(validate_components(&[component("a-b"), component("a_b")], &Mode::Docker).is_ok());
        assert!(validate_components(&[component("a/b"), component("a_b")], &Mode::Docker).is_err());
        let mut bad = component("web");
        bad.digest = "latest".to_string();
        assert!(validate_components(&[bad], &Mode::Docker).is_err());
        assert!(validate_components(&[component("")], &Mode::Docker).is_err());
    }
}
