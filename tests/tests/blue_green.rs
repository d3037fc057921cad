//! Blue-green through the plane: an environment whose workflow deploys with
//! `strategy: blue-green` switches its docker target to each new release (green started beside
//! blue, blue stopped only after the switch), keeps the old release serving when the new one
//! does not come up, and is refused before any job is signed for a target whose kind cannot
//! switch — and, should a blue-green job for such a target be signed anyway, its agent refuses
//! it before its executor touches anything.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;
use stella_e2e::{
    Plane, Stack, TargetCleanup, TestImage, containers_of, inspect, sql_exec, sql_string, unique,
    wait_until,
};
use stella_pki::{DeployMode, Envelope, JobPayload, SigningKey};

const BLUE_GREEN: &str = "\
name: blue-green
steps:
  - id: deploy
    type: deploy
    with: { strategy: blue-green }
    timeout: 5m
  - id: health
    type: health-check
    needs: [deploy]
    with: { container: true, interval: 1s, healthy_after: 2 }
    timeout: 1m
  - id: rollback
    type: rollback
    needs: [deploy, health]
    when: on_failure
";

fn set_workflow(plane: &Plane, dir: &Path, env: &str) {
    let file = dir.join(format!("{env}-blue-green.yaml"));
    std::fs::write(&file, BLUE_GREEN).unwrap();
    plane.ok(&["env", "set", env, "--workflow", &file.display().to_string()]);
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

use stella_e2e::promotion_step as step;

/// The messages of the one job of the deploy step's deployment.
fn deploy_job_events(plane: &Plane, promotion: &Value) -> Vec<String> {
    let deployments = step(promotion, "deploy")["deployments"]
        .as_array()
        .expect("deployments")
        .clone();
    assert_eq!(deployments.len(), 1, "{promotion}");
    let deployment = plane.wait_deployment(deployments[0].as_str().unwrap());
    let jobs = deployment["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{deployment}");
    jobs[0]["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect()
}

fn release(plane: &Plane, name: &str, image: &TestImage) {
    plane.ok(&[
        "release",
        "create",
        name,
        "--component",
        &image.component("web"),
    ]);
}

#[test]
fn a_blue_green_workflow_switches_the_target_to_each_new_release() {
    let stack = Stack::new();
    let plane = &stack.plane;
    set_workflow(plane, stack.tmp.path(), "dev");
    let repo = unique("stella-e2e/bg");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");
    release(plane, "bg-1", &v1);
    release(plane, "bg-2", &v2);

    let out = plane.ok(&["promote", "bg-1", "--to", "dev"]);
    assert!(out.contains("deployed"), "{out}");
    let first = containers_of(&stack.target);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(inspect(&first[0])["Image"], v1.id.as_str());

    let out = plane.ok(&["promote", "bg-2", "--to", "dev"]);
    assert!(out.contains("deployed"), "{out}");
    let p = promotion_of(plane, "bg-2");
    assert_eq!(p["status"], "deployed", "{p}");

    // One container, release 2's digest, under the stable name; release 1's is gone.
    let now = containers_of(&stack.target);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], first[0]);
    let c = inspect(&now[0]);
    assert_eq!(c["Image"], v2.id.as_str());
    assert_eq!(c["State"]["Running"], true);
    assert_eq!(c["Name"], format!("/stella-{}-web", stack.target));
    assert_eq!(c["Config"]["Labels"]["stella.digest"], v2.id.as_str());

    // The job switched blue-green: green first, blue stopped after the switch.
    let events = deploy_job_events(plane, &p);
    let at = |prefix: &str| {
        events
            .iter()
            .position(|e| e.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {events:#?}"))
    };
    assert!(at("web: starting green") < at("web: green"));
    assert!(at("web: green running") < at("web: switched"));
    assert!(at("web: switched") < at("web: stopped blue"));
    assert!(at("web: stopped blue") < at("version sticker written"));

    let sticker: Value = serde_json::from_slice(
        &std::fs::read(
            stack
                .agent
                .dir
                .join("executors/docker/targets")
                .join(&stack.target)
                .join("stella.version.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(sticker["release_name"], "bg-2");
    assert_eq!(sticker["components"][0]["digest"], v2.id.as_str());
    let detail = plane.json(&["target", "show", &stack.target]);
    assert_eq!(detail["desired"]["release_name"], "bg-2", "{detail}");
}

/// The point of blue-green: release 2 never comes up, so release 1's container keeps running,
/// never stopped or restarted, and the promotion fails.
#[test]
fn a_blue_green_release_that_does_not_come_up_leaves_the_old_one_running() {
    let stack = Stack::new();
    let plane = &stack.plane;
    set_workflow(plane, stack.tmp.path(), "dev");
    let repo = unique("stella-e2e/bgfail");
    let good = TestImage::busybox_sleeper(&repo, "good");
    let bad = TestImage::build(&repo, "bad", &["/bin/busybox", "sh", "-c", "exit 3"]);
    release(plane, "good-1", &good);
    release(plane, "bad-2", &bad);
    plane.ok(&["promote", "good-1", "--to", "dev"]);
    let blue = containers_of(&stack.target);
    assert_eq!(blue.len(), 1, "{blue:?}");
    let started_at = inspect(&blue[0])["State"]["StartedAt"].clone();

    let out = plane.cli(&["promote", "bad-2", "--to", "dev"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");

    let p = promotion_of(plane, "bad-2");
    assert_eq!(step(&p, "deploy")["status"], "failed", "{p}");
    // The workflow's rollback runs as usual; the target already runs release 1, so it finds
    // nothing to change (the container is not even restarted, see below).
    assert_eq!(step(&p, "rollback")["status"], "succeeded", "{p}");
    assert_eq!(p["status"], "rolled_back", "{p}");
    let events = deploy_job_events(plane, &p);
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("web: removing green") && e.contains("keeps running")),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.contains("switched")),
        "{events:#?}"
    );
    assert_eq!(containers_of(&stack.target), blue, "green was left behind");
    let c = inspect(&blue[0]);
    assert_eq!(c["Image"], good.id.as_str());
    assert_eq!(c["State"]["Running"], true);
    assert_eq!(c["State"]["StartedAt"], started_at, "blue was restarted");
}

/// A compose target cannot switch blue-green: the plane says so, naming the target, when the
/// template is set on its environment, and (for a target added afterwards) when the step
/// deploys, before a single job is signed, so no target of the environment changes.
#[test]
fn blue_green_to_a_target_that_cannot_switch_is_refused_before_any_job() {
    let stack = Stack::new();
    let plane = &stack.plane;
    plane.ok(&["env", "create", "stage"]);
    let (refused_target, _cleanup) = compose_target(&stack, "stage");
    let file = stack.tmp.path().join("stage-blue-green.yaml");
    std::fs::write(&file, BLUE_GREEN).unwrap();
    let refused = plane.fails(&[
        "env",
        "set",
        "stage",
        "--workflow",
        &file.display().to_string(),
    ]);
    assert!(
        refused.contains("blue-green") && refused.contains(&format!("{refused_target} (compose)")),
        "{refused}"
    );
    let env = plane.json(&["env", "show", "stage"]);
    assert!(
        env["settings"]["workflow"].is_null(),
        "the refused template was stored: {env}"
    );

    // Targets come and go: one added after the template was set is caught at deploy time.
    plane.ok(&["env", "create", "qa"]);
    set_workflow(plane, stack.tmp.path(), "qa");
    let (late_target, _late_cleanup) = compose_target(&stack, "qa");
    let repo = unique("stella-e2e/bgcmp");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    release(plane, "cmp-1", &v1);

    let out = plane.cli(&["promote", "cmp-1", "--to", "qa"]);
    assert!(!out.status.success());

    let p = promotion_of(plane, "cmp-1");
    assert_eq!(p["status"], "failed", "{p}");
    let deploy = step(&p, "deploy");
    let message = deploy["message"].as_str().unwrap_or_default();
    assert!(message.contains("blue-green"), "{deploy}");
    assert!(
        message.contains(&format!("{late_target} (compose)")),
        "{deploy}"
    );
    assert_eq!(deploy["deployments"], serde_json::json!([]), "{deploy}");
    let deployments = plane.json(&["deployments", "list"]);
    assert_eq!(deployments, serde_json::json!([]), "{deployments}");
}

/// A compose target in environment `env` of `stack`.
fn compose_target(stack: &Stack, env: &str) -> (String, TargetCleanup) {
    let target = unique("cmp");
    stack.plane.ok(&[
        "target",
        "create",
        &target,
        "--env",
        env,
        "--kind",
        "compose",
        "--agent",
        &stack.agent.id,
    ]);
    (target.clone(), TargetCleanup(target))
}

/// Defence in depth: a blue-green job for a compose target, signed with the plane's real key
/// (as a plane predating the kind check would sign it), is refused by the agent as
/// `unsupported_strategy`; the compose executor never runs, so nothing is deployed.
#[test]
fn an_agent_refuses_a_blue_green_job_its_executor_cannot_run() {
    let mut stack = Stack::new();
    stack.plane.ok(&["env", "create", "stage"]);
    let (target, _cleanup) = compose_target(&stack, "stage");
    let repo = unique("stella-e2e/bgrefuse");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    release(&stack.plane, "cmp-1", &v1);
    stack.agent.stop();
    let agent_id = stack.agent.id.clone();
    wait_until(Duration::from_secs(30), "the agent to disconnect", || {
        (stack.plane.agent_status(&agent_id) == "disconnected").then_some(())
    });
    let deployment = stack
        .plane
        .json(&["deploy", "cmp-1", "--env", "stage", "--no-wait"]);
    let job_id = deployment["jobs"][0]["id"].as_str().unwrap().to_string();
    let db = stack.plane.db();
    let envelope: Envelope = serde_json::from_str(&sql_string(
        &db,
        "SELECT envelope FROM jobs WHERE id = $1",
        &[&job_id],
    ))
    .unwrap();
    let mut payload: JobPayload =
        serde_json::from_slice(&B64.decode(&envelope.payload).unwrap()).unwrap();
    assert_eq!(payload.strategy, DeployMode::Replace);
    payload.strategy = DeployMode::BlueGreen;
    let key = SigningKey::from_pem(
        &std::fs::read_to_string(stack.plane.dir.join("pki/job-signing.key")).unwrap(),
    )
    .unwrap();
    let resigned = serde_json::to_string(&stella_pki::sign_job(&key, &payload).unwrap()).unwrap();
    assert_eq!(
        sql_exec(
            &db,
            "UPDATE jobs SET envelope = $1 WHERE id = $2",
            &[&resigned, &job_id]
        ),
        1
    );

    stack.agent.start();
    let finished = stack
        .plane
        .wait_deployment(deployment["id"].as_str().unwrap());

    assert_eq!(finished["status"], "failed", "{finished:#}");
    let job = &finished["jobs"][0];
    assert_eq!(job["status"], "refused", "{job:#}");
    assert_eq!(job["reason_code"], "unsupported_strategy", "{job:#}");
    let message = job["message"].as_str().unwrap();
    assert!(
        message.contains("compose") && message.contains("blue-green"),
        "{message}"
    );
    assert_eq!(containers_of(&target), Vec::<String>::new());
}
