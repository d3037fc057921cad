//! Relays end to end: agents that reach the plane only through a `stella-agent relay` (real
//! processes, real mTLS, the machine's Docker Engine), a chain of two relays, a relay whose
//! uplink is cut while work runs, a relay that tries to forge results, and a site with no link
//! at all served by air-gap files.

use std::time::Duration;

use prost::Message as _;
use stella_e2e::relay::{RawSession, Relay, cert_der, enroll_through, hello, relay_of};
use stella_e2e::{
    Agent, LinkProxy, Plane, TargetCleanup, TestImage, containers_of, sql_string, unique,
    wait_until,
};
use stella_proto::agent_message::Body as AgentBody;
use stella_proto::plane_message::Body as PlaneBody;
use stella_proto::{AgentMessage, JobResult, JobStatus, RelayedAgentMessage};

/// A docker target served by `agent` in environment `dev` (created if needed).
fn docker_target(plane: &Plane, agent: &Agent) -> (String, TargetCleanup) {
    let _ = plane.cli(&["env", "create", "dev"]);
    let target = unique("relayed");
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    (target.clone(), TargetCleanup(target))
}

fn release(plane: &Plane, name: &str, image: &TestImage) {
    plane.ok(&[
        "release",
        "create",
        name,
        "--component",
        &image.component("web"),
    ]);
}

/// When the plane recorded the job's outcome ("" while none): the first result wins and a
/// duplicate leaves it as it was, so an unchanged value means the result was recorded once.
/// Starts a deployment of `release` to dev and returns its id once the agent has taken one of
/// its jobs (a job past queued/offered): the moment the link-cut tests cut.
fn deploy_until_a_job_is_taken(plane: &Plane, release: &str) -> String {
    let dep = plane.json(&["deploy", release, "--env", "dev", "--no-wait"]);
    let dep_id = dep["id"].as_str().unwrap().to_string();
    wait_until(
        Duration::from_secs(60),
        "the first job to be accepted",
        || {
            let d = plane.json(&["deployments", "show", &dep_id]);
            d["jobs"]
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["status"] != "queued" && j["status"] != "offered")
                .then_some(())
        },
    );
    dep_id
}

fn finished_at(plane: &Plane, job_id: &str) -> String {
    sql_string(
        &plane.db(),
        "SELECT COALESCE(CAST(finished_at AS TEXT), '') FROM jobs WHERE id = $1",
        &[job_id],
    )
}

/// How often the agent accepted and ran the job (from its log).
fn runs_of(agent: &Agent, job_id: &str) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("job verified and accepted") && l.contains(job_id))
        .count()
}

/// What [`deploy_through_a_relay`] set up; dropped at the end of the test.
struct RelayedDeployment {
    plane: Plane,
    relay: Relay,
    _leaf: Agent,
    target: String,
    _cleanup: TargetCleanup,
    _tmp: tempfile::TempDir,
}

/// A plane, a relay, and a leaf enrolled through the relay that deploys release `release`.
/// With `quic`, the relay also listens on QUIC and advertises it, and the leaf must hold its
/// session over QUIC. Checks what both transports share: enrollment passes through the relay
/// unchanged (token, CSR, pinned CA fingerprint) and the agent is told the advertised URL; the
/// plane sees the leaf behind the relay; the deployment succeeds and the job ran once.
fn deploy_through_a_relay(release_name: &str, quic: bool) -> RelayedDeployment {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut relay = Relay::enroll(
        &plane,
        &plane.api_url(),
        &tmp.path().join("relay"),
        &format!("relay-{release_name}"),
    );
    let mut advertised = relay.url();
    if quic {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], stella_e2e::free_port()));
        advertised = format!("quic://{addr}");
        relay.extra_args = [
            "--quic-listen",
            &addr.to_string(),
            "--advertise",
            &advertised,
        ]
        .map(String::from)
        .to_vec();
    }
    relay.start_and_wait();

    let mut leaf = enroll_through(
        &plane,
        &relay.url(),
        &tmp.path().join("leaf"),
        &format!("leaf-{release_name}"),
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(leaf.dir.join("agent.json")).unwrap()).unwrap();
    assert_eq!(config["agent_endpoint"], advertised.as_str());
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");
    assert_eq!(relay_of(&plane, &leaf.id), relay.id);
    let established = leaf
        .log()
        .lines()
        .any(|l| l.contains("session established") && l.contains(&advertised));
    assert!(established, "{}", leaf.log());

    let (target, cleanup) = docker_target(&plane, &leaf);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/relay"), "1");
    release(&plane, release_name, &image);
    let dep = plane.json(&["deploy", release_name, "--env", "dev"]);
    assert_eq!(dep["status"], "succeeded", "{dep:#}");
    let ids = containers_of(&target);
    assert_eq!(ids.len(), 1);
    assert_eq!(stella_e2e::inspect(&ids[0])["Image"], image.id.as_str());
    // The result came with the leaf's receipt, verified by the plane against the leaf.
    let job_id = dep["jobs"][0]["id"].as_str().unwrap().to_string();
    assert!(!finished_at(&plane, &job_id).is_empty());
    assert_eq!(runs_of(&leaf, &job_id), 1);
    RelayedDeployment {
        plane,
        relay,
        _leaf: leaf,
        target,
        _cleanup: cleanup,
        _tmp: tmp,
    }
}

