//! Wiring of a running control plane: storage, keys, the REST API (HTTPS) and the agent
//! endpoint (gRPC over mTLS, client certificate required).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use stella_proto::agent_session_server::AgentSessionServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::group_commit::GroupCommit;
use crate::hub::{AdmissionConfig, Hub};
use crate::keys::PlaneKeys;
use crate::session::AgentSessionService;
use crate::state::{AppState, NamedCounts, PlaneConfig, SharedState};
use crate::store::{DatabaseUrl, StoreError};
use crate::{api, store, tokens};

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const API_URL_FILE: &str = "api.url";
pub const CA_FILE: &str = "pki/ca.pem";

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub data_dir: PathBuf,
    /// Key-encryption key file (`--key-encryption-key-file`): the CA, job-signing and evidence
    /// keys live sealed in the database, shared by every replica given the same file; `None`:
    /// they are files in `<data-dir>/pki/`.
    pub key_encryption_key_file: Option<PathBuf>,
    /// The key-encryption key being replaced (`--previous-key-encryption-key-file`): it opens
    /// secrets still sealed with it, which are resealed with the current key at start.
    pub previous_key_encryption_key_file: Option<PathBuf>,
    pub api_listen: SocketAddr,
    pub agent_listen: SocketAddr,
    /// UDP address of the agent endpoint over QUIC, if enabled.
    pub quic_listen: Option<SocketAddr>,
    /// Hand enrolling agents the QUIC endpoint (`quic://`) instead of the gRPC one.
    pub advertise_quic: bool,
    /// Extra names/addresses for the server certificate and the advertised agent endpoint.
    pub hostnames: Vec<String>,
    /// Host agents use to reach the agent endpoint; defaults to the listen address (or
    /// 127.0.0.1 when listening on all interfaces).
    pub advertise_host: Option<String>,
    /// Agent endpoint URLs handed to agents, in order (`--advertise-endpoint`); empty: this
    /// plane's own gRPC endpoint, or its QUIC one with `advertise_quic`.
    pub advertise_endpoints: Vec<String>,
    pub trust_domain: String,
    pub heartbeat_interval: Duration,
    pub job_ttl: Duration,
    pub agent_cert_validity: Duration,
    pub renewal_grace: Duration,
    /// Session setups allowed at once; the excess is told to reconnect later.
    pub max_session_setups: usize,
    /// Database URL (`postgres://...`, `sqlite://...`); `None`: `stella.db` in the data
    /// directory.
    pub database: Option<String>,
    /// Apply pending schema migrations at start.
    pub migrate: bool,
    /// How long this replica's hold on a workflow run lasts without renewal.
    pub run_lease: Duration,
}

pub const DEFAULT_RUN_LEASE: Duration = Duration::from_secs(15);
/// Several renewals must fit in a lease, or a busy replica would lose its runs to the others.
pub const MIN_RUN_LEASE: Duration = Duration::from_secs(2);

/// The database a plane with this data directory and `--database` value uses.
pub fn database_url(data_dir: &Path, database: Option<&str>) -> Result<DatabaseUrl, StoreError> {
    match database {
        Some(raw) => DatabaseUrl::parse(raw),
        None => DatabaseUrl::sqlite_file(&data_dir.join("stella.db")),
    }
}

/// How often heartbeat times kept in memory are written to the database.
const HEARTBEAT_FLUSH: Duration = Duration::from_secs(30);

pub struct RunningPlane {
    pub api_url: String,
    pub agent_url: String,
    /// `quic://host:port` when the QUIC endpoint is enabled.
    pub quic_url: Option<String>,
    pub ca_fingerprint: String,
    pub admin_token_path: PathBuf,
    pub state: SharedState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

fn advertised(host: &Option<String>, addr: SocketAddr) -> String {
    let host = match host {
        Some(h) => h.clone(),
        None if addr.ip().is_unspecified() => "127.0.0.1".to_string(),
        None => addr.ip().to_string(),
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", addr.port())
    } else {
        format!("{host}:{}", addr.port())
    }
}

/// Checks `--advertise-endpoint` values: `https://host:port` (gRPC) or `quic://host:port`
/// (QUIC), none twice. Returned without a trailing `/`, the form agents compare them in.
fn advertised_endpoints(urls: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(urls.len());
    for url in urls {
        let url = url.trim().trim_end_matches('/').to_string();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("quic://"))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--advertise-endpoint {url:?}: use https://host:port (gRPC) or quic://host:port (QUIC)"
                )
            })?;
        let valid = rest.rsplit_once(':').is_some_and(|(host, port)| {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            !host.is_empty() && !rest.contains('/') && port.parse::<u16>().is_ok()
        });
        if !valid {
            anyhow::bail!("--advertise-endpoint {url:?}: expected host:port after the scheme");
        }
        if out.contains(&url) {
            anyhow::bail!("--advertise-endpoint {url:?} is given twice");
        }
        out.push(url);
    }
    Ok(out)
}

