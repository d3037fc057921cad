//! The winrm executor against the WS-Management test server in `common` (one per test).

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Options, Recorder, USER, WinrmServer, component, digest, executor, spec};
use serde_json::json;
use stella_plugin_sdk::{
    ComponentAction, Executor, NoProgress, PluginError, STICKER_SCHEMA, TargetRef, VersionSticker,
};

const STICKER: &str = r"C:\ProgramData\Stella\stella.version.json";

fn ntlm_server() -> WinrmServer {
    // As a default Windows listener: NTLM over HTTP only with message encryption.
    WinrmServer::start(Options {
        allow_unencrypted: false,
        ..Options::default()
    })
}

fn sh(script: &str) -> String {
    format!("# stella-test: sh\n{script}")
}

fn assert_all_shells_deleted(server: &WinrmServer) {
    assert_eq!(server.open_shells(), 0, "{:#?}", server.events());
    let events = server.events();
    let created = events.iter().filter(|e| e.action == "Create").count();
    let deleted = events.iter().filter(|e| e.action == "Delete").count();
    assert!(created > 0);
    assert_eq!(created, deleted, "{events:#?}");
}

#[tokio::test]
async fn an_ntlm_deploy_streams_output_and_gets_the_release_in_its_environment() {
    let server = ntlm_server();
    let out = server.dir.path().join("env.out");
    let script = sh(&format!(
        "echo \"deploying $STELLA_RELEASE_ID\"\n\
         echo 'to stderr' >&2\n\
         env | grep '^STELLA_' | sort > {}\n\
         printf 'no newline at the end'",
        out.display()
    ));
    let target = server.target("win-1", json!({"deploy_script": script}));
    let exec = executor(&server);
    assert_eq!(exec.kind(), "winrm");
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
            .any(|l| l.starts_with(&format!("connected to {} as {USER}", server.url()))),
        "{lines:?}"
    );
    let env = std::fs::read_to_string(&out).unwrap();
    assert!(env.contains("STELLA_RELEASE_ID=r1\n"), "{env}");
    assert!(env.contains("STELLA_RELEASE_NAME=Release r1\n"), "{env}");
    assert!(env.contains("STELLA_DEPLOYMENT_ID=dep-r1\n"), "{env}");
    assert!(env.contains("STELLA_JOB_ID=job-r1\n"), "{env}");
    assert!(env.contains("STELLA_TARGET=win-1\n"), "{env}");
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
    let components: Vec<stella_plugin_sdk::ComponentSpec> =
        serde_json::from_str(components).unwrap();
    assert_eq!(components, s.components);

    assert_eq!(outcome.components.len(), 2);
    assert!(
        outcome
            .components
            .iter()
            .all(|c| c.action == ComponentAction::Created)
    );
    assert_eq!(
        outcome.components[0].workload_id,
        format!("winrm://127.0.0.1:{}/web-api", server.port)
    );

    // Every WS-Man message went NTLM-authenticated and encrypted, and the shell is gone.
    let events = server.events();
    assert!(
        !events.iter().any(|e| e.action == "auth-failed"),
        "{events:#?}"
    );
    assert!(
        events.iter().all(|e| e.auth == "ntlm" && e.encrypted),
        "{events:#?}"
    );
    let command = events.iter().rfind(|e| e.action == "Command").unwrap();
    assert!(
        command
            .detail
            .starts_with("powershell -NoProfile -NonInteractive -EncodedCommand "),
        "{}",
        command.detail
    );
    assert_all_shells_deleted(&server);
}