#[test]
fn an_agent_enrolls_and_deploys_through_a_relay() {
    let d = deploy_through_a_relay("via-relay-1", false);
    // Nothing is left waiting at the relay once the plane has acknowledged it.
    wait_until(
        Duration::from_secs(30),
        "the relay's backlog to drain",
        || (d.relay.metric("stella_relay_backlog_results") == Some(0)).then_some(()),
    );
    // Inventory reached the plane through the relay.
    wait_until(
        Duration::from_secs(30),
        "inventory through the relay",
        || {
            let t = d.plane.json(&["target", "show", &d.target]);
            (t["observed_at"].is_string() && !t["observed"].as_array()?.is_empty()).then_some(())
        },
    );
}

/// Leaves reach a relay over QUIC too (`--quic-listen`): enrolled through the relay's TLS
/// listener and told its `quic://` URL, a leaf holds its session over QUIC and deploys; the
/// QUIC listener refuses a connection that presents no client certificate.
#[test]
fn an_agent_behind_a_relay_holds_its_session_over_quic() {
    let d = deploy_through_a_relay("via-quic-1", true);
    let quic: std::net::SocketAddr = d.relay.extra_args[1].parse().unwrap();
    let plane = &d.plane;

    // No client certificate: the handshake completes (enrollment needs certificate-less TLS on
    // the other listener, and the server configuration is shared), then the relay refuses.
    let ca = std::fs::read_to_string(plane.dir.join("pki/ca.pem")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let closed = rt.block_on(async {
        let mut tls = stella_pki::client_config_ca(&ca).unwrap();
        tls.alpn_protocols = vec![stella_proto::framing::QUIC_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
        let connection = client.connect(quic, "127.0.0.1").unwrap().await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), connection.closed())
            .await
            .expect("the relay to close the connection")
    });
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from(stella_proto::framing::close::REFUSED)
            );
            assert_eq!(&close.reason[..], b"a client certificate is required");
        }
        other => panic!("closed with {other:?}"),
    }
}

#[test]
fn relays_chain_and_an_agent_behind_two_relays_deploys() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut outer = Relay::enroll(&plane, &plane.api_url(), &tmp.path().join("outer"), "outer");
    outer.start_and_wait();
    // The inner relay enrolls through the outer one and gets its server certificate through it.
    let mut inner = Relay::enroll(&plane, &outer.url(), &tmp.path().join("inner"), "inner");
    inner.start_and_wait();
    assert_eq!(relay_of(&plane, &inner.id), outer.id);

    let mut leaf = enroll_through(&plane, &inner.url(), &tmp.path().join("leaf"), "deep-leaf");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");
    assert_eq!(relay_of(&plane, &leaf.id), inner.id);

    let (target, _cleanup) = docker_target(&plane, &leaf);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/chain"), "1");
    release(&plane, "chain-1", &image);
    let dep = plane.json(&["deploy", "chain-1", "--env", "dev"]);
    assert_eq!(dep["status"], "succeeded", "{dep:#}");
    assert_eq!(containers_of(&target).len(), 1);
}

