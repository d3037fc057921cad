//! Harness for end-to-end tests: starts the real `stella` and `stella-agent` binaries as
//! processes on free loopback ports, drives them through the CLI, and builds tiny images on the
//! machine's Docker Engine (no registry can be reached, so images are imported from a rootfs
//! holding the static busybox binary).
//!
//! The binaries must be built first (`cargo build --bins`); the README's test command does that.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod postgres;
pub mod relay;
mod transport;
pub use transport::{LinkProxy, TcpProxy, Transport, UdpProxy, free_udp_port};

pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps; the binaries one level up.
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    let dir = deps.parent().expect("profile dir").to_path_buf();
    for b in ["stella", "stella-agent"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: run `cargo build --bins` before the end-to-end tests",
            dir.join(b).display()
        );
    }
    dir
}

pub fn stella_bin() -> PathBuf {
    bin_dir().join("stella")
}

pub fn agent_bin() -> PathBuf {
    bin_dir().join("stella-agent")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{:08x}", rand::random::<u32>())
}

/// Polls `probe` until it returns Some, failing the test after `timeout`. Used where the thing
/// awaited lives in another process and offers no event to wait on.
pub fn wait_until<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned, with a valid signal number.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

fn stop_child(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}

pub struct Plane {
    pub dir: PathBuf,
    pub api_port: u16,
    pub agent_port: u16,
    /// UDP port of the QUIC agent endpoint (every plane listens on both transports).
    pub quic_port: u16,
    /// The transport enrolled agents are handed (the test's, when the plane started).
    pub transport: Transport,
    /// Extra `stella serve` flags (e.g. short certificate lifetimes).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    /// The plane's own PostgreSQL cluster when the suite runs on PostgreSQL
    /// (`STELLA_E2E_DATABASE=postgres`); it lives as long as the plane, across restarts.
    /// Declared after `child`, so the plane process stops before its database. Shared by the
    /// replicas of one database (`start_replica`).
    pg: Option<std::sync::Arc<postgres::PgCluster>>,
}

/// Which database the end-to-end planes use: `STELLA_E2E_DATABASE=postgres` runs the suite on
/// PostgreSQL (a throwaway cluster per plane), anything else (the default) on SQLite.
pub fn e2e_on_postgres() -> bool {
    std::env::var("STELLA_E2E_DATABASE").is_ok_and(|v| v.eq_ignore_ascii_case("postgres"))
}

/// The database name the harness creates for a plane on PostgreSQL.
pub const PG_DATABASE: &str = "stella";

impl Plane {
    pub fn start(dir: &Path) -> Plane {
        Self::start_on(dir, free_port(), free_port())
    }

    pub fn start_on(dir: &Path, api_port: u16, agent_port: u16) -> Plane {
        Self::start_with(dir, api_port, agent_port, &[])
    }

    pub fn start_with(dir: &Path, api_port: u16, agent_port: u16, extra: &[&str]) -> Plane {
        let pg = e2e_on_postgres().then(|| {
            let cluster = postgres::PgCluster::start();
            cluster.create_database(PG_DATABASE);
            std::sync::Arc::new(cluster)
        });
        Self::start_with_database(dir, api_port, agent_port, extra, pg)
    }

    /// Starts a plane on PostgreSQL in `cluster` (database [`PG_DATABASE`], which must exist),
    /// whatever `STELLA_E2E_DATABASE` says.
    pub fn start_on_postgres(dir: &Path, cluster: postgres::PgCluster) -> Plane {
        Self::start_with_database(
            dir,
            free_port(),
            free_port(),
            &[],
            Some(std::sync::Arc::new(cluster)),
        )
    }

    /// Starts one replica of a plane whose database ([`PG_DATABASE`] in `cluster`) other
    /// replicas share; each replica has its own data directory and ports.
    pub fn start_replica(
        dir: &Path,
        cluster: std::sync::Arc<postgres::PgCluster>,
        api_port: u16,
        agent_port: u16,
        extra: &[&str],
    ) -> Plane {
        Self::start_with_database(dir, api_port, agent_port, extra, Some(cluster))
    }