#[tokio::test]
async fn upgrade_rollback_and_inventory_follow_the_sticker() {
    let server = ntlm_server();
    let target = server.target("win-1", json!({"deploy_script": sh("echo ok")}));
    let exec = executor(&server);
    assert!(exec.inventory(&target).await.unwrap().is_empty());

    let r1 = spec(&target, "r1", vec![component("web", 'a')]);
    let r2 = spec(&target, "r2", vec![component("web", 'c')]);
    let deployed = |s: &stella_plugin_sdk::DeploySpec| {
        VersionSticker::for_deploy(s, "2026-01-01T00:00:00Z".to_string())
    };

    let first = exec.deploy(&r1, &NoProgress).await.unwrap();
    assert_eq!(first.components[0].action, ComponentAction::Created);
    exec.write_sticker(&target, &deployed(&r1)).await.unwrap();
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 1);
    assert_eq!(inv[0].component, "web");
    assert_eq!(inv[0].digest, digest('a'));
    assert_eq!(inv[0].state, "unknown");
    assert_eq!(inv[0].release_id.as_deref(), Some("r1"));
    assert_eq!(inv[0].deployment_id.as_deref(), Some("dep-r1"));

    let again = exec.deploy(&r1, &NoProgress).await.unwrap();
    assert_eq!(again.components[0].action, ComponentAction::Unchanged);

    let upgrade = exec.deploy(&r2, &NoProgress).await.unwrap();
    assert_eq!(upgrade.components[0].action, ComponentAction::Replaced);
    exec.write_sticker(&target, &deployed(&r2)).await.unwrap();
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv[0].digest, digest('c'));
    assert_eq!(inv[0].release_id.as_deref(), Some("r2"));

    let rollback = exec.rollback(&r1, &NoProgress).await.unwrap();
    assert_eq!(rollback.components[0].action, ComponentAction::Replaced);
    assert_eq!(rollback.components[0].digest, digest('a'));
    exec.write_sticker(&target, &deployed(&r1)).await.unwrap();
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv[0].digest, digest('a'));
    assert_eq!(inv[0].release_id.as_deref(), Some("r1"));
    assert_all_shells_deleted(&server);
}

#[tokio::test]
async fn an_inventory_script_decides_health() {
    let server = ntlm_server();
    let state = server.dir.path().join("inventory.jsonl");
    let target = server.target(
        "win-1",
        json!({
            "deploy_script": sh("echo ok"),
            "inventory_script": sh(&format!("echo \"# target $STELLA_TARGET\" >&2; cat {}", state.display())),
        }),
    );
    let exec = executor(&server);
    let r1 = spec(&target, "r1", vec![component("web", 'a')]);
    exec.deploy(&r1, &NoProgress).await.unwrap();
    exec.write_sticker(
        &target,
        &VersionSticker::for_deploy(&r1, "2026-01-01T00:00:00Z".into()),
    )
    .await
    .unwrap();

    std::fs::write(
        &state,
        format!(
            "{{\"component\":\"web\",\"digest\":\"{}\",\"state\":\"running\",\"health\":\"healthy\"}}\n\n\
             {{\"component\":\"extra\",\"digest\":\"{}\",\"state\":\"running\"}}\n",
            digest('a'),
            digest('e')
        ),
    )
    .unwrap();
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv.len(), 2);
    assert_eq!(inv[0].component, "extra");
    assert_eq!(inv[0].release_id, None);
    assert_eq!(inv[1].component, "web");
    assert_eq!(inv[1].state, "running");
    assert_eq!(inv[1].health.as_deref(), Some("healthy"));
    assert_eq!(inv[1].release_id.as_deref(), Some("r1"));
    let health = exec.health_check(&target, &r1.components).await.unwrap();
    assert!(health.healthy, "{health:?}");

    std::fs::write(
        &state,
        format!(
            "{{\"component\":\"web\",\"digest\":\"{}\",\"state\":\"exited\"}}\n",
            digest('a')
        ),
    )
    .unwrap();
    let health = exec.health_check(&target, &r1.components).await.unwrap();
    assert!(!health.healthy);
    assert_eq!(health.components[0].detail, "state exited");

    std::fs::write(&state, "not json\n").unwrap();
    let err = exec.inventory(&target).await.unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
    assert_all_shells_deleted(&server);
}

#[tokio::test]
async fn a_failing_script_reports_its_exit_code_and_output_tail() {
    let server = ntlm_server();
    let script =
        sh("for i in $(seq 1 80); do echo \"line $i\"; done; echo 'fatal: boom' >&2; exit 3");
    let target = server.target("win-1", json!({"deploy_script": script}));
    let exec = executor(&server);
    let progress = Recorder::default();

    let err = exec
        .deploy(&spec(&target, "r1", vec![component("web", 'a')]), &progress)
        .await
        .unwrap_err();

    let msg = match &err {
        PluginError::Backend(m) => m.clone(),
        other => panic!("expected Backend, got {other:?}"),
    };
    assert!(msg.contains("failed with exit code 3"), "{msg}");
    assert!(msg.lines().any(|l| l == "fatal: boom"), "{msg}");
    assert!(msg.lines().any(|l| l == "line 80"), "{msg}");
    // Only a tail: at most 50 lines of output after the header line.
    assert!(msg.lines().count() <= 51, "{msg}");
    assert!(!msg.lines().any(|l| l == "line 1"), "{msg}");
    assert_eq!(err.reason_code(), "backend_error");
    assert!(progress.lines().iter().any(|l| l == "line 1"));
    assert_all_shells_deleted(&server);
}

