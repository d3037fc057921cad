//! Promotions end to end: a real plane and agent, the machine's Docker Engine, users with
//! roles. dev → stage → prod with two approvers, separation of duties, a dependency gate, a
//! freeze window and its override, a Rego policy on a release label, and every decision
//! explained.

use serde_json::Value;
use stella_e2e::{Agent, Plane, TargetCleanup, TestImage, containers_of, inspect, unique};

struct Users {
    alice: String, // releaser: creates releases and requests promotions
    bob: String,   // approver
    carol: String, // approver
    viewer: String,
}

fn token(plane: &Plane, user: &str, role: &str) -> String {
    let created = plane.json(&["token", "api", "create", "--user", user, "--role", role]);
    created["token"].as_str().expect("token").to_string()
}

fn as_user(plane: &Plane, token: &str, args: &[&str]) -> std::process::Output {
    let mut full = vec!["--token", token];
    full.extend_from_slice(args);
    plane.cli(&full)
}

fn ok_as(plane: &Plane, token: &str, args: &[&str]) -> Value {
    let mut full = args.to_vec();
    full.extend(["--output", "json"]);
    let out = as_user(plane, token, &full);
    assert!(
        out.status.success(),
        "stella {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn fails_as(plane: &Plane, token: &str, args: &[&str]) -> String {
    let out = as_user(plane, token, args);
    assert!(
        !out.status.success(),
        "stella {args:?} unexpectedly succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn gate<'a>(promotion: &'a Value, name: &str) -> &'a Value {
    promotion["decision"]["gates"]
        .as_array()
        .expect("gates")
        .iter()
        .find(|g| g["gate"] == name)
        .unwrap_or_else(|| panic!("no gate {name} in {promotion}"))
}

#[test]
fn dev_stage_prod_with_two_approvers_and_gates() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "promo");
    let repo = unique("stella-e2e/promo");
    let v1 = TestImage::busybox_sleeper(&repo, "1");

    plane.ok(&["env", "create", "dev"]);
    plane.ok(&[
        "env",
        "create",
        "stage",
        "--after",
        "dev",
        "--approvals",
        "1",
    ]);
    plane.ok(&[
        "env",
        "create",
        "prod",
        "--after",
        "stage",
        "--approvals",
        "2",
        "--separation-of-duties",
    ]);
    let mut cleanups = Vec::new();
    let mut targets = Vec::new();
    for env in ["dev", "stage", "prod"] {
        let target = unique(&format!("web-{env}"));
        plane.ok(&[
            "target", "create", &target, "--env", env, "--kind", "docker", "--agent", &agent.id,
        ]);
        cleanups.push(TargetCleanup(target.clone()));
        targets.push(target);
    }
    let users = Users {
        alice: token(&plane, "alice", "releaser"),
        bob: token(&plane, "bob", "approver"),
        carol: token(&plane, "carol", "approver"),
        viewer: token(&plane, "vic", "viewer"),
    };

    // Roles: a viewer cannot create releases, an approver cannot promote.
    let err = fails_as(
        &plane,
        &users.viewer,
        &[
            "release",
            "create",
            "x",
            "--component",
            &v1.component("web"),
        ],
    );
    assert!(err.contains("role viewer") && err.contains("403"), "{err}");
    ok_as(
        &plane,
        &users.alice,
        &[
            "release",
            "create",
            "demo-1",
            "--component",
            &v1.component("web"),
        ],
    );
    let err = fails_as(&plane, &users.bob, &["promote", "demo-1", "--to", "dev"]);
    assert!(err.contains("role approver"), "{err}");

    // dev needs nothing: promoted and deployed in one go.
    let dev = ok_as(&plane, &users.alice, &["promote", "demo-1", "--to", "dev"]);
    assert_eq!(dev["status"], "deployed", "{dev}");
    let ids = containers_of(&targets[0]);
    assert_eq!(ids.len(), 1);
    assert_eq!(inspect(&ids[0])["Image"], v1.id.as_str());

    // prod before stage: the dependency gate fails and rejects, whatever approvals say.
    let out = as_user(
        &plane,
        &users.alice,
        &["promote", "demo-1", "--to", "prod", "--output", "json"],
    );
    assert!(!out.status.success(), "a rejected promotion exits non-zero");
    let list = plane.json(&["promotion", "list"]);
    let early = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["environment"] == "prod")
        .unwrap()
        .clone();
    assert_eq!(early["status"], "rejected", "{early}");
    assert_eq!(gate(&early, "dependency")["status"], "failed");
    let explain = plane.json(&["promotion", "explain", early["id"].as_str().unwrap()]);
    assert!(
        explain["summary"].as_str().unwrap().contains("dependency"),
        "{explain}"
    );
    assert!(
        explain["decisions"][0]["input_hash"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(explain["input"]["release"]["name"], "demo-1");

    // stage: one approval.
    let stage = ok_as(
        &plane,
        &users.alice,
        &["promote", "demo-1", "--to", "stage"],
    );
    assert_eq!(stage["status"], "awaiting_approval", "{stage}");
    assert_eq!(gate(&stage, "approvals")["status"], "pending");
    let stage_id = stage["id"].as_str().unwrap().to_string();
    let approved = ok_as(
        &plane,
        &users.bob,
        &["approve", &stage_id, "--comment", "lgtm"],
    );
    assert_eq!(approved["status"], "deployed", "{approved}");

    // prod: two approvals, separation of duties.
    let prod = ok_as(&plane, &users.alice, &["promote", "demo-1", "--to", "prod"]);
    assert_eq!(prod["status"], "awaiting_approval", "{prod}");
    let prod_id = prod["id"].as_str().unwrap().to_string();
    // alice may approve (her token says releaser) only as approver — give her one and see
    // separation of duties refuse her, and nothing recorded.
    let alice_approver = token(&plane, "alice", "approver");
    let err = fails_as(&plane, &alice_approver, &["approve", &prod_id]);
    assert!(err.contains("separation of duties"), "{err}");
    let after_one = ok_as(&plane, &users.bob, &["approve", &prod_id]);
    assert_eq!(after_one["status"], "awaiting_approval", "{after_one}");
    assert_eq!(after_one["approvals"].as_array().unwrap().len(), 1);
    let err = fails_as(&plane, &users.bob, &["approve", &prod_id]);
    assert!(err.contains("already decided"), "{err}");
    let done = ok_as(&plane, &users.carol, &["approve", &prod_id]);
    assert_eq!(done["status"], "deployed", "{done}");
    let ids = containers_of(&targets[2]);
    assert_eq!(ids.len(), 1);
    assert_eq!(inspect(&ids[0])["Image"], v1.id.as_str());
    let shown = plane.json(&["promotion", "show", &prod_id]);
    let steps: Vec<&str> = shown["workflow"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "succeeded",
            "succeeded",
            "succeeded",
            "succeeded",
            "skipped"
        ],
        "approve, gate, deploy, health ran; rollback skipped: {shown}"
    );

    // Every mutation is audited with its user.
    let audit = plane.json(&["audit", "--limit", "200"]);
    let approvals_by_carol = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"] == "carol" && e["path"].as_str().unwrap().ends_with("/approve"))
        .count();
    assert_eq!(approvals_by_carol, 1, "{audit}");
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "alice" && e["status"] == 403),
        "refusals are audited too"
    );
}

