//! Chaos with real processes.
//!
//! - The plane is SIGKILLed at several points of a multi-target deployment (3 targets on 2
//!   agents) and restarted each time. The deployment completes, no job is lost, and no effect is
//!   duplicated: the engine saw exactly one container created per target (counted from the
//!   engine's own event log, not from Stella's records).
//! - An agent is SIGKILLed in the middle of a deploy (its container started, waiting to become
//!   healthy) and restarted: the journaled job resumes and runs to completion once. Killed after
//!   it finished but before the plane heard of it: the restarted agent re-reports the journaled
//!   result and runs nothing again.
//! - The link between agent and plane goes silent for two minutes in the middle of a deploy: the
//!   agent finishes the job meanwhile, and the result arrives once after the link is back, from
//!   the same agent process.
//!
//! The deploys that must be caught mid-flight use an image whose health check passes only once
//! the test creates `/ready` in the container, so "mid-flight" is a state the test holds, not a
//! race it hopes to win.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use stella_e2e::{
    Agent, LinkProxy, Plane, TargetCleanup, TestImage, containers_of, docker, free_port, inspect,
    sql_string, unique, wait_until,
};

fn job_statuses(plane: &Plane, deployment: &str) -> Vec<String> {
    let v = plane.json(&["deployments", "show", deployment]);
    v["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|j| j["status"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn kill_and_restart(plane: &mut Plane) {
    plane.kill();
    plane.restart();
}

/// An image whose container runs at once but turns healthy only when `/ready` exists in it: a
/// deploy of it stays in flight (waiting for readiness) until the test calls [`open_gate`].
struct GatedImage {
    image: TestImage,
    // Dropped after `image`: the engine refuses to remove a parent before its child.
    _base: TestImage,
}

impl GatedImage {
    fn build(repo: &str) -> GatedImage {
        let base = TestImage::busybox_sleeper(repo, "base");
        let dockerfile = format!(
            "FROM {}:{}\n\
             HEALTHCHECK --interval=1s --timeout=5s --start-period=1h --retries=1 \
             CMD [\"/bin/busybox\", \"test\", \"-f\", \"/ready\"]\n",
            base.repo, base.tag
        );
        let reference = format!("{repo}:gated");
        let mut build = Command::new("docker")
            .args(["build", "-q", "-t", &reference, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker build");
        std::io::Write::write_all(&mut build.stdin.take().unwrap(), dockerfile.as_bytes()).unwrap();
        let out = build.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "docker build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = docker(&["image", "inspect", "-f", "{{.Id}}", &reference]);
        GatedImage {
            image: TestImage {
                repo: repo.to_string(),
                tag: "gated".to_string(),
                id,
            },
            _base: base,
        }
    }
}

/// Lets the deploy of a [`GatedImage`] finish: its health check passes from now on.
fn open_gate(container: &str) {
    docker(&["exec", container, "/bin/busybox", "touch", "/ready"]);
}

/// Waits until the target's container is running and still waiting to become healthy: its
/// deploy job is in the middle of its readiness wait. Returns the container id.
fn wait_mid_flight(target: &str) -> String {
    wait_until(
        Duration::from_secs(90),
        "the deploy to start its container",
        || {
            let ids = containers_of(target);
            let [id] = ids.as_slice() else { return None };
            let state = &inspect(id)["State"];
            (state["Status"] == "running" && state["Health"]["Status"] == "starting")
                .then(|| id.clone())
        },
    )
}

/// A docker target whose deploys may wait ten minutes for readiness (longer than any cut here).
fn patient_target(plane: &Plane, agent: &Agent) -> (String, TargetCleanup) {
    let target = unique("chaos");
    plane.ok(&["env", "create", "dev"]);
    plane.ok(&[
        "target",
        "create",
        &target,
        "--env",
        "dev",
        "--kind",
        "docker",
        "--agent",
        &agent.id,
        "--config",
        r#"{"health_timeout_secs": 600}"#,
    ]);
    let cleanup = TargetCleanup(target.clone());
    (target, cleanup)
}

/// The engine's container-create events for Stella deployments, recorded live from `since` until
/// dropped. Read live rather than afterwards with `docker events --until`: the engine keeps only
/// its last 256 events, and health checks probing every second (three events a probe) or other
/// tests on the same engine push a create out of that window within minutes.
struct EngineCreates {
    log: tempfile::NamedTempFile,
    child: std::process::Child,
}

impl EngineCreates {
    fn watch(since: &str) -> EngineCreates {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new("docker")
            .args(["events", "--since", since])
            .args(["--filter", "type=container", "--filter", "event=create"])
            .args(["--filter", "label=stella.deployment.id"])
            .args([
                "--format",
                "{{index .Actor.Attributes \"stella.deployment.id\"}} \
                 {{index .Actor.Attributes \"stella.target\"}}",
            ])
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .spawn()
            .expect("docker events");
        EngineCreates { log, child }
    }

    /// The target of each container created for `deployment` so far, sorted. Called once the
    /// deployment finished, long after any create it made reached this stream.
    fn targets(&self, deployment: &str) -> Vec<String> {
        let mut targets: Vec<String> = std::fs::read_to_string(self.log.path())
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(dep, _)| *dep == deployment)
            .map(|(_, target)| target.trim().to_string())
            .collect();
        targets.sort_unstable();
        targets
    }
}

impl Drop for EngineCreates {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deployment of one job, started by the test.
struct Started {
    id: String,
    job: String,
    creates: EngineCreates,
}

impl Started {
    /// Containers the engine created for this deployment.
    fn containers_created(&self) -> usize {
        self.creates.targets(&self.id).len()
    }
}

/// Starts a deployment of a new release of `image` to the one target of `dev`.
fn start_deploy(plane: &Plane, release: &str, image: &TestImage) -> Started {
    plane.ok(&[
        "release",
        "create",
        release,
        "--component",
        &image.component("web"),
    ]);
    let since = docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let creates = EngineCreates::watch(&since);
    let dep = plane.json(&["deploy", release, "--env", "dev", "--no-wait"]);
    let id = dep["id"].as_str().unwrap().to_string();
    let job = plane.json(&["deployments", "show", &id])["jobs"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    Started { id, job, creates }
}

/// Times the agent finished this job (its log spans every process it ran as).
fn runs_finished(agent: &Agent, job: &str) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("job finished") && l.contains(job))
        .count()
}

/// The agent's journal entry of a job (`journal/<job>.json`), if written.
fn journal_entry(agent: &Agent, job: &str) -> Option<Value> {
    let raw = std::fs::read(agent.dir.join("journal").join(format!("{job}.json"))).ok()?;
    serde_json::from_slice(&raw).ok()
}

fn spooled(agent_dir: &Path, job: &str) -> bool {
    agent_dir.join("spool").join(format!("{job}.json")).exists()
}

fn job_status(plane: &Plane, deployment: &str) -> String {
    job_statuses(plane, deployment)
        .into_iter()
        .next()
        .unwrap_or_default()
}

fn stored_receipt(plane: &Plane, job: &str) -> String {
    sql_string(
        &plane.db(),
        "SELECT receipt FROM jobs WHERE id = $1",
        &[job],
    )
}

stella_e2e::both_transports! {
#[test]
fn a_plane_killed_at_several_points_of_a_deployment_loses_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plane = Plane::start_on(&tmp.path().join("plane"), free_port(), free_port());
    let mut agents: Vec<Agent> = (0..2)
        .map(|i| {
            let mut a = Agent::enroll(&plane, &tmp.path().join(format!("agent-{i}")), &format!("chaos-{i}"));
            a.disabled = vec!["compose".to_string()];
            a.start();
            a
        })
        .collect();
    for a in &agents {
        plane.wait_agent(&a.id, "connected");
    }
    plane.ok(&["env", "create", "dev"]);
    let targets: Vec<String> = (0..3).map(|_| unique("chaos")).collect();
    let _cleanup: Vec<TargetCleanup> = targets.iter().map(|t| TargetCleanup(t.clone())).collect();
    for (i, t) in targets.iter().enumerate() {
        let agent = &agents[i % 2].id;
        plane.ok(&["target", "create", t, "--env", "dev", "--kind", "docker", "--agent", agent]);
    }
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/chaos"), "1");
    plane.ok(&["release", "create", "c1", "--component", &image.component("web")]);
    let since = docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let creates = EngineCreates::watch(&since);

    let dep = plane.json(&["deploy", "c1", "--env", "dev", "--no-wait"]);
    let id = dep["id"].as_str().unwrap().to_string();
    // Point 1: right after the deployment and its signed jobs were committed.
    kill_and_restart(&mut plane);
    // Point 2: once an agent has taken a job.
    wait_until(Duration::from_secs(60), "a job to leave the queue", || {
        job_statuses(&plane, &id).iter().any(|s| s != "queued").then_some(())
    });
    kill_and_restart(&mut plane);
    // Point 3: once a result has been recorded.
    wait_until(Duration::from_secs(60), "a job to finish", || {
        job_statuses(&plane, &id).iter().any(|s| s == "succeeded").then_some(())
    });
    kill_and_restart(&mut plane);

    let done = plane.wait_deployment(&id);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(job_statuses(&plane, &id), vec!["succeeded"; 3]);
    let per_target = creates.targets(&id);
    let mut expected = targets.clone();
    expected.sort_unstable();
    assert_eq!(per_target, expected, "exactly one container created per target");
    for a in &mut agents {
        assert!(a.is_running(), "agents were never restarted");
    }
}

/// Killed while its deploy waits for the container to become healthy, the agent is started
/// again: the job it had journaled as accepted resumes (the plane does not offer it twice: the
/// hello lists it in flight), adopts the container the first run created instead of making
/// another, and ends with one success.
#[test]
fn an_agent_killed_mid_deploy_resumes_the_job_and_runs_it_once() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "chaos-kill");
    agent.disabled = vec!["compose".to_string()];
    agent.start();
    plane.wait_agent(&agent.id, "connected");
    let (target, _cleanup) = patient_target(&plane, &agent);
    let gated = GatedImage::build(&unique("stella-e2e/chaos-kill"));

    let started = start_deploy(&plane, "k1", &gated.image);
    let (dep, job) = (started.id.clone(), started.job.clone());
    let container = wait_mid_flight(&target);
    agent.kill();
    let killed = Instant::now();
    assert_eq!(journal_entry(&agent, &job).expect("journaled")["status"], "accepted");
    assert!(!["succeeded", "failed"].contains(&job_status(&plane, &dep).as_str()));

    agent.start();
    wait_until(Duration::from_secs(60), "the restarted agent to resume the job", || {
        agent.log().lines().any(|l| l.contains("resuming a job interrupted") && l.contains(&job))
            .then_some(())
    });
    open_gate(&container);
    let done = plane.wait_deployment(&dep);
    eprintln!("killed mid-deploy: job {job} succeeded {:?} after the kill", killed.elapsed());

    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["jobs"][0]["status"], "succeeded");
    assert_eq!(runs_finished(&agent, &job), 1, "{}", agent.log());
    assert_eq!(containers_of(&target), vec![container.clone()], "the first run's container was kept");
    assert_eq!(started.containers_created(), 1, "the engine created one container for the deployment");
    wait_until(Duration::from_secs(30), "the acknowledged result to leave the spool", || {
        (!spooled(&agent.dir, &job)).then_some(())
    });
}