#[test]
fn a_relays_cut_uplink_loses_nothing_and_every_result_arrives_once() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    // On the plane's transport: the uplink is gRPC or QUIC as the test run says.
    let proxy = LinkProxy::start(&plane);
    let mut relay = Relay::enroll(
        &plane,
        &plane.api_url(),
        &tmp.path().join("relay"),
        "relay-cut",
    );
    relay.upstream = Some(proxy.url());
    relay.start_and_wait();
    let mut leaf = enroll_through(&plane, &relay.url(), &tmp.path().join("leaf"), "leaf-cut");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");

    let targets: Vec<(String, TargetCleanup)> =
        (0..3).map(|_| docker_target(&plane, &leaf)).collect();
    let image = TestImage::build(
        &unique("stella-e2e/cut"),
        "1",
        &["/bin/busybox", "sleep", "3600"],
    );
    release(&plane, "cut-1", &image);
    // Every job is with the relay (offers go out at once, they run one at a time): cut now.
    let dep_id = deploy_until_a_job_is_taken(&plane, "cut-1");
    proxy.cut();
    // The relay notices, keeps serving the leaf, and holds every result on disk.
    wait_until(
        Duration::from_secs(60),
        "the relay to hold three results",
        || (relay.metric("stella_relay_backlog_results") == Some(3)).then_some(()),
    );
    assert_eq!(relay.metric("stella_relay_uplink_up"), Some(0));
    assert!(relay.metric("stella_relay_backlog_bytes").unwrap() > 0);
    let d = plane.json(&["deployments", "show", &dep_id]);
    assert_eq!(
        d["status"], "running",
        "nothing can reach the plane while cut: {d:#}"
    );
    for (target, _) in &targets {
        assert_eq!(
            containers_of(target).len(),
            1,
            "the work ran while the uplink was cut"
        );
    }

    proxy.restore();
    let done = plane.wait_deployment(&dep_id);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let recorded: Vec<(String, String)> = done["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|job| {
            assert_eq!(job["status"], "succeeded");
            let id = job["id"].as_str().unwrap().to_string();
            assert_eq!(runs_of(&leaf, &id), 1, "job {id} ran once");
            let at = finished_at(&plane, &id);
            (id, at)
        })
        .collect();
    assert_eq!(recorded.len(), 3);
    wait_until(
        Duration::from_secs(30),
        "the relay's backlog to drain",
        || (relay.metric("stella_relay_backlog_results") == Some(0)).then_some(()),
    );
    // Whatever the relay re-sent after the cut did not record anything a second time.
    for (id, at) in recorded {
        assert_eq!(finished_at(&plane, &id), at);
    }
    for (target, _) in &targets {
        assert_eq!(containers_of(target).len(), 1);
    }
}

fn relayed(agent_id: &str, link: u64, cert: &[u8], message: &AgentMessage) -> AgentMessage {
    AgentMessage {
        body: Some(AgentBody::Relayed(RelayedAgentMessage {
            agent_id: agent_id.to_string(),
            leaf_cert_der: cert.to_vec(),
            agent_message: message.encode_to_vec(),
            close: false,
            link,
        })),
    }
}

/// The plane's side of a relayed frame, decoded; panics on anything else.
fn unwrap_relayed(
    m: stella_proto::PlaneMessage,
) -> (stella_proto::RelayedPlaneMessage, Option<PlaneBody>) {
    match m.body {
        Some(PlaneBody::Relayed(frame)) => {
            let inner = stella_proto::PlaneMessage::decode(frame.plane_message.as_slice())
                .unwrap()
                .body;
            (frame, inner)
        }
        other => panic!("expected a relayed frame, got {other:?}"),
    }
}

