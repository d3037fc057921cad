//! Nothing is lost across a plane restart: the agent reconnects by itself and the state
//! (agents, releases, deployments, targets) is intact.

use std::time::Duration;

use stella_e2e::{Stack, TestImage, containers_of, inspect, unique, wait_until};

stella_e2e::both_transports! {
#[test]
fn plane_restart_between_two_deploys() {
    let mut stack = Stack::new();
    let repo = unique("stella-e2e/restart");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");
    stack.plane.ok(&[
        "release",
        "create",
        "r1",
        "--component",
        &v1.component("web"),
    ]);
    stack.plane.ok(&["deploy", "r1", "--env", "dev"]);

    let status = stack.plane.stop().expect("plane stopped");
    assert!(status.success(), "plane exits cleanly on SIGTERM: {status}");
    stack.plane.restart();
    let id = stack.agent.id.clone();
    wait_until(
        Duration::from_secs(60),
        "the agent to reconnect by itself",
        || (stack.plane.agent_status(&id) == "connected").then_some(()),
    );

    // State intact.
    let deployments = stack.plane.json(&["deployments", "list"]);
    assert_eq!(deployments.as_array().unwrap().len(), 1);
    assert_eq!(deployments[0]["status"], "succeeded");
    assert_eq!(
        stack.plane.json(&["release", "show", "r1"])["components"][0]["digest"],
        v1.id.as_str()
    );

    stack.plane.ok(&[
        "release",
        "create",
        "r2",
        "--component",
        &v2.component("web"),
    ]);
    stack.plane.ok(&["deploy", "r2", "--env", "dev"]);
    let ids = containers_of(&stack.target);
    assert_eq!(ids.len(), 1);
    assert_eq!(inspect(&ids[0])["Image"], v2.id.as_str());
    let deployments = stack.plane.json(&["deployments", "list"]);
    assert_eq!(deployments.as_array().unwrap().len(), 2);
    // Sequences kept increasing across the restart (no replay window opened).
    let dep = stack.plane.json(&[
        "deployments",
        "show",
        deployments[0]["id"].as_str().unwrap(),
    ]);
    assert_eq!(dep["jobs"][0]["sequence"], 2);
}

#[test]
fn jobs_created_while_the_agent_is_away_are_delivered_when_it_returns() {
    let mut stack = Stack::new();
    let v1 = TestImage::busybox_sleeper(&unique("stella-e2e/offline"), "1");
    stack.agent.stop();
    let id = stack.agent.id.clone();
    stack.plane.wait_agent(&id, "disconnected");
    let dep = stack.deploy_no_wait("queued", &[v1.component("web")]);
    assert_eq!(dep["jobs"][0]["status"], "queued");
    stack.agent.start();
    let done = stack.plane.wait_deployment(dep["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(containers_of(&stack.target).len(), 1);
}
}
