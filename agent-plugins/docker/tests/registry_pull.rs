//! Pull by digest from a real registry (distribution 2.8 on loopback, see the testkit): images
//! are imported locally, pushed, removed from the engine, and deployed by their manifest digest.

use serde_json::Value;
use stella_plugin_docker::*;
use stella_plugin_sdk::{ComponentAction, ComponentSpec, Executor, TargetRef};
use stella_plugin_testkit::docker::{
    Scratch, assert_untouched, containers_labelled, docker, docker_ok, inspect, started_at,
};
use stella_plugin_testkit::registry::Registry;
use stella_plugin_testkit::{Recorder, deploy_fails, expect, spec};

/// A registry holding `<scratch repo>:<tag>` pushed from a local image that is then removed,
/// so that only the registry has it.
struct Remote {
    scratch: Scratch,
    registry: Registry,
    /// `127.0.0.1:PORT/<repo>`.
    repo: String,
}

impl Remote {
    fn new() -> Self {
        let scratch = Scratch::new("stella-pull");
        let registry = Registry::start();
        let repo = format!("{}/{}", registry.host(), scratch.repo);
        Self {
            scratch,
            registry,
            repo,
        }
    }

    /// Imports a sleeper as `tag`, pushes it, removes it from the engine; returns (image id,
    /// manifest digest).
    fn push_only(&self, tag: &str, secs: u32) -> (String, String) {
        let id = self.scratch.sleeper(tag, secs);
        let digest = self.registry.push(
            &format!("{}:{tag}", self.scratch.repo),
            &self.scratch.repo,
            tag,
        );
        docker(&["rmi", &format!("{}:{tag}", self.scratch.repo)]);
        assert!(
            !docker_ok(&["image", "inspect", &id]),
            "image {id} still local"
        );
        // Whatever the deploy pulls goes when the test ends.
        self.scratch
            .cleanup
            .image(&format!("{}@{digest}", self.repo));
        (id, digest)
    }

    fn component(&self, tag: &str, digest: &str) -> ComponentSpec {
        ComponentSpec {
            name: "web".to_string(),
            image: format!("{}:{tag}", self.repo),
            digest: digest.to_string(),
        }
    }

    fn target(&self) -> TargetRef {
        let name = format!("t-{}", self.scratch.id);
        self.scratch
            .cleanup
            .labelled(&format!("{LABEL_TARGET}={name}"));
        TargetRef {
            name,
            kind: "docker".to_string(),
            config: Value::Null,
        }
    }

    async fn executor(&self) -> DockerExecutor {
        DockerExecutor::connect(self.scratch.ctx()).await.unwrap()
    }
}

#[tokio::test]
async fn a_missing_image_is_pulled_by_its_manifest_digest() {
    let remote = Remote::new();
    let (image_id, digest) = remote.push_only("1.2.3", 3600);
    let target = remote.target();
    let exec = remote.executor().await;
    let progress = Recorder::default();

    let s = spec(&target, "r1", vec![remote.component("1.2.3", &digest)]);
    let out = exec.deploy(&s, &progress).await.unwrap();

    assert_eq!(out.components[0].action, ComponentAction::Created);
    assert_eq!(out.components[0].digest, digest);
    let info = inspect(&out.components[0].workload_id);
    // The container runs the pulled image, which is the pushed one.
    assert_eq!(info["Image"], Value::from(image_id.clone()));
    expect::stella_container(&info, &s, &s.components[0], &image_id);
    let repo_digests = docker(&["image", "inspect", "-f", "{{json .RepoDigests}}", &image_id]);
    assert!(
        repo_digests.contains(&format!("{}@{digest}", remote.repo)),
        "{repo_digests}"
    );
    // Pulled by digest, never by tag: the tag was not asked for and is not on the engine.
    assert!(!docker_ok(&[
        "image",
        "inspect",
        &format!("{}:1.2.3", remote.repo)
    ]));
    let log = remote.registry.log();
    assert!(
        log.contains(&format!(
            "GET /v2/{}/manifests/{digest}",
            remote.scratch.repo
        )),
        "{log}"
    );
    assert!(
        !log.contains(&format!("GET /v2/{}/manifests/1.2.3", remote.scratch.repo)),
        "{log}"
    );
    let lines = progress.lines();
    assert!(
        lines.iter().any(|l| l.starts_with("web: pulling")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("web: pulled")),
        "{lines:?}"
    );

    // The inventory reports the manifest digest the release asked for.
    let inv = exec.inventory(&target).await.unwrap();
    assert_eq!(inv[0].digest, digest);

    // Deployed again, the image is local now: no second pull.
    let again = Recorder::default();
    let second = exec.deploy(&s, &again).await.unwrap();
    assert_eq!(second.components[0].action, ComponentAction::Unchanged);
    assert!(
        !again.lines().iter().any(|l| l.starts_with("web: pulling")),
        "{:?}",
        again.lines()
    );
}

#[tokio::test]
async fn a_digest_the_registry_does_not_have_is_refused_and_nothing_changes() {
    let remote = Remote::new();
    let (v1, d1) = remote.push_only("1.0.0", 3600);
    let (_, d2) = remote.push_only("2.0.0", 3601);
    let target = remote.target();
    let exec = remote.executor().await;
    let first = exec
        .deploy(
            &spec(&target, "r1", vec![remote.component("1.0.0", &d1)]),
            &Recorder::default(),
        )
        .await
        .unwrap();
    let web = first.components[0].workload_id.clone();
    let started = started_at(&web);

    // A digest of this repository that no manifest has (e.g. a corrupted or forged release).
    let wrong = stella_plugin_testkit::docker::unknown_digest(0x9e9);
    let err = deploy_fails(
        &exec,
        &target,
        "r2",
        vec![remote.component("2.0.0", &wrong)],
    )
    .await;

    let detail = expect::unavailable(&err, "web", &wrong);
    assert!(detail.contains("manifest unknown"), "{detail}");
    assert_eq!(
        containers_labelled(&format!("{LABEL_TARGET}={}", target.name)),
        vec![web.clone()]
    );
    assert_untouched(&web, &v1, &started);
    assert!(!docker_ok(&[
        "image",
        "inspect",
        &format!("{}@{wrong}", remote.repo)
    ]));

    // The right digest of the same tag goes through.
    let fixed = exec
        .deploy(
            &spec(&target, "r2", vec![remote.component("2.0.0", &d2)]),
            &Recorder::default(),
        )
        .await
        .unwrap();
    assert_eq!(fixed.components[0].action, ComponentAction::Replaced);
}