    fn start_with_database(
        dir: &Path,
        api_port: u16,
        agent_port: u16,
        extra: &[&str],
        pg: Option<std::sync::Arc<postgres::PgCluster>>,
    ) -> Plane {
        let mut plane = Plane {
            dir: dir.to_path_buf(),
            api_port,
            agent_port,
            quic_port: free_udp_port(),
            transport: Transport::current(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
            pg,
        };
        plane.restart();
        plane
    }

    /// Starts the plane process (again) on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "plane already running");
        let _ = std::fs::remove_file(self.dir.join("api.url"));
        let child = Command::new(stella_bin())
            .args(["--data-dir", &self.dir.display().to_string(), "serve"])
            .args(["--api-listen", &format!("127.0.0.1:{}", self.api_port)])
            .args(["--agent-listen", &format!("127.0.0.1:{}", self.agent_port)])
            .args(["--heartbeat-interval", "1s"])
            .args(["--quic-listen", &format!("127.0.0.1:{}", self.quic_port)])
            .args((self.transport == Transport::Quic).then_some("--advertise-quic"))
            .args(
                self.pg
                    .as_ref()
                    .map(|pg| ["--database".to_string(), pg.url(PG_DATABASE)])
                    .into_iter()
                    .flatten(),
            )
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start stella serve");
        self.child = Some(child);
        let url_file = self.dir.join("api.url");
        wait_until(
            Duration::from_secs(30),
            "the plane to write api.url",
            || url_file.exists().then_some(()),
        );
        wait_until(Duration::from_secs(30), "the plane API to answer", || {
            self.cli(&["env", "list"]).status.success().then_some(())
        });
    }