/// Writes the admin token file if it is missing (creating or replacing the token's hash).
/// `shared_by`: this replica's id when other replicas may use the database; a replica started
/// with a fresh data directory then gets an admin token of its own (`admin@REPLICA`) instead of
/// replacing the one whose file another replica holds.
async fn ensure_admin_token_file(
    db: &store::Db,
    path: &Path,
    shared_by: Option<&str>,
) -> anyhow::Result<()> {
    if path.exists() {
        let token =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        if crate::users::authenticate(db, token.trim()).await.is_ok() {
            return Ok(());
        }
    }
    let token = match (tokens::ensure_admin_token(db, "admin").await?, shared_by) {
        (Some(token), _) => token,
        (None, Some(replica)) => {
            let name = format!("admin@{replica}");
            tracing::info!(token = %name, "the admin token belongs to another data directory; issuing this replica's own");
            tokens::rotate_admin_token(db, &name).await?
        }
        // The token exists in the database but its file is gone or stale: only the hash is
        // stored, so the old plaintext cannot be recovered; issue a new one.
        (None, None) => tokens::rotate_admin_token(db, "admin").await?,
    };
    stella_pki::write_secret_file(path, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub async fn start(opts: ServeOptions) -> anyhow::Result<RunningPlane> {
    stella_pki::install_crypto_provider();
    if !stella_pki::is_valid_trust_domain(&opts.trust_domain) {
        anyhow::bail!(
            "invalid --trust-domain {:?}: use lowercase letters, digits, '.', '_' and '-'",
            opts.trust_domain
        );
    }
    // Checked before anything is created or bound.
    let mut agent_endpoints = advertised_endpoints(&opts.advertise_endpoints)?;
    if opts.run_lease < MIN_RUN_LEASE {
        anyhow::bail!(
            "--run-lease {:?} is too short: leases are renewed every 0.5 s, so use at least {:?}",
            opts.run_lease,
            MIN_RUN_LEASE
        );
    }
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating data directory {}", opts.data_dir.display()))?;
    let sealing = crate::keys::SealingKeys::load(
        opts.key_encryption_key_file.as_deref(),
        opts.previous_key_encryption_key_file.as_deref(),
    )
    .context("loading the key-encryption key")?;
    let database = database_url(&opts.data_dir, opts.database.as_deref())?;
    tracing::info!(%database, migrate = opts.migrate, "opening the database");
    let db = store::open(&database, opts.migrate).await?;
    let keys = PlaneKeys::load(
        &opts.data_dir.join("pki"),
        &opts.trust_domain,
        &opts.hostnames,
        &db,
        sealing,
    )
    .await
    .context("loading the plane's keys")?;
    let admin_token_path = opts.data_dir.join(ADMIN_TOKEN_FILE);
    let replica_id = crate::replicas::load_or_create_id(&opts.data_dir).with_context(|| {
        format!(
            "reading {}",
            opts.data_dir
                .join(crate::replicas::REPLICA_ID_FILE)
                .display()
        )
    })?;
    // Only PostgreSQL can be shared by several replicas; a SQLite file belongs to one plane.
    let shared = database.backend() == store::Backend::Postgres;
    ensure_admin_token_file(
        &db,
        &admin_token_path,
        shared.then_some(replica_id.as_str()),
    )
    .await?;

    let api_listener = TcpListener::bind(opts.api_listen)
        .await
        .with_context(|| format!("binding the API address {}", opts.api_listen))?;
    let agent_listener = TcpListener::bind(opts.agent_listen)
        .await
        .with_context(|| format!("binding the agent endpoint address {}", opts.agent_listen))?;
    if opts.advertise_quic && opts.quic_listen.is_none() {
        anyhow::bail!("--advertise-quic needs --quic-listen");
    }
    let reset_key_file = opts.data_dir.join("pki").join("quic-reset.key");
    let quic_endpoint = opts
        .quic_listen
        .map(|addr| crate::quic::bind(addr, &reset_key_file))
        .transpose()?;
    let api_addr = api_listener.local_addr()?;
    let agent_addr = agent_listener.local_addr()?;
    let api_url = format!("https://{}", advertised(&opts.advertise_host, api_addr));
    let agent_url = format!("https://{}", advertised(&opts.advertise_host, agent_addr));
    let quic_url = match &quic_endpoint {
        Some(endpoint) => Some(format!(
            "quic://{}",
            advertised(&opts.advertise_host, endpoint.local_addr()?)
        )),
        None => None,
    };

    if agent_endpoints.is_empty() {
        agent_endpoints.push(match (&quic_url, opts.advertise_quic) {
            (Some(quic_url), true) => quic_url.clone(),
            _ => agent_url.clone(),
        });
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let handshake_refusals: NamedCounts = Default::default();
    let replica = crate::replicas::Replica::new(replica_id, shared);
    tracing::info!(replica = %replica.id, "this replica");
    let state: SharedState = Arc::new(AppState {
        writes: GroupCommit::start(db.clone(), &replica.id),
        replica,
        db,
        hub: Hub::new(AdmissionConfig {
            max_session_setups: opts.max_session_setups,
            ..AdmissionConfig::default()
        }),
        config: PlaneConfig {
            api_url: api_url.clone(),
            agent_endpoint: agent_endpoints[0].clone(),
            agent_endpoints: agent_endpoints.clone(),
            heartbeat_interval: opts.heartbeat_interval,
            job_ttl: opts.job_ttl,
            agent_cert_validity: opts.agent_cert_validity,
            renewal_grace: opts.renewal_grace,
            run_lease: opts.run_lease,
        },
        shutdown: shutdown_rx.clone(),
        receipt_refusals: Default::default(),
        session_refusals: Default::default(),
        enrollment_refusals: Default::default(),
        enrollment_limiter: Default::default(),
        handshake_refusals: handshake_refusals.clone(),
        tls: Default::default(),
        events: tokio::sync::broadcast::channel(1024).0,
        runner_wake: tokio::sync::Notify::new(),
        drift: Default::default(),
        keys,
    });

    crate::trust::ensure_initial_bundle(&state)
        .await
        .map_err(|e| anyhow::anyhow!("publishing the first trust bundle: {e}"))?;
    state.tls.rebuild(&state.keys, &state.handshake_refusals)?;
    crate::replicas::forget_stale_sessions(&state)
        .await
        .context("clearing this replica's session marks from before its restart")?;
    let runner_task = crate::runs::spawn_runner(state.clone());
    let drift_task = crate::drift::spawn_worker(state.clone());
    let api_task = tokio::spawn(serve_api(
        api_listener,
        state.clone(),
        api::router(state.clone()),
        shutdown_rx.clone(),
    ));

    // The agent endpoint terminates mTLS itself (rather than through tonic) so that refused
    // client certificates are counted by reason, and so its trusted CAs can change at run time
    // (CA rotation).
    let incoming = tls_incoming(agent_listener, state.clone(), shutdown_rx.clone());
    let mut grpc_shutdown = shutdown_rx.clone();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AgentSessionServer::new(AgentSessionService::new(
            state.clone(),
        )));
    let agent_task = tokio::spawn(async move {
        let signal = async move {
            let _ = grpc_shutdown.wait_for(|v| *v).await;
        };
        if let Err(e) = grpc.serve_with_incoming_shutdown(incoming, signal).await {
            tracing::error!(error = %e, "agent endpoint stopped");
        }
    });

    let heartbeat_task = tokio::spawn(flush_heartbeats(state.clone(), shutdown_rx.clone()));
    let replica_tasks = crate::replicas::spawn(state.clone(), shutdown_rx.clone());
    let quic_task = quic_endpoint.map(|endpoint| {
        tokio::spawn(crate::quic::serve(
            endpoint,
            state.clone(),
            shutdown_rx.clone(),
        ))
    });

    std::fs::write(opts.data_dir.join(API_URL_FILE), format!("{api_url}\n"))
        .context("writing api.url")?;
    tracing::info!(%api_url, %agent_url, quic_url = quic_url.as_deref().unwrap_or("disabled"), advertised = ?agent_endpoints, "control plane ready");
    let mut plane = RunningPlane {
        api_url,
        agent_url,
        quic_url,
        ca_fingerprint: state.keys.ca().fingerprint(),
        admin_token_path,
        state,
        shutdown: shutdown_tx,
        tasks: vec![
            api_task,
            agent_task,
            runner_task,
            heartbeat_task,
            drift_task,
        ],
    };
    plane.tasks.extend(quic_task);
    plane.tasks.extend(replica_tasks);
    Ok(plane)
}

impl RunningPlane {
    /// Stops accepting, drains agent sessions (they are told to come back) and waits briefly.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                tracing::warn!("a server task did not stop within 5s");
            }
        }
        self.state.db.close().await;
    }
}

