//! Against the real Docker Engine and compose tool of this machine. Images are built locally from
//! the static busybox binary (nothing can be pulled); every test uses its own repository, target
//! and project names so tests can run in parallel, and cleans up behind itself, also when it fails.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use stella_plugin_compose::*;
use stella_plugin_sdk::{
    ComponentAction, ComponentSpec, Executor, NoProgress, PluginError, TargetRef,
};
use stella_plugin_testkit::docker::{
    Scratch, assert_untouched, containers_labelled, docker, exists, inspect, run_labelled,
    started_at,
};
use stella_plugin_testkit::{Recorder, deploy, deploy_fails, expect, spec};

/// Per-test names, images, projects and containers (removed when dropped) and executor state.
struct Fixture {
    scratch: Scratch,
    targets: AtomicUsize,
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
            scratch: Scratch::new("stella-ctest"),
            targets: AtomicUsize::new(0),
        }
    }

    async fn executor(&self) -> ComposeExecutor {
        ComposeExecutor::connect(self.ctx()).await.unwrap()
    }

    /// A target with the default project name (`stella-<target>`; the name is already valid).
    fn target(&self, config: Value) -> TargetRef {
        let n = self.targets.fetch_add(1, Ordering::Relaxed);
        let name = format!("t-{}-{n}", self.id);
        let project = config["project"]
            .as_str()
            .map_or_else(|| format!("stella-{name}"), str::to_string);
        // By label rather than through compose: cleanup must work even when a test left a lock
        // file compose cannot read.
        self.cleanup.labelled(&format!("{LABEL_TARGET}={name}"));
        self.cleanup
            .labelled(&format!("{COMPOSE_PROJECT}={project}"));
        self.cleanup.network(&format!("{project}_default"));
        TargetRef {
            name,
            kind: "compose".to_string(),
            config,
        }
    }
}

/// Ids of every container of the project, sorted.
fn containers_of(project: &str) -> Vec<String> {
    containers_labelled(&format!("{COMPOSE_PROJECT}={project}"))
}

fn unknown_digest() -> String {
    stella_plugin_testkit::docker::unknown_digest(0xc0)
}

