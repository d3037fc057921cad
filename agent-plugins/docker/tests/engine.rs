//! Against the real Docker Engine of this machine. Images are built locally from the static
//! busybox binary (nothing can be pulled); every test uses its own repository and target names so
//! tests can run in parallel, and cleans up behind itself, also when it fails.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};
use stella_plugin_docker::*;
use stella_plugin_sdk::{
    ComponentAction, ComponentSpec, DeploySpec, Executor, ExecutorContext, NoProgress, PluginError,
    ProgressSink, STICKER_SCHEMA, TargetRef, VersionSticker,
};

const BUSYBOX: &str = "/bin/busybox";

/// A long-running CMD that exits promptly on SIGTERM (a bare `sleep` as PID 1 ignores it, and
/// every stop would then wait the engine's full 10 s grace period). `secs` varies the config so
/// that images built from it differ.
fn sleep_cmd(secs: u32) -> String {
    format!(
        r#"CMD ["/bin/busybox","sh","-c","trap 'exit 0' TERM; while :; do /bin/busybox sleep {secs} & wait $!; done"]"#
    )
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Per-test names, images and containers; removes them all when dropped.
struct Fixture {
    id: String,
    repo: String,
    images: Mutex<Vec<String>>,
    targets: Mutex<Vec<String>>,
    containers: Mutex<Vec<String>>,
    state: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing: apt-get install -y busybox-static"
        );
        let id = unique();
        Self {
            repo: format!("stella-test-{id}/app"),
            id,
            images: Mutex::new(Vec::new()),
            targets: Mutex::new(Vec::new()),
            containers: Mutex::new(Vec::new()),
            state: tempfile::tempdir().unwrap(),
        }
    }

    fn ctx(&self) -> ExecutorContext {
        ExecutorContext {
            state_dir: self.state.path().to_path_buf(),
        }
    }

    async fn executor(&self) -> DockerExecutor {
        DockerExecutor::connect(self.ctx()).await.unwrap()
    }

    fn target(&self, config: Value) -> TargetRef {
        let name = format!("t-{}", self.id);
        self.targets.lock().unwrap().push(name.clone());
        TargetRef {
            name,
            kind: "docker".to_string(),
            config,
        }
    }

    /// Imports a busybox rootfs as `<repo>:<tag>` with the given Dockerfile changes; returns its id.
    fn image(&self, tag: &str, changes: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
        // Makes each image's content distinct, not just its config.
        std::fs::write(rootfs.join("tag"), tag).unwrap();
        let tar = dir.path().join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let reference = format!("{}:{tag}", self.repo);
        let mut args = vec!["import".to_string()];
        for c in changes {
            args.push("--change".to_string());
            args.push(c.to_string());
        }
        args.push(tar.to_string_lossy().into_owned());
        args.push(reference.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args);
        self.images.lock().unwrap().push(reference.clone());
        docker(&["image", "inspect", "-f", "{{.Id}}", &reference])
    }

    fn sleeper(&self, tag: &str) -> String {
        self.image(tag, &[&sleep_cmd(3600)])
    }

    fn component(&self, name: &str, tag: &str, digest: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: format!("{}:{tag}", self.repo),
            digest: digest.to_string(),
        }
    }

    fn track_container(&self, name: &str) {
        self.containers.lock().unwrap().push(name.to_string());
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let mut doomed: Vec<String> = self.containers.lock().unwrap().clone();
        for t in self.targets.lock().unwrap().iter() {
            let ids = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label=stella.target={t}")])
                .output();
            if let Ok(out) = ids {
                doomed.extend(
                    String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .map(String::from),
                );
            }
        }
        for c in doomed {
            let _ = Command::new("docker").args(["rm", "-f", &c]).output();
        }
        for i in self.images.lock().unwrap().iter() {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
    }
}

