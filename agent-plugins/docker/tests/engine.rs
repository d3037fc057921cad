//! Against the real Docker Engine of this machine. Images are built locally from the static
//! busybox binary (nothing can be pulled); every test uses its own repository and target names so
//! tests can run in parallel, and cleans up behind itself, also when it fails.

use std::ops::Deref;
use std::path::Path;

use serde_json::{Value, json};
use stella_plugin_docker::*;
use stella_plugin_sdk::{
    ComponentAction, ComponentSpec, Executor, NoProgress, PluginError, TargetRef,
};
use stella_plugin_testkit::docker::{
    Scratch, assert_untouched, containers_labelled, docker, exists, inspect, run_labelled,
    sleep_cmd, started_at,
};
use stella_plugin_testkit::{Recorder, deploy, deploy_fails, expect, spec};

/// Per-test names, images and containers (removed when dropped) and executor state.
struct Fixture {
    scratch: Scratch,
}

impl Deref for Fixture {
    type Target = Scratch;

    fn deref(&self) -> &Scratch {
        &self.scratch
    }
}

impl Fixture {
    fn new() -> Self {
        Self {
            scratch: Scratch::new("stella-test"),
        }
    }

    async fn executor(&self) -> DockerExecutor {
        DockerExecutor::connect(self.ctx()).await.unwrap()
    }

    fn target(&self, config: Value) -> TargetRef {
        let name = format!("t-{}", self.id);
        self.cleanup.labelled(&format!("{LABEL_TARGET}={name}"));
        TargetRef {
            name,
            kind: "docker".to_string(),
            config,
        }
    }
}

fn containers_of(target: &TargetRef) -> Vec<String> {
    containers_labelled(&format!("{LABEL_TARGET}={}", target.name))
}

fn unknown_digest() -> String {
    stella_plugin_testkit::docker::unknown_digest(0x5e11a)
}

#[tokio::test]
async fn deploy_creates_labelled_container_from_the_image_id() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    assert_eq!(exec.kind(), "docker");
    let progress = Recorder::default();

    let s = spec(&target, "r1", vec![fx.component("web", "v1", &id)]);
    let out = exec.deploy(&s, &progress).await.unwrap();

    assert_eq!(out.components.len(), 1);
    let c = &out.components[0];
    assert_eq!(c.name, "web");
    assert_eq!(c.digest, id);
    assert_eq!(c.action, ComponentAction::Created);
    let info = inspect(&c.workload_id);
    expect::stella_container(&info, &s, &s.components[0], &id);
    let labels = &info["Config"]["Labels"];
    assert_eq!(labels[LABEL_MANAGED], json!("true"));
    assert_eq!(labels[LABEL_COMPONENT], json!("web"));
    assert_eq!(labels[LABEL_RELEASE_NAME], json!("Release r1"));
    assert_eq!(labels[LABEL_IMAGE], json!(format!("{}:v1", fx.repo)));

    let lines = progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web: resolved") && l.contains("local image")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "web: running"), "{lines:?}");
}

#[tokio::test]
async fn redeploying_the_same_spec_changes_nothing() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let s = spec(&target, "r1", vec![fx.component("web", "v1", &id)]);

    let first = exec.deploy(&s, &NoProgress).await.unwrap();
    let started_at = inspect(&first.components[0].workload_id)["State"]["StartedAt"].clone();
    let second = exec.deploy(&s, &NoProgress).await.unwrap();

    assert_eq!(second.components[0].action, ComponentAction::Unchanged);
    assert_eq!(
        second.components[0].workload_id,
        first.components[0].workload_id
    );
    let info = inspect(&second.components[0].workload_id);
    assert_eq!(
        info["State"]["StartedAt"], started_at,
        "container was restarted"
    );
    assert_eq!(containers_of(&target).len(), 1);
}

