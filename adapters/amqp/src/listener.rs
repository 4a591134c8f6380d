//! Accepts TCP connections on `amqp.listen` and, when configured, TLS
//! connections on `amqp.tls_listen`, one task each, up to
//! `max_connections`; each passes the per-source guard at accept. The TLS
//! handshake runs inside the connection's handshake timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use edge_auth::Security;
use edge_config::AmqpConfig;
use edge_core::Router;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
use crate::connection::{Connection, Reader, Settings, Writer};
use crate::error::AmqpError;
use crate::telemetry::{self, PROTOCOL};

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound AMQP listener; [`AmqpListener::run`] serves it.
#[derive(Debug)]
pub struct AmqpListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<(TcpListener, SocketAddr)>,
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
    pub async fn bind(
        config: &AmqpConfig,
        security: Arc<Security>,
    ) -> Result<AmqpListener, AmqpError> {
        let (listener, local_addr) = bind(config.listen).await?;
        tracing::info!(listen = %local_addr, "AMQP listener bound");
        let tls = match config.tls_listen {
            Some(addr) if security.tls.is_none() => return Err(AmqpError::NoCertificate { addr }),
            Some(addr) => {
                let bound = bind(addr).await?;
                tracing::info!(listen = %bound.1, "AMQP over TLS listener bound");
                Some(bound)
            }
            None => None,
        };
        telemetry::zero();
        Ok(AmqpListener {
            listener,
            local_addr,
            tls,
            max_connections: config.max_connections.get(),
            settings: Arc::new(Settings {
                channel_max: config.channel_max.get(),
                frame_max: config.frame_max,
                heartbeat: u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX),
                handshake_timeout: config.handshake_timeout,
                max_message_size: config.max_message_size,
                max_unconfirmed: config.max_unconfirmed.get(),
                security,
            }),
            open: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The AMQP over TLS listener's address, if one is configured.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|(_, addr)| *addr)
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
            let (accepted, tls) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.listener.accept() => (accepted, false),
                accepted = accept_tls(self.tls.as_ref()) => (accepted, true),
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
            let source = match self
                .settings
                .security
                .guard
                .admit(peer.ip(), std::time::Instant::now())
            {
                Ok(source) => source,
                Err(refusal) => {
                    metrics::counter!("edge_connections_rejected_total", "protocol" => PROTOCOL, "reason" => refusal.reason()).increment(1);
                    crate::logs::GUARD_REFUSED
                        .record(refusal.reason(), || format!("peer={peer} why={refusal}"));
                    drop(stream);
                    continue;
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
            let settings = Arc::clone(&self.settings);
            let broker = Arc::clone(&broker);
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let started = tokio::time::Instant::now();
                let halves = if tls {
                    tls_handshake(stream, peer, &settings, &shutdown).await
                } else {
                    let (reader, writer) = stream.into_split();
                    let halves: (Reader, Writer) = (Box::new(reader), Box::new(writer));
                    Some((halves, None))
                };
                if let Some((halves, identity)) = halves {
                    // The AMQP handshake gets what the TLS handshake left.
                    let settings = if tls {
                        Arc::new(Settings {
                            handshake_timeout: settings
                                .handshake_timeout
                                .saturating_sub(started.elapsed()),
                            ..Settings::clone(&settings)
                        })
                    } else {
                        settings
                    };
                    let connection = Connection::new(halves, peer, identity, id, settings, broker);
                    connection.serve(shutdown).await;
                }
                drop(source);
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

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AmqpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AmqpError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| AmqpError::LocalAddr { addr, source })?;
    Ok((listener, local_addr))
}

/// The TLS listener's next connection; never, without one.
async fn accept_tls(
    tls: Option<&(TcpListener, SocketAddr)>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    match tls {
        Some((listener, _)) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// The TLS handshake, within the AMQP handshake timeout; the stream's
/// halves and the client certificate's identity.
async fn tls_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> Option<((Reader, Writer), Option<String>)> {
    let tls = settings.security.tls.as_ref()?;
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return None,
        accepted = tokio::time::timeout(settings.handshake_timeout, tls.accept(stream)) => accepted,
    };
    let reason = match accepted {
        Ok(Ok(stream)) => {
            let identity = edge_tls::peer_identity(&stream, settings.security.cert_identity);
            let (reader, writer) = tokio::io::split(stream);
            return Some(((Box::new(reader), Box::new(writer)), identity));
        }
        Ok(Err(error)) => {
            crate::logs::TLS_FAILED.record(error.reason(), || format!("peer={peer} error={error}"));
            error.reason()
        }
        Err(_) => {
            crate::logs::TLS_FAILED.record("timeout", || {
                format!("peer={peer} no TLS handshake within amqp.handshake_timeout")
            });
            "timeout"
        }
    };
    metrics::counter!("edge_tls_handshake_failures_total", "protocol" => PROTOCOL, "reason" => reason).increment(1);
    None
}