fn spec(target: &TargetRef, release: &str, components: Vec<ComponentSpec>) -> DeploySpec {
    DeploySpec {
        job_id: format!("job-{release}"),
        deployment_id: format!("dep-{release}"),
        release_id: release.to_string(),
        release_name: format!("Release {release}"),
        target: target.clone(),
        components,
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl ProgressSink for Recorder {
    fn progress(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

impl Recorder {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

fn inspect(container: &str) -> Value {
    let raw = docker(&["container", "inspect", container]);
    let v: Value = serde_json::from_str(&raw).unwrap();
    v[0].clone()
}

fn exists(container: &str) -> bool {
    docker_ok(&["container", "inspect", container])
}

fn containers_of(target: &TargetRef) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=stella.target={}", target.name),
    ]);
    out.split_whitespace().map(String::from).collect()
}

fn unknown_digest() -> String {
    // Unique per call so that no other test can make it resolvable by accident.
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!(
        "sha256:{:016x}{:016x}{:016x}{:016x}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed),
        0x5e11a_u64
    )
}

#[tokio::test]
async fn deploy_creates_labelled_container_from_the_image_id() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1");
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
    assert_eq!(info["Image"], json!(id));
    assert_eq!(info["Name"], json!(format!("/stella-{}-web", target.name)));
    assert_eq!(info["State"]["Status"], json!("running"));
    // Created from the id, never from the tag.
    assert_eq!(info["Config"]["Image"], json!(id));
    let labels = &info["Config"]["Labels"];
    assert_eq!(labels[LABEL_MANAGED], json!("true"));
    assert_eq!(labels[LABEL_TARGET], json!(target.name));
    assert_eq!(labels[LABEL_COMPONENT], json!("web"));
    assert_eq!(labels[LABEL_DIGEST], json!(id));
    assert_eq!(labels[LABEL_RELEASE_ID], json!("r1"));
    assert_eq!(labels[LABEL_RELEASE_NAME], json!("Release r1"));
    assert_eq!(labels[LABEL_DEPLOYMENT_ID], json!("dep-r1"));
    assert_eq!(labels[LABEL_JOB_ID], json!("job-r1"));
    assert_eq!(labels[LABEL_IMAGE], json!(format!("{}:v1", fx.repo)));
    assert_eq!(
        info["HostConfig"]["RestartPolicy"]["Name"],
        json!("unless-stopped")
    );

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
    let id = fx.sleeper("v1");
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
    let v1 = fx.sleeper("v1");
    let v2 = fx.image("v2", &[&sleep_cmd(3601)]);
    assert_ne!(v1, v2);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;

    let r1 = exec
        .deploy(
            &spec(
                &target,
                "r1",
                vec![
                    fx.component("web", "v1", &v1),
                    fx.component("worker", "v1", &v1),
                ],
            ),
            &NoProgress,
        )
        .await
        .unwrap();
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
    let v1 = fx.sleeper("v1");
    let v2 = fx.image("v2", &[&sleep_cmd(3602)]);
    let mismatched = fx.sleeper("v3");
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let before = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "v1", &v1)]),
            &NoProgress,
        )
        .await
        .unwrap();
    let web = before.components[0].workload_id.clone();
    let started_at = inspect(&web)["State"]["StartedAt"].clone();

    let wanted = unknown_digest();
    // `web` alone could be honoured; `api` cannot, so neither may be touched.
    let err = exec
        .deploy(
            &spec(
                &target,
                "r2",
                vec![
                    fx.component("web", "v2", &v2),
                    fx.component("api", "v3", &wanted),
                ],
            ),
            &NoProgress,
        )
        .await
        .unwrap_err();

    match &err {
        PluginError::DigestMismatch {
            component,
            expected,
            actual,
            ..
        } => {
            assert_eq!(component, "api");
            assert_eq!(expected, &wanted);
            assert_eq!(actual, &mismatched);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert_eq!(err.reason_code(), "digest_mismatch");
    assert_eq!(containers_of(&target), vec![web.clone()]);
    let info = inspect(&web);
    assert_eq!(info["Image"], json!(v1));
    assert_eq!(info["State"]["StartedAt"], started_at);
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

    match &err {
        PluginError::ImageUnavailable {
            component,
            digest: d,
            detail,
        } => {
            assert_eq!(component, "web");
            assert_eq!(d, &digest);
            assert!(!detail.is_empty());
        }
        other => panic!("expected ImageUnavailable, got {other:?}"),
    }
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
    let id = fx.image(
        "crash",
        &[r#"CMD ["/bin/busybox","sh","-c","echo starting up; echo fatal: boom-marker >&2; exit 3"]"#],
    );
    let target = fx.target(json!({"health_timeout_secs": 30}));
    let exec = fx.executor().await;

    let err = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "crash", &id)]),
            &NoProgress,
        )
        .await
        .unwrap_err();

    match &err {
        PluginError::Unhealthy {
            component,
            detail,
            log_tail,
        } => {
            assert_eq!(component, "web");
            assert!(
                detail.contains("exit") || detail.contains("restart"),
                "{detail}"
            );
            assert!(log_tail.contains("boom-marker"), "{log_tail:?}");
            assert!(log_tail.contains("starting up"), "{log_tail:?}");
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
}

#[tokio::test]
async fn a_container_that_exits_without_restart_policy_is_unhealthy() {
    let fx = Fixture::new();
    let id = fx.image("false", &[r#"CMD ["/bin/busybox","false"]"#]);
    let target = fx.target(json!({"restart_policy": "no", "health_timeout_secs": 30}));
    let exec = fx.executor().await;

    let err = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "false", &id)]),
            &NoProgress,
        )
        .await
        .unwrap_err();

    match &err {
        PluginError::Unhealthy { detail, .. } => {
            assert!(detail.contains("exited with code 1"), "{detail}")
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
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

    let err = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "sick", &id)]),
            &NoProgress,
        )
        .await
        .unwrap_err();

    match &err {
        PluginError::Unhealthy { detail, .. } => {
            assert!(detail.contains("unhealthy"), "{detail}");
            assert!(detail.contains("probe-failed"), "{detail}");
        }
        other => panic!("expected Unhealthy, got {other:?}"),
    }
}

