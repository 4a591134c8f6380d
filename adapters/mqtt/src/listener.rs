//! Accepts TCP connections, one task each. Connections that have not sent
//! CONNECT yet are held to their own budget (`handshakes.rs`); the others to
//! `max_connections`, checked once CONNECT has been read.

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
}

impl MqttListener {
    /// Binds `config.listen` (port 0 = ephemeral).
    pub async fn bind(config: &MqttConfig) -> Result<MqttListener, MqttError> {
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MqttError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| MqttError::LocalAddr { addr, source })?;
        tracing::info!(listen = %local_addr, "MQTT listener bound");
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
        })
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
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    crate::logs::ACCEPT_FAILED.record("accept", || {
                        format!("listen={} error={error}", self.local_addr)
                    });
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
            self.spawn(&tracker, stream, peer, admission, &router, &shutdown);
        }
        drop(self.listener);
        tracing::info!(listen = %self.local_addr, connections = tracker.len(), "MQTT listener stopped accepting; waiting for connections to finish");
        tracker.close();
        tracker.wait().await;
        // Delayed wills go out now (shutdown cut their wait).
        self.settings.wills.wait().await;
        tracing::info!(listen = %self.local_addr, "MQTT listener stopped");
    }

    fn spawn(
        &self,
        tracker: &TaskTracker,
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
        let connection = Connection::new(stream, peer, self.settings.clone());
        let router = router.clone();
        let shutdown = shutdown.clone();
        let task = async move {
            connection.serve(router, admission, shutdown).await;
            metrics::gauge!("edge_connections", "protocol" => "mqtt").decrement(1.0);
        };
        tracker.spawn(task);
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
    for outcome in crate::will::OUTCOMES {
        metrics::counter!("edge_mqtt_wills_total", "outcome" => outcome).increment(0);
    }
}
