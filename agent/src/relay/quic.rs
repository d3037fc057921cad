//! The relay's QUIC listener (`stella-agent relay --quic-listen`): leaves whose endpoint is
//! `quic://RELAY` hold their session with the relay over QUIC, as they would with the plane —
//! length-delimited messages (`stella_proto::framing`) on one bidirectional stream, TLS 1.3 with
//! the relay's server certificate, a client certificate from the plane's CA required. Behind the
//! handshake the session is the one the gRPC listener serves (`server::open_leaf`).
//!
//! Enrollment and renewal stay on the TLS listener (`--listen`): they are HTTP requests passed
//! through to the plane, and a leaf without a certificate has nothing to present here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use stella_proto::framing::close;
use stella_proto::{AgentMessage, PlaneMessage};
use stella_quic::{ServerConfigCache, peer_certificate, session_transport, write_frames};

use super::Relay;
use super::server::{LeafRefusal, open_leaf};
use crate::transport::{QUIC_IDLE_TIMEOUT, QUIC_KEEP_ALIVE, framed_inbound};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leaf has to open its session stream after the handshake.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the UDP socket, so that a bad or taken address stops the relay at once; serving waits
/// for the relay's server certificate ([`serve`]).
pub fn bind(addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)
        .with_context(|| format!("binding the relay's QUIC address {addr}"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting the relay's QUIC endpoint")
}

/// Accepts leaves over QUIC until the task is aborted (the relay stopping).
pub async fn serve(relay: Arc<Relay>, endpoint: quinn::Endpoint) {
    let configs = ServerConfigCache::new(session_transport(QUIC_KEEP_ALIVE, QUIC_IDLE_TIMEOUT));
    // quinn refuses connections while the endpoint has no server configuration: set one as soon
    // as the relay has its certificate; each connection then takes the one current at its
    // arrival.
    match configs.get(relay.wait_tls().await) {
        Ok(config) => endpoint.set_server_config(Some((*config).clone())),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "relay QUIC listener disabled");
            return;
        }
    }
    tracing::info!(listen = ?endpoint.local_addr().ok(), "relay QUIC listener ready");
    while let Some(incoming) = endpoint.accept().await {
        let config = match relay.tls().map(|tls| configs.get(tls)) {
            Some(Ok(config)) => config,
            Some(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "QUIC leaf refused: no usable TLS configuration");
                incoming.refuse();
                continue;
            }
            None => {
                incoming.refuse();
                continue;
            }
        };
        let relay = relay.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let connecting = match incoming.accept_with(config) {
                Ok(connecting) => connecting,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "QUIC leaf not accepted");
                    return;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                Ok(Ok(connection)) => serve_connection(relay, connection).await,
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "leaf QUIC handshake refused"),
                Err(_) => tracing::info!(%peer, "leaf QUIC handshake timed out"),
            }
        });
    }
}

async fn serve_connection(relay: Arc<Relay>, connection: quinn::Connection) {
    let peer = connection.remote_address();
    // The TLS listener lets certificate-less clients through for enrollment; a session needs one.
    let Some(cert) = peer_certificate(&connection) else {
        connection.close(close::REFUSED.into(), b"a client certificate is required");
        return;
    };
    let (mut send, recv) = match tokio::time::timeout(STREAM_TIMEOUT, connection.accept_bi()).await
    {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "QUIC leaf left before its session stream");
            return;
        }
        Err(_) => {
            connection.close(close::PROTOCOL.into(), b"no session stream");
            return;
        }
    };
    let inbound =
        framed_inbound::<AgentMessage>(recv, "agent").map(|m| m.map_err(|e| e.to_string()));
    let mut to_leaf: tokio::sync::mpsc::Receiver<PlaneMessage> =
        match open_leaf(relay, cert, inbound).await {
            Ok(rx) => rx,
            Err(refusal) => {
                let (code, reason) = match refusal {
                    LeafRefusal::Unauthenticated(m) | LeafRefusal::PermissionDenied(m) => {
                        (close::REFUSED, m)
                    }
                    LeafRefusal::NoHello => (
                        close::PROTOCOL,
                        "the first message must be a hello".to_string(),
                    ),
                };
                connection.close(code.into(), reason.as_bytes());
                return;
            }
        };
    if write_frames(&mut send, &mut to_leaf).await {
        // The relay ended the session: say so cleanly, then give the leaf a moment to read it.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    connection.close(close::DONE.into(), b"session ended");
    tracing::debug!(%peer, "QUIC leaf connection closed");
}
