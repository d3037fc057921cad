//! The database handle, on SQLite or PostgreSQL behind one type.
//!
//! SQLite is the embedded default (one file in the data directory, nothing to install);
//! PostgreSQL is the production store. Both are reached through sqlx's `Any` driver, and every
//! query is written once with numbered `$N` placeholders, which both databases bind by number.
//! The schema lives in `migrations/sqlite/` and `migrations/postgres/` (the same tables, file
//! for file).

use std::path::Path;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, ConnectOptions, Executor};

pub type Db = AnyPool;
pub type Tx = sqlx::Transaction<'static, Any>;
pub type Conn = sqlx::AnyConnection;
pub type Row = sqlx::any::AnyRow;

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Connections to PostgreSQL per plane: the group-commit writer, sessions' reads and the API.
const POSTGRES_CONNECTIONS: u32 = 16;
/// How long opening the database may take before the plane gives up with an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Key of the transaction-scoped advisory lock every PostgreSQL write transaction takes first
/// (see [`write_tx`]). Any constant works; this one spells "stella" in ASCII.
const WRITE_LOCK_KEY: i64 = 0x7374_656c_6c61;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL {url}: {reason}")]
    Url { url: String, reason: String },
    // The driver's error is part of the message and deliberately not a `source`: its Display
    // already includes its own causes, and `{:#}` would print them a second time.
    #[error("cannot open database {url}: {cause}")]
    Open { url: String, cause: sqlx::Error },
    #[error("cannot apply migrations to {url}: {cause}")]
    Migrate {
        url: String,
        cause: sqlx::migrate::MigrateError,
    },
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of(db: &Db) -> Backend {
        match db.connect_options().database_url.scheme() {
            "postgres" | "postgresql" => Backend::Postgres,
            _ => Backend::Sqlite,
        }
    }

    pub fn of_conn(conn: &sqlx::AnyConnection) -> Backend {
        if conn.backend_name().eq_ignore_ascii_case("postgresql") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// The row-claim clause of a `SELECT` that replicas compete on: PostgreSQL skips rows
    /// another transaction holds; SQLite has one writer and no row locks.
    pub fn skip_locked(self) -> &'static str {
        match self {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        }
    }

    fn migrator(self) -> &'static sqlx::migrate::Migrator {
        match self {
            Backend::Sqlite => &SQLITE_MIGRATOR,
            Backend::Postgres => &POSTGRES_MIGRATOR,
        }
    }
}

/// A database URL as given by the operator (`--database`, `STELLA_DATABASE_URL`), checked.
#[derive(Clone)]
pub struct DatabaseUrl {
    url: url::Url,
    backend: Backend,
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> Result<Self, StoreError> {
        let err = |reason: String| StoreError::Url {
            url: redact(raw),
            reason,
        };
        let url = url::Url::parse(raw).map_err(|e| err(e.to_string()))?;
        let backend = match url.scheme() {
            "postgres" | "postgresql" => Backend::Postgres,
            "sqlite" => Backend::Sqlite,
            other => {
                return Err(err(format!(
                    "unsupported scheme {other:?}: use postgres://user:password@host:port/database \
                     or sqlite:///path/to/stella.db"
                )));
            }
        };
        if backend == Backend::Postgres && url.host_str().is_none_or(str::is_empty) {
            return Err(err(
                "no host: use postgres://user:password@host:port/database".into(),
            ));
        }
        let mut url = url;
        if backend == Backend::Sqlite {
            if url.path().is_empty() && url.host_str().is_none_or(str::is_empty) {
                return Err(err("no file path: use sqlite:///path/to/stella.db".into()));
            }
            // Like the default database, a new file is created rather than refused.
            if !url.query_pairs().any(|(k, _)| k == "mode") {
                url.query_pairs_mut().append_pair("mode", "rwc");
            }
        }
        Ok(Self { url, backend })
    }

