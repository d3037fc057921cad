//! The agent's side of the session link, chosen by the endpoint URL: `https://host:port` is a
//! gRPC bidirectional stream (tonic, HTTP/2), `quic://host:port` length-delimited protobuf
//! messages (`stella_proto::framing`) on one QUIC stream (quinn). Both carry the same messages
//! with the same mTLS identity; the session loop (`runtime.rs`) sees only a sink of
//! `AgentMessage` and a stream of `PlaneMessage`, so it behaves identically on either.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{Stream, StreamExt as _};
use stella_proto::agent_session_client::AgentSessionClient;
use stella_proto::framing::{self, close};
use stella_proto::{AgentMessage, PlaneMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::identity::AgentIdentity;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// QUIC keep-alive from the agent's side; the plane sends its own at its heartbeat interval.
pub(crate) const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Upper bound of the QUIC idle timeout; the smaller of both sides' values applies.
pub(crate) const QUIC_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// gRPC over HTTP/2 over TLS.
    Grpc,
    /// Length-delimited protobuf on one QUIC stream.
    Quic,
}

/// Where the plane's agent endpoint is, parsed from `https://host:port` or `quic://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl {
    pub transport: Transport,
    /// Host name or address without brackets (the name the server certificate must carry).
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("agent endpoint {0:?}: use https://host:port (gRPC) or quic://host:port (QUIC)")]
    Scheme(String),
    #[error("agent endpoint {0:?}: expected host:port")]
    Authority(String),
}

