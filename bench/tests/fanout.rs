//! A small fan-out through the real plane (debug `stella`, built by `cargo build --bins`) and 50
//! real agents: every agent answers, nothing is lost, nothing runs twice. No timing is asserted.

use std::path::Path;
use std::process::Command;

#[test]
fn small_fanout_every_agent_answers_exactly_once() {
    let bench = env!("CARGO_BIN_EXE_stella-bench");
    let stella = Path::new(bench).with_file_name("stella");
    assert!(
        stella.exists(),
        "{} is missing: build the plane first with `cargo build --bins`",
        stella.display()
    );
    let out = Command::new(bench)
        .args(["fanout", "--agents", "50", "--rounds", "1", "--json"])
        .arg("--stella-bin")
        .arg(&stella)
        .output()
        .expect("running stella-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stella-bench failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON object on stdout:\n{stdout}\nstderr:\n{stderr}"));
    let report: serde_json::Value = serde_json::from_str(line).expect("the report is JSON");
    assert_eq!(report["scenario"], "fanout");
    assert_eq!(report["agents"], 50);
    assert_eq!(report["transport"], "grpc");
    assert_eq!(report["store"], "sqlite");
    assert_eq!(report["answered"], 50, "every agent answers: {report}");
    assert_eq!(report["lost_jobs"], 0, "{report}");
    assert_eq!(report["duplicated_jobs"], 0, "{report}");
}
