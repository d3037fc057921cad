//! Workflows end to end: automatic rollback when a new release does not come up, a plane
//! SIGKILLed in the middle of a run that resumes without repeating finished steps, releases
//! by tag against a real OCI registry, and the OpenAPI document against the live routes.

use std::time::Duration;

use serde_json::Value;
use stella_e2e::{
    Agent, Plane, TargetCleanup, TestImage, containers_of, inspect, sql_string, unique, wait_until,
};

fn step_statuses(promotion: &Value) -> Vec<(String, String)> {
    promotion["workflow"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn one_target(plane: &Plane, agent: &Agent, env: &str) -> (String, TargetCleanup) {
    plane.ok(&["env", "create", env]);
    let target = unique(&format!("web-{env}"));
    plane.ok(&[
        "target", "create", &target, "--env", env, "--kind", "docker", "--agent", &agent.id,
    ]);
    (target.clone(), TargetCleanup(target))
}

#[test]
fn a_release_that_does_not_come_up_is_rolled_back_to_the_previous_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "rb");
    let (target, _cleanup) = one_target(&plane, &agent, "dev");
    let repo = unique("stella-e2e/rb");
    let good = TestImage::busybox_sleeper(&repo, "good");
    // Exits at once: the executor's readiness check (running, healthy) fails.
    let bad = TestImage::build(&repo, "bad", &["/bin/busybox", "sh", "-c", "exit 3"]);

    plane.ok(&[
        "release",
        "create",
        "good-1",
        "--component",
        &good.component("web"),
    ]);
    plane.ok(&[
        "release",
        "create",
        "bad-2",
        "--component",
        &bad.component("web"),
    ]);
    let out = plane.ok(&["promote", "good-1", "--to", "dev"]);
    assert!(out.contains("deployed"), "{out}");
    let ids = containers_of(&target);
    assert_eq!(inspect(&ids[0])["Image"], good.id.as_str());

    // The CLI follows the promotion, shows the targets' progress and fails.
    let out = plane.cli(&["promote", "bad-2", "--to", "dev"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("rolled_back"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("[{target}]")),
        "per-target progress: {stdout}"
    );

    let promotions = plane.json(&["promotion", "list"]);
    let p = promotions
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["release"] == "bad-2")
        .unwrap()
        .clone();
    assert_eq!(p["status"], "rolled_back", "{p}");
    let steps = step_statuses(&p);
    let status_of = |id: &str| steps.iter().find(|(s, _)| s == id).unwrap().1.clone();
    assert_eq!(status_of("deploy"), "failed");
    assert_eq!(status_of("health"), "skipped");
    assert_eq!(status_of("rollback"), "succeeded");

    // What runs is the previous release's digest again.
    let ids = containers_of(&target);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let c = inspect(&ids[0]);
    assert_eq!(c["Image"], good.id.as_str());
    assert_eq!(c["State"]["Running"], true);
    let detail = plane.json(&["target", "show", &target]);
    assert_eq!(detail["desired"]["release_name"], "good-1", "{detail}");
}

#[test]
fn a_plane_killed_mid_workflow_resumes_without_repeating_finished_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "resume");
    let (target, _cleanup) = one_target(&plane, &agent, "dev");
    let repo = unique("stella-e2e/resume");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let workflow = tmp.path().join("workflow.yaml");
    std::fs::write(
        &workflow,
        "name: with-a-pause\nsteps:\n  - id: deploy\n    type: deploy\n  - id: pause\n    type: wait\n    needs: [deploy]\n    with: { duration: 4s }\n  - id: health\n    type: health-check\n    needs: [pause]\n    with: { container: true, interval: 1s, healthy_after: 2 }\n    timeout: 1m\n",
    )
    .unwrap();
    plane.ok(&[
        "env",
        "set",
        "dev",
        "--workflow",
        &workflow.display().to_string(),
    ]);
    plane.ok(&[
        "release",
        "create",
        "r1",
        "--component",
        &v1.component("web"),
    ]);
    let p = plane.json(&["promote", "r1", "--to", "dev", "--no-wait"]);
    let id = p["id"].as_str().unwrap().to_string();

    // Kill the plane while the wait step runs: deploy is finished by then.
    wait_until(Duration::from_secs(60), "the pause step to run", || {
        let p = plane.json(&["promotion", "show", &id]);
        step_statuses(&p)
            .iter()
            .any(|(s, st)| s == "pause" && st == "running")
            .then_some(())
    });
    plane.kill();
    plane.restart();

    let out = plane.ok(&["promotion", "watch", &id]);
    assert!(out.contains("deployed"), "{out}");
    let p = plane.json(&["promotion", "show", &id]);
    assert_eq!(p["status"], "deployed");
    let deploy = &p["workflow"]["steps"][0];
    assert_eq!(deploy["attempt"], 1, "deploy ran once: {p}");
    assert_eq!(deploy["deployments"].as_array().unwrap().len(), 1, "{p}");
    // One deployment and one job in the plane's database, one container on the host.
    let db = plane.db();
    let deployments = sql_string(&db, "SELECT CAST(COUNT(*) AS TEXT) FROM deployments", &[]);
    assert_eq!(deployments, "1");
    let jobs = sql_string(&db, "SELECT CAST(COUNT(*) AS TEXT) FROM jobs", &[]);
    assert_eq!(jobs, "1");
    assert_eq!(containers_of(&target).len(), 1);
}

