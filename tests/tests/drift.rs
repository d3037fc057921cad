//! Drift end to end: a real plane and agent, the machine's Docker Engine. Changes made behind
//! Stella's back are reported by the agent as the engine announces them (the agent runs with
//! an hour-long periodic interval, so nothing but engine events can explain prompt
//! detection), compared by the plane, shown by `stella drift`, silenced by ignore rules, and
//! repaired (once) or given up on (circuit breaker) in reconcile mode.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use stella_e2e::{
    Agent, Plane, TargetCleanup, TestImage, containers_of, docker, inspect, unique, wait_until,
};

const WAIT: Duration = Duration::from_secs(60);

struct Setup {
    target: String,
    agent: Agent,
    plane: Plane,
    _cleanup: TargetCleanup,
    _tmp: tempfile::TempDir,
}

/// A plane, one docker agent started with `run_args`, environment `dev`, one docker target.
fn setup(run_args: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "drift");
    agent.run_args = run_args.iter().map(|s| s.to_string()).collect();
    agent.start();
    plane.wait_agent(&agent.id, "connected");
    let target = unique("drift");
    plane.ok(&["env", "create", "dev"]);
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    Setup {
        _cleanup: TargetCleanup(target.clone()),
        target,
        agent,
        plane,
        _tmp: tmp,
    }
}

/// The drift report of one target (`stella drift --target T -o json`).
fn drift(plane: &Plane, target: &str, history: bool) -> Value {
    let mut args = vec!["drift", "--env", "dev", "--target", target];
    if history {
        args.push("--history");
    }
    let report = plane.json(&args);
    assert_eq!(report.as_array().map(Vec::len), Some(1), "{report}");
    report[0].clone()
}

fn open_of_kind<'a>(d: &'a Value, kind: &str) -> Vec<&'a Value> {
    d["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["kind"] == kind && f["resolved_at"].is_null())
        .collect()
}

/// Waits until the target's report shows an open finding of `kind`; returns it.
fn wait_finding(plane: &Plane, target: &str, kind: &str) -> Value {
    wait_until(WAIT, &format!("a {kind} finding"), || {
        open_of_kind(&drift(plane, target, false), kind)
            .first()
            .map(|f| (*f).clone())
    })
}

fn wait_in_sync(plane: &Plane, target: &str, what: &str) -> Value {
    wait_until(WAIT, what, || {
        let d = drift(plane, target, false);
        (d["in_sync"] == true).then_some(d)
    })
}

/// Waits until the plane evaluated a report newer than the one `before` showed.
fn wait_evaluated_after(plane: &Plane, target: &str, before: &Value) -> Value {
    wait_until(WAIT, "another evaluated report", || {
        let d = drift(plane, target, false);
        (d["evaluated_at"] != before["evaluated_at"]).then_some(d)
    })
}

fn deploy(plane: &Plane, release: &str, image: &TestImage) {
    plane.ok(&[
        "release",
        "create",
        release,
        "--component",
        &image.component("web"),
    ]);
    let out = plane.ok(&["deploy", release, "--env", "dev"]);
    assert!(out.contains("succeeded"), "{out}");
}

fn the_container(target: &str) -> String {
    let ids = containers_of(target);
    assert_eq!(ids.len(), 1, "one container for the target: {ids:?}");
    ids[0].clone()
}

/// A one-shot HTTP server: the body of the first POST it receives goes to the channel.
fn webhook_receiver() -> (String, mpsc::Receiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "http://{}/hooks/drift?token=s3cret",
        listener.local_addr().expect("addr")
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
            if let Ok(v) = serde_json::from_slice::<Value>(&body)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    (url, rx)
}

/// Removes a container by name when dropped, also when the test fails.
struct ContainerCleanup(String);

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.0])
            .output();
    }
}