#[tokio::test]
async fn a_new_release_replaces_the_container_and_drops_removed_components() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.image("v2", &[&sleep_cmd(3601)]);
    assert_ne!(v1, v2);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;

    let r1 = deploy(
        &exec,
        &target,
        "r1",
        vec![
            fx.component("web", "v1", &v1),
            fx.component("worker", "v1", &v1),
        ],
    )
    .await;
    let old_web = r1.components[0].workload_id.clone();
    let old_worker = r1.components[1].workload_id.clone();

    let progress = Recorder::default();
    let r2 = exec
        .deploy(
            &spec(&target, "r2", vec![fx.component("web", "v2", &v2)]),
            &progress,
        )
        .await
        .unwrap();

    assert_eq!(r2.components.len(), 1);
    assert_eq!(r2.components[0].action, ComponentAction::Replaced);
    assert_ne!(r2.components[0].workload_id, old_web);
    assert!(!exists(&old_web), "old web container still exists");
    assert!(
        !exists(&old_worker),
        "worker is not in r2 and must be removed"
    );
    let info = inspect(&r2.components[0].workload_id);
    assert_eq!(info["Image"], json!(v2));
    assert_eq!(info["Config"]["Labels"][LABEL_RELEASE_ID], json!("r2"));
    assert_eq!(
        containers_of(&target),
        vec![r2.components[0].workload_id.clone()]
    );
    let lines = progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web: replacing container")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_tag_with_other_content_is_a_digest_mismatch_and_nothing_changes() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.image("v2", &[&sleep_cmd(3602)]);
    let mismatched = fx.sleeper("v3", 3600);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let before = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let web = before.components[0].workload_id.clone();
    let started = started_at(&web);

    let wanted = unknown_digest();
    // `web` alone could be honoured; `api` cannot, so neither may be touched.
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

    expect::digest_mismatch(&err, "api", &wanted, &mismatched);
    assert_eq!(containers_of(&target), vec![web.clone()]);
    assert_untouched(&web, &v1, &started);
}

#[tokio::test]
async fn an_unknown_digest_without_a_local_tag_is_unavailable() {
    let fx = Fixture::new();
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let digest = unknown_digest();
    let s = spec(
        &target,
        "r1",
        vec![ComponentSpec {
            name: "web".to_string(),
            image: format!("{}-absent", fx.repo),
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

#[tokio::test]
async fn a_crashing_container_is_unhealthy_with_its_log_tail() {
    let fx = Fixture::new();
    let id = fx.image("crash", &[expect::CRASH_CMD]);
    let target = fx.target(json!({"health_timeout_secs": 30}));
    let exec = fx.executor().await;

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
async fn a_container_that_exits_without_restart_policy_is_unhealthy() {
    let fx = Fixture::new();
    let id = fx.image("false", &[r#"CMD ["/bin/busybox","false"]"#]);
    let target = fx.target(json!({"restart_policy": "no", "health_timeout_secs": 30}));
    let exec = fx.executor().await;

    let err = deploy_fails(
        &exec,
        &target,
        "r1",
        vec![fx.component("web", "false", &id)],
    )
    .await;

    let (detail, _) = expect::unhealthy(&err, "web");
    assert!(detail.contains("exited with code 1"), "{detail}");
}

#[tokio::test]
async fn a_healthcheck_image_is_waited_for_until_healthy() {
    let fx = Fixture::new();
    let id = fx.image(
        "hc",
        &[
            &sleep_cmd(3600),
            r#"HEALTHCHECK --interval=1s CMD ["/bin/busybox","true"]"#,
        ],
    );
    let target = fx.target(json!({"health_timeout_secs": 60}));
    let exec = fx.executor().await;
    let progress = Recorder::default();

    let out = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "hc", &id)]),
            &progress,
        )
        .await
        .unwrap();

    let info = inspect(&out.components[0].workload_id);
    assert_eq!(info["State"]["Health"]["Status"], json!("healthy"));
    assert!(
        progress
            .lines()
            .iter()
            .any(|l| l == "web: running, healthy")
    );
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv[0].health.as_deref(), Some("healthy"));
}

#[tokio::test]
async fn a_failing_healthcheck_is_unhealthy() {
    let fx = Fixture::new();
    let id = fx.image(
        "sick",
        &[
            &sleep_cmd(3600),
            r#"HEALTHCHECK --interval=1s --retries=1 CMD ["/bin/busybox","sh","-c","echo probe-failed; exit 1"]"#,
        ],
    );
    let target = fx.target(json!({"health_timeout_secs": 60}));
    let exec = fx.executor().await;

    let err = deploy_fails(&exec, &target, "r1", vec![fx.component("web", "sick", &id)]).await;

    let (detail, _) = expect::unhealthy(&err, "web");
    assert!(detail.contains("unhealthy"), "{detail}");
    assert!(detail.contains("probe-failed"), "{detail}");
}

#[tokio::test]
async fn inventory_reports_what_really_runs() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.image("v2", &[&sleep_cmd(3603)]);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    assert!(exec.inventory(&target).await.unwrap().is_empty());

    let out = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].component, "web");
    assert_eq!(inv[0].digest, v1);
    assert_eq!(inv[0].state, "running");
    assert_eq!(inv[0].health, None);
    assert_eq!(inv[0].workload_id, out.components[0].workload_id);
    assert_eq!(inv[0].release_id.as_deref(), Some("r1"));
    assert_eq!(inv[0].deployment_id.as_deref(), Some("dep-r1"));

    // Someone swaps the workload behind Stella's back, keeping Stella's labels.
    let name = format!("stella-drift-{}", fx.id);
    fx.cleanup.container(&name);
    docker(&["rm", "-f", &out.components[0].workload_id]);
    let drifted = run_labelled(
        &name,
        &[
            (LABEL_MANAGED, "true"),
            (LABEL_TARGET, &target.name),
            (LABEL_COMPONENT, "web"),
            (LABEL_DIGEST, &v1),
            (LABEL_RELEASE_ID, "r1"),
        ],
        &v2,
    );

    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].component, "web");
    assert_eq!(inv[0].digest, v2, "inventory must show the real image");
    assert_eq!(inv[0].workload_id, drifted);
    assert_eq!(inv[0].state, "running");

    // The next deploy of the same release repairs the drift instead of calling it unchanged.
    let again = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    assert_eq!(again.components[0].action, ComponentAction::Replaced);
    assert!(!exists(&drifted));
    assert_eq!(exec.inventory(&target).await.unwrap()[0].digest, v1);
}

