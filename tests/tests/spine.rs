//! The spine end to end: a real plane and agent as processes, real mTLS, the machine's Docker
//! Engine. Deploy, check what really runs, replace with a second release.

use std::time::Duration;

use stella_e2e::{Stack, TestImage, containers_of, inspect, unique, wait_until};

stella_e2e::both_transports! {
#[test]
fn deploys_a_release_and_replaces_it_with_the_next() {
    let stack = Stack::new();
    let plane = &stack.plane;
    let repo = unique("stella-e2e/app");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");
    assert_ne!(v1.id, v2.id);

    // The agent announced its docker capability and is connected.
    let agents = plane.json(&["agents"]);
    let me = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == stack.agent.id.as_str())
        .unwrap()
        .clone();
    assert_eq!(me["status"], "connected");
    assert!(
        me["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "docker")
    );
    assert!(me["last_heartbeat"].is_string());

    plane.ok(&[
        "release",
        "create",
        "demo-1",
        "--component",
        &v1.component("web"),
    ]);
    let out = plane.ok(&["deploy", "demo-1", "--env", "dev"]);
    assert!(out.contains("succeeded"), "{out}");

    let ids = containers_of(&stack.target);
    assert_eq!(ids.len(), 1, "one container for the one component");
    let c = inspect(&ids[0]);
    assert_eq!(
        c["Image"],
        v1.id.as_str(),
        "the container runs exactly the release's digest"
    );
    assert_eq!(c["State"]["Running"], true);
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["stella.component"], "web");
    assert_eq!(labels["stella.digest"], v1.id.as_str());
    let deployments = plane.json(&["deployments", "list"]);
    let dep1 = deployments[0]["id"].as_str().unwrap().to_string();
    assert_eq!(labels["stella.deployment.id"], dep1.as_str());
    let release = plane.json(&["release", "show", "demo-1"]);
    assert_eq!(labels["stella.release.id"], release["id"]);

    // The version sticker is written for the target.
    let sticker_path = stack
        .agent
        .dir
        .join("executors/docker/targets")
        .join(&stack.target)
        .join("stella.version.json");
    let sticker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sticker_path).unwrap()).unwrap();
    assert_eq!(sticker["release_name"], "demo-1");
    assert_eq!(sticker["deployment_id"], dep1.as_str());
    assert_eq!(sticker["components"][0]["digest"], v1.id.as_str());

    // Inventory reached the plane: desired equals observed.
    let detail = wait_until(
        Duration::from_secs(30),
        "inventory of the first release",
        || {
            let d = plane.json(&["targets", "show", &stack.target]);
            (d["in_sync"] == true).then_some(d)
        },
    );
    assert_eq!(detail["desired"]["release_name"], "demo-1");
    assert_eq!(detail["observed"][0]["digest"], v1.id.as_str());
    assert_eq!(detail["observed"][0]["state"], "running");
    assert_eq!(detail["sticker"]["release_name"], "demo-1");

    // A second release replaces the first container.
    plane.ok(&[
        "release",
        "create",
        "demo-2",
        "--component",
        &v2.component("web"),
    ]);
    plane.ok(&["deploy", "demo-2", "--env", "dev"]);
    let ids2 = containers_of(&stack.target);
    assert_eq!(ids2.len(), 1, "the old container is gone");
    assert_ne!(ids2[0], ids[0]);
    assert_eq!(inspect(&ids2[0])["Image"], v2.id.as_str());
    let detail = wait_until(
        Duration::from_secs(30),
        "inventory of the second release",
        || {
            let d = plane.json(&["targets", "show", &stack.target]);
            (d["in_sync"] == true && d["desired"]["release_name"] == "demo-2").then_some(d)
        },
    );
    assert_eq!(detail["observed"].as_array().unwrap().len(), 1);

    let last = plane.json(&["deployments", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deployment = plane.json(&["deployments", "show", &last]);
    assert_eq!(deployment["status"], "succeeded");
    assert_eq!(deployment["jobs"][0]["status"], "succeeded");
    assert!(
        deployment["jobs"][0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"] == "version sticker written")
    );

    let text = plane.metrics();
    assert!(text.contains("stella_agents_connected 1"), "{text}");
    assert!(
        text.contains("stella_deployments_total{status=\"succeeded\"} 2"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "stella_agent_heartbeat_age_seconds{{agent=\"{}\"",
            stack.agent.id
        )),
        "{text}"
    );
}
}