impl EndpointUrl {
    pub fn parse(url: &str) -> Result<Self, EndpointError> {
        let (transport, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (Transport::Grpc, rest)
        } else if let Some(rest) = url.strip_prefix("quic://") {
            (Transport::Quic, rest)
        } else {
            return Err(EndpointError::Scheme(url.to_string()));
        };
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| EndpointError::Authority(url.to_string()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .map_err(|_| EndpointError::Authority(url.to_string()))?;
        if host.is_empty() || authority.contains('/') {
            return Err(EndpointError::Authority(url.to_string()));
        }
        Ok(Self {
            transport,
            host: host.to_string(),
            port,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Which endpoint to dial next, when an agent knows several addresses of its plane.
///
/// The agent tries its endpoints in order. A failed connect or a lost session moves it to the
/// next one at once; only when every endpoint of a round failed does it back off (the caller's
/// capped, jittered backoff, indexed by the round), so a dead first address costs one connect
/// timeout, not a growing delay. Each round starts at the endpoint that last held a session.
#[derive(Debug, Clone)]
pub struct Failover {
    endpoints: Vec<String>,
    /// Index of the endpoint that last held a session: rounds start there.
    preferred: usize,
    /// Index of the endpoint to dial next.
    current: usize,
    /// Endpoints that failed in the current round.
    failed_in_round: usize,
    /// Rounds in a row in which every endpoint failed.
    rounds: u32,
}

/// What to do after the current endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Dial the next endpoint of this round now.
    Next,
    /// Every endpoint failed this round: back off (the value is the round, from 0) before the
    /// next round.
    BackOff(u32),
}

impl Failover {
    /// `endpoints` in priority order; an empty list is refused by the caller's validation.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            preferred: 0,
            current: 0,
            failed_in_round: 0,
            rounds: 0,
        }
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The endpoint to dial now.
    pub fn current(&self) -> &str {
        self.endpoints
            .get(self.current)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// A session was established on the current endpoint: prefer it from now on.
    pub fn established(&mut self) {
        self.preferred = self.current;
        self.failed_in_round = 0;
        self.rounds = 0;
    }

    /// The current endpoint failed (no session, or the session was lost).
    pub fn failed(&mut self) -> AfterFailure {
        self.failed_in_round += 1;
        if self.failed_in_round >= self.endpoints.len() {
            let round = self.rounds;
            self.rounds = self.rounds.saturating_add(1);
            self.failed_in_round = 0;
            self.current = self.preferred;
            AfterFailure::BackOff(round)
        } else {
            self.current = (self.current + 1) % self.endpoints.len();
            AfterFailure::Next
        }
    }

    /// The plane sent the agent away (drain, admission control) or refused it there: the
    /// plane decides the delay; the next attempt goes to the next endpoint, and a new round
    /// begins (the plane answered, so this is not a failed round).
    pub fn sent_away(&mut self) {
        self.failed_in_round = 0;
        self.rounds = 0;
        if !self.endpoints.is_empty() {
            self.current = (self.current + 1) % self.endpoints.len();
        }
    }

    /// Adopts a new list (e.g. the plane advertised more endpoints), keeping the current and
    /// preferred endpoints by URL when they are still listed.
    pub fn set_endpoints(&mut self, endpoints: Vec<String>) {
        if endpoints == self.endpoints || endpoints.is_empty() {
            return;
        }
        let find = |i: usize| {
            self.endpoints
                .get(i)
                .and_then(|url| endpoints.iter().position(|e| e == url))
        };
        let preferred = find(self.preferred).unwrap_or(0);
        let current = find(self.current).unwrap_or(preferred);
        self.endpoints = endpoints;
        self.preferred = preferred;
        self.current = current;
        self.failed_in_round = self.failed_in_round.min(self.endpoints.len() - 1);
    }
}

/// Why a link could not be opened or broke.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The plane refuses this identity (unknown, revoked, not the enrolled certificate).
    #[error("the plane refuses this agent: {0}")]
    Refused(String),
    #[error(transparent)]
    Broken(#[from] anyhow::Error),
}

pub type Inbound = Pin<Box<dyn Stream<Item = Result<PlaneMessage, LinkError>> + Send>>;

/// An open session link: messages for the plane go into `outbound`, the plane's come out of
/// `inbound`. Dropping it closes the connection.
pub struct Link {
    pub outbound: mpsc::Sender<AgentMessage>,
    pub inbound: Inbound,
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some((_, connection)) = &self.quic {
            connection.close(close::DONE.into(), b"agent closed the session");
        }
    }
}

/// Connects to the plane and opens the session stream, `hello` first.
pub async fn open(
    url: &str,
    ca_pem: &str,
    ident: &AgentIdentity,
    hello: AgentMessage,
) -> Result<Link, LinkError> {
    let endpoint = EndpointUrl::parse(url).map_err(anyhow::Error::from)?;
    match endpoint.transport {
        Transport::Grpc => open_grpc(&endpoint, ca_pem, ident, hello).await,
        Transport::Quic => open_quic(&endpoint, ca_pem, ident, hello).await,
    }
}

async fn open_grpc(
    endpoint: &EndpointUrl,
    ca_pem: &str,
    ident: &AgentIdentity,
    hello: AgentMessage,
) -> Result<Link, LinkError> {
    let url = format!("https://{}", endpoint.authority());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&ident.cert_pem, &ident.key_pem))
        .domain_name(endpoint.host.clone());
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid agent endpoint {url}"))?
        .tls_config(tls)
        .context("agent TLS configuration")?;
    let channel = channel
        .connect_timeout(CONNECT_TIMEOUT)
        // HTTP/2 pings notice a dead connection even when the session is quiet.
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, channel.connect())
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {url}: timed out after {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("connecting to {url}"))?;
    let mut client = AgentSessionClient::new(channel);
    let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(256);
    out_tx
        .send(hello)
        .await
        .map_err(|_| anyhow::anyhow!("session stream closed before the hello"))?;
    let inbound = match client.session(ReceiverStream::new(out_rx)).await {
        Ok(response) => response.into_inner(),
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            ) =>
        {
            return Err(LinkError::Refused(status.message().to_string()));
        }
        Err(status) => {
            return Err(anyhow::Error::new(status)
                .context("opening the session")
                .into());
        }
    };
    Ok(Link {
        outbound: out_tx,
        inbound: Box::pin(inbound.map(|m| {
            m.map_err(|status| {
                LinkError::Broken(anyhow::Error::new(status).context("session stream"))
            })
        })),
        quic: None,
    })
}

