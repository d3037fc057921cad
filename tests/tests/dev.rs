//! `stella dev`: one command starts a plane and an enrolled local agent; Ctrl-C stops both
//! cleanly; a second start on the same directory reuses CA, agent identity and state.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use stella_e2e::{free_port, stella_bin, wait_until};

fn cli(dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(stella_bin())
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .args(["--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs `stella dev` until its banner, checks the agent connects, stops it with SIGINT.
fn dev_session(dir: &std::path::Path, api: u16, agent: u16) -> (String, String) {
    let mut child = Command::new(stella_bin())
        .arg("--data-dir")
        .arg(dir)
        .args([
            "dev",
            "--api-listen",
            &format!("127.0.0.1:{api}"),
            "--agent-listen",
            &format!("127.0.0.1:{agent}"),
        ])
        .args(["--heartbeat-interval", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut banner = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            banner.push_str(&line);
            banner.push('\n');
            if line.contains("Press Ctrl-C") {
                let _ = tx.send(banner.clone());
            }
        }
    });
    let banner = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("stella dev prints its banner");
    assert!(
        banner.contains(&format!("https://127.0.0.1:{api}")),
        "{banner}"
    );
    assert!(banner.contains("admin.token"), "{banner}");
    assert!(
        banner.contains("stella") && banner.contains("deploy demo-1 --env dev"),
        "{banner}"
    );

    let agent_id = wait_until(
        Duration::from_secs(30),
        "the local agent to connect",
        || {
            let agents = cli(dir, &["agents"]);
            agents
                .as_array()
                .and_then(|a| a.iter().find(|x| x["status"] == "connected"))
                .map(|a| a["id"].as_str().unwrap().to_string())
        },
    );
    let fingerprint =
        stella_pki::fingerprint_pem(&std::fs::read_to_string(dir.join("pki/ca.pem")).unwrap())
            .unwrap();

    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "Ctrl-C stops stella dev cleanly: {status}"
    );
    (agent_id, fingerprint)
}

#[test]
fn dev_starts_plane_and_agent_and_restarts_without_reenrolling() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(".stella");
    let (api, agent) = (free_port(), free_port());
    let (first_agent, first_ca) = dev_session(&dir, api, agent);
    let (second_agent, second_ca) = dev_session(&dir, api, agent);
    assert_eq!(first_agent, second_agent, "the agent identity is reused");
    assert_eq!(first_ca, second_ca, "the CA is reused");
    // Check the store directly: the plane is stopped now.
    let n = stella_e2e::sql_string(
        &stella_e2e::sqlite_url(&dir.join("stella.db")),
        "SELECT CAST(COUNT(*) AS TEXT) FROM agents",
        &[],
    );
    assert_eq!(n, "1", "no re-enrollment");
}
