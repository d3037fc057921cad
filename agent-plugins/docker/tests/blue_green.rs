//! Blue-green deploys against the real Docker Engine of this machine: green starts beside blue,
//! takes the stable name once ready, and blue stops; a green that does not become ready goes and
//! blue keeps running; every state an interrupted switch leaves converges on a re-run. Images are
//! built locally from the static busybox binary; every test has its own names and cleans up.

use std::ops::Deref;

use serde_json::{Value, json};
use stella_plugin_docker::*;
use stella_plugin_sdk::{
    ComponentAction, ComponentSpec, DeployMode, DeploySpec, Executor, NoProgress, TargetRef,
    VersionSticker, labels,
};
use stella_plugin_testkit::docker::{
    Scratch, assert_untouched, containers_labelled, docker, exists, inspect, sleep_cmd, started_at,
};
use stella_plugin_testkit::{Recorder, deploy, expect, spec};

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
            scratch: Scratch::new("stella-bgtest"),
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

    /// An image that sleeps and whose health check passes within a second or two.
    fn healthy(&self, tag: &str) -> String {
        self.image(
            tag,
            &[
                &sleep_cmd(3600),
                r#"HEALTHCHECK --interval=1s CMD ["/bin/busybox","true"]"#,
            ],
        )
    }

    /// An image that runs but whose health check never passes.
    fn sick(&self, tag: &str) -> String {
        self.image(
            tag,
            &[
                &sleep_cmd(3600),
                r#"HEALTHCHECK --interval=1s --retries=1 CMD ["/bin/busybox","sh","-c","echo green-probe-failed; exit 1"]"#,
            ],
        )
    }
}

fn blue_green(target: &TargetRef, release: &str, components: Vec<ComponentSpec>) -> DeploySpec {
    DeploySpec {
        strategy: DeployMode::BlueGreen,
        ..spec(target, release, components)
    }
}

fn containers_of(target: &TargetRef) -> Vec<String> {
    containers_labelled(&format!("{LABEL_TARGET}={}", target.name))
}

/// Where `first` .. `last` appear in `lines` (as prefixes), in that order.
fn assert_in_order(lines: &[String], wanted: &[&str]) {
    let mut from = 0;
    for w in wanted {
        let at = lines[from..]
            .iter()
            .position(|l| l.starts_with(w))
            .unwrap_or_else(|| panic!("no line {w:?} after line {from} in {lines:#?}"));
        from += at + 1;
    }
}

/// A container of component `c` of `s` as the executor would have started it under `name`
/// (restart policy, every label), standing for what an interrupted blue-green run left.
fn run_like_the_executor(name: &str, s: &DeploySpec, c: &ComponentSpec, image_id: &str) -> String {
    let mut args: Vec<String> = ["run", "-d", "--name", name, "--restart", "unless-stopped"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    for (k, v) in labels::container_labels(s, c) {
        args.push("--label".to_string());
        args.push(format!("{k}={v}"));
    }
    args.push(image_id.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args)
}

#[tokio::test]
async fn blue_green_switches_to_the_new_digest_under_the_stable_name() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.healthy("v2");
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    assert!(exec.supports(DeployMode::BlueGreen));
    let r1 = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let blue = r1.components[0].workload_id.clone();

    let s2 = blue_green(&target, "r2", vec![fx.component("web", "v2", &v2)]);
    let progress = Recorder::default();
    let out = exec.deploy(&s2, &progress).await.unwrap();

    let c = &out.components[0];
    assert_eq!(c.action, ComponentAction::Replaced);
    assert_eq!(c.digest, v2);
    assert_ne!(c.workload_id, blue);
    assert!(!exists(&blue), "blue still exists");
    // Exactly what a replace deploy leaves: the stable name, every label of r2.
    expect::stella_container(&inspect(&c.workload_id), &s2, &s2.components[0], &v2);
    assert_eq!(containers_of(&target), vec![c.workload_id.clone()]);
    assert!(!exists(&green_name(&target.name, "web")));
    assert!(!exists(&retired_name(&target.name, "web")));
    let inventory = exec.inventory(&target).await.unwrap();
    assert_eq!(inventory.len(), 1, "{inventory:?}");
    assert_eq!(inventory[0].digest, v2);
    assert_eq!(inventory[0].release_id.as_deref(), Some("r2"));
    assert_eq!(inventory[0].health.as_deref(), Some("healthy"));
    let lines = progress.lines();
    assert_in_order(
        &lines,
        &[
            "web: starting green",
            "web: green healthy",
            "web: switched",
            "web: stopped blue",
        ],
    );

    // The sticker the agent writes after the deploy describes what now runs.
    let sticker = VersionSticker::for_deploy(&s2, "2030-01-01T00:00:00Z".to_string());
    exec.write_sticker(&target, &sticker).await.unwrap();
    let read = exec.read_sticker(&target).await.unwrap().unwrap();
    assert_eq!(read.release_id, "r2");
    assert_eq!(read.components[0].digest, inventory[0].digest);

    // The same job again changes nothing.
    let started = started_at(&c.workload_id);
    let again = exec.deploy(&s2, &NoProgress).await.unwrap();
    assert_eq!(again.components[0].action, ComponentAction::Unchanged);
    assert_eq!(again.components[0].workload_id, c.workload_id);
    assert_untouched(&c.workload_id, &v2, &started);
}