fn quic_client_config(ca_pem: &str, ident: &AgentIdentity) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = stella_pki::client_config_mtls(ca_pem, &ident.cert_pem, &ident.key_pem)
        .context("agent TLS configuration")?;
    tls.alpn_protocols = vec![framing::QUIC_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("the agent TLS configuration cannot speak QUIC")?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(QUIC_KEEP_ALIVE));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(QUIC_IDLE_TIMEOUT).context("idle timeout")?,
    ));
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

async fn open_quic(
    endpoint: &EndpointUrl,
    ca_pem: &str,
    ident: &AgentIdentity,
    hello: AgentMessage,
) -> Result<Link, LinkError> {
    let authority = endpoint.authority();
    let addr = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{authority} resolves to no address"))?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut client = quinn::Endpoint::client(bind).context("binding a UDP socket")?;
    client.set_default_client_config(quic_client_config(ca_pem, ident)?);
    let connecting = client
        .connect(addr, &endpoint.host)
        .with_context(|| format!("connecting to quic://{authority}"))?;
    let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            anyhow::anyhow!("connecting to quic://{authority}: timed out after {CONNECT_TIMEOUT:?}")
        })?
        .map_err(|e| closed_error(e, &authority))?;
    let (mut send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| closed_error(e, &authority))?;
    let hello = framing::encode(&hello).context("framing the hello")?;
    send.write_all(&hello)
        .await
        .map_err(|e| LinkError::Broken(anyhow::Error::new(e).context("sending the hello")))?;

    let (out_tx, mut out_rx) = mpsc::channel::<AgentMessage>(256);
    tokio::spawn(async move {
        if stella_quic::write_frames(&mut send, &mut out_rx).await {
            let _ = send.finish();
        }
    });
    Ok(Link {
        outbound: out_tx,
        inbound: Box::pin(framed_inbound(recv, "plane")),
        quic: Some((client, connection)),
    })
}

/// A connection the plane closed with `REFUSED` is a refusal; anything else is a broken link.
fn closed_error(e: quinn::ConnectionError, authority: &str) -> LinkError {
    if let quinn::ConnectionError::ApplicationClosed(close) = &e
        && close.error_code == quinn::VarInt::from(close::REFUSED)
    {
        return LinkError::Refused(String::from_utf8_lossy(&close.reason).into_owned());
    }
    LinkError::Broken(anyhow::Error::new(e).context(format!("quic://{authority}")))
}

