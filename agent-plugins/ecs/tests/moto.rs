//! The ecs executor against moto's ECS server (the real AWS JSON API shapes), one server per
//! test (see `common`).
//!
//! What moto does not do, and a real cluster adds:
//! - moto never starts tasks for a service: `runningCount` stays 0. The services here therefore
//!   run `desiredCount: 0`, so `runningCount == desiredCount` holds and the PRIMARY deployment's
//!   `rolloutState` (COMPLETED in moto) decides "settled". On a real cluster the new revision's
//!   PRIMARY deployment goes IN_PROGRESS → COMPLETED as tasks start and pass their health
//!   checks, `runningCount` climbs to `desiredCount`, and the deployment circuit breaker turns
//!   a rollout whose tasks keep failing into FAILED (reported as `Unhealthy`, unit-tested on
//!   `observe`).
//! - moto keeps the service's original deployment object after UpdateService (the service's
//!   `taskDefinition` does change); ECS creates a new PRIMARY deployment for the new revision.
//! - moto accepts any credentials, so "wrong credentials" is covered as a missing credential
//!   variable here; ECS itself answers UnrecognizedClientException/InvalidSignatureException,
//!   which the executor reports as refused credentials.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{Moto, Recorder, components, digest, executor, spec};
use serde_json::json;
use stella_plugin_ecs::{LABEL_COMPONENT, LABEL_DIGEST, LABEL_RELEASE_ID};
use stella_plugin_sdk::{
    ComponentAction, Executor, NoProgress, PluginError, STICKER_SCHEMA, VersionSticker,
};

fn image(repo: &str, c: char) -> String {
    format!("registry.example:5000/demo/{repo}@{}", digest(c))
}

fn label<'a>(c: &'a aws_sdk_ecs::types::ContainerDefinition, key: &str) -> Option<&'a str> {
    c.docker_labels()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

fn tag<'a>(tags: &'a [aws_sdk_ecs::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

#[tokio::test]
async fn deploy_registers_a_revision_pinned_by_digest_and_an_identical_redeploy_is_unchanged() {
    let moto = Moto::start().await;
    let (cluster, service) = moto.setup("deploy", 0).await;
    let target = moto.target(&cluster, &service, json!({}));
    let exec = executor();
    exec.validate_config(&target).unwrap();
    assert_eq!(exec.inventory(&target).await.unwrap(), vec![]);

    let progress = Recorder::default();
    let r1 = spec(&target, "r1", components('a', 'b'));
    let outcome = exec.deploy(&r1, &progress).await.unwrap();

    let lines = progress.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("registered deploy-fam:2 pinning web=sha256:aaa")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("settled on deploy-fam:2")),
        "{lines:?}"
    );
    assert_eq!(outcome.components.len(), 2);
    for c in &outcome.components {
        assert_eq!(c.action, ComponentAction::Replaced);
        assert!(
            c.workload_id.starts_with("arn:aws:ecs:eu-west-1:") && c.workload_id.contains(&service),
            "{}",
            c.workload_id
        );
    }
    assert!(outcome.components[1].workload_id.ends_with("#app"));

    let revisions = moto.revisions("deploy-fam").await;
    assert_eq!(revisions.len(), 2);
    let (td, tags) = moto.service_task_definition(&cluster, &service).await;
    assert_eq!(td.task_definition_arn(), Some(revisions[1].as_str()));
    let web = td
        .container_definitions()
        .iter()
        .find(|c| c.name() == Some("web"))
        .unwrap();
    let app = td
        .container_definitions()
        .iter()
        .find(|c| c.name() == Some("app"))
        .unwrap();
    let envoy = td
        .container_definitions()
        .iter()
        .find(|c| c.name() == Some("envoy"))
        .unwrap();
    assert_eq!(web.image(), Some(image("web", 'a').as_str()));
    assert_eq!(app.image(), Some(image("api", 'b').as_str()));
    // The sidecar the release does not name keeps its image and stays unlabelled.
    assert_eq!(envoy.image(), Some("envoyproxy/envoy:v1.31"));
    assert_eq!(label(envoy, LABEL_COMPONENT), None);
    assert_eq!(label(app, LABEL_COMPONENT), Some("api"));
    assert_eq!(label(app, LABEL_RELEASE_ID), Some("r1"));
    assert_eq!(label(app, LABEL_DIGEST), Some(digest('b').as_str()));
    assert_eq!(label(app, "team"), Some("web"));
    // Everything else of the revision is copied.
    assert_eq!(app.environment().len(), 1);
    assert_eq!(app.memory(), Some(128));
    assert_eq!(envoy.essential(), Some(false));
    assert_eq!(td.cpu(), Some("256"));
    assert_eq!(td.memory(), Some("512"));
    assert_eq!(td.network_mode().map(|m| m.as_str()), Some("bridge"));
    assert_eq!(
        td.execution_role_arn(),
        Some("arn:aws:iam::123456789012:role/ecs-exec")
    );
    assert_eq!(
        td.task_role_arn(),
        Some("arn:aws:iam::123456789012:role/app")
    );
    assert_eq!(td.requires_compatibilities().len(), 1);
    assert_eq!(tag(&tags, "team"), Some("web"));
    assert_eq!(tag(&tags, "stella.release.id"), Some("r1"));
    assert_eq!(tag(&tags, "stella.deployment.id"), Some("dep-r1"));
    assert_eq!(tag(&tags, "stella.digest.app"), Some(digest('b').as_str()));

    let inventory = exec.inventory(&target).await.unwrap();
    assert_eq!(inventory.len(), 2);
    assert_eq!(inventory[0].component, "api");
    assert_eq!(inventory[0].digest, digest('b'));
    assert_eq!(inventory[1].component, "web");
    assert_eq!(inventory[1].digest, digest('a'));
    for item in &inventory {
        assert_eq!(item.release_id.as_deref(), Some("r1"));
        assert_eq!(item.deployment_id.as_deref(), Some("dep-r1"));
        // desiredCount 0: settled, but nothing runs. A real service reports "running".
        assert_eq!(item.state, "stopped");
    }

    // Same release again: nothing registered, nothing updated.
    let progress = Recorder::default();
    let mut again = r1.clone();
    again.job_id = "job-r1-retry".to_string();
    let outcome = exec.deploy(&again, &progress).await.unwrap();
    assert!(
        outcome
            .components
            .iter()
            .all(|c| c.action == ComponentAction::Unchanged)
    );
    assert_eq!(moto.revisions("deploy-fam").await.len(), 2);
    assert!(
        progress
            .lines()
            .iter()
            .any(|l| l.contains("already pins release r1")),
        "{:?}",
        progress.lines()
    );

    // The default health check reads the inventory: a service that runs no task is not healthy.
    let health = exec.health_check(&target, &r1.components).await.unwrap();
    assert!(!health.healthy);
    assert_eq!(health.components[0].detail, "state stopped");
}

