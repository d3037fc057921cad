//! A WS-Management test server (no Windows host can exist here), started per test on a free
//! 127.0.0.1 port, on its own thread and runtime, stopped on Drop.
//!
//! It follows the published protocol rather than our client: MS-WSMV WinRS with the shell
//! resource URI `http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd`, SOAP 1.2
//! envelopes, actions Create / Command / Receive / Signal / Delete (transfer `Create`/`Delete`
//! and the shell's own actions), `ShellId` selectors, `CommandId`s, base64 streams with
//! `End="true"`, `CommandState/Done` with `ExitCode`, long-polling Receive that ends with the
//! WS-Man OperationTimeout fault (code 2150858793) when there is no output, `RelatesTo` on
//! every answer. Authentication is per request for Basic and per connection for NTLMv2
//! (`Negotiate` scheme with raw NTLMSSP tokens, as Windows accepts them); after NTLM on plain
//! HTTP it accepts and answers MS-WSMV `multipart/encrypted` messages, and can refuse
//! unencrypted ones as a Windows listener with `AllowUnencrypted=false` does. HTTPS uses a
//! certificate from a CA the test generates with rcgen. `tests/pywinrm.rs` drives it with the
//! real pywinrm client, so it is not shaped to our client alone.
//!
//! Executing commands: `powershell … -EncodedCommand <b64>` is decoded and handed to the tiny
//! PowerShell stand-in in `ps.rs` (see there for the exact subset); test scripts put
//! `# stella-test: sh` after the variable lines and the rest runs under `/bin/sh`. Any other
//! command line is run by `/bin/sh -c` in place of `cmd.exe /c`. Windows paths `X:\…` live
//! under the server's `root` directory as `root/X/…`.

#![allow(dead_code)]

#[path = "../../src/ntlm.rs"]
#[allow(dead_code, clippy::all)]
mod ntlm;
pub mod ntlm_server;
pub mod ps;
#[path = "../../src/xml.rs"]
mod xml;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use stella_plugin_sdk::{ComponentSpec, DeploySpec, ExecutorContext, ProgressSink, TargetRef};
use stella_plugin_winrm::WinrmExecutor;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;

use self::ntlm::SessionSecurity;
use self::xml::{Element, escape};

pub const USER: &str = "stella-admin";
/// Every character class Basic and NTLM have to carry: `:` (Basic's separator), quotes, XML
/// and shell metacharacters.
pub const PASSWORD: &str = "Pa$$w0rd:'\"&<> x";

const SHELL_URI: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd";
const NS: &str = "xmlns:s=\"http://www.w3.org/2003/05/soap-envelope\" \
    xmlns:a=\"http://schemas.xmlsoap.org/ws/2004/08/addressing\" \
    xmlns:x=\"http://schemas.xmlsoap.org/ws/2004/09/transfer\" \
    xmlns:w=\"http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd\" \
    xmlns:rsp=\"http://schemas.microsoft.com/wbem/wsman/1/windows/shell\" \
    xmlns:p=\"http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd\"";
const A_CREATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Create";
const A_DELETE: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Delete";
const A_SHELL: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/";
const STATE: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandState/";
const TERMINATE: &str = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate";
const ENC_PROTOCOL: &str = "application/HTTP-SPNEGO-session-encrypted";
const BOUNDARY: &[u8] = b"--Encrypted Boundary";

/// One request the server handled.
#[derive(Debug, Clone)]
pub struct Event {
    /// `Create`, `Command`, `Receive`, `Signal`, `Delete`, or `auth-failed`.
    pub action: String,
    pub shell: Option<String>,
    pub command: Option<String>,
    /// `basic` or `ntlm`.
    pub auth: String,
    pub encrypted: bool,
    /// The command line (Command), signal code (Signal), or failure reason (auth-failed).
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub tls: bool,
    /// Like a Windows listener's `AllowUnencrypted`: false refuses plain-HTTP messages that
    /// are not NTLM-encrypted.
    pub allow_unencrypted: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tls: false,
            allow_unencrypted: true,
        }
    }
}

#[derive(Default)]
struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<i64>,
}

struct Cmd {
    out: Mutex<Output>,
    changed: watch::Sender<u64>,
    pgid: Mutex<Option<i32>>,
}

