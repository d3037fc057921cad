//! Two control-plane replicas on one PostgreSQL database, leader-less: real `stella serve`
//! processes on a throwaway cluster, real agents with the machine's Docker Engine. A job created
//! through one replica reaches an agent held by the other (LISTEN/NOTIFY); the replica driving a
//! workflow run is SIGKILLed mid-run and the other takes the run over through its lease, while
//! the killed replica's agent moves to the survivor: the run completes, nothing runs twice,
//! nothing is lost.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stella_e2e::postgres::PgCluster;
use stella_e2e::{
    Agent, PG_DATABASE, Plane, TargetCleanup, TestImage, containers_of, free_port, unique,
    wait_until,
};
use stella_e2e::{agent_cli, promotion_step as step};

/// One replica's ports, known before any replica starts (each advertises both).
struct Ports {
    api: u16,
    agent: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            api: free_port(),
            agent: free_port(),
        }
    }

    fn agent_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent)
    }
}

/// A key-encryption key for the replicas' sealed keys (`stella keys generate-kek`): every
/// replica gets the same file, so all share one CA and one job-signing key.
fn kek(dir: &Path) -> String {
    let path = dir.join("stella.kek");
    let out = std::process::Command::new(stella_e2e::stella_bin())
        .args(["keys", "generate-kek", "--out"])
        .arg(&path)
        .output()
        .expect("run stella keys generate-kek");
    assert!(out.status.success(), "{out:?}");
    path.display().to_string()
}

/// Starts a replica with the shared keys, advertising both replicas' agent endpoints (its own
/// first), with a short run lease.
fn replica(dir: &Path, pg: &Arc<PgCluster>, kek: &str, own: &Ports, other: &Ports) -> Plane {
    replica_with(
        dir,
        pg,
        kek,
        own,
        &[
            "--advertise-endpoint",
            &own.agent_url(),
            "--advertise-endpoint",
            &other.agent_url(),
            "--run-lease",
            "3s",
        ],
    )
}

fn replica_with(dir: &Path, pg: &Arc<PgCluster>, kek: &str, own: &Ports, extra: &[&str]) -> Plane {
    let mut args = vec!["--key-encryption-key-file", kek];
    args.extend_from_slice(extra);
    Plane::start_replica(dir, pg.clone(), own.api, own.agent, &args)
}