#[tokio::test]
async fn a_script_past_its_timeout_is_terminated_and_its_shell_deleted() {
    let server = ntlm_server();
    // Unique per test process, so that the check below cannot see another test's sleep.
    let secs = 40_000 + std::process::id() % 10_000;
    let marker = server.dir.path().join("finished");
    let script = sh(&format!(
        "echo started; sleep {secs}; touch {}",
        marker.display()
    ));
    let target = server.target(
        "win-1",
        json!({"deploy_script": script, "timeout_secs": 2, "operation_timeout_secs": 1}),
    );
    let exec = executor(&server);
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

    // The server saw Signal terminate for the deploy command, then Delete of its shell.
    let events = server.events();
    let command = events
        .iter()
        .find(|e| {
            e.action == "Command"
                && events.iter().any(|s| {
                    s.action == "Signal"
                        && s.command == e.command
                        && s.detail.ends_with("/signal/terminate")
                })
                && e.detail.contains("EncodedCommand")
        })
        .expect("a terminated command");
    let signal_at = events
        .iter()
        .rposition(|e| e.action == "Signal" && e.command == command.command)
        .unwrap();
    let delete_at = events
        .iter()
        .position(|e| e.action == "Delete" && e.shell == command.shell)
        .expect("shell deleted");
    assert!(signal_at < delete_at, "{events:#?}");
    assert_all_shells_deleted(&server);

    // And the process is gone, not just our request.
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
        assert!(Instant::now() < deadline, "{pattern} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!marker.exists());
}

#[tokio::test]
async fn the_sticker_is_written_and_read_back_over_basic() {
    let server = WinrmServer::start(Options::default());
    let target = server.target("win-1", json!({"auth": "basic"}));
    let exec = executor(&server);

    assert_eq!(exec.read_sticker(&target).await.unwrap(), None);

    let s1 = VersionSticker::for_deploy(
        &spec(&target, "r1", vec![component("web", 'a')]),
        "2026-01-01T00:00:00Z".to_string(),
    );
    exec.write_sticker(&target, &s1).await.unwrap();
    let file = server.local_path(STICKER);
    let on_disk: VersionSticker = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(on_disk, s1);
    assert_eq!(on_disk.schema, STICKER_SCHEMA);
    assert_eq!(
        std::fs::read_dir(file.parent().unwrap()).unwrap().count(),
        1
    );
    assert_eq!(exec.read_sticker(&target).await.unwrap(), Some(s1));

    let s2 = VersionSticker::for_deploy(
        &spec(
            &target,
            "r2",
            vec![component("web", 'b'), component("api", 'c')],
        ),
        "2026-01-02T00:00:00Z".to_string(),
    );
    exec.write_sticker(&target, &s2).await.unwrap();
    assert_eq!(exec.read_sticker(&target).await.unwrap(), Some(s2.clone()));

    // A configured path with quotes and spaces survives PowerShell quoting.
    let odd = r"D:\Stella's data\v 1.json";
    let t2 = server.target("win-1", json!({"auth": "basic", "sticker_path": odd}));
    exec.write_sticker(&t2, &s2).await.unwrap();
    assert!(server.local_path(odd).is_file());
    assert_eq!(exec.read_sticker(&t2).await.unwrap(), Some(s2));

    std::fs::write(&file, "garbage").unwrap();
    let err = exec.read_sticker(&target).await.unwrap_err();
    assert!(matches!(err, PluginError::Sticker(_)), "{err:?}");
    assert!(
        server
            .events()
            .iter()
            .all(|e| e.auth == "basic" && !e.encrypted)
    );
    assert_all_shells_deleted(&server);
}

#[tokio::test]
async fn a_domain_user_authenticates_with_ntlm() {
    let server = ntlm_server();
    let target = server.target(
        "win-1",
        json!({"username": format!("WINTEST\\{USER}"), "deploy_script": sh("echo domain-ok")}),
    );
    let progress = Recorder::default();
    executor(&server)
        .deploy(&spec(&target, "r1", vec![component("web", 'a')]), &progress)
        .await
        .unwrap();
    assert!(progress.lines().iter().any(|l| l == "domain-ok"));
}

async fn wrong_password(auth: &str) {
    let server = ntlm_server();
    let server = if auth == "basic" {
        drop(server);
        WinrmServer::start(Options::default())
    } else {
        server
    };
    let bad = server.dir.path().join("wrong-password");
    std::fs::write(&bad, "not-the-password-7731\n").unwrap();
    let target = server.target(
        "win-1",
        json!({"auth": auth, "password_file": bad.display().to_string()}),
    );
    let exec = executor(&server);
    for err in [
        exec.deploy(
            &spec(&target, "r1", vec![component("web", 'a')]),
            &NoProgress,
        )
        .await
        .unwrap_err(),
        exec.read_sticker(&target).await.unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(matches!(err, PluginError::Backend(_)), "{err:?}");
        assert!(msg.contains("authentication failed"), "{msg}");
        assert!(msg.contains("401"), "{msg}");
        assert!(!msg.contains("not-the-password"), "{msg}");
    }
    let events = server.events();
    assert!(
        events.iter().any(|e| e.action == "auth-failed"),
        "{events:#?}"
    );
    assert!(!events.iter().any(|e| e.action == "Create"), "{events:#?}");
}

#[tokio::test]
async fn a_wrong_ntlm_password_is_a_clear_401() {
    wrong_password("ntlm").await;
}

#[tokio::test]
async fn a_wrong_basic_password_is_a_clear_401() {
    wrong_password("basic").await;
}

#[tokio::test]
async fn unencrypted_basic_is_refused_by_a_listener_that_forbids_it() {
    let server = ntlm_server();
    let target = server.target("win-1", json!({"auth": "basic"}));
    let err = executor(&server).read_sticker(&target).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("AllowUnencrypted"), "{msg}");
}