fn signed_result(
    dir: &std::path::Path,
    agent_id: &str,
    job_id: &str,
    envelope: &[u8],
    status: &str,
    message: &str,
) -> JobResult {
    let key = std::fs::read_to_string(dir.join("identity/agent.key")).unwrap();
    let cert = cert_der(dir);
    let envelope_digest = stella_pki::envelope_digest(envelope);
    let payload = stella_pki::ReceiptPayload {
        job_id: job_id.to_string(),
        agent_id: agent_id.to_string(),
        envelope_digest: envelope_digest.clone(),
        status: status.to_string(),
        reason_code: String::new(),
        result_digest: stella_pki::result_digest(message, "{}"),
        finished_at_unix_ms: 1,
    };
    let receipt = stella_pki::sign_receipt(&key, &cert, &payload).unwrap();
    JobResult {
        job_id: job_id.to_string(),
        status: match status {
            "succeeded" => JobStatus::Succeeded as i32,
            _ => JobStatus::Failed as i32,
        },
        reason_code: String::new(),
        message: message.to_string(),
        outcome_json: "{}".to_string(),
        envelope_digest,
        started_at_unix_ms: 1,
        finished_at_unix_ms: 1,
        receipt: serde_json::to_vec(&receipt).unwrap(),
    }
}

fn result_msg(r: JobResult) -> AgentMessage {
    AgentMessage {
        body: Some(AgentBody::Result(r)),
    }
}

