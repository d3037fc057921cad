//! The agent session over QUIC, the pieces both ends share: the plane and the relay accept
//! sessions, the agent (and a relay's uplink) opens them. A session is one bidirectional stream
//! of length-delimited protobuf messages (`stella_proto::framing`).
//!
//! - [`framed_inbound`]: the messages arriving on a stream, decoded as they come.
//! - [`write_frames`]: a channel of messages written as frames.
//! - [`ServerConfigCache`]: the quinn server configuration for a rustls one, with the session
//!   ALPN, rebuilt only when the rustls configuration is replaced (renewal, CA rotation).
//! - [`peer_certificate`]: the client certificate a connection presented.
//!
//! Deliberately absent: endpoints, accept loops and policy (handshake limits, identity checks,
//! close reasons): those differ between the plane and the relay and stay with them.

use std::sync::{Arc, Mutex};

use futures_util::Stream;
use rustls::pki_types::CertificateDer;
use stella_proto::framing::{self, FrameDecoder};
use tokio::sync::mpsc;

/// Why the message stream ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection went away; the peer's close code and reason are in it.
    #[error(transparent)]
    ConnectionLost(quinn::ConnectionError),
    /// A cut frame, an oversized or undecodable message, or a stream-level failure.
    #[error("session stream: {0}")]
    Stream(String),
}

/// The messages of a framed stream, decoded as they arrive. The stream ends after the peer
/// finishes its side; a cut frame, an oversized or undecodable message or a lost connection end
/// it with one error.
pub fn framed_inbound<M: prost::Message + Default + Send + 'static>(
    recv: quinn::RecvStream,
) -> impl Stream<Item = Result<M, ReadError>> + Send + Unpin {
    Box::pin(futures_util::stream::unfold(
        (recv, FrameDecoder::new(), false),
        |(mut recv, mut decoder, done)| async move {
            if done {
                return None;
            }
            loop {
                match decoder.next_message::<M>() {
                    Ok(Some(message)) => return Some((Ok(message), (recv, decoder, false))),
                    Ok(None) => {}
                    Err(e) => {
                        return Some((
                            Err(ReadError::Stream(e.to_string())),
                            (recv, decoder, true),
                        ));
                    }
                }
                let error = match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => {
                        decoder.push(&chunk.bytes);
                        continue;
                    }
                    Ok(None) => match decoder.finish() {
                        Ok(()) => return None,
                        Err(e) => ReadError::Stream(e.to_string()),
                    },
                    Err(quinn::ReadError::ConnectionLost(e)) => ReadError::ConnectionLost(e),
                    Err(e) => ReadError::Stream(e.to_string()),
                };
                return Some((Err(error), (recv, decoder, true)));
            }
        },
    ))
}

/// Writes each message of `messages` as a frame until the channel closes (true: the caller may
/// finish the stream) or the stream fails (false). A message too large to frame is logged and
/// dropped.
pub async fn write_frames<M: prost::Message>(
    send: &mut quinn::SendStream,
    messages: &mut mpsc::Receiver<M>,
) -> bool {
    while let Some(message) = messages.recv().await {
        let frame = match framing::encode(&message) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!(error = %e, "a message cannot be framed; dropped");
                continue;
            }
        };
        if send.write_all(&frame).await.is_err() {
            return false;
        }
    }
    true
}

/// The first certificate the peer presented, if any (DER).
pub fn peer_certificate(connection: &quinn::Connection) -> Option<Vec<u8>> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().map(|c| c.to_vec())
}

/// The rustls configuration cannot serve QUIC (no TLS 1.3 suite QUIC can use).
#[derive(Debug, thiserror::Error)]
#[error("the TLS configuration cannot serve QUIC: {0}")]
pub struct ServerConfigError(String);

/// The quinn server configuration for the current rustls one, with the session ALPN, the
/// caller's transport settings and connection migration; rebuilt only when the rustls
/// configuration is a new one (compared by pointer).
pub struct ServerConfigCache {
    transport: Arc<quinn::TransportConfig>,
    current: Mutex<Option<(Arc<rustls::ServerConfig>, Arc<quinn::ServerConfig>)>>,
}

