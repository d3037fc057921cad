//! The relay's downstream side: one TLS listener serving the agent session (gRPC, client
//! certificate from the plane's CA required), the enrollment and renewal API passed through to
//! the plane unchanged (no client certificate yet; the leaf pins the plane's CA fingerprint and
//! the CSR and token are end to end, so the relay cannot substitute anything), and `/metrics`.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use prost::Message as _;
use stella_proto::agent_message::Body as AgentBody;
use stella_proto::agent_session_server::{AgentSession, AgentSessionServer};
use stella_proto::plane_message::Body as PlaneBody;
use stella_proto::{
    AgentMessage, JobStatus, PlaneMessage, RelayCertResponse, RelayedPlaneMessage, RenewResponse,
    ResultAck,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Relay;
use super::store::LeafRecord;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// New offers written by `relay import` are picked up this often.
const INBOX_SCAN: Duration = Duration::from_secs(2);

/// Server TLS for leaves: presents `[server cert, CA]` (enrolling agents pin the CA by
/// fingerprint), asks for a client certificate from the plane's CA but lets a connection
/// without one through — only the enrollment pass-through serves those.
pub fn tls_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in stella_pki::certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let mut chain = stella_pki::certs_from_pem(cert_pem)?;
    chain.extend(stella_pki::certs_from_pem(ca_pem)?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, stella_pki::private_key_from_pem(key_pem)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

type LeafTls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

pub async fn serve(relay: Arc<Relay>, listener: tokio::net::TcpListener) {
    let (tx, rx) = mpsc::channel::<Result<LeafTls, std::io::Error>>(64);
    let acceptor_relay = relay.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "relay accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = acceptor_relay.wait_tls().await;
            let tx = tx.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "leaf TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "leaf TLS handshake timed out"),
                }
            });
        }
    });
    let api = axum::Router::new()
        .route("/api/v1/enroll", axum::routing::post(pass_enroll))
        .route("/api/v1/renew", axum::routing::post(pass_renew))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(relay.clone());
    let routes =
        tonic::service::Routes::from(api).add_service(AgentSessionServer::new(LeafSessions {
            relay: relay.clone(),
        }));
    let result = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming(ReceiverStream::new(rx))
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "relay listener stopped");
    }
}

async fn metrics(axum::extract::State(relay): axum::extract::State<Arc<Relay>>) -> String {
    let backlog = relay.store.backlog();
    format!(
        "# HELP stella_relay_backlog_messages Messages the relay holds: leaf messages waiting for the plane plus jobs waiting for their leaf.\n\
# TYPE stella_relay_backlog_messages gauge\nstella_relay_backlog_messages {}\n\
stella_relay_backlog_messages{{direction=\"to_plane\"}} {}\n\
stella_relay_backlog_messages{{direction=\"to_agents\"}} {}\n\
# HELP stella_relay_backlog_results Results (with receipts) waiting for the plane's acknowledgement.\n\
# TYPE stella_relay_backlog_results gauge\nstella_relay_backlog_results {}\n\
# HELP stella_relay_backlog_bytes Bytes the relay's store holds, out of its budget.\n\
# TYPE stella_relay_backlog_bytes gauge\nstella_relay_backlog_bytes {}\n\
# HELP stella_relay_backlog_limit_bytes The store's budget (--max-backlog-bytes).\n\
# TYPE stella_relay_backlog_limit_bytes gauge\nstella_relay_backlog_limit_bytes {}\n\
# HELP stella_relay_uplink_up 1 while the relay's session with the plane is established.\n\
# TYPE stella_relay_uplink_up gauge\nstella_relay_uplink_up {}\n\
# HELP stella_relay_dropped_total Inventory and progress reports dropped because the store was full.\n\
# TYPE stella_relay_dropped_total counter\nstella_relay_dropped_total {}\n\
# HELP stella_relay_refused_results_total Results left unacknowledged (in the leaf's spool) because the store was full.\n\
# TYPE stella_relay_refused_results_total counter\nstella_relay_refused_results_total {}\n",
        backlog.messages(),
        backlog.to_plane_messages,
        backlog.to_agents_messages,
        backlog.results,
        backlog.bytes,
        relay.options.max_backlog_bytes,
        u8::from(relay.uplink_up()),
        relay.dropped.load(Ordering::Relaxed),
        relay.refused_results.load(Ordering::Relaxed),
    )
}

async fn pass_enroll(
    state: axum::extract::State<Arc<Relay>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    pass_through(state, "enroll", body).await
}

async fn pass_renew(
    state: axum::extract::State<Arc<Relay>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    pass_through(state, "renew", body).await
}