fn outcome<'a>(
    out: &'a stella_plugin_sdk::DeployOutcome,
    name: &str,
) -> &'a stella_plugin_sdk::ComponentOutcome {
    out.components
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no outcome for {name}: {out:?}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn deploy_runs_labelled_services_pinned_by_digest() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let w1 = fx.sleeper("w1", 3601);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    assert_eq!(exec.kind(), "compose");
    let project = exec.project_name(&target).unwrap();
    assert_eq!(project, format!("stella-{}", target.name));
    let progress = Recorder::default();

    let s = spec(
        &target,
        "r1",
        vec![
            fx.component("web", "v1", &v1),
            fx.component("worker", "w1", &w1),
        ],
    );
    let out = exec.deploy(&s, &progress).await.unwrap();

    assert_eq!(out.components.len(), 2);
    for (name, digest) in [("web", &v1), ("worker", &w1)] {
        let c = outcome(&out, name);
        assert_eq!(&c.digest, digest);
        assert_eq!(c.action, ComponentAction::Created);
        let info = inspect(&c.workload_id);
        assert_eq!(info["Image"], json!(digest));
        assert_eq!(info["State"]["Status"], json!("running"));
        // Created from the image id, never from the tag.
        assert_eq!(info["Config"]["Image"], json!(digest));
        let labels = &info["Config"]["Labels"];
        assert_eq!(labels[LABEL_MANAGED], json!("true"));
        assert_eq!(labels[LABEL_TARGET], json!(target.name));
        assert_eq!(labels[LABEL_COMPONENT], json!(name));
        assert_eq!(labels[LABEL_DIGEST], json!(digest));
        assert_eq!(labels[LABEL_RELEASE_ID], json!("r1"));
        assert_eq!(labels[LABEL_DEPLOYMENT_ID], json!("dep-r1"));
        assert_eq!(labels[COMPOSE_PROJECT], json!(project));
        assert_eq!(labels[COMPOSE_SERVICE], json!(name));
        assert_eq!(
            info["HostConfig"]["RestartPolicy"]["Name"],
            json!("unless-stopped")
        );
    }
    assert_eq!(containers_of(&project).len(), 2);

    let lock_path = exec.lock_file_path(&target).unwrap();
    assert_eq!(
        lock_path,
        fx.state
            .path()
            .join("projects")
            .join(&target.name)
            .join(LOCK_FILE)
    );
    let lock = read(&lock_path);
    assert!(lock.contains(&format!("    image: \"{v1}\"\n")), "{lock}");
    assert!(lock.contains(&format!("    image: \"{w1}\"\n")), "{lock}");
    assert!(
        !lock.contains(&fx.repo),
        "pinned by id, never by tag: {lock}"
    );
    let block = format!(
        "x-stella:\n  release_id: \"r1\"\n  release_name: \"Release r1\"\n  environment: \"{}\"\n  \
         deployment_id: \"dep-r1\"\n  checksums:\n    \"web\": \"{v1}\"\n    \"worker\": \"{w1}\"\n",
        target.name
    );
    assert!(lock.contains(&block), "{lock}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&lock_path).unwrap().permissions().mode() & 0o777,
        0o600,
        "the lock file may hold secrets"
    );
    // Only the lock file: no temp files left behind.
    assert_eq!(
        std::fs::read_dir(lock_path.parent().unwrap())
            .unwrap()
            .count(),
        1
    );

    let lines = progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web: resolved") && l.contains("local image")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("compose: ")),
        "compose output is streamed: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("worker: container") && l.ends_with("created, running")),
        "{lines:?}"
    );

    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].component, "web");
    assert_eq!(inv[0].digest, v1);
    assert_eq!(inv[0].state, "running");
    assert_eq!(inv[0].health, None);
    assert_eq!(inv[0].workload_id, outcome(&out, "web").workload_id);
    assert_eq!(inv[0].release_id.as_deref(), Some("r1"));
    assert_eq!(inv[0].deployment_id.as_deref(), Some("dep-r1"));
    assert_eq!(inv[1].component, "worker");
    assert_eq!(inv[1].digest, w1);
    let health = exec.health_check(&target, &s.components).await.unwrap();
    assert!(health.healthy, "{health:?}");
}

#[tokio::test]
async fn redeploying_the_same_spec_changes_nothing() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let s = spec(
        &target,
        "r1",
        vec![
            fx.component("web", "v1", &v1),
            fx.component("worker", "v1", &v1),
        ],
    );

    let first = exec.deploy(&s, &NoProgress).await.unwrap();
    let lock_path = exec.lock_file_path(&target).unwrap();
    let lock_before = read(&lock_path);
    let mtime = std::fs::metadata(&lock_path).unwrap().modified().unwrap();
    let started: Vec<Value> = first
        .components
        .iter()
        .map(|c| inspect(&c.workload_id)["State"]["StartedAt"].clone())
        .collect();

    let progress = Recorder::default();
    let second = exec.deploy(&s, &progress).await.unwrap();

    for (a, b) in first.components.iter().zip(&second.components) {
        assert_eq!(b.action, ComponentAction::Unchanged);
        assert_eq!(a.workload_id, b.workload_id);
    }
    for (c, at) in second.components.iter().zip(&started) {
        assert_eq!(
            &inspect(&c.workload_id)["State"]["StartedAt"],
            at,
            "container was restarted"
        );
    }
    assert_eq!(read(&lock_path), lock_before);
    assert_eq!(
        std::fs::metadata(&lock_path).unwrap().modified().unwrap(),
        mtime,
        "an unchanged deploy must not rewrite the lock file"
    );
    let lines = progress.lines();
    assert!(
        !lines.iter().any(|l| l.starts_with("compose: ")),
        "compose must not even run: {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web: container") && l.ends_with("unchanged")),
        "{lines:?}"
    );
}