/// Writes the heartbeats the hub collected, every `HEARTBEAT_FLUSH` and once more at shutdown.
async fn flush_heartbeats(state: SharedState, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(HEARTBEAT_FLUSH);
    every.tick().await;
    loop {
        let stopping = tokio::select! {
            _ = every.tick() => false,
            _ = shutdown.wait_for(|v| *v) => true,
        };
        state.writes.heartbeats(state.hub.take_heartbeats()).await;
        if stopping {
            // The database closes once the server tasks are done: let the writer finish first.
            state.writes.barrier().await;
            return;
        }
    }
}

async fn serve_api(
    listener: TcpListener,
    state: SharedState,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|v| *v) => return,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(state.tls.api());
        // Handlers that rate-limit by source address read it from this extension.
        let service = TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(api::ClientAddr(peer.ip()))),
        );
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "API TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "API connection ended with an error");
            }
        });
    }
}

type AgentTlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow client cannot stall
/// others), yielding established mTLS streams to the gRPC server.
fn tls_incoming(
    listener: TcpListener,
    state: SharedState,
    mut shutdown: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<Result<AgentTlsStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let refusals = state.handshake_refusals.clone();
    tokio::spawn(async move {
        loop {
            // A handshake slot before the next accept: beyond the limit, connections wait in the
            // listen backlog rather than all doing TLS at once (see `handshakes.rs`).
            let slot = tokio::select! {
                slot = state.hub.handshakes.slot() => slot,
                _ = shutdown.wait_for(|v| *v) => return,
            };
            let Some(slot) = slot else { return };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "agent endpoint accept failed");
                        continue;
                    }
                },
                _ = shutdown.wait_for(|v| *v) => return,
            };
            let _ = tcp.set_nodelay(true);
            // The current configuration: trusted CAs change during a CA rotation.
            let acceptor = tokio_rustls::TlsAcceptor::from(state.tls.agent());
            let (tx, refusals) = (tx.clone(), refusals.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                drop(slot);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        crate::state::count(&refusals, "handshake_failed");
                        tracing::info!(%peer, error = %e, "agent TLS handshake refused");
                    }
                    Err(_) => {
                        crate::state::count(&refusals, "handshake_timeout");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::advertised_endpoints;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn advertised_endpoints_are_checked_and_kept_in_order() {
        assert_eq!(
            advertised_endpoints(&strings(&["quic://b:7445/", "https://[::1]:7444"])).unwrap(),
            strings(&["quic://b:7445", "https://[::1]:7444"])
        );
        for (bad, expected) in [
            ("http://a:1", "use https://host:port"),
            ("https://a", "expected host:port"),
            ("https://:1", "expected host:port"),
            ("https://a:1/x", "expected host:port"),
        ] {
            let e = advertised_endpoints(&strings(&[bad]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected) && e.contains(bad), "{bad}: {e}");
        }
        let e = advertised_endpoints(&strings(&["https://a:1", "https://a:1/"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