/// Forwards an enrollment or renewal request to the plane (through the relay's own upstream
/// API, which may be another relay) and returns its answer. The only change: an enrollment
/// answer's `agent_endpoint` becomes this relay, so the new agent dials it.
async fn pass_through(
    axum::extract::State(relay): axum::extract::State<Arc<Relay>>,
    what: &str,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let bad_gateway = |detail: String| {
        (
            axum::http::StatusCode::BAD_GATEWAY,
            axum::Json(serde_json::json!({
                "code": "relay_uplink",
                "message": format!("the relay cannot reach the plane: {detail}"),
            })),
        )
            .into_response()
    };
    let client = match relay
        .dir
        .read_text(&relay.dir.ca_file())
        .map_err(|e| e.to_string())
        .and_then(|ca| stella_pki::client_config_ca(&ca).map_err(|e| e.to_string()))
        .and_then(|tls| {
            reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|e| e.to_string())
        }) {
        Ok(client) => client,
        Err(e) => return bad_gateway(e),
    };
    let url = format!(
        "{}/api/v1/{what}",
        relay.config.api_url.trim_end_matches('/')
    );
    let answer = client
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return bad_gateway(format!("{url}: {e}")),
    };
    let status = axum::http::StatusCode::from_u16(answer.status().as_u16())
        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
    let bytes = match answer.bytes().await {
        Ok(b) => b.to_vec(),
        Err(e) => return bad_gateway(e.to_string()),
    };
    let bytes = if what == "enroll" && status.is_success() {
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(mut doc) => {
                doc["agent_endpoint"] = serde_json::Value::String(relay.advertised_url());
                serde_json::to_vec(&doc).unwrap_or(bytes)
            }
            Err(_) => bytes,
        }
    } else {
        bytes
    };
    tracing::info!(
        what,
        status = status.as_u16(),
        "request passed through to the plane"
    );
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response()
}

struct LeafSessions {
    relay: Arc<Relay>,
}

type PlaneStream = Pin<Box<dyn Stream<Item = Result<PlaneMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentSession for LeafSessions {
    type SessionStream = PlaneStream;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let cert = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.to_vec()))
            .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
        let inbound = request
            .into_inner()
            .map(|m| m.map_err(|status| format!("stream error: {status}")));
        match open_leaf(self.relay.clone(), cert, inbound).await {
            Ok(rx) => Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok)))),
            Err(LeafRefusal::Unauthenticated(m)) => Err(Status::unauthenticated(m)),
            Err(LeafRefusal::NoHello) => Err(Status::invalid_argument(
                "the first message must be a hello",
            )),
            Err(LeafRefusal::PermissionDenied(m)) => Err(Status::permission_denied(m)),
        }
    }
}

/// Why a leaf's session was not opened.
pub(super) enum LeafRefusal {
    /// Its certificate names no agent of this trust domain.
    Unauthenticated(String),
    /// It sent something other than a hello first, or nothing in time.
    NoHello,
    /// The relay will not serve it (see `Relay::leaf_connected`).
    PermissionDenied(String),
}

/// Opens a leaf's session, whatever carries it (gRPC or QUIC): the certificate names the agent,
/// the first message must be its hello; the relay answers with the welcome and serves the leaf
/// from then on. Returns what goes to the leaf.
pub(super) async fn open_leaf<S>(
    relay: Arc<Relay>,
    cert: Vec<u8>,
    mut inbound: S,
) -> Result<mpsc::Receiver<PlaneMessage>, LeafRefusal>
where
    S: Stream<Item = Result<AgentMessage, String>> + Unpin + Send + 'static,
{
    let agent_id = stella_pki::agent_id_from_cert(&cert, &relay.config.trust_domain)
        .map_err(|e| LeafRefusal::Unauthenticated(format!("client certificate refused: {e}")))?;
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
        Ok(Some(Ok(m))) if matches!(m.body, Some(AgentBody::Hello(_))) => m,
        _ => return Err(LeafRefusal::NoHello),
    };
    let is_relay = match &hello.body {
        Some(AgentBody::Hello(h)) => h.capabilities.iter().any(|c| c == super::RELAY_CAPABILITY),
        _ => false,
    };
    let record = LeafRecord {
        agent_id: agent_id.clone(),
        cert_der: cert,
        hello: hello.encode_to_vec(),
        welcome: Vec::new(),
        moved_away: false,
    };
    let (welcome, conn, from_relay, kick) = relay
        .leaf_connected(record, is_relay)
        .await
        .map_err(LeafRefusal::PermissionDenied)?;
    tracing::info!(agent_id, uplink = relay.uplink_up(), "leaf connected");
    let (tx, rx) = mpsc::channel::<PlaneMessage>(64);
    let _ = tx
        .send(PlaneMessage {
            body: Some(PlaneBody::Welcome(welcome)),
        })
        .await;
    tokio::spawn(serve_leaf(
        relay, agent_id, conn, inbound, from_relay, kick, tx,
    ));
    Ok(rx)
}