#[tokio::test]
async fn upgrades_replace_rollback_restores_and_removed_components_go() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.sleeper("v2", 3602);
    let w1 = fx.sleeper("w1", 3601);
    assert_ne!(v1, v2);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let project = exec.project_name(&target).unwrap();
    let lock_path = exec.lock_file_path(&target).unwrap();

    let r1 = spec(
        &target,
        "r1",
        vec![
            fx.component("web", "v1", &v1),
            fx.component("worker", "w1", &w1),
        ],
    );
    let first = exec.deploy(&r1, &NoProgress).await.unwrap();
    let old_web = outcome(&first, "web").workload_id.clone();

    // Upgrade web only.
    let r2 = spec(
        &target,
        "r2",
        vec![
            fx.component("web", "v2", &v2),
            fx.component("worker", "w1", &w1),
        ],
    );
    let progress = Recorder::default();
    let second = exec.deploy(&r2, &progress).await.unwrap();
    let web = outcome(&second, "web");
    assert_eq!(web.action, ComponentAction::Replaced);
    assert_ne!(web.workload_id, old_web);
    assert!(!exists(&old_web), "old web container still exists");
    let info = inspect(&web.workload_id);
    assert_eq!(info["Image"], json!(v2));
    assert_eq!(info["Config"]["Labels"][LABEL_RELEASE_ID], json!("r2"));
    let worker = inspect(&outcome(&second, "worker").workload_id);
    assert_eq!(worker["Image"], json!(w1));
    assert_eq!(worker["Config"]["Labels"][LABEL_RELEASE_ID], json!("r2"));
    assert!(read(&lock_path).contains(&format!("\"web\": \"{v2}\"")));
    assert_eq!(containers_of(&project).len(), 2);
    let lines = progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web: container") && l.contains("replaced")),
        "{lines:?}"
    );

    // Roll back to r1: its digests run again, under r1's labels.
    let back = exec.rollback(&r1, &NoProgress).await.unwrap();
    let web = outcome(&back, "web");
    assert_eq!(web.action, ComponentAction::Replaced);
    assert_eq!(inspect(&web.workload_id)["Image"], json!(v1));
    let inv = exec.inventory(&target).await.unwrap();
    let digests: Vec<(&str, &str, Option<&str>)> = inv
        .iter()
        .map(|i| {
            (
                i.component.as_str(),
                i.digest.as_str(),
                i.release_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        digests,
        vec![
            ("web", v1.as_str(), Some("r1")),
            ("worker", w1.as_str(), Some("r1"))
        ]
    );
    assert!(read(&lock_path).contains(&format!("\"web\": \"{v1}\"")));

    // A release without worker removes it.
    let r3 = spec(&target, "r3", vec![fx.component("web", "v2", &v2)]);
    let third = exec.deploy(&r3, &NoProgress).await.unwrap();
    assert_eq!(third.components.len(), 1);
    assert_eq!(
        containers_of(&project),
        vec![outcome(&third, "web").workload_id.clone()]
    );

    // An empty release leaves nothing running.
    let r4 = spec(&target, "r4", Vec::new());
    let fourth = exec.deploy(&r4, &NoProgress).await.unwrap();
    assert!(fourth.components.is_empty());
    assert!(containers_of(&project).is_empty());
    assert!(exec.inventory(&target).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_digest_mismatch_is_refused_and_nothing_changes() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.sleeper("v2", 3602);
    let mismatched = fx.sleeper("v3", 3603);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let project = exec.project_name(&target).unwrap();
    let lock_path = exec.lock_file_path(&target).unwrap();

    // On a fresh target, not even the project directory appears.
    let wanted = unknown_digest();
    let err = deploy_fails(
        &exec,
        &target,
        "r0",
        vec![fx.component("api", "v3", &wanted)],
    )
    .await;
    assert!(matches!(err, PluginError::DigestMismatch { .. }), "{err:?}");
    assert!(!exec.project_dir(&target).unwrap().exists());

    let before = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let web = before.components[0].workload_id.clone();
    let started = started_at(&web);
    let lock_before = read(&lock_path);

    // `web` alone could be honoured; `api` cannot, so nothing may be touched.
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
    assert_eq!(read(&lock_path), lock_before);
    assert_eq!(containers_of(&project), vec![web.clone()]);
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

    let err = exec.deploy(&s, &NoProgress).await.unwrap_err();

    let detail = expect::unavailable(&err, "web", &digest);
    assert!(detail.contains("does not pull"), "{detail}");
    assert!(!exec.project_dir(&target).unwrap().exists());
}

#[tokio::test]
async fn a_crashing_container_is_unhealthy_with_its_log_tail() {
    let fx = Fixture::new();
    let ok = fx.sleeper("ok", 3600);
    let crash = fx.image("crash", &[expect::CRASH_CMD]);
    let target = fx.target(json!({"health_timeout_secs": 30}));
    let exec = fx.executor().await;

    let err = deploy_fails(
        &exec,
        &target,
        "r1",
        vec![
            fx.component("web", "ok", &ok),
            fx.component("api", "crash", &crash),
        ],
    )
    .await;

    expect::crash_reported(&err, "api");
}

#[tokio::test]
async fn a_container_that_cannot_start_fails_the_deploy_with_compose_output() {
    let fx = Fixture::new();
    let ok = fx.sleeper("ok", 3600);
    let broken = fx.image("broken", &[r#"CMD ["/no/such/binary-marker"]"#]);
    let target = fx.target(json!({"health_timeout_secs": 30}));
    let exec = fx.executor().await;

    let err = deploy_fails(
        &exec,
        &target,
        "r1",
        vec![
            fx.component("web", "ok", &ok),
            fx.component("api", "broken", &broken),
        ],
    )
    .await;

    let (detail, log_tail) = expect::unhealthy(&err, "api");
    assert!(detail.contains("up failed"), "{detail}");
    assert!(log_tail.contains("binary-marker"), "{log_tail}");
    assert!(log_tail.contains(&exec.tool().command_line()), "{log_tail}");
}

#[tokio::test]
async fn service_settings_are_applied_and_secrets_stay_out_of_progress() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let secret = format!("s3cr3t-{}-$HOME", fx.id);
    let target = fx.target(json!({
        "health_timeout_secs": 60,
        "services": {
            "web": {
                "environment": {"API_TOKEN": secret, "GREETING": "hello"},
                "ports": ["80"],
                "command": ["/bin/busybox", "sh", "-c",
                    "trap 'exit 0' TERM; while :; do /bin/busybox sleep 5 & wait $!; done"],
                "healthcheck": {"test": ["CMD", "/bin/busybox", "true"], "interval_secs": 1, "retries": 3}
            }
        }
    }));
    let exec = fx.executor().await;
    let progress = Recorder::default();

    let out = exec
        .deploy(
            &spec(&target, "r1", vec![fx.component("web", "v1", &id)]),
            &progress,
        )
        .await
        .unwrap();

    let info = inspect(&out.components[0].workload_id);
    let env = info["Config"]["Env"].as_array().unwrap();
    // `$` reaches the container literally: compose must not substitute it.
    assert!(
        env.contains(&json!(format!("API_TOKEN={secret}"))),
        "{env:?}"
    );
    assert!(env.contains(&json!("GREETING=hello")), "{env:?}");
    assert_eq!(
        info["Config"]["Cmd"][3],
        json!("trap 'exit 0' TERM; while :; do /bin/busybox sleep 5 & wait $!; done")
    );
    assert!(
        info["HostConfig"]["PortBindings"]
            .as_object()
            .unwrap()
            .contains_key("80/tcp"),
        "{}",
        info["HostConfig"]
    );
    assert_eq!(info["State"]["Health"]["Status"], json!("healthy"));
    let lines = progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web: container") && l.ends_with("running, healthy")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("s3cr3t")),
        "a secret leaked into progress: {lines:?}"
    );
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv[0].health.as_deref(), Some("healthy"));

    // A changed setting is a new lock file: the service is recreated.
    let mut changed = target.clone();
    changed.config["services"]["web"]["environment"]["GREETING"] = json!("bye");
    let again = deploy(&exec, &changed, "r1", vec![fx.component("web", "v1", &id)]).await;
    assert_eq!(again.components[0].action, ComponentAction::Replaced);
    let env = inspect(&again.components[0].workload_id)["Config"]["Env"].clone();
    assert!(env.as_array().unwrap().contains(&json!("GREETING=bye")));
}

#[tokio::test]
async fn a_failing_healthcheck_is_unhealthy() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let target = fx.target(json!({
        "health_timeout_secs": 60,
        "services": {"web": {"healthcheck": {
            "test": ["CMD-SHELL", "echo probe-failed; exit 1"], "interval_secs": 1, "retries": 1
        }}}
    }));
    let exec = fx.executor().await;

    let err = deploy_fails(&exec, &target, "r1", vec![fx.component("web", "v1", &id)]).await;

    let (detail, _) = expect::unhealthy(&err, "web");
    assert!(detail.contains("unhealthy"), "{detail}");
    assert!(detail.contains("probe-failed"), "{detail}");
}

