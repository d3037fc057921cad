//! The executors this agent runs, keyed by capability. Which exist depends on the host: docker
//! and compose only when a Docker engine (and a compose tool) answers; the remote-API executors
//! (ssh, winrm, ecs, nomad) need nothing local — each target names its endpoint, and the
//! credentials live in files or environment variables on this host.

use std::collections::BTreeMap;
use std::sync::Arc;

use stella_plugin_sdk::{Executor, ExecutorContext};

use crate::config::DataDir;

pub type Executors = BTreeMap<String, Arc<dyn Executor>>;

/// Every executor kind this agent build knows.
pub const KINDS: &[&str] = &["docker", "compose", "ssh", "winrm", "ecs", "nomad"];

async fn build(kind: &str, ctx: ExecutorContext) -> Result<Arc<dyn Executor>, String> {
    let exec: Arc<dyn Executor> = match kind {
        "docker" => Arc::new(
            stella_plugin_docker::DockerExecutor::connect(ctx)
                .await
                .map_err(|e| format!("no Docker engine reachable: {e}"))?,
        ),
        "compose" => Arc::new(
            stella_plugin_compose::ComposeExecutor::connect(ctx)
                .await
                .map_err(|e| format!("no Docker engine with a compose tool: {e}"))?,
        ),
        "ssh" => Arc::new(stella_plugin_ssh::SshExecutor::new(ctx)),
        "winrm" => Arc::new(stella_plugin_winrm::WinrmExecutor::new(ctx)),
        "ecs" => Arc::new(stella_plugin_ecs::EcsExecutor::new(ctx)),
        "nomad" => Arc::new(stella_plugin_nomad::NomadExecutor::new(ctx)),
        other => return Err(format!("unknown executor kind {other:?}")),
    };
    Ok(exec)
}

pub async fn detect(dir: &DataDir, disabled: &[String]) -> Executors {
    let mut out: Executors = BTreeMap::new();
    for kind in KINDS {
        if disabled.iter().any(|d| d == kind) {
            continue;
        }
        let ctx = ExecutorContext {
            state_dir: dir.executor_dir(kind),
        };
        match build(kind, ctx).await {
            Ok(exec) => {
                out.insert((*kind).to_string(), exec);
            }
            Err(why) => {
                tracing::warn!(kind, reason = %why, "executor unavailable; its capability is off")
            }
        }
    }
    out
}

pub fn capabilities(executors: &Executors) -> Vec<String> {
    executors.keys().cloned().collect()
}

/// Work this agent does itself, with no executor (`steps.rs`): HTTP health probes are offered
/// unless `--disable health-check`; scripts only with `--allow-scripts` (and not when
/// `--disable script`), because a script is arbitrary code on this host, and a host that runs
/// containers for Stella has not thereby agreed to run commands for it.
pub fn step_capabilities(disabled: &[String], allow_scripts: bool) -> Vec<String> {
    stella_pki::STEP_CAPABILITIES
        .iter()
        .filter(|kind| **kind != "script" || allow_scripts)
        .filter(|kind| !disabled.iter().any(|d| d == *kind))
        .map(|kind| kind.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_on_by_default_and_scripts_are_opt_in() {
        let none: Vec<String> = Vec::new();
        assert_eq!(step_capabilities(&none, false), ["health-check"]);
        assert_eq!(step_capabilities(&none, true), ["health-check", "script"]);
        let disabled = vec!["script".to_string(), "health-check".to_string()];
        assert!(step_capabilities(&disabled, true).is_empty());
    }
}