#[test]
fn releases_resolve_tags_against_a_real_registry() {
    let registry = stella_plugin_testkit::registry::Registry::start();
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let local = unique("stella-e2e/reg");
    let v1 = TestImage::busybox_sleeper(&local, "1");
    let v2 = TestImage::busybox_sleeper(&local, "2");
    let repo = unique("team/api");
    let d1 = registry.push(&format!("{local}:1"), &repo, "1.2.3");
    let d2 = registry.push(&format!("{local}:2"), &repo, "1.3.0-beta.1");
    registry.push(&format!("{local}:1"), &repo, "latest");
    assert_ne!(d1, d2);
    drop((v1, v2));

    plane.ok(&[
        "component",
        "create",
        "api",
        "--registry",
        &registry.url(),
        "--repository",
        &repo,
    ]);
    let synced = plane.json(&["component", "sync", "api"]);
    let versions = synced["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "{synced}");
    assert_eq!(versions[0]["tag"], "1.3.0-beta.1");
    assert_eq!(versions[0]["channel"], "beta");
    assert_eq!(versions[0]["digest"], d2.as_str());
    assert_eq!(versions[1]["tag"], "1.2.3");
    assert_eq!(versions[1]["channel"], "stable");
    assert_eq!(versions[1]["digest"], d1.as_str());
    assert_eq!(synced["skipped"][0]["tag"], "latest");

    // A release pins the digest of the tag at creation time.
    let r = plane.json(&["release", "create", "api-1", "--component", "api:1.2.3"]);
    assert_eq!(r["components"][0]["digest"], d1.as_str());
    assert_eq!(
        r["components"][0]["image"],
        format!("{}/{repo}", registry.host())
    );
    // A tag never synced is resolved at creation; one that does not exist is refused and
    // nothing is created.
    let r = plane.json(&[
        "release",
        "create",
        "api-latest",
        "--component",
        "api:latest",
    ]);
    assert_eq!(r["components"][0]["digest"], d1.as_str());
    let err = plane.fails(&["release", "create", "api-x", "--component", "api:9.9.9"]);
    assert!(err.contains("9.9.9"), "{err}");
    let err = plane.fails(&["release", "show", "api-x"]);
    assert!(err.contains("not found"), "{err}");
    let diff = plane.json(&["release", "diff", "api-1", "api-latest"]);
    assert_eq!(diff["changes"][0]["change"], "unchanged", "{diff}");
    // Releases are immutable: the same name again is a conflict.
    let err = plane.fails(&[
        "release",
        "create",
        "api-1",
        "--component",
        "api:1.3.0-beta.1",
    ]);
    assert!(err.contains("immutable"), "{err}");
}

#[test]
fn the_openapi_document_validates_and_covers_every_route() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let (status, body) = plane.http("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    // Validated by an independent implementation of the OpenAPI specification.
    let file = tmp.path().join("openapi.json");
    std::fs::write(&file, &body).unwrap();
    let venv = std::env::var("STELLA_PY_VENV").unwrap_or_else(|_| "/opt/stella-test-venv".into());
    let out = std::process::Command::new(format!("{venv}/bin/openapi-spec-validator"))
        .arg(&file)
        .output()
        .expect("openapi-spec-validator (pip, installed by .ci/run)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every documented operation is served: a request with the documented method never
    // lands on the "no such API route" fallback.
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path
            .split('/')
            .map(|seg| {
                if seg.starts_with('{') {
                    "nonexistent"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/");
        for method in ["get", "post", "patch", "put", "delete"] {
            if item.get(method).is_none() || concrete.ends_with("/events") {
                continue;
            }
            operations += 1;
            let body = (method != "get").then_some("{}");
            let (status, text) = plane.http(&method.to_uppercase(), &concrete, None, body);
            assert!(
                !(status == 404 && text.contains("no such API route")),
                "{method} {path} is documented but not served"
            );
            assert_ne!(status, 405, "{method} {path}: method not allowed");
        }
    }
    assert!(operations >= 40, "only {operations} operations documented");
    // And an undocumented route is not served.
    let (status, text) = plane.http("GET", "/api/v1/nonexistent-route", None, None);
    assert_eq!(status, 404);
    assert!(text.contains("no such API route"));
}