#[tokio::test]
async fn drift_behind_stellas_back_shows_in_inventory_and_is_repaired() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.sleeper("v2", 3604);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let project = exec.project_name(&target).unwrap();
    let s = spec(
        &target,
        "r1",
        vec![
            fx.component("web", "v1", &v1),
            fx.component("worker", "v1", &v1),
        ],
    );
    let out = exec.deploy(&s, &NoProgress).await.unwrap();
    let web = outcome(&out, "web").workload_id.clone();
    let worker = outcome(&out, "worker").workload_id.clone();

    // Someone stops worker...
    docker(&["stop", "-t", "1", &worker]);
    // ...and runs another image claiming to be web of this target.
    let name = format!("stella-drift-{}", fx.id);
    fx.cleanup.container(&name);
    let planted = run_labelled(
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
    assert_eq!(inv.len(), 3, "{inv:?}");
    let find = |id: &str| inv.iter().find(|i| i.workload_id == id).unwrap();
    assert_eq!(find(&web).digest, v1);
    assert_eq!(find(&web).state, "running");
    assert_eq!(find(&worker).state, "exited");
    assert_eq!(find(&planted).component, "web");
    assert_eq!(
        find(&planted).digest,
        v2,
        "inventory must show the real image, not the label"
    );
    let health = exec.health_check(&target, &s.components).await.unwrap();
    assert!(!health.healthy, "{health:?}");

    // The next deploy of the same spec repairs both instead of calling them unchanged.
    let again = exec.deploy(&s, &NoProgress).await.unwrap();
    assert_eq!(outcome(&again, "web").action, ComponentAction::Unchanged);
    assert_eq!(outcome(&again, "worker").action, ComponentAction::Replaced);
    assert!(!exists(&planted), "the planted container must be removed");
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 2, "{inv:?}");
    assert!(inv.iter().all(|i| i.state == "running" && i.digest == v1));
    assert_eq!(containers_of(&project).len(), 2);
}