    /// The SQLite file at `path`, created if missing.
    pub fn sqlite_file(path: &Path) -> Result<Self, StoreError> {
        let err = |reason: String| StoreError::Url {
            url: path.display().to_string(),
            reason,
        };
        // A relative path would become absolute (`sqlite:///relative`) in a URL.
        let path = std::path::absolute(path).map_err(|e| err(e.to_string()))?;
        let mut url = url::Url::parse("sqlite://").map_err(|e| err(e.to_string()))?;
        url.set_path(&path.to_string_lossy());
        url.query_pairs_mut().append_pair("mode", "rwc");
        Ok(Self {
            url,
            backend: Backend::Sqlite,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL with its password replaced: safe to print and log.
    pub fn redacted(&self) -> String {
        redact(self.url.as_str())
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a URL (and a `password=` query parameter) with `***`. A string that
/// does not parse is not echoed at all: it may be a password pasted in the wrong place.
pub fn redact(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return "<unparsable URL>".to_string();
    };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k.eq_ignore_ascii_case("password") {
                "***".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if pairs
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// Opens the database; with `migrate`, applies pending migrations first (see [`migrate`]).
pub async fn open(url: &DatabaseUrl, migrate: bool) -> Result<Db, StoreError> {
    let db = connect(url).await?;
    if migrate {
        self::migrate(&db, url).await?;
    }
    Ok(db)
}

/// Opens (creating if needed) the SQLite database at `path` and applies pending migrations.
pub async fn open_sqlite(path: &Path) -> Result<Db, StoreError> {
    open(&DatabaseUrl::sqlite_file(path)?, true).await
}

async fn connect(url: &DatabaseUrl) -> Result<Db, StoreError> {
    sqlx::any::install_default_drivers();
    let open_err = |cause| StoreError::Open {
        url: url.redacted(),
        cause,
    };
    let options = AnyConnectOptions::from_url(&url.url).map_err(open_err)?;
    let pool = match url.backend {
        Backend::Sqlite => {
            AnyPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(CONNECT_TIMEOUT)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // WAL lets readers (API, metrics) proceed while a writer commits; FULL
                        // sync because the plane acknowledges results only after they are
                        // durable. Set per connection: the Any driver takes only a URL.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                        )
                        .await?;
                        Ok(())
                    })
                })
                .connect_with(options)
                .await
        }
        Backend::Postgres => {
            // One direct attempt first: an unreachable server or a refused login is reported
            // at once, where the pool would retry until its acquire timeout.
            let probe = <sqlx::AnyConnection as sqlx::Connection>::connect_with(&options)
                .await
                .map_err(open_err)?;
            let _ = sqlx::Connection::close(probe).await;
            AnyPoolOptions::new()
                .max_connections(POSTGRES_CONNECTIONS)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_with(options)
                .await
        }
    }
    .map_err(open_err)?;
    Ok(pool)
}

/// Applies the pending migrations of the database's backend; returns the versions and
/// descriptions applied now (empty when the schema was already current).
pub async fn migrate(db: &Db, url: &DatabaseUrl) -> Result<Vec<(i64, String)>, StoreError> {
    let migrator = Backend::of(db).migrator();
    let migrate_err = |cause| StoreError::Migrate {
        url: url.redacted(),
        cause,
    };
    let before = applied_versions(db).await;
    migrator.run(db).await.map_err(migrate_err)?;
    Ok(migrator
        .iter()
        .filter(|m| !before.contains(&m.version))
        .map(|m| (m.version, m.description.to_string()))
        .collect())
}

/// Versions recorded as applied; none when the migrations table does not exist yet.
async fn applied_versions(db: &Db) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(db)
        .await
        .unwrap_or_default()
}

pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn new_id(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..20])
}

/// RFC 3339 rendering of a unix-ms timestamp, for API bodies.
pub fn rfc3339(ms: i64) -> String {
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    ts.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// ` FOR UPDATE SKIP LOCKED` on PostgreSQL, nothing on SQLite (see `Backend::skip_locked`).
pub fn skip_locked(conn: &sqlx::AnyConnection) -> &'static str {
    Backend::of_conn(conn).skip_locked()
}

/// Starts a write transaction; write transactions run one at a time, on both backends.
///
/// SQLite: `BEGIN IMMEDIATE` takes the write lock up front: a deferred transaction that reads
/// first and writes later fails at once with "database is locked" when another writer committed
/// in between (SQLite cannot upgrade a stale read snapshot), whereas an immediate one waits for
/// the busy timeout like any other writer.
///
/// PostgreSQL: a plain `BEGIN` would let two write transactions read the same row and both act
/// on it (read committed), which the code written for SQLite's single writer does not expect
/// (sequence allocation, first-result-wins, token use counts). A transaction-scoped advisory
/// lock taken first gives the same one-writer-at-a-time guarantee, across every plane sharing
/// the database, and is released by commit or rollback (also when a connection dies).
/// Single statements outside these transactions stay concurrent.
pub async fn write_tx(db: &Db) -> Result<Tx, sqlx::Error> {
    match Backend::of(db) {
        Backend::Sqlite => db.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => {
            let mut tx = db.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(WRITE_LOCK_KEY)
                .execute(&mut *tx)
                .await?;
            Ok(tx)
        }
    }
}

/// `($1, $2, ...), (...)` for `rows` rows of `columns` values each: the VALUES list of a
/// multi-row insert. sqlx's `QueryBuilder` writes `?` for the Any driver, which PostgreSQL does
/// not accept, so multi-row statements number their placeholders here.
pub fn values_placeholders(rows: usize, columns: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..columns {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(r * columns + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

/// `$first, $first+1, ...`: `n` numbered placeholders for an `IN (...)` list.
pub fn list_placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://stella:s3cret@db.example:5432/stella"),
            "postgres://stella:***@db.example:5432/stella"
        );
        assert_eq!(
            redact("postgres://db.example/stella?user=stella&password=s3cret&sslmode=require"),
            "postgres://db.example/stella?user=stella&password=***&sslmode=require"
        );
        assert_eq!(redact("s3cret not a url"), "<unparsable URL>");
        let url = DatabaseUrl::parse("postgres://u:pw@h/d").unwrap();
        assert!(!format!("{url} {url:?}").contains("pw"));
    }

    #[test]
    fn bad_urls_are_refused_clearly() {
        let e = DatabaseUrl::parse("mysql://u:pw@h/d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported scheme \"mysql\""), "{e}");
        assert!(!e.contains("pw"), "{e}");
        let e = DatabaseUrl::parse("postgres:///d").unwrap_err().to_string();
        assert!(e.contains("no host"), "{e}");
        let e = DatabaseUrl::parse("not a url").unwrap_err().to_string();
        assert!(e.contains("invalid database URL"), "{e}");
    }

    #[test]
    fn placeholders_are_numbered() {
        assert_eq!(values_placeholders(2, 2), "($1, $2), ($3, $4)");
        assert_eq!(list_placeholders(3, 2), "$3, $4");
    }
}
