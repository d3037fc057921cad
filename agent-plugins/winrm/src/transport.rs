//! HTTP(S) transport for WS-Management: one keep-alive connection at a time, Basic or NTLM
//! authentication, and NTLM message encryption (MS-WSMV 2.2.9.1.1) on plain HTTP.
//!
//! Built on hyper's single-connection client rather than reqwest: NTLM authenticates a TCP
//! *connection* (NEGOTIATE, CHALLENGE and AUTHENTICATE must travel on the same socket, and the
//! sealing keys then belong to it), while a pooled client such as reqwest does not let the
//! caller know or choose which connection a request uses. Here the connection is explicit: it
//! is taken out for each request and put back only when the exchange completed, so a request
//! abandoned at a deadline drops its connection, and the next request dials and
//! authenticates afresh. TLS is rustls with the ring provider only.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::config::{Auth, Endpoint, Tls};
use crate::ntlm::{self, SessionSecurity};

const SOAP_CONTENT_TYPE: &str = "application/soap+xml;charset=UTF-8";
const ENCRYPTED_PROTOCOL: &str = "application/HTTP-SPNEGO-session-encrypted";
const BOUNDARY: &[u8] = b"--Encrypted Boundary";
/// Far above WS-Man's 150 KiB envelopes; only a guard against a misbehaving peer.
const MAX_RESPONSE_BYTES: usize = 16 << 20;
const NTLM_REJECTED: &str =
    "HTTP 401: the server rejected the NTLM credentials (user name, domain or password)";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Auth(String),
    #[error("HTTP {status}: {detail}")]
    Http { status: u16, detail: String },
    #[error("{0}")]
    Protocol(String),
    #[error("timed out")]
    TimedOut,
}

/// Status and (decrypted) body of a WS-Man exchange that the server answered with SOAP.
pub struct Reply {
    pub status: u16,
    pub body: String,
}

struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// NTLM over HTTP: the context's sealing state; None for Basic and over TLS.
    security: Option<SessionSecurity>,
}

pub struct Transport {
    endpoint: Endpoint,
    auth: Auth,
    username: String,
    password: String,
    tls: Option<tokio_rustls::TlsConnector>,
    connect_timeout: Duration,
    conn: Option<Conn>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("endpoint", &self.endpoint.url())
            .field("auth", &self.auth)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Accepts any server certificate (`insecure_skip_verify`), but still checks that the
/// handshake is signed by the key in it, so the session is at least bound to that key.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls client config for `tls`, or None for plain HTTP. Reads `ca_file` now.
pub fn tls_connector(tls: &Tls) -> Result<Option<tokio_rustls::TlsConnector>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let mut config = match tls {
        Tls::None => return Ok(None),
        Tls::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("ca_file {}: cannot read: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("ca_file {}: bad PEM: {e}", path.display()))?;
                roots.add(cert).map_err(|e| {
                    format!("ca_file {}: unusable certificate: {e}", path.display())
                })?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "ca_file {}: contains no certificate",
                    path.display()
                ));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Tls::InsecureSkipVerify => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

/// The base64 token of the first `WWW-Authenticate: <scheme> <token>` the server sent.
fn challenge_token(headers: &HeaderMap, scheme: &str) -> Option<String> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|v| {
            let (s, token) = v.split_once(' ')?;
            (s.eq_ignore_ascii_case(scheme) && !token.trim().is_empty())
                .then(|| token.trim().to_string())
        })
}

