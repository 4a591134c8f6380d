//! A TCP proxy between the gateway and a broker that can fail the way real
//! paths do: silently swallowing everything (a blackhole: no FIN, no RST,
//! the peers' writes just go nowhere), or refusing new connections (the
//! broker looks down), and passing traffic again.
//!
//! While blackholed, bytes on existing connections are read and dropped
//! and new connections are accepted and then ignored. Connections that
//! were swallowed stay swallowed after the blackhole ends (they are dead to
//! both sides, as after a NAT entry expired); new ones are relayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and relays to `target`.
    pub async fn start(target: SocketAddr) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let blackhole = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (hole, count, halt) = (blackhole.clone(), accepted.clone(), stop.clone());
        let refusing = refuse.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    _ = halt.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                count.fetch_add(1, Ordering::Relaxed);
                if refusing.load(Ordering::SeqCst) {
                    // Closed at once: the broker looks down.
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, target, hole.clone(), halt.clone()));
            }
        });
        Ok(Proxy {
            addr,
            blackhole,
            refuse,
            accepted,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An `amqp://` URI through the proxy (guest, default vhost).
    pub fn amqp_uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Swallow everything from now on (`true`), or relay new connections
    /// again (`false`).
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    /// Close new connections at once (`true`: the broker looks down), or
    /// relay them again (`false`). Relayed connections are not touched.
    pub fn set_refusing(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Relays one connection until either side closes, the proxy stops, or a
/// blackhole starts (from then on it only swallows).
async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    blackhole: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    if blackhole.load(Ordering::SeqCst) {
        swallow(client, stop).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = client.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if blackhole.load(Ordering::SeqCst) {
                        break;
                    }
                    if server.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            n = server.read(&mut down) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if blackhole.load(Ordering::SeqCst) {
                        break;
                    }
                    if client.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                }
            },
        }
    }
    // Both sockets stay open and silent; the server side is not read, so
    // the broker sees nothing either.
    let _server = server;
    swallow(client, stop).await;
}

/// Reads and drops whatever `client` sends, answering nothing, until the
/// proxy stops (or the client closes).
async fn swallow(mut client: TcpStream, stop: CancellationToken) {
    let mut sink = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = client.read(&mut sink) => if matches!(n, Ok(0) | Err(_)) { return },
        }
    }
}
