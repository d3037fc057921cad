//! Script mode, stickers, and connection failures against a real OpenSSH server started by each
//! test (see `common`).

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{SshTargets, executor};
use serde_json::json;
use stella_plugin_sdk::{
    ComponentAction, ComponentSpec, Executor, NoProgress, PluginError, VersionSticker,
};
use stella_plugin_testkit::sshd::{Sshd, fingerprint, keygen};
use stella_plugin_testkit::{Recorder, deploy_fails, expect, free_port, spec};

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn component(name: &str, c: char) -> ComponentSpec {
    ComponentSpec {
        name: name.to_string(),
        image: format!("registry.example:5000/demo/{name}:1"),
        digest: digest(c),
    }
}

#[tokio::test]
async fn a_script_deploy_streams_output_and_gets_the_release_in_its_environment() {
    let sshd = Sshd::start();
    let out = sshd.path("env.out");
    let script = format!(
        "echo \"deploying $STELLA_RELEASE_ID\"\n\
         echo 'to stderr' >&2\n\
         env | grep '^STELLA_' | sort > {}\n\
         printf 'no newline at the end'",
        out.display()
    );
    let target = sshd.target("app-1", json!({"deploy_script": script}));
    let exec = executor(&sshd);
    assert_eq!(exec.kind(), "ssh");
    exec.validate_config(&target).unwrap();
    let progress = Recorder::default();
    let s = spec(
        &target,
        "r1",
        vec![component("web-api", 'a'), component("worker", 'b')],
    );

    let outcome = exec.deploy(&s, &progress).await.unwrap();

    let lines = progress.lines();
    assert!(lines.iter().any(|l| l == "deploying r1"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "to stderr"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l == "no newline at the end"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("connected to root@127.0.0.1:")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("__stella_pgid")),
        "{lines:?}"
    );

    let env = std::fs::read_to_string(&out).unwrap();
    assert!(env.contains("STELLA_RELEASE_ID=r1\n"), "{env}");
    assert!(env.contains("STELLA_RELEASE_NAME=Release r1\n"), "{env}");
    assert!(env.contains("STELLA_DEPLOYMENT_ID=dep-r1\n"), "{env}");
    assert!(env.contains("STELLA_JOB_ID=job-r1\n"), "{env}");
    assert!(env.contains("STELLA_TARGET=app-1\n"), "{env}");
    assert!(
        env.contains(&format!(
            "STELLA_IMAGE_WEB_API=registry.example:5000/demo/web-api@{}\n",
            digest('a')
        )),
        "{env}"
    );
    assert!(
        env.contains(&format!(
            "STELLA_IMAGE_WORKER=registry.example:5000/demo/worker@{}\n",
            digest('b')
        )),
        "{env}"
    );
    let components = env
        .lines()
        .find_map(|l| l.strip_prefix("STELLA_COMPONENTS="))
        .unwrap();
    let components: Vec<ComponentSpec> = serde_json::from_str(components).unwrap();
    assert_eq!(components, s.components);

    assert_eq!(outcome.components.len(), 2);
    assert!(
        outcome
            .components
            .iter()
            .all(|c| c.action == ComponentAction::Created)
    );
    assert_eq!(outcome.components[0].name, "web-api");
    assert_eq!(outcome.components[0].digest, digest('a'));
    assert!(
        outcome.components[0]
            .workload_id
            .starts_with("ssh://root@127.0.0.1:"),
        "{}",
        outcome.components[0].workload_id
    );

    // With the agent's sticker in place, the same release is unchanged and a new one replaces.
    let sticker = VersionSticker::for_deploy(&s, "2025-01-01T00:00:00Z".to_string());
    exec.write_sticker(&target, &sticker).await.unwrap();
    let again = exec.deploy(&s, &NoProgress).await.unwrap();
    assert!(
        again
            .components
            .iter()
            .all(|c| c.action == ComponentAction::Unchanged)
    );
    let next = spec(&target, "r2", vec![component("web-api", 'c')]);
    let replaced = exec.deploy(&next, &NoProgress).await.unwrap();
    assert_eq!(replaced.components[0].action, ComponentAction::Replaced);
    assert!(
        std::fs::read_to_string(&out)
            .unwrap()
            .contains("STELLA_RELEASE_ID=r2\n")
    );
}

