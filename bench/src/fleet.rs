//! The simulated fleet: N real agents in this process, each with its own data directory, key,
//! certificate (enrolled with its own one-time join token) and mTLS session, all in one tokio
//! runtime. Only the executor is simulated (`noop.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use serde_json::json;
use stella_agent::config::DataDir;
use stella_agent::enroll::{EnrollError, EnrollOptions};
use stella_agent::executors::Executors;
use stella_plugin_sdk::Executor;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::api::Api;
use crate::noop::NoopExecutor;
use crate::track::TRACKER;

/// Enrollments retried because the plane failed them with a storage error.
pub static ENROLL_RETRIES: AtomicUsize = AtomicUsize::new(0);

pub struct Agent {
    pub idx: usize,
    pub id: String,
    pub dir: DataDir,
}

#[derive(Deserialize)]
struct TokenCreated {
    token: String,
    ca_fingerprint: String,
}

/// Prints "what: done/total" to stderr at most every two seconds, and once at the end.
pub struct Progress {
    what: String,
    total: usize,
    done: AtomicUsize,
    start: Instant,
    last: std::sync::Mutex<Instant>,
}

impl Progress {
    pub fn new(what: &str, total: usize) -> Arc<Self> {
        eprintln!("{what}: 0/{total}");
        Arc::new(Self {
            what: what.to_string(),
            total,
            done: AtomicUsize::new(0),
            start: Instant::now(),
            last: std::sync::Mutex::new(Instant::now()),
        })
    }

    pub fn tick(&self) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if done == self.total || last.elapsed() >= Duration::from_secs(2) {
            *last = Instant::now();
            eprintln!(
                "{}: {done}/{} ({:.1}s)",
                self.what,
                self.total,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

pub fn agent_name(idx: usize) -> String {
    format!("bench-{idx:05}")
}

pub fn target_name(idx: usize) -> String {
    format!("bench-t{idx:05}")
}

/// Enrolls `n` agents: one join token each (`POST /api/v1/tokens`), then `stella_agent::enroll`
/// (key and CSR generated here, CA pinned by fingerprint).
pub async fn enroll(
    api: &Arc<Api>,
    root: &Path,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Agent>> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let progress = Progress::new("enrolling agents", n);
    let ids: Vec<(usize, String, PathBuf)> = for_each_concurrent(n, concurrency, progress, |idx| {
        let api = api.clone();
        let dir = root.join(agent_name(idx));
        async move {
            let created: TokenCreated = api
                .post("/api/v1/tokens", &json!({"ttl_secs": 3600, "max_uses": 1}))
                .await
                .context("creating a join token")?;
            let opts = EnrollOptions {
                server: api.base().to_string(),
                token: created.token,
                ca_fingerprint: created.ca_fingerprint,
                name: agent_name(idx),
                labels: BTreeMap::from([("bench".to_string(), "fleet".to_string())]),
                capabilities: vec!["docker".to_string()],
            };
            let mut attempt = 0u32;
            loop {
                match stella_agent::enroll::enroll(&DataDir::new(&dir), opts.clone()).await {
                    Ok(config) => return Ok((idx, config.agent_id, dir)),
                    // The plane answers 500 when concurrent enrollments collide in SQLite
                    // ("database is locked"); the token is not consumed then, so retry.
                    Err(EnrollError::Refused(m)) if m.contains("HTTP 500") && attempt < 50 => {
                        attempt += 1;
                        ENROLL_RETRIES.fetch_add(1, Ordering::Relaxed);
                        let ms = 5 + (idx as u64 * 7 + u64::from(attempt) * 13) % 50;
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("enrolling agent {}", agent_name(idx))));
                    }
                }
            }
        }
    })
    .await?;
    let retries = ENROLL_RETRIES.load(Ordering::Relaxed);
    if retries > 0 {
        eprintln!(
            "note: {retries} enrollment(s) were retried after the plane answered HTTP 500 \
             (SQLite \"database is locked\" between concurrent enrollments)"
        );
    }
    Ok(ids
        .into_iter()
        .map(|(idx, id, dir)| Agent {
            idx,
            id,
            dir: DataDir::new(dir),
        })
        .collect())
}

/// Runs `f(i)` for `0..n` with at most `concurrency` at once, failing on the first error;
/// results come back in index order.
async fn for_each_concurrent<F, Fut, T>(
    n: usize,
    concurrency: usize,
    progress: Arc<Progress>,
    f: F,
) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let fut = f(i);
        let progress = progress.clone();
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            progress.tick();
            r.map(|v| (i, v))
        });
        while let Some(done) = set.try_join_next() {
            let (j, v) = done.map_err(|e| anyhow!("setup task panicked: {e}"))??;
            out[j] = Some(v);
        }
    }
    while let Some(done) = set.join_next().await {
        let (j, v) = done.map_err(|e| anyhow!("setup task panicked: {e}"))??;
        out[j] = Some(v);
    }
    Ok(out.into_iter().flatten().collect())
}

