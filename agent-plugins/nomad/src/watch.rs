//! Following a Nomad deployment to its end with blocking queries: each request returns as soon
//! as Nomad's index moves (or after the wait), so status changes are seen at once without
//! polling the servers in a tight loop.

use std::collections::BTreeMap;
use std::time::Duration;

use stella_plugin_sdk::{PluginError, ProgressSink};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::api::{Deployment, short};
use crate::client::{Blocking, Client, Failure};

/// Longest single blocking query; Nomad's own default is 5 minutes, shorter keeps a dead
/// connection from going unnoticed for long.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Pause before repeating a read that failed transiently (a leader election takes seconds).
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// What a watch needs besides the client.
pub(crate) struct Watch<'a> {
    pub client: &'a Client,
    pub job_id: &'a str,
    pub deadline: Instant,
    pub timeout_secs: u64,
    pub auto_promote: bool,
    /// group → components it runs, to name the components of a failed group.
    pub group_components: BTreeMap<String, Vec<String>>,
    pub progress: &'a dyn ProgressSink,
}

/// Next index to block on. Nomad's docs: an index that goes backwards (a server restored from
/// a snapshot) means starting over; 0 must never be used to block.
fn next_index(previous: u64, reported: u64) -> u64 {
    if reported < previous {
        1
    } else {
        reported.max(1)
    }
}