#[tokio::test]
async fn a_first_blue_green_deploy_creates_under_the_stable_name() {
    let fx = Fixture::new();
    let v1 = fx.healthy("v1");
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;

    let s1 = blue_green(&target, "r1", vec![fx.component("web", "v1", &v1)]);
    let out = exec.deploy(&s1, &NoProgress).await.unwrap();

    assert_eq!(out.components[0].action, ComponentAction::Created);
    expect::stella_container(
        &inspect(&out.components[0].workload_id),
        &s1,
        &s1.components[0],
        &v1,
    );
    assert_eq!(containers_of(&target).len(), 1);
}

/// All or nothing per target: `web`'s green was ready, `api`'s never became healthy, so both
/// greens go and both blues run on, never restarted.
#[tokio::test]
async fn a_green_that_fails_its_health_check_goes_and_blue_keeps_running() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let good = fx.healthy("v2");
    let sick = fx.sick("v2-sick");
    let target = fx.target(json!({"health_timeout_secs": 30}));
    let exec = fx.executor().await;
    let r1 = deploy(
        &exec,
        &target,
        "r1",
        vec![
            fx.component("web", "v1", &v1),
            fx.component("api", "v1", &v1),
        ],
    )
    .await;
    let blues: Vec<(String, Value)> = r1
        .components
        .iter()
        .map(|c| (c.workload_id.clone(), started_at(&c.workload_id)))
        .collect();

    let s2 = blue_green(
        &target,
        "r2",
        vec![
            fx.component("web", "v2", &good),
            fx.component("api", "v2-sick", &sick),
        ],
    );
    let progress = Recorder::default();
    let err = exec.deploy(&s2, &progress).await.unwrap_err();

    let (detail, _) = expect::unhealthy(&err, "api");
    assert!(detail.contains("green-probe-failed"), "{detail}");
    for (id, started) in &blues {
        assert_untouched(id, &v1, started);
    }
    let mut left = containers_of(&target);
    left.sort();
    let mut wanted: Vec<String> = blues.iter().map(|(id, _)| id.clone()).collect();
    wanted.sort();
    assert_eq!(left, wanted, "a green was left behind");
    for component in ["web", "api"] {
        assert!(!exists(&green_name(&target.name, component)));
    }
    let inventory = exec.inventory(&target).await.unwrap();
    assert!(inventory.iter().all(|i| i.digest == v1), "{inventory:?}");
    let lines = progress.lines();
    assert!(
        lines.iter().any(|l| l == "web: green healthy"),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("api: removing green") && l.contains("keeps running")),
        "{lines:#?}"
    );
    assert!(!lines.iter().any(|l| l.contains("switched")), "{lines:#?}");
}

/// A run killed between its two renames left blue under the retired name, nothing under the
/// stable one, and a green of some other release: the next run puts blue back, replaces the
/// foreign green, and switches.
#[tokio::test]
async fn a_switch_interrupted_between_its_renames_converges() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.healthy("v2");
    let v3 = fx.sleeper("v3", 3603);
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let r1 = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let blue = r1.components[0].workload_id.clone();
    docker(&["rename", &blue, &retired_name(&target.name, "web")]);
    let s3 = spec(&target, "r3", vec![fx.component("web", "v3", &v3)]);
    let stale_green = run_like_the_executor(
        &green_name(&target.name, "web"),
        &s3,
        &s3.components[0],
        &v3,
    );

    let s2 = blue_green(&target, "r2", vec![fx.component("web", "v2", &v2)]);
    let progress = Recorder::default();
    let out = exec.deploy(&s2, &progress).await.unwrap();

    let c = &out.components[0];
    assert_eq!(c.action, ComponentAction::Replaced);
    expect::stella_container(&inspect(&c.workload_id), &s2, &s2.components[0], &v2);
    assert!(!exists(&blue));
    assert!(!exists(&stale_green));
    assert_eq!(containers_of(&target), vec![c.workload_id.clone()]);
    assert_in_order(
        &progress.lines(),
        &[
            "web: renaming",
            "web: removing green",
            "web: starting green",
            "web: switched",
            "web: stopped blue",
        ],
    );
}