#[tokio::test]
async fn target_config_is_applied_and_a_change_recreates() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let target = fx.target(
        json!({"env": {"GREETING": "hello"}, "restart_policy": "always", "network": "bridge"}),
    );
    let exec = fx.executor().await;
    let s = spec(&target, "r1", vec![fx.component("web", "v1", &id)]);
    let first = exec.deploy(&s, &NoProgress).await.unwrap();
    let info = inspect(&first.components[0].workload_id);
    assert!(
        info["Config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&json!("GREETING=hello"))
    );
    assert_eq!(info["HostConfig"]["RestartPolicy"]["Name"], json!("always"));
    assert_eq!(info["HostConfig"]["NetworkMode"], json!("bridge"));

    let mut changed = s.clone();
    changed.target.config = json!({"env": {"GREETING": "bye"}, "restart_policy": "always"});
    let second = exec.deploy(&changed, &NoProgress).await.unwrap();
    assert_eq!(second.components[0].action, ComponentAction::Replaced);
    let info = inspect(&second.components[0].workload_id);
    assert!(
        info["Config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&json!("GREETING=bye"))
    );
}

#[tokio::test]
async fn invalid_config_is_rejected_naming_the_key() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let exec = fx.executor().await;

    let bad = fx.target(json!({"health_timeout": 5}));
    let m = expect::invalid_config(&expect::failure(exec.validate_config(&bad)));
    assert!(m.contains("health_timeout"), "{m}");
    assert!(
        exec.validate_config(&fx.target(json!({"health_timeout_secs": 5})))
            .is_ok()
    );
    assert!(exec.validate_config(&fx.target(Value::Null)).is_ok());

    let wrong_type = fx.target(json!({"restart_policy": 1}));
    let err = deploy_fails(
        &exec,
        &wrong_type,
        "r1",
        vec![fx.component("web", "v1", &id)],
    )
    .await;
    let m = expect::invalid_config(&err);
    assert!(m.contains("restart_policy"), "{m}");
    assert!(containers_of(&wrong_type).is_empty());

    let missing_net = fx.target(json!({"network": format!("no-such-net-{}", fx.id)}));
    let err = deploy_fails(
        &exec,
        &missing_net,
        "r1",
        vec![fx.component("web", "v1", &id)],
    )
    .await;
    let m = expect::invalid_config(&err);
    assert!(m.contains("network"), "{m}");
    assert!(containers_of(&missing_net).is_empty());
}

#[tokio::test]
async fn stickers_roundtrip_on_the_agent_host() {
    let fx = Fixture::new();
    let exec = fx.executor().await;
    let target = TargetRef {
        name: format!("prod/eu {}", fx.id),
        kind: "docker".to_string(),
        config: Value::Null,
    };
    let path = fx
        .state
        .path()
        .join("targets")
        .join(format!("prod_eu_{}", fx.id))
        .join("stella.version.json");
    assert_eq!(exec.sticker_path(&target), path);
    expect::sticker_roundtrip(&exec, &target, &path).await;
}

#[tokio::test]
async fn connect_with_socket_fails_cleanly_for_a_missing_socket() {
    let fx = Fixture::new();
    let err = DockerExecutor::connect_with_socket(Path::new("/nonexistent/docker.sock"), fx.ctx())
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::Backend(_)), "{err:?}");
    DockerExecutor::connect_with_socket(Path::new("/var/run/docker.sock"), fx.ctx())
        .await
        .unwrap();
}