/// One leaf connection: the relay is its peer until it goes.
async fn serve_leaf<S>(
    relay: Arc<Relay>,
    agent_id: String,
    conn: u64,
    mut inbound: S,
    mut from_relay: mpsc::Receiver<PlaneMessage>,
    kick: Arc<tokio::sync::Notify>,
    tx: mpsc::Sender<PlaneMessage>,
) where
    S: Stream<Item = Result<AgentMessage, String>> + Unpin + Send,
{
    let mut sent: HashSet<String> = HashSet::new();
    let mut scan = tokio::time::interval(INBOX_SCAN);
    let end = loop {
        tokio::select! {
            incoming = inbound.next() => match incoming {
                None => break "closed by the agent".to_string(),
                Some(Err(e)) => break e,
                Some(Ok(message)) => {
                    if let Err(e) = from_leaf(&relay, &agent_id, message, &tx, &mut sent).await {
                        break e;
                    }
                }
            },
            Some(message) = from_relay.recv() => {
                if let Some(PlaneBody::Offer(offer)) = &message.body
                    && !sent.insert(offer.job_id.clone())
                {
                    continue;
                }
                if tx.send(message).await.is_err() {
                    break "agent gone".to_string();
                }
            }
            _ = scan.tick() => {
                for offer in relay.store.offers(&agent_id) {
                    if sent.insert(offer.job_id.clone())
                        && tx.send(PlaneMessage { body: Some(PlaneBody::Offer(offer)) }).await.is_err()
                    {
                        break;
                    }
                }
            }
            _ = kick.notified() => break "closed by the relay".to_string(),
        }
    };
    relay.leaf_disconnected(&agent_id, conn);
    tracing::info!(agent_id, reason = %end, "leaf disconnected");
}

async fn from_leaf(
    relay: &Relay,
    agent_id: &str,
    message: AgentMessage,
    tx: &mpsc::Sender<PlaneMessage>,
    sent: &mut HashSet<String>,
) -> Result<(), String> {
    let reply = |body: PlaneBody| PlaneMessage { body: Some(body) };
    let send =
        |m: PlaneMessage| async move { tx.send(m).await.map_err(|_| "agent gone".to_string()) };
    match &message.body {
        Some(AgentBody::Heartbeat(beat)) => send(reply(PlaneBody::Heartbeat(*beat))).await?,
        Some(AgentBody::Result(result)) => {
            let job_id = result.job_id.clone();
            if JobStatus::try_from(result.status).is_err() {
                return Ok(());
            }
            match relay.store.put_result(agent_id, &job_id, &message) {
                Ok(()) => {
                    relay.store.remove_offer(agent_id, &job_id);
                    sent.insert(job_id.clone());
                    // Stored durably: the relay answers for it from now on.
                    send(reply(PlaneBody::ResultAck(ResultAck { job_id }))).await?;
                    relay.forward(agent_id, &message);
                }
                Err(e) => {
                    relay.refused_results.fetch_add(1, Ordering::Relaxed);
                    // Not acknowledged: the leaf keeps it. Passed on if the plane can be
                    // reached (its acknowledgement reaches the leaf); otherwise the leaf is
                    // asked to send it again once its virtual session is open.
                    if !relay.forward(agent_id, &message) {
                        relay.owes_results(agent_id);
                    }
                    tracing::error!(agent_id, job_id, error = %e, "result not stored; the agent keeps it in its spool");
                }
            }
        }
        Some(AgentBody::Inventory(_)) => {
            if !relay.forward(agent_id, &message) {
                match relay.store.put_inventory(agent_id, &message) {
                    Ok(true) => {}
                    Ok(false) => {
                        relay.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(agent_id, error = %e, "inventory not stored"),
                }
            }
        }
        Some(AgentBody::Accepted(_) | AgentBody::Progress(_) | AgentBody::TrustAck(_)) => {
            if !relay.forward(agent_id, &message) {
                match relay.store.put_event(agent_id, &message) {
                    Ok(true) => {}
                    Ok(false) => {
                        relay.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(agent_id, error = %e, "report not stored"),
                }
            }
        }
        Some(AgentBody::Renew(_)) => {
            // The plane accepts in-band renewal only on direct sessions (the relay could swap
            // the CSR); the agent renews over the passed-through API with its previous key.
            send(reply(PlaneBody::Renewed(RenewResponse {
                cert_pem: String::new(),
                error: "in-band renewal is not available through a relay; the agent renews over the API when its certificate lapses".to_string(),
            })))
            .await?;
        }
        Some(AgentBody::Relayed(frame)) => {
            // A relay behind this one: its virtual sessions travel inside its own.
            if !relay.forward(agent_id, &message) {
                send(reply(PlaneBody::Relayed(RelayedPlaneMessage {
                    agent_id: frame.agent_id.clone(),
                    plane_message: Vec::new(),
                    closed: true,
                    reason: "the relay's uplink is down".to_string(),
                    link: frame.link,
                    refused: false,
                    replaced: false,
                })))
                .await?;
            }
        }
        Some(AgentBody::RelayCert(_)) => {
            if !relay.forward(agent_id, &message) {
                send(reply(PlaneBody::RelayCert(RelayCertResponse {
                    cert_pem: String::new(),
                    error: "the relay's uplink is down".to_string(),
                })))
                .await?;
            }
        }
        Some(AgentBody::Hello(_)) | None => {}
    }
    Ok(())
}