/// A run killed after green took the stable name but before blue was removed left blue under
/// the retired name; the next blue-green deploy (of another release) removes it first, since
/// the current container is about to need that name.
#[tokio::test]
async fn a_retired_blue_left_after_a_switch_goes_with_the_next_one() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.sleeper("v2", 3602);
    let v3 = fx.healthy("v3");
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let r1 = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let old_blue = r1.components[0].workload_id.clone();
    docker(&["rename", &old_blue, &retired_name(&target.name, "web")]);
    let s2 = spec(&target, "r2", vec![fx.component("web", "v2", &v2)]);
    let current = run_like_the_executor(
        &format!("stella-{}-web", target.name),
        &s2,
        &s2.components[0],
        &v2,
    );

    let s3 = blue_green(&target, "r3", vec![fx.component("web", "v3", &v3)]);
    let progress = Recorder::default();
    let out = exec.deploy(&s3, &progress).await.unwrap();

    let c = &out.components[0];
    expect::stella_container(&inspect(&c.workload_id), &s3, &s3.components[0], &v3);
    assert!(!exists(&old_blue));
    assert!(!exists(&current));
    assert_eq!(containers_of(&target), vec![c.workload_id.clone()]);
    assert_in_order(
        &progress.lines(),
        &[
            "web: starting green",
            "web: green healthy",
            "web: removing stray container",
            "web: switched",
            "web: stopped blue",
        ],
    );
}

/// A run killed while its green (of the wanted release) was starting: the next run reuses that
/// green instead of starting another, and a run after that changes nothing.
#[tokio::test]
async fn a_green_of_the_wanted_release_left_running_is_reused() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.healthy("v2");
    let target = fx.target(Value::Null);
    let exec = fx.executor().await;
    let r1 = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let blue = r1.components[0].workload_id.clone();
    let s2 = blue_green(&target, "r2", vec![fx.component("web", "v2", &v2)]);
    let left_green = run_like_the_executor(
        &green_name(&target.name, "web"),
        &s2,
        &s2.components[0],
        &v2,
    );

    let progress = Recorder::default();
    let out = exec.deploy(&s2, &progress).await.unwrap();

    let c = &out.components[0];
    assert_eq!(
        c.workload_id, left_green,
        "the leftover green was not reused"
    );
    expect::stella_container(&inspect(&c.workload_id), &s2, &s2.components[0], &v2);
    assert!(!exists(&blue));
    assert_eq!(containers_of(&target), vec![left_green.clone()]);
    let lines = progress.lines();
    assert!(
        lines.iter().any(|l| l.starts_with("web: reusing green")),
        "{lines:#?}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("web: starting green")),
        "{lines:#?}"
    );

    let again = exec.deploy(&s2, &NoProgress).await.unwrap();
    assert_eq!(again.components[0].action, ComponentAction::Unchanged);
    assert_eq!(again.components[0].workload_id, left_green);
}

/// Other containers on the target's network reach the component by its stable name; after the
/// switch that name leads to green.
#[tokio::test]
async fn the_stable_name_resolves_to_green_after_the_switch() {
    let fx = Fixture::new();
    let network = format!("stella-bgnet-{}", fx.id);
    docker(&["network", "create", &network]);
    fx.cleanup.network(&network);
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.healthy("v2");
    let target = fx.target(json!({ "network": network }));
    let exec = fx.executor().await;
    let s1 = blue_green(&target, "r1", vec![fx.component("web", "v1", &v1)]);
    exec.deploy(&s1, &NoProgress).await.unwrap();

    let s2 = blue_green(&target, "r2", vec![fx.component("web", "v2", &v2)]);
    let out = exec.deploy(&s2, &NoProgress).await.unwrap();

    let green_ip = inspect(&out.components[0].workload_id)["NetworkSettings"]["Networks"]
        [network.as_str()]["IPAddress"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!green_ip.is_empty());
    let stable = format!("stella-{}-web", target.name);
    let answer = docker(&[
        "run",
        "--rm",
        "--network",
        &network,
        &v1,
        "/bin/busybox",
        "nslookup",
        &stable,
    ]);
    assert!(answer.contains(&green_ip), "{stable} -> {answer}");
}

#[tokio::test]
async fn blue_green_on_a_shared_network_namespace_is_refused_before_anything_changes() {
    let fx = Fixture::new();
    let v1 = fx.sleeper("v1", 3600);
    let v2 = fx.sleeper("v2", 3601);
    let target = fx.target(json!({"network": "host"}));
    let exec = fx.executor().await;
    let r1 = deploy(&exec, &target, "r1", vec![fx.component("web", "v1", &v1)]).await;
    let blue = r1.components[0].workload_id.clone();
    let started = started_at(&blue);

    let s2 = blue_green(&target, "r2", vec![fx.component("web", "v2", &v2)]);
    let err = exec.deploy(&s2, &NoProgress).await.unwrap_err();

    let message = expect::invalid_config(&err);
    assert!(
        message.contains("network") && message.contains("host"),
        "{message}"
    );
    assert!(message.contains("all-at-once"), "{message}");
    assert_untouched(&blue, &v1, &started);
    assert_eq!(containers_of(&target), vec![blue]);
}
