//! Evidence end to end: a promotion with an approver, a release that fails and is rolled back;
//! every decision, deployment and rollback yields a signed, chained packet with the agents'
//! receipts; the exported bundle verifies offline, and a flipped byte, a dropped packet or two
//! swapped packets are detected and located. The database refuses to change evidence.

use serde_json::Value;
use stella_e2e::{Agent, Plane, TargetCleanup, TestImage, sql_try, unique, wait_until};

fn verify(plane: &Plane, file: &std::path::Path) -> (bool, String) {
    let out = plane.cli(&["evidence", "verify", &file.display().to_string()]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write(dir: &std::path::Path, name: &str, bundle: &Value) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(bundle).unwrap()).unwrap();
    path
}

#[test]
fn a_promotion_yields_packets_that_verify_offline_and_tampering_is_located() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "ev");
    plane.ok(&["env", "create", "dev", "--approvals", "1"]);
    let target = unique("web-ev");
    let _cleanup = TargetCleanup(target.clone());
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let repo = unique("stella-e2e/ev");
    let good = TestImage::busybox_sleeper(&repo, "good");
    let bad = TestImage::build(&repo, "bad", &["/bin/busybox", "sh", "-c", "exit 3"]);
    let alice = plane.json(&[
        "token", "api", "create", "--user", "alice", "--role", "releaser",
    ]);
    let alice = alice["token"].as_str().unwrap().to_string();
    let bob = plane.json(&[
        "token", "api", "create", "--user", "bob", "--role", "approver",
    ]);
    let bob = bob["token"].as_str().unwrap().to_string();

    plane.ok(&[
        "--token",
        &alice,
        "release",
        "create",
        "good-1",
        "--component",
        &good.component("web"),
    ]);
    plane.ok(&[
        "--token",
        &alice,
        "release",
        "create",
        "bad-2",
        "--component",
        &bad.component("web"),
    ]);
    for release in ["good-1", "bad-2"] {
        let p = plane.json(&["--token", &alice, "promote", release, "--to", "dev"]);
        let id = p["id"].as_str().unwrap().to_string();
        let _ = plane.cli(&["--token", &bob, "approve", &id, "--comment", "ok by me"]);
    }
    // decision good-1, deployment good-1, decision bad-2, deployment bad-2 (failed), rollback.
    let packets = wait_until(
        std::time::Duration::from_secs(60),
        "five evidence packets",
        || {
            let list = plane.json(&["evidence", "list"]);
            (list.as_array().unwrap().len() >= 5).then_some(list)
        },
    );
    let kinds: Vec<&str> = packets
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "promotion_decision",
            "deployment",
            "promotion_decision",
            "deployment",
            "rollback"
        ],
        "{packets}"
    );
    let rollback_id = packets[4]["id"].as_str().unwrap();
    let shown = plane.ok(&["evidence", "show", rollback_id]);
    assert!(shown.contains("bob"), "approver named: {shown}");
    assert!(
        shown.contains("good-1") && shown.contains("bad-2"),
        "{shown}"
    );
    let decision = plane.json(&["evidence", "show", packets[0]["id"].as_str().unwrap()]);
    assert!(decision["rendered"].as_str().unwrap().contains("alice"));

    // The database refuses to change or delete evidence.
    let db = plane.db();
    let err = sql_try(&db, "UPDATE evidence_packets SET kind = 'deployment'").unwrap_err();
    assert!(err.contains("append-only"), "{err}");
    let err = sql_try(&db, "DELETE FROM evidence_packets").unwrap_err();
    assert!(err.contains("append-only"), "{err}");

    // Export and verify offline (no plane needed for verify).
    let file = tmp.path().join("evidence.json");
    plane.ok(&["evidence", "export", "--out", &file.display().to_string()]);
    let (ok, report) = verify(&plane, &file);
    assert!(ok, "{report}");
    assert!(report.contains("VERIFIED"), "{report}");
    let bundle: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(bundle["packets"].as_array().unwrap().len(), 5);
    let keys = tmp.path().join("keys.json");
    std::fs::write(&keys, plane.ok(&["evidence", "keys"])).unwrap();
    let out = plane.cli(&[
        "evidence",
        "verify",
        &file.display().to_string(),
        "--trusted-keys",
        &keys.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // One flipped byte in any packet's payload is found, at that packet.
    for index in 0..5 {
        let mut tampered = bundle.clone();
        let payload = tampered["packets"][index]["envelope"]["payload"]
            .as_str()
            .unwrap()
            .to_string();
        let mut bytes = payload.into_bytes();
        let at = bytes.len() / 2;
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        tampered["packets"][index]["envelope"]["payload"] =
            Value::String(String::from_utf8(bytes).unwrap());
        let (ok, report) = verify(&plane, &write(tmp.path(), "flip.json", &tampered));
        assert!(!ok, "flip in packet {index} went unnoticed");
        let sequence = index + 1;
        assert!(
            report.contains(&format!("First broken link: packet #{sequence}"))
                || report.contains(&format!("sequence {sequence}")),
            "flip in packet {index}: {report}"
        );
    }
    // A dropped packet is found where the chain breaks.
    let mut dropped = bundle.clone();
    dropped["packets"].as_array_mut().unwrap().remove(2);
    let (ok, report) = verify(&plane, &write(tmp.path(), "drop.json", &dropped));
    assert!(!ok);
    assert!(report.contains("First broken link"), "{report}");
    assert!(
        report.contains("missing") || report.contains("sequence 3"),
        "{report}"
    );
    // Two swapped packets are found at the first swapped position.
    let mut swapped = bundle.clone();
    swapped["packets"].as_array_mut().unwrap().swap(1, 3);
    let (ok, report) = verify(&plane, &write(tmp.path(), "swap.json", &swapped));
    assert!(!ok);
    assert!(report.contains("First broken link"), "{report}");

    // The audit export lists every packet with its evidence id.
    let csv = plane.ok(&["evidence", "audit", "--format", "csv"]);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "{csv}");
    assert!(lines[0].starts_with("evidence_id,"), "{csv}");
    assert!(lines.iter().any(|l| l.contains(rollback_id)), "{csv}");
}