    /// One HTTPS request to the API with the admin token (`token: None`) or another;
    /// returns status and body.
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let ca = std::fs::read_to_string(self.dir.join("pki/ca.pem")).expect("ca.pem");
        let token = token
            .map(str::to_string)
            .unwrap_or_else(|| self.admin_token());
        let url = format!("{}{path}", self.api_url());
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        rt.block_on(async {
            stella_pki::install_crypto_provider();
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(stella_pki::client_config_ca(&ca).expect("tls"))
                .build()
                .expect("client");
            let mut req = client.request(method, &url).bearer_auth(&token);
            if let Some(body) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(body.to_string());
            }
            let resp = req.send().await.expect("request");
            (resp.status().as_u16(), resp.text().await.expect("body"))
        })
    }

    /// The agent endpoint URL of this plane's transport.
    pub fn agent_endpoint(&self) -> String {
        match self.transport {
            Transport::Grpc => format!("https://127.0.0.1:{}", self.agent_port),
            Transport::Quic => format!("quic://127.0.0.1:{}", self.quic_port),
        }
    }

    /// The address agents dial on this plane's transport (TCP or UDP port).
    pub fn agent_addr(&self) -> std::net::SocketAddr {
        let port = match self.transport {
            Transport::Grpc => self.agent_port,
            Transport::Quic => self.quic_port,
        };
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// SIGSTOP: the process holds its sockets but answers nothing (a black hole to its peers).
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGSTOP);
        }
    }

    /// SIGCONT after [`Plane::pause`].
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child, libc::SIGCONT);
        }
    }

    /// One sample of `/metrics` (an unlabelled metric).
    pub fn metric(&self, name: &str) -> Option<u64> {
        self.metrics().lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok())?
        })
    }

    /// SIGKILL: the plane gets no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(stop_child).inspect(|_| {
            self.child = None;
        })
    }

    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(stella_bin())
            .arg("--data-dir")
            .arg(&self.dir)
            .args(args)
            .env_remove("STELLA_SERVER")
            .env_remove("STELLA_TOKEN")
            .env_remove("STELLA_CA_FILE")
            .stdin(Stdio::null())
            .output()
            .expect("run stella")
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "stella {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a CLI command that must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "stella {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = args.to_vec();
        full.extend(["--output", "json"]);
        let stdout = self.ok(&full);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("stella {args:?}: not JSON ({e}): {stdout}"))
    }

    /// Creates a join token and returns (token, ca fingerprint).
    pub fn join_token(&self) -> (String, String) {
        let v = self.json(&["token", "create", "--ttl", "10m"]);
        (
            v["token"].as_str().expect("token").to_string(),
            v["ca_fingerprint"]
                .as_str()
                .expect("fingerprint")
                .to_string(),
        )
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string()
    }

    /// Waits (up to a minute) until the plane reports the agent in `status`.
    pub fn wait_agent(&self, agent_id: &str, status: &str) {
        wait_until(
            Duration::from_secs(60),
            &format!("agent {agent_id} to be {status}"),
            || (self.agent_status(agent_id) == status).then_some(()),
        );
    }

    pub fn agent_status(&self, agent_id: &str) -> String {
        let v = self.json(&["agents", "show", agent_id]);
        v["status"].as_str().unwrap_or_default().to_string()
    }

    /// Follows a deployment until it leaves `running`.
    pub fn wait_deployment(&self, id: &str) -> Value {
        wait_until(Duration::from_secs(120), "the deployment to finish", || {
            let v = self.json(&["deployments", "show", id]);
            (v["status"] != "running").then_some(v)
        })
    }

    /// GET /metrics over HTTPS, trusting only the plane's CA.
    pub fn metrics(&self) -> String {
        let ca = std::fs::read_to_string(self.dir.join("pki/ca.pem")).expect("ca.pem");
        let url = format!("{}/metrics", self.api_url());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = https_client(&ca);
        rt.block_on(async {
            let resp = client.get(&url).send().await.expect("GET /metrics");
            assert!(resp.status().is_success(), "/metrics: {}", resp.status());
            resp.text().await.expect("metrics body")
        })
    }

    /// Writes `yaml` to `dir/NAME.yaml` and sets it as environment `dev`'s workflow.
    pub fn set_workflow(&self, dir: &Path, name: &str, yaml: &str) {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml).expect("write the workflow");
        self.ok(&[
            "env",
            "set",
            "dev",
            "--workflow",
            &file.display().to_string(),
        ]);
    }

    /// Subscribes to `/api/v1/events?QUERY` (server-sent events) as admin; what arrives is
    /// collected in the background until the returned stream is dropped.
    pub fn events(&self, query: &str) -> EventStream {
        let ca = std::fs::read_to_string(self.dir.join("pki/ca.pem")).expect("ca.pem");
        let url = format!("{}/api/v1/events?{query}", self.api_url());
        let token = self.admin_token();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let sink = seen.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let client = https_client(&ca);
            rt.block_on(async move {
                let mut resp = client
                    .get(&url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("GET /api/v1/events");
                let _ = ready_tx.send(resp.status().as_u16());
                let reading = async {
                    while let Ok(Some(chunk)) = resp.chunk().await {
                        sink.lock()
                            .expect("events")
                            .push_str(&String::from_utf8_lossy(&chunk));
                    }
                };
                tokio::select! {
                    _ = reading => {}
                    _ = stopped => {}
                }
            });
        });
        let status = ready
            .recv_timeout(Duration::from_secs(30))
            .expect("the event stream to answer");
        assert_eq!(status, 200, "GET /api/v1/events?{query}");
        EventStream { seen, _stop: stop }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join("stella.db")
    }

    /// The URL of the plane's database (SQLite file or PostgreSQL), for [`sql_exec`] and friends.
    pub fn db(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url(PG_DATABASE),
            None => sqlite_url(&self.db_path()),
        }
    }

    /// The plane's PostgreSQL cluster, when it runs on one.
    pub fn postgres(&self) -> Option<&postgres::PgCluster> {
        self.pg.as_deref()
    }

    /// Everything the plane's database holds, as text: the SQLite file, or a `pg_dump`.
    pub fn db_dump(&self) -> String {
        match &self.pg {
            Some(pg) => pg.dump(PG_DATABASE),
            None => {
                String::from_utf8_lossy(&std::fs::read(self.db_path()).expect("read the database"))
                    .into_owned()
            }
        }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Server-sent events collected in the background ([`Plane::events`]); dropping it closes the
/// stream.
pub struct EventStream {
    seen: std::sync::Arc<std::sync::Mutex<String>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl EventStream {
    /// Everything received so far, as the raw `text/event-stream` body.
    pub fn text(&self) -> String {
        self.seen.lock().expect("events").clone()
    }
}

pub struct Agent {
    pub dir: PathBuf,
    pub id: String,
    /// Executors the agent is started without (`stella-agent run --disable KIND`).
    pub disabled: Vec<String>,
    /// Extra `stella-agent run` flags (e.g. `--inventory-interval 2s`).
    pub run_args: Vec<String>,
    child: Option<Child>,
}

pub fn enroll_cmd(
    agent_dir: &Path,
    server: &str,
    token: &str,
    fingerprint: &str,
    name: &str,
) -> Output {
    Command::new(agent_bin())
        .args([
            "enroll",
            "--server",
            server,
            "--token",
            token,
            "--ca-fingerprint",
            fingerprint,
        ])
        .arg("--data-dir")
        .arg(agent_dir)
        .args(["--name", name])
        .env_remove("STELLA_SERVER")
        .stdin(Stdio::null())
        .output()
        .expect("run stella-agent enroll")
}

impl Agent {
    /// Enrolls a new agent with a fresh join token and starts it.
    pub fn enroll_and_start(plane: &Plane, dir: &Path, name: &str) -> Agent {
        let mut agent = Self::enroll(plane, dir, name);
        agent.start();
        plane.wait_agent(&agent.id, "connected");
        agent
    }

    /// Enrolls a new agent with a fresh join token without starting it.
    pub fn enroll(plane: &Plane, dir: &Path, name: &str) -> Agent {
        let (token, fp) = plane.join_token();
        let out = enroll_cmd(dir, &plane.api_url(), &token, &fp, name);
        assert!(
            out.status.success(),
            "enroll failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("agent.json")).expect("agent.json"))
                .expect("agent.json is JSON");
        Agent {
            dir: dir.to_path_buf(),
            id: config["agent_id"].as_str().expect("agent id").to_string(),
            disabled: Vec::new(),
            run_args: Vec::new(),
            child: None,
        }
    }

    /// The agent's log (stderr of every run, appended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Sessions this agent established so far (from its log).
    pub fn sessions_established(&self) -> usize {
        self.log().matches("session established").count()
    }

    /// Points the agent at another endpoint URL (e.g. a proxy); takes effect at its next start.
    pub fn set_endpoint(&self, url: &str) {
        let path = self.dir.join("agent.json");
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("agent.json")).expect("json");
        config["agent_endpoint"] = Value::String(url.to_string());
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json"))
            .expect("write agent.json");
    }

    /// The running process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process started last is still alive (it was never restarted or lost).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL: the agent gets no chance to finish its job or flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent.log");
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(self.disabled.iter().flat_map(|d| ["--disable", d.as_str()]))
            .args(&self.run_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start stella-agent");
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of agent {} log ---", self.id);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A tiny image on the local engine, removed when dropped.
pub struct TestImage {
    pub repo: String,
    pub tag: String,
    pub id: String,
}

impl TestImage {
    /// `docker import` of a rootfs holding the static busybox binary and a marker file that makes
    /// the image unique; `cmd` is its CMD as JSON array items.
    pub fn build(repo: &str, tag: &str, cmd: &[&str]) -> TestImage {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("rootfs");
        std::fs::create_dir_all(root.join("bin")).expect("rootfs");
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("/bin/busybox is needed (Debian busybox-static)");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).expect("symlink");
        std::fs::write(root.join("marker"), unique("image-")).expect("marker");
        let tar = tmp.path().join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar");
        assert!(status.success(), "tar failed");
        let cmd_json = serde_json::to_string(cmd).expect("cmd json");
        let reference = format!("{repo}:{tag}");
        let out = Command::new("docker")
            .args(["import", "--change", &format!("CMD {cmd_json}")])
            .arg(&tar)
            .arg(&reference)
            .output()
            .expect("docker import");
        assert!(
            out.status.success(),
            "docker import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = docker(&["image", "inspect", "-f", "{{.Id}}", &reference]);
        TestImage {
            repo: repo.to_string(),
            tag: tag.to_string(),
            id,
        }
    }

    pub fn busybox_sleeper(repo: &str, tag: &str) -> TestImage {
        // A shell that exits on SIGTERM: a bare `sleep` as PID 1 ignores it and every replace
        // would wait for the engine's 10 s stop timeout.
        Self::build(
            repo,
            tag,
            &[
                "/bin/busybox",
                "sh",
                "-c",
                "trap 'exit 0' TERM; while :; do /bin/busybox sleep 3600 & wait $!; done",
            ],
        )
    }

    /// `name=repo:tag@id`: the release component form.
    pub fn component(&self, name: &str) -> String {
        format!("{name}={}:{}@{}", self.repo, self.tag, self.id)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args([
                "image",
                "rm",
                "-f",
                &format!("{}:{}", self.repo, self.tag),
                &self.id,
            ])
            .output();
    }
}

/// Runs a docker CLI command that must succeed; returns trimmed stdout.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Container ids carrying `stella.target=<target>` (all states).
pub fn containers_of(target: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=stella.target={target}"),
    ])
    .lines()
    .map(str::to_string)
    .filter(|l| !l.is_empty())
    .collect()
}

pub fn inspect(container: &str) -> Value {
    let raw = docker(&["inspect", container]);
    let v: Value = serde_json::from_str(&raw).expect("docker inspect JSON");
    v[0].clone()
}

/// Removes every container of a target (test clean-up).
pub fn remove_target_containers(target: &str) {
    for id in containers_of(target) {
        let _ = Command::new("docker").args(["rm", "-f", &id]).output();
    }
}

/// Removes a target's containers when dropped, also when the test fails.
pub struct TargetCleanup(pub String);

impl Drop for TargetCleanup {
    fn drop(&mut self) {
        remove_target_containers(&self.0);
    }
}

pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

fn with_db<T>(db: &str, f: impl AsyncFnOnce(&sqlx::AnyPool) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(db).await.expect("open db");
        let v = f(&pool).await;
        pool.close().await;
        v
    })
}

