//! Mode `docker` against this machine's Docker Engine, reached through a local sshd and the
//! `docker` CLI. Images are imported from the static busybox binary (nothing can be pulled);
//! every test uses its own repository and target names and cleans up behind itself.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use common::{Recorder, Sshd, executor, spec};
use serde_json::{Value, json};
use stella_plugin_sdk::{
    ComponentAction, ComponentSpec, Executor, NoProgress, PluginError, TargetRef,
};
use stella_plugin_ssh::*;

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

fn exists(container: &str) -> bool {
    Command::new("docker")
        .args(["container", "inspect", container])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn inspect(container: &str) -> Value {
    let v: Value = serde_json::from_str(&docker(&["container", "inspect", container])).unwrap();
    v[0].clone()
}

fn containers_of(target: &TargetRef) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=stella.target={}", target.name),
    ])
    .split_whitespace()
    .map(String::from)
    .collect()
}

/// Per-test sshd, names and images; removes containers and images when dropped.
struct Fixture {
    sshd: Sshd,
    id: String,
    repo: String,
    images: Mutex<Vec<String>>,
    targets: Mutex<Vec<String>>,
}

impl Fixture {
    fn new() -> Self {
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} missing: apt-get install -y busybox-static"
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let id = format!("{}-{nanos:x}", std::process::id());
        Self {
            sshd: Sshd::start(),
            repo: format!("stella-ssh-test-{id}/app"),
            id,
            images: Mutex::new(Vec::new()),
            targets: Mutex::new(Vec::new()),
        }
    }

    fn target(&self) -> TargetRef {
        let name = format!("ssh-{}", self.id);
        self.targets.lock().unwrap().push(name.clone());
        self.sshd
            .target(&name, json!({"mode": "docker", "timeout_secs": 120}))
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

    fn component(&self, name: &str, tag: &str, digest: &str) -> ComponentSpec {
        ComponentSpec {
            name: name.to_string(),
            image: format!("{}:{tag}", self.repo),
            digest: digest.to_string(),
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for t in self.targets.lock().unwrap().iter() {
            if let Ok(out) = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label=stella.target={t}")])
                .output()
            {
                for c in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["rm", "-f", c]).output();
                }
            }
        }
        for i in self.images.lock().unwrap().iter() {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
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
    assert_eq!(info["Image"], json!(v1));
    assert_eq!(
        info["Config"]["Image"],
        json!(v1),
        "created from the id, not the tag"
    );
    assert_eq!(
        info["Name"],
        json!(format!(
            "/{}",
            SshExecutor::container_name(&target.name, "web")
        ))
    );
    assert_eq!(info["Name"], json!(format!("/stella-{}-web", target.name)));
    assert_eq!(info["State"]["Status"], json!("running"));
    let labels = &info["Config"]["Labels"];
    assert_eq!(labels[LABEL_MANAGED], json!("true"));
    assert_eq!(labels[LABEL_TARGET], json!(target.name));
    assert_eq!(labels[LABEL_COMPONENT], json!("web"));
    assert_eq!(labels[LABEL_DIGEST], json!(v1));
    assert_eq!(labels[LABEL_RELEASE_ID], json!("r1"));
    assert_eq!(labels[LABEL_DEPLOYMENT_ID], json!("dep-r1"));
    assert_eq!(labels[LABEL_JOB_ID], json!("job-r1"));
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
    let before = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "v1", &v1)]),
            &NoProgress,
        )
        .await
        .unwrap();
    let web = before.components[0].workload_id.clone();
    let started_at = inspect(&web)["State"]["StartedAt"].clone();

    // `web` alone could be honoured; `api` names a digest its local tag does not carry.
    let wanted = format!("sha256:{:0>64x}", std::process::id());
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
            assert_eq!(actual, &other);
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
async fn docker_mode_reports_a_crashing_container_with_its_log_tail() {
    let fx = Fixture::new();
    let id = fx.image(
        "crash",
        &[r#"CMD ["/bin/busybox","sh","-c","echo starting up; echo fatal: boom-marker >&2; exit 3"]"#],
    );
    let target = fx.target();
    let exec = executor(&fx.sshd);

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
            image: format!("127.0.0.1:1/stella-absent-{}", fx.id),
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