#[tokio::test]
async fn a_project_held_by_something_else_is_refused() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let project = format!("stella-foreign-{}", fx.id);
    let target = fx.target(json!({ "project": project }));
    let exec = fx.executor().await;
    let name = format!("stella-foreign-{}", fx.id);
    fx.cleanup.container(&name);
    docker(&[
        "create",
        "--name",
        &name,
        "--label",
        &format!("{COMPOSE_PROJECT}={project}"),
        "--label",
        &format!("{COMPOSE_SERVICE}=db"),
        &id,
    ]);

    let err = deploy_fails(&exec, &target, "r1", vec![fx.component("web", "v1", &id)]).await;

    let m = expect::invalid_config(&err);
    assert!(m.contains("project"), "{m}");
    assert!(!exec.project_dir(&target).unwrap().exists());
    assert!(exists(&name));
}

#[tokio::test]
async fn invalid_config_is_rejected_naming_the_key() {
    let fx = Fixture::new();
    let id = fx.sleeper("v1", 3600);
    let exec = fx.executor().await;

    let bad = fx.target(json!({"health_timeout": 5}));
    let m = expect::invalid_config(&expect::failure(exec.validate_config(&bad)));
    assert!(m.contains("health_timeout"), "{m}");
    assert!(exec.validate_config(&fx.target(Value::Null)).is_ok());
    assert!(
        exec.validate_config(&fx.target(json!({
            "project": format!("p-{}", fx.id),
            "directory": "/tmp/somewhere",
            "health_timeout_secs": 5,
            "services": {"web": {"ports": ["8080:80"]}}
        })))
        .is_ok()
    );
    let mut wrong_kind = fx.target(Value::Null);
    wrong_kind.kind = "docker".to_string();
    assert!(matches!(
        exec.validate_config(&wrong_kind),
        Err(PluginError::InvalidConfig(_))
    ));

    for (config, key) in [
        (
            json!({"services": {"web": {"ports": [8080]}}}),
            "services.web.ports",
        ),
        (
            json!({"services": {"web": {"environment": ["A=1"]}}}),
            "services.web.environment",
        ),
        (
            json!({"services": {"web": {"healthcheck": {"test": "true"}}}}),
            "services.web.healthcheck.test",
        ),
        (
            json!({"services": {"web": {"restart": "always"}}}),
            "services.web.restart",
        ),
        (json!({"project": "Upper"}), "project"),
        (json!({"directory": 1}), "directory"),
    ] {
        let t = fx.target(config);
        let err = deploy_fails(&exec, &t, "r1", vec![fx.component("web", "v1", &id)]).await;
        let m = expect::invalid_config(&err);
        assert!(m.contains(key), "{key}: {m}");
    }
    assert!(
        !fx.state.path().join("projects").exists(),
        "nothing may be written for an invalid config"
    );
}

