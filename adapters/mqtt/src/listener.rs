//! Accepts TCP connections, one task each, on `mqtt.listen` and, when
//! configured, MQTT over TLS (`mqtt.tls_listen`), over WebSocket
//! (`mqtt.ws_listen`, `websocket.rs`) and over WebSocket over TLS
//! (`mqtt.wss_listen`). All share one budget: a new connection passes the
//! per-source guard (connections and connection rate per address, login
//! back-off) at accept; until it has sent CONNECT it is held to the
//! handshake budget (`handshakes.rs`, which bounds the TLS handshake too);
//! then to `max_connections`, checked once CONNECT has been read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_auth::{Security, SourcePermit};
use edge_config::MqttConfig;
use edge_core::Router;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Connection, Settings};
use crate::error::MqttError;
use crate::handshakes::{Handshake, Handshakes};
use crate::transport::Stream;
use crate::websocket::{self, Endpoint};

/// What a new connection needs to become a client: its place among pending
/// handshakes, then a place among established connections.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) handshake: Handshake,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    /// Its place under the per-source limits, held until it ends.
    pub(crate) source: SourcePermit,
}

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound MQTT listener; [`MqttListener::run`] serves it.
#[derive(Debug)]
pub struct MqttListener {
    /// `mqtt.listen`, then the optional ones: TLS, WebSocket, WebSocket over TLS.
    sockets: Vec<Socket>,
    max_connections: usize,
    handshakes: Arc<Handshakes>,
    settings: Arc<Settings>,
    endpoint: Endpoint,
}

/// One bound socket and what its connections speak.
#[derive(Debug)]
struct Socket {
    listener: TcpListener,
    local_addr: SocketAddr,
    transport: Transport,
}

/// What a listening socket's connections speak below MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Tls,
    WebSocket,
    WebSocketTls,
}

impl Transport {
    fn tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::WebSocketTls)
    }

    fn label(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::WebSocket => "ws",
            Transport::WebSocketTls => "wss",
        }
    }
}

impl MqttListener {
    /// Binds `config.listen` and each optional listener that is set (port
    /// 0 = ephemeral). A TLS listener needs `security.tls`.
    pub async fn bind(
        config: &MqttConfig,
        security: Arc<Security>,
    ) -> Result<MqttListener, MqttError> {
        let wanted = [
            (Some(config.listen), Transport::Tcp),
            (config.tls_listen, Transport::Tls),
            (config.ws_listen, Transport::WebSocket),
            (config.wss_listen, Transport::WebSocketTls),
        ];
        let mut sockets = Vec::new();
        for (addr, transport) in wanted {
            let Some(addr) = addr else { continue };
            if transport.tls() && security.tls.is_none() {
                return Err(MqttError::NoCertificate { addr });
            }
            let (listener, local_addr) = bind(addr).await?;
            match transport {
                Transport::WebSocket | Transport::WebSocketTls => {
                    tracing::info!(listen = %local_addr, transport = transport.label(), path = %config.ws_path, subprotocol = websocket::SUBPROTOCOL, "MQTT over WebSocket listener bound")
                }
                _ => {
                    tracing::info!(listen = %local_addr, transport = transport.label(), "MQTT listener bound")
                }
            }
            sockets.push(Socket {
                listener,
                local_addr,
                transport,
            });
        }
        zero_failure_counters();
        Ok(MqttListener {
            sockets,
            max_connections: config.max_connections.get(),
            handshakes: Handshakes::new(
                config.max_handshakes.get(),
                config.max_handshakes_per_source.get(),
            ),
            settings: Arc::new(Settings {
                max_packet_size: config.max_packet_size.get(),
                connect_timeout: config.connect_timeout,
                max_inflight: config.max_inflight.get(),
                max_queued_messages: config.max_queued_messages.get(),
                wills: Arc::default(),
                security,
            }),
            endpoint: Endpoint::new(&config.ws_path, config.max_packet_size.get()),
        })
    }

    fn addr_of(&self, transport: Transport) -> Option<SocketAddr> {
        self.sockets
            .iter()
            .find(|s| s.transport == transport)
            .map(|s| s.local_addr)
    }

