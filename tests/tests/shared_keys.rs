//! The plane's CA, job-signing and evidence keys sealed in the database with a key-encryption
//! key (`stella serve --key-encryption-key-file`), shared by replicas of one database.
//!
//! Library level, on SQLite and PostgreSQL: first start generates, a data directory with key
//! files is imported (and its private key files removed), two loads racing on an empty database
//! agree on one set, another key-encryption key is refused without writing anything, and a
//! plane without one is refused on a sealed database. End to end: two `stella serve` replicas on
//! one PostgreSQL database share the CA and job key, an agent enrolled through one connects to
//! the other, rotations reach the other replica, and no private key is in the clear.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stella_control_plane::keys::{PlaneKeys, SealingKeys};
use stella_control_plane::store::{self, DatabaseUrl};
use stella_e2e::postgres::PgCluster;
use stella_e2e::{
    Agent, PG_DATABASE, Plane, TargetCleanup, TestImage, free_port, sql_string, stella_bin, unique,
    wait_until,
};
use stella_pki::{KeyEncryptionKey, SigningKey};

const TRUST_DOMAIN: &str = "stella.local";
const WAIT: Duration = Duration::from_secs(60);

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn sealed_rows(db: &store::Db) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT name, sealed, kek_id FROM plane_secrets ORDER BY name")
        .fetch_all(db)
        .await
        .unwrap()
}

/// (CA fingerprint, job key id, staged job key id, evidence key id)
fn ids(keys: &PlaneKeys) -> (String, String, Option<String>, String) {
    let job = keys.job_keys();
    (
        keys.ca().fingerprint(),
        job.active.key_id().to_string(),
        job.next.map(|k| k.key_id().to_string()),
        keys.evidence_key().key_id().to_string(),
    )
}

async fn load(pki: &Path, db: &store::Db, kek: &Path) -> Result<PlaneKeys, String> {
    PlaneKeys::load(
        pki,
        TRUST_DOMAIN,
        &[],
        db,
        SealingKeys::load(Some(kek), None).map_err(|e| e.to_string())?,
    )
    .await
    .map_err(|e| e.to_string())
}

async fn sealed_keys_on(url: DatabaseUrl, tmp: &Path) {
    let kek = tmp.join("kek");
    let kek_id = KeyEncryptionKey::generate_file(&kek)
        .unwrap()
        .key_id()
        .to_string();

    // Two replicas racing on an empty database end up with one set of keys.
    {
        let db = store::open(&url, true).await.unwrap();
        let (a, b) = (tmp.join("a/pki"), tmp.join("b/pki"));
        let (ra, rb) = tokio::join!(
            tokio::spawn({
                let (db, kek) = (db.clone(), kek.clone());
                async move { load(&a, &db, &kek).await }
            }),
            tokio::spawn({
                let (db, kek) = (db.clone(), kek.clone());
                async move { load(&b, &db, &kek).await }
            }),
        );
        let (ka, kb) = (ra.unwrap().unwrap(), rb.unwrap().unwrap());
        assert_eq!(ids(&ka), ids(&kb), "{url}");
        let rows = sealed_rows(&db).await;
        assert_eq!(
            rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            ["ca", "evidence", "job-signing"],
            "{url}"
        );
        for (name, sealed, id) in &rows {
            assert_eq!(id, &kek_id, "{url} {name}");
            assert!(sealed.starts_with(&format!("v1:{kek_id}:")), "{url} {name}");
            assert!(!sealed.contains("PRIVATE KEY"), "{url} {name}");
        }
        // pki/ holds the CA certificate (public) and this replica's server certificate only.
        for dir in [tmp.join("a/pki"), tmp.join("b/pki")] {
            assert_eq!(
                files_in(&dir),
                ["ca.pem", "server.key", "server.pem"],
                "{url}"
            );
            assert_eq!(
                std::fs::read_to_string(dir.join("ca.pem")).unwrap(),
                ka.ca().cert_pem(),
                "{url}"
            );
            #[cfg(unix)]
            assert_eq!(mode(&dir.join("server.key")), 0o600, "{url}");
        }
        // A later start reads the same keys back.
        let again = load(&tmp.join("c/pki"), &db, &kek).await.unwrap();
        assert_eq!(ids(&again), ids(&ka), "{url}");

        // Another key-encryption key: refused, naming both keys, and nothing written.
        let other = tmp.join("other-kek");
        let other_id = KeyEncryptionKey::generate_file(&other)
            .unwrap()
            .key_id()
            .to_string();
        let e = load(&tmp.join("d/pki"), &db, &other).await.err().unwrap();
        assert!(
            e.contains(&kek_id) && e.contains(&other_id) && e.contains("key-encryption key"),
            "{url}: {e}"
        );
        assert!(
            !tmp.join("d").exists(),
            "{url}: the refused replica wrote files"
        );
        assert_eq!(sealed_rows(&db).await, rows, "{url}");

        // Without a key-encryption key, a sealed database is refused (no CA of its own).
        let e = PlaneKeys::load(&tmp.join("e/pki"), TRUST_DOMAIN, &[], &db, None)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--key-encryption-key-file"), "{url}: {e}");
        assert!(!tmp.join("e").exists(), "{url}");
        db.close().await;
    }
}

