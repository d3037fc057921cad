//! The plane's store layer on both backends: the same migrations, queries and write-transaction
//! rule on SQLite and on a throwaway PostgreSQL cluster.

use std::time::Duration;

use stella_control_plane::store::{self, Backend, DatabaseUrl};
use stella_e2e::PG_DATABASE;
use stella_e2e::postgres::PgCluster;

/// Runs `check` on a fresh SQLite file and a fresh PostgreSQL database.
fn on_both(check: impl AsyncFn(store::Db, DatabaseUrl)) {
    let tmp = tempfile::tempdir().unwrap();
    let pg = PgCluster::start();
    pg.create_database(PG_DATABASE);
    let urls = [
        DatabaseUrl::sqlite_file(&tmp.path().join("stella.db")).unwrap(),
        DatabaseUrl::parse(&pg.url(PG_DATABASE)).unwrap(),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    for url in urls {
        rt.block_on(async {
            let db = store::open(&url, true).await.unwrap();
            assert_eq!(store::Backend::of(&db), url.backend());
            check(db.clone(), url).await;
            db.close().await;
        });
    }
}

#[test]
fn migrations_apply_once_on_both() {
    on_both(async |db, url| {
        // open() applied everything; a second run applies nothing.
        assert_eq!(store::migrate(&db, &url).await.unwrap(), Vec::new());
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(&db)
            .await
            .unwrap();
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/sqlite"))
            .unwrap()
            .count();
        assert_eq!(n, files as i64, "{url}");
    });
}

#[test]
fn the_same_queries_read_the_same_values_on_both() {
    on_both(async |db, url| {
        sqlx::query(
            "INSERT INTO environments (id, name, created_at, required_approvals,
                 separation_of_duties, settings, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $3)",
        )
        .bind("env_1")
        .bind("dev")
        .bind(1_700_000_000_000_i64)
        .bind(2_i64)
        .bind(1_i64)
        .bind("{}")
        .execute(&db)
        .await
        .unwrap();
        // The same placeholder twice, NULL-tolerant filters, CASE for booleans, COUNT as BIGINT.
        let row: (String, i64, i64, i64) = sqlx::query_as(
            "SELECT name, separation_of_duties, created_at,
                 CASE WHEN EXISTS (SELECT 1 FROM environments WHERE id = $1) THEN 1 ELSE 0 END
             FROM environments WHERE ($2 IS NULL OR name = $2) AND id = $1",
        )
        .bind("env_1")
        .bind(None::<String>)
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(row, ("dev".into(), 1, 1_700_000_000_000, 1), "{url}");
        let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM environments")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(count, 1, "{url}");
        // Multi-row statements number their own placeholders.
        let sql = format!(
            "INSERT INTO audit_log (id, at, actor, role, method, path, status, client_ip) VALUES {}",
            store::values_placeholders(2, 8)
        );
        let mut insert = sqlx::query(sqlx::AssertSqlSafe(sql));
        for id in ["a1", "a2"] {
            insert = insert
                .bind(id)
                .bind(1_i64)
                .bind("admin")
                .bind("admin")
                .bind("POST")
                .bind("/x")
                .bind(200_i64)
                .bind("127.0.0.1");
        }
        assert_eq!(insert.execute(&db).await.unwrap().rows_affected(), 2);
    });
}

#[test]
fn write_transactions_run_one_at_a_time_on_both() {
    on_both(async |db, url| {
        let first = store::write_tx(&db).await.unwrap();
        // While the first is open, a second waits (SQLite: the write lock; PostgreSQL: the
        // advisory lock). A bounded wait shows it is blocked, not merely slow to start.
        let blocked = tokio::time::timeout(Duration::from_millis(500), store::write_tx(&db)).await;
        assert!(
            blocked.is_err(),
            "{url}: a second write transaction started"
        );
        first.commit().await.unwrap();
        let second = tokio::time::timeout(Duration::from_secs(10), store::write_tx(&db))
            .await
            .unwrap_or_else(|_| panic!("{url}: still blocked after the first committed"))
            .unwrap();
        second.rollback().await.unwrap();
        if url.backend() == Backend::Postgres {
            // The lock belongs to the transaction: dropping it (a rollback) releases it too.
            let tx = store::write_tx(&db).await.unwrap();
            drop(tx);
            let again = tokio::time::timeout(Duration::from_secs(10), store::write_tx(&db))
                .await
                .expect("the lock is released with the transaction");
            again.unwrap().rollback().await.unwrap();
        }
    });
}