    /// Local address of the WebSocket listener, if one is configured.
    pub fn ws_local_addr(&self) -> Option<SocketAddr> {
        self.addr_of(Transport::WebSocket)
    }

    /// Local address of the MQTT over TLS listener, if one is configured.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.addr_of(Transport::Tls)
    }

    /// Local address of the WebSocket over TLS listener, if one is configured.
    pub fn wss_local_addr(&self) -> Option<SocketAddr> {
        self.addr_of(Transport::WebSocketTls)
    }

    /// Local address of the plain TCP listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.sockets
            .first()
            .map(|s| s.local_addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Accepts until `shutdown` is cancelled; then stops accepting, tells
    /// each connection to finish (pending PUBACKs for already-committed
    /// messages are still sent), and waits for them.
    pub async fn run(self, router: Router, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let tracker = TaskTracker::new();
        let mut accepts: futures::stream::SelectAll<_> = self
            .sockets
            .iter()
            .map(|socket| {
                Box::pin(futures::stream::unfold(socket, |socket| async move {
                    let accepted = socket.listener.accept().await;
                    Some(((accepted, socket.transport, socket.local_addr), socket))
                }))
            })
            .collect();
        loop {
            let (accepted, transport, listen) = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = accepts.next() => match next {
                    Some(next) => next,
                    None => break,
                },
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    crate::logs::ACCEPT_FAILED
                        .record("accept", || format!("listen={listen} error={error}"));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            };
            let source = match self
                .settings
                .security
                .guard
                .admit(peer.ip(), std::time::Instant::now())
            {
                Ok(permit) => permit,
                Err(refusal) => {
                    metrics::counter!("edge_connections_rejected_total", "protocol" => "mqtt", "reason" => refusal.reason()).increment(1);
                    crate::logs::REFUSED.record(refusal.reason(), || {
                        format!("peer={peer} listen={listen} why={refusal}")
                    });
                    drop(stream);
                    continue;
                }
            };
            let (handshake, evicted) = self.handshakes.admit(peer.ip());
            for e in evicted {
                metrics::counter!("edge_connections_rejected_total", "protocol" => "mqtt", "reason" => e.reason()).increment(1);
                crate::logs::REFUSED.record(e.reason(), || {
                    format!(
                        "closed the oldest connection without CONNECT to make room for peer={peer}"
                    )
                });
            }
            metrics::gauge!("edge_mqtt_handshakes").set(self.handshakes.pending() as f64);
            let admission = Admission {
                handshake,
                limit: limit.clone(),
                max_connections: self.max_connections,
                source,
            };
            self.spawn(
                &tracker, transport, stream, peer, admission, &router, &shutdown,
            );
        }
        drop(accepts);
        let listen: Vec<SocketAddr> = self.sockets.iter().map(|s| s.local_addr).collect();
        drop(self.sockets);
        tracing::info!(
            ?listen,
            connections = tracker.len(),
            "MQTT listeners stopped accepting; waiting for connections to finish"
        );
        tracker.close();
        tracker.wait().await;
        // Delayed wills go out now (shutdown cut their wait).
        self.settings.wills.wait().await;
        tracing::info!(?listen, "MQTT listeners stopped");
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        tracker: &TaskTracker,
        transport: Transport,
        stream: TcpStream,
        peer: SocketAddr,
        admission: Admission,
        router: &Router,
        shutdown: &CancellationToken,
    ) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        metrics::counter!("edge_connections_total", "protocol" => "mqtt").increment(1);
        metrics::gauge!("edge_connections", "protocol" => "mqtt").increment(1.0);
        tracing::debug!(%peer, transport = transport.label(), "connection accepted");
        let settings = self.settings.clone();
        let endpoint = self.endpoint.clone();
        let router = router.clone();
        let shutdown = shutdown.clone();
        let task = async move {
            match transport {
                Transport::Tcp => {
                    let connection = Connection::new(stream, peer, settings, None);
                    connection.serve(router, admission, shutdown).await;
                }
                Transport::WebSocket => {
                    let ws = websocket::serve(
                        stream, peer, None, endpoint, settings, router, admission, shutdown,
                    );
                    Box::pin(ws).await;
                }
                Transport::Tls | Transport::WebSocketTls => {
                    let deadline = tokio::time::Instant::now() + settings.connect_timeout;
                    let Some((tls, identity)) =
                        tls_handshake(stream, peer, &settings, &admission, &shutdown, deadline)
                            .await
                    else {
                        metrics::gauge!("edge_connections", "protocol" => "mqtt").decrement(1.0);
                        return;
                    };
                    // CONNECT (or the upgrade) gets what the TLS handshake left.
                    let settings = Arc::new(Settings {
                        connect_timeout: deadline
                            .saturating_duration_since(tokio::time::Instant::now()),
                        ..Settings::clone(&settings)
                    });
                    if transport == Transport::Tls {
                        let connection = Connection::new(Stream(tls), peer, settings, identity);
                        Box::pin(connection.serve(router, admission, shutdown)).await;
                    } else {
                        let ws = websocket::serve(
                            tls, peer, identity, endpoint, settings, router, admission, shutdown,
                        );
                        Box::pin(ws).await;
                    }
                }
            }
            metrics::gauge!("edge_connections", "protocol" => "mqtt").decrement(1.0);
        };
        tracker.spawn(task);
    }
}

