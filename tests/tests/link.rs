//! The link between agent and plane fails in the ways networks do: it goes silent without
//! closing (a black hole), or the agent's address changes under a live session. Real plane and
//! agent processes; a loopback proxy the test controls sits on the link.

use std::time::Duration;

use stella_e2e::{
    Agent, LinkProxy, Plane, TargetCleanup, TestImage, UdpProxy, containers_of, unique, wait_until,
};

/// A plane, one docker agent reaching it through `proxy`, an environment and one target.
fn agent_behind(plane: &Plane, dir: &std::path::Path, proxy_url: &str) -> (Agent, String) {
    let mut agent = Agent::enroll(plane, dir, "behind-proxy");
    agent.set_endpoint(proxy_url);
    agent.start();
    plane.wait_agent(&agent.id, "connected");
    let target = unique("link");
    plane.ok(&["env", "create", "dev"]);
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    (agent, target)
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

stella_e2e::both_transports! {
/// A link that stops carrying anything without closing is noticed by both sides within a bound
/// (three heartbeats: the plane marks the agent disconnected, the agent drops the session), and
/// when it carries again the same agent process reconnects by itself and the work queued
/// meanwhile runs, once.
#[test]
fn a_blackholed_link_is_noticed_on_both_sides_and_the_agent_comes_back_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let proxy = LinkProxy::start(&plane);
    let (mut agent, target) = agent_behind(&plane, &tmp.path().join("agent"), &proxy.url());
    let _cleanup = TargetCleanup(target.clone());
    let repo = unique("stella-e2e/link");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");
    deploy(&plane, "r1", &v1, true);
    let failures_before = agent.log().matches("session failed").count();

    proxy.cut();
    plane.wait_agent(&agent.id, "disconnected");
    wait_until(Duration::from_secs(60), "the agent to drop the dead session", || {
        (agent.log().matches("session failed").count() > failures_before).then_some(())
    });
    let queued = deploy(&plane, "r2", &v2, false);

    proxy.restore();
    let done = plane.wait_deployment(queued["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["jobs"][0]["status"], "succeeded");
    assert!(agent.is_running(), "the agent was never restarted");
    assert!(agent.sessions_established() >= 2, "{}", agent.log());
    let ids = containers_of(&target);
    assert_eq!(ids.len(), 1, "one container, the second release's");
    assert_eq!(stella_e2e::inspect(&ids[0])["Image"], v2.id.as_str());
}
}

/// Connection migration: the agent's packets start arriving from another address (a NAT
/// rebinding, a roaming host) in the middle of a QUIC session. The session survives — no
/// reconnect on either side — and jobs keep flowing over the new path.
#[test]
fn a_quic_session_survives_a_change_of_the_agents_address() {
    stella_e2e::Transport::Quic.run(|| {
        let tmp = tempfile::tempdir().unwrap();
        let plane = Plane::start(&tmp.path().join("plane"));
        let proxy = UdpProxy::start(plane.agent_addr());
        let url = format!("quic://127.0.0.1:{}", proxy.port);
        let (mut agent, target) = agent_behind(&plane, &tmp.path().join("agent"), &url);
        let _cleanup = TargetCleanup(target.clone());
        let repo = unique("stella-e2e/migrate");
        let v1 = TestImage::busybox_sleeper(&repo, "1");
        let v2 = TestImage::busybox_sleeper(&repo, "2");
        deploy(&plane, "r1", &v1, true);
        let sessions = plane.metric("stella_agent_sessions_total");
        assert_eq!(sessions, Some(1));

        assert_eq!(proxy.rebind(), 1, "the agent's flow moved to a new address");
        deploy(&plane, "r2", &v2, true);

        assert_eq!(
            plane.metric("stella_agent_sessions_total"),
            sessions,
            "no new session on the plane"
        );
        assert_eq!(agent.sessions_established(), 1, "{}", agent.log());
        assert!(agent.is_running());
        assert_eq!(plane.agent_status(&agent.id), "connected");
        let ids = containers_of(&target);
        assert_eq!(ids.len(), 1);
        assert_eq!(stella_e2e::inspect(&ids[0])["Image"], v2.id.as_str());
    });
}