impl ServerConfigCache {
    pub fn new(transport: quinn::TransportConfig) -> Self {
        Self {
            transport: Arc::new(transport),
            current: Mutex::new(None),
        }
    }

    pub fn get(
        &self,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<Arc<quinn::ServerConfig>, ServerConfigError> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((source, built)) = current.as_ref()
            && Arc::ptr_eq(source, &tls)
        {
            return Ok(built.clone());
        }
        let mut rustls_config = (*tls).clone();
        rustls_config.alpn_protocols = vec![framing::QUIC_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls_config)
            .map_err(|e| ServerConfigError(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(self.transport.clone());
        config.migration(true);
        let built = Arc::new(config);
        *current = Some((tls, built.clone()));
        Ok(built)
    }
}

/// Transport settings for the accepting side of sessions: keep-alives every `keep_alive`, an
/// idle timeout of `idle`, one bidirectional stream per connection and no other.
pub fn session_transport(
    keep_alive: std::time::Duration,
    idle: std::time::Duration,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(1u8.into());
    t.max_concurrent_uni_streams(0u8.into());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use std::time::Duration;
    use stella_proto::{AgentMessage, Heartbeat, agent_message::Body};

    fn beat(n: i64) -> AgentMessage {
        AgentMessage {
            body: Some(Body::Heartbeat(Heartbeat { sent_at_unix_ms: n })),
        }
    }

    /// A server and a client endpoint on loopback with a throwaway CA (server auth only).
    fn endpoints() -> (quinn::Endpoint, quinn::Endpoint, ServerConfigCache) {
        let ca = stella_pki::CertificateAuthority::generate("quic test CA").unwrap();
        let server = ca
            .issue_server_cert(
                &[],
                &["127.0.0.1".parse().unwrap()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let tls =
            stella_pki::server_config(&server.cert_pem, &server.key_pem, ca.cert_pem()).unwrap();
        let cache = ServerConfigCache::new(session_transport(
            Duration::from_secs(1),
            Duration::from_secs(10),
        ));
        let tls = Arc::new(tls);
        let config = cache.get(tls.clone()).unwrap();
        // The same rustls configuration gives the same quinn configuration.
        assert!(Arc::ptr_eq(&config, &cache.get(tls).unwrap()));
        let server =
            quinn::Endpoint::server((*config).clone(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let mut client_tls = stella_pki::client_config_ca(ca.cert_pem()).unwrap();
        client_tls.alpn_protocols = vec![framing::QUIC_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        (server, client, cache)
    }

    #[tokio::test]
    async fn frames_written_arrive_in_order_and_a_cut_frame_is_an_error() {
        stella_pki::install_crypto_provider();
        let (server, client, _cache) = endpoints();
        let addr = server.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let connection = server.accept().await.unwrap().await.unwrap();
            assert!(
                peer_certificate(&connection).is_none(),
                "no client certificate"
            );
            let (_send, recv) = connection.accept_bi().await.unwrap();
            let messages: Vec<Result<AgentMessage, ReadError>> =
                framed_inbound(recv).collect().await;
            (messages, connection)
        });
        let connection = client.connect(addr, "127.0.0.1").unwrap().await.unwrap();
        let (mut send, _recv) = connection.open_bi().await.unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        for seq in 1..=3 {
            tx.send(beat(seq)).await.unwrap();
        }
        drop(tx);
        assert!(write_frames(&mut send, &mut rx).await);
        // Half a frame, then the end of the stream: the reader must not take it for a message.
        let cut = framing::encode(&beat(4)).unwrap();
        send.write_all(&cut[..cut.len() - 1]).await.unwrap();
        send.finish().unwrap();
        let (messages, _server_connection) = accept.await.unwrap();
        assert_eq!(messages.len(), 4, "{messages:?}");
        for (i, message) in messages[..3].iter().enumerate() {
            assert_eq!(message.as_ref().unwrap(), &beat(i as i64 + 1));
        }
        assert!(
            matches!(messages[3], Err(ReadError::Stream(_))),
            "{messages:?}"
        );
    }
}