#[tokio::test]
async fn upgrade_then_native_rollback_returns_to_the_earlier_revision() {
    let moto = Moto::start().await;
    let (cluster, service) = moto.setup("upgrade", 0).await;
    let target = moto.target(&cluster, &service, json!({}));
    let exec = executor();

    let r1 = spec(&target, "r1", components('a', 'b'));
    exec.deploy(&r1, &NoProgress).await.unwrap();
    // Only web changes in r2: api keeps its digest but under a new release.
    let r2 = spec(&target, "r2", components('c', 'b'));
    let upgrade = exec.deploy(&r2, &NoProgress).await.unwrap();
    assert!(
        upgrade
            .components
            .iter()
            .all(|c| c.action == ComponentAction::Replaced)
    );
    let revisions = moto.revisions("upgrade-fam").await;
    assert_eq!(revisions.len(), 3);
    let (td, _) = moto.service_task_definition(&cluster, &service).await;
    assert_eq!(td.task_definition_arn(), Some(revisions[2].as_str()));
    let inventory = exec.inventory(&target).await.unwrap();
    let web = inventory.iter().find(|i| i.component == "web").unwrap();
    assert_eq!(web.digest, digest('c'));
    assert_eq!(web.release_id.as_deref(), Some("r2"));

    // Rollback to r1: the service goes back to revision 2; nothing new is registered.
    let progress = Recorder::default();
    let back = exec.rollback(&r1, &progress).await.unwrap();
    assert_eq!(back.components.len(), 2);
    assert_eq!(moto.revisions("upgrade-fam").await.len(), 3);
    let (td, _) = moto.service_task_definition(&cluster, &service).await;
    assert_eq!(td.task_definition_arn(), Some(revisions[1].as_str()));
    assert!(
        progress
            .lines()
            .iter()
            .any(|l| l.starts_with("rolling back to upgrade-fam:2")),
        "{:?}",
        progress.lines()
    );
    let inventory = exec.inventory(&target).await.unwrap();
    assert_eq!(inventory.len(), 2);
    for item in &inventory {
        assert_eq!(item.release_id.as_deref(), Some("r1"));
    }
    assert_eq!(
        inventory
            .iter()
            .find(|i| i.component == "web")
            .unwrap()
            .digest,
        digest('a')
    );

    // A second rollback is an ensure: unchanged.
    let again = exec.rollback(&r1, &NoProgress).await.unwrap();
    assert!(
        again
            .components
            .iter()
            .all(|c| c.action == ComponentAction::Unchanged)
    );

    // A release the family never had is registered from the current revision.
    let r0 = spec(&target, "r0", components('d', 'e'));
    exec.rollback(&r0, &NoProgress).await.unwrap();
    let revisions = moto.revisions("upgrade-fam").await;
    assert_eq!(revisions.len(), 4);
    let (td, _) = moto.service_task_definition(&cluster, &service).await;
    assert_eq!(td.task_definition_arn(), Some(revisions[3].as_str()));
    let inventory = exec.inventory(&target).await.unwrap();
    assert_eq!(
        inventory
            .iter()
            .find(|i| i.component == "api")
            .unwrap()
            .digest,
        digest('e')
    );
}

