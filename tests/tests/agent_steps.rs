//! Workflow steps that agents run themselves, end to end: an HTTP health probe against a server
//! this test runs on loopback (healthy → the promotion is deployed; answering 500 → the step
//! fails and the workflow rolls back to the previous digests), and script steps (exit 0 passes;
//! one that outlives its timeout is killed and fails its step). Both arrive at the agent as
//! signed jobs and come back with signed receipts, like deploys.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use stella_e2e::{
    Agent, Plane, TargetCleanup, TestImage, agent_bin, containers_of, inspect, unique, wait_until,
};

/// A loopback HTTP server answering every request with the status currently set.
struct HealthServer {
    port: u16,
    status: Arc<AtomicU16>,
    requests: Arc<AtomicU32>,
}

impl HealthServer {
    fn start() -> HealthServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(AtomicU32::new(0));
        let (answer, count) = (status.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if line == "\r\n" {
                        break;
                    }
                    line.clear();
                }
                count.fetch_add(1, Ordering::SeqCst);
                let code = answer.load(Ordering::SeqCst);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        HealthServer {
            port,
            status,
            requests,
        }
    }
}

/// `stella-agent run` with extra flags (the harness's `Agent::start` knows only `--disable`).
struct RunningAgent(Child);

impl RunningAgent {
    fn start(dir: &Path, extra: &[&str]) -> RunningAgent {
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env_remove("STELLA_AGENT_ALLOW_SCRIPTS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start stella-agent");
        RunningAgent(child)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

use stella_e2e::promotion_step as step;

/// The one job of the step's (only) deployment, once it has finished.
fn finished_step_job(plane: &Plane, promotion: &Value, step_id: &str) -> (Value, Value) {
    let deployments = step(promotion, step_id)["deployments"]
        .as_array()
        .expect("deployments")
        .clone();
    assert_eq!(deployments.len(), 1, "{promotion}");
    let id = deployments[0].as_str().unwrap();
    let deployment = plane.wait_deployment(id);
    let jobs = deployment["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{deployment}");
    (deployment.clone(), jobs[0].clone())
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

#[test]
fn an_http_health_probe_run_by_the_agent_decides_between_deployed_and_rolled_back() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "probe");
    plane.ok(&["env", "create", "dev"]);
    let target = unique("web-probe");
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let _cleanup = TargetCleanup(target.clone());
    let shown = plane.json(&["agents", "show", &agent.id]);
    let capabilities = shown["capabilities"].as_array().unwrap();
    assert!(capabilities.contains(&"health-check".into()), "{shown}");
    assert!(
        !capabilities.contains(&"script".into()),
        "scripts are opt-in: {shown}"
    );

    let server = HealthServer::start();
    plane.set_workflow(
        tmp.path(),
        "http-health",
        &format!(
            "name: http-health\nsteps:\n  - id: deploy\n    type: deploy\n  - id: health\n    type: health-check\n    needs: [deploy]\n    with: {{ http: {{ url: \"http://127.0.0.1:{}/healthz\", expect_status: 200 }}, interval: 200ms, healthy_after: 2 }}\n    timeout: 4s\n  - id: rollback\n    type: rollback\n    needs: [deploy, health]\n    when: on_failure\n",
            server.port
        ),
    );
    let repo = unique("stella-e2e/probe");
    let one = TestImage::busybox_sleeper(&repo, "1");
    let two = TestImage::busybox_sleeper(&repo, "2");
    plane.ok(&[
        "release",
        "create",
        "probe-1",
        "--component",
        &one.component("web"),
    ]);
    plane.ok(&[
        "release",
        "create",
        "probe-2",
        "--component",
        &two.component("web"),
    ]);

    // Healthy: the agent's probe sees 200 twice in a row.
    let out = plane.ok(&["promote", "probe-1", "--to", "dev"]);
    assert!(out.contains("deployed"), "{out}");
    let p = promotion_of(&plane, "probe-1");
    assert_eq!(p["status"], "deployed", "{p}");
    assert_eq!(step(&p, "health")["status"], "succeeded", "{p}");
    assert_eq!(step(&p, "rollback")["status"], "skipped", "{p}");
    let (deployment, job) = finished_step_job(&plane, &p, "health");
    assert_eq!(deployment["kind"], "health-check", "{deployment}");
    assert_eq!(job["kind"], "health-check");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["outcome"]["healthy_in_a_row"], 2, "{job}");
    assert!(server.requests.load(Ordering::SeqCst) >= 2);
    // A probe is not a deployment of the release: the target's desired state is still the
    // deploy job's, and `target show` names the deployment that put it there.
    let detail = plane.json(&["target", "show", &target]);
    assert_eq!(detail["desired"]["release_name"], "probe-1", "{detail}");
    assert_ne!(
        detail["desired"]["deployment_id"], deployment["id"],
        "{detail}"
    );