/// A relay can carry results but not make them: a result signed by the relay, one altered
/// after the leaf signed it, and another agent's result replayed are all refused and leave the
/// job open; the leaf's own result is accepted. Leaf certificates not from the plane's CA and
/// agents that are not relays are refused too.
#[test]
fn a_relay_cannot_forge_alter_or_replay_results() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let relay = Relay::enroll(
        &plane,
        &plane.api_url(),
        &tmp.path().join("relay"),
        "forger",
    );
    let leaf = Agent::enroll(&plane, &tmp.path().join("leaf"), "victim");
    let other = Agent::enroll(&plane, &tmp.path().join("other"), "other");
    let (_target, _cleanup) = docker_target(&plane, &leaf);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/forge"), "1");
    release(&plane, "forge-1", &image);
    let dep = plane.json(&["deploy", "forge-1", "--env", "dev", "--no-wait"]);
    let job_id = dep["jobs"][0]["id"].as_str().unwrap().to_string();
    let refusals = || {
        plane
            .metric("stella_result_receipt_refusals_total")
            .unwrap()
    };
    assert_eq!(refusals(), 0);

    let rt = tokio::runtime::Runtime::new().unwrap();
    // The harness's blocking helpers run their own runtimes: the session's steps run in
    // separate `block_on`s, the checks between them outside.
    let (mut session, offer) = rt.block_on(async {
        let mut session = RawSession::open(&plane, &relay.dir, hello(&["relay"])).await;
        assert!(matches!(
            session.next().await.body,
            Some(PlaneBody::Welcome(_))
        ));
        let leaf_cert = cert_der(&leaf.dir);
        session
            .tx
            .send(relayed(&leaf.id, 7, &leaf_cert, &hello(&["docker"])))
            .await
            .unwrap();
        let (frame, welcome) = unwrap_relayed(session.next().await);
        assert_eq!((frame.agent_id.as_str(), frame.link), (leaf.id.as_str(), 7));
        assert!(
            matches!(welcome, Some(PlaneBody::Welcome(_))),
            "{welcome:?}"
        );
        let (_, offer) = unwrap_relayed(session.next().await);
        let Some(PlaneBody::Offer(offer)) = offer else {
            panic!("expected the job offer, got {offer:?}")
        };
        assert_eq!(offer.job_id, job_id);

        // 1. Signed by the relay's own key, in the leaf's name.
        let forged = signed_result(
            &relay.dir,
            &leaf.id,
            &job_id,
            &offer.envelope,
            "succeeded",
            "done",
        );
        // 2. Signed by the leaf (it said "failed"), then altered by the relay to "succeeded".
        let mut altered = signed_result(
            &leaf.dir,
            &leaf.id,
            &job_id,
            &offer.envelope,
            "failed",
            "boom",
        );
        altered.status = JobStatus::Succeeded as i32;
        altered.message = "done".to_string();
        // 3. Another agent's genuinely signed result, replayed for this job.
        let replayed = signed_result(
            &other.dir,
            &other.id,
            &job_id,
            &offer.envelope,
            "succeeded",
            "done",
        );
        for bad in [forged, altered, replayed] {
            session
                .tx
                .send(relayed(&leaf.id, 7, &[], &result_msg(bad)))
                .await
                .unwrap();
        }
        // None is acknowledged.
        let answer = session.quiet_for(Duration::from_secs(2)).await;
        assert!(answer.is_none(), "a forged result was answered: {answer:?}");
        (session, offer)
    });
    wait_until(Duration::from_secs(10), "three receipt refusals", || {
        (refusals() == 3).then_some(())
    });
    let d = plane.json(&["deployments", "show", dep["id"].as_str().unwrap()]);
    assert_eq!(d["status"], "running", "{d:#}");
    rt.block_on(async {
        // The leaf's own result, carried by the same relay, is recorded and acknowledged.
        let honest = signed_result(
            &leaf.dir,
            &leaf.id,
            &job_id,
            &offer.envelope,
            "succeeded",
            "done",
        );
        session
            .tx
            .send(relayed(&leaf.id, 7, &[], &result_msg(honest.clone())))
            .await
            .unwrap();
        let (_, ack) = unwrap_relayed(session.next().await);
        assert!(matches!(ack, Some(PlaneBody::ResultAck(a)) if a.job_id == job_id));

        // Replayed inside another agent's virtual session, the leaf's result is refused.
        session
            .tx
            .send(relayed(
                &other.id,
                8,
                &cert_der(&other.dir),
                &hello(&["docker"]),
            ))
            .await
            .unwrap();
        let (_, welcome) = unwrap_relayed(session.next().await);
        assert!(matches!(welcome, Some(PlaneBody::Welcome(_))));
        session
            .tx
            .send(relayed(&other.id, 8, &[], &result_msg(honest)))
            .await
            .unwrap();
    });
    wait_until(Duration::from_secs(10), "a fourth receipt refusal", || {
        (refusals() == 4).then_some(())
    });
    rt.block_on(async {
        // A leaf certificate the plane's CA did not issue opens nothing.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(stella_pki::spiffe_agent_uri(
                stella_pki::DEFAULT_TRUST_DOMAIN,
                &leaf.id,
            ))
            .unwrap(),
        )];
        let fake = params.self_signed(&key).unwrap();
        session
            .tx
            .send(relayed(&leaf.id, 9, fake.der(), &hello(&["docker"])))
            .await
            .unwrap();
        let (frame, _) = unwrap_relayed(session.next().await);
        assert!(frame.closed && frame.refused, "{frame:?}");
        assert!(
            frame.reason.contains("not issued by this plane's CA"),
            "{}",
            frame.reason
        );
    });
    let d = plane.wait_deployment(dep["id"].as_str().unwrap());
    assert_eq!(
        d["status"], "succeeded",
        "only the leaf's own result counts"
    );
    assert!(!finished_at(&plane, &job_id).is_empty());

    // An agent enrolled with an ordinary token cannot relay.
    rt.block_on(async {
        let mut session = RawSession::open(&plane, &other.dir, hello(&["docker"])).await;
        assert!(matches!(
            session.next().await.body,
            Some(PlaneBody::Welcome(_))
        ));
        session
            .tx
            .send(relayed(
                &leaf.id,
                1,
                &cert_der(&leaf.dir),
                &hello(&["docker"]),
            ))
            .await
            .unwrap();
        let (frame, _) = unwrap_relayed(session.next().await);
        assert!(frame.closed && frame.refused, "{frame:?}");
        assert!(frame.reason.contains("is not a relay"), "{}", frame.reason);
    });
}