#[test]
fn freeze_windows_and_rego_policies_reject_and_an_allowed_user_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "freeze");
    let repo = unique("stella-e2e/freeze");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    plane.ok(&["env", "create", "live"]);
    let target = unique("web-live");
    let _cleanup = TargetCleanup(target.clone());
    plane.ok(&[
        "target", "create", &target, "--env", "live", "--kind", "docker", "--agent", &agent.id,
    ]);
    let alice = token(&plane, "alice", "releaser");
    let dave = token(&plane, "dave", "releaser");

    let now = time::OffsetDateTime::now_utc();
    let fmt = |t: time::OffsetDateTime| {
        t.replace_nanosecond(0)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let window = format!(
        "{}..{}:holiday:dave",
        fmt(now - time::Duration::hours(1)),
        fmt(now + time::Duration::hours(1))
    );
    plane.ok(&["env", "set", "live", "--freeze", &window]);

    ok_as(
        &plane,
        &alice,
        &[
            "release",
            "create",
            "r1",
            "--component",
            &v1.component("web"),
        ],
    );
    let err = fails_as(&plane, &alice, &["promote", "r1", "--to", "live"]);
    assert!(err.contains("rejected"), "{err}");
    // alice is not an override user: asking for the override changes nothing.
    let err = fails_as(
        &plane,
        &alice,
        &["promote", "r1", "--to", "live", "--override-freeze"],
    );
    assert!(err.contains("freeze"), "{err}");
    // dave is: the freeze gate passes, with the override named.
    let p = ok_as(
        &plane,
        &dave,
        &["promote", "r1", "--to", "live", "--override-freeze"],
    );
    assert_eq!(p["status"], "deployed", "{p}");
    let freeze = gate(&p, "freeze_window");
    assert_eq!(freeze["status"], "passed");
    assert!(
        freeze["reason"].as_str().unwrap().contains("dave"),
        "{freeze}"
    );

    // Rego: deny releases labelled risky.
    plane.ok(&["env", "set", "live", "--clear-freezes"]);
    let policy = tmp.path().join("risky.rego");
    std::fs::write(
        &policy,
        "package stella.promotion\n\ndeny contains msg if {\n  input.release.labels.risky == \"true\"\n  msg := sprintf(\"release %s is labelled risky\", [input.release.name])\n}\n",
    )
    .unwrap();
    plane.ok(&[
        "env",
        "set",
        "live",
        "--policy",
        &format!("no-risky={}", policy.display()),
    ]);
    ok_as(
        &plane,
        &alice,
        &[
            "release",
            "create",
            "r2",
            "--component",
            &v1.component("web"),
            "--label",
            "risky=true",
        ],
    );
    let err = fails_as(&plane, &alice, &["promote", "r2", "--to", "live"]);
    assert!(err.contains("labelled risky"), "{err}");
    // A syntax error in a policy is refused when it is set, and changes nothing.
    let broken = tmp.path().join("broken.rego");
    std::fs::write(
        &broken,
        "package stella.promotion\ndeny contains msg if {\n",
    )
    .unwrap();
    let err = plane.fails(&[
        "env",
        "set",
        "live",
        "--policy",
        &format!("broken={}", broken.display()),
    ]);
    assert!(err.contains("policy"), "{err}");
    let env = plane.json(&["env", "show", "live"]);
    assert!(env["settings"]["policies"].get("broken").is_none(), "{env}");
}