/// One environment, one docker target per agent, one release.
pub async fn create_targets(
    api: &Arc<Api>,
    agents: &[Agent],
    env: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    let _: serde_json::Value = api
        .post("/api/v1/environments", &json!({ "name": env }))
        .await
        .context("creating the environment")?;
    let progress = Progress::new("creating targets", agents.len());
    let agent_ids: Arc<Vec<String>> = Arc::new(agents.iter().map(|a| a.id.clone()).collect());
    let env = env.to_string();
    for_each_concurrent(agents.len(), concurrency, progress, |idx| {
        let api = api.clone();
        let agent_ids = agent_ids.clone();
        let env = env.clone();
        async move {
            let _: serde_json::Value = api
                .post(
                    "/api/v1/targets",
                    &json!({
                        "name": target_name(idx),
                        "env": env,
                        "kind": "docker",
                        "agent": agent_ids[idx],
                    }),
                )
                .await
                .with_context(|| format!("creating target {}", target_name(idx)))?;
            Ok(())
        }
    })
    .await?;
    Ok(())
}

pub async fn create_release(api: &Api, name: &str) -> anyhow::Result<()> {
    let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
    let _: serde_json::Value = api
        .post(
            "/api/v1/releases",
            &json!({
                "name": name,
                "components": [{"name": "app", "image": "bench/noop:1", "digest": digest}],
            }),
        )
        .await
        .context("creating the release")?;
    Ok(())
}

pub struct Fleet {
    pub agents: Vec<Agent>,
    pub executor: Arc<NoopExecutor>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    pub fn new(agents: Vec<Agent>) -> Self {
        let (shutdown, _) = watch::channel(false);
        Self {
            agents,
            executor: Arc::new(NoopExecutor::default()),
            shutdown,
            tasks: Vec::new(),
        }
    }

    /// Starts every agent's runtime (`run_with_executors`), `wave` at a time, each wave waiting
    /// until its sessions are established. Returns the time until all were.
    pub async fn connect_all(
        &mut self,
        wave: usize,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let n = self.agents.len();
        let wave = wave.max(1);
        eprintln!("connecting sessions: 0/{n}");
        let mut next = 0;
        while next < n {
            let end = (next + wave).min(n);
            for idx in next..end {
                self.spawn_agent(idx);
            }
            next = end;
            let mut last_print = Instant::now();
            while TRACKER.up() < next {
                if start.elapsed() > timeout {
                    bail!(
                        "only {}/{next} sessions established after {timeout:?} (see the plane log)",
                        TRACKER.up()
                    );
                }
                if last_print.elapsed() > Duration::from_secs(2) {
                    eprintln!(
                        "connecting sessions: {}/{n} ({:.1}s)",
                        TRACKER.up(),
                        start.elapsed().as_secs_f64()
                    );
                    last_print = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        eprintln!(
            "connecting sessions: {}/{n} ({:.1}s)",
            TRACKER.up(),
            start.elapsed().as_secs_f64()
        );
        Ok(start.elapsed())
    }

    fn spawn_agent(&mut self, idx: usize) {
        let Some(agent) = self.agents.get(idx) else {
            return;
        };
        let mut executors: Executors = BTreeMap::new();
        let exec: Arc<dyn Executor> = self.executor.clone();
        executors.insert("docker".to_string(), exec);
        let dir = agent.dir.clone();
        let mut stop = self.shutdown.subscribe();
        let span = tracing::info_span!(crate::track::AGENT_SPAN, idx = agent.idx);
        self.tasks.push(tokio::spawn(
            async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|v| *v).await;
                };
                if let Err(e) =
                    stella_agent::runtime::run_with_executors(dir, executors, shutdown).await
                {
                    tracing::error!(error = %format!("{e:#}"), "agent runtime stopped");
                }
            }
            .instrument(span),
        ));
    }

    /// Tells every agent to stop and waits for them, 30 s at most in all.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for task in self.tasks.drain(..) {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}
