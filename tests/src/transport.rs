//! Which transport the agents of a test use, and loopback proxies a test controls to cut,
//! restore or re-address the link between an agent and the plane.
//!
//! Every plane the harness starts listens on both transports (gRPC over TCP, QUIC over UDP);
//! the transport of the current test decides which one enrolled agents are handed. Tests that
//! must pass on both are written once inside [`both_transports!`](crate::both_transports).

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// gRPC over HTTP/2 over TLS (`https://`).
    Grpc,
    /// Length-delimited protobuf over QUIC (`quic://`).
    Quic,
}

thread_local! {
    static CURRENT: Cell<Option<Transport>> = const { Cell::new(None) };
}

impl Transport {
    /// The transport of the running test: set by [`Transport::run`], else
    /// `STELLA_E2E_TRANSPORT` (`grpc` or `quic`), else gRPC.
    pub fn current() -> Transport {
        CURRENT.with(|c| c.get()).unwrap_or_else(|| {
            match std::env::var("STELLA_E2E_TRANSPORT").as_deref() {
                Ok("quic") => Transport::Quic,
                _ => Transport::Grpc,
            }
        })
    }

    /// Runs `test` with this transport for every plane and agent it starts on this thread.
    pub fn run<T>(self, test: impl FnOnce() -> T) -> T {
        let before = CURRENT.with(|c| c.replace(Some(self)));
        struct Restore(Option<Transport>);
        impl Drop for Restore {
            fn drop(&mut self) {
                CURRENT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(before);
        test()
    }
}

/// Defines each test twice, `grpc::NAME` and `quic::NAME`, running the same body with agents
/// on either transport.
#[macro_export]
macro_rules! both_transports {
    ($($(#[$meta:meta])* fn $name:ident() $body:block)*) => {
        mod grpc {
            #[allow(unused_imports)]
            use super::*;
            $($(#[$meta])* fn $name() { $crate::Transport::Grpc.run(|| $body) })*
        }
        mod quic {
            #[allow(unused_imports)]
            use super::*;
            $($(#[$meta])* fn $name() { $crate::Transport::Quic.run(|| $body) })*
        }
    };
}

/// A free UDP port on loopback (for the plane's QUIC endpoint).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

fn proxy_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("proxy runtime")
}

/// A loopback TCP proxy. `cut` stalls the link without closing anything (a black hole: bytes are
/// held, new connections accepted but not carried), `restore` lets it flow again.
pub struct TcpProxy {
    pub port: u16,
    open: watch::Sender<bool>,
    _runtime: tokio::runtime::Runtime,
}

impl TcpProxy {
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let runtime = proxy_runtime();
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("proxy listen");
        let port = listener.local_addr().expect("proxy addr").port();
        let (open, open_rx) = watch::channel(true);
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let open = open_rx.clone();
                tokio::spawn(async move {
                    let mut gate = open.clone();
                    if gate.wait_for(|o| *o).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, open.clone()));
                    tokio::spawn(pump(sr, cw, open));
                });
            }
        });
        TcpProxy {
            port,
            open,
            _runtime: runtime,
        }
    }

    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Bytes read just before a cut are held until the link is back, not lost.
        if open.wait_for(|o| *o).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

type Flows = Arc<Mutex<HashMap<SocketAddr, (Arc<UdpSocket>, tokio::task::JoinHandle<()>)>>>;

/// A loopback UDP proxy for QUIC. `cut` drops every datagram both ways, `restore` carries them
/// again, and `rebind` moves each flow to a new upstream socket, so the plane sees the agent
/// arrive from a new address (what a NAT rebinding or a roaming host looks like).
pub struct UdpProxy {
    pub port: u16,
    open: watch::Sender<bool>,
    flows: Flows,
    upstream: SocketAddr,
    listen: Arc<UdpSocket>,
    runtime: tokio::runtime::Runtime,
}

impl UdpProxy {
    pub fn start(upstream: SocketAddr) -> UdpProxy {
        let runtime = proxy_runtime();
        let listen = Arc::new(
            runtime
                .block_on(UdpSocket::bind("127.0.0.1:0"))
                .expect("proxy bind"),
        );
        let port = listen.local_addr().expect("proxy addr").port();
        let (open, open_rx) = watch::channel(true);
        let flows: Flows = Arc::default();
        let (l, f, o) = (listen.clone(), flows.clone(), open_rx.clone());
        runtime.spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, client)) = l.recv_from(&mut buf).await else {
                    return;
                };
                if !*o.borrow() {
                    continue;
                }
                let existing = f
                    .lock()
                    .expect("flows")
                    .get(&client)
                    .map(|(s, _)| s.clone());
                let socket = match existing {
                    Some(s) => s,
                    None => match new_flow(&l, &f, client, upstream, o.clone()).await {
                        Some(s) => s,
                        None => continue,
                    },
                };
                let _ = socket.send(&buf[..n]).await;
            }
        });
        UdpProxy {
            port,
            open,
            flows,
            upstream,
            listen,
            runtime,
        }
    }

    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    pub fn restore(&self) {
        self.open.send_replace(true);
    }

    /// Moves every flow to a fresh upstream socket (a new source port towards the plane).
    /// Returns how many flows moved.
    pub fn rebind(&self) -> usize {
        let clients: Vec<SocketAddr> = self.flows.lock().expect("flows").keys().copied().collect();
        for client in &clients {
            let (l, f, o) = (
                self.listen.clone(),
                self.flows.clone(),
                self.open.subscribe(),
            );
            let upstream = self.upstream;
            let client = *client;
            self.runtime
                .block_on(async move { new_flow(&l, &f, client, upstream, o).await })
                .expect("new flow");
        }
        clients.len()
    }
}

