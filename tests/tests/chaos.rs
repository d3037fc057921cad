//! Chaos with real processes: the plane is SIGKILLed at several points of a multi-target
//! deployment (3 targets on 2 agents) and restarted each time. The deployment completes, no job
//! is lost, and no effect is duplicated: the engine saw exactly one container created per target
//! (counted from the engine's own event log, not from Stella's records).

use std::time::Duration;

use stella_e2e::{Agent, Plane, TargetCleanup, TestImage, docker, free_port, unique, wait_until};

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
    let until = docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let created = docker(&[
        "events", "--since", &since, "--until", &until,
        "--filter", "type=container", "--filter", "event=create",
        "--filter", &format!("label=stella.deployment.id={id}"),
        "--format", "{{index .Actor.Attributes \"stella.target\"}}",
    ]);
    let mut per_target: Vec<&str> = created.lines().filter(|l| !l.is_empty()).collect();
    per_target.sort_unstable();
    let mut expected: Vec<&str> = targets.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(per_target, expected, "exactly one container created per target");
    for a in &mut agents {
        assert!(a.is_running(), "agents were never restarted");
    }
}
}