    // Unhealthy: the service answers 500, the probe never passes, the release is rolled back.
    server.status.store(500, Ordering::SeqCst);
    let before = server.requests.load(Ordering::SeqCst);
    let out = plane.cli(&["promote", "probe-2", "--to", "dev"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let p = promotion_of(&plane, "probe-2");
    assert_eq!(p["status"], "rolled_back", "{p}");
    assert_eq!(step(&p, "deploy")["status"], "succeeded", "{p}");
    assert_eq!(step(&p, "health")["status"], "failed", "{p}");
    assert_eq!(step(&p, "rollback")["status"], "succeeded", "{p}");
    let (_, job) = finished_step_job(&plane, &p, "health");
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason_code"], "health_check_failed", "{job}");
    assert!(
        job["message"]
            .as_str()
            .unwrap()
            .contains("last answer HTTP 500"),
        "{job}"
    );
    assert!(server.requests.load(Ordering::SeqCst) > before);
    // The previous release's digest runs again.
    let ids = containers_of(&target);
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(inspect(&ids[0])["Image"], one.id.as_str());

    // This agent does not offer scripts: a script step fails with the reason, and nothing is
    // sent to the agent.
    plane.set_workflow(
        tmp.path(),
        "script",
        "name: script\nsteps:\n  - id: check\n    type: script\n    with: { command: [\"/bin/true\"] }\n",
    );
    plane.ok(&[
        "release",
        "create",
        "probe-3",
        "--component",
        &one.component("web"),
    ]);
    let out = plane.cli(&["promote", "probe-3", "--to", "dev"]);
    assert!(!out.status.success());
    let p = promotion_of(&plane, "probe-3");
    assert_eq!(p["status"], "failed", "{p}");
    let message = step(&p, "check")["message"].as_str().unwrap();
    assert!(
        message.contains("lacks the \"script\" capability") && message.contains("--allow-scripts"),
        "{p}"
    );
}

#[test]
fn script_steps_pass_on_exit_zero_and_fail_when_killed_at_their_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent_dir = tmp.path().join("agent");
    let agent = Agent::enroll(&plane, &agent_dir, "scripts");
    let _running = RunningAgent::start(&agent_dir, &["--allow-scripts"]);
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
    let target = unique("web-script");
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let _cleanup = TargetCleanup(target.clone());

    let pid_file = tmp.path().join("slow.pid");
    plane.set_workflow(
        tmp.path(),
        "scripts",
        &format!(
            "name: scripts\nsteps:\n  - id: deploy\n    type: deploy\n  - id: check\n    type: script\n    needs: [deploy]\n    with: {{ command: [\"/bin/sh\", \"-c\", \"exit 0\"] }}\n  - id: slow\n    type: script\n    needs: [check]\n    with: {{ command: [\"/bin/sh\", \"-c\", \"echo $$ > {}; exec sleep 300\"] }}\n    timeout: 2s\n",
            pid_file.display()
        ),
    );
    let repo = unique("stella-e2e/script");
    let image = TestImage::busybox_sleeper(&repo, "1");
    plane.ok(&[
        "release",
        "create",
        "script-1",
        "--component",
        &image.component("web"),
    ]);

    let out = plane.cli(&["promote", "script-1", "--to", "dev"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let p = promotion_of(&plane, "script-1");
    assert_eq!(p["status"], "failed", "{p}");
    assert_eq!(step(&p, "deploy")["status"], "succeeded", "{p}");
    assert_eq!(step(&p, "check")["status"], "succeeded", "{p}");
    assert_eq!(step(&p, "slow")["status"], "failed", "{p}");

    let (deployment, job) = finished_step_job(&plane, &p, "check");
    assert_eq!(deployment["kind"], "script");
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["outcome"]["exit_code"], 0, "{job}");

    // The slow script was killed by the agent at its timeout, not waited for.
    let (_, job) = finished_step_job(&plane, &p, "slow");
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["reason_code"], "script_timeout", "{job}");
    assert_eq!(job["outcome"]["timed_out"], true, "{job}");
    let pid = std::fs::read_to_string(&pid_file).expect("the slow script ran");
    stella_plugin_testkit::process::assert_exits(
        pid.trim().parse().unwrap(),
        Duration::from_secs(10),
        "the timed-out script",
    );
}
