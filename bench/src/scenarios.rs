//! The five scenarios. Each sets up a fresh plane and fleet, measures, prints, tears down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;

use crate::Common;
use crate::api::Api;
use crate::db::{JobRow, Store, terminal};
use crate::fleet::{self, Fleet};
use crate::noop::{Execution, now_ms};
use crate::plane::Plane;
use crate::report::{Report, median, percentile, round1, round2};
use crate::sys;
use crate::track::TRACKER;

const ENV: &str = "bench";
const RELEASE: &str = "bench-1";

struct Bench {
    agents: usize,
    transport: String,
    timeout: Duration,
    settle_timeout: Duration,
    connect_wave: usize,
    plane: Plane,
    api: Arc<Api>,
    store: Store,
    fleet: Fleet,
    dirs: Vec<PathBuf>,
    keep: bool,
}

fn default_stella_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe
        .parent()
        .context("this executable has no parent directory")?;
    Ok(dir.join("stella"))
}

fn fresh_dir(path: &PathBuf) -> anyhow::Result<()> {
    if path.exists()
        && std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty: give a new or empty directory",
            path.display()
        );
    }
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

impl Bench {
    /// Starts the plane, enrolls the fleet, creates the environment, targets and release.
    async fn setup(c: &Common) -> anyhow::Result<Self> {
        if c.agents == 0 {
            bail!("--agents must be at least 1");
        }
        let bin = match &c.stella_bin {
            Some(b) => b.clone(),
            None => default_stella_bin()?,
        };
        if !bin.exists() {
            bail!(
                "no plane binary at {}: build it with `cargo build --release --bins -p stella-control-plane` \
                 (or `cargo build --bins` for debug), or pass --stella-bin",
                bin.display()
            );
        }
        let stamp = format!("{}-{}", std::process::id(), now_ms());
        let work = c
            .work_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("stella-bench-{stamp}")));
        fresh_dir(&work)?;
        let fleet_dir = match &c.fleet_dir {
            Some(d) => d.clone(),
            None if PathBuf::from("/dev/shm").is_dir() => {
                PathBuf::from(format!("/dev/shm/stella-bench-{stamp}"))
            }
            None => work.join("fleet"),
        };
        fresh_dir(&fleet_dir)?;
        match Self::start(c, bin, &work, &fleet_dir).await {
            Ok(bench) => Ok(bench),
            Err(e) => {
                // Keep the plane's log for the error; the fleet's directories go.
                if !c.keep && !fleet_dir.starts_with(&work) {
                    let _ = std::fs::remove_dir_all(&fleet_dir);
                }
                Err(e.context(format!(
                    "setting up (plane data and log kept in {})",
                    work.display()
                )))
            }
        }
    }

    async fn start(
        c: &Common,
        bin: PathBuf,
        work: &std::path::Path,
        fleet_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        let limit = sys::raise_nofile(c.agents as u64 + 1024)?;
        let mut dirs = vec![work.to_path_buf()];
        if !fleet_dir.starts_with(work) {
            dirs.push(fleet_dir.to_path_buf());
        }
        eprintln!(
            "plane: {} (data {}, log {}); fleet: {}; open files limit {limit}",
            bin.display(),
            work.join("plane").display(),
            work.join("plane.log").display(),
            fleet_dir.display()
        );

        let mut plane = Plane::new(
            bin,
            work.join("plane"),
            work.join("plane.log"),
            c.heartbeat_interval.clone(),
            c.plane_log.clone(),
            c.max_session_setups,
            c.transport == "quic",
        )?;
        plane.spawn()?;
        let api = Arc::new(plane.wait_ready(Duration::from_secs(60)).await?);
        eprintln!(
            "plane up: pid {}, API {}, agent endpoint 127.0.0.1:{}",
            plane.pid()?,
            plane.api_url(),
            plane.agent_port
        );
        let agents = fleet::enroll(&api, fleet_dir, c.agents, c.setup_concurrency).await?;
        fleet::create_targets(&api, &agents, ENV, c.setup_concurrency).await?;
        fleet::create_release(&api, RELEASE).await?;
        let store = Store::open(&plane.data_dir.join("stella.db")).await?;
        Ok(Self {
            agents: c.agents,
            transport: c.transport.clone(),
            timeout: Duration::from_secs(c.timeout),
            settle_timeout: Duration::from_secs(c.settle_timeout),
            connect_wave: c.connect_wave,
            plane,
            api,
            store,
            fleet: Fleet::new(agents),
            dirs,
            keep: c.keep,
        })
    }

    async fn connect(&mut self) -> anyhow::Result<Duration> {
        self.fleet
            .connect_all(self.connect_wave, self.timeout)
            .await
    }

    /// Agents the plane itself reports as connected (GET /api/v1/agents).
    async fn plane_connected(&self) -> anyhow::Result<usize> {
        #[derive(Deserialize)]
        struct AgentView {
            status: String,
        }
        let agents: Vec<AgentView> = self.api.list("/api/v1/agents").await?;
        Ok(agents.iter().filter(|a| a.status == "connected").count())
    }

    /// Waits until the plane's hub counts every agent (sessions are registered after the hello).
    async fn wait_plane_connected(&self) -> anyhow::Result<usize> {
        let start = Instant::now();
        loop {
            let n = self.plane_connected().await?;
            if n >= self.agents || start.elapsed() > Duration::from_secs(30) {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Creates a fan-out deployment. When the API fails to answer but the deployment was
    /// committed (at 10,000 jobs the plane renders its answer with one query per job and can
    /// time out on its connection pool), carries on with the committed deployment.
    async fn deploy(&self) -> anyhow::Result<String> {
        let before = self.store.latest_deployment().await?;
        match deploy(&self.api).await {
            Ok(id) => Ok(id),
            Err(e) => match self.store.latest_deployment().await? {
                Some(id) if Some(&id) != before.as_ref() => {
                    eprintln!(
                        "warning: {e:#}; the deployment {id} was committed nonetheless, carrying on"
                    );
                    Ok(id)
                }
                _ => Err(e),
            },
        }
    }

    /// Waits until the deployment has every outcome stored. After --settle-timeout it gives up
    /// (false): the unfinished jobs then count as lost in the report.
    async fn wait_deployment(&self, id: &str) -> anyhow::Result<bool> {
        let start = Instant::now();
        loop {
            if self.store.deployment_status(id).await? != "running" {
                return Ok(true);
            }
            if start.elapsed() > self.settle_timeout {
                let statuses = self.store.job_statuses(id).await.unwrap_or_default();
                eprintln!(
                    "warning: deployment {id} still running after {:?} (jobs by status: {statuses:?}); \
                     its unfinished jobs count as lost",
                    self.settle_timeout
                );
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops fleet and plane; removes the directories unless --keep (after a failure the plane's
    /// data and log stay, for the post-mortem).
    async fn teardown(self, failed: bool) {
        let Bench {
            mut plane,
            store,
            fleet,
            dirs,
            keep,
            ..
        } = self;
        store.close().await;
        fleet.shutdown().await;
        plane.stop().await;
        for (i, d) in dirs.iter().enumerate() {
            // dirs[0] is the work directory (plane data and log).
            if keep || (failed && i == 0) {
                eprintln!("kept {}", d.display());
            } else {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// Creates a deployment of the bench release to the bench environment: one signed job per agent.
async fn deploy(api: &Api) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct Created {
        id: String,
    }
    let created: Created = api
        .post(
            "/api/v1/deployments",
            &json!({"release": RELEASE, "env": ENV}),
        )
        .await?;
    Ok(created.id)
}

/// Runs `body` on a set-up bench and always tears it down.
async fn with_bench<F>(c: &Common, body: F) -> anyhow::Result<()>
where
    F: for<'a> AsyncFnOnce(&'a mut Bench) -> anyhow::Result<Report>,
{
    let mut bench = Bench::setup(c).await?;
    let outcome = body(&mut bench).await;
    bench.teardown(outcome.is_err()).await;
    let report = outcome?;
    report.print(c.json);
    let lost = report
        .get("lost_jobs")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let dup = report
        .get("duplicated_jobs")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if lost > 0 || dup > 0 {
        bail!(
            "{lost} job(s) lost and {dup} duplicated: every job must end with exactly one outcome"
        );
    }
    Ok(())
}

/// How the jobs of a run ended, checked against what the no-op executor saw.
#[derive(Default)]
struct Outcomes {
    total: usize,
    succeeded: usize,
    /// Jobs without a successful outcome stored, or "succeeded" without ever running.
    lost: usize,
    /// Jobs the executor ran more than once.
    duplicated: usize,
    /// Jobs with no outcome stored at all when the wait ended (part of `lost`).
    unfinished: usize,
}

fn check(jobs: &[JobRow], executions: &HashMap<String, Execution>) -> Outcomes {
    let mut o = Outcomes {
        total: jobs.len(),
        ..Default::default()
    };
    for j in jobs {
        let ran = executions.get(&j.id).map(|e| e.count).unwrap_or(0);
        if j.status == "succeeded" {
            o.succeeded += 1;
        }
        if j.status != "succeeded" || ran == 0 {
            o.lost += 1;
        }
        if !terminal(&j.status) {
            o.unfinished += 1;
        }
        if ran > 1 {
            o.duplicated += 1;
        }
    }
    o
}

fn add_outcomes(r: &mut Report, o: &Outcomes) {
    r.add(
        "answered",
        o.succeeded,
        &format!("of {} jobs, succeeded with a signed receipt", o.total),
    );
    r.add(
        "lost_jobs",
        o.lost,
        "jobs without exactly one stored success (must be 0)",
    );
    r.add(
        "duplicated_jobs",
        o.duplicated,
        "jobs the executor ran more than once (must be 0)",
    );
    r.add(
        "unfinished_jobs",
        o.unfinished,
        "of the lost: no outcome stored yet when the wait ended (--settle-timeout)",
    );
}

fn latencies(jobs: &[JobRow], f: impl Fn(&JobRow) -> Option<i64>) -> Vec<i64> {
    let mut v: Vec<i64> = jobs.iter().filter_map(f).collect();
    v.sort_unstable();
    v
}

fn add_latency(r: &mut Report, prefix: &str, sorted: &[i64], what: &str) {
    r.add(
        &format!("{prefix}p50_ms"),
        percentile(sorted, 0.50),
        &format!("{what}, median"),
    );
    r.add(
        &format!("{prefix}p99_ms"),
        percentile(sorted, 0.99),
        &format!("{what}, 99th percentile"),
    );
    r.add(
        &format!("{prefix}max_ms"),
        sorted.last().copied(),
        &format!("{what}, worst"),
    );
}

fn add_plane_and_fleet(r: &mut Report, bench: &Bench) {
    if let Ok(s) = bench.plane.sample() {
        r.add("plane_rss_kib", s.rss_kib, "plane resident memory now");
    }
    if let Ok(s) = sys::sample("self") {
        r.add(
            "fleet_rss_kib",
            s.rss_kib,
            "the whole simulated fleet (this process)",
        );
    }
}

fn add_other(r: &mut Report, pct: f64) {
    r.add(
        "other_cpu_pct",
        round1(pct),
        "CPU of other processes on the machine during the measurement, % of one core (noise)",
    );
}

pub async fn hold(c: &Common, idle_seconds: u64) -> anyhow::Result<()> {
    with_bench(c, async move |b: &mut Bench| {
        // A fresh plane process over the enrolled store, so the baseline carries no enrollment.
        eprintln!("restarting the plane for a clean baseline");
        b.plane.stop().await;
        b.plane.spawn()?;
        b.api = Arc::new(b.plane.wait_ready(Duration::from_secs(60)).await?);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = b.plane.sample()?;
        let connect = b.connect().await?;
        b.wait_plane_connected().await?;
        eprintln!("all sessions up; idling {idle_seconds}s");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (p0, f0, t0) = (b.plane.sample()?, sys::sample("self")?, Instant::now());
        let other = sys::OtherCpu::start(p0)?;
        tokio::time::sleep(Duration::from_secs(idle_seconds)).await;
        let (p1, f1, secs) = (
            b.plane.sample()?,
            sys::sample("self")?,
            t0.elapsed().as_secs_f64(),
        );
        let plane_sessions_end = b.plane_connected().await?;
        let n = b.agents as f64;
        let mut r = Report::new("hold", b.agents, &b.transport);
        r.add(
            "sessions",
            TRACKER.up(),
            "sessions established (fleet side, welcome received)",
        );
        r.add(
            "plane_sessions",
            plane_sessions_end,
            "agents the plane reports connected (GET /api/v1/agents)",
        );
        r.add(
            "connect_s",
            round2(connect.as_secs_f64()),
            &format!(
                "time to establish all sessions, {} at a time",
                b.connect_wave
            ),
        );
        r.add(
            "plane_rss_before_kib",
            before.rss_kib,
            "fresh plane with the enrolled store, no session",
        );
        r.add(
            "plane_rss_after_kib",
            p1.rss_kib,
            "plane with every session held, after the idle window",
        );
        r.add(
            "rss_per_session_kib",
            round2(p1.rss_kib.saturating_sub(before.rss_kib) as f64 / n),
            "(after - before) / agents",
        );
        r.add(
            "plane_cpu_idle_pct",
            round2(sys::cpu_pct(p0, p1, secs)),
            &format!("plane CPU while idle (heartbeats), % of one core over {idle_seconds}s"),
        );
        r.add(
            "fleet_cpu_idle_pct",
            round2(sys::cpu_pct(f0, f1, secs)),
            "simulated fleet CPU while idle, % of one core",
        );
        r.add("fleet_rss_kib", f1.rss_kib, "the whole simulated fleet");
        add_other(&mut r, other.pct(p1));
        Ok(r)
    })
    .await
}

struct Round {
    jobs: Vec<JobRow>,
    post_ms: i64,
    plane_cpu_s: f64,
}

async fn rounds(b: &mut Bench, rounds: usize) -> anyhow::Result<(Vec<Round>, f64)> {
    b.connect().await?;
    b.wait_plane_connected().await?;
    // Let the connect-time inventory reports land before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut out = Vec::new();
    let other = sys::OtherCpu::start(b.plane.sample()?)?;
    for round in 1..=rounds.max(1) {
        eprintln!(
            "round {round}/{rounds}: one signed job to each of {} agents",
            b.agents
        );
        let cpu0 = b.plane.sample()?;
        let t = Instant::now();
        let id = b.deploy().await?;
        let post_ms = t.elapsed().as_millis() as i64;
        b.wait_deployment(&id).await?;
        let cpu1 = b.plane.sample()?;
        let jobs = b.store.jobs(&id).await?;
        let done = jobs.iter().filter(|j| terminal(&j.status)).count();
        eprintln!(
            "round {round}/{rounds}: {done}/{} results stored in {:.0} ms",
            jobs.len(),
            t.elapsed().as_secs_f64() * 1000.0
        );
        out.push(Round {
            jobs,
            post_ms,
            plane_cpu_s: sys::cpu_seconds(cpu0, cpu1),
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let other_pct = other.pct(b.plane.sample()?);
    // Results are acknowledged after they are stored; give the executor counts a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok((out, other_pct))
}

pub async fn fanout(c: &Common, n_rounds: usize) -> anyhow::Result<()> {
    with_bench(c, async move |b: &mut Bench| {
        let (rs, other_pct) = rounds(b, n_rounds).await?;
        let all: Vec<JobRow> = rs.iter().flat_map(|r| r.jobs.clone()).collect();
        let lat = latencies(&all, |j| j.finished_at.map(|f| f - j.created_at));
        let all_results: Vec<i64> = rs
            .iter()
            .map(|r| {
                let created = r.jobs.iter().map(|j| j.created_at).min().unwrap_or(0);
                let last = r
                    .jobs
                    .iter()
                    .filter_map(|j| j.finished_at)
                    .max()
                    .unwrap_or(created);
                last - created
            })
            .collect();
        let mut r = Report::new("fanout", b.agents, &b.transport);
        r.add("rounds", rs.len(), "deployments, one after the other");
        add_latency(&mut r, "", &lat, "job created -> result stored, per agent");
        r.add(
            "all_results_ms",
            median(&all_results),
            "job created -> last result stored, median over rounds",
        );
        r.add(
            "all_results_ms_max",
            all_results.iter().max().copied(),
            "same, worst round",
        );
        r.add(
            "create_ms",
            median(&rs.iter().map(|r| r.post_ms).collect::<Vec<_>>()),
            "POST /api/v1/deployments round trip (signs and stores all jobs), median",
        );
        r.add(
            "plane_cpu_s_per_round",
            round2(rs.iter().map(|r| r.plane_cpu_s).sum::<f64>() / rs.len().max(1) as f64),
            "plane CPU seconds per fan-out",
        );
        add_outcomes(&mut r, &check(&all, &b.fleet.executor.executions()));
        add_plane_and_fleet(&mut r, b);
        add_other(&mut r, other_pct);
        Ok(r)
    })
    .await
}

pub async fn pickup(c: &Common, n_rounds: usize) -> anyhow::Result<()> {
    with_bench(c, async move |b: &mut Bench| {
        let (rs, other_pct) = rounds(b, n_rounds).await?;
        let all: Vec<JobRow> = rs.iter().flat_map(|r| r.jobs.clone()).collect();
        let executions = b.fleet.executor.executions();
        let started = latencies(&all, |j| {
            executions
                .get(&j.id)
                .map(|e| e.first_start_ms - j.created_at)
        });
        let accepted = latencies(&all, |j| j.accepted_at.map(|a| a - j.created_at));
        let mut r = Report::new("pickup", b.agents, &b.transport);
        r.add("rounds", rs.len(), "deployments to the idle fleet");
        add_latency(
            &mut r,
            "",
            &started,
            "job created -> executor started (verified, journaled)",
        );
        add_latency(
            &mut r,
            "accepted_",
            &accepted,
            "job created -> plane recorded the agent's acceptance",
        );
        add_outcomes(&mut r, &check(&all, &executions));
        add_plane_and_fleet(&mut r, b);
        add_other(&mut r, other_pct);
        Ok(r)
    })
    .await
}

pub async fn throughput(c: &Common, seconds: u64, window: usize) -> anyhow::Result<()> {
    with_bench(c, async move |b: &mut Bench| {
        b.connect().await?;
        b.wait_plane_connected().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        eprintln!(
            "creating deployments for {seconds}s, up to {window} running at once ({} jobs each)",
            b.agents
        );
        let window = window.max(1);
        let (cpu0, fcpu0) = (b.plane.sample()?, sys::sample("self")?);
        let other = sys::OtherCpu::start(cpu0)?;
        let start = Instant::now();
        let mut created: Vec<String> = Vec::new();
        // Creations run concurrently: the POST answers only after rendering every job, so
        // waiting for it would measure the API rather than the job pipeline.
        let mut creating: tokio::task::JoinSet<anyhow::Result<String>> =
            tokio::task::JoinSet::new();
        let mut last_print = Instant::now();
        while start.elapsed() < Duration::from_secs(seconds) {
            while let Some(done) = creating.try_join_next() {
                created.push(done.map_err(|e| anyhow::anyhow!("deployment task: {e}"))??);
            }
            let running = b
                .store
                .running_deployments()
                .await?
                .iter()
                .filter(|id| created.contains(id))
                .count();
            if running + creating.len() < window {
                let api = b.api.clone();
                creating.spawn(async move { deploy(&api).await });
            } else {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if last_print.elapsed() > Duration::from_secs(2) {
                eprintln!(
                    "{:.0}s: {} deployments created, {} jobs executed",
                    start.elapsed().as_secs_f64(),
                    created.len(),
                    b.fleet.executor.executed_jobs()
                );
                last_print = Instant::now();
            }
        }
        while let Some(done) = creating.join_next().await {
            created.push(done.map_err(|e| anyhow::anyhow!("deployment task: {e}"))??);
        }
        eprintln!(
            "stopped creating after {} deployments; waiting for the last ones",
            created.len()
        );
        for id in &created {
            if !b.wait_deployment(id).await? {
                break;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let (cpu1, fcpu1) = (b.plane.sample()?, sys::sample("self")?);
        let mut all = Vec::new();
        for id in &created {
            all.extend(b.store.jobs(id).await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let first = all.iter().map(|j| j.created_at).min().unwrap_or(0);
        let last = all
            .iter()
            .filter_map(|j| j.finished_at)
            .max()
            .unwrap_or(first);
        let span_s = ((last - first) as f64 / 1000.0).max(0.001);
        let outcomes = check(&all, &b.fleet.executor.executions());
        let lat = latencies(&all, |j| j.finished_at.map(|f| f - j.created_at));
        let mut r = Report::new("throughput", b.agents, &b.transport);
        r.add("seconds", seconds, "how long deployments were created");
        r.add("window", window, "deployments running at once");
        r.add("deployments", created.len(), "");
        r.add("jobs", all.len(), "signed jobs");
        r.add(
            "jobs_per_s",
            round1(outcomes.succeeded as f64 / span_s),
            "succeeded jobs / (last result stored - first job created)",
        );
        add_latency(&mut r, "", &lat, "job created -> result stored");
        r.add(
            "plane_cpu_pct",
            round1(sys::cpu_pct(cpu0, cpu1, elapsed)),
            "plane CPU over the run, % of one core",
        );
        r.add(
            "fleet_cpu_pct",
            round1(sys::cpu_pct(fcpu0, fcpu1, elapsed)),
            "simulated fleet CPU over the run, % of one core",
        );
        add_outcomes(&mut r, &outcomes);
        add_plane_and_fleet(&mut r, b);
        add_other(&mut r, other.pct(cpu1));
        Ok(r)
    })
    .await
}

pub async fn storm(c: &Common, kill_at: f64) -> anyhow::Result<()> {
    with_bench(c, async move |b: &mut Bench| {
        b.connect().await?;
        b.wait_plane_connected().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let id = b.deploy().await?;
        let kill_after = ((b.agents as f64 * kill_at.clamp(0.0, 1.0)).ceil() as i64).max(1);
        loop {
            let st = b.store.job_statuses(&id).await?;
            let done: i64 = st
                .iter()
                .filter(|(s, _)| terminal(s))
                .map(|(_, n)| n)
                .sum();
            if done >= kill_after {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        b.plane.kill9();
        let killed_at = Instant::now();
        let at_kill = b.store.job_statuses(&id).await?;
        let in_flight: i64 = at_kill
            .iter()
            .filter(|(s, _)| !terminal(s))
            .map(|(_, n)| n)
            .sum();
        eprintln!("plane SIGKILLed with {in_flight} of {} jobs in flight ({at_kill:?}); restarting", b.agents);

        let t0_ms = now_ms();
        let t0 = Instant::now();
        b.plane.spawn()?;
        b.api = Arc::new(b.plane.wait_ready(Duration::from_secs(60)).await?);
        let restart_s = t0.elapsed().as_secs_f64();
        let other = sys::OtherCpu::start(b.plane.sample()?)?;
        let ended_before = TRACKER.ended();
        let silent_before = TRACKER.silent();

        // Sample the TCP table for connections to the agent port that have no session yet.
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            let port = b.plane.agent_port;
            tokio::spawn(async move {
                let mut peak = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let (connecting, established) = sys::tcp_clients_to(port);
                    let handshaking = (connecting + established).saturating_sub(TRACKER.up());
                    peak = peak.max(handshaking);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                peak
            })
        };
        let mut reconnect_s = None;
        let mut fleet_s = None;
        let mut last_print = Instant::now();
        while t0.elapsed() < b.timeout {
            if fleet_s.is_none()
                && let Some(latest) = TRACKER.all_up_since(b.agents, t0_ms)
            {
                fleet_s = Some((latest - t0_ms) as f64 / 1000.0);
            }
            let connected = b.plane_connected().await.unwrap_or(0);
            if connected >= b.agents {
                reconnect_s = Some(t0.elapsed().as_secs_f64());
                break;
            }
            if last_print.elapsed() > Duration::from_secs(2) {
                eprintln!(
                    "{:.1}s after restart: {connected}/{} agents connected",
                    t0.elapsed().as_secs_f64(),
                    b.agents
                );
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if fleet_s.is_none() {
            fleet_s = TRACKER
                .all_up_since(b.agents, t0_ms)
                .map(|latest| (latest - t0_ms) as f64 / 1000.0);
        }
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.await.unwrap_or(0);
        // The plane's own counts since its restart: exact, unlike the sampled TCP table.
        let mut admission = Vec::new();
        for name in [
            "stella_session_setup_limit",
            "stella_session_setups_peak",
            "stella_tls_handshakes_peak",
            "stella_session_setups_deferred_total",
        ] {
            admission.push(b.api.metric(name).await.ok().flatten().map(|v| v as u64));
        }
        let failed_attempts = TRACKER.ended().saturating_sub(ended_before);
        let settled = if reconnect_s.is_some() {
            eprintln!("fleet back; waiting for every job of the interrupted fan-out to settle");
            b.wait_deployment(&id).await?
        } else {
            eprintln!("the fleet did not come back within {:?}", b.timeout);
            false
        };
        let settle_s = killed_at.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let jobs = b.store.jobs(&id).await?;
        let outcomes = check(&jobs, &b.fleet.executor.executions());

        let mut r = Report::new("storm", b.agents, &b.transport);
        r.add(
            "in_flight_at_kill",
            in_flight,
            "jobs not finished in the store when the plane was SIGKILLed",
        );
        r.add(
            "plane_restart_s",
            round2(restart_s),
            "restart until the API answers",
        );
        r.add(
            "reconnect_s",
            reconnect_s.map(round2),
            "restart until GET /api/v1/agents shows every agent connected (polled every 250 ms)",
        );
        r.add(
            "reconnect_fleet_s",
            fleet_s.map(round2),
            "restart until the last agent got its welcome (fleet side)",
        );
        r.add(
            "peak_handshakes",
            peak,
            "max TCP connections to the agent port without an established session, sampled every 100 ms (gRPC only; see peak_tls_handshakes)",
        );
        let notes = [
            ("session_setup_limit", "the plane's --max-session-setups"),
            (
                "peak_session_setups",
                "most session setups in progress at once after the restart (plane metric)",
            ),
            (
                "peak_tls_handshakes",
                "most TLS handshakes in progress at once after the restart (plane metric)",
            ),
            (
                "sessions_deferred",
                "sessions told to come back later because the setup limit was reached",
            ),
        ];
        for ((key, note), value) in notes.into_iter().zip(admission) {
            r.add(key, value, note);
        }
        r.add(
            "agents_back",
            b.plane_connected().await.unwrap_or(0),
            "agents the plane shows connected at the end of the reconnect wait",
        );
        r.add(
            "sessions_ended_by_silence",
            TRACKER.silent().saturating_sub(silent_before),
            "agents that noticed the killed plane only after three unanswered heartbeats, not \
             from the transport (TCP reset, QUIC stateless reset)",
        );
        r.add(
            "failed_session_attempts",
            failed_attempts,
            "session attempts that failed during the reconnect (agents back off and retry)",
        );
        r.add(
            "settle_s",
            round2(settle_s),
            "kill until every job of the fan-out has its outcome stored",
        );
        add_outcomes(&mut r, &outcomes);
        add_plane_and_fleet(&mut r, b);
        if let Ok(p) = b.plane.sample() {
            add_other(&mut r, other.pct(p));
        }
        if reconnect_s.is_none() {
            r.print(false);
            bail!(
                "not every agent reconnected within {:?} (see {})",
                b.timeout,
                b.plane.log_path().display()
            );
        }
        if !settled {
            eprintln!("warning: the interrupted fan-out did not settle");
        }
        Ok(r)
    })
    .await
}
