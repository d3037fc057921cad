//! Admission control of session setups: a fleet reconnecting at once after a plane restart is
//! set up at most `--max-session-setups` at a time (the rest are told to come back after a
//! server-assigned delay), and every agent comes back.

use std::time::Duration;

use stella_e2e::{Agent, Plane, free_port, wait_until};

const AGENTS: usize = 10;
const LIMIT: usize = 2;

fn metric(plane: &Plane, name: &str) -> Option<u64> {
    plane.metrics().lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

fn wait_all_connected(plane: &Plane) {
    wait_until(
        Duration::from_secs(120),
        "every agent to hold a session",
        || (metric(plane, "stella_agents_connected") == Some(AGENTS as u64)).then_some(()),
    );
}

stella_e2e::both_transports! {
#[test]
fn a_fleet_reconnecting_after_a_restart_never_exceeds_the_setup_limit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let limit = LIMIT.to_string();
    let mut plane = Plane::start_with(
        &tmp.path().join("plane"),
        free_port(),
        free_port(),
        &["--max-session-setups", &limit],
    );
    let mut agents: Vec<Agent> = (0..AGENTS)
        .map(|i| {
            let mut agent = Agent::enroll(
                &plane,
                &tmp.path().join(format!("agent-{i}")),
                &format!("agent-{i}"),
            );
            // Lightweight agents: no engine to probe.
            agent.disabled = vec!["docker".to_string(), "compose".to_string()];
            agent
        })
        .collect();
    for agent in &mut agents {
        agent.start();
    }
    wait_all_connected(&plane);

    plane.stop().expect("plane stopped");
    plane.restart();
    wait_all_connected(&plane);

    assert_eq!(
        metric(&plane, "stella_session_setup_limit"),
        Some(LIMIT as u64)
    );
    let peak = metric(&plane, "stella_session_setups_peak").expect("peak metric");
    assert!(
        (1..=LIMIT as u64).contains(&peak),
        "{peak} session setups ran at once after the restart; the limit is {LIMIT}"
    );
    let deferred = metric(&plane, "stella_session_setups_deferred_total").expect("deferred metric");
    eprintln!("after the restart: peak {peak} setups at once, {deferred} sessions deferred");
}
}