#[test]
fn each_kind_of_drift_is_detected_from_engine_events_and_ignore_rules_silence() {
    let mut s = setup(&["--inventory-interval", "1h"]);
    let (plane, target) = (&s.plane, s.target.clone());
    let repo = unique("stella-e2e/drift");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let other = TestImage::busybox_sleeper(&repo, "other");
    let (hook, notifications) = webhook_receiver();
    let policy = plane.json(&[
        "drift",
        "policy",
        "--env",
        "dev",
        "--mode",
        "notify",
        "--webhook",
        &hook,
    ]);
    assert_eq!(policy["mode"], "notify");
    assert!(
        !policy.to_string().contains("s3cret"),
        "the webhook's secret is never shown: {policy}"
    );

    deploy(plane, "drift-1", &v1);
    let d = wait_in_sync(plane, &target, "the first report after the deployment");
    assert_eq!(d["remediation"]["mode"], "notify");
    let container = the_container(&target);

    // (a) stopped behind Stella's back.
    docker(&["stop", &container]);
    let f = wait_finding(plane, &target, "stopped");
    assert_eq!(f["severity"], "high");
    assert_eq!(f["component"], "web");
    // Earlier notifications said the target was in sync; the first with a finding is this one.
    let hooked = loop {
        let n = notifications
            .recv_timeout(WAIT)
            .expect("the webhook is notified");
        if n["opened"].as_array().is_some_and(|o| !o.is_empty()) {
            break n;
        }
    };
    assert_eq!(hooked["event"], "drift");
    assert_eq!(hooked["target"], target.as_str());
    assert_eq!(hooked["opened"][0]["kind"], "stopped");
    let text = plane.ok(&["drift", "--env", "dev"]);
    assert!(text.contains("stopped") && text.contains("high"), "{text}");
    docker(&["start", &container]);
    let d = wait_in_sync(
        plane,
        &target,
        "the restarted container to resolve the finding",
    );
    let history = drift(plane, &target, true);
    let resolved = history["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "stopped")
        .expect("the stopped finding stays in the history");
    assert_eq!(resolved["resolution"], "in_sync");
    assert!(resolved["resolved_at"].is_string());
    assert!(d["findings"].as_array().unwrap().is_empty());

    // (b) the digest changed behind Stella's back: same name and labels, other image.
    let before = inspect(&container);
    let name = before["Name"]
        .as_str()
        .unwrap()
        .trim_start_matches('/')
        .to_string();
    let mut run = vec![
        "run".to_string(),
        "-d".to_string(),
        "--name".to_string(),
        name,
    ];
    for (k, v) in before["Config"]["Labels"].as_object().unwrap() {
        run.push("-l".to_string());
        run.push(format!("{k}={}", v.as_str().unwrap()));
    }
    run.push(other.id.clone());
    docker(&["rm", "-f", &container]);
    docker(&run.iter().map(String::as_str).collect::<Vec<_>>());
    let f = wait_finding(plane, &target, "digest_changed");
    assert_eq!(f["severity"], "critical");
    assert_eq!(f["expected"], v1.id.as_str());
    assert_eq!(f["observed"], other.id.as_str());
    // Stella puts it back with a normal deployment; drift follows.
    plane.ok(&["deploy", "drift-1", "--env", "dev"]);
    wait_in_sync(
        plane,
        &target,
        "the redeployed release to resolve the digest change",
    );

    // (c) an unmanaged container on the target.
    let extra = unique("drift-extra");
    let _extra_cleanup = ContainerCleanup(extra.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &extra,
        "-l",
        &format!("stella.target={target}"),
        "-l",
        "team=ops",
        &other.id,
    ]);
    let f = wait_finding(plane, &target, "unmanaged_extra");
    assert_eq!(f["severity"], "low");
    assert_eq!(f["workload"], extra.as_str());
    assert_eq!(f["labels"]["team"], "ops");
    assert!(
        plane
            .metrics()
            .contains("stella_drift_findings{kind=\"unmanaged_extra\",severity=\"low\"} 1")
    );

    // An ignore rule silences it at once, and later reports keep it silent.
    let rule = plane.json(&[
        "drift",
        "ignore",
        "add",
        "label:team=ops",
        "--env",
        "dev",
        "--target",
        &target,
        "--reason",
        "the ops sidecar",
    ]);
    assert_eq!(rule["selector"], "label:team=ops");
    assert_eq!(rule["silenced"].as_array().map(Vec::len), Some(1));
    let d = drift(plane, &target, false);
    assert!(open_of_kind(&d, "unmanaged_extra").is_empty(), "{d}");
    docker(&["restart", "-t", "1", &extra]);
    let d = wait_evaluated_after(plane, &target, &d);
    assert!(open_of_kind(&d, "unmanaged_extra").is_empty(), "{d}");
    assert_eq!(d["in_sync"], true);
    assert!(
        plane
            .metrics()
            .contains("stella_drift_findings{kind=\"unmanaged_extra\",severity=\"low\"} 0")
    );
    let rules = plane.json(&["drift", "ignore", "list", "--env", "dev"]);
    assert_eq!(rules[0]["reason"], "the ops sidecar");
    // Bad input changes nothing.
    let err = plane.fails(&["drift", "ignore", "add", "kind=gone", "--env", "dev"]);
    assert!(err.contains("unknown drift kind"), "{err}");
    assert_eq!(
        plane
            .json(&["drift", "ignore", "list", "--env", "dev"])
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // Without the rule the extra shows again.
    plane.ok(&["drift", "ignore", "remove", rule["id"].as_str().unwrap()]);
    docker(&["restart", "-t", "1", &extra]);
    wait_finding(plane, &target, "unmanaged_extra");
    docker(&["rm", "-f", &extra]);
    wait_in_sync(plane, &target, "the removed extra to resolve");

    // (d) the sticker deleted: no engine event, so the periodic report finds it (the agent
    // restarts with a short interval; its on-connect report sees the target in sync first).
    s.agent.stop();
    s.agent.run_args = vec!["--inventory-interval".to_string(), "1s".to_string()];
    s.agent.start();
    let plane = &s.plane;
    plane.wait_agent(&s.agent.id, "connected");
    let sticker: PathBuf = s
        .agent
        .dir
        .join("executors/docker/targets")
        .join(&target)
        .join("stella.version.json");
    assert!(sticker.exists(), "{}", sticker.display());
    std::fs::remove_file(&sticker).unwrap();
    let f = wait_finding(plane, &target, "sticker_missing");
    assert_eq!(f["severity"], "medium");
}

#[test]
fn reconcile_repairs_once_and_the_breaker_trips_on_a_target_that_keeps_failing() {
    let s = setup(&["--inventory-interval", "1h"]);
    let (plane, target) = (&s.plane, s.target.clone());
    // A repository on a registry nobody listens on: once the image is gone, the agent's pull
    // of it fails at once, so every reconcile fails.
    let repo = unique("127.0.0.1:9/stella-e2e/reconcile");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let nudge = TestImage::busybox_sleeper(&unique("stella-e2e/nudge"), "1");
    let err = plane.fails(&[
        "drift",
        "policy",
        "--env",
        "dev",
        "--mode",
        "reconcile",
        "--breaker",
        "0",
    ]);
    assert!(
        err.contains("breaker_threshold must be at least 1"),
        "{err}"
    );
    let policy = plane.json(&[
        "drift",
        "policy",
        "--env",
        "dev",
        "--mode",
        "reconcile",
        "--max-per-hour",
        "5",
        "--breaker",
        "2",
    ]);
    assert_eq!(policy["mode"], "reconcile");
    assert_eq!(policy["breaker_threshold"], 2);
    deploy(plane, "reconcile-1", &v1);
    wait_in_sync(plane, &target, "the first report after the deployment");
    let first = the_container(&target);

    // Stopped behind Stella's back: one reconcile puts the release back.
    docker(&["stop", &first]);
    let d = wait_until(WAIT, "a successful reconcile", || {
        let d = drift(plane, &target, false);
        (d["in_sync"] == true && d["remediation"]["reconciles"][0]["outcome"] == "succeeded")
            .then_some(d)
    });
    let reconciles = d["remediation"]["reconciles"].as_array().unwrap();
    assert_eq!(reconciles.len(), 1, "exactly one reconcile: {d}");
    let reconcile_id = reconciles[0]["deployment_id"].as_str().unwrap();
    let deployment = plane.json(&["deployments", "show", reconcile_id]);
    assert_eq!(deployment["status"], "succeeded");
    assert_eq!(deployment["release"], "reconcile-1");
    assert_eq!(deployment["jobs"].as_array().map(Vec::len), Some(1));
    assert_eq!(deployment["jobs"][0]["target"], target.as_str());
    let running = the_container(&target);
    let c = inspect(&running);
    assert_eq!(c["Image"], v1.id.as_str(), "the desired digest runs again");
    assert_eq!(c["State"]["Running"], true);
    assert_eq!(
        plane
            .json(&["deployments", "list"])
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    // Now the target cannot be repaired: container and image gone, the pull fails. Broken
    // under notify (so no reconcile races the image removal), then switched to reconcile.
    plane.ok(&["drift", "policy", "--env", "dev", "--mode", "notify"]);
    docker(&["rm", "-f", &running]);
    docker(&[
        "image",
        "rm",
        "-f",
        &format!("{}:{}", v1.repo, v1.tag),
        &v1.id,
    ]);
    let f = wait_finding(plane, &target, "missing");
    assert_eq!(f["severity"], "critical");
    plane.ok(&[
        "drift",
        "policy",
        "--env",
        "dev",
        "--mode",
        "reconcile",
        "--max-per-hour",
        "5",
        "--breaker",
        "2",
    ]);
    // Any change makes the agent report: a container created on the target.
    let nudge_name = unique("drift-nudge");
    let _nudge_cleanup = ContainerCleanup(nudge_name.clone());
    docker(&[
        "create",
        "--name",
        &nudge_name,
        "-l",
        &format!("stella.target={target}"),
        &nudge.id,
    ]);
    let d = wait_until(WAIT, "the circuit breaker to open", || {
        let d = drift(plane, &target, false);
        (d["remediation"]["breaker"] == "open").then_some(d)
    });
    assert_eq!(open_of_kind(&d, "missing").len(), 1, "{d}");
    let reconciles = d["remediation"]["reconciles"].as_array().unwrap();
    assert_eq!(reconciles.len(), 3, "one repair, then two failures: {d}");
    for failed in &reconciles[..2] {
        assert_eq!(failed["outcome"], "failed");
        assert!(
            failed["error"]
                .as_str()
                .unwrap()
                .contains("image_unavailable"),
            "{failed}"
        );
    }
    assert_eq!(d["remediation"]["failures"], 2);
    let text = plane.ok(&["drift", "--env", "dev"]);
    assert!(
        text.contains("circuit breaker open: 2 consecutive reconciles failed"),
        "{text}"
    );
    assert!(text.contains("image_unavailable"), "{text}");

    // Later reports reconcile nothing more while the breaker is open.
    docker(&["rm", "-f", &nudge_name]);
    let d = wait_evaluated_after(plane, &target, &d);
    assert_eq!(d["remediation"]["breaker"], "open");
    assert_eq!(
        d["remediation"]["reconciles"].as_array().map(Vec::len),
        Some(3)
    );
    assert_eq!(
        plane
            .json(&["deployments", "list"])
            .as_array()
            .map(Vec::len),
        Some(4)
    );
}