#[tokio::test]
async fn a_failing_script_reports_its_exit_status_and_output_tail() {
    let sshd = Sshd::start();
    let script = "for i in $(seq 1 80); do echo \"line $i\"; done; echo 'fatal: boom' >&2; exit 3";
    let target = sshd.target("app-1", json!({"deploy_script": script}));
    let exec = executor(&sshd);
    let progress = Recorder::default();

    let err = exec
        .deploy(&spec(&target, "r1", vec![component("web", 'a')]), &progress)
        .await
        .unwrap_err();

    let msg = expect::backend(&err);
    assert!(msg.contains("exit status 3"), "{msg}");
    assert!(msg.contains("fatal: boom"), "{msg}");
    assert!(msg.lines().any(|l| l == "line 80"), "{msg}");
    assert!(msg.lines().any(|l| l == "line 32"), "{msg}");
    // Only the last 50 lines: 49 of stdout and the error.
    assert!(!msg.lines().any(|l| l == "line 31"), "{msg}");
    assert_eq!(err.reason_code(), "backend_error");
    // Everything was streamed while it ran.
    assert!(progress.lines().iter().any(|l| l == "line 1"));
}

#[tokio::test]
async fn a_script_past_its_timeout_is_killed_and_reported() {
    let sshd = Sshd::start();
    // Unique per test process, so that the check below cannot see another test's sleep.
    let secs = 40_000 + std::process::id() % 10_000;
    let marker = sshd.path("finished");
    let script = format!("echo started; sleep {secs}; touch {}", marker.display());
    let target = sshd.target("app-1", json!({"deploy_script": script, "timeout_secs": 2}));
    let exec = executor(&sshd);
    let progress = Recorder::default();

    let started = Instant::now();
    let err = exec
        .deploy(&spec(&target, "r1", vec![component("web", 'a')]), &progress)
        .await
        .unwrap_err();
    let took = started.elapsed();

    match &err {
        PluginError::Timeout { seconds, what } => {
            assert_eq!(*seconds, 2);
            assert!(what.contains("deploy script"), "{what}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(progress.lines().iter().any(|l| l == "started"));
    // The remote process group is gone, not just our channel.
    let pattern = format!("sleep {secs}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive = Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .unwrap()
            .status
            .success();
        if !alive {
            break;
        }
        assert!(Instant::now() < deadline, "remote `{pattern}` still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!marker.exists());
}

#[tokio::test]
async fn stickers_roundtrip_over_sftp() {
    let sshd = Sshd::start();
    let target = sshd.target("app-1", json!({"deploy_script": "true"}));
    let exec = executor(&sshd);
    let path = std::path::PathBuf::from(sshd.sticker_path());
    expect::sticker_roundtrip(&exec, &target, &path).await;
}

#[tokio::test]
async fn script_inventory_comes_from_the_sticker_or_the_inventory_script() {
    let sshd = Sshd::start();
    let target = sshd.target("app-1", json!({"deploy_script": "true"}));
    let exec = executor(&sshd);
    assert!(exec.inventory(&target).await.unwrap().is_empty());

    let s = spec(
        &target,
        "r1",
        vec![component("web", 'a'), component("worker", 'b')],
    );
    let sticker = VersionSticker::for_deploy(&s, "2025-01-01T00:00:00Z".to_string());
    exec.write_sticker(&target, &sticker).await.unwrap();
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].component, "web");
    assert_eq!(inv[0].digest, digest('a'));
    assert_eq!(inv[0].state, "unknown");
    assert_eq!(inv[0].release_id.as_deref(), Some("r1"));
    assert_eq!(inv[0].deployment_id.as_deref(), Some("dep-r1"));

    // The script sees what really runs: web still on its digest, worker drifted.
    let script = format!(
        "echo '{{\"component\":\"web\",\"digest\":\"{}\",\"state\":\"running\",\"health\":\"healthy\"}}'\n\
         echo\n\
         echo '{{\"component\":\"worker\",\"digest\":\"{}\",\"state\":\"exited\"}}'",
        digest('a'),
        digest('f')
    );
    let with_script = sshd.target(
        "app-1",
        json!({"deploy_script": "true", "inventory_script": script}),
    );
    let inv = exec.inventory(&with_script).await.unwrap();
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].state, "running");
    assert_eq!(inv[0].health.as_deref(), Some("healthy"));
    assert_eq!(inv[0].release_id.as_deref(), Some("r1"));
    assert_eq!(inv[1].component, "worker");
    assert_eq!(inv[1].digest, digest('f'));
    assert_eq!(inv[1].state, "exited");
    assert_eq!(inv[1].release_id, None);

    let health = exec
        .health_check(&with_script, &s.components)
        .await
        .unwrap();
    assert!(!health.healthy);
    assert!(health.components[0].healthy);

    let broken = sshd.target(
        "app-1",
        json!({"deploy_script": "true", "inventory_script": "echo not-json"}),
    );
    let m = expect::backend(&expect::failure(exec.inventory(&broken).await));
    assert!(m.contains("line 1"), "{m}");
}

#[tokio::test]
async fn a_server_with_another_host_key_is_refused() {
    let sshd = Sshd::start();
    let touched = sshd.path("touched");
    let target = sshd.target(
        "app-1",
        json!({
            "host_key": sshd.other_host_pub,
            "deploy_script": format!("touch {}", touched.display()),
        }),
    );
    let exec = executor(&sshd);

    let err = deploy_fails(&exec, &target, "r1", vec![component("web", 'a')]).await;

    let msg = expect::backend(&err);
    let expected = fingerprint(&sshd.path("other_host_key.pub"));
    let got = fingerprint(&sshd.path("host_key.pub"));
    assert!(
        msg.contains(&format!("host key mismatch: expected {expected}")),
        "{msg}"
    );
    assert!(msg.contains(&format!("got {got}")), "{msg}");
    assert!(!touched.exists());
    assert!(matches!(
        exec.read_sticker(&target).await,
        Err(PluginError::Backend(m)) if m.contains("host key mismatch")
    ));
}

#[tokio::test]
async fn a_key_the_server_does_not_know_is_a_clear_auth_error() {
    let sshd = Sshd::start();
    let target = sshd.target(
        "app-1",
        json!({
            "private_key_file": sshd.stranger_key.display().to_string(),
            "deploy_script": "true",
        }),
    );
    let exec = executor(&sshd);

    let err = deploy_fails(&exec, &target, "r1", vec![component("web", 'a')]).await;

    let m = expect::backend(&err);
    assert!(m.contains("authentication as root failed"), "{m}");
    assert!(
        m.contains(&fingerprint(&sshd.path("stranger_key.pub"))),
        "{m}"
    );
}

#[tokio::test]
async fn credentials_come_from_a_file_or_the_agent_environment() {
    let sshd = Sshd::start();
    let exec = executor(&sshd);

    let missing = sshd.target(
        "app-1",
        json!({"private_key_file": "/nonexistent/id_ed25519", "deploy_script": "true"}),
    );
    let m = expect::backend(&expect::failure(exec.read_sticker(&missing).await));
    assert!(
        m.contains("private_key_file /nonexistent/id_ed25519"),
        "{m}"
    );

    let var = format!("STELLA_TEST_SSH_KEY_{}", std::process::id());
    let unset = sshd.target(
        "app-1",
        json!({"private_key_file": null, "private_key_env": var, "deploy_script": "true"}),
    );
    let m = expect::backend(&expect::failure(exec.read_sticker(&unset).await));
    assert!(m.contains(&var), "{m}");
    assert!(m.contains("not set"), "{m}");

    let key = std::fs::read_to_string(&sshd.client_key).unwrap();
    // SAFETY: the variable is unique to this test and read only by the executor below.
    unsafe { std::env::set_var(&var, &key) };
    assert_eq!(exec.read_sticker(&unset).await.unwrap(), None);

    // RSA keys work too (signed with the SHA-2 hash the server asks for).
    let rsa = sshd.path("rsa_key");
    keygen(&rsa, "rsa");
    let mut authorized = std::fs::read_to_string(sshd.path("authorized_keys")).unwrap();
    authorized.push_str(&std::fs::read_to_string(sshd.path("rsa_key.pub")).unwrap());
    std::fs::write(sshd.path("authorized_keys"), authorized).unwrap();
    let with_rsa = sshd.target(
        "app-1",
        json!({"private_key_file": rsa.display().to_string(), "deploy_script": "true"}),
    );
    assert_eq!(exec.read_sticker(&with_rsa).await.unwrap(), None);

    // Key material never shows up in errors.
    unsafe {
        std::env::set_var(
            &var,
            "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END OPENSSH PRIVATE KEY-----\n",
        )
    };
    let m = expect::backend(&expect::failure(exec.read_sticker(&unset).await));
    assert!(m.contains(&var), "{m}");
    assert!(!m.contains("c2VjcmV0LXN0dWZm"), "{m}");
}

#[tokio::test]
async fn an_unreachable_port_fails_fast_and_a_silent_one_within_the_connect_timeout() {
    let sshd = Sshd::start();
    let exec = executor(&sshd);

    let closed = sshd.target(
        "app-1",
        json!({"port": free_port(), "deploy_script": "true"}),
    );
    let started = Instant::now();
    let m = expect::backend(&expect::failure(exec.read_sticker(&closed).await));
    assert!(m.contains("cannot connect to 127.0.0.1:"), "{m}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Accepts TCP but never speaks SSH: must not hang.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let target = sshd.target(
        "app-1",
        json!({"port": port, "connect_timeout_secs": 1, "deploy_script": "true"}),
    );
    let started = Instant::now();
    let err = deploy_fails(&exec, &target, "r1", vec![component("web", 'a')]).await;
    match &err {
        PluginError::Timeout { seconds, what } => {
            assert_eq!(*seconds, 1);
            assert!(what.contains(&format!("127.0.0.1:{port}")), "{what}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
}

#[tokio::test]
async fn invalid_config_is_refused_naming_the_key() {
    let sshd = Sshd::start();
    let exec = executor(&sshd);
    let cases = [
        (json!({"deploy_script": "true", "prot": 22}), "prot"),
        (json!({"deploy_script": "true", "host": null}), "host"),
        (json!({"deploy_script": "true", "user": ""}), "user"),
        (json!({"deploy_script": "true", "port": 0}), "port"),
        (
            json!({"deploy_script": "true", "host_key": "nope"}),
            "host_key",
        ),
        (
            json!({"deploy_script": "true", "private_key_file": null}),
            "private_key_file",
        ),
        (
            json!({"deploy_script": "true", "timeout_secs": 0}),
            "timeout_secs",
        ),
        (
            json!({"deploy_script": "true", "sticker_path": "x.json"}),
            "sticker_path",
        ),
        (json!({"mode": "script"}), "deploy_script"),
        (json!({"deploy_script": "true", "mode": "k8s"}), "mode"),
    ];
    for (extra, key) in cases {
        let target = sshd.target("app-1", extra.clone());
        let m = expect::invalid_config(&expect::failure(exec.validate_config(&target)));
        assert!(m.contains(key), "{extra}: {m:?} does not name {key}");
    }

    let mut wrong_kind = sshd.target("app-1", json!({"deploy_script": "true"}));
    wrong_kind.kind = "docker".to_string();
    assert!(matches!(
        exec.validate_config(&wrong_kind),
        Err(PluginError::InvalidConfig(_))
    ));

    // A deploy with a bad config refuses before connecting.
    let bad = sshd.target("app-1", json!({"deploy_script": "true", "timeout": 5}));
    let err = deploy_fails(&exec, &bad, "r1", vec![component("web", 'a')]).await;
    assert_eq!(err.reason_code(), "invalid_target_config");
    assert!(!sshd.log().contains("Accepted publickey"), "{}", sshd.log());
}