#[tokio::test]
async fn a_closed_port_fails_fast_with_a_clear_error() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let target = TargetRef {
        name: "win-1".into(),
        kind: "winrm".into(),
        config: json!({
            "endpoint": format!("http://127.0.0.1:{port}/wsman"),
            "username": USER,
            "password_file": "/dev/null/none",
            "deploy_script": "x",
        }),
    };
    let server = WinrmServer::start(Options::default());
    let mut config = target.config.clone();
    config["password_file"] = json!(server.password_file.display().to_string());
    let target = TargetRef { config, ..target };
    let started = Instant::now();
    let err = executor(&server)
        .deploy(
            &spec(&target, "r1", vec![component("web", 'a')]),
            &NoProgress,
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let msg = err.to_string();
    assert!(matches!(err, PluginError::Backend(_)), "{err:?}");
    assert!(
        msg.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{msg}"
    );
}

#[tokio::test]
async fn a_silent_peer_times_out_instead_of_hanging() {
    let server = WinrmServer::start(Options::default());
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().take(8).flatten() {
            held.push(s);
        }
    });
    let target = server.target(
        "win-1",
        json!({"endpoint": format!("http://127.0.0.1:{port}/wsman"), "timeout_secs": 2}),
    );
    let started = Instant::now();
    let err = executor(&server).read_sticker(&target).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    match err {
        PluginError::Timeout { seconds, what } => {
            assert_eq!(seconds, 2);
            assert!(what.contains(&format!("127.0.0.1:{port}")), "{what}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn https_with_the_test_ca_works_for_ntlm_and_basic() {
    let server = WinrmServer::start(Options {
        tls: true,
        allow_unencrypted: false,
    });
    assert!(server.url().starts_with("https://"));
    let exec = executor(&server);
    for auth in ["ntlm", "basic"] {
        let target = server.target(
            "win-1",
            json!({"auth": auth, "deploy_script": sh(&format!("echo over-tls-{auth}"))}),
        );
        let progress = Recorder::default();
        exec.deploy(&spec(&target, "r1", vec![component("web", 'a')]), &progress)
            .await
            .unwrap();
        assert!(
            progress
                .lines()
                .iter()
                .any(|l| *l == format!("over-tls-{auth}"))
        );
    }
    let events = server.events();
    // TLS protects the messages; NTLM sealing is not used on top of it.
    assert!(events.iter().all(|e| !e.encrypted), "{events:#?}");
    assert!(events.iter().any(|e| e.auth == "ntlm"));
    assert!(events.iter().any(|e| e.auth == "basic"));
    assert!(server.channel_bound_logins() > 0);

    let insecure = server.target(
        "win-1",
        json!({"ca_file": null, "insecure_skip_verify": true}),
    );
    assert_eq!(exec.read_sticker(&insecure).await.unwrap(), None);

    // Over TLS the NTLM AUTHENTICATE travels with the first message; a wrong password is
    // still a clear 401.
    let bad = server.dir.path().join("wrong-password");
    std::fs::write(&bad, "not-the-password\n").unwrap();
    let wrong = server.target("win-1", json!({"password_file": bad.display().to_string()}));
    let err = exec.read_sticker(&wrong).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("authentication failed"), "{msg}");
    assert!(msg.contains("rejected the NTLM credentials"), "{msg}");
}

#[tokio::test]
async fn https_with_an_untrusted_certificate_is_refused() {
    let server = WinrmServer::start(Options {
        tls: true,
        ..Options::default()
    });
    let other = server.other_ca_file.clone().unwrap();
    let target = server.target("win-1", json!({"ca_file": other.display().to_string()}));
    let err = executor(&server).read_sticker(&target).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::Backend(_)), "{err:?}");
    assert!(msg.contains("TLS handshake"), "{msg}");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    assert!(server.events().is_empty());

    let missing = server.target("win-1", json!({"ca_file": "/nonexistent/ca.pem"}));
    let err = executor(&server).read_sticker(&missing).await.unwrap_err();
    assert!(matches!(err, PluginError::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("ca_file"), "{err}");
}

