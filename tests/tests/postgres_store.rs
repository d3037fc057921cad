//! The plane on PostgreSQL, always (whatever `STELLA_E2E_DATABASE` says): `stella migrate`,
//! then the core flows against a throwaway cluster — enrollment, a promotion with an approval
//! and its deployment, a plane restart, a deployment after it, drift, evidence export and
//! offline verification, the append-only trigger — and clear errors for bad database URLs,
//! without the password.

use std::time::Duration;

use serde_json::Value;
use stella_e2e::postgres::PgCluster;
use stella_e2e::{
    Agent, PG_DATABASE, Plane, TargetCleanup, TestImage, containers_of, docker, sql_string,
    sql_try, stella_bin, unique, wait_until,
};

const WAIT: Duration = Duration::from_secs(60);

fn stella(args: &[&str]) -> std::process::Output {
    std::process::Command::new(stella_bin())
        .args(args)
        .env_remove("STELLA_DATABASE_URL")
        .output()
        .expect("run stella")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn as_user(plane: &Plane, token: &str, args: &[&str]) -> Value {
    let mut all = vec!["--token", token];
    all.extend_from_slice(args);
    plane.json(&all)
}

#[test]
fn migrate_applies_the_schema_once_and_reports_what_it_applied() {
    let pg = PgCluster::start();
    pg.create_database(PG_DATABASE);
    let url = pg.url(PG_DATABASE);
    let first = stella(&["migrate", "--database", &url]);
    assert!(first.status.success(), "{}", text(&first));
    let report = text(&first);
    let shipped = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres"),
    )
    .unwrap()
    .filter(|e| {
        e.as_ref()
            .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
    })
    .count();
    assert!(
        report.contains(&format!("applied {shipped} migration(s)")),
        "{report}"
    );
    assert!(report.contains("0001 spine"), "{report}");
    let again = stella(&["migrate", "--database", &url]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("nothing to apply"),
        "{}",
        text(&again)
    );
    let tables = pg
        .psql(
            PG_DATABASE,
            "SELECT count(*) FROM _sqlx_migrations WHERE success",
        )
        .unwrap();
    assert_eq!(tables.trim(), shipped.to_string());
}

#[test]
fn bad_database_urls_get_a_clear_error_without_the_password() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().display().to_string();
    // Nothing listens on this port: the database is unreachable.
    let port = stella_e2e::free_port();
    let unreachable = format!("postgres://stella:hunter2secret@127.0.0.1:{port}/stella");
    let out = stella(&["--data-dir", &data, "migrate", "--database", &unreachable]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("cannot open database"), "{err}");
    assert!(err.contains("stella:***@127.0.0.1"), "{err}");
    assert!(!err.contains("hunter2secret"), "{err}");

    let out = stella(&[
        "--data-dir",
        &data,
        "serve",
        "--api-listen",
        "127.0.0.1:0",
        "--agent-listen",
        "127.0.0.1:0",
        "--database",
        "mysql://stella:hunter2secret@db/stella",
    ]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("unsupported scheme \"mysql\""), "{err}");
    assert!(!err.contains("hunter2secret"), "{err}");
}

#[test]
fn the_core_flows_run_on_postgresql() {
    let tmp = tempfile::tempdir().unwrap();
    let pg = PgCluster::start();
    pg.create_database(PG_DATABASE);
    let mut plane = Plane::start_on_postgres(&tmp.path().join("plane"), pg);
    assert!(
        !tmp.path().join("plane/stella.db").exists(),
        "no SQLite file when the plane runs on PostgreSQL"
    );
    let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "pg");
    plane.wait_agent(&agent.id, "connected");
    plane.ok(&["env", "create", "dev", "--approvals", "1"]);
    let target = unique("web-pg");
    let _cleanup = TargetCleanup(target.clone());
    plane.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let repo = unique("stella-e2e/pg");
    let v1 = TestImage::busybox_sleeper(&repo, "1");
    let v2 = TestImage::busybox_sleeper(&repo, "2");
    let alice = plane.json(&[
        "token", "api", "create", "--user", "alice", "--role", "releaser",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let bob = plane.json(&[
        "token", "api", "create", "--user", "bob", "--role", "approver",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();

    // A promotion waits for its approval, then deploys.
    as_user(
        &plane,
        &alice,
        &[
            "release",
            "create",
            "pg-1",
            "--component",
            &v1.component("web"),
        ],
    );
    let promotion = as_user(&plane, &alice, &["promote", "pg-1", "--to", "dev"]);
    assert_eq!(promotion["status"], "awaiting_approval", "{promotion}");
    let id = promotion["id"].as_str().unwrap();
    let approved = as_user(&plane, &bob, &["approve", id, "--comment", "ok"]);
    assert_eq!(approved["status"], "deployed", "{approved}");
    let ids = containers_of(&target);
    assert_eq!(ids.len(), 1, "{ids:?}");

    // A restart of the plane keeps everything; the agent comes back and takes new work, with
    // its job sequence continuing where it was.
    plane.stop();
    plane.restart();
    plane.wait_agent(&agent.id, "connected");
    let promotions = plane.json(&["promotion", "list"]);
    assert_eq!(promotions[0]["status"], "deployed", "{promotions}");
    plane.ok(&[
        "release",
        "create",
        "pg-2",
        "--component",
        &v2.component("web"),
    ]);
    let out = plane.ok(&["deploy", "pg-2", "--env", "dev"]);
    assert!(out.contains("succeeded"), "{out}");
    let sequences = sql_string(
        &plane.db(),
        "SELECT STRING_AGG(CAST(sequence AS TEXT), ',' ORDER BY sequence) FROM jobs WHERE agent_id = $1",
        &[&agent.id],
    );
    assert_eq!(sequences, "1,2", "gap-free sequences per agent");

    // Drift: the container stopped behind Stella's back is found.
    let container = containers_of(&target)[0].clone();
    docker(&["stop", &container]);
    wait_until(WAIT, "a 'stopped' finding", || {
        let report = plane.json(&["drift", "--env", "dev", "--target", &target]);
        report[0]["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f["kind"] == "stopped" && f["resolved_at"].is_null())
            .then_some(())
    });

    // Evidence: decision and both deployments, exported and verified offline.
    let packets = wait_until(WAIT, "three evidence packets", || {
        let list = plane.json(&["evidence", "list"]);
        (list.as_array().unwrap().len() >= 3).then_some(list)
    });
    let kinds: Vec<&str> = packets
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["promotion_decision", "deployment", "deployment"],
        "{packets}"
    );
    let file = tmp.path().join("evidence.json");
    plane.ok(&["evidence", "export", "--out", &file.display().to_string()]);
    let out = plane.cli(&["evidence", "verify", &file.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("VERIFIED"), "{}", text(&out));

    // The database itself refuses to change or drop evidence.
    let db = plane.db();
    for sql in [
        "UPDATE evidence_packets SET kind = 'deployment'",
        "DELETE FROM evidence_packets",
        "TRUNCATE evidence_packets",
    ] {
        let err = sql_try(&db, sql).unwrap_err();
        assert!(err.contains("append-only"), "{sql}: {err}");
    }
    // The agent's private key never reached the database.
    let key = std::fs::read_to_string(tmp.path().join("agent/identity/agent.key")).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!plane.db_dump().contains(&key_body[..40]));
}
