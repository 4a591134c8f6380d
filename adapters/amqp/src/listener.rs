//! Accepts TCP connections, one task each, up to `max_connections`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use edge_config::AmqpConfig;
use edge_core::Router;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::connection::{Connection, Settings};
use crate::error::AmqpError;
use crate::telemetry::{self, PROTOCOL};

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound AMQP listener; [`AmqpListener::run`] serves it.
#[derive(Debug)]
pub struct AmqpListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    max_connections: usize,
    settings: Arc<Settings>,
    open: Arc<AtomicUsize>,
}

/// The number of connections a listener serves now (for `/healthz`).
#[derive(Debug, Clone)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl AmqpListener {
    /// Binds `config.listen` (port 0 = ephemeral).
    pub async fn bind(config: &AmqpConfig) -> Result<AmqpListener, AmqpError> {
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AmqpError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| AmqpError::LocalAddr { addr, source })?;
        tracing::info!(listen = %local_addr, "AMQP listener bound");
        telemetry::zero();
        Ok(AmqpListener {
            listener,
            local_addr,
            max_connections: config.max_connections.get(),
            settings: Arc::new(Settings {
                channel_max: config.channel_max.get(),
                frame_max: config.frame_max,
                heartbeat: u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX),
                handshake_timeout: config.handshake_timeout,
                max_message_size: config.max_message_size,
                max_unconfirmed: config.max_unconfirmed.get(),
            }),
            open: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Counts the connections this listener serves.
    pub fn open_connections(&self) -> OpenConnections {
        OpenConnections(Arc::clone(&self.open))
    }

    /// Loads the AMQP definitions (durable exchanges, queues and their
    /// bindings) and accepts until `shutdown` is cancelled; then closes
    /// every connection (320 CONNECTION_FORCED) and waits for them.
    pub async fn run(self, router: Router, shutdown: CancellationToken) {
        let broker = match Broker::load(router).await {
            Ok(broker) => broker,
            Err(error) => {
                tracing::error!(%error, "cannot load the AMQP definitions from the store; the AMQP listener is not serving");
                return;
            }
        };
        let sampler_stop = CancellationToken::new();
        let sampler = tokio::spawn(telemetry::sample_queues(
            Arc::downgrade(&broker),
            sampler_stop.clone(),
        ));
        let limit = Arc::new(Semaphore::new(self.max_connections));
        let tracker = TaskTracker::new();
        let ids = AtomicU64::new(1);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (mut stream, peer) = match accepted {
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
            let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                metrics::counter!("edge_connections_rejected_total", "protocol" => PROTOCOL, "reason" => "max_connections").increment(1);
                crate::logs::OVER_LIMIT.record("max_connections", || format!("peer={peer}"));
                tokio::spawn(async move {
                    let _ = stream.shutdown().await;
                });
                continue;
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
            }
            metrics::counter!("edge_connections_total", "protocol" => PROTOCOL).increment(1);
            metrics::gauge!("edge_connections", "protocol" => PROTOCOL).increment(1.0);
            let open = Arc::clone(&self.open);
            open.fetch_add(1, Ordering::Relaxed);
            let id = ids.fetch_add(1, Ordering::Relaxed);
            let connection = Connection::new(
                stream,
                peer,
                id,
                Arc::clone(&self.settings),
                Arc::clone(&broker),
            );
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                connection.serve(shutdown).await;
                metrics::gauge!("edge_connections", "protocol" => PROTOCOL).decrement(1.0);
                open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
        drop(self.listener);
        tracing::info!(listen = %self.local_addr, connections = tracker.len(), "AMQP listener stopped accepting; closing connections");
        tracker.close();
        tracker.wait().await;
        sampler_stop.cancel();
        let _ = sampler.await;
        broker.close().await;
        tracing::info!(listen = %self.local_addr, "AMQP listener stopped");
    }
}
