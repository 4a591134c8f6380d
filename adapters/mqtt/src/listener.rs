//! Accepts TCP connections, one task each, on `mqtt.listen` and, when
//! configured, MQTT over WebSocket on `mqtt.ws_listen` (`websocket.rs`).
//! Both share one budget: connections that have not sent CONNECT yet are
//! held to their own (`handshakes.rs`); the others to `max_connections`,
//! checked once CONNECT has been read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edge_config::MqttConfig;
use edge_core::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Connection, Settings};
use crate::error::MqttError;
use crate::handshakes::{Handshake, Handshakes};
use crate::websocket::{self, Endpoint};

/// What a new connection needs to become a client: its place among pending
/// handshakes, then a place among established connections.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) handshake: Handshake,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) max_connections: usize,
}

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound MQTT listener; [`MqttListener::run`] serves it.
#[derive(Debug)]
pub struct MqttListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    max_connections: usize,
    handshakes: Arc<Handshakes>,
    settings: Arc<Settings>,
    ws: Option<WsListener>,
}

/// The WebSocket side of the listener.
#[derive(Debug)]
struct WsListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    endpoint: Endpoint,
}

/// Which of the listener's sockets accepted a connection.
#[derive(Debug, Clone, Copy)]
enum Transport {
    Tcp,
    WebSocket,
}

impl MqttListener {
    /// Binds `config.listen` and `config.ws_listen` if set (port 0 = ephemeral).
    pub async fn bind(config: &MqttConfig) -> Result<MqttListener, MqttError> {
        let (listener, local_addr) = bind(config.listen).await?;
        tracing::info!(listen = %local_addr, "MQTT listener bound");
        let ws = match config.ws_listen {
            Some(addr) => {
                let (listener, local_addr) = bind(addr).await?;
                tracing::info!(listen = %local_addr, path = %config.ws_path, subprotocol = websocket::SUBPROTOCOL, "MQTT over WebSocket listener bound");
                Some(WsListener {
                    listener,
                    local_addr,
                    endpoint: Endpoint::new(&config.ws_path, config.max_packet_size.get()),
                })
            }
            None => None,
        };
        zero_failure_counters();
        Ok(MqttListener {
            listener,
            local_addr,
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
            }),
            ws,
        })
    }

    /// Local address of the WebSocket listener, if one is configured.
    pub fn ws_local_addr(&self) -> Option<SocketAddr> {
        self.ws.as_ref().map(|ws| ws.local_addr)
    }

    /// Local address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts until `shutdown` is cancelled; then stops accepting, tells
    /// each connection to finish (pending PUBACKs for already-committed
    /// messages are still sent), and waits for them.
    pub async fn run(self, router: Router, shutdown: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let tracker = TaskTracker::new();
        loop {
            let (accepted, transport) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => (accepted, Transport::Tcp),
                accepted = accept_ws(self.ws.as_ref()) => (accepted, Transport::WebSocket),
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    let listen = match (transport, &self.ws) {
                        (Transport::WebSocket, Some(ws)) => ws.local_addr,
                        _ => self.local_addr,
                    };
                    crate::logs::ACCEPT_FAILED
                        .record("accept", || format!("listen={listen} error={error}"));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
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
            };
            self.spawn(
                &tracker, transport, stream, peer, admission, &router, &shutdown,
            );
        }
        drop(self.listener);
        let ws_listen = self.ws.map(|ws| ws.local_addr);
        tracing::info!(listen = %self.local_addr, ws_listen = ?ws_listen, connections = tracker.len(), "MQTT listener stopped accepting; waiting for connections to finish");
        tracker.close();
        tracker.wait().await;
        // Delayed wills go out now (shutdown cut their wait).
        self.settings.wills.wait().await;
        tracing::info!(listen = %self.local_addr, ws_listen = ?ws_listen, "MQTT listener stopped");
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
        tracing::debug!(%peer, "connection accepted");
        let settings = self.settings.clone();
        let endpoint = match transport {
            Transport::Tcp => None,
            Transport::WebSocket => self.ws.as_ref().map(|ws| ws.endpoint.clone()),
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        let task = async move {
            match endpoint {
                None => {
                    let connection = Connection::new(stream, peer, settings);
                    connection.serve(router, admission, shutdown).await;
                }
                Some(endpoint) => {
                    let ws = websocket::serve(
                        stream, peer, endpoint, settings, router, admission, shutdown,
                    );
                    Box::pin(ws).await;
                }
            }
            metrics::gauge!("edge_connections", "protocol" => "mqtt").decrement(1.0);
        };
        tracker.spawn(task);
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

/// The WebSocket listener's next connection; never, without one.
async fn accept_ws(ws: Option<&WsListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match ws {
        Some(ws) => ws.listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Failure counters exist at zero from the start (alerts can be written
/// before the first event).
fn zero_failure_counters() {
    for reason in [
        "max_connections",
        "max_handshakes",
        "max_handshakes_per_source",
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
