//! The nomad executor against the fake Nomad server (tests/support/fake_nomad.rs).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use stella_plugin_sdk::{
    ComponentAction, DeployOutcome, Executor, InventoryItem, NoProgress, PluginError,
    VersionSticker,
};
use support::pki::{TestCa, write};
use support::{
    Env, FakeNomad, Options, Progress, ServerTls, TOKEN, config, digest, release, requests_to,
    target, template,
};

fn actions(out: &DeployOutcome) -> Vec<(String, ComponentAction)> {
    out.components
        .iter()
        .map(|c| (c.name.clone(), c.action))
        .collect()
}

fn all(out: &DeployOutcome, action: ComponentAction) -> bool {
    out.components.iter().all(|c| c.action == action)
}

async fn acl_server() -> FakeNomad {
    FakeNomad::start(Options {
        token: Some(TOKEN.to_string()),
        ..Default::default()
    })
    .await
}

/// (component, digest, state, health, release) of an inventory item.
type Seen = (String, String, String, Option<String>, Option<String>);

/// (component, digest, state, health, release) per item, for compact assertions.
fn summary(items: &[InventoryItem]) -> Vec<Seen> {
    items
        .iter()
        .map(|i| {
            (
                i.component.clone(),
                i.digest.clone(),
                i.state.clone(),
                i.health.clone(),
                i.release_id.clone(),
            )
        })
        .collect()
}