/// Runs SQL against the plane's database ([`Plane::db`]: SQLite or PostgreSQL), as a database
/// writer (or attacker) could. Placeholders are `$1`, `$2`, ... on both.
pub fn sql_exec(db: &str, sql: &'static str, binds: &[&str]) -> u64 {
    with_db(db, async |pool| {
        let mut q = sqlx::query(sql);
        for b in binds {
            q = q.bind(*b);
        }
        q.execute(pool).await.expect("sql").rows_affected()
    })
}

/// Like [`sql_exec`], but the database's refusal is returned, not a panic.
pub fn sql_try(db: &str, sql: &'static str) -> Result<u64, String> {
    with_db(db, async |pool| {
        sqlx::query(sql)
            .execute(pool)
            .await
            .map(|r| r.rows_affected())
            .map_err(|e| e.to_string())
    })
}

pub fn sql_string(db: &str, sql: &'static str, binds: &[&str]) -> String {
    with_db(db, async |pool| {
        let mut q = sqlx::query_scalar::<_, String>(sql);
        for b in binds {
            q = q.bind(*b);
        }
        q.fetch_one(pool).await.expect("sql")
    })
}

/// A plane, one enrolled docker agent, an environment `dev` and one docker target in it.
pub struct Stack {
    pub agent: Agent,
    pub plane: Plane,
    pub target: String,
    _cleanup: TargetCleanup,
    pub tmp: tempfile::TempDir,
}