#[tokio::test]
async fn inventory_reports_what_really_runs() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1");
    let v2 = fx.image("v2", &[&sleep_cmd(3603)]);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    assert!(exec.inventory(&target).await.unwrap().is_empty());

    let out = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "v1", &v1)]),
            &NoProgress,
        )
        .await
        .unwrap();
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
    fx.track_container(&name);
    docker(&["rm", "-f", &out.components[0].workload_id]);
    let label = |k: &str, v: &str| format!("{k}={v}");
    let drifted = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        &label(LABEL_MANAGED, "true"),
        "--label",
        &label(LABEL_TARGET, &target.name),
        "--label",
        &label(LABEL_COMPONENT, "web"),
        "--label",
        &label(LABEL_DIGEST, &v1),
        "--label",
        &label(LABEL_RELEASE_ID, "r1"),
        &v2,
    ]);

    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].component, "web");
    assert_eq!(inv[0].digest, v2, "inventory must show the real image");
    assert_eq!(inv[0].workload_id, drifted);
    assert_eq!(inv[0].state, "running");

    // The next deploy of the same release repairs the drift instead of calling it unchanged.
    let again = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "v1", &v1)]),
            &NoProgress,
        )
        .await
        .unwrap();
    assert_eq!(again.components[0].action, ComponentAction::Replaced);
    assert!(!exists(&drifted));
    assert_eq!(exec.inventory(&target).await.unwrap()[0].digest, v1);
}

#[tokio::test]
async fn target_config_is_applied_and_a_change_recreates() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1");
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
    let id = fx.sleeper("v1");
    let exec = fx.executor().await;

    let bad = fx.target(json!({"health_timeout": 5}));
    match exec.validate_config(&bad) {
        Err(PluginError::InvalidConfig(m)) => assert!(m.contains("health_timeout"), "{m}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(
        exec.validate_config(&fx.target(json!({"health_timeout_secs": 5})))
            .is_ok()
    );
    assert!(exec.validate_config(&fx.target(Value::Null)).is_ok());

    let wrong_type = fx.target(json!({"restart_policy": 1}));
    let err = exec
        .deploy(
            &spec(&wrong_type, "r1", vec![fx.component("web", "v1", &id)]),
            &NoProgress,
        )
        .await
        .unwrap_err();
    match &err {
        PluginError::InvalidConfig(m) => assert!(m.contains("restart_policy"), "{m}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert_eq!(err.reason_code(), "invalid_target_config");
    assert!(containers_of(&wrong_type).is_empty());

    let missing_net = fx.target(json!({"network": format!("no-such-net-{}", fx.id)}));
    match exec
        .deploy(
            &spec(&missing_net, "r1", vec![fx.component("web", "v1", &id)]),
            &NoProgress,
        )
        .await
    {
        Err(PluginError::InvalidConfig(m)) => assert!(m.contains("network"), "{m}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
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
    assert_eq!(exec.read_sticker(&target).await.unwrap(), None);

    let s = spec(
        &target,
        "r1",
        vec![ComponentSpec {
            name: "web".to_string(),
            image: "demo/app:1".to_string(),
            digest: format!("sha256:{}", "c".repeat(64)),
        }],
    );
    let sticker = VersionSticker::for_deploy(&s, "2025-01-01T00:00:00Z".to_string());
    exec.write_sticker(&target, &sticker).await.unwrap();
    assert_eq!(
        exec.read_sticker(&target).await.unwrap(),
        Some(sticker.clone())
    );

    let path = fx
        .state
        .path()
        .join("targets")
        .join(format!("prod_eu_{}", fx.id))
        .join("stella.version.json");
    assert_eq!(exec.sticker_path(&target), path);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // No temp files left behind.
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );

    // Overwrite is atomic and complete.
    let mut next = sticker.clone();
    next.release_id = "r2".to_string();
    exec.write_sticker(&target, &next).await.unwrap();
    assert_eq!(exec.read_sticker(&target).await.unwrap(), Some(next));

    let mut foreign: Value = serde_json::to_value(&sticker).unwrap();
    foreign["schema"] = json!("stella.version/v999");
    std::fs::write(&path, serde_json::to_vec(&foreign).unwrap()).unwrap();
    assert!(matches!(
        exec.read_sticker(&target).await,
        Err(PluginError::Sticker(_))
    ));
    std::fs::write(&path, b"{not json").unwrap();
    assert!(matches!(
        exec.read_sticker(&target).await,
        Err(PluginError::Sticker(_))
    ));
    assert_eq!(STICKER_SCHEMA, sticker.schema);
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