impl Cmd {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            out: Mutex::new(Output::default()),
            changed: watch::channel(0).0,
            pgid: Mutex::new(None),
        })
    }

    fn update(&self, f: impl FnOnce(&mut Output)) {
        f(&mut self.out.lock().unwrap());
        self.changed.send_modify(|v| *v += 1);
    }

    fn kill(&self) {
        if let Some(pgid) = self.pgid.lock().unwrap().take() {
            // The whole process group: the shell and whatever it started.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

struct State {
    root: PathBuf,
    opts: Options,
    events: Mutex<Vec<Event>>,
    shells: Mutex<HashMap<String, HashMap<String, Arc<Cmd>>>>,
    all_commands: Mutex<Vec<Arc<Cmd>>>,
    /// The certificate served over TLS, for channel binding checks.
    cert_der: Option<Vec<u8>>,
    channel_bound_logins: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
enum ConnAuth {
    #[default]
    None,
    Pending(ntlm_server::Pending),
    Ntlm(Box<SessionSecurity>),
}

pub struct WinrmServer {
    pub port: u16,
    /// Holds the Windows file system (`root/C/...`).
    pub root: tempfile::TempDir,
    /// Test files: CA PEMs, password file.
    pub dir: tempfile::TempDir,
    pub ca_file: Option<PathBuf>,
    /// A CA that did not sign the server's certificate.
    pub other_ca_file: Option<PathBuf>,
    pub password_file: PathBuf,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn ca(name: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (rcgen::Issuer::new(params, key), cert.pem())
}

fn tls_acceptor(dir: &Path) -> (tokio_rustls::TlsAcceptor, PathBuf, PathBuf, Vec<u8>) {
    let (issuer, ca_pem) = ca("Stella WinRM test CA");
    let (_, other_pem) = ca("Some other CA");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let ca_file = dir.join("ca.pem");
    let other = dir.join("other-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    std::fs::write(&other, other_pem).unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_file,
        other,
        cert.der().to_vec(),
    )
}

impl WinrmServer {
    pub fn start(opts: Options) -> Self {
        let root = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        let (acceptor, ca_file, other_ca_file, cert_der) = if opts.tls {
            let (a, c, o, d) = tls_acceptor(dir.path());
            (Some(a), Some(c), Some(o), Some(d))
        } else {
            (None, None, None, None)
        };
        let state = Arc::new(State {
            root: root.path().to_path_buf(),
            opts,
            events: Mutex::new(Vec::new()),
            shells: Mutex::new(HashMap::new()),
            all_commands: Mutex::new(Vec::new()),
            cert_der,
            channel_bound_logins: Default::default(),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { continue };
                            let st = st.clone();
                            let acceptor = acceptor.clone();
                            tokio::spawn(async move {
                                match acceptor {
                                    None => serve(tcp, st, false).await,
                                    Some(a) => {
                                        if let Ok(tls) = a.accept(tcp).await {
                                            serve(tls, st, true).await;
                                        }
                                    }
                                }
                            });
                        }
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        Self {
            port,
            root,
            dir,
            ca_file,
            other_ca_file,
            password_file,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.state.opts.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/wsman", self.port)
    }

    pub fn events(&self) -> Vec<Event> {
        self.state.events.lock().unwrap().clone()
    }

    /// Where the server keeps a Windows path.
    pub fn local_path(&self, windows: &str) -> PathBuf {
        let mut p = self.root.path().join(&windows[..1]);
        for seg in windows[3..].split('\\') {
            p.push(seg);
        }
        p
    }

    /// NTLM logins whose TLS channel binding was present and matched.
    pub fn channel_bound_logins(&self) -> usize {
        self.state
            .channel_bound_logins
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Shells created and not deleted.
    pub fn open_shells(&self) -> usize {
        self.state.shells.lock().unwrap().len()
    }

    /// A target config for this server; `extra` keys override (null removes).
    pub fn config(&self, extra: Value) -> Value {
        let mut v = json!({
            "endpoint": self.url(),
            "username": USER,
            "password_file": self.password_file.display().to_string(),
            "deploy_script": "Write-Output 'nothing to do'",
            "timeout_secs": 60,
            "operation_timeout_secs": 5,
            "connect_timeout_secs": 5,
        });
        if let Some(ca) = &self.ca_file {
            v["ca_file"] = json!(ca.display().to_string());
        }
        for (k, val) in extra.as_object().unwrap() {
            if val.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = val.clone();
            }
        }
        v
    }

    pub fn target(&self, name: &str, extra: Value) -> TargetRef {
        TargetRef {
            name: name.to_string(),
            kind: "winrm".to_string(),
            config: self.config(extra),
        }
    }
}

impl Drop for WinrmServer {
    fn drop(&mut self) {
        for cmd in self.state.all_commands.lock().unwrap().iter() {
            cmd.kill();
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve<IO>(io: IO, state: Arc<State>, tls: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Mutex::new(ConnAuth::None));
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(req, state, conn, tls).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r
}

fn unauthorized(token: Option<String>) -> Response<Full<Bytes>> {
    let mut r = plain(StatusCode::UNAUTHORIZED, "");
    let h = r.headers_mut();
    match token {
        Some(t) => {
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(&format!("Negotiate {t}")).unwrap(),
            );
        }
        None => {
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Negotiate"),
            );
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"WSMAN\""),
            );
        }
    }
    r
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// MS-WSMV 2.2.9.1.1: one part of headers, one `application/octet-stream` part holding a
/// 4-byte signature length, the signature and the sealed message.
fn decrypt(sec: &mut SessionSecurity, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut b = BOUNDARY.to_vec();
    b.extend_from_slice(b"\r\n");
    let h_start = find(body, &b, 0).ok_or("no boundary")? + b.len();
    let h_end = find(body, &b, h_start).ok_or("no second part")?;
    let headers = std::str::from_utf8(&body[h_start..h_end]).map_err(|_| "headers not UTF-8")?;
    if !headers.contains(&format!("Content-Type: {ENC_PROTOCOL}")) {
        return Err(format!("unexpected part headers {headers:?}"));
    }
    let length: usize = headers
        .rsplit("Length=")
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or("no Length")?;
    let rest = &body[h_end + b.len()..];
    let rest = rest
        .strip_prefix(b"\tContent-Type: application/octet-stream\r\n".as_slice())
        .ok_or("no octet-stream part")?;
    let mut end = BOUNDARY.to_vec();
    end.extend_from_slice(b"--\r\n");
    let rest = rest
        .strip_suffix(end.as_slice())
        .ok_or("no closing boundary")?;
    let sig_len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
    let (sig, sealed) = rest[4..].split_at(sig_len);
    let mut msg = sealed.to_vec();
    sec.unseal(&mut msg, sig)?;
    if msg.len() != length {
        return Err("length mismatch".into());
    }
    Ok(msg)
}

fn encrypt(sec: &mut SessionSecurity, msg: &[u8]) -> Vec<u8> {
    let mut sealed = msg.to_vec();
    let sig = sec.seal(&mut sealed);
    let mut out = Vec::new();
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(
        format!(
            "\r\n\tContent-Type: {ENC_PROTOCOL}\r\n\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length={}\r\n",
            msg.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(b"\r\n\tContent-Type: application/octet-stream\r\n");
    out.extend_from_slice(&(sig.len() as u32).to_le_bytes());
    out.extend_from_slice(&sig);
    out.extend_from_slice(&sealed);
    out.extend_from_slice(BOUNDARY);
    out.extend_from_slice(b"--\r\n");
    out
}

fn record(state: &State, e: Event) {
    state.events.lock().unwrap().push(e);
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<State>,
    conn: Arc<Mutex<ConnAuth>>,
    tls: bool,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return plain(StatusCode::BAD_REQUEST, "");
    };
    if parts.uri.path() != "/wsman" {
        return plain(StatusCode::NOT_FOUND, "");
    }
    if parts.method != hyper::Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "");
    }
    let fail = |reason: String| {
        record(
            &state,
            Event {
                action: "auth-failed".into(),
                shell: None,
                command: None,
                auth: String::new(),
                encrypted: false,
                detail: reason,
            },
        );
        unauthorized(None)
    };

    // Authentication.
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let auth_kind = match authorization.as_deref().and_then(|a| a.split_once(' ')) {
        Some((scheme, cred)) if scheme.eq_ignore_ascii_case("Basic") => {
            let decoded = B64
                .decode(cred.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok());
            match decoded.as_deref().and_then(|d| d.split_once(':')) {
                Some((u, p)) if u == USER && p == PASSWORD => "basic",
                _ => return fail("basic: bad credentials".into()),
            }
        }
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("Negotiate") || scheme.eq_ignore_ascii_case("NTLM") =>
        {
            let Ok(msg) = B64.decode(token.trim()) else {
                return fail("ntlm: token is not base64".into());
            };
            match msg.get(8..12) {
                Some([1, 0, 0, 0]) => match ntlm_server::challenge(&msg) {
                    Ok((challenge, pending)) => {
                        *conn.lock().unwrap() = ConnAuth::Pending(pending);
                        return unauthorized(Some(B64.encode(challenge)));
                    }
                    Err(e) => return fail(format!("ntlm: {e}")),
                },
                Some([3, 0, 0, 0]) => {
                    let pending = std::mem::take(&mut *conn.lock().unwrap());
                    let ConnAuth::Pending(pending) = pending else {
                        return fail(
                            "ntlm: AUTHENTICATE without CHALLENGE on this connection".into(),
                        );
                    };
                    let bindings = if tls {
                        state.cert_der.as_deref().map(ntlm::tls_channel_bindings)
                    } else {
                        None
                    };
                    match ntlm_server::verify(&pending, &msg, USER, PASSWORD, bindings) {
                        Ok(v) => {
                            if v.channel_bound {
                                state
                                    .channel_bound_logins
                                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            *conn.lock().unwrap() = ConnAuth::Ntlm(Box::new(v.security));
                            "ntlm"
                        }
                        Err(e) => return fail(format!("ntlm: {e}")),
                    }
                }
                _ => return fail("ntlm: not an NTLMSSP message (SPNEGO is not supported)".into()),
            }
        }
        Some(_) => return fail("unsupported scheme".into()),
        None => match &*conn.lock().unwrap() {
            ConnAuth::Ntlm(_) => "ntlm",
            _ => return unauthorized(None),
        },
    };

    // Message (en)cryption.
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let encrypted = content_type.starts_with("multipart/encrypted");
    let soap = if encrypted {
        if !content_type.contains(&format!("protocol=\"{ENC_PROTOCOL}\"")) {
            return plain(StatusCode::BAD_REQUEST, "unknown encryption protocol");
        }
        let mut guard = conn.lock().unwrap();
        let ConnAuth::Ntlm(sec) = &mut *guard else {
            return plain(StatusCode::BAD_REQUEST, "encrypted message without NTLM");
        };
        match decrypt(sec, &body) {
            Ok(m) => m,
            Err(e) => {
                drop(guard);
                return fail(format!("cannot decrypt: {e}"));
            }
        }
    } else {
        body.to_vec()
    };
    if soap.is_empty() {
        // An authenticated empty POST (how pywinrm sets up its encryption context).
        return plain(StatusCode::OK, "");
    }
    let (status, xml_text) = if !encrypted && !tls && !state.opts.allow_unencrypted {
        fault(
            "",
            "w:AccessDenied",
            5,
            "The WinRM service is not configured to accept unencrypted traffic (AllowUnencrypted=false).",
        )
    } else {
        match std::str::from_utf8(&soap) {
            Ok(text) => process(&state, text, auth_kind, encrypted).await,
            Err(_) => fault("", "w:InvalidMessageInformationHeader", 0, "not UTF-8"),
        }
    };
    let (content_type, body) = if encrypted {
        let mut guard = conn.lock().unwrap();
        let ConnAuth::Ntlm(sec) = &mut *guard else {
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "");
        };
        (
            format!(
                "multipart/encrypted;protocol=\"{ENC_PROTOCOL}\";boundary=\"Encrypted Boundary\""
            ),
            encrypt(sec, xml_text.as_bytes()),
        )
    } else {
        (
            "application/soap+xml;charset=UTF-8".to_string(),
            xml_text.into_bytes(),
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).unwrap(),
    );
    r
}

fn envelope(action: &str, relates_to: &str, body: &str) -> String {
    format!(
        "<s:Envelope xml:lang=\"en-US\" {NS}><s:Header><a:Action>{action}</a:Action>\
         <a:MessageID>uuid:{}</a:MessageID>\
         <a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To>\
         <a:RelatesTo>{}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>",
        uuid::Uuid::new_v4().to_string().to_uppercase(),
        escape(relates_to)
    )
}

fn fault(relates_to: &str, subcode: &str, code: u64, reason: &str) -> (u16, String) {
    let body = format!(
        "<s:Fault><s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>{subcode}</s:Value>\
         </s:Subcode></s:Code><s:Reason><s:Text xml:lang=\"en-US\">{reason}</s:Text></s:Reason>\
         <s:Detail><f:WSManFault xmlns:f=\"http://schemas.microsoft.com/wbem/wsman/1/wsmanfault\" \
         Code=\"{code}\" Machine=\"127.0.0.1\"><f:Message>{reason}</f:Message></f:WSManFault>\
         </s:Detail></s:Fault>",
        reason = escape(reason)
    );
    (
        500,
        envelope(
            "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault",
            relates_to,
            &body,
        ),
    )
}

/// `PT60S`, `PT0.5S`, `PT60.000S`.
fn duration(text: &str) -> Option<Duration> {
    let secs: f64 = text
        .trim()
        .strip_prefix("PT")?
        .strip_suffix('S')?
        .parse()
        .ok()?;
    (secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

fn selector(header: &Element, name: &str) -> Option<String> {
    header
        .child("SelectorSet")?
        .children_named("Selector")
        .find(|s| s.attr("Name") == Some(name))
        .map(|s| s.trimmed_text().to_string())
}

async fn process(state: &Arc<State>, text: &str, auth: &str, encrypted: bool) -> (u16, String) {
    let Ok(root) = xml::parse(text) else {
        return fault("", "w:InvalidMessageInformationHeader", 0, "malformed XML");
    };
    let (Some(header), Some(body)) = (root.child("Header"), root.child("Body")) else {
        return fault(
            "",
            "w:InvalidMessageInformationHeader",
            0,
            "no Header or Body",
        );
    };
    let Some(message_id) = header
        .child("MessageID")
        .map(|m| m.trimmed_text().to_string())
    else {
        return fault("", "w:InvalidMessageInformationHeader", 0, "no MessageID");
    };
    let action = header
        .child("Action")
        .map(|a| a.trimmed_text().to_string())
        .unwrap_or_default();
    if header.child("ResourceURI").map(Element::trimmed_text) != Some(SHELL_URI) {
        return fault(
            &message_id,
            "w:DestinationUnreachable",
            2_150_858_770,
            "unknown resource URI",
        );
    }
    if header.child("To").is_none() {
        return fault(&message_id, "w:InvalidMessageInformationHeader", 0, "no To");
    }
    let op_timeout = header
        .child("OperationTimeout")
        .and_then(|t| duration(&t.text))
        .unwrap_or(Duration::from_secs(60));
    let shell_id = selector(header, "ShellId");
    let mut event = Event {
        action: String::new(),
        shell: shell_id.clone(),
        command: None,
        auth: auth.to_string(),
        encrypted,
        detail: String::new(),
    };
    let no_shell = |id: &Option<String>| {
        fault(
            &message_id,
            "w:InvalidSelectors",
            2_150_858_843,
            &format!(
                "The request for the Windows Remote Shell with ShellId {} failed because the shell was not found on the server.",
                id.as_deref().unwrap_or("(none)")
            ),
        )
    };

    if action == A_CREATE {
        let Some(shell) = body.child("Shell") else {
            return fault(&message_id, "w:InvalidParameter", 0, "no rsp:Shell");
        };
        let id = uuid::Uuid::new_v4().to_string().to_uppercase();
        state
            .shells
            .lock()
            .unwrap()
            .insert(id.clone(), HashMap::new());
        event.action = "Create".into();
        event.shell = Some(id.clone());
        record(state, event);
        let streams = shell
            .child("OutputStreams")
            .map(|s| s.trimmed_text().to_string())
            .unwrap_or_else(|| "stdout stderr".into());
        let body = format!(
            "<x:ResourceCreated><a:Address>http://127.0.0.1/wsman</a:Address><a:ReferenceParameters>\
             <w:ResourceURI>{SHELL_URI}</w:ResourceURI><w:SelectorSet>\
             <w:Selector Name=\"ShellId\">{id}</w:Selector></w:SelectorSet></a:ReferenceParameters>\
             </x:ResourceCreated><rsp:Shell><rsp:ShellId>{id}</rsp:ShellId>\
             <rsp:ResourceUri>{SHELL_URI}</rsp:ResourceUri><rsp:Owner>{USER}</rsp:Owner>\
             <rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>{}</rsp:OutputStreams>\
             </rsp:Shell>",
            escape(&streams)
        );
        return (
            200,
            envelope(
                "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse",
                &message_id,
                &body,
            ),
        );
    }

    let Some(shell_key) = shell_id
        .clone()
        .filter(|id| state.shells.lock().unwrap().contains_key(id))
    else {
        return no_shell(&shell_id);
    };

    if action == A_DELETE {
        let commands = state
            .shells
            .lock()
            .unwrap()
            .remove(&shell_key)
            .unwrap_or_default();
        for cmd in commands.values() {
            cmd.kill();
        }
        event.action = "Delete".into();
        record(state, event);
        return (
            200,
            envelope(
                "http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse",
                &message_id,
                "",
            ),
        );
    }

    match action.strip_prefix(A_SHELL) {
        Some("Command") => {
            let Some(line) = body.child("CommandLine") else {
                return fault(&message_id, "w:InvalidParameter", 0, "no rsp:CommandLine");
            };
            let Some(command) = line.child("Command").map(|c| c.trimmed_text().to_string()) else {
                return fault(&message_id, "w:InvalidParameter", 0, "no rsp:Command");
            };
            let mut full = command;
            for a in line.children_named("Arguments") {
                full.push(' ');
                full.push_str(a.trimmed_text());
            }
            let id = uuid::Uuid::new_v4().to_string().to_uppercase();
            let cmd = Cmd::new();
            state.all_commands.lock().unwrap().push(cmd.clone());
            start_command(state, &cmd, &full);
            state
                .shells
                .lock()
                .unwrap()
                .get_mut(&shell_key)
                .map(|s| s.insert(id.clone(), cmd));
            event.action = "Command".into();
            event.command = Some(id.clone());
            event.detail = full;
            record(state, event);
            let body = format!(
                "<rsp:CommandResponse><rsp:CommandId>{id}</rsp:CommandId></rsp:CommandResponse>"
            );
            (
                200,
                envelope(&format!("{A_SHELL}CommandResponse"), &message_id, &body),
            )
        }
        Some("Receive") => {
            let Some(id) = body
                .path(&["Receive", "DesiredStream"])
                .and_then(|d| d.attr("CommandId"))
                .map(str::to_string)
            else {
                return fault(
                    &message_id,
                    "w:InvalidParameter",
                    0,
                    "no DesiredStream CommandId",
                );
            };
            let cmd = state
                .shells
                .lock()
                .unwrap()
                .get(&shell_key)
                .and_then(|s| s.get(&id).cloned());
            let Some(cmd) = cmd else {
                return fault(
                    &message_id,
                    "w:InvalidParameter",
                    2_150_858_843,
                    "unknown CommandId",
                );
            };
            event.action = "Receive".into();
            event.command = Some(id.clone());
            record(state, event);
            let deadline = Instant::now() + op_timeout;
            let mut rx = cmd.changed.subscribe();
            loop {
                rx.borrow_and_update();
                {
                    let mut out = cmd.out.lock().unwrap();
                    if !out.stdout.is_empty() || !out.stderr.is_empty() || out.exit.is_some() {
                        let mut body = String::from("<rsp:ReceiveResponse>");
                        for (name, data) in [
                            ("stdout", std::mem::take(&mut out.stdout)),
                            ("stderr", std::mem::take(&mut out.stderr)),
                        ] {
                            if !data.is_empty() {
                                body.push_str(&format!(
                                    "<rsp:Stream Name=\"{name}\" CommandId=\"{id}\">{}</rsp:Stream>",
                                    B64.encode(data)
                                ));
                            }
                            if out.exit.is_some() {
                                body.push_str(&format!(
                                    "<rsp:Stream Name=\"{name}\" CommandId=\"{id}\" End=\"true\"></rsp:Stream>"
                                ));
                            }
                        }
                        match out.exit {
                            Some(code) => body.push_str(&format!(
                                "<rsp:CommandState CommandId=\"{id}\" State=\"{STATE}Done\">\
                                 <rsp:ExitCode>{code}</rsp:ExitCode></rsp:CommandState>"
                            )),
                            None => body.push_str(&format!(
                                "<rsp:CommandState CommandId=\"{id}\" State=\"{STATE}Running\"/>"
                            )),
                        }
                        body.push_str("</rsp:ReceiveResponse>");
                        return (
                            200,
                            envelope(&format!("{A_SHELL}ReceiveResponse"), &message_id, &body),
                        );
                    }
                }
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    return fault(
                        &message_id,
                        "w:TimedOut",
                        2_150_858_793,
                        "The WS-Management service cannot complete the operation within the time specified in OperationTimeout.",
                    );
                }
            }
        }
        Some("Signal") => {
            let Some(signal) = body.child("Signal") else {
                return fault(&message_id, "w:InvalidParameter", 0, "no rsp:Signal");
            };
            let id = signal.attr("CommandId").map(str::to_string);
            let code = signal
                .child("Code")
                .map(|c| c.trimmed_text().to_string())
                .unwrap_or_default();
            event.action = "Signal".into();
            event.command = id.clone();
            event.detail = code.clone();
            record(state, event);
            if code == TERMINATE {
                let cmd = id.as_ref().and_then(|id| {
                    state
                        .shells
                        .lock()
                        .unwrap()
                        .get_mut(&shell_key)
                        .and_then(|s| s.remove(id))
                });
                if let Some(cmd) = cmd {
                    cmd.kill();
                }
            }
            (
                200,
                envelope(
                    &format!("{A_SHELL}SignalResponse"),
                    &message_id,
                    "<rsp:SignalResponse/>",
                ),
            )
        }
        _ => fault(
            &message_id,
            "w:ActionNotSupported",
            2_150_858_752,
            &format!("unsupported action {action}"),
        ),
    }
}

fn start_command(state: &Arc<State>, cmd: &Arc<Cmd>, line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (script, env) = match ps::encoded_script(&words) {
        Some(Ok(script)) => match ps::run(&script, &state.root) {
            ps::Plan::Done {
                stdout,
                stderr,
                exit,
            } => {
                cmd.update(|o| {
                    o.stdout = stdout;
                    o.stderr = stderr;
                    o.exit = Some(exit);
                });
                return;
            }
            ps::Plan::Sh { script, env } => (script, env),
        },
        Some(Err(e)) => {
            cmd.update(|o| {
                o.stderr = e.into_bytes();
                o.exit = Some(1);
            });
            return;
        }
        None => (line.to_string(), Vec::new()),
    };
    let spawned = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&script)
        .envs(env)
        .current_dir(&state.root)
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            cmd.update(|o| {
                o.stderr = format!("cannot start /bin/sh: {e}").into_bytes();
                o.exit = Some(1);
            });
            return;
        }
    };
    *cmd.pgid.lock().unwrap() = child.id().map(|p| p as i32);
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let c = cmd.clone();
    tokio::spawn(async move {
        let c1 = c.clone();
        let out_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                c1.update(|o| o.stdout.extend_from_slice(&buf[..n]));
            }
        });
        let c2 = c.clone();
        let err_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                c2.update(|o| o.stderr.extend_from_slice(&buf[..n]));
            }
        });
        let status = child.wait().await;
        let _ = out_task.await;
        let _ = err_task.await;
        c.pgid.lock().unwrap().take();
        let code = match status {
            Ok(s) => s.code().map(i64::from).unwrap_or(-1),
            Err(_) => -1,
        };
        c.update(|o| o.exit = Some(code));
    });
}

pub fn executor(server: &WinrmServer) -> WinrmExecutor {
    WinrmExecutor::new(ExecutorContext {
        state_dir: server.dir.path().join("agent-state"),
    })
}

pub fn spec(target: &TargetRef, release: &str, components: Vec<ComponentSpec>) -> DeploySpec {
    DeploySpec {
        job_id: format!("job-{release}"),
        deployment_id: format!("dep-{release}"),
        release_id: release.to_string(),
        release_name: format!("Release {release}"),
        target: target.clone(),
        components,
        strategy: Default::default(),
    }
}

pub fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

pub fn component(name: &str, c: char) -> ComponentSpec {
    ComponentSpec {
        name: name.to_string(),
        image: format!("registry.example:5000/demo/{name}:1"),
        digest: digest(c),
    }
}

#[derive(Default)]
pub struct Recorder(Mutex<Vec<String>>);

impl ProgressSink for Recorder {
    fn progress(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

impl Recorder {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}
