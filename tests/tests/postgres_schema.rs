//! The PostgreSQL schema (`migrations/postgres/`) is the SQLite schema (`migrations/sqlite/`):
//! both migration sets applied to real databases, then every table's columns, types and
//! nullability, and every index, compared. A migration added to one folder and not the other,
//! or written differently, fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sqlx::Row;
use stella_e2e::postgres::PgCluster;

fn migrations(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    files
}

fn names(files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// table -> column -> (type, not null)
type Columns = BTreeMap<String, BTreeMap<String, (String, bool)>>;

fn sqlite_schema() -> (Columns, BTreeSet<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", tmp.path().join("s.db").display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        for file in migrations("sqlite") {
            let sql = std::fs::read_to_string(&file).unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut columns = Columns::new();
        for table in tables {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info({table})")))
                .fetch_all(&pool)
                .await
                .unwrap();
            let cols = columns.entry(table).or_default();
            for row in rows {
                let name: String = row.get("name");
                let ty: String = row.get("type");
                let notnull: i64 = row.get("notnull");
                let pk: i64 = row.get("pk");
                // SQLite lets a non-integer primary key be NULL; PostgreSQL makes it NOT NULL.
                // Both refuse NULL in practice because every insert names the key.
                cols.insert(name, (ty.to_lowercase(), notnull == 1 || pk > 0));
            }
        }
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        (columns, indexes.into_iter().collect())
    })
}

fn postgres_schema(pg: &PgCluster) -> (Columns, BTreeSet<String>) {
    let out = pg
        .psql(
            "stella",
            "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns \
             WHERE table_schema = 'public' ORDER BY table_name, column_name",
        )
        .unwrap();
    let mut columns = Columns::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 4, "{line}");
        columns
            .entry(f[0].to_string())
            .or_default()
            .insert(f[1].to_string(), (f[2].to_string(), f[3] == "NO"));
    }
    let out = pg
        .psql(
            "stella",
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' \
             AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'",
        )
        .unwrap();
    let indexes = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    (columns, indexes)
}

#[test]
fn the_postgres_schema_matches_the_sqlite_schema() {
    let sqlite_files = migrations("sqlite");
    let pg_files = migrations("postgres");
    assert_eq!(
        names(&sqlite_files),
        names(&pg_files),
        "every migration exists for both databases, under the same name"
    );

    let pg = PgCluster::start();
    pg.create_database("stella");
    for file in &pg_files {
        pg.psql_file("stella", file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }

    let (sqlite_columns, sqlite_indexes) = sqlite_schema();
    let (pg_columns, pg_indexes) = postgres_schema(&pg);
    assert_eq!(
        sqlite_columns.keys().collect::<Vec<_>>(),
        pg_columns.keys().collect::<Vec<_>>(),
        "the same tables"
    );
    for (table, cols) in &sqlite_columns {
        let pg_cols = &pg_columns[table];
        assert_eq!(
            cols.keys().collect::<Vec<_>>(),
            pg_cols.keys().collect::<Vec<_>>(),
            "the same columns in {table}"
        );
        for (column, (ty, not_null)) in cols {
            let (pg_ty, pg_not_null) = &pg_cols[column];
            assert_eq!(ty, pg_ty, "type of {table}.{column}");
            assert_eq!(not_null, pg_not_null, "nullability of {table}.{column}");
        }
    }
    assert_eq!(sqlite_indexes, pg_indexes, "the same indexes");
    eprintln!(
        "{} migrations, {} tables, {} indexes identical on SQLite and PostgreSQL",
        pg_files.len(),
        pg_columns.len(),
        pg_indexes.len()
    );
}

#[test]
fn postgres_refuses_to_change_or_remove_evidence() {
    let pg = PgCluster::start();
    pg.create_database("stella");
    for file in migrations("postgres") {
        pg.psql_file("stella", &file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
    pg.psql(
        "stella",
        "INSERT INTO evidence_packets (sequence, id, digest, kind, envelope, recorded_at) \
         VALUES (1, 'ev_1', 'sha256:00', 'deployment', '{}', 0)",
    )
    .unwrap();
    for (sql, word) in [
        ("UPDATE evidence_packets SET kind = 'x'", "changed"),
        ("DELETE FROM evidence_packets", "deleted"),
        ("TRUNCATE evidence_packets", "deleted"),
    ] {
        let err = pg.psql("stella", sql).unwrap_err();
        assert!(
            err.contains("evidence is append-only") && err.contains(word),
            "{sql}: {err}"
        );
    }
    assert_eq!(
        pg.psql("stella", "SELECT kind FROM evidence_packets")
            .unwrap()
            .trim(),
        "deployment"
    );
}