/// No link at all: the plane's jobs go to the relay in a signed file, the agent behind it runs
/// them, and the results come back in the relay's signed file; importing it again changes
/// nothing.
#[test]
fn an_air_gapped_site_is_served_by_files_and_a_second_import_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut relay = Relay::enroll(
        &plane,
        &plane.api_url(),
        &tmp.path().join("relay"),
        "site-b",
    );
    // Online once: the relay gets its server certificate and the plane learns who is behind it.
    relay.start_and_wait();
    let mut leaf = enroll_through(&plane, &relay.url(), &tmp.path().join("leaf"), "gapped");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");
    let (target, _cleanup) = docker_target(&plane, &leaf);

    // Now the site has no link: the relay's upstream leads nowhere.
    relay.stop();
    relay.upstream = Some(format!("https://127.0.0.1:{}", stella_e2e::free_port()));
    relay.start();
    wait_until(
        Duration::from_secs(30),
        "the relay to serve offline",
        || (relay.metric("stella_relay_uplink_up") == Some(0)).then_some(()),
    );
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/airgap"), "1");
    release(&plane, "gapped-1", &image);
    let dep = plane.json(&["deploy", "gapped-1", "--env", "dev", "--no-wait"]);
    let dep_id = dep["id"].as_str().unwrap().to_string();

    let jobs_file = tmp.path().join("jobs.json");
    plane.ok(&[
        "airgap",
        "export",
        "--relay",
        &relay.id,
        "--out",
        jobs_file.to_str().unwrap(),
    ]);
    // A tampered file is refused and stores nothing.
    let tampered = tmp.path().join("tampered.json");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&jobs_file).unwrap()).unwrap();
    doc["payloadType"] =
        serde_json::Value::String("application/vnd.stella.airgap-jobs+json; x".into());
    std::fs::write(&tampered, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = std::process::Command::new(stella_e2e::agent_bin())
        .args(["relay", "import", tampered.to_str().unwrap(), "--data-dir"])
        .arg(&relay.dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("signature check failed"));
    assert_eq!(relay.status()["to_agents_messages"], 0);

    let imported = relay.command(&["import", jobs_file.to_str().unwrap()]);
    assert!(imported.contains("imported 1 new jobs"), "{imported}");
    // The leaf, connected to the offline relay, runs it; its result waits at the relay.
    wait_until(Duration::from_secs(90), "the result at the relay", || {
        (relay.status()["results"] == 1).then_some(())
    });
    assert_eq!(containers_of(&target).len(), 1);
    assert_eq!(
        plane.json(&["deployments", "show", &dep_id])["status"],
        "running"
    );

    let results_file = tmp.path().join("results.json");
    let exported = relay.command(&["export-results", "--out", results_file.to_str().unwrap()]);
    assert!(exported.contains("1 results"), "{exported}");
    assert_eq!(
        relay.status()["results"],
        0,
        "exported results leave the backlog"
    );

    // A results file changed after the relay signed it is refused and records nothing.
    let mut forged: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&results_file).unwrap()).unwrap();
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let raw = b64.decode(forged["payload"].as_str().unwrap()).unwrap();
        let mut doc: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        doc["created_at_unix_ms"] =
            serde_json::json!(doc["created_at_unix_ms"].as_i64().unwrap() + 1);
        forged["payload"] =
            serde_json::Value::String(b64.encode(serde_json::to_vec(&doc).unwrap()));
    }
    let forged_file = tmp.path().join("forged-results.json");
    std::fs::write(&forged_file, serde_json::to_vec(&forged).unwrap()).unwrap();
    let refused = plane.fails(&["airgap", "import", forged_file.to_str().unwrap()]);
    assert!(
        refused.contains("signature does not verify") || refused.contains("base64"),
        "{refused}"
    );
    assert_eq!(
        plane.json(&["deployments", "show", &dep_id])["status"],
        "running"
    );
    // Only relays have air-gap files.
    let not_relay = plane.fails(&[
        "airgap",
        "export",
        "--relay",
        &leaf.id,
        "--out",
        "/dev/null",
    ]);
    assert!(not_relay.contains("is not a relay"), "{not_relay}");

    let first = plane.ok(&["airgap", "import", results_file.to_str().unwrap()]);
    assert!(
        first.contains("1 new, 0 already known, 0 refused"),
        "{first}"
    );
    let done = plane.wait_deployment(&dep_id);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let job_id = done["jobs"][0]["id"].as_str().unwrap().to_string();
    let recorded_at = finished_at(&plane, &job_id);
    assert!(!recorded_at.is_empty());
    assert_eq!(runs_of(&leaf, &job_id), 1);
    let events_before = sql_string(
        &plane.db(),
        "SELECT CAST(COUNT(*) AS TEXT) FROM job_events WHERE job_id = $1",
        &[&job_id],
    );

    let second = plane.ok(&["airgap", "import", results_file.to_str().unwrap()]);
    assert!(second.contains("0 new, 1 already known"), "{second}");
    assert_eq!(finished_at(&plane, &job_id), recorded_at);
    assert_eq!(
        sql_string(
            &plane.db(),
            "SELECT CAST(COUNT(*) AS TEXT) FROM job_events WHERE job_id = $1",
            &[&job_id],
        ),
        events_before
    );
}

