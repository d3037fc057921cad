//! The executors this agent runs, keyed by capability. Which exist depends on the host: the
//! docker executor only when a Docker engine answers.

use std::collections::BTreeMap;
use std::sync::Arc;

use stella_plugin_sdk::{Executor, ExecutorContext};

use crate::config::DataDir;

pub type Executors = BTreeMap<String, Arc<dyn Executor>>;

pub async fn detect(dir: &DataDir, disabled: &[String]) -> Executors {
    let mut out: Executors = BTreeMap::new();
    if !disabled.iter().any(|d| d == "docker") {
        let ctx = ExecutorContext {
            state_dir: dir.executor_dir("docker"),
        };
        match stella_plugin_docker::DockerExecutor::connect(ctx).await {
            Ok(exec) => {
                out.insert("docker".to_string(), Arc::new(exec));
            }
            Err(e) => {
                tracing::warn!(error = %e, "no Docker engine reachable; the docker capability is off")
            }
        }
    }
    if !disabled.iter().any(|d| d == "compose") {
        let ctx = ExecutorContext {
            state_dir: dir.executor_dir("compose"),
        };
        match stella_plugin_compose::ComposeExecutor::connect(ctx).await {
            Ok(exec) => {
                out.insert("compose".to_string(), Arc::new(exec));
            }
            Err(e) => {
                tracing::warn!(error = %e, "no Docker engine with a compose tool; the compose capability is off")
            }
        }
    }
    if !disabled.iter().any(|d| d == "ssh") {
        // ssh needs nothing local: each target names its host and the key file on this host.
        let ctx = ExecutorContext {
            state_dir: dir.executor_dir("ssh"),
        };
        out.insert(
            "ssh".to_string(),
            Arc::new(stella_plugin_ssh::SshExecutor::new(ctx)),
        );
    }
    out
}

pub fn capabilities(executors: &Executors) -> Vec<String> {
    executors.keys().cloned().collect()
}