/// Killed after the job finished but before the plane heard of it (the link was cut), the
/// agent is started again: it re-reports the result from its journal and spool (the receipt the
/// plane stores is the one signed by the first run) and runs nothing again.
#[test]
fn an_agent_killed_after_finishing_unreported_re_reports_and_does_not_rerun() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let proxy = LinkProxy::start(&plane);
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "chaos-unreported");
    agent.disabled = vec!["compose".to_string()];
    agent.set_endpoint(&proxy.url());
    agent.start();
    plane.wait_agent(&agent.id, "connected");
    let (target, _cleanup) = patient_target(&plane, &agent);
    let gated = GatedImage::build(&unique("stella-e2e/chaos-unreported"));

    let started = start_deploy(&plane, "u1", &gated.image);
    let (dep, job) = (started.id.clone(), started.job.clone());
    let container = wait_mid_flight(&target);
    proxy.cut();
    open_gate(&container);
    let finished = wait_until(Duration::from_secs(90), "the agent to journal the result", || {
        journal_entry(&agent, &job).filter(|e| e["status"] == "finished")
    });
    agent.kill();
    assert!(spooled(&agent.dir, &job), "the unacknowledged result is spooled");
    assert!(
        !["succeeded", "failed"].contains(&job_status(&plane, &dep).as_str()),
        "the plane heard nothing of the result before the kill"
    );

    proxy.restore();
    let restarted = Instant::now();
    agent.start();
    let done = plane.wait_deployment(&dep);
    eprintln!("killed with an unreported result: recorded {:?} after the restart", restarted.elapsed());

    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(runs_finished(&agent, &job), 1, "the job ran once: {}", agent.log());
    assert!(
        !agent.log().lines().any(|l| l.contains("resuming a job") && l.contains(&job)),
        "a finished job is not resumed"
    );
    assert_eq!(
        stored_receipt(&plane, &job),
        finished["result"]["receipt"].as_str().unwrap(),
        "the plane stored the first run's signed result"
    );
    assert_eq!(containers_of(&target), vec![container]);
    assert_eq!(started.containers_created(), 1);
    wait_until(Duration::from_secs(30), "the acknowledged result to leave the spool", || {
        (!spooled(&agent.dir, &job)).then_some(())
    });
}

