//! Mode `docker` against this machine's Docker Engine, reached through a local sshd and the
//! `docker` CLI. Images are imported from the static busybox binary (nothing can be pulled);
//! every test uses its own repository and target names and cleans up behind itself.

mod common;

use common::{SshTargets, executor};
use serde_json::json;
use stella_plugin_sdk::{ComponentAction, ComponentSpec, Executor, NoProgress, TargetRef};
use stella_plugin_ssh::*;
use stella_plugin_testkit::docker::{
    Scratch, assert_untouched, containers_labelled, exists, inspect, sleep_cmd, started_at,
};
use stella_plugin_testkit::sshd::Sshd;
use stella_plugin_testkit::{Recorder, deploy, deploy_fails, expect, spec};

fn containers_of(target: &TargetRef) -> Vec<String> {
    containers_labelled(&format!("{LABEL_TARGET}={}", target.name))
}

/// Per-test sshd, names and images; removes containers and images when dropped.
struct Fixture {
    sshd: Sshd,
    scratch: Scratch,
}

impl Fixture {
    fn new() -> Self {
        Self {
            sshd: Sshd::start(),
            scratch: Scratch::new("stella-ssh-test"),
        }
    }

    fn target(&self) -> TargetRef {
        let name = format!("ssh-{}", self.scratch.id);
        self.scratch
            .cleanup
            .labelled(&format!("{LABEL_TARGET}={name}"));
        self.sshd
            .target(&name, json!({"mode": "docker", "timeout_secs": 120}))
    }

    fn image(&self, tag: &str, changes: &[&str]) -> String {
        self.scratch.image(tag, changes)
    }

    fn component(&self, name: &str, tag: &str, digest: &str) -> ComponentSpec {
        self.scratch.component(name, tag, digest)
    }
}

#[tokio::test]
async fn docker_mode_deploys_upgrades_and_reports_inventory() {
    let fx = Fixture::new();
    let v1 = fx.image("v1", &[&sleep_cmd(3600)]);
    let v2 = fx.image("v2", &[&sleep_cmd(3601)]);
    assert_ne!(v1, v2);
    let target = fx.target();
    let exec = executor(&fx.sshd);
    exec.validate_config(&target).unwrap();
    assert!(exec.inventory(&target).await.unwrap().is_empty());

    let progress = Recorder::default();
    let r1 = spec(
        &target,
        "r1",
        vec![
            fx.component("web", "v1", &v1),
            fx.component("worker", "v1", &v1),
        ],
    );
    let out = exec.deploy(&r1, &progress).await.unwrap();

    assert_eq!(out.components.len(), 2);
    let web = &out.components[0];
    assert_eq!(web.action, ComponentAction::Created);
    let info = inspect(&web.workload_id);
    expect::stella_container(&info, &r1, &r1.components[0], &v1);
    assert_eq!(
        info["Name"],
        json!(format!(
            "/{}",
            SshExecutor::container_name(&target.name, "web")
        ))
    );
    assert_eq!(info["Config"]["Labels"][LABEL_JOB_ID], json!("job-r1"));
    let lines = progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web: resolved") && l.contains("local image")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "web: running"), "{lines:?}");

    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].component, "web");
    assert_eq!(inv[0].digest, v1);
    assert_eq!(inv[0].state, "running");
    assert_eq!(inv[0].workload_id, web.workload_id);
    assert_eq!(inv[0].release_id.as_deref(), Some("r1"));
    assert_eq!(inv[0].deployment_id.as_deref(), Some("dep-r1"));
    assert!(
        exec.health_check(&target, &r1.components)
            .await
            .unwrap()
            .healthy
    );

    // The same spec again touches nothing.
    let started_at = info["State"]["StartedAt"].clone();
    let again = exec.deploy(&r1, &NoProgress).await.unwrap();
    assert!(
        again
            .components
            .iter()
            .all(|c| c.action == ComponentAction::Unchanged)
    );
    assert_eq!(again.components[0].workload_id, web.workload_id);
    assert_eq!(inspect(&web.workload_id)["State"]["StartedAt"], started_at);

    // Upgrade: web moves to v2, worker is not in r2 and goes away.
    let progress = Recorder::default();
    let r2 = exec
        .deploy(
            &spec(&target, "r2", vec![fx.component("web", "v2", &v2)]),
            &progress,
        )
        .await
        .unwrap();
    assert_eq!(r2.components[0].action, ComponentAction::Replaced);
    assert!(!exists(&web.workload_id));
    assert!(!exists(&out.components[1].workload_id));
    assert_eq!(
        containers_of(&target),
        vec![r2.components[0].workload_id.clone()]
    );
    let info = inspect(&r2.components[0].workload_id);
    assert_eq!(info["Image"], json!(v2));
    assert_eq!(info["Config"]["Labels"][LABEL_RELEASE_ID], json!("r2"));
    assert!(
        progress
            .lines()
            .iter()
            .any(|l| l.starts_with("web: replacing container")),
        "{:?}",
        progress.lines()
    );
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].digest, v2);
    assert_eq!(inv[0].release_id.as_deref(), Some("r2"));
}

#[tokio::test]
async fn docker_mode_refuses_a_digest_mismatch_before_changing_anything() {
    let fx = Fixture::new();
    let v1 = fx.image("v1", &[&sleep_cmd(3600)]);
    let v2 = fx.image("v2", &[&sleep_cmd(3602)]);
    let other = fx.image("v3", &[&sleep_cmd(3603)]);
    let target = fx.target();
    let exec = executor(&fx.sshd);
    let before = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let web = before.components[0].workload_id.clone();
    let started = started_at(&web);

    // `web` alone could be honoured; `api` names a digest its local tag does not carry.
    let wanted = format!("sha256:{:0>64x}", std::process::id());
    let err = deploy_fails(
        &exec,
        &target,
        "r2",
        vec![
            fx.component("web", "v2", &v2),
            fx.component("api", "v3", &wanted),
        ],
    )
    .await;

    expect::digest_mismatch(&err, "api", &wanted, &other);
    assert_eq!(containers_of(&target), vec![web.clone()]);
    assert_untouched(&web, &v1, &started);
}

#[tokio::test]
async fn docker_mode_reports_a_crashing_container_with_its_log_tail() {
    let fx = Fixture::new();
    let id = fx.image("crash", &[expect::CRASH_CMD]);
    let target = fx.target();
    let exec = executor(&fx.sshd);

    let err = deploy_fails(
        &exec,
        &target,
        "r1",
        vec![fx.component("web", "crash", &id)],
    )
    .await;

    expect::crash_reported(&err, "web");
}

#[tokio::test]
async fn docker_mode_reports_an_unpullable_digest_as_unavailable() {
    let fx = Fixture::new();
    let target = fx.target();
    let exec = executor(&fx.sshd);
    let digest = format!(
        "sha256:{:0>64x}",
        0x5e11_0000_u64 + u64::from(std::process::id())
    );
    // A registry on a closed loopback port: the pull fails without leaving this machine.
    let s = spec(
        &target,
        "r1",
        vec![ComponentSpec {
            name: "web".to_string(),
            image: format!("127.0.0.1:1/stella-absent-{}", fx.scratch.id),
            digest: digest.clone(),
        }],
    );
    let progress = Recorder::default();

    let err = exec.deploy(&s, &progress).await.unwrap_err();

    expect::unavailable(&err, "web", &digest);
    assert!(containers_of(&target).is_empty());
    assert!(
        progress
            .lines()
            .iter()
            .any(|l| l.starts_with("web: pulling"))
    );
}