/// The outer relay of a chain loses its uplink: the inner relay keeps its agent's results and
/// delivers them, once, when the outer uplink is back.
#[test]
fn a_chain_whose_outer_uplink_is_cut_delivers_every_result_once() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    // On the plane's transport: the uplink is gRPC or QUIC as the test run says.
    let proxy = LinkProxy::start(&plane);
    let mut outer = Relay::enroll(&plane, &plane.api_url(), &tmp.path().join("outer"), "outer");
    outer.upstream = Some(proxy.url());
    outer.start_and_wait();
    let mut inner = Relay::enroll(&plane, &outer.url(), &tmp.path().join("inner"), "inner");
    inner.start_and_wait();
    let mut leaf = enroll_through(&plane, &inner.url(), &tmp.path().join("leaf"), "deep");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");

    let targets: Vec<(String, TargetCleanup)> =
        (0..2).map(|_| docker_target(&plane, &leaf)).collect();
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/chaincut"), "1");
    release(&plane, "chain-cut-1", &image);
    let dep_id = deploy_until_a_job_is_taken(&plane, "chain-cut-1");
    proxy.cut();
    wait_until(
        Duration::from_secs(60),
        "the inner relay to hold both results",
        || (inner.metric("stella_relay_backlog_results") == Some(2)).then_some(()),
    );
    assert_eq!(outer.metric("stella_relay_uplink_up"), Some(0));
    assert_eq!(
        plane.json(&["deployments", "show", &dep_id])["status"],
        "running"
    );

    proxy.restore();
    let done = plane.wait_deployment(&dep_id);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    for job in done["jobs"].as_array().unwrap() {
        assert_eq!(runs_of(&leaf, job["id"].as_str().unwrap()), 1);
    }
    wait_until(
        Duration::from_secs(30),
        "the inner relay's backlog to drain",
        || (inner.metric("stella_relay_backlog_results") == Some(0)).then_some(()),
    );
    for (target, _) in &targets {
        assert_eq!(containers_of(target).len(), 1);
    }
}

/// Short-lived certificates behind a relay: the relay renews its own in-band (and its server
/// certificate); the agent behind it, whose in-band renewal a relay cannot carry, renews over the
/// passed-through API with a proof of its previous key, and work still flows.
#[test]
fn certificates_renew_behind_a_relay() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start_with(
        &tmp.path().join("plane"),
        stella_e2e::free_port(),
        stella_e2e::free_port(),
        &["--agent-cert-ttl", "8s"],
    );
    let mut relay = Relay::enroll(
        &plane,
        &plane.api_url(),
        &tmp.path().join("relay"),
        "relay-r",
    );
    relay.start_and_wait();
    let mut leaf = enroll_through(&plane, &relay.url(), &tmp.path().join("leaf"), "leaf-r");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");
    wait_until(Duration::from_secs(90), "both certificates renewed", || {
        (relay.log().contains("relay certificate renewed in-band")
            && relay
                .log()
                .matches("relay server certificate installed")
                .count()
                >= 2
            && leaf.log().contains("renewing with the previous key"))
        .then_some(())
    });
    plane.wait_agent(&leaf.id, "connected");
    let (target, _cleanup) = docker_target(&plane, &leaf);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/renew"), "1");
    release(&plane, "renew-1", &image);
    let dep = plane.json(&["deploy", "renew-1", "--env", "dev"]);
    assert_eq!(dep["status"], "succeeded", "{dep:#}");
    assert_eq!(containers_of(&target).len(), 1);
}