/// A plane that ran with key files, moving to sealed keys on an empty database: its keys
/// (including a staged job key) are imported, then its private key files removed.
async fn import_on(url: DatabaseUrl, tmp: &Path) {
    let kek = tmp.join("kek");
    KeyEncryptionKey::generate_file(&kek).unwrap();
    let pki = tmp.join("single/pki");
    let before = {
        let files = PlaneKeys::load_or_create(&pki, TRUST_DOMAIN, &[]).unwrap();
        let staged = SigningKey::generate();
        stella_pki::write_secret_file(
            &pki.join("job-signing.next.key"),
            staged.to_pem().unwrap().as_bytes(),
        )
        .unwrap();
        let mut ids = ids(&files);
        ids.2 = Some(staged.key_id().to_string());
        ids
    };
    let db = store::open(&url, true).await.unwrap();
    let imported = load(&pki, &db, &kek).await.unwrap();
    assert_eq!(ids(&imported), before, "{url}");
    assert_eq!(
        files_in(&pki),
        ["ca.pem", "server.key", "server.pem"],
        "{url}"
    );
    // Another replica gets the imported keys.
    let replica = load(&tmp.join("replica/pki"), &db, &kek).await.unwrap();
    assert_eq!(ids(&replica), before, "{url}");
    // The data directory's keys are gone; the database is the one copy now.
    let again = load(&pki, &db, &kek).await.unwrap();
    assert_eq!(ids(&again), before, "{url}");
    db.close().await;
}

#[test]
fn sealed_keys_are_generated_imported_shared_and_guarded_on_both_backends() {
    let pg = PgCluster::start();
    pg.create_database(PG_DATABASE);
    pg.create_database("imported");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sqlite = tempfile::tempdir().unwrap();
    let postgres = tempfile::tempdir().unwrap();
    rt.block_on(async {
        sealed_keys_on(
            DatabaseUrl::sqlite_file(&sqlite.path().join("stella.db")).unwrap(),
            sqlite.path(),
        )
        .await;
        sealed_keys_on(
            DatabaseUrl::parse(&pg.url(PG_DATABASE)).unwrap(),
            postgres.path(),
        )
        .await;
    });
    let sqlite = tempfile::tempdir().unwrap();
    let postgres = tempfile::tempdir().unwrap();
    rt.block_on(async {
        import_on(
            DatabaseUrl::sqlite_file(&sqlite.path().join("stella.db")).unwrap(),
            sqlite.path(),
        )
        .await;
        import_on(
            DatabaseUrl::parse(&pg.url("imported")).unwrap(),
            postgres.path(),
        )
        .await;
    });
}

fn stella(args: &[&str]) -> std::process::Output {
    Command::new(stella_bin())
        .args(args)
        .env_remove("STELLA_DATABASE_URL")
        .env_remove("STELLA_KEY_ENCRYPTION_KEY_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run stella")
}

