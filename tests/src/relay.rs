//! Relays in end-to-end tests: a `stella-agent relay` process enrolled with a `role=relay`
//! token, agents enrolled through it, its metrics and its air-gap commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{Agent, Plane, agent_bin, enroll_cmd, free_port, stop_child, wait_until};

/// A join token that makes the agent enrolled with it a relay: (token, CA fingerprint).
pub fn relay_token(plane: &Plane) -> (String, String) {
    let v = plane.json(&["token", "create", "--ttl", "10m", "--label", "role=relay"]);
    (
        v["token"].as_str().expect("token").to_string(),
        v["ca_fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_string(),
    )
}

fn agent_id_of(dir: &Path) -> String {
    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("agent.json")).expect("agent.json"))
            .expect("agent.json is JSON");
    config["agent_id"].as_str().expect("agent id").to_string()
}

fn check_enrolled(out: std::process::Output) {
    assert!(
        out.status.success(),
        "enroll failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Relay {
    pub dir: PathBuf,
    pub id: String,
    pub listen: SocketAddr,
    /// `--upstream` for the next start (None: the endpoint from enrollment).
    pub upstream: Option<String>,
    /// Extra `stella-agent relay` flags.
    pub extra_args: Vec<String>,
    child: Option<Child>,
}

impl Relay {
    /// Enrolls a relay against `server` (the plane's API URL or another relay's URL) with a
    /// relay token of `plane`, without starting it.
    pub fn enroll(plane: &Plane, server: &str, dir: &Path, name: &str) -> Relay {
        let (token, fp) = relay_token(plane);
        check_enrolled(enroll_cmd(dir, server, &token, &fp, name));
        Relay {
            dir: dir.to_path_buf(),
            id: agent_id_of(dir),
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            upstream: None,
            extra_args: Vec::new(),
            child: None,
        }
    }

    /// The URL agents use to enroll through and connect to this relay.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "relay already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("relay.log"))
            .expect("relay.log");
        let child = Command::new(agent_bin())
            .arg("relay")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.listen.to_string()])
            .args(
                self.upstream
                    .iter()
                    .flat_map(|u| ["--upstream", u.as_str()]),
            )
            .args(&self.extra_args)
            .env("STELLA_LOG", "info,stella_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start stella-agent relay");
        self.child = Some(child);
    }

    /// Starts the relay and waits until it holds a server certificate and its uplink is up.
    pub fn start_and_wait(&mut self) {
        self.start();
        wait_until(Duration::from_secs(60), "the relay to be ready", || {
            (self.dir.join("relay/server.pem").exists()
                && self.metric("stella_relay_uplink_up") == Some(1))
            .then_some(())
        });
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
    }

    /// GET /metrics on the relay's listener, trusting only the plane's CA. None while the
    /// relay does not answer.
    pub fn metrics(&self) -> Option<String> {
        let ca = std::fs::read_to_string(self.dir.join("identity/ca.pem")).ok()?;
        let url = format!("{}/metrics", self.url());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            stella_pki::install_crypto_provider();
            let tls = stella_pki::client_config_ca(&ca).ok()?;
            let client = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(Duration::from_secs(5))
                .build()
                .ok()?;
            let resp = client.get(&url).send().await.ok()?;
            resp.status().is_success().then_some(())?;
            resp.text().await.ok()
        })
    }

    /// One unlabelled sample of the relay's metrics.
    pub fn metric(&self, name: &str) -> Option<u64> {
        let text = self.metrics()?;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// `stella-agent relay SUBCOMMAND ... --data-dir DIR`; panics unless it succeeds.
    pub fn command(&self, args: &[&str]) -> String {
        let out = Command::new(agent_bin())
            .arg("relay")
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run stella-agent relay");
        assert!(
            out.status.success(),
            "stella-agent relay {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `relay status` as JSON (reads the store; works whether or not the relay runs).
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.command(&["status"])).expect("relay status is JSON")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- last lines of relay {} log ---", self.id);
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Enrolls an agent through `relay_url` with a fresh (ordinary) join token of `plane`, without
/// starting it.
pub fn enroll_through(plane: &Plane, relay_url: &str, dir: &Path, name: &str) -> Agent {
    let (token, fp) = plane.join_token();
    check_enrolled(enroll_cmd(dir, relay_url, &token, &fp, name));
    Agent {
        dir: dir.to_path_buf(),
        id: agent_id_of(dir),
        disabled: Vec::new(),
        run_args: Vec::new(),
        child: None,
    }
}

/// The relay the plane last saw `agent_id` behind (empty when none).
pub fn relay_of(plane: &Plane, agent_id: &str) -> String {
    crate::sql_string(
        &plane.db(),
        "SELECT COALESCE((SELECT relay_id FROM relayed_agents WHERE agent_id = $1), '')",
        &[agent_id],
    )
}

/// A raw gRPC session with the identity in an agent's data directory, straight to the plane:
/// for tests that play a relay (honest or not) message by message.
pub struct RawSession {
    pub tx: tokio::sync::mpsc::Sender<stella_proto::AgentMessage>,
    pub rx: tonic::Streaming<stella_proto::PlaneMessage>,
}

impl RawSession {
    pub async fn open(plane: &Plane, dir: &Path, hello: stella_proto::AgentMessage) -> RawSession {
        stella_pki::install_crypto_provider();
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).expect(p);
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(
                "identity/ca.pem",
            )))
            .identity(tonic::transport::Identity::from_pem(
                read("identity/agent.pem"),
                read("identity/agent.key"),
            ))
            .domain_name("127.0.0.1");
        let channel =
            // The gRPC endpoint, whatever transport the test run hands agents.
            tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", plane.agent_port))
                .expect("endpoint")
                .tls_config(tls)
                .expect("tls")
                .connect()
                .await
                .expect("connect to the plane");
        let mut client = stella_proto::agent_session_client::AgentSessionClient::new(channel);
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tx.send(hello).await.expect("hello");
        let rx = client
            .session(tokio_stream::wrappers::ReceiverStream::new(out))
            .await
            .expect("session")
            .into_inner();
        RawSession { tx, rx }
    }

    /// The next message from the plane, skipping heartbeat answers; panics after 15 s.
    pub async fn next(&mut self) -> stella_proto::PlaneMessage {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(15), self.rx.message())
                .await
                .expect("a message from the plane within 15s")
                .expect("session stream")
                .expect("session open");
            if !matches!(
                m.body,
                Some(stella_proto::plane_message::Body::Heartbeat(_))
            ) {
                return m;
            }
        }
    }

    /// Whether any message other than heartbeats arrives within `wait`.
    pub async fn quiet_for(&mut self, wait: Duration) -> Option<stella_proto::PlaneMessage> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.message()).await {
                Err(_) => return None,
                Ok(Ok(Some(m)))
                    if matches!(
                        m.body,
                        Some(stella_proto::plane_message::Body::Heartbeat(_))
                    ) => {}
                Ok(Ok(Some(m))) => return Some(m),
                Ok(other) => panic!("session ended: {other:?}"),
            }
        }
    }
}

/// A hello as an agent would send it.
pub fn hello(capabilities: &[&str]) -> stella_proto::AgentMessage {
    stella_proto::AgentMessage {
        body: Some(stella_proto::agent_message::Body::Hello(
            stella_proto::Hello {
                agent_version: "test".to_string(),
                capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
                hostname: "test".to_string(),
                ..Default::default()
            },
        )),
    }
}

/// The DER of the certificate in an agent's data directory.
pub fn cert_der(dir: &Path) -> Vec<u8> {
    let pem = std::fs::read_to_string(dir.join("identity/agent.pem")).expect("agent.pem");
    stella_pki::cert_der_from_pem(&pem).expect("certificate")
}