impl Stack {
    #[allow(clippy::new_without_default)] // starting processes is not a default
    pub fn new() -> Stack {
        let tmp = tempfile::tempdir().expect("tempdir");
        let plane = Plane::start(&tmp.path().join("plane"));
        let agent = Agent::enroll_and_start(&plane, &tmp.path().join("agent"), "e2e");
        let target = unique("web");
        plane.ok(&["env", "create", "dev"]);
        plane.ok(&[
            "target", "create", &target, "--env", "dev", "--kind", "docker", "--agent", &agent.id,
        ]);
        Stack {
            agent,
            plane,
            _cleanup: TargetCleanup(target.clone()),
            target,
            tmp,
        }
    }

    /// Creates a release and a deployment of it without following; returns the deployment JSON.
    pub fn deploy_no_wait(&self, release: &str, components: &[String]) -> Value {
        let mut args = vec!["release", "create", release];
        for c in components {
            args.extend(["--component", c.as_str()]);
        }
        self.plane.ok(&args);
        self.plane
            .json(&["deploy", release, "--env", "dev", "--no-wait"])
    }
}

/// A real OpenSSH server on a loopback port, for ssh targets (Debian `openssh-server`).
pub struct Sshd {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub host_public_key: String,
    child: Child,
}

impl Sshd {
    pub fn start() -> Sshd {
        const SSHD: &str = "/usr/sbin/sshd";
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} missing: apt-get install openssh-server"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        for key in ["host_key", "client_key"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key))
                .output()
                .expect("ssh-keygen");
            assert!(out.status.success(), "ssh-keygen failed");
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys"))
            .expect("authorized_keys");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let host_public_key = std::fs::read_to_string(d.join("host_key.pub"))
            .expect("host key")
            .trim()
            .to_string();
        for _attempt in 0..5 {
            let port = free_port();
            let config = d.join("sshd_config");
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n\
                     AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                     PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                     PermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\n\
                     Subsystem sftp internal-sftp\n",
                    d = d.display()
                ),
            )
            .expect("sshd_config");
            let mut child = Command::new(SSHD)
                .arg("-D")
                .arg("-f")
                .arg(&config)
                .arg("-E")
                .arg(d.join("sshd.log"))
                .stdin(Stdio::null())
                .spawn()
                .expect("start sshd");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Sshd {
                        port,
                        dir,
                        host_public_key,
                        child,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("sshd did not start");
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Fixed(std::sync::Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A raw mTLS handshake with exactly this certificate and key (which need not match);
/// returns whether the plane completed it and answered.
pub fn handshake(plane: &Plane, cert_pem: &str, key_pem: &str) -> bool {
    let ca_pem = std::fs::read_to_string(plane.dir.join("pki/ca.pem")).expect("ca.pem");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cert = stella_pki::cert_der_from_pem(cert_pem).unwrap();
    let key_der = rustls_pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes())
        .map(|k: rustls_pki_types::PrivatePkcs8KeyDer<'static>| {
            rustls_pki_types::PrivateKeyDer::Pkcs8(k)
        })
        .unwrap();
    let signing = provider.key_provider.load_private_key(key_der).unwrap();
    let certified = std::sync::Arc::new(rustls::sign::CertifiedKey::new(
        vec![rustls_pki_types::CertificateDer::from(cert)],
        signing,
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(
            stella_pki::cert_der_from_pem(&ca_pem).unwrap(),
        ))
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(std::sync::Arc::new(Fixed(certified)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let port = plane.agent_port;
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let Ok(mut tls) = connector.connect(rustls_pki_types::ServerName::try_from("localhost").unwrap(), tcp).await else {
            return false;
        };
        // TLS 1.3 reports a refused client certificate on the first read after the handshake.
        if tokio::io::AsyncWriteExt::write_all(&mut tls, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut tls, &mut buf)).await, Ok(Ok(n)) if n > 0)
    })
}

/// An HTTPS client trusting only the plane's CA (`ca_pem`).
fn https_client(ca_pem: &str) -> reqwest::Client {
    stella_pki::install_crypto_provider();
    let tls = stella_pki::client_config_ca(ca_pem).expect("tls config");
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("client")
}

/// `stella-agent ARGS --data-dir DIR` (an agent subcommand other than `run`), its output.
pub fn agent_cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("STELLA_AGENT_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run stella-agent")
}

/// The step `id` of a promotion's workflow (`stella promotion show` JSON).
pub fn promotion_step<'a>(promotion: &'a Value, id: &str) -> &'a Value {
    promotion["workflow"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id}: {promotion}"))
}