/// Runs `stella serve` expecting it to exit with an error by itself; returns its stderr.
fn serve_fails(data_dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(stella_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--api-listen", "127.0.0.1:0"])
        .args(["--agent-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("STELLA_DATABASE_URL")
        .env_remove("STELLA_KEY_ENCRYPTION_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stella serve");
    let status = wait_until(WAIT, "stella serve to give up", || {
        child.try_wait().expect("try_wait")
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "stella serve started: {stderr}");
    stderr
}

fn trust(plane: &Plane) -> Value {
    plane.json(&["keys", "status"])
}

fn string(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[test]
fn two_replicas_share_sealed_keys_through_postgresql() {
    let pg = Arc::new(PgCluster::start());
    pg.create_database(PG_DATABASE);
    let url = pg.url(PG_DATABASE);
    let tmp = tempfile::tempdir().unwrap();

    // The operator creates the key-encryption key: 0600, never overwritten.
    let kek: PathBuf = tmp.path().join("stella.kek");
    let kek_arg = kek.to_str().unwrap();
    let out = stella(&["keys", "generate-kek", "--out", kek_arg, "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let kek_id = string(&serde_json::from_slice::<Value>(&out.stdout).unwrap()["key_id"]);
    assert_eq!(kek_id.len(), 16);
    #[cfg(unix)]
    assert_eq!(mode(&kek), 0o600);
    let written = std::fs::read(&kek).unwrap();
    let out = stella(&["keys", "generate-kek", "--out", kek_arg]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&kek).unwrap(), written);

    let sealed = ["--key-encryption-key-file", kek_arg];
    let replica = |name: &str| {
        Plane::start_replica(
            &tmp.path().join(name),
            pg.clone(),
            free_port(),
            free_port(),
            &sealed,
        )
    };
    let r1 = replica("r1");
    let mut r2 = replica("r2");

    // One CA and one job-signing key for both.
    let (t1, t2) = (trust(&r1), trust(&r2));
    assert_eq!(t1["ca_fingerprint"], t2["ca_fingerprint"]);
    assert_eq!(t1["active_key_id"], t2["active_key_id"]);
    assert_eq!(
        std::fs::read_to_string(r1.dir.join("pki/ca.pem")).unwrap(),
        std::fs::read_to_string(r2.dir.join("pki/ca.pem")).unwrap()
    );

    // An agent enrolled through replica 1 holds a session with replica 2 (mTLS both ways
    // under the shared CA).
    let mut agent = Agent::enroll_and_start(&r1, &tmp.path().join("agent"), "shared-keys");
    wait_until(WAIT, "the agent's session with replica 1", || {
        (r1.metric("stella_agents_connected") == Some(1)).then_some(())
    });
    agent.stop();
    agent.set_endpoint(&r2.agent_endpoint());
    agent.start();
    wait_until(WAIT, "the agent's session with replica 2", || {
        (r2.metric("stella_agents_connected") == Some(1)).then_some(())
    });

    // Something to deploy later, set up through replica 1.
    let target = unique("shared-keys");
    let _cleanup = TargetCleanup(target.clone());
    r1.ok(&["env", "create", "dev"]);
    r1.ok(&[
        "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
    ]);
    let image = TestImage::busybox_sleeper(&unique("stella-e2e/shared-keys"), "1");
    r1.ok(&[
        "release",
        "create",
        "after-rotation",
        "--component",
        &image.component("web"),
    ]);

    // A job-key rotation started through replica 1 is replica 2's after its restart.
    let started = r1.json(&["keys", "rotate", "start"]);
    let next = string(&started["next_key_id"]);
    assert!(!next.is_empty(), "{started}");
    r2.stop();
    r2.restart();
    assert_eq!(string(&trust(&r2)["next_key_id"]), next);
    // Finished through replica 2 once the agent (back on replica 2) trusts the new key.
    wait_until(WAIT, "the agent to acknowledge the new key", || {
        trust(&r2)["agents"][0]["up_to_date"]
            .as_bool()
            .unwrap_or(false)
            .then_some(())
    });
    let finished = r2.json(&["keys", "rotate", "finish"]);
    assert_eq!(string(&finished["active_key_id"]), next, "{finished}");
    // Replica 1 may not have heard of the finish (that signal is not what this test is about);
    // its next rotation step reloads the keys first: no rotation is under way any more, and it
    // signs with the new key.
    // A job created through replica 1 meanwhile (the agent is away, so it waits) may be signed
    // with the withdrawn key; the reload signs it again with the new one.
    wait_until(WAIT, "the agent to adopt the final bundle", || {
        trust(&r2)["agents"][0]["up_to_date"]
            .as_bool()
            .unwrap_or(false)
            .then_some(())
    });
    agent.stop();
    let deployment = r1.json(&["deploy", "after-rotation", "--env", "dev", "--no-wait"]);
    let job = string(&deployment["jobs"][0]["id"]);
    let signers = || {
        let env: stella_pki::Envelope = serde_json::from_str(&sql_string(
            &r1.db(),
            "SELECT envelope FROM jobs WHERE id = $1",
            &[&job],
        ))
        .unwrap();
        env.signatures
            .into_iter()
            .map(|s| s.keyid)
            .collect::<Vec<_>>()
    };
    eprintln!(
        "job {job} signed by {:?} before replica 1 reloaded",
        signers()
    );
    let refused = r1.fails(&["keys", "rotate", "finish"]);
    assert!(
        refused.contains("no key rotation is under way"),
        "{refused}"
    );
    let t1 = trust(&r1);
    assert_eq!(string(&t1["active_key_id"]), next, "{t1}");
    assert!(t1["next_key_id"].is_null(), "{t1}");
    assert_eq!(signers(), std::slice::from_ref(&next));
    agent.start();
    let done = r1.wait_deployment(&string(&deployment["id"]));
    assert_eq!(done["status"], "succeeded", "{done}");

    // No private key in the clear: not in the database, not in replica 2's pki directory
    // beyond its own TLS server key.
    let dump = r2.db_dump();
    assert!(dump.contains("plane_secrets"), "the dump has the table");
    assert!(
        dump.contains(&format!("v1:{kek_id}:")),
        "the dump has sealed rows"
    );
    assert!(
        !dump.contains("PRIVATE KEY"),
        "a private key in the database dump"
    );
    let pki = r2.dir.join("pki");
    assert_eq!(
        files_in(&pki),
        ["ca.pem", "quic-reset.key", "server.key", "server.pem"]
    );
    for file in ["ca.pem", "quic-reset.key", "server.pem"] {
        let text = String::from_utf8_lossy(&std::fs::read(pki.join(file)).unwrap()).into_owned();
        assert!(!text.contains("PRIVATE KEY"), "{file}");
    }
    #[cfg(unix)]
    for file in ["server.key", "quic-reset.key"] {
        assert_eq!(mode(&pki.join(file)), 0o600, "{file}");
    }

    // A replica given another key-encryption key refuses to start and says why; nothing of
    // its keys is written.
    let other = tmp.path().join("other.kek");
    let out = stella(&["keys", "generate-kek", "--out", other.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let other_id = KeyEncryptionKey::load(&other).unwrap().key_id().to_string();
    let r3 = tmp.path().join("r3");
    let err = serve_fails(
        &r3,
        &[
            "--database",
            &url,
            "--key-encryption-key-file",
            other.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains(&kek_id) && err.contains(&other_id) && err.contains("key-encryption key"),
        "{err}"
    );
    assert!(!r3.join("pki").exists(), "the refused replica wrote keys");
    // And one given none refuses too, rather than making a CA of its own.
    let err = serve_fails(&r3, &["--database", &url]);
    assert!(err.contains("--key-encryption-key-file"), "{err}");
    assert!(!r3.join("pki").exists());

    // A CA rotation started on replica 1 and finished on replica 2: replica 1 reloads (at its
    // next step at the latest), re-issues its server certificate from the new CA and rewrites
    // its ca.pem, so the CLI (which trusts pki/ca.pem only) still reaches it.
    let started = r1.json(&["ca", "rotate", "start"]);
    let new_ca = string(&started["next_ca_fingerprint"]);
    assert!(!new_ca.is_empty(), "{started}");
    let finished = r2.json(&["ca", "rotate", "finish", "--force"]);
    assert_eq!(string(&finished["ca_fingerprint"]), new_ca, "{finished}");
    let refused = r1.fails(&["ca", "rotate", "finish"]);
    assert!(refused.contains("no CA rotation is under way"), "{refused}");
    assert_eq!(string(&trust(&r1)["ca_fingerprint"]), new_ca);
    assert_eq!(
        std::fs::read_to_string(r1.dir.join("pki/ca.pem")).unwrap(),
        std::fs::read_to_string(r2.dir.join("pki/ca.pem")).unwrap()
    );
    drop(agent);
}

/// Changing the key-encryption key (a KEK file leaked, or is due): restarted with the new key
/// and the old one as `--previous-key-encryption-key-file`, the plane reseals its secrets with
/// the new key and keeps its CA and job key, so enrolled agents notice nothing; afterwards the
/// new key alone suffices and the old one is refused. Runs on whichever database the suite uses.
#[test]
fn the_key_encryption_key_is_changed_and_the_plane_keys_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let generate = |name: &str| {
        let path = tmp.path().join(name);
        let out = stella(&[
            "keys",
            "generate-kek",
            "--out",
            path.to_str().unwrap(),
            "-o",
            "json",
        ]);
        assert!(out.status.success(), "{out:?}");
        let id = string(&serde_json::from_slice::<Value>(&out.stdout).unwrap()["key_id"]);
        (path.to_str().unwrap().to_string(), id)
    };
    let ((old, old_id), (new, new_id)) = (generate("old.kek"), generate("new.kek"));

    // A key file others can read stops `stella serve` before the database is even created.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let (loose, _) = generate("loose.kek");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
        let fresh = tmp.path().join("fresh");
        let refused = serve_fails(&fresh, &["--key-encryption-key-file", &loose]);
        assert!(refused.contains("loose.kek"), "{refused}");
        assert!(!fresh.join("stella.db").exists(), "a database was created");
        let refused = serve_fails(
            &fresh,
            &[
                "--key-encryption-key-file",
                &old,
                "--previous-key-encryption-key-file",
                &loose,
            ],
        );
        assert!(refused.contains("loose.kek"), "{refused}");
        assert!(!fresh.join("stella.db").exists(), "a database was created");
    }
    let mut plane = Plane::start_with(
        &tmp.path().join("plane"),
        free_port(),
        free_port(),
        &["--key-encryption-key-file", &old],
    );
    let mut agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "kek-change");
    wait_until(WAIT, "the agent's session", || {
        (plane.metric("stella_agents_connected") == Some(1)).then_some(())
    });
    let before = trust(&plane);
    // The lowest and highest key id the rows were sealed with.
    let kek_ids = |plane: &Plane| {
        sql_string(
            &plane.db(),
            "SELECT MIN(kek_id) || ' ' || MAX(kek_id) FROM plane_secrets",
            &[],
        )
    };
    let all_sealed_with = |id: &str| format!("{id} {id}");
    assert_eq!(kek_ids(&plane), all_sealed_with(&old_id));
    agent.stop();
    plane.stop();

    // The new key alone cannot open the secrets: refused, naming both keys, nothing changed.
    let database = plane.db();
    let refused = serve_fails(
        &plane.dir,
        &["--database", &database, "--key-encryption-key-file", &new],
    );
    assert!(
        refused.contains(&old_id) && refused.contains(&new_id),
        "{refused}"
    );
    assert_eq!(kek_ids(&plane), all_sealed_with(&old_id));
    // The previous key needs a current one.
    let refused = serve_fails(
        &plane.dir,
        &[
            "--database",
            &database,
            "--previous-key-encryption-key-file",
            &old,
        ],
    );
    assert!(refused.contains("--key-encryption-key-file"), "{refused}");

    // New key, old one as previous: resealed at start, the same plane keys.
    plane.extra_args = ["--key-encryption-key-file", &new]
        .into_iter()
        .chain(["--previous-key-encryption-key-file", &old])
        .map(String::from)
        .collect();
    plane.restart();
    assert_eq!(kek_ids(&plane), all_sealed_with(&new_id));
    let after = trust(&plane);
    assert_eq!(after["ca_fingerprint"], before["ca_fingerprint"]);
    assert_eq!(after["active_key_id"], before["active_key_id"]);
    agent.start();
    wait_until(WAIT, "the agent's session after the change", || {
        (plane.metric("stella_agents_connected") == Some(1)).then_some(())
    });
    plane.stop();

    // Done: the new key alone starts the plane; the old one is refused.
    let refused = serve_fails(
        &plane.dir,
        &["--database", &database, "--key-encryption-key-file", &old],
    );
    assert!(
        refused.contains(&old_id) && refused.contains(&new_id),
        "{refused}"
    );
    plane.extra_args = vec!["--key-encryption-key-file".to_string(), new.clone()];
    plane.restart();
    assert_eq!(
        trust(&plane)["ca_fingerprint"],
        before["ca_fingerprint"],
        "the same CA"
    );
    wait_until(WAIT, "the agent's session with the new key alone", || {
        (plane.metric("stella_agents_connected") == Some(1)).then_some(())
    });
    let dump = plane.db_dump();
    assert!(
        !dump.contains(&format!("v1:{old_id}:")),
        "a row still sealed with the old key"
    );
}
