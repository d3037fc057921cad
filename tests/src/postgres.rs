//! A throwaway PostgreSQL cluster from the machine's binaries: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, `pg_ctl stop -m immediate` on drop. The
//! server refuses to run as root, so as root the cluster is created and run as the `postgres`
//! user (`runuser`); as any other user it runs as that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::free_port;

pub struct PgCluster {
    // Kept for its Drop: the data directory goes away with the cluster.
    _dir: tempfile::TempDir,
    data: PathBuf,
    socket_dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

/// The newest installed PostgreSQL's `bin` directory (`STELLA_PG_BIN` overrides).
pub fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("STELLA_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists());
    versions.sort();
    versions.pop().expect(
        "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin: install postgresql \
         (the CI script does) or point STELLA_PG_BIN at a bin directory",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a server binary as the user the server accepts.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl PgCluster {
    pub fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("stella-pg-")
            .tempdir()
            .expect("tempdir");
        if is_root() {
            check(
                "chown postgres",
                Command::new("chown")
                    .args(["-R", "postgres"])
                    .arg(dir.path())
                    .output(),
            );
        }
        let data = dir.path().join("data");
        let socket_dir = dir.path().to_path_buf();
        check(
            "initdb",
            as_server_user(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ])
                .output(),
        );
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            socket_dir.display()
        );
        check(
            "pg_ctl start",
            as_server_user(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("log"))
                .args(["-o", &options, "-w", "start"])
                .output(),
        );
        PgCluster {
            _dir: dir,
            data,
            socket_dir,
            bin,
            port,
        }
    }

    /// A connection URL for `database` (as the `postgres` superuser, trust auth on loopback).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    }

    /// Schema and data of `database` as SQL text (`pg_dump`).
    pub fn dump(&self, database: &str) -> String {
        let out = check(
            "pg_dump",
            Command::new(self.bin.join("pg_dump"))
                .args(["-U", "postgres", "-h"])
                .arg(&self.socket_dir)
                .args(["-p", &self.port.to_string(), database])
                .output(),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `sql` with `psql` (stop at the first error, unaligned tuples-only output): the
    /// output, or psql's error text.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        self.psql_args(database, &["-c", sql])
    }

    /// Runs a file of SQL in one transaction.
    pub fn psql_file(&self, database: &str, file: &Path) -> Result<String, String> {
        let file = file.to_str().expect("utf-8 path");
        self.psql_args(database, &["-1", "-f", file])
    }

    fn psql_args(&self, database: &str, args: &[&str]) -> Result<String, String> {
        let psql = if self.bin.join("psql").exists() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
            ])
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-d", database])
            .args(args)
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_server_user(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
