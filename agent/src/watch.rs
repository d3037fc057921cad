//! Inventory on change: executors that can follow their backend's events (docker: engine
//! events) say when a target's workloads changed, and the agent reports that target at once
//! instead of at the next periodic report.
//!
//! A deploy or a `docker stop` produces a burst of events (kill, die, stop, destroy, create,
//! start...): changes are coalesced for a short quiet period and each target is reported once
//! per burst.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use stella_plugin_sdk::{ChangeSink, Executor, WatchEnd};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::executors::Executors;

/// How long the events of one burst may be apart.
const QUIET: Duration = Duration::from_millis(250);
/// Pause before watching again after the stream closed; doubles on failures up to the cap.
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// Which targets changed in one burst.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// A change that may concern any target (a foreign workload): report every target.
    pub all: bool,
    pub targets: BTreeSet<String>,
}

impl Changes {
    fn add(&mut self, change: Option<String>) {
        match change {
            Some(target) => {
                self.targets.insert(target);
            }
            None => self.all = true,
        }
    }
}

struct ChannelSink(mpsc::UnboundedSender<Option<String>>);

impl ChangeSink for ChannelSink {
    fn changed(&self, target: Option<&str>) {
        let _ = self.0.send(target.map(str::to_string));
    }
}

/// Watches every executor that can, and calls `report` once per burst of changes. The
/// returned task (and the watchers it owns) stops when aborted.
pub fn spawn<F, Fut>(executors: &Executors, report: F) -> JoinHandle<()>
where
    F: Fn(Changes) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let watchers: Vec<JoinHandle<()>> = executors
        .iter()
        .map(|(kind, executor)| {
            tokio::spawn(watch_executor(kind.clone(), executor.clone(), tx.clone()))
        })
        .collect();
    drop(tx);
    tokio::spawn(async move {
        let _watchers = AbortOnDrop(watchers);
        coalesce(rx, report).await;
    })
}

struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for handle in &self.0 {
            handle.abort();
        }
    }
}

async fn watch_executor(
    kind: String,
    executor: Arc<dyn Executor>,
    tx: mpsc::UnboundedSender<Option<String>>,
) {
    let sink = ChannelSink(tx);
    let mut pause = RETRY_BASE;
    loop {
        match executor.watch(&sink).await {
            Ok(WatchEnd::Unsupported) => return,
            Ok(WatchEnd::Closed) => {
                tracing::info!(kind, "executor event stream closed; watching again");
                pause = RETRY_BASE;
            }
            Err(e) => {
                tracing::warn!(kind, error = %e, ?pause, "cannot watch the executor's backend; retrying");
            }
        }
        // Whatever changed while nobody watched: report everything once watching resumes.
        let _ = sink.0.send(None);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_CAP);
    }
}

/// Collects changes until none came for [`QUIET`], then reports them; until every watcher is
/// gone.
async fn coalesce<F, Fut>(mut rx: mpsc::UnboundedReceiver<Option<String>>, report: F)
where
    F: Fn(Changes) -> Fut,
    Fut: Future<Output = ()>,
{
    while let Some(first) = rx.recv().await {
        let mut changes = Changes::default();
        changes.add(first);
        while let Ok(Some(next)) = tokio::time::timeout(QUIET, rx.recv()).await {
            changes.add(next);
        }
        report(changes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn a_burst_is_reported_once_with_every_target_it_touched() {
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let collected = seen.clone();
        let task = tokio::spawn(coalesce(rx, move |c: Changes| {
            let collected = collected.clone();
            async move { collected.lock().unwrap().push(c) }
        }));
        for t in ["a", "b", "a"] {
            tx.send(Some(t.to_string())).unwrap();
        }
        drop(tx);
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(!seen[0].all);
        assert_eq!(
            seen[0]
                .targets
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[tokio::test]
    async fn a_foreign_change_asks_for_every_target() {
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let collected = seen.clone();
        let task = tokio::spawn(coalesce(rx, move |c: Changes| {
            let collected = collected.clone();
            async move { collected.lock().unwrap().push(c) }
        }));
        tx.send(Some("a".to_string())).unwrap();
        tx.send(None).unwrap();
        drop(tx);
        task.await.unwrap();
        assert!(seen.lock().unwrap()[0].all);
    }
}