impl Watch<'_> {
    fn remaining(&self) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Runs a read, repeating it while it fails transiently and the deadline allows: a Nomad
    /// leader election or a dropped connection must not fail a rollout that is going fine.
    async fn read<T, F, Fut>(&self, what: &str, attempt: F) -> Result<T, PluginError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut failures = 0u32;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(f) if f.transient && self.remaining().is_some_and(|r| r > RETRY_PAUSE) => {
                    failures += 1;
                    warn!(job = self.job_id, error = %f.error, "reading {what} failed; retrying");
                    if failures == 1 || failures.is_multiple_of(10) {
                        self.progress.progress(&format!(
                            "reading {what} from Nomad failed ({}); retrying",
                            f.error
                        ));
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    fn blocking(&self, index: u64) -> Option<Blocking> {
        let wait = self.remaining()?.min(MAX_WAIT);
        Some(Blocking {
            index,
            // Whole seconds on the wire; never below one.
            wait: Duration::from_secs(wait.as_secs().max(1)),
        })
    }

    /// Waits for the deployment Nomad creates for `version` of the job.
    pub(crate) async fn find_deployment(&self, version: u64) -> Result<Deployment, PluginError> {
        let mut index = 0;
        loop {
            let blocking = if index == 0 {
                None
            } else {
                match self.blocking(index) {
                    Some(b) => Some(b),
                    None => {
                        return Err(PluginError::Timeout {
                            what: format!(
                                "Nomad created no deployment for version {version} of job {} \
                                 (does the job have an update block? only service jobs get \
                                 deployments)",
                                self.job_id
                            ),
                            seconds: self.timeout_secs,
                        });
                    }
                }
            };
            let answer = self
                .read("the job's deployment", || {
                    self.client.latest_deployment(self.job_id, blocking)
                })
                .await?;
            match answer.value {
                Some(d) if d.job_version == version => return Ok(d),
                Some(d) if d.job_version > version => {
                    return Err(PluginError::Backend(format!(
                        "job {} was changed again (version {}) before Stella's version {version} \
                         was rolled out",
                        self.job_id, d.job_version
                    )));
                }
                _ => {}
            }
            index = next_index(index, answer.index);
        }
    }

    /// Follows `deployment` until it succeeds; promotes canaries when asked to; on failure,
    /// cancellation or timeout returns an error (on timeout after marking it failed in Nomad).
    pub(crate) async fn follow(
        &self,
        mut deployment: Deployment,
    ) -> Result<Deployment, PluginError> {
        let id = deployment.id.clone();
        let mut index = 0;
        let mut last_line = String::new();
        let mut promoted = false;
        let mut told_waiting = false;
        loop {
            let line = deployment.summary();
            if line != last_line {
                self.progress.progress(&line);
                info!(job = self.job_id, deployment = %id, status = %deployment.status, "{line}");
                last_line = line;
            }
            match deployment.status.as_str() {
                "successful" => return Ok(deployment),
                "failed" | "cancelled" => return Err(self.failure(&deployment).await),
                _ => {}
            }
            let waiting = deployment.awaiting_promotion();
            if !waiting.is_empty() && deployment.canaries_healthy() {
                // A job whose groups promote themselves needs nothing from Stella.
                let self_promoting = deployment
                    .task_groups
                    .iter()
                    .filter(|(n, _)| waiting.contains(&n.as_str()))
                    .all(|(_, s)| s.auto_promote);
                if self.auto_promote && !self_promoting && !promoted {
                    self.progress.progress(&format!(
                        "deployment {}: canaries healthy, promoting {}",
                        short(&id),
                        waiting.join(", ")
                    ));
                    if let Err(e) = self.client.promote(&id).await {
                        // Someone (or Nomad itself) may have promoted in between.
                        let now = self
                            .read("the deployment", || self.client.deployment(&id, None))
                            .await?
                            .value;
                        if now
                            .as_ref()
                            .is_none_or(|d| !d.awaiting_promotion().is_empty())
                        {
                            return Err(e);
                        }
                    }
                    promoted = true;
                } else if !self.auto_promote && !self_promoting && !told_waiting {
                    self.progress.progress(&format!(
                        "deployment {}: canaries healthy; waiting for a promotion \
                         (auto_promote is false)",
                        short(&id)
                    ));
                    told_waiting = true;
                }
            }
            let Some(blocking) = self.blocking(index) else {
                return Err(self.time_out(&deployment).await);
            };
            // The first look is immediate: the deployment handed in may be a little stale.
            let blocking = (index != 0).then_some(blocking);
            let answer = self
                .read("the deployment", || self.client.deployment(&id, blocking))
                .await?;
            deployment = answer.value.ok_or_else(|| {
                PluginError::Backend(format!(
                    "deployment {id} of job {} disappeared from Nomad",
                    self.job_id
                ))
            })?;
            index = next_index(index, answer.index);
        }
    }

    async fn time_out(&self, deployment: &Deployment) -> PluginError {
        let id = &deployment.id;
        self.progress.progress(&format!(
            "deployment {} did not finish within {}s; marking it failed",
            short(id),
            self.timeout_secs
        ));
        let marked = match self.client.fail_deployment(id).await {
            Ok(()) => "marked failed in Nomad".to_string(),
            Err(e) => {
                warn!(deployment = %id, error = %e, "cannot mark the deployment failed");
                format!("could not mark it failed: {e}")
            }
        };
        PluginError::Timeout {
            what: format!(
                "deployment {id} of job {} version {} ({}; {marked})",
                self.job_id,
                deployment.job_version,
                deployment.summary()
            ),
            seconds: self.timeout_secs,
        }
    }

    async fn failure(&self, deployment: &Deployment) -> PluginError {
        let mut groups: Vec<&str> = deployment
            .task_groups
            .iter()
            .filter(|(_, s)| s.unhealthy_allocs > 0)
            .map(|(n, _)| n.as_str())
            .collect();
        if groups.is_empty() {
            groups = deployment.task_groups.keys().map(String::as_str).collect();
        }
        let mut components: Vec<&str> = groups
            .iter()
            .flat_map(|g| self.group_components.get(*g).into_iter().flatten())
            .map(String::as_str)
            .collect();
        components.sort_unstable();
        components.dedup();
        // The failing allocations' task events are the closest thing to a log Nomad's API
        // offers without a second (client) endpoint.
        let log_tail = match self.client.allocations(self.job_id).await {
            Ok(allocs) => {
                let lines: Vec<String> = allocs
                    .iter()
                    .filter(|a| a.job_version == deployment.job_version)
                    .filter(|a| {
                        a.client_status == "failed"
                            || a.deployment_status
                                .as_ref()
                                .is_some_and(|s| s.healthy == Some(false))
                    })
                    .take(5)
                    .map(|a| a.describe_failure())
                    .collect();
                if lines.is_empty() {
                    "(no failed allocations reported)".to_string()
                } else {
                    lines.join("\n")
                }
            }
            Err(e) => format!("(cannot list allocations: {e})"),
        };
        PluginError::Unhealthy {
            component: if components.is_empty() {
                format!("job {}", self.job_id)
            } else {
                components.join(", ")
            },
            detail: format!(
                "Nomad deployment {} of job {} version {} {}: {}",
                deployment.id,
                self.job_id,
                deployment.job_version,
                deployment.status_text(),
                deployment.groups_summary()
            ),
            log_tail,
        }
    }
}