/// The link goes silent (a black hole, nothing closed) for two minutes in the middle of a deploy:
/// both sides notice, the agent finishes the job during the cut and keeps its result, and once
/// the link carries again the same agent process reconnects by itself and the result is
/// recorded once. A deployment queued during the cut runs after it.
#[test]
fn a_link_cut_for_two_minutes_mid_job_loses_nothing_and_needs_no_restart() {
    const CUT: Duration = Duration::from_secs(120);
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let proxy = LinkProxy::start(&plane);
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "chaos-cut");
    agent.disabled = vec!["compose".to_string()];
    agent.set_endpoint(&proxy.url());
    agent.start();
    plane.wait_agent(&agent.id, "connected");
    let (target, _cleanup) = patient_target(&plane, &agent);
    let gated = GatedImage::build(&unique("stella-e2e/chaos-cut"));
    let next = TestImage::busybox_sleeper(&unique("stella-e2e/chaos-cut-next"), "2");

    let started = start_deploy(&plane, "c1", &gated.image);
    let (dep, job) = (started.id.clone(), started.job.clone());
    let container = wait_mid_flight(&target);
    proxy.cut();
    let cut_at = Instant::now();
    plane.wait_agent(&agent.id, "disconnected");
    eprintln!("link cut: the plane saw the agent gone after {:?}", cut_at.elapsed());
    open_gate(&container);
    wait_until(Duration::from_secs(90), "the agent to finish the job during the cut", || {
        journal_entry(&agent, &job).filter(|e| e["status"] == "finished")
    });
    eprintln!("link cut: the agent finished the job {:?} into the cut", cut_at.elapsed());
    // Queued while the agent is unreachable: offered once it is back.
    plane.ok(&["release", "create", "c2", "--component", &next.component("web")]);
    let queued = plane.json(&["deploy", "c2", "--env", "dev", "--no-wait"]);
    let queued = queued["id"].as_str().unwrap().to_string();

    while cut_at.elapsed() < CUT {
        assert_ne!(job_status(&plane, &dep), "succeeded", "a result crossed a cut link");
        assert_eq!(plane.agent_status(&agent.id), "disconnected");
        std::thread::sleep(Duration::from_secs(5));
    }
    proxy.restore();
    let restored = Instant::now();
    let done = plane.wait_deployment(&dep);
    eprintln!("link restored after {:?}: result recorded {:?} later", CUT, restored.elapsed());
    let second = plane.wait_deployment(&queued);
    eprintln!("the deployment queued during the cut finished {:?} after the restore", restored.elapsed());

    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(second["status"], "succeeded", "{second:#}");
    assert!(agent.is_running(), "the agent was never restarted");
    assert_eq!(runs_finished(&agent, &job), 1, "the job ran once: {}", agent.log());
    assert_eq!(started.containers_created(), 1, "one container for the deployment");
    let ids = containers_of(&target);
    assert_eq!(ids.len(), 1, "one container, the queued release's");
    assert_eq!(inspect(&ids[0])["Image"], next.id.as_str());
    wait_until(Duration::from_secs(30), "the acknowledged result to leave the spool", || {
        (!spooled(&agent.dir, &job)).then_some(())
    });
}
}

