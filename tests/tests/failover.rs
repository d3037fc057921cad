//! An agent that knows several addresses of its plane fails over between them. One real plane
//! is reachable through two loopback proxies (what two replicas or two network paths look like
//! to an agent); real plane and agent processes, the machine's Docker Engine.

use std::path::Path;
use std::time::{Duration, Instant};

use stella_e2e::{
    Agent, LinkProxy, Plane, TargetCleanup, TestImage, containers_of, free_port, free_udp_port,
    unique, wait_until,
};

use stella_e2e::agent_cli;

fn agent_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("agent.json")).expect("agent.json"))
        .expect("agent.json is JSON")
}

/// Whether `line` names `url` (and not a longer port that starts with the same digits).
fn names(line: &str, url: &str) -> bool {
    line.match_indices(url).any(|(i, _)| {
        !line[i + url.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// The endpoint of the agent's latest established session, among `candidates`.
fn session_endpoint(agent: &Agent, candidates: &[&str]) -> Option<String> {
    let log = agent.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("session established"))?;
    candidates
        .iter()
        .find(|url| names(line, url))
        .map(|url| url.to_string())
}

fn deploy(plane: &Plane, release: &str, image: &TestImage, wait: bool) -> serde_json::Value {
    plane.ok(&[
        "release",
        "create",
        release,
        "--component",
        &image.component("web"),
    ]);
    let mut args = vec!["deploy", release, "--env", "dev"];
    if !wait {
        args.push("--no-wait");
    }
    let dep = plane.json(&args);
    if wait {
        assert_eq!(dep["status"], "succeeded", "{dep:#}");
    }
    dep
}

fn docker_target(plane: &Plane, agent: &Agent) -> String {
    let target = unique("failover");
    plane.ok(&["env", "create", "dev"]);
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    target
}

stella_e2e::both_transports! {
/// The plane advertises two addresses; an agent that reached it through the first learns the
/// second from the welcome. The first address goes dark mid-life (a black hole: nothing is
/// closed) with a job on its way: the agent drops the silent session, moves to the second
/// address without being restarted, and the job and the next one run there, once each. An
/// agent enrolled afterwards gets both addresses in its enrollment answer.
#[test]
fn an_agent_moves_to_the_planes_other_address_when_the_first_goes_dark() {
    let tmp = tempfile::tempdir().unwrap();
    let mut plane = Plane::start(&tmp.path().join("plane"));
    let a = LinkProxy::start(&plane);
    let b = LinkProxy::start(&plane);
    let (a_url, b_url) = (a.url(), b.url());

    // Enrolled while the plane advertised only itself; then pointed at address A alone.
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "failover");
    let out = agent_cli(&agent.dir, &["endpoints", "--set", &a_url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    plane.extra_args = vec![
        "--advertise-endpoint".into(),
        a_url.clone(),
        "--advertise-endpoint".into(),
        b_url.clone(),
    ];
    plane.stop();
    plane.restart();

    // Enrollment hands out every advertised address, in order.
    let other_dir = tmp.path().join("other");
    let other = Agent::enroll(&plane, &other_dir, "other");
    let config = agent_json(&other.dir);
    assert_eq!(config["agent_endpoint"], a_url.as_str(), "{config:#}");
    assert_eq!(config["fallback_endpoints"], serde_json::json!([b_url]), "{config:#}");

    agent.start();
    plane.wait_agent(&agent.id, "connected");
    let first = wait_until(Duration::from_secs(30), "the agent's first session", || {
        session_endpoint(&agent, &[&a_url, &b_url])
    });
    assert_eq!(first, a_url);
    // Reached through an address the plane lists: the list is stored.
    let learned: serde_json::Value = wait_until(
        Duration::from_secs(30),
        "the agent to store the plane's endpoints",
        || {
            std::fs::read(agent.dir.join("plane-endpoints.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
        },
    );
    assert_eq!(learned["endpoints"], serde_json::json!([a_url, b_url]));
    let shown = agent_cli(&agent.dir, &["endpoints"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("dial order: {a_url}, {b_url}")), "{shown}");

    let target = docker_target(&plane, &agent);
    let _cleanup = TargetCleanup(target.clone());
    let repo = unique("stella-e2e/failover");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");
    let v3 = TestImage::busybox_sleeper(&repo, "3");
    deploy(&plane, "r1", &v1, true);

    let sessions = agent.sessions_established();
    a.cut();
    let cut_at = Instant::now();
    // Offered into the black hole first; it must arrive once, through B.
    let queued = deploy(&plane, "r2", &v2, false);
    wait_until(Duration::from_secs(90), "the agent to hold a session through B", || {
        (agent.sessions_established() > sessions
            && session_endpoint(&agent, &[&a_url, &b_url]).as_deref() == Some(b_url.as_str()))
        .then_some(())
    });
    println!(
        "failover ({:?}): A black-holed -> session through B after {:?}",
        stella_e2e::Transport::current(),
        cut_at.elapsed()
    );
    let done = plane.wait_deployment(queued["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let r2_job = done["jobs"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(done["jobs"][0]["status"], "succeeded");
    let r3 = deploy(&plane, "r3", &v3, true);
    assert_eq!(r3["jobs"][0]["status"], "succeeded");

    assert!(agent.is_running(), "the agent was never restarted");
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("moving to the next plane endpoint") && names(l, &a_url)),
        "{log}"
    );
    // Each job was verified and journaled once: nothing ran twice.
    assert_eq!(log.matches("job verified and accepted").count(), 3, "{log}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("job verified and accepted") && l.contains(&r2_job))
            .count(),
        1,
        "{log}"
    );
    let ids = containers_of(&target);
    assert_eq!(ids.len(), 1, "one container, the last release's");
    assert_eq!(stella_e2e::inspect(&ids[0])["Image"], v3.id.as_str());
}

/// The first configured address is dead from the start (nothing listens there): the agent
/// connects through the second at once (no growing backoff), and work runs. An address the
/// plane does not advertise (here a proxy; behind a relay, the relay) is never replaced by the
/// plane's list. A bad list is refused with the URL and leaves agent.json as it was.
#[test]
fn a_dead_first_address_costs_one_attempt_and_the_second_one_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let b = LinkProxy::start(&plane);
    let dead = match stella_e2e::Transport::current() {
        stella_e2e::Transport::Grpc => format!("https://127.0.0.1:{}", free_port()),
        stella_e2e::Transport::Quic => format!("quic://127.0.0.1:{}", free_udp_port()),
    };
    let mut agent = Agent::enroll(&plane, &tmp.path().join("agent"), "dead-first");

    let before = std::fs::read(agent.dir.join("agent.json")).unwrap();
    for (bad, expected) in [
        (vec!["http://127.0.0.1:1"], "use https://host:port"),
        (vec![b.url().as_str(), "quic://nowhere"], "expected host:port"),
        (vec![b.url().as_str(), b.url().as_str()], "listed twice"),
    ] {
        let mut args = vec!["endpoints", "--set"];
        args.extend(bad.iter().copied());
        let out = agent_cli(&agent.dir, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{bad:?}: {stderr}");
        assert_eq!(std::fs::read(agent.dir.join("agent.json")).unwrap(), before);
    }
    let out = agent_cli(&agent.dir, &["endpoints", "--set", &dead, &b.url()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = agent_json(&agent.dir);
    assert_eq!(config["agent_endpoint"], dead.as_str());
    assert_eq!(config["fallback_endpoints"], serde_json::json!([b.url()]));

    let started = Instant::now();
    agent.start();
    plane.wait_agent(&agent.id, "connected");
    println!(
        "failover ({:?}): first address dead -> connected through the second after {:?}",
        stella_e2e::Transport::current(),
        started.elapsed()
    );
    let through = wait_until(Duration::from_secs(30), "the agent's session", || {
        session_endpoint(&agent, &[&dead, &b.url()])
    });
    assert_eq!(through, b.url());
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("moving to the next plane endpoint") && names(l, &dead)),
        "{log}"
    );
    assert!(!log.contains("no plane endpoint answered"), "{log}");

    let target = docker_target(&plane, &agent);
    let _cleanup = TargetCleanup(target.clone());
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/failover"), "1");
    deploy(&plane, "r1", &image, true);
    assert_eq!(containers_of(&target).len(), 1);
    // The plane advertises only its own address, which this agent did not dial.
    assert!(!agent.dir.join("plane-endpoints.json").exists());
    assert_eq!(agent.sessions_established(), 1, "{}", agent.log());
}
}