fn running(
    component: &str,
    d: char,
    release: &str,
) -> (String, String, String, Option<String>, Option<String>) {
    (
        component.to_string(),
        digest(d),
        "running".to_string(),
        Some("healthy".to_string()),
        Some(release.to_string()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_upgrade_and_identical_redeploy() {
    let server = acl_server().await;
    let env = Env::new();
    let cfg = config(&env, &server);
    let t = target(cfg.clone());

    // First deploy: the job does not exist yet.
    let r1 = release(&cfg, 1, 'a', 'b');
    let p = Progress::default();
    let out = env
        .executor
        .deploy(&r1, &p)
        .await
        .expect("deploy release 1");
    assert!(all(&out, ComponentAction::Created), "{:?}", actions(&out));
    assert_eq!(out.components[0].workload_id, "nomad://default/web/web/api");
    assert_eq!(
        out.components[1].workload_id,
        "nomad://default/web/background/runner"
    );
    assert!(
        p.text().contains("registered job web version 0"),
        "{}",
        p.text()
    );
    assert!(p.text().contains("successful"), "{}", p.text());

    let job = server.job("web").expect("job registered");
    assert_eq!(job["Version"], 0);
    assert_eq!(job["ID"], "web");
    let api = &job["TaskGroups"][0]["Tasks"][0];
    assert_eq!(
        api["Config"]["image"],
        format!("registry.local/demo/api@{}", digest('a'))
    );
    assert_eq!(api["Config"]["ports"], json!(["http"]));
    assert_eq!(
        job["TaskGroups"][0]["Tasks"][1]["Config"]["image"], "envoyproxy/envoy:v1.30",
        "tasks that are no component stay as the template has them"
    );
    assert_eq!(
        job["TaskGroups"][1]["Tasks"][0]["Config"]["image"],
        format!("registry.local/demo/worker@{}", digest('b'))
    );
    let meta = &job["Meta"];
    assert_eq!(meta["team"], "web");
    assert_eq!(meta["stella.release.id"], "rel-1");
    assert_eq!(meta["stella.deployment.id"], "dep-1");
    assert_eq!(meta["stella.digest.api"], digest('a'));
    assert_eq!(meta["stella.digest.worker"], digest('b'));

    let inv = env.executor.inventory(&t).await.expect("inventory");
    assert_eq!(
        summary(&inv),
        vec![
            running("api", 'a', "rel-1"),
            running("api", 'a', "rel-1"),
            running("worker", 'b', "rel-1"),
        ]
    );
    assert!(
        inv.iter()
            .all(|i| i.deployment_id.as_deref() == Some("dep-1"))
    );
    assert!(
        inv[0].workload_id.ends_with("/api"),
        "{}",
        inv[0].workload_id
    );
    assert!(
        inv[2].workload_id.ends_with("/runner"),
        "{}",
        inv[2].workload_id
    );
    let health = env
        .executor
        .health_check(&t, &r1.components)
        .await
        .expect("health");
    assert!(health.healthy, "{health:?}");

    // Upgrade.
    let r2 = release(&cfg, 2, 'c', 'd');
    let out = env
        .executor
        .deploy(&r2, &NoProgress)
        .await
        .expect("deploy release 2");
    assert!(all(&out, ComponentAction::Replaced), "{:?}", actions(&out));
    assert_eq!(server.job("web").unwrap()["Version"], 1);
    let inv = env.executor.inventory(&t).await.expect("inventory");
    assert_eq!(
        summary(&inv),
        vec![
            running("api", 'c', "rel-2"),
            running("api", 'c', "rel-2"),
            running("worker", 'd', "rel-2"),
        ]
    );
    // The old release no longer passes a health check; the new one does.
    let old = env.executor.health_check(&t, &r1.components).await.unwrap();
    assert!(!old.healthy);
    assert!(old.components[0].detail.contains("instead of"), "{old:?}");
    assert!(
        env.executor
            .health_check(&t, &r2.components)
            .await
            .unwrap()
            .healthy
    );

    // The same spec again: nothing changes, no new version.
    let p = Progress::default();
    let out = env.executor.deploy(&r2, &p).await.expect("re-deploy");
    assert!(all(&out, ComponentAction::Unchanged), "{:?}", actions(&out));
    assert!(p.text().contains("unchanged"), "{}", p.text());
    assert_eq!(server.versions("web").len(), 2);

    // The same release from another Stella deployment is still the same job.
    let mut r2b = r2.clone();
    r2b.deployment_id = "dep-2b".to_string();
    r2b.job_id = "job-2b".to_string();
    let out = env
        .executor
        .deploy(&r2b, &NoProgress)
        .await
        .expect("re-deploy");
    assert!(all(&out, ComponentAction::Unchanged), "{:?}", actions(&out));
    assert_eq!(server.versions("web").len(), 2);
    assert_eq!(
        server.job("web").unwrap()["Meta"]["stella.deployment.id"],
        "dep-2",
        "the deployment that put the release there stays on record"
    );
    let inv = env.executor.inventory(&t).await.unwrap();
    assert_eq!(inv.len(), 3);

    // Every request carried the ACL token, and registrations were check-and-set.
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.token.as_deref() == Some(TOKEN)));
    let registers = requests_to(&server, "POST", "/v1/job/web");
    assert!(registers.len() >= 4);
    assert!(registers.iter().all(|r| {
        let b = r.body.as_ref().unwrap();
        b["EnforceIndex"] == true && b["Job"]["ID"] == "web"
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_uses_blocking_queries() {
    // Slow steps: a watcher that polled instead of blocking would show up as many requests.
    let server = FakeNomad::start(Options {
        token: Some(TOKEN.to_string()),
        step: Duration::from_millis(250),
        ..Default::default()
    })
    .await;
    let env = Env::new();
    let cfg = config(&env, &server);
    env.executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect("deploy");

    let gets = requests_to(&server, "GET", "/v1/deployment/");
    assert!(!gets.is_empty());
    let blocking: Vec<_> = gets
        .iter()
        .filter(|r| {
            r.query
                .get("index")
                .is_some_and(|i| i.parse::<u64>().unwrap() > 1)
        })
        .collect();
    assert!(
        blocking.len() + 1 >= gets.len(),
        "all but the first look are blocking queries: {gets:?}"
    );
    assert!(!blocking.is_empty(), "{gets:?}");
    for r in &blocking {
        let wait = r.query.get("wait").expect("wait with index");
        assert!(wait.ends_with('s'), "{wait}");
    }
    // One request per change of the deployment (about five steps), not one per poll tick.
    assert!(gets.len() <= 10, "{} deployment reads", gets.len());
    // Indexes only grow.
    let indexes: Vec<u64> = blocking
        .iter()
        .map(|r| r.query["index"].parse().unwrap())
        .collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
}

fn canary_template() -> Value {
    let mut t = template();
    t["Job"]["TaskGroups"][0]["Update"] =
        json!({"Canary": 1, "AutoPromote": false, "MaxParallel": 1});
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_are_promoted_when_healthy() {
    let server = acl_server().await;
    let env = Env::new();
    let mut cfg = config(&env, &server);
    cfg["job_template"] = canary_template();
    let t = target(cfg.clone());

    env.executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect("deploy release 1");
    assert!(requests_to(&server, "POST", "/v1/deployment/promote/").is_empty());

    let p = Progress::default();
    let out = env
        .executor
        .deploy(&release(&cfg, 2, 'c', 'd'), &p)
        .await
        .expect("deploy release 2 with a canary");
    assert!(all(&out, ComponentAction::Replaced));
    assert!(
        p.text().contains("canaries healthy, promoting web"),
        "{}",
        p.text()
    );

    let promotes = requests_to(&server, "POST", "/v1/deployment/promote/");
    assert_eq!(promotes.len(), 1);
    let deployments = server.deployments();
    let last = deployments.last().unwrap();
    assert_eq!(
        promotes[0].body.as_ref().unwrap()["DeploymentID"],
        last["ID"]
    );
    assert_eq!(promotes[0].body.as_ref().unwrap()["All"], true);
    assert_eq!(last["Status"], "successful");
    assert_eq!(last["TaskGroups"]["web"]["DesiredCanaries"], 1);
    assert_eq!(last["TaskGroups"]["web"]["Promoted"], true);

    let inv = env.executor.inventory(&t).await.unwrap();
    assert_eq!(
        summary(&inv),
        vec![
            running("api", 'c', "rel-2"),
            running("api", 'c', "rel-2"),
            running("worker", 'd', "rel-2"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpromoted_canaries_time_out_and_the_deployment_is_failed() {
    let server = acl_server().await;
    let env = Env::new();
    let mut cfg = config(&env, &server);
    cfg["job_template"] = canary_template();
    cfg["auto_promote"] = json!(false);
    cfg["deploy_timeout_secs"] = json!(2);
    let r1 = release(&cfg, 1, 'a', 'b');
    env.executor
        .deploy(&r1, &NoProgress)
        .await
        .expect("deploy 1");

    let p = Progress::default();
    let started = Instant::now();
    let err = env
        .executor
        .deploy(&release(&cfg, 2, 'c', 'd'), &p)
        .await
        .expect_err("nobody promotes");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, PluginError::Timeout { .. }), "{err}");
    assert_eq!(err.reason_code(), "timeout");
    assert!(err.to_string().contains("marked failed in Nomad"), "{err}");
    assert!(p.text().contains("waiting for a promotion"), "{}", p.text());
    assert!(requests_to(&server, "POST", "/v1/deployment/promote/").is_empty());
    assert_eq!(
        requests_to(&server, "POST", "/v1/deployment/fail/").len(),
        1
    );
    let deployments = server.deployments();
    let last = deployments.last().unwrap();
    assert_eq!(last["JobVersion"], 1);
    assert_eq!(last["Status"], "failed");
    assert_eq!(last["StatusDescription"], "Deployment marked as failed");

    // The plane then rolls back: Nomad still has version 0. The revert is an update with a
    // canary too, and a rollback promotes it even with auto_promote off.
    let p = Progress::default();
    let out = env.executor.rollback(&r1, &p).await.expect("rollback");
    assert!(all(&out, ComponentAction::Replaced));
    assert!(p.text().contains("promoting web"), "{}", p.text());
    let job = server.job("web").unwrap();
    assert_eq!(job["Version"], 2);
    assert_eq!(job["Meta"]["stella.release.id"], "rel-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_failure_then_native_rollback() {
    let server = acl_server().await;
    let env = Env::new();
    let cfg = config(&env, &server);
    let t = target(cfg.clone());
    let r1 = release(&cfg, 1, 'a', 'b');
    env.executor
        .deploy(&r1, &NoProgress)
        .await
        .expect("deploy 1");

    // Release 2's api image crashes on start.
    server.fail_image(&digest('e'));
    let r2 = release(&cfg, 2, 'e', 'f');
    let err = env
        .executor
        .deploy(&r2, &NoProgress)
        .await
        .expect_err("unhealthy release");
    assert_eq!(err.reason_code(), "unhealthy", "{err}");
    match &err {
        PluginError::Unhealthy {
            component,
            detail,
            log_tail,
        } => {
            assert_eq!(component, "api");
            assert!(
                detail.contains("version 1 failed (Failed due to unhealthy allocations)"),
                "{detail}"
            );
            assert!(log_tail.contains("Driver Failure"), "{log_tail}");
            assert!(log_tail.contains(&digest('e')), "{log_tail}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.deployments().last().unwrap()["Status"], "failed");

    // Inventory shows what really runs: the old api allocations, the failed new ones.
    let inv = env.executor.inventory(&t).await.unwrap();
    let api: Vec<_> = summary(&inv).into_iter().filter(|i| i.0 == "api").collect();
    assert_eq!(api.len(), 4, "{api:?}");
    assert_eq!(
        api.iter()
            .filter(|i| i.1 == digest('a') && i.2 == "running")
            .count(),
        2
    );
    assert_eq!(
        api.iter()
            .filter(|i| i.1 == digest('e')
                && i.2 == "failed"
                && i.3.as_deref() == Some("unhealthy"))
            .count(),
        2
    );
    let health = env.executor.health_check(&t, &r2.components).await.unwrap();
    assert!(!health.healthy);

    // Native rollback: revert to version 0, check-and-set on version 1.
    let p = Progress::default();
    let out = env.executor.rollback(&r1, &p).await.expect("rollback");
    assert!(all(&out, ComponentAction::Replaced), "{:?}", actions(&out));
    assert!(
        p.text()
            .contains("reverting job web from version 1 to version 0 (release rel-1, stable)"),
        "{}",
        p.text()
    );
    let reverts = requests_to(&server, "POST", "/v1/job/web/revert");
    assert_eq!(reverts.len(), 1);
    assert_eq!(
        reverts[0].body,
        Some(json!({"JobID": "web", "JobVersion": 0, "EnforcePriorVersion": 1}))
    );
    let job = server.job("web").unwrap();
    assert_eq!(job["Version"], 2);
    assert_eq!(job["Meta"]["stella.release.id"], "rel-1");
    assert_eq!(job["Meta"]["stella.deployment.id"], "dep-1");
    assert_eq!(
        job["TaskGroups"][0]["Tasks"][0]["Config"]["image"],
        format!("registry.local/demo/api@{}", digest('a'))
    );
    assert_eq!(server.deployments().last().unwrap()["Status"], "successful");

    let inv = env.executor.inventory(&t).await.unwrap();
    assert_eq!(
        summary(&inv),
        vec![
            running("api", 'a', "rel-1"),
            running("api", 'a', "rel-1"),
            running("worker", 'b', "rel-1"),
        ]
    );
    assert!(
        env.executor
            .health_check(&t, &r1.components)
            .await
            .unwrap()
            .healthy
    );

    // Rolling back again is an ensure: nothing to revert.
    let out = env
        .executor
        .rollback(&r1, &NoProgress)
        .await
        .expect("rollback again");
    assert!(all(&out, ComponentAction::Unchanged));
    assert_eq!(server.versions("web").len(), 3);
    assert_eq!(requests_to(&server, "POST", "/v1/job/web/revert").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_without_a_kept_version_deploys_from_the_template() {
    let server = acl_server().await;
    let env = Env::new();
    let cfg = config(&env, &server);
    // Only release 2 was ever deployed here.
    env.executor
        .deploy(&release(&cfg, 2, 'c', 'd'), &NoProgress)
        .await
        .expect("deploy 2");
    let r1 = release(&cfg, 1, 'a', 'b');
    let p = Progress::default();
    let out = env.executor.rollback(&r1, &p).await.expect("rollback");
    assert!(all(&out, ComponentAction::Replaced));
    assert!(
        p.text().contains("deploying it from the template"),
        "{}",
        p.text()
    );
    assert!(requests_to(&server, "POST", "/v1/job/web/revert").is_empty());
    let job = server.job("web").unwrap();
    assert_eq!(job["Version"], 1);
    assert_eq!(job["Meta"]["stella.release.id"], "rel-1");
    assert_eq!(job["Meta"]["stella.digest.api"], digest('a'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticker_lives_in_a_nomad_variable() {
    let server = acl_server().await;
    let env = Env::new();
    let cfg = config(&env, &server);
    let t = target(cfg.clone());
    assert_eq!(env.executor.read_sticker(&t).await.unwrap(), None);

    let r1 = release(&cfg, 1, 'a', 'b');
    let sticker = VersionSticker::for_deploy(&r1, "2025-01-02T03:04:05Z".to_string());
    env.executor
        .write_sticker(&t, &sticker)
        .await
        .expect("write");
    assert_eq!(
        env.executor.read_sticker(&t).await.unwrap(),
        Some(sticker.clone())
    );

    let var = server
        .variable("stella/web/sticker")
        .expect("variable stored");
    assert_eq!(var["Path"], "stella/web/sticker");
    let stored: VersionSticker =
        serde_json::from_str(var["Items"]["sticker"].as_str().unwrap()).unwrap();
    assert_eq!(stored, sticker);
    let puts = requests_to(&server, "PUT", "/v1/var/stella/web/sticker");
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].body.as_ref().unwrap()["Namespace"], "default");

    // Overwritten by the next release.
    let r2 = release(&cfg, 2, 'c', 'd');
    let second = VersionSticker::for_deploy(&r2, "2025-01-02T04:00:00Z".to_string());
    env.executor
        .write_sticker(&t, &second)
        .await
        .expect("write 2");
    assert_eq!(env.executor.read_sticker(&t).await.unwrap(), Some(second));

    // A sticker of another schema is refused rather than misread.
    let mut alien = sticker.clone();
    alien.schema = "other/v9".to_string();
    env.executor
        .write_sticker(&t, &alien)
        .await
        .expect("write alien");
    let err = env.executor.read_sticker(&t).await.expect_err("schema");
    assert_eq!(err.reason_code(), "sticker_error");
    assert!(err.to_string().contains("other/v9"), "{err}");

    // A configured path is used as given.
    let mut custom = cfg.clone();
    custom["sticker_variable_path"] = json!("apps/web-sticker");
    let ct = target(custom);
    env.executor
        .write_sticker(&ct, &sticker)
        .await
        .expect("write custom");
    assert!(server.variable("apps/web-sticker").is_some());
    assert_eq!(env.executor.read_sticker(&ct).await.unwrap(), Some(sticker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_is_a_clear_error() {
    let server = acl_server().await;
    let env = Env::new();
    let wrong = "11111111-2222-3333-4444-555555555555";
    let mut cfg = config(&env, &server);
    cfg["token_file"] = json!(env.token_file(wrong));
    let t = target(cfg.clone());

    let err = env
        .executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect_err("wrong token");
    let msg = err.to_string();
    assert_eq!(err.reason_code(), "backend_error");
    assert!(msg.contains("403"), "{msg}");
    assert!(msg.contains("ACL token not found"), "{msg}");
    assert!(msg.contains("token_file"), "{msg}");
    assert!(!msg.contains(wrong), "the token must not leak: {msg}");
    assert!(server.job("web").is_none());
    assert!(
        env.executor
            .inventory(&t)
            .await
            .unwrap_err()
            .to_string()
            .contains("403")
    );
    assert!(
        env.executor
            .read_sticker(&t)
            .await
            .unwrap_err()
            .to_string()
            .contains("403")
    );

    // No token at all.
    let mut anonymous = cfg.clone();
    anonymous.as_object_mut().unwrap().remove("token_file");
    let err = env
        .executor
        .inventory(&target(anonymous))
        .await
        .expect_err("anonymous");
    assert!(err.to_string().contains("Permission denied"), "{err}");
    assert!(err.to_string().contains("no ACL token configured"), "{err}");

    // A token file that is not there: refused before anything is sent.
    let before = server.requests().len();
    let mut missing = cfg.clone();
    missing["token_file"] = json!(env.dir.path().join("absent").display().to_string());
    let err = env
        .executor
        .deploy(&release(&missing, 1, 'a', 'b'), &NoProgress)
        .await
        .expect_err("missing token file");
    assert!(err.to_string().contains("token_file"), "{err}");
    assert_eq!(server.requests().len(), before);
}

#[test]
fn token_from_the_environment() {
    const VAR: &str = "STELLA_NOMAD_TEST_TOKEN";
    // Set before any thread exists: nextest runs each test in its own process.
    // SAFETY: no other thread is running yet in this process.
    unsafe { std::env::set_var(VAR, TOKEN) };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let server = acl_server().await;
            let env = Env::new();
            let mut cfg = config(&env, &server);
            cfg.as_object_mut().unwrap().remove("token_file");
            cfg["token_env"] = json!(VAR);
            env.executor
                .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
                .await
                .expect("deploy with token_env");
            assert!(
                server
                    .requests()
                    .iter()
                    .all(|r| r.token.as_deref() == Some(TOKEN))
            );
            cfg["token_env"] = json!("STELLA_NOMAD_TEST_TOKEN_UNSET");
            let err = env
                .executor
                .inventory(&target(cfg))
                .await
                .expect_err("unset variable");
            assert!(
                err.to_string()
                    .contains("token_env STELLA_NOMAD_TEST_TOKEN_UNSET"),
                "{err}"
            );
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nomad_fails_fast() {
    let env = Env::new();
    // Nothing listens on this port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = json!({
        "address": format!("http://127.0.0.1:{port}"),
        "job_id": "web",
        "job_template": template(),
        "request_timeout_secs": 2,
    });
    let started = Instant::now();
    let err = env
        .executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect_err("refused");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.to_string()
            .contains(&format!("cannot reach Nomad at http://127.0.0.1:{port}")),
        "{err}"
    );

    // A peer that accepts connections and never answers: the request timeout ends it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut cfg = cfg.clone();
    cfg["address"] = json!(format!("http://127.0.0.1:{port}"));
    cfg["request_timeout_secs"] = json!(1);
    let started = Instant::now();
    let err = env
        .executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect_err("silent peer");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.reason_code(), "timeout", "{err}");
    assert!(err.to_string().contains("/v1/job/web"), "{err}");
    let started = Instant::now();
    let err = env
        .executor
        .read_sticker(&target(cfg))
        .await
        .expect_err("silent peer");
    assert_eq!(err.reason_code(), "timeout", "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    hold.abort();
}

async fn tls_server(leaf: &support::pki::Leaf, client_ca: Option<&TestCa>) -> FakeNomad {
    FakeNomad::start(Options {
        token: Some(TOKEN.to_string()),
        tls: Some(ServerTls {
            cert_pem: leaf.cert_pem.clone(),
            key_pem: leaf.key_pem.clone(),
            client_ca_pem: client_ca.map(|c| c.cert_pem.clone()),
        }),
        ..Default::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_test_ca() {
    let ca = TestCa::new("nomad test CA");
    let server = tls_server(&ca.server(&["localhost", "127.0.0.1"]), None).await;
    let env = Env::new();
    let mut cfg = config(&env, &server);
    assert!(server.address().starts_with("https://"));
    cfg["ca_file"] = json!(
        write(&env.dir, "ca.pem", &ca.cert_pem)
            .display()
            .to_string()
    );
    let t = target(cfg.clone());
    let r1 = release(&cfg, 1, 'a', 'b');
    env.executor
        .deploy(&r1, &NoProgress)
        .await
        .expect("deploy over TLS");
    assert_eq!(env.executor.inventory(&t).await.unwrap().len(), 3);
    let sticker = VersionSticker::for_deploy(&r1, "2025-01-02T03:04:05Z".to_string());
    env.executor.write_sticker(&t, &sticker).await.unwrap();
    assert_eq!(env.executor.read_sticker(&t).await.unwrap(), Some(sticker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_server_certificate_is_refused() {
    let ca = TestCa::new("nomad test CA");
    let impostor = TestCa::new("someone else's CA");
    let server = tls_server(&impostor.server(&["localhost", "127.0.0.1"]), None).await;
    let env = Env::new();
    let mut cfg = config(&env, &server);
    cfg["ca_file"] = json!(
        write(&env.dir, "ca.pem", &ca.cert_pem)
            .display()
            .to_string()
    );
    let err = env
        .executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect_err("untrusted certificate");
    let msg = err.to_string();
    assert!(msg.contains("cannot reach Nomad"), "{msg}");
    assert!(msg.contains("certificate"), "{msg}");
    assert!(server.requests().is_empty(), "nothing got through");

    // A trusted certificate for another name is refused as well…
    let named = tls_server(&ca.server(&["server.global.nomad"]), None).await;
    let mut cfg = config(&env, &named);
    cfg["ca_file"] = json!(
        write(&env.dir, "ca2.pem", &ca.cert_pem)
            .display()
            .to_string()
    );
    let err = env
        .executor
        .inventory(&target(cfg.clone()))
        .await
        .expect_err("wrong name");
    assert!(err.to_string().contains("certificate"), "{err}");
    // …unless the config names the server the way Nomad's certificates do.
    cfg["tls_server_name"] = json!("server.global.nomad");
    env.executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect("deploy with tls_server_name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let ca = TestCa::new("nomad test CA");
    let server = tls_server(&ca.server(&["127.0.0.1"]), Some(&ca)).await;
    let env = Env::new();
    let mut cfg = config(&env, &server);
    cfg["ca_file"] = json!(
        write(&env.dir, "ca.pem", &ca.cert_pem)
            .display()
            .to_string()
    );
    let err = env
        .executor
        .inventory(&target(cfg.clone()))
        .await
        .expect_err("no client certificate");
    assert!(err.to_string().contains("cannot reach Nomad"), "{err}");

    let client = ca.client("stella-agent");
    cfg["client_cert_file"] = json!(
        write(&env.dir, "cli.pem", &client.cert_pem)
            .display()
            .to_string()
    );
    cfg["client_key_file"] = json!(
        write(&env.dir, "cli-key.pem", &client.key_pem)
            .display()
            .to_string()
    );
    env.executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect("deploy with mTLS");
    assert_eq!(server.job("web").unwrap()["Version"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_refused_naming_the_key_before_anything_is_sent() {
    let server = acl_server().await;
    let env = Env::new();
    let cfg = config(&env, &server);
    assert!(env.executor.validate_config(&target(cfg.clone())).is_ok());
    assert_eq!(env.executor.kind(), "nomad");

    let cases = [
        (json!({"job_id": null}), "job_id"),
        (json!({"address": "nomad:4646"}), "address"),
        (
            json!({"deploy_timeout_secs": "soon"}),
            "deploy_timeout_secs",
        ),
        (json!({"auto_promote": 1}), "auto_promote"),
        (json!({"namespace": ""}), "namespace"),
        (json!({"token_env": "A", "token_file": "/t"}), "token_env"),
        (json!({"ca_file": "/etc/ca.pem"}), "ca_file"),
        (
            json!({"job_template": {"TaskGroups": []}}),
            "job_template.TaskGroups",
        ),
        (
            json!({"job_template": {"ID": "api", "TaskGroups": []}}),
            "job_template.ID",
        ),
        (json!({"job_tempate": {}}), "job_tempate"),
    ];
    for (change, key) in cases {
        let mut bad = cfg.clone();
        for (k, v) in change.as_object().unwrap() {
            if v.is_null() {
                bad.as_object_mut().unwrap().remove(k);
            } else {
                bad[k] = v.clone();
            }
        }
        match env.executor.validate_config(&target(bad)) {
            Err(PluginError::InvalidConfig(m)) => assert!(m.contains(key), "{change}: {m}"),
            other => panic!("{change}: {other:?}"),
        }
    }
    let mut wrong_kind = target(cfg.clone());
    wrong_kind.kind = "docker".to_string();
    assert!(env.executor.validate_config(&wrong_kind).is_err());

    // A component no task runs, or a malformed digest: refused before Nomad is contacted.
    let mut r = release(&cfg, 1, 'a', 'b');
    r.components[1].name = "db".to_string();
    let err = env
        .executor
        .deploy(&r, &NoProgress)
        .await
        .expect_err("no task");
    assert!(
        matches!(err, PluginError::InvalidConfig(ref m) if m.contains("\"db\"")),
        "{err}"
    );
    let mut r = release(&cfg, 1, 'a', 'b');
    r.components[0].digest = "latest".to_string();
    let err = env
        .executor
        .deploy(&r, &NoProgress)
        .await
        .expect_err("digest");
    assert_eq!(err.reason_code(), "invalid_target_config");
    assert!(server.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_file_namespace_and_region() {
    let server = acl_server().await;
    let env = Env::new();
    let mut cfg = config(&env, &server);
    cfg.as_object_mut().unwrap().remove("job_template");
    let file = write(&env.dir, "web.nomad.json", &template().to_string());
    cfg["job_template_file"] = json!(file.display().to_string());
    cfg["namespace"] = json!("apps");
    cfg["region"] = json!("global");
    let t = target(cfg.clone());
    env.executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &NoProgress)
        .await
        .expect("deploy from a template file");
    let job = server.job_in("apps", "web").expect("job in namespace apps");
    assert_eq!(job["Namespace"], "apps");
    assert_eq!(job["Region"], "global");
    assert!(server.job("web").is_none());
    assert!(server.requests().iter().all(|r| {
        r.query.get("namespace").map(String::as_str) == Some("apps")
            && r.query.get("region").map(String::as_str) == Some("global")
    }));
    assert_eq!(env.executor.inventory(&t).await.unwrap().len(), 3);

    // A broken template file is refused before anything is sent.
    let before = server.requests().len();
    std::fs::write(&file, "job \"web\" { }").unwrap();
    let err = env
        .executor
        .deploy(&release(&cfg, 2, 'c', 'd'), &NoProgress)
        .await
        .expect_err("HCL is not JSON");
    assert!(
        matches!(err, PluginError::InvalidConfig(ref m) if m.contains("job_template_file")),
        "{err}"
    );
    assert_eq!(server.requests().len(), before);

    // A region the cluster cannot reach is Nomad's error, passed on.
    let mut elsewhere = cfg.clone();
    elsewhere["region"] = json!("mars");
    let err = env
        .executor
        .inventory(&target(elsewhere))
        .await
        .expect_err("region");
    assert!(err.to_string().contains("No path to region"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_of_a_missing_job_is_empty() {
    let server = acl_server().await;
    let env = Env::new();
    let cfg = config(&env, &server);
    let t = target(cfg.clone());
    assert!(env.executor.inventory(&t).await.unwrap().is_empty());
    let r1 = release(&cfg, 1, 'a', 'b');
    let health = env.executor.health_check(&t, &r1.components).await.unwrap();
    assert!(!health.healthy);
    assert_eq!(health.components[0].detail, "not running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_election_during_the_watch_is_ridden_out() {
    let server = acl_server().await;
    let env = Env::new();
    let cfg = config(&env, &server);
    server.fail_reads("/v1/deployment/", 2);
    let p = Progress::default();
    let out = env
        .executor
        .deploy(&release(&cfg, 1, 'a', 'b'), &p)
        .await
        .expect("deploy despite two failed reads");
    assert!(all(&out, ComponentAction::Created));
    assert!(p.text().contains("No cluster leader"), "{}", p.text());
    assert!(p.text().contains("retrying"), "{}", p.text());
    assert_eq!(server.deployments().last().unwrap()["Status"], "successful");
}