/// Opens an upstream socket for `client`, replacing (and stopping) any previous one.
async fn new_flow(
    listen: &Arc<UdpSocket>,
    flows: &Flows,
    client: SocketAddr,
    upstream: SocketAddr,
    open: watch::Receiver<bool>,
) -> Option<Arc<UdpSocket>> {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.ok()?);
    socket.connect(upstream).await.ok()?;
    let (s, l) = (socket.clone(), listen.clone());
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = s.recv(&mut buf).await {
            if *open.borrow() {
                let _ = l.send_to(&buf[..n], client).await;
            }
        }
    });
    if let Some((_, old)) = flows
        .lock()
        .expect("flows")
        .insert(client, (socket.clone(), reader))
    {
        old.abort();
    }
    Some(socket)
}

/// A proxy on the link of the plane's transport: TCP for gRPC, UDP for QUIC.
pub enum LinkProxy {
    Tcp(TcpProxy),
    Udp(UdpProxy),
}

impl LinkProxy {
    /// A proxy in front of the agent endpoint of `plane`'s transport.
    pub fn start(plane: &crate::Plane) -> LinkProxy {
        match plane.transport {
            Transport::Grpc => LinkProxy::Tcp(TcpProxy::start(plane.agent_addr())),
            Transport::Quic => LinkProxy::Udp(UdpProxy::start(plane.agent_addr())),
        }
    }

    /// The endpoint URL agents use to reach the plane through this proxy.
    pub fn url(&self) -> String {
        match self {
            LinkProxy::Tcp(p) => format!("https://127.0.0.1:{}", p.port),
            LinkProxy::Udp(p) => format!("quic://127.0.0.1:{}", p.port),
        }
    }

    pub fn cut(&self) {
        match self {
            LinkProxy::Tcp(p) => p.cut(),
            LinkProxy::Udp(p) => p.cut(),
        }
    }

    pub fn restore(&self) {
        match self {
            LinkProxy::Tcp(p) => p.restore(),
            LinkProxy::Udp(p) => p.restore(),
        }
    }
}