#[tokio::test]
async fn config_errors_name_the_key_and_touch_nothing() {
    let server = WinrmServer::start(Options::default());
    let exec = executor(&server);
    let cases = [
        (json!({"endpoint": "win-1:5985"}), "endpoint"),
        (json!({"auth": "kerberos"}), "auth"),
        (json!({"password_env": "X"}), "password_file"),
        (json!({"sticker_path": "/etc/stella.json"}), "sticker_path"),
        (json!({"timeout_secs": 0}), "timeout_secs"),
        (
            json!({"operation_timeout_secs": "60"}),
            "operation_timeout_secs",
        ),
        (
            json!({"insecure_skip_verify": true}),
            "insecure_skip_verify",
        ),
        (json!({"deploy_script": null}), "deploy_script"),
        (json!({"colour": "blue"}), "colour"),
    ];
    for (changes, key) in cases {
        let target = server.target("win-1", changes.clone());
        let err = exec.validate_config(&target).unwrap_err();
        assert!(matches!(err, PluginError::InvalidConfig(_)), "{err:?}");
        assert!(err.to_string().contains(key), "{changes}: {err}");
        let err = exec
            .deploy(
                &spec(&target, "r1", vec![component("web", 'a')]),
                &NoProgress,
            )
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "invalid_target_config");
    }
    let mut wrong_kind = server.target("win-1", json!({}));
    wrong_kind.kind = "ssh".into();
    assert!(exec.validate_config(&wrong_kind).is_err());
    let unset = server.target(
        "win-1",
        json!({"password_file": null, "password_env": "STELLA_TEST_WINRM_PW_UNSET"}),
    );
    let err = exec.read_sticker(&unset).await.unwrap_err();
    assert!(
        err.to_string().contains("STELLA_TEST_WINRM_PW_UNSET"),
        "{err}"
    );
    let mut bad_digest = component("web", 'a');
    bad_digest.digest = "latest".into();
    let ok_target = server.target("win-1", json!({}));
    let err = exec
        .deploy(&spec(&ok_target, "r1", vec![bad_digest]), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.reason_code(), "invalid_target_config");
    // Too long for a Windows command line: refused before anything is sent.
    let long = server.target("win-1", json!({"deploy_script": "x".repeat(20_000)}));
    let err = exec
        .deploy(&spec(&long, "r1", vec![component("web", 'a')]), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("deploy_script is too long"),
        "{err}"
    );
    assert!(server.events().is_empty(), "{:#?}", server.events());
}