/// Samples of a labelled counter, e.g. `stella_replica_signals_received_total{signal="work"}`.
fn labelled(plane: &Plane, name: &str, label: &str) -> u64 {
    let key = format!("{name}{{{label}}}");
    plane
        .metrics()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

fn replica_ids(plane: &Plane) -> Vec<String> {
    plane
        .json(&["replicas"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect()
}

fn this_replica(plane: &Plane) -> String {
    let all = plane.json(&["replicas"]);
    all.as_array()
        .unwrap()
        .iter()
        .find(|r| r["this"] == true)
        .unwrap_or_else(|| panic!("no replica answering: {all}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The one value `sql` selects from the shared database, as text.
fn sql_value(pg: &PgCluster, sql: &str) -> String {
    pg.psql(PG_DATABASE, sql).unwrap().trim().to_string()
}

/// The replica holding the lease of the promotion's workflow run (empty: none).
fn lease_owner(pg: &PgCluster, promotion_id: &str) -> String {
    sql_value(
        pg,
        &format!("SELECT lease_owner FROM workflow_runs WHERE promotion_id = '{promotion_id}'"),
    )
}

/// Sets `workflow` (YAML) on environment `dev`, creates `release` of `image` and promotes it
/// through `plane` without waiting; returns the promotion id.
fn promote_through(
    plane: &Plane,
    dir: &Path,
    workflow: &str,
    release: &str,
    image: &TestImage,
) -> String {
    plane.set_workflow(dir, &format!("{release}.workflow"), workflow);
    plane.ok(&[
        "release",
        "create",
        release,
        "--component",
        &image.component("web"),
    ]);
    let promotion = plane.json(&["promote", release, "--to", "dev", "--no-wait"]);
    promotion["id"].as_str().unwrap().to_string()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn two_replicas_share_work_and_a_killed_one_hands_its_run_and_agents_to_the_other() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = Arc::new(PgCluster::start());
    pg.create_database(PG_DATABASE);
    let (pa, pb) = (Ports::new(), Ports::new());
    let kek = kek(tmp.path());
    let mut a = replica(&tmp.path().join("a"), &pg, &kek, &pa, &pb);
    let mut b = replica(&tmp.path().join("b"), &pg, &kek, &pb, &pa);

    // Each replica sees both.
    for plane in [&a, &b] {
        wait_until(Duration::from_secs(30), "both replicas listed", || {
            (replica_ids(plane).len() == 2).then_some(())
        });
    }
    let (id_a, id_b) = (this_replica(&a), this_replica(&b));
    assert_ne!(id_a, id_b);

    // Two agents enrolled through A; the first dials A first, the second B first.
    let mut agents = Vec::new();
    for (name, first, second) in [("one", &pa, &pb), ("two", &pb, &pa)] {
        let mut agent = Agent::enroll(&a, &tmp.path().join(name), name);
        let out = agent_cli(
            &agent.dir,
            &[
                "endpoints",
                "--set",
                &first.agent_url(),
                &second.agent_url(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        agent.run_args = vec!["--allow-scripts".into()];
        agent.start();
        agents.push(agent);
    }
    for agent in &agents {
        // Connected as seen from either replica, whichever holds the session.
        a.wait_agent(&agent.id, "connected");
        b.wait_agent(&agent.id, "connected");
    }
    let held_by = |agent: &Agent| {
        sql_value(
            &pg,
            &format!(
                "SELECT session_replica FROM agents WHERE id = '{}'",
                agent.id
            ),
        )
    };
    wait_until(Duration::from_secs(30), "agent one on A, two on B", || {
        (held_by(&agents[0]) == id_a && held_by(&agents[1]) == id_b).then_some(())
    });

    a.ok(&["env", "create", "dev"]);
    let mut targets = Vec::new();
    let mut cleanups = Vec::new();
    for agent in &agents {
        let target = unique("replicas");
        a.ok(&[
            "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
        ]);
        cleanups.push(TargetCleanup(target.clone()));
        targets.push(target);
    }
    let repo = unique("stella-e2e/replicas");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");

    // A job created through B for the agent A holds reaches it through A: signalled, and done.
    let work_signals = labelled(
        &a,
        "stella_replica_signals_received_total",
        "signal=\"work\"",
    );
    b.ok(&[
        "release",
        "create",
        "r1",
        "--component",
        &v1.component("web"),
    ]);
    let dep = b.json(&[
        "deploy",
        "r1",
        "--env",
        "dev",
        "--target",
        &targets[0],
        "--no-wait",
    ]);
    let done = b.wait_deployment(dep["id"].as_str().unwrap());
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert!(
        labelled(
            &a,
            "stella_replica_signals_received_total",
            "signal=\"work\""
        ) > work_signals,
        "A was not signalled about B's job: {}",
        a.metrics()
    );

    // A workflow run: deploy, then a script that holds until released, then another script.
    let hold = tmp.path().join("hold");
    let release = tmp.path().join("release");
    let verified = tmp.path().join("verified");
    let workflow = format!(
        "name: ha\nsteps:\n  - id: deploy\n    type: deploy\n  - id: hold\n    type: script\n    needs: [deploy]\n    with: {{ command: [\"/bin/sh\", \"-c\", \"echo held >> {hold}; while [ ! -f {release} ]; do sleep 0.1; done\"] }}\n    timeout: 5m\n  - id: verify\n    type: script\n    needs: [hold]\n    with: {{ command: [\"/bin/sh\", \"-c\", \"echo verified >> {verified}\"] }}\n",
        hold = hold.display(),
        release = release.display(),
        verified = verified.display(),
    );
    // Both replicas' event streams, open before the run starts.
    let streams = [a.events(""), b.events("")];
    let promotion_id = promote_through(&a, tmp.path(), &workflow, "r2", &v2);

    // Both agents run the hold script: the run is mid-way, its lease held by one replica.
    wait_until(
        Duration::from_secs(120),
        "both agents in the hold step",
        || (lines(&hold) == 2).then_some(()),
    );
    let holder = lease_owner(&pg, &promotion_id);
    assert!(holder == id_a || holder == id_b, "lease held by {holder:?}");
    let (victim, survivor, survivor_id) = if holder == id_a {
        (&mut a, &b, id_b.clone())
    } else {
        (&mut b, &a, id_a.clone())
    };
    // The run's changes reached the other replica's event subscribers too: forwarded, since
    // only the lease holder writes the run.
    let other_stream = &streams[usize::from(holder == id_a)];
    wait_until(
        Duration::from_secs(30),
        "the run's events on the other replica",
        || {
            let text = other_stream.text();
            (text.contains("event: workflow_run") && text.contains(&promotion_id)).then_some(())
        },
    );
    // The agent whose session the victim holds must move.
    let moving = agents
        .iter()
        .position(|ag| held_by(ag) == holder)
        .expect("one agent is held by the lease holder");
    let sessions_before = agents[moving].sessions_established();

    victim.kill();
    let killed_at = std::time::Instant::now();
    std::fs::write(&release, "go").unwrap();

    let finished = wait_until(Duration::from_secs(120), "the promotion to finish", || {
        let p = survivor.json(&["promotion", "show", &promotion_id]);
        let status = p["status"].as_str().unwrap_or_default();
        (!["pending", "awaiting_approval", "approved", "deploying"].contains(&status)).then_some(p)
    });
    println!(
        "lease holder SIGKILLed mid-run: promotion finished through the other replica {:?} later",
        killed_at.elapsed()
    );
    assert_eq!(finished["status"], "deployed", "{finished:#}");
    for id in ["deploy", "hold", "verify"] {
        let s = step(&finished, id);
        assert_eq!(s["status"], "succeeded", "{finished:#}");
        assert_eq!(
            s["deployments"].as_array().unwrap().len(),
            1,
            "{finished:#}"
        );
    }

    // Nothing ran twice, nothing was lost.
    assert_eq!(
        lines(&hold),
        2,
        "the hold script ran again after the takeover"
    );
    assert_eq!(lines(&verified), 2);
    for target in &targets {
        let ids = containers_of(target);
        assert_eq!(ids.len(), 1, "{target}: {ids:?}");
        assert_eq!(stella_e2e::inspect(&ids[0])["Image"], v2.id.as_str());
    }
    for agent in &agents {
        let log = agent.log();
        // r1 on agent one only; then deploy, hold, verify on both.
        let expected = if agent.id == agents[0].id { 4 } else { 3 };
        assert_eq!(
            log.matches("job verified and accepted").count(),
            expected,
            "{log}"
        );
    }
    let jobs = sql_value(
        &pg,
        "SELECT status, COUNT(*) FROM jobs GROUP BY status ORDER BY status",
    );
    assert_eq!(jobs, "succeeded|7", "{jobs}");

    // The moved agent holds its session with the survivor now; the survivor drives every run.
    wait_until(
        Duration::from_secs(60),
        "the moved agent on the survivor",
        || {
            (agents[moving].sessions_established() > sessions_before
                && held_by(&agents[moving]) == survivor_id)
                .then_some(())
        },
    );
    survivor.wait_agent(&agents[moving].id, "connected");
    // The killed replica's presence runs out: it is no longer listed.
    wait_until(
        Duration::from_secs(60),
        "the killed replica to drop out",
        || (replica_ids(survivor) == vec![survivor_id.clone()]).then_some(()),
    );

    // Evidence: the decision and the deployment, each recorded once, the chain intact.
    let packets = wait_until(Duration::from_secs(60), "evidence of the run", || {
        let list = survivor.json(&["evidence", "list"]);
        let kinds: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["kind"].as_str().unwrap().to_string())
            .collect();
        (kinds.iter().filter(|k| *k == "deployment").count() >= 2).then_some(kinds)
    });
    let mut packets = packets;
    packets.sort();
    assert_eq!(
        packets,
        ["deployment", "deployment", "promotion_decision"],
        "one packet per decision and deployment"
    );
    let bundle = tmp.path().join("evidence.json");
    survivor.ok(&["evidence", "export", "--out", &bundle.display().to_string()]);
    survivor.ok(&["evidence", "verify", &bundle.display().to_string()]);

    // The killed replica comes back on its data directory: the same replica again, listed by
    // both, seeing the agents the survivor holds as connected.
    victim.restart();
    assert_eq!(this_replica(victim), holder);
    wait_until(
        Duration::from_secs(30),
        "both replicas listed again",
        || (replica_ids(survivor).len() == 2).then_some(()),
    );
    for agent in &agents {
        victim.wait_agent(&agent.id, "connected");
    }
}

/// Revoking an agent through one replica ends its session on the replica that holds it; a key
/// rotation started through one replica reaches the other at once.
/// A replica stopped gracefully gives up its leases at once: the other one takes the run over
/// without waiting for the lease to run out (rolling upgrades restart replicas one at a time).
#[test]
fn revocation_and_rotation_reach_the_other_replica_and_a_graceful_stop_hands_leases_over() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = Arc::new(PgCluster::start());
    pg.create_database(PG_DATABASE);
    let (pa, pb) = (Ports::new(), Ports::new());
    let kek = kek(tmp.path());
    let a = replica_with(
        &tmp.path().join("a"),
        &pg,
        &kek,
        &pa,
        &["--run-lease", "10m"],
    );
    let b = replica_with(
        &tmp.path().join("b"),
        &pg,
        &kek,
        &pb,
        &["--run-lease", "10m"],
    );
    let (id_a, id_b) = (this_replica(&a), this_replica(&b));

    // An agent enrolled through A, held by B; revoked through A.
    let mut agent = Agent::enroll(&a, &tmp.path().join("agent"), "revoked");
    let out = agent_cli(&agent.dir, &["endpoints", "--set", &pb.agent_url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.start();
    b.wait_agent(&agent.id, "connected");
    a.wait_agent(&agent.id, "connected");
    assert_eq!(b.metric("stella_agents_connected"), Some(1));
    assert_eq!(a.metric("stella_agents_connected"), Some(0));
    a.ok(&["agents", "revoke", &agent.id, "--reason", "decommissioned"]);
    wait_until(
        Duration::from_secs(30),
        "B to end the revoked agent's session",
        || (b.metric("stella_agents_connected") == Some(0)).then_some(()),
    );
    assert!(
        labelled(
            &b,
            "stella_replica_signals_received_total",
            "signal=\"evict\""
        ) >= 1
    );
    assert_eq!(b.agent_status(&agent.id), "revoked");
    agent.stop();

    // A job-key rotation started through A reaches B's memory at once (signalled, reloaded
    // from the sealed keys), without a restart.
    let started = a.json(&["keys", "rotate", "start"]);
    let staged = started["next_key_id"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(30), "B to hold the staged key", || {
        (b.json(&["keys", "status"])["next_key_id"] == staged.as_str()).then_some(())
    });
    assert!(
        labelled(
            &b,
            "stella_replica_signals_received_total",
            "signal=\"trust\""
        ) >= 1
    );

    // A run that waits (a wait step) with its lease on A: B cannot take it for 10 minutes...
    a.ok(&["env", "create", "dev"]);
    let v1 = TestImage::busybox_sleeper(&unique("stella-e2e/replicas-stop"), "1");
    let promotion_id = promote_through(
        &a,
        tmp.path(),
        "name: wait\nsteps:\n  - id: pause\n    type: wait\n    with: { duration: 10m }\n",
        "r1",
        &v1,
    );
    let lease_owner = || lease_owner(&pg, &promotion_id);
    let first = wait_until(Duration::from_secs(30), "the run to be leased", || {
        let owner = lease_owner();
        (!owner.is_empty()).then_some(owner)
    });
    assert!(first == id_a || first == id_b, "{first}");
    let (mut holder, other, other_id) = if first == id_a {
        (a, b, id_b)
    } else {
        (b, a, id_a)
    };
    // ...unless the holder stops: a graceful stop releases it and the other claims it.
    holder.stop();
    wait_until(
        Duration::from_secs(30),
        "the other replica to hold the run",
        || (lease_owner() == other_id).then_some(()),
    );
    let shown = other.json(&["replicas"]);
    assert_eq!(shown.as_array().unwrap().len(), 1, "{shown}");
    assert_eq!(shown[0]["runs_leased"], 1, "{shown}");
}

/// A lease too short to be renewed in time is refused before anything is created.
#[test]
fn a_run_lease_shorter_than_its_renewals_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("plane");
    let out = std::process::Command::new(stella_e2e::stella_bin())
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--run-lease", "1s", "--api-listen", "127.0.0.1:0"])
        .args(["--agent-listen", "127.0.0.1:0"])
        .env_remove("STELLA_DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--run-lease") && stderr.contains("too short"),
        "{stderr}"
    );
    assert!(!data.exists(), "nothing is created for a refused start");
}
