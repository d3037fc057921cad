//! Issue 6's reconnect storm, as a test, on each transport: 200 lightweight agents in one process (the bench's
//! simulated fleet: real enrollment, keys, mTLS sessions, signed jobs, journal and spool; only the
//! executor is a no-op) hold sessions to a real plane (debug `stella`, built by
//! `cargo build --bins`) started with a small `--max-session-setups`. The plane is SIGKILLed with a
//! fan-out in flight and restarted on the same ports and data. Asserted: the plane never ran more
//! session setups or TLS handshakes at once than its limit (its own peak gauges, which start at
//! zero with the restarted process), every agent came back, and every job of the interrupted
//! fan-out ended with exactly one outcome. How long the fleet took to come back is printed, not
//! asserted (it depends on the machine).

use std::path::Path;
use std::process::Command;

const AGENTS: u64 = 200;
const LIMIT: u64 = 8;

fn storm(transport: &str) {
    let bench = env!("CARGO_BIN_EXE_stella-bench");
    let stella = Path::new(bench).with_file_name("stella");
    assert!(
        stella.exists(),
        "{} is missing: build the plane first with `cargo build --bins`",
        stella.display()
    );
    let out = Command::new(bench)
        .args(["storm", "--json", "--agents", &AGENTS.to_string()])
        .args(["--transport", transport])
        .args(["--max-session-setups", &LIMIT.to_string()])
        .args(["--timeout", "300", "--settle-timeout", "300"])
        .arg("--stella-bin")
        .arg(&stella)
        .output()
        .expect("running stella-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stella-bench storm failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON object on stdout:\n{stdout}\nstderr:\n{stderr}"));
    let report: serde_json::Value = serde_json::from_str(line).expect("the report is JSON");
    eprintln!(
        "storm of {AGENTS} {transport} agents, limit {LIMIT}: plane restarted in {}s; every agent back after \
         {}s (plane's view) / {}s (fleet's view); peak {} setups and {} TLS handshakes at once; \
         {} sessions deferred; {} sessions ended by silence; {} jobs in flight at the kill settled in {}s",
        report["plane_restart_s"],
        report["reconnect_s"],
        report["reconnect_fleet_s"],
        report["peak_session_setups"],
        report["peak_tls_handshakes"],
        report["sessions_deferred"],
        report["sessions_ended_by_silence"],
        report["in_flight_at_kill"],
        report["settle_s"],
    );
    assert_eq!(report["scenario"], "storm");
    assert_eq!(report["agents"], AGENTS);
    assert_eq!(report["transport"], transport);
    assert_eq!(report["session_setup_limit"], LIMIT, "{report}");
    let peak_setups = report["peak_session_setups"].as_u64().expect("setups peak");
    assert!(
        (1..=LIMIT).contains(&peak_setups),
        "{peak_setups} session setups at once; the limit is {LIMIT}: {report}"
    );
    let peak_tls = report["peak_tls_handshakes"].as_u64().expect("tls peak");
    assert!(
        (1..=LIMIT).contains(&peak_tls),
        "{peak_tls} TLS handshakes at once; the limit is {LIMIT}: {report}"
    );
    assert_eq!(
        report["agents_back"], AGENTS,
        "every agent came back: {report}"
    );
    // A restarted plane answers the old sessions' packets with a reset (TCP RST, or a QUIC
    // stateless reset under the key it keeps across restarts): no agent waits out the silence.
    assert_eq!(report["sessions_ended_by_silence"], 0, "{report}");
    assert!(report["reconnect_s"].is_number(), "{report}");
    assert_eq!(report["lost_jobs"], 0, "{report}");
    assert_eq!(report["duplicated_jobs"], 0, "{report}");
    assert_eq!(report["answered"], AGENTS, "{report}");
}

#[test]
fn two_hundred_grpc_agents_reconnect_after_a_plane_restart_within_the_admission_limit() {
    storm("grpc");
}

#[test]
fn two_hundred_quic_agents_reconnect_after_a_plane_restart_within_the_admission_limit() {
    storm("quic");
}
