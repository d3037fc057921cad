//! Invariant 7: bad input gets a clear error naming what is wrong, a non-zero exit / 4xx with a
//! JSON error body, and changes nothing.

use stella_e2e::{Stack, TestImage, unique};

#[test]
fn cli_and_api_refuse_bad_input_without_partial_state() {
    let stack = Stack::new();
    let p = &stack.plane;
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/bad"), "1");

    // A tag without digest.
    let err = p.fails(&[
        "release",
        "create",
        "tagonly",
        "--component",
        &format!("web={}:1", image.repo),
    ]);
    assert!(err.contains("has no digest"), "{err}");
    // A malformed digest reaches the API and is refused there.
    let err = p.fails(&[
        "release",
        "create",
        "baddigest",
        "--component",
        &format!("web={}@sha256:1234", image.repo),
    ]);
    assert!(
        err.contains("no valid digest") && err.contains("HTTP 400"),
        "{err}"
    );
    // Duplicate component, in one request: nothing written.
    let c = image.component("web");
    let err = p.fails(&[
        "release",
        "create",
        "dup",
        "--component",
        &c,
        "--component",
        &c,
    ]);
    assert!(err.contains("given twice"), "{err}");
    assert_eq!(
        p.json(&["release", "list"]).as_array().unwrap().len(),
        0,
        "no partial release"
    );

    // Unknown env / release / target / agent / deployment.
    p.ok(&["release", "create", "good", "--component", &c]);
    let err = p.fails(&["deploy", "good", "--env", "nope"]);
    assert!(
        err.contains("environment \"nope\" not found") && err.contains("HTTP 404"),
        "{err}"
    );
    let err = p.fails(&["deploy", "missing", "--env", "dev"]);
    assert!(err.contains("release \"missing\" not found"), "{err}");
    let err = p.fails(&["targets", "show", "ghost"]);
    assert!(err.contains("target \"ghost\" not found"), "{err}");
    let err = p.fails(&[
        "target",
        "create",
        "t2",
        "--env",
        "dev",
        "--kind",
        "docker",
        "--agent",
        "agt_ghost",
    ]);
    assert!(err.contains("agent \"agt_ghost\" not found"), "{err}");
    let err = p.fails(&["deployments", "show", "dep_ghost"]);
    assert!(err.contains("not found"), "{err}");

    // A target whose agent lacks the capability (an agent started without its ecs executor).
    let mut narrow = stella_e2e::Agent::enroll(p, &stack.tmp.path().join("narrow"), "narrow");
    narrow.disabled = vec!["ecs".to_string()];
    narrow.start();
    stella_e2e::wait_until(
        std::time::Duration::from_secs(30),
        "the narrow agent's capabilities",
        || {
            let a = p.json(&["agents", "show", &narrow.id]);
            let has_ecs = a["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c == "ecs");
            (a["status"] == "connected" && !has_ecs).then_some(())
        },
    );
    let err = p.fails(&[
        "target", "create", "t3", "--env", "dev", "--kind", "ecs", "--agent", &narrow.id,
    ]);
    assert!(
        err.contains("lacks the \"ecs\" capability") && err.contains("HTTP 422"),
        "{err}"
    );
    let err = p.fails(&[
        "target",
        "create",
        "t4",
        "--env",
        "dev",
        "--kind",
        "kubernetes",
        "--agent",
        &stack.agent.id,
    ]);
    assert!(err.contains("unknown target kind"), "{err}");
    assert_eq!(
        p.json(&["targets"]).as_array().unwrap().len(),
        1,
        "no target was created"
    );

    // Duplicates and malformed names.
    let err = p.fails(&["env", "create", "dev"]);
    assert!(
        err.contains("already exists") && err.contains("HTTP 409"),
        "{err}"
    );
    let err = p.fails(&["env", "create", "bad name"]);
    assert!(err.contains("invalid environment name"), "{err}");
    let err = p.fails(&["release", "create", "good", "--component", &c]);
    assert!(err.contains("immutable"), "{err}");

    // CLI-side validation.
    let err = p.fails(&["token", "create", "--ttl", "10"]);
    assert!(err.contains("needs a unit"), "{err}");
    let err = p.fails(&[
        "target",
        "create",
        "t5",
        "--env",
        "dev",
        "--kind",
        "docker",
        "--agent",
        &stack.agent.id,
        "--config",
        "[1]",
    ]);
    assert!(err.contains("JSON object"), "{err}");

    // A wrong admin token.
    let out = std::process::Command::new(stella_e2e::stella_bin())
        .arg("--data-dir")
        .arg(&p.dir)
        .args(["--token", "sta_wrong", "agents"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid API token"));

    // Malformed JSON straight at the API.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = std::fs::read_to_string(p.dir.join("pki/ca.pem")).unwrap();
    let token = p.admin_token();
    let url = format!("{}/api/v1/releases", p.api_url());
    let (status, body) = rt.block_on(async {
        stella_pki::install_crypto_provider();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(stella_pki::client_config_ca(&ca).unwrap())
            .build()
            .unwrap();
        let resp = client
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{\"name\": ")
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], "bad_request");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("invalid request body")
    );
}