fn offered_schemes(headers: &HeaderMap) -> String {
    let all: Vec<&str> = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|v| v.split_whitespace().next())
        .filter(|s| !s.contains('='))
        .collect();
    if all.is_empty() {
        "none".to_string()
    } else {
        all.join(", ")
    }
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Wraps a SOAP message as MS-WSMV's `multipart/encrypted` body.
pub fn encrypt_body(security: &mut SessionSecurity, message: &[u8]) -> Vec<u8> {
    let mut sealed = message.to_vec();
    let signature = security.seal(&mut sealed);
    let mut out = Vec::with_capacity(message.len() + 256);
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(b"\r\n\tContent-Type: ");
    out.extend_from_slice(ENCRYPTED_PROTOCOL.as_bytes());
    out.extend_from_slice(
        format!(
            "\r\n\tOriginalContent: type={SOAP_CONTENT_TYPE};Length={}\r\n",
            message.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(b"\r\n\tContent-Type: application/octet-stream\r\n");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&signature);
    out.extend_from_slice(&sealed);
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(b"--\r\n");
    out
}

/// Unwraps a `multipart/encrypted` body (one part, as Windows and pywinrm send for NTLM).
pub fn decrypt_body(security: &mut SessionSecurity, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut first = BOUNDARY.to_vec();
    first.extend_from_slice(b"\r\n");
    let start = find(body, &first, 0).ok_or("encrypted body: no MIME boundary")? + first.len();
    let second = find(body, &first, start).ok_or("encrypted body: no second MIME part")?;
    let headers = String::from_utf8_lossy(&body[start..second]);
    let length: usize = headers
        .split("Length=")
        .nth(1)
        .map(|s| s.trim().trim_end_matches(';'))
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.trim().parse().ok())
        .ok_or("encrypted body: no OriginalContent Length")?;
    let mut part = &body[second + first.len()..];
    let octet = b"\tContent-Type: application/octet-stream\r\n";
    part = part
        .strip_prefix(octet.as_slice())
        .ok_or("encrypted body: second part is not application/octet-stream")?;
    let mut end = BOUNDARY.to_vec();
    end.extend_from_slice(b"--\r\n");
    let part = part.strip_suffix(end.as_slice()).unwrap_or(part);
    let sig_len = part
        .get(0..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or("encrypted body: truncated")? as usize;
    let signature = part
        .get(4..4 + sig_len)
        .ok_or("encrypted body: truncated signature")?;
    let mut sealed = part[4 + sig_len..].to_vec();
    security.unseal(&mut sealed, signature)?;
    if sealed.len() != length {
        return Err(format!(
            "encrypted body: {} bytes decrypted but {length} announced",
            sealed.len()
        ));
    }
    Ok(sealed)
}

impl Transport {
    pub fn new(
        endpoint: Endpoint,
        auth: Auth,
        username: String,
        password: String,
        tls: Option<tokio_rustls::TlsConnector>,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            endpoint,
            auth,
            username,
            password,
            tls,
            connect_timeout,
            conn: None,
        }
    }

    /// Messages go encrypted exactly when pywinrm's `message_encryption="auto"` would do it:
    /// NTLM over plain HTTP (what a Windows listener with the default
    /// `AllowUnencrypted=false` demands).
    fn encrypts(&self) -> bool {
        self.auth == Auth::Ntlm && !self.endpoint.https
    }

    async fn dial(&self) -> Result<(SendRequest<Full<Bytes>>, Option<[u8; 16]>), TransportError> {
        let target = self.endpoint.authority();
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port)),
        )
        .await
        .map_err(|_| {
            TransportError::Connect(format!(
                "cannot connect to {target}: no answer within {}s",
                self.connect_timeout.as_secs()
            ))
        })?
        .map_err(|e| TransportError::Connect(format!("cannot connect to {target}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        macro_rules! handshake {
            ($io:expr) => {{
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io))
                    .await
                    .map_err(|e| {
                        TransportError::Connect(format!("HTTP handshake with {target}: {e}"))
                    })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "winrm connection ended");
                    }
                });
                sender
            }};
        }
        match &self.tls {
            None => Ok((handshake!(tcp), None)),
            Some(connector) => {
                let name = ServerName::try_from(self.endpoint.host.clone()).map_err(|e| {
                    TransportError::Connect(format!(
                        "{}: not a TLS server name: {e}",
                        self.endpoint.host
                    ))
                })?;
                let tls = tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        TransportError::Connect(format!(
                            "TLS handshake with {target}: no answer within {}s",
                            self.connect_timeout.as_secs()
                        ))
                    })?
                    .map_err(|e| {
                        TransportError::Connect(format!("TLS handshake with {target} failed: {e}"))
                    })?;
                let bindings = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|cert| ntlm::tls_channel_bindings(cert));
                Ok((handshake!(tls), bindings))
            }
        }
    }

    async fn exchange(
        sender: &mut SendRequest<Full<Bytes>>,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(hyper::StatusCode, HeaderMap, Bytes), TransportError> {
        sender
            .ready()
            .await
            .map_err(|e| TransportError::Connect(format!("connection lost: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| TransportError::Connect(format!("request failed: {e}")))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| TransportError::Protocol(format!("reading the response: {e}")))?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    }

    fn request(
        &self,
        authorization: Option<String>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Request<Full<Bytes>>, TransportError> {
        let mut b = hyper::Request::post(self.endpoint.path.as_str())
            .header(header::HOST, self.endpoint.authority())
            .header(header::USER_AGENT, "Stella agent WinRM client")
            .header(header::CONTENT_LENGTH, body.len());
        if !body.is_empty() {
            b = b.header(header::CONTENT_TYPE, content_type);
        }
        if let Some(a) = authorization {
            let mut v = HeaderValue::from_str(&a).map_err(|_| {
                TransportError::Auth("credentials cannot go into an HTTP header".into())
            })?;
            v.set_sensitive(true);
            b = b.header(header::AUTHORIZATION, v);
        }
        b.body(Full::new(Bytes::from(body)))
            .map_err(|e| TransportError::Protocol(format!("building the request: {e}")))
    }

    /// NEGOTIATE → CHALLENGE on a fresh connection; returns the AUTHENTICATE message (and the
    /// session keys) to send next on the same connection.
    async fn ntlm_negotiate(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        channel_bindings: Option<[u8; 16]>,
    ) -> Result<ntlm::Authenticated, TransportError> {
        let negotiate = ntlm::negotiate_message();
        let req = self.request(
            Some(format!("Negotiate {}", B64.encode(&negotiate))),
            SOAP_CONTENT_TYPE,
            Vec::new(),
        )?;
        let (status, headers, _) = Self::exchange(sender, req).await?;
        if status != hyper::StatusCode::UNAUTHORIZED {
            return Err(TransportError::Auth(format!(
                "NTLM negotiation: expected a 401 challenge from the server, got HTTP {status}"
            )));
        }
        let token = challenge_token(&headers, "Negotiate")
            .or_else(|| challenge_token(&headers, "NTLM"))
            .ok_or_else(|| {
                TransportError::Auth(format!(
                    "the server does not offer NTLM (Negotiate) authentication (it offers: {}); \
                     check the listener's auth settings or use auth \"basic\"",
                    offered_schemes(&headers)
                ))
            })?;
        let challenge = B64.decode(token.as_bytes()).map_err(|_| {
            TransportError::Auth("the server's NTLM challenge is not base64".into())
        })?;
        ntlm::authenticate(
            &negotiate,
            &challenge,
            &self.username,
            &self.password,
            channel_bindings,
        )
        .map_err(TransportError::Auth)
    }

    /// A new connection, authenticated as far as it can be before the first message: for
    /// NTLM with encryption the whole handshake runs with empty bodies (as pywinrm sets up
    /// its encryption context); otherwise the returned `Authorization` value (the NTLM
    /// AUTHENTICATE message) goes with the first real message, as requests-ntlm sends it.
    async fn connect(&self) -> Result<(Conn, Option<String>), TransportError> {
        let (mut sender, channel_bindings) = self.dial().await?;
        if self.auth == Auth::Basic {
            let conn = Conn {
                sender,
                security: None,
            };
            return Ok((conn, None));
        }
        let authed = self.ntlm_negotiate(&mut sender, channel_bindings).await?;
        let authorization = format!("Negotiate {}", B64.encode(&authed.message));
        if !self.encrypts() {
            let conn = Conn {
                sender,
                security: None,
            };
            return Ok((conn, Some(authorization)));
        }
        let req = self.request(Some(authorization), SOAP_CONTENT_TYPE, Vec::new())?;
        let (status, _, _) = Self::exchange(&mut sender, req).await?;
        if status == hyper::StatusCode::UNAUTHORIZED {
            return Err(TransportError::Auth(NTLM_REJECTED.to_string()));
        }
        if !status.is_success() {
            return Err(TransportError::Http {
                status: status.as_u16(),
                detail: "completing NTLM authentication".to_string(),
            });
        }
        let conn = Conn {
            sender,
            security: Some(authed.security),
        };
        Ok((conn, None))
    }

    /// POSTs one SOAP message and returns the SOAP answer (success or fault). Everything
    /// happens before `deadline`; a request cut off by it closes its connection.
    pub async fn post(&mut self, soap: &str, deadline: Instant) -> Result<Reply, TransportError> {
        tokio::time::timeout_at(deadline, self.post_inner(soap))
            .await
            .unwrap_or(Err(TransportError::TimedOut))
    }

    async fn post_inner(&mut self, soap: &str) -> Result<Reply, TransportError> {
        // Taken out for the exchange: whatever does not complete leaves no connection behind.
        let (mut conn, ntlm_authorization) = match self.conn.take() {
            Some(c) if !c.sender.is_closed() => (c, None),
            _ => self.connect().await?,
        };
        let (content_type, body) = match conn.security.as_mut() {
            Some(sec) => (
                format!(
                    "multipart/encrypted;protocol=\"{ENCRYPTED_PROTOCOL}\";boundary=\"Encrypted Boundary\""
                ),
                encrypt_body(sec, soap.as_bytes()),
            ),
            None => (SOAP_CONTENT_TYPE.to_string(), soap.as_bytes().to_vec()),
        };
        let authorization = match self.auth {
            Auth::Basic => Some(format!(
                "Basic {}",
                B64.encode(format!("{}:{}", self.username, self.password))
            )),
            Auth::Ntlm => ntlm_authorization.clone(),
        };
        let req = self.request(authorization, &content_type, body)?;
        let (status, headers, body) = Self::exchange(&mut conn.sender, req).await?;
        if status == hyper::StatusCode::UNAUTHORIZED {
            return Err(TransportError::Auth(match self.auth {
                Auth::Basic => format!(
                    "HTTP 401: the server rejected the Basic credentials (it offers: {}); \
                     check user name and password, and that the listener allows Basic auth",
                    offered_schemes(&headers)
                ),
                Auth::Ntlm if ntlm_authorization.is_some() => NTLM_REJECTED.to_string(),
                Auth::Ntlm => {
                    "HTTP 401: the server no longer accepts this NTLM session".to_string()
                }
            }));
        }
        let encrypted = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains(ENCRYPTED_PROTOCOL));
        let plain = match (conn.security.as_mut(), encrypted) {
            (Some(sec), true) => decrypt_body(sec, &body).map_err(TransportError::Protocol)?,
            (None, false) => body.to_vec(),
            // Errors below the WS-Man layer (a listener that cannot decrypt) come in clear.
            (Some(_), false) if body.is_empty() || !status.is_success() => body.to_vec(),
            (Some(_), false) => {
                return Err(TransportError::Protocol(format!(
                    "HTTP {status}: the server answered without NTLM encryption on an encrypted session"
                )));
            }
            (None, true) => {
                return Err(TransportError::Protocol(format!(
                    "HTTP {status}: the server sent an encrypted answer to a plain request"
                )));
            }
        };
        let text = String::from_utf8(plain)
            .map_err(|_| TransportError::Protocol(format!("HTTP {status}: answer is not UTF-8")))?;
        let keep = !headers
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if keep {
            self.conn = Some(conn);
        }
        // WS-Man reports faults as SOAP with HTTP 400/500; anything else without SOAP is an
        // HTTP-level failure.
        let soap_answer = text.contains("Envelope");
        if status.is_success() || soap_answer {
            return Ok(Reply {
                status: status.as_u16(),
                body: text,
            });
        }
        let detail: String = text.chars().take(300).collect();
        Err(TransportError::Http {
            status: status.as_u16(),
            detail: if detail.trim().is_empty() {
                status.canonical_reason().unwrap_or("no body").to_string()
            } else {
                detail
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_bodies_round_trip_between_the_two_sides() {
        let key = [3u8; 16];
        let mut client = SessionSecurity::new(&key, ntlm::CLIENT_FLAGS, true);
        let mut server = SessionSecurity::new(&key, ntlm::CLIENT_FLAGS, false);
        let soap = b"<s:Envelope>hello</s:Envelope>";
        let body = encrypt_body(&mut client, soap);
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(
            "--Encrypted Boundary\r\n\tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n"
        ));
        assert!(text.contains(&format!("Length={}\r\n", soap.len())));
        assert!(body.ends_with(b"--Encrypted Boundary--\r\n"));
        assert_eq!(decrypt_body(&mut server, &body).unwrap(), soap);
        // The server's answer comes back on the other keys.
        let answer = encrypt_body(&mut server, b"<answer/>");
        assert_eq!(decrypt_body(&mut client, &answer).unwrap(), b"<answer/>");
        // Replaying a message breaks the sequence.
        assert!(decrypt_body(&mut server, &body).is_err());
    }

    #[test]
    fn challenges_are_found_among_several_schemes() {
        let mut h = HeaderMap::new();
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"WSMAN\""),
        );
        h.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Negotiate TlRMTVNTUA=="),
        );
        assert_eq!(
            challenge_token(&h, "Negotiate").as_deref(),
            Some("TlRMTVNTUA==")
        );
        assert_eq!(challenge_token(&h, "NTLM"), None);
        assert_eq!(offered_schemes(&h), "Basic, Negotiate");
        let mut bare = HeaderMap::new();
        bare.append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Negotiate, Basic realm=\"x\""),
        );
        assert_eq!(challenge_token(&bare, "Negotiate"), None);
        assert_eq!(offered_schemes(&bare), "Negotiate, Basic");
    }
}
