//! One release, three kinds of target at once: a docker host, a compose project and an ssh host
//! (running containers through its docker CLI), all served by one agent, all through signed jobs.

use std::time::Duration;

use serde_json::json;
use stella_e2e::{
    Sshd, Stack, TargetCleanup, TestImage, containers_of, inspect, unique, wait_until,
};

#[test]
fn a_release_reaches_docker_compose_and_ssh_targets_together() {
    let stack = Stack::new();
    let p = &stack.plane;
    let agent = p.json(&["agents", "show", &stack.agent.id]);
    let caps: Vec<&str> = agent["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for kind in ["docker", "compose", "ssh"] {
        assert!(caps.contains(&kind), "agent lacks {kind}: {caps:?}");
    }

    let compose_target = unique("cmp");
    let _compose_cleanup = TargetCleanup(compose_target.clone());
    p.ok(&[
        "target",
        "create",
        &compose_target,
        "--env",
        "dev",
        "--kind",
        "compose",
        "--agent",
        &stack.agent.id,
    ]);

    let sshd = Sshd::start();
    let ssh_target = unique("ssh");
    let _ssh_cleanup = TargetCleanup(ssh_target.clone());
    let sticker = sshd.dir.path().join("remote/stella.version.json");
    let config = json!({
        "host": "127.0.0.1",
        "port": sshd.port,
        "user": "root",
        "private_key_file": sshd.client_key(),
        "host_key": sshd.host_public_key,
        "mode": "docker",
        "sticker_path": sticker,
    });
    p.ok(&[
        "target",
        "create",
        &ssh_target,
        "--env",
        "dev",
        "--kind",
        "ssh",
        "--agent",
        &stack.agent.id,
        "--config",
        &config.to_string(),
    ]);

    let repo = unique("stella-e2e/multi");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");
    let targets = [
        stack.target.clone(),
        compose_target.clone(),
        ssh_target.clone(),
    ];

    for (release, image) in [("multi-1", &v1), ("multi-2", &v2)] {
        p.ok(&[
            "release",
            "create",
            release,
            "--component",
            &image.component("web"),
        ]);
        let out = p.ok(&["deploy", release, "--env", "dev"]);
        assert!(out.contains("succeeded"), "{out}");
        let last = p.json(&["deployments"])[0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        let dep = p.json(&["deployments", "show", &last]);
        assert_eq!(
            dep["jobs"].as_array().unwrap().len(),
            3,
            "one job per target"
        );
        for target in &targets {
            let running: Vec<String> = containers_of(target)
                .into_iter()
                .filter(|id| inspect(id)["State"]["Running"] == true)
                .collect();
            assert_eq!(
                running.len(),
                1,
                "{target}: one running container for the one component"
            );
            assert_eq!(
                inspect(&running[0])["Image"],
                image.id.as_str(),
                "{target} runs the release's digest"
            );
            let detail = wait_until(Duration::from_secs(30), "inventory in sync", || {
                let d = p.json(&["targets", "show", target]);
                (d["in_sync"] == true && d["desired"]["release_name"] == release).then_some(d)
            });
            assert_eq!(
                detail["sticker"]["release_name"], release,
                "{target}: sticker read back"
            );
        }
        let remote: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&sticker).unwrap()).unwrap();
        assert_eq!(
            remote["release_name"], release,
            "the ssh sticker is written on the remote host"
        );
    }
}