/// A relay whose store is full stores nothing and says so, but loses nothing either: results it
/// has no room for stay in the agent's spool (the relay does not acknowledge them) and reach
/// the plane, once, when the uplink is back.
#[test]
fn a_full_relay_refuses_results_into_the_agents_spool_and_they_still_arrive_once() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let proxy = LinkProxy::start(&plane);
    let mut relay = Relay::enroll(&plane, &plane.api_url(), &tmp.path().join("relay"), "full");
    relay.upstream = Some(proxy.url());
    relay.extra_args = vec!["--max-backlog-bytes".to_string(), "1".to_string()];
    relay.start_and_wait();
    let mut leaf = enroll_through(&plane, &relay.url(), &tmp.path().join("leaf"), "spooler");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");
    let targets: Vec<(String, TargetCleanup)> =
        (0..2).map(|_| docker_target(&plane, &leaf)).collect();
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/full"), "1");
    release(&plane, "full-1", &image);
    let dep_id = deploy_until_a_job_is_taken(&plane, "full-1");
    proxy.cut();
    wait_until(
        Duration::from_secs(60),
        "both results refused by the full relay",
        || {
            (relay.metric("stella_relay_refused_results_total") >= Some(2)
                && relay.metric("stella_relay_uplink_up") == Some(0))
            .then_some(())
        },
    );
    assert_eq!(relay.metric("stella_relay_backlog_results"), Some(0));
    let spooled = std::fs::read_dir(leaf.dir.join("spool")).unwrap().count();
    assert!(spooled >= 1, "the agent keeps what the relay refused");

    proxy.restore();
    let done = plane.wait_deployment(&dep_id);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    for job in done["jobs"].as_array().unwrap() {
        assert_eq!(runs_of(&leaf, job["id"].as_str().unwrap()), 1);
    }
    for (target, _) in &targets {
        assert_eq!(containers_of(target).len(), 1);
    }
    wait_until(
        Duration::from_secs(30),
        "the agent's spool to empty",
        || (std::fs::read_dir(leaf.dir.join("spool")).unwrap().count() == 0).then_some(()),
    );
}

/// An agent that leaves its relay and connects to the plane directly keeps that session: the
/// relay, told its virtual session was replaced, stops carrying the agent until it comes back.
#[test]
fn an_agent_that_moves_off_its_relay_is_not_pulled_back() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut relay = Relay::enroll(&plane, &plane.api_url(), &tmp.path().join("relay"), "left");
    relay.start_and_wait();
    let mut leaf = enroll_through(&plane, &relay.url(), &tmp.path().join("leaf"), "mover");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");
    leaf.stop();
    leaf.set_endpoint(&plane.agent_endpoint());
    leaf.start();
    wait_until(
        Duration::from_secs(30),
        "the relay to let the agent go",
        || relay.log().contains("moved elsewhere").then_some(()),
    );
    plane.wait_agent(&leaf.id, "connected");
    let sessions = leaf.sessions_established();
    // An observation window, not a synchronisation: the relay would re-open the virtual
    // session (and take the agent's session away) within 3 s if it did not let go.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        leaf.sessions_established(),
        sessions,
        "the agent's direct session was taken away"
    );
    let (target, _cleanup) = docker_target(&plane, &leaf);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/mover"), "1");
    release(&plane, "mover-1", &image);
    let dep = plane.json(&["deploy", "mover-1", "--env", "dev"]);
    assert_eq!(dep["status"], "succeeded", "{dep:#}");
    assert_eq!(containers_of(&target).len(), 1);
}

/// Revoking an agent that sits behind a relay cuts it off there too: its virtual session ends,
/// the relay closes the agent's connection, and the agent is refused when it comes back.
#[test]
fn revoking_an_agent_behind_a_relay_cuts_it_off() {
    let tmp = tempfile::tempdir().unwrap();
    let plane = Plane::start(&tmp.path().join("plane"));
    let mut relay = Relay::enroll(&plane, &plane.api_url(), &tmp.path().join("relay"), "gate");
    relay.start_and_wait();
    let mut leaf = enroll_through(&plane, &relay.url(), &tmp.path().join("leaf"), "doomed");
    leaf.start();
    plane.wait_agent(&leaf.id, "connected");
    plane.json(&[
        "agents",
        "revoke",
        &leaf.id,
        "--reason",
        "host decommissioned",
    ]);
    wait_until(
        Duration::from_secs(60),
        "the agent to be refused at the relay",
        || {
            leaf.log()
                .contains("the control plane refuses this agent")
                .then_some(())
        },
    );
    assert_eq!(plane.agent_status(&leaf.id), "revoked");
}
