//! The agent endpoint over QUIC (quinn): the same session as the gRPC endpoint, as
//! length-delimited protobuf messages (`stella_proto::framing`) on one bidirectional stream the
//! agent opens. TLS 1.3 with the same server certificate, the same client-certificate verifier
//! (refusals counted by reason) and the same identity checks (`session::open`).
//!
//! What QUIC adds: no head-of-line blocking behind a lost TCP segment, connection migration
//! (an agent whose address or NAT mapping changes keeps its session), and an idle timeout with
//! keep-alives negotiated by both ends, so a half-open path is noticed by the transport too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt as _;
use stella_proto::framing::{self, close};
use stella_proto::{AgentMessage, PlaneMessage};
use stella_quic::{ServerConfigCache, framed_inbound, peer_certificate, write_frames};
use tokio::sync::{mpsc, watch};

use crate::session::{self, Opening, Refusal};
use crate::state::SharedState;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent has to open its session stream after the handshake.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the UDP socket (so a bad address fails `stella serve` at once) without serving yet.
/// `reset_key_file` holds the stateless-reset key (made on first use).
pub fn bind(addr: SocketAddr, reset_key_file: &Path) -> anyhow::Result<quinn::Endpoint> {
    let reset_key = stateless_reset_key(reset_key_file)?;
    // The connection ids must be recognisable too: quinn only resets packets whose id its
    // generator validates, and its default generator's key is random per process.
    let cid_key = ring::hmac::sign(&reset_key, b"stella quic connection ids");
    let mut cid_key_bytes = [0u8; 8];
    cid_key_bytes.copy_from_slice(&cid_key.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key_bytes);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // quinn sends at most one reset per 20 ms by default: after a restart, a fleet of 10,000
    // would need minutes to hear of it, longer than the silence bound. Garbage packets cannot
    // exploit a shorter interval much: their ids fail validation, and a reset is always
    // smaller than the packet that caused it.
    config.min_reset_interval(Duration::from_millis(1));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    let socket = std::net::UdpSocket::bind(addr)
        .with_context(|| format!("binding the QUIC agent endpoint address {addr}"))?;
    quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))
        .context("starting the QUIC endpoint")
}

/// The key behind QUIC stateless resets (and connection ids), kept in the data directory so a
/// restarted plane can reset the sessions its previous process held: an agent's next packet to the new process is
/// answered with a reset it can verify and it redials at once (as a TCP reset does for gRPC),
/// instead of waiting out three silent heartbeat intervals. quinn's default key is random per
/// process, so after a restart every QUIC agent of the fleet waited (30 s with the default
/// interval; found by the 200-agent storm test).
fn stateless_reset_key(path: &Path) -> anyhow::Result<ring::hmac::Key> {
    let secret = match std::fs::read(path) {
        Ok(secret) if secret.len() == 32 => secret,
        Ok(_) => anyhow::bail!(
            "{} is not a 32-byte key; remove it and a new one is made at the next start",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = rand::random();
            stella_pki::write_secret_file(path, &secret)
                .with_context(|| format!("writing {}", path.display()))?;
            secret.to_vec()
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret))
}

/// QUIC transport settings derived from the heartbeat interval: keep-alives at that interval and
/// an idle timeout of three intervals — the same bound the session applies to silent agents.
fn transport(heartbeat: Duration) -> quinn::TransportConfig {
    let heartbeat = heartbeat.clamp(Duration::from_millis(200), Duration::from_secs(15));
    stella_quic::session_transport(heartbeat, (heartbeat * 3).max(Duration::from_secs(3)))
}

/// Accepts QUIC connections until shutdown; each handshake holds a slot of the plane's
/// handshake limit, each session runs the shared session core.
pub async fn serve(
    endpoint: quinn::Endpoint,
    state: SharedState,
    mut shutdown: watch::Receiver<bool>,
) {
    let configs = Arc::new(ServerConfigCache::new(transport(
        state.config.heartbeat_interval,
    )));
    // quinn drops new connections while the endpoint has no server configuration; each
    // connection is then accepted with the configuration current at that moment.
    match configs.get(state.tls.agent()) {
        Ok(config) => endpoint.set_server_config(Some((*config).clone())),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "QUIC agent endpoint disabled: no usable TLS configuration");
            return;
        }
    }
    loop {
        // The slot first: beyond the limit, new connections wait in quinn's incoming queue.
        let slot = tokio::select! {
            slot = state.hub.handshakes.slot() => slot,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let Some(slot) = slot else { break };
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait_for(|v| *v) => break,
        };
        let Some(incoming) = incoming else { break };
        let config = match configs.get(state.tls.agent()) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "QUIC connection refused: no usable TLS configuration");
                incoming.refuse();
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let connecting = match incoming.accept_with(config) {
                Ok(connecting) => connecting,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "QUIC connection not accepted");
                    return;
                }
            };
            let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(e)) => {
                    crate::state::count(&state.handshake_refusals, "handshake_failed");
                    tracing::info!(%peer, error = %e, "agent QUIC handshake refused");
                    return;
                }
                Err(_) => {
                    crate::state::count(&state.handshake_refusals, "handshake_timeout");
                    return;
                }
            };
            drop(slot);
            serve_connection(connection, state).await;
        });
    }
    endpoint.close(close::DONE.into(), b"plane shutting down");
    endpoint.wait_idle().await;
}

async fn serve_connection(connection: quinn::Connection, state: SharedState) {
    let peer = connection.remote_address();
    // The verifier required a certificate; its absence here would be a quinn/rustls change.
    let Some(leaf) = peer_certificate(&connection) else {
        connection.close(close::REFUSED.into(), b"a client certificate is required");
        return;
    };
    let opening = match session::open(&state, &leaf).await {
        Ok(opening) => opening,
        Err(refusal) => {
            let (code, reason) = match refusal {
                Refusal::Unauthenticated(m) | Refusal::PermissionDenied(m) => (close::REFUSED, m),
                Refusal::Internal(m) => (close::INTERNAL, m),
            };
            connection.close(code.into(), reason.as_bytes());
            return;
        }
    };
    let (mut send, recv) = match tokio::time::timeout(STREAM_TIMEOUT, connection.accept_bi()).await
    {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "QUIC connection ended before its session stream");
            return;
        }
        Err(_) => {
            connection.close(close::PROTOCOL.into(), b"no session stream");
            return;
        }
    };
    let opened = match opening {
        Opening::Deferred(drain) => {
            if let Ok(frame) = framing::encode(&drain) {
                let _ = send.write_all(&frame).await;
            }
            let _ = send.finish();
            // The agent closes once it read the drain; do not wait for it for long.
            let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            return;
        }
        Opening::Admitted(opened) => opened,
    };

    let (tx, mut rx) = mpsc::channel::<PlaneMessage>(64);
    let writer_connection = connection.clone();
    let writer = tokio::spawn(async move {
        if !write_frames(&mut send, &mut rx).await {
            return;
        }
        // The session ended: say so cleanly, then give the agent a moment to read the rest.
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        writer_connection.close(close::DONE.into(), b"session ended");
    });
    // Shutdown is handled inside the session: it sends a drain and ends.
    let inbound = framed_inbound::<AgentMessage>(recv).map(|m| m.map_err(|e| e.to_string()));
    session::serve_opened(state, opened, inbound, tx).await;
    // The writer ends when the session drops its sender; it closes the connection.
    let _ = writer.await;
    tracing::debug!(%peer, "QUIC session connection closed");
}
