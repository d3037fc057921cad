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
            Err(e) => tracing::warn!(error = %e, "no Docker engine reachable; the docker capability is off"),
        }
    }
    out
}

pub fn capabilities(executors: &Executors) -> Vec<String> {
    executors.keys().cloned().collect()
}