#[tokio::test]
async fn sticker_is_written_to_service_tags_and_read_back() {
    let moto = Moto::start().await;
    let (cluster, service) = moto.setup("sticker", 0).await;
    let target = moto.target(&cluster, &service, json!({}));
    let exec = executor();

    assert_eq!(exec.read_sticker(&target).await.unwrap(), None);

    let mut big = spec(&target, "r1", components('a', 'b'));
    for i in 0..6 {
        big.components.push(stella_plugin_sdk::ComponentSpec {
            name: format!("extra-{i}"),
            image: format!("registry.example:5000/demo/extra-{i}:1"),
            digest: digest('f'),
        });
    }
    let sticker = VersionSticker::for_deploy(&big, "2025-01-01T00:00:00Z".to_string());
    exec.write_sticker(&target, &sticker).await.unwrap();
    assert_eq!(exec.read_sticker(&target).await.unwrap(), Some(sticker));
    let tags = moto.service_tags(&cluster, &service).await;
    let parts = tags
        .iter()
        .filter(|t| t.key().unwrap().starts_with("stella.version."))
        .count();
    assert!(parts > 3, "a big sticker spans several tags: {parts}");

    // A smaller sticker replaces it and its left-over parts are removed.
    let small = spec(&target, "r2", components('c', 'd'));
    let sticker = VersionSticker::for_deploy(&small, "2025-01-02T00:00:00Z".to_string());
    exec.write_sticker(&target, &sticker).await.unwrap();
    let read = exec.read_sticker(&target).await.unwrap().unwrap();
    assert_eq!(read, sticker);
    assert_eq!(read.schema, STICKER_SCHEMA);
    let tags = moto.service_tags(&cluster, &service).await;
    let header = tag(&tags, "stella.version").unwrap();
    let announced: usize = header.strip_prefix("base64:").unwrap().parse().unwrap();
    let parts = tags
        .iter()
        .filter(|t| t.key().unwrap().starts_with("stella.version."))
        .count();
    assert_eq!(parts, announced);
}

