//! The one simulated part of the fleet: an executor of kind `docker` that does nothing.
//!
//! Everything around it is the real agent (enrollment, mTLS session, DSSE verification, journal,
//! spool, signed receipts). It records when each job started and how often it ran, so the
//! benchmark can measure pickup latency and prove that no job ran twice.

use std::collections::HashMap;
use std::sync::Mutex;

use stella_plugin_sdk::{
    ComponentAction, ComponentOutcome, DeployOutcome, DeploySpec, Executor, InventoryItem,
    PluginError, ProgressSink, TargetRef, VersionSticker,
};

/// What the no-op executor saw of one job.
#[derive(Debug, Clone, Copy)]
pub struct Execution {
    /// How many times `deploy` ran for this job id (must be exactly 1).
    pub count: u32,
    /// Unix milliseconds of the first start.
    pub first_start_ms: i64,
}

#[derive(Default)]
pub struct NoopExecutor {
    executions: Mutex<HashMap<String, Execution>>,
    /// Version stickers, in memory, keyed by target name (target names are unique per plane).
    stickers: Mutex<HashMap<String, VersionSticker>>,
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl NoopExecutor {
    /// A copy of every execution seen so far, by job id.
    pub fn executions(&self) -> HashMap<String, Execution> {
        lock(&self.executions).clone()
    }

    pub fn executed_jobs(&self) -> usize {
        lock(&self.executions).len()
    }
}

#[async_trait::async_trait]
impl Executor for NoopExecutor {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn validate_config(&self, _target: &TargetRef) -> Result<(), PluginError> {
        Ok(())
    }

    async fn deploy(
        &self,
        spec: &DeploySpec,
        _progress: &dyn ProgressSink,
    ) -> Result<DeployOutcome, PluginError> {
        let now = now_ms();
        lock(&self.executions)
            .entry(spec.job_id.clone())
            .and_modify(|e| e.count += 1)
            .or_insert(Execution {
                count: 1,
                first_start_ms: now,
            });
        Ok(DeployOutcome {
            components: spec
                .components
                .iter()
                .map(|c| ComponentOutcome {
                    name: c.name.clone(),
                    digest: c.digest.clone(),
                    workload_id: format!("noop-{}", spec.target.name),
                    action: ComponentAction::Unchanged,
                    duration_ms: 0,
                })
                .collect(),
            duration_ms: 0,
        })
    }

    async fn inventory(&self, _target: &TargetRef) -> Result<Vec<InventoryItem>, PluginError> {
        Ok(Vec::new())
    }

    async fn write_sticker(
        &self,
        target: &TargetRef,
        sticker: &VersionSticker,
    ) -> Result<(), PluginError> {
        lock(&self.stickers).insert(target.name.clone(), sticker.clone());
        Ok(())
    }

    async fn read_sticker(
        &self,
        target: &TargetRef,
    ) -> Result<Option<VersionSticker>, PluginError> {
        Ok(lock(&self.stickers).get(&target.name).cloned())
    }
}