/// The TLS handshake of a new connection, bounded by the CONNECT deadline
/// and by eviction among pending handshakes; the verified client
/// certificate's identity when `auth.cert_identity` asks for one.
async fn tls_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    settings: &Settings,
    admission: &Admission,
    shutdown: &CancellationToken,
    deadline: tokio::time::Instant,
) -> Option<(TlsStream<TcpStream>, Option<String>)> {
    let tls = settings.security.tls.as_ref()?;
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return None,
        _ = admission.handshake.evicted() => return None,
        accepted = tokio::time::timeout_at(deadline, tls.accept(stream)) => accepted,
    };
    match accepted {
        Ok(Ok(stream)) => {
            let identity = edge_tls::peer_identity(&stream, settings.security.cert_identity);
            Some((stream, identity))
        }
        Ok(Err(error)) => {
            metrics::counter!("edge_tls_handshake_failures_total", "protocol" => "mqtt", "reason" => error.reason()).increment(1);
            crate::logs::TLS_FAILED.record(error.reason(), || format!("peer={peer} error={error}"));
            None
        }
        Err(_) => {
            metrics::counter!("edge_tls_handshake_failures_total", "protocol" => "mqtt", "reason" => "timeout").increment(1);
            crate::logs::TLS_FAILED.record("timeout", || {
                format!("peer={peer} no TLS handshake within mqtt.connect_timeout")
            });
            None
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), MqttError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MqttError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| MqttError::LocalAddr { addr, source })?;
    Ok((listener, local_addr))
}

/// Failure counters exist at zero from the start (alerts can be written
/// before the first event).
fn zero_failure_counters() {
    for reason in [
        "max_connections",
        "max_handshakes",
        "max_handshakes_per_source",
        "max_connections_per_source",
        "connection_rate",
        "login_backoff",
    ] {
        metrics::counter!("edge_connections_rejected_total", "protocol" => "mqtt", "reason" => reason)
            .increment(0);
    }
    for reason in crate::error::ProtocolError::REASONS {
        metrics::counter!("edge_mqtt_protocol_errors_total", "reason" => reason).increment(0);
    }
    metrics::counter!("edge_messages_dropped_total", "reason" => "unencodable").increment(0);
    for reason in websocket::REFUSED_REASONS {
        metrics::counter!("edge_mqtt_ws_refused_total", "reason" => reason).increment(0);
    }
    for reason in websocket::CLOSED_REASONS {
        metrics::counter!("edge_mqtt_ws_closed_total", "reason" => reason).increment(0);
    }
    for outcome in crate::will::OUTCOMES {
        metrics::counter!("edge_mqtt_wills_total", "outcome" => outcome).increment(0);
    }
}