#[tokio::test]
async fn a_service_that_never_settles_fails_the_deploy_within_the_settle_timeout() {
    let moto = Moto::start().await;
    // desiredCount 1: moto never starts the task, so the rollout stays IN_PROGRESS with 0/1
    // running — what a real cluster shows when tasks cannot start (unpullable digest, failing
    // health check) until the circuit breaker or the timeout ends it.
    let (cluster, service) = moto.setup("stuck", 1).await;
    let target = moto.target(
        &cluster,
        &service,
        json!({"settle_timeout_secs": 3, "poll_interval_secs": 1}),
    );
    let exec = executor();
    let progress = Recorder::default();
    let started = Instant::now();
    let err = exec
        .deploy(&spec(&target, "r1", components('a', 'b')), &progress)
        .await
        .unwrap_err();
    let took = started.elapsed();
    match &err {
        PluginError::Timeout { seconds, what } => {
            assert_eq!(*seconds, 3);
            assert!(what.contains("to settle on stuck-fam:2"), "{what}");
            assert!(what.contains("running 0/1"), "{what}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(
        progress
            .lines()
            .iter()
            .any(|l| l == "stuck-fam:2: rollout IN_PROGRESS, running 0/1, pending 1"),
        "{:?}",
        progress.lines()
    );
    let inventory = exec.inventory(&target).await.unwrap();
    assert!(
        inventory.iter().all(|i| i.state == "pending"),
        "{inventory:?}"
    );
    let health = exec
        .health_check(&target, &components('a', 'b'))
        .await
        .unwrap();
    assert!(!health.healthy);
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_changes() {
    let moto = Moto::start().await;
    let (cluster, service) = moto.setup("refuse", 0).await;
    let exec = executor();

    // A component without a container in the task definition.
    let target = moto.target(&cluster, &service, json!({"container_map": {}}));
    let err = exec
        .deploy(&spec(&target, "r1", components('a', 'b')), &NoProgress)
        .await
        .unwrap_err();
    match &err {
        PluginError::InvalidConfig(m) => {
            assert!(m.contains("component api"), "{m}");
            assert!(m.contains("container_map"), "{m}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }

    // A malformed digest.
    let target = moto.target(&cluster, &service, json!({}));
    let mut bad = components('a', 'b');
    bad[0].digest = "sha256:nothex".to_string();
    let err = exec
        .deploy(&spec(&target, "r1", bad), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::InvalidConfig(_)), "{err:?}");

    // A missing credential variable: named, and nothing was called.
    let target = moto.target(
        &cluster,
        &service,
        json!({"credentials": {
            "access_key_id_env": common::KEY_ID_ENV,
            "secret_access_key_env": "STELLA_ECS_TEST_NO_SUCH_SECRET",
        }}),
    );
    exec.validate_config(&target).unwrap();
    let err = exec
        .deploy(&spec(&target, "r1", components('a', 'b')), &NoProgress)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::InvalidConfig(_)), "{err:?}");
    assert!(msg.contains("STELLA_ECS_TEST_NO_SUCH_SECRET"), "{msg}");
    assert!(msg.contains("credentials.secret_access_key_env"), "{msg}");
    assert!(!msg.contains("stella-test-secret"), "{msg}");
    let err = exec.read_sticker(&target).await.unwrap_err();
    assert!(err.to_string().contains("STELLA_ECS_TEST_NO_SUCH_SECRET"));

    // A service that does not exist.
    let target = moto.target(&cluster, "no-such-service", json!({}));
    let err = exec.inventory(&target).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("service no-such-service in cluster refuse-cluster"),
        "{err}"
    );
    let target = moto.target("no-such-cluster", &service, json!({}));
    let err = exec.inventory(&target).await.unwrap_err();
    assert!(
        err.to_string().contains("ClusterNotFoundException"),
        "{err}"
    );

    assert_eq!(moto.revisions("refuse-fam").await.len(), 1);
    assert_eq!(
        exec.inventory(&moto.target(&cluster, &service, json!({})))
            .await
            .unwrap(),
        vec![]
    );

    // Config errors name the key.
    for (extra, key) in [
        (json!({"region": "Mars"}), "region"),
        (json!({"poll_interval_secs": 0}), "poll_interval_secs"),
        (
            json!({"credentials": {"profile": 3}}),
            "credentials.profile",
        ),
        (json!({"servcie": "x"}), "servcie"),
    ] {
        let err = exec
            .validate_config(&moto.target(&cluster, &service, extra.clone()))
            .unwrap_err();
        assert!(err.to_string().contains(key), "{extra}: {err}");
    }
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_fast_instead_of_hanging() {
    common::init();
    let exec = executor();
    let spec_for = |endpoint: String| {
        let target = stella_plugin_sdk::TargetRef {
            name: "ecs-unreachable".to_string(),
            kind: "ecs".to_string(),
            config: json!({
                "cluster": "c",
                "service": "s",
                "endpoint_url": endpoint,
                "credentials": {
                    "access_key_id_env": common::KEY_ID_ENV,
                    "secret_access_key_env": common::SECRET_ENV,
                },
                "connect_timeout_secs": 1,
                "api_timeout_secs": 2,
            }),
        };
        spec(&target, "r1", components('a', 'b'))
    };

    // Nothing listens: connection refused, retried, then reported.
    let closed = common::free_port();
    let started = Instant::now();
    let err = exec
        .deploy(&spec_for(format!("http://127.0.0.1:{closed}")), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("127.0.0.1:{closed}")) && msg.contains("DescribeServices"),
        "{msg}"
    );
    assert!(
        matches!(err, PluginError::Backend(_) | PluginError::Timeout { .. }),
        "{err:?}"
    );

    // Something accepts connections but never answers: the API timeout ends the call.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let err = exec
        .deploy(&spec_for(format!("http://127.0.0.1:{port}")), &NoProgress)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    match &err {
        PluginError::Timeout { seconds, what } => {
            assert_eq!(*seconds, 2);
            assert!(what.contains("DescribeServices"), "{what}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    drop(silent);
}