fn promotion_of(plane: &Plane, release: &str) -> Value {
    let all = plane.json(&["promotion", "list"]);
    let id = all
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["release"] == release)
        .unwrap_or_else(|| panic!("no promotion of {release}: {all}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    plane.json(&["promotion", "show", &id])
}

/// A script is not idempotent, so the agent runs it at most once: killed while its script runs,
/// the restarted agent fails the job as `script_interrupted` instead of starting it again, and
/// the script does not live on without its agent (unsupervised, it would finish its effect after
/// its job was recorded as failed, with no timeout, and a retry of the step would run beside it).
#[test]
fn an_agent_killed_mid_script_fails_the_job_once_and_no_script_outlives_it() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "chaos-script");
    agent.disabled = vec!["compose".to_string()];
    agent.run_args = vec!["--allow-scripts".to_string()];
    agent.start();
    plane.wait_agent(&agent.id, "connected");
    wait_until(
        Duration::from_secs(30),
        "the agent to offer scripts",
        || {
            let shown = plane.json(&["agents", "show", &agent.id]);
            shown["capabilities"]
                .as_array()
                .unwrap()
                .contains(&"script".into())
                .then_some(())
        },
    );
    plane.ok(&["env", "create", "dev"]);
    let target = unique("chaos-script");
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let _cleanup = TargetCleanup(target.clone());
    let (runs, gate, effect) = (
        tmp.path().join("runs"),
        tmp.path().join("gate"),
        tmp.path().join("effect"),
    );
    let workflow = tmp.path().join("workflow.yaml");
    std::fs::write(
        &workflow,
        format!(
            "name: gated-script\nsteps:\n  - id: deploy\n    type: deploy\n  - id: gated\n    \
             type: script\n    needs: [deploy]\n    with: {{ command: [\"/bin/sh\", \"-c\", \
             \"echo $$ >> {runs}; while [ ! -f {gate} ]; do sleep 0.2; done; echo done >> {effect}\"] }}\n    \
             timeout: 10m\n",
            runs = runs.display(),
            gate = gate.display(),
            effect = effect.display()
        ),
    )
    .unwrap();
    plane.ok(&[
        "env",
        "set",
        "dev",
        "--workflow",
        &workflow.display().to_string(),
    ]);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/chaos-script"), "1");
    plane.ok(&[
        "release",
        "create",
        "s1",
        "--component",
        &image.component("web"),
    ]);
    plane.ok(&["promote", "s1", "--to", "dev", "--no-wait"]);

    let pid = wait_until(Duration::from_secs(120), "the script to start", || {
        let runs = std::fs::read_to_string(&runs).ok()?;
        runs.lines().next().map(str::to_string)
    });
    agent.kill();
    let killed = Instant::now();
    agent.start();
    let p = wait_until(Duration::from_secs(120), "the promotion to end", || {
        let p = promotion_of(&plane, "s1");
        (!["pending", "awaiting_approval", "approved", "deploying"]
            .contains(&p["status"].as_str().unwrap_or_default()))
        .then_some(p)
    });
    eprintln!(
        "killed mid-script: the promotion ended {:?} after the kill",
        killed.elapsed()
    );
    stella_plugin_testkit::process::assert_exits(
        pid.parse().unwrap(),
        Duration::from_secs(30),
        "the interrupted script",
    );
    // Nothing is left that could do the script's effect once the gate opens.
    std::fs::write(&gate, b"open").unwrap();

    assert_eq!(p["status"], "failed", "{p:#}");
    let step = p["workflow"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "gated")
        .unwrap()
        .clone();
    assert_eq!(step["status"], "failed", "{p:#}");
    let deployments = step["deployments"].as_array().unwrap();
    assert_eq!(deployments.len(), 1, "one job, not a second run: {p:#}");
    let dep = plane.wait_deployment(deployments[0].as_str().unwrap());
    assert_eq!(dep["jobs"][0]["status"], "failed", "{dep:#}");
    assert_eq!(
        dep["jobs"][0]["reason_code"], "script_interrupted",
        "{dep:#}"
    );
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap().lines().count(),
        1,
        "the script started once"
    );
    assert!(
        !effect.exists(),
        "the interrupted script finished its effect unsupervised"
    );
}
