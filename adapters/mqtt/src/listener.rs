//! Accepts TCP connections, at most `max_connections` at a time, one task each.

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

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound MQTT listener; [`MqttListener::run`] serves it.
#[derive(Debug)]
pub struct MqttListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    max_connections: usize,
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
        Ok(MqttListener {
            listener,
            local_addr,
            max_connections: config.max_connections.get(),
            settings: Arc::new(Settings {
                max_packet_size: config.max_packet_size.get(),
                connect_timeout: config.connect_timeout,
                max_inflight: config.max_inflight.get(),
                max_queued_messages: config.max_queued_messages.get(),
            }),
        })
    }

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
                    tracing::warn!(listen = %self.local_addr, %error, "MQTT accept failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                metrics::counter!("edge_connections_rejected_total", "protocol" => "mqtt", "reason" => "max_connections").increment(1);
                tracing::warn!(%peer, max_connections = self.max_connections, "connection limit reached: connection refused");
                drop(stream);
                continue;
            };
            self.spawn(&tracker, stream, peer, permit, &router, &shutdown);
        }
        drop(self.listener);
        tracing::info!(listen = %self.local_addr, connections = tracker.len(), "MQTT listener stopped accepting; waiting for connections to finish");
        tracker.close();
        tracker.wait().await;
        tracing::info!(listen = %self.local_addr, "MQTT listener stopped");
    }

    fn spawn(
        &self,
        tracker: &TaskTracker,
        stream: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
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
        tracker.spawn(async move {
            connection.serve(router, shutdown).await;
            metrics::gauge!("edge_connections", "protocol" => "mqtt").decrement(1.0);
            drop(permit);
        });
    }
}