#[tokio::test]
async fn stickers_roundtrip_in_the_project_directory() {
    let fx = Fixture::new();
    let exec = fx.executor().await;
    let custom = fx.state.path().join("elsewhere").join("shop");
    let target = fx.target(json!({"directory": custom.to_str().unwrap()}));
    let path: PathBuf = custom.join("stella.version.json");
    assert_eq!(exec.sticker_path(&target).unwrap(), path);
    expect::sticker_roundtrip(&exec, &target, &path).await;

    // The default lives under the state dir, named after the target.
    let plain = fx.target(Value::Null);
    assert_eq!(
        exec.sticker_path(&plain).unwrap(),
        fx.state
            .path()
            .join("projects")
            .join(&plain.name)
            .join("stella.version.json")
    );
}

#[tokio::test]
async fn connect_finds_the_compose_tool_and_fails_cleanly_without_an_engine() {
    let fx = Fixture::new();
    let exec = fx.executor().await;
    let tool = exec.tool();
    assert!(
        tool.command_line() == "docker compose" || tool.command_line() == "docker-compose",
        "{tool:?}"
    );
    assert!(
        tool.version().to_lowercase().contains("compose"),
        "{tool:?}"
    );

    let err = ComposeExecutor::connect_with_socket(Path::new("/nonexistent/docker.sock"), fx.ctx())
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::Backend(_)), "{err:?}");
}