/// The messages of a framed QUIC stream from `peer` (named in errors); a connection `peer`
/// closed as `REFUSED` is a refusal. The agent's session reads plane messages, the relay's QUIC
/// listener agent messages.
pub(crate) fn framed_inbound<M: prost::Message + Default + Send + 'static>(
    recv: quinn::RecvStream,
    peer: &'static str,
) -> impl Stream<Item = Result<M, LinkError>> + Send + Unpin {
    stella_quic::framed_inbound(recv).map(move |m| {
        m.map_err(|e| match e {
            stella_quic::ReadError::ConnectionLost(e) => closed_error(e, peer),
            stella_quic::ReadError::Stream(e) => LinkError::Broken(anyhow::anyhow!(e)),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_picks_the_transport() {
        assert_eq!(
            EndpointUrl::parse("https://plane.example:7444").unwrap(),
            EndpointUrl {
                transport: Transport::Grpc,
                host: "plane.example".to_string(),
                port: 7444
            }
        );
        let quic = EndpointUrl::parse("quic://[::1]:7445/").unwrap();
        assert_eq!(quic.transport, Transport::Quic);
        assert_eq!(quic.host, "::1");
        assert_eq!(quic.authority(), "[::1]:7445");
    }

    #[test]
    fn other_schemes_and_missing_ports_are_refused_with_the_url() {
        for (url, expected) in [
            ("http://plane:7444", "use https://host:port"),
            ("plane:7444", "use https://host:port"),
            ("quic://plane", "expected host:port"),
            ("quic://plane:notaport", "expected host:port"),
            ("https://:7444", "expected host:port"),
            ("https://plane:7444/path", "expected host:port"),
        ] {
            let e = EndpointUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(expected) && e.contains(url), "{url}: {e}");
        }
    }

    fn failover(urls: &[&str]) -> Failover {
        Failover::new(urls.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_failed_endpoint_moves_on_at_once_and_a_failed_round_backs_off() {
        let mut f = failover(&["https://a:1", "https://b:2", "https://c:3"]);
        assert_eq!(f.current(), "https://a:1");
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.current(), "https://b:2");
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.current(), "https://c:3");
        // Only a whole round of failures counts towards the backoff, round by round.
        assert_eq!(f.failed(), AfterFailure::BackOff(0));
        assert_eq!(
            f.current(),
            "https://a:1",
            "a round starts at the preferred one"
        );
        for _ in 0..2 {
            assert_eq!(f.failed(), AfterFailure::Next);
        }
        assert_eq!(f.failed(), AfterFailure::BackOff(1));
    }

    #[test]
    fn the_endpoint_that_worked_is_preferred_and_resets_the_backoff() {
        let mut f = failover(&["https://a:1", "https://b:2", "https://c:3"]);
        assert_eq!(f.failed(), AfterFailure::Next);
        f.established(); // on b
        assert_eq!(f.current(), "https://b:2");
        // The session on b is lost: c next, then a, then the round is over and starts at b.
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.current(), "https://c:3");
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.current(), "https://a:1");
        assert_eq!(f.failed(), AfterFailure::BackOff(0));
        assert_eq!(f.current(), "https://b:2");
    }

    #[test]
    fn one_endpoint_backs_off_every_time_as_before() {
        let mut f = failover(&["quic://a:1"]);
        for round in 0..4 {
            assert_eq!(f.failed(), AfterFailure::BackOff(round));
            assert_eq!(f.current(), "quic://a:1");
        }
        f.established();
        assert_eq!(f.failed(), AfterFailure::BackOff(0));
        f.sent_away();
        assert_eq!(f.current(), "quic://a:1");
    }

    #[test]
    fn being_sent_away_tries_the_next_endpoint_in_a_fresh_round() {
        let mut f = failover(&["https://a:1", "https://b:2"]);
        f.established();
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.failed(), AfterFailure::BackOff(0));
        // a drains us (shutdown, admission control): b next, and the round count starts over.
        f.sent_away();
        assert_eq!(f.current(), "https://b:2");
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.failed(), AfterFailure::BackOff(0));
    }

    #[test]
    fn a_new_list_keeps_the_current_and_preferred_endpoints() {
        let mut f = failover(&["https://a:1", "https://b:2"]);
        assert_eq!(f.failed(), AfterFailure::Next);
        f.established(); // on b
        f.set_endpoints(vec![
            "https://c:3".to_string(),
            "https://a:1".to_string(),
            "https://b:2".to_string(),
        ]);
        assert_eq!(f.current(), "https://b:2");
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.current(), "https://c:3");
        assert_eq!(f.failed(), AfterFailure::Next);
        assert_eq!(f.failed(), AfterFailure::BackOff(0));
        assert_eq!(f.current(), "https://b:2");
        // A list without them starts over at its first; an empty one changes nothing.
        f.set_endpoints(vec!["https://d:4".to_string()]);
        assert_eq!(f.current(), "https://d:4");
        f.set_endpoints(Vec::new());
        assert_eq!(f.endpoints(), ["https://d:4".to_string()]);
    }
}
