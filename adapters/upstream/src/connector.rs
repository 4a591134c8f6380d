//! Getting a link to the upstream: each broker node in turn, exponential
//! back-off with jitter between failures, forever (until shutdown).
//!
//! After a link drops, the next attempt goes to the next node (a cluster
//! rolling its nodes is ridden out on the others). With `return_to_first`
//! each round starts at the first node again, and while linked to another
//! node the forwarder probes the first one every `reconnect_max` and moves
//! back once it answers. Each node has `edge_upstream_node_up` and
//! `edge_upstream_connects_total{node, result}`, labelled `host:port`.
//!
//! An `amqps://` node is reached over TLS with the upstream's own rustls
//! configuration ([`crate::tls`]: trust, client certificate, server name),
//! built once per upstream. A failed handshake is a failed attempt like any
//! other (logged with its reason, counted, retried with back-off); it never
//! falls back to plain TCP.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use edge_config::UpstreamConfig;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::AsyncTcpStream;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties};
use metrics::{Counter, Gauge};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::LinkError;
use crate::health::{LinkStatus, node_label};
use crate::tls::TlsClient;

/// Longest wait for one connection attempt (TCP, TLS, AMQP handshake, channel).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a clean close of a link.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Exponential back-off: the n-th consecutive failure waits a random time in
/// `[max(min, d/2), d]` with `d = min(min * 2^n, max)`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            failures: 0,
        }
    }

    /// The delay before the next attempt; each call counts one more failure.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let factor = 2u32.saturating_pow(self.failures);
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.min.saturating_mul(factor).min(self.max);
        let floor = (ceiling / 2).max(self.min);
        if ceiling <= floor {
            return ceiling;
        }
        let span = u64::try_from((ceiling - floor).as_millis()).unwrap_or(u64::MAX);
        floor + Duration::from_millis(rng.random_range(0..=span))
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `uri` with the password replaced by `***`, for logs.
pub(crate) fn redact(uri: &str) -> String {
    edge_config::redact_uri(uri)
}

/// An open connection with a channel in confirm mode.
#[derive(Debug)]
pub(crate) struct Link {
    pub connection: Connection,
    pub channel: Channel,
    /// The URI without password.
    pub uri: String,
    /// The node's place in the upstream's list (0: the first).
    pub node: usize,
}

impl Link {
    /// Connects to `uri` (TCP, then TLS for `amqps://` with `tls`), opens a
    /// channel and puts it in confirm mode. A failure that rustls explains
    /// is a [`LinkError::Tls`].
    async fn open(
        uri: &str,
        properties: ConnectionProperties,
        tls: Option<&TlsClient>,
    ) -> Result<Link, LinkError> {
        let parsed: AMQPUri = uri.parse().map_err(|e: String| {
            // The parser may quote the URI, password and all.
            let e = e.replace(uri, &redact(uri));
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
            LinkError::Connect(e.into())
        })?;
        let attempt = match (&parsed.scheme, tls) {
            (AMQPScheme::AMQP, _) => None,
            (AMQPScheme::AMQPS, Some(tls)) => Some(Arc::new(tls.attempt(&parsed.authority.host)?)),
            (AMQPScheme::AMQPS, None) => {
                // Connector::new builds a TlsClient whenever a URI is amqps.
                let e = std::io::Error::other("amqps:// node without a TLS configuration");
                return Err(LinkError::Connect(e.into()));
            }
        };
        let failed = |e: lapin::Error| match tls.zip(attempt.as_deref()) {
            Some((tls, attempt)) => match tls.failure(&e, attempt) {
                Some(tls) => LinkError::Tls(tls),
                None => LinkError::Connect(e),
            },
            None => LinkError::Connect(e),
        };
        let runtime = lapin::runtime::default_runtime().map_err(LinkError::Connect)?;
        let handshake = attempt.clone();
        // The transport, made by lapin's I/O loop: TCP, then the TLS
        // handshake for amqps://.
        let connection = Connection::connector(
            parsed,
            runtime,
            async move |uri, runtime| {
                let addrs =
                    runtime.to_socket_addrs((uri.authority.host.clone(), uri.authority.port));
                let stream = AsyncTcpStream::connect(&runtime, addrs).await?;
                let Some(attempt) = &handshake else {
                    return Ok(stream);
                };
                let (connector, server_name) = attempt.connector();
                let stream = stream.into_rustls(connector, server_name).await?;
                attempt.handshake_done();
                Ok(stream)
            },
            properties,
        )
        .await
        .map_err(failed)?;
        let channel = match connection.create_channel().await {
            Ok(c) => c,
            Err(e) => {
                let _ = connection.close(0, "channel failed".into()).await;
                return Err(failed(e));
            }
        };
        if let Err(e) = channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
        {
            let _ = connection.close(0, "confirm.select failed".into()).await;
            return Err(failed(e));
        }
        Ok(Link {
            connection,
            channel,
            uri: redact(uri),
            node: 0,
        })
    }

    /// Both the connection and the channel are usable.
    pub(crate) fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Closes channel and connection, each bounded by a short timeout;
    /// errors (the link may already be dead) are ignored.
    pub(crate) async fn close(self, reason: &str) {
        if self.channel.status().connected() {
            let _ =
                tokio::time::timeout(CLOSE_TIMEOUT, self.channel.close(200, reason.into())).await;
        }
        if self.connection.status().connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, reason.into()))
                .await;
        }
    }
}

/// Opens links to one upstream, trying its nodes in turn.
#[derive(Debug)]
pub(crate) struct Connector {
    upstream: String,
    nodes: Vec<Node>,
    next_node: usize,
    return_to_first: bool,
    backoff: Backoff,
    connection_name: String,
    /// For `amqps://` nodes; `None` when the upstream has none.
    tls: Option<Arc<TlsClient>>,
    status: LinkStatus,
}

/// One broker node of an upstream, with its metrics.
#[derive(Debug)]
struct Node {
    uri: String,
    label: String,
    up: Gauge,
    connects_ok: Counter,
    connects_failed: Counter,
}

/// Whose link a connector opens: its metrics and its connection name.
#[derive(Debug, Clone, Copy)]
enum Owner<'a> {
    /// The upstream's forwarder: `edge_upstream_node_up{upstream, node}`,
    /// `edge_upstream_connects_total{upstream, node, result}`.
    Forwarder,
    /// A downstream over its upstream's nodes, on a connection of its own:
    /// `edge_downstream_node_up{downstream, node}`,
    /// `edge_downstream_connects_total{downstream, node, result}`.
    Downstream(&'a str),
}

impl Connector {
    pub(crate) fn new(config: &UpstreamConfig, gateway_id: &str, status: LinkStatus) -> Connector {
        Connector::build(config, gateway_id, status, Owner::Forwarder)
    }

    /// Links for the downstream `downstream` over `config`'s nodes, TLS
    /// and back-off, with metrics of its own.
    pub(crate) fn downstream(
        config: &UpstreamConfig,
        downstream: &str,
        gateway_id: &str,
        status: LinkStatus,
    ) -> Connector {
        Connector::build(config, gateway_id, status, Owner::Downstream(downstream))
    }

    fn build(
        config: &UpstreamConfig,
        gateway_id: &str,
        status: LinkStatus,
        owner: Owner<'_>,
    ) -> Connector {
        let upstream = config.name.clone();
        let nodes = config
            .uris
            .iter()
            .map(|uri| {
                let label = node_label(uri);
                let (up, connects_ok, connects_failed) = match owner {
                    Owner::Forwarder => {
                        let counter = |result: &'static str| {
                            metrics::counter!("edge_upstream_connects_total",
                                "upstream" => upstream.clone(), "node" => label.clone(), "result" => result)
                        };
                        (
                            metrics::gauge!("edge_upstream_node_up",
                                "upstream" => upstream.clone(), "node" => label.clone()),
                            counter("ok"),
                            counter("error"),
                        )
                    }
                    Owner::Downstream(name) => {
                        let counter = |result: &'static str| {
                            metrics::counter!("edge_downstream_connects_total",
                                "downstream" => name.to_string(), "node" => label.clone(), "result" => result)
                        };
                        (
                            metrics::gauge!("edge_downstream_node_up",
                                "downstream" => name.to_string(), "node" => label.clone()),
                            counter("ok"),
                            counter("error"),
                        )
                    }
                };
                let node = Node {
                    uri: uri.clone(),
                    up,
                    connects_ok,
                    connects_failed,
                    label,
                };
                node.up.set(0.0);
                node.connects_ok.increment(0);
                node.connects_failed.increment(0);
                node
            })
            .collect();
        Connector {
            upstream,
            nodes,
            next_node: 0,
            return_to_first: config.return_to_first,
            backoff: Backoff::new(config.reconnect_min, config.reconnect_max),
            connection_name: match owner {
                Owner::Forwarder => format!("edge-gateway {gateway_id} upstream {}", config.name),
                Owner::Downstream(name) => format!("edge-gateway {gateway_id} downstream {name}"),
            },
            tls: config
                .uris
                .iter()
                .any(|uri| uri.starts_with("amqps://"))
                .then(|| Arc::new(TlsClient::new(&config.name, &config.tls))),
            status,
        }
    }

    /// The link has proven itself (a confirm arrived): the next failure
    /// starts the back-off from the minimum again.
    pub(crate) fn link_healthy(&mut self) {
        self.backoff.reset();
    }

    /// Waits the back-off delay; false when shutdown came first.
    pub(crate) async fn pause(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.backoff.next_delay(&mut rand::rng());
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// The link on node `node` is gone.
    pub(crate) fn link_down(&mut self, node: usize) {
        if let Some(n) = self.nodes.get(node) {
            n.up.set(0.0);
        }
        // With return_to_first every round of attempts starts at the first
        // node; otherwise the next node is tried first.
        self.next_node = if self.return_to_first { 0 } else { node + 1 };
    }

    /// Linked to a node other than the first, which is to be preferred.
    pub(crate) fn wants_first(&self, link: &Link) -> bool {
        self.return_to_first && link.node != 0 && !self.nodes.is_empty()
    }

    /// One attempt on the first node, for a return to it; its outcome is
    /// logged, not counted as a failure of the upstream.
    pub(crate) fn probe_first(&self) -> impl Future<Output = Option<Link>> + Send + 'static {
        let attempt = self.attempt(0);
        let upstream = self.upstream.clone();
        let label = self
            .nodes
            .first()
            .map(|n| n.label.clone())
            .unwrap_or_default();
        async move {
            match attempt.await {
                Ok(link) => Some(link),
                Err(error) => {
                    debug!(upstream = %upstream, node = %label, %error,
                        "first node still unavailable; staying on the current one");
                    None
                }
            }
        }
    }

    /// Moved back to the first node over `link`, leaving `from`.
    pub(crate) fn returned(&mut self, link: &Link, from: usize) {
        if let Some(n) = self.nodes.get(from) {
            n.up.set(0.0);
        }
        self.linked(link);
    }

    fn linked(&self, link: &Link) {
        let node = &self.nodes[link.node];
        node.connects_ok.increment(1);
        node.up.set(1.0);
        self.status.set_node(&node.label);
        info!(upstream = %self.upstream, node = %node.label, uri = %link.uri, "upstream link up");
    }

    /// A connect attempt on node `index` (bounded by `CONNECT_TIMEOUT`).
    fn attempt(
        &self,
        index: usize,
    ) -> impl Future<Output = Result<Link, LinkError>> + Send + 'static {
        let uri = self
            .nodes
            .get(index)
            .map(|n| n.uri.clone())
            .unwrap_or_default();
        let properties = ConnectionProperties::default()
            .with_connection_name(self.connection_name.as_str().into());
        let tls = self.tls.clone();
        async move {
            let open = Link::open(&uri, properties, tls.as_deref());
            match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
                Ok(Ok(mut link)) => {
                    link.node = index;
                    Ok(link)
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(LinkError::ConnectTimeout(CONNECT_TIMEOUT)),
            }
        }
    }

    /// Connects to the next node, retrying forever; `None` on shutdown.
    pub(crate) async fn connect(&mut self, shutdown: &CancellationToken) -> Option<Link> {
        loop {
            if self.nodes.is_empty() {
                warn!(upstream = %self.upstream, "no broker URI configured; not forwarding");
                shutdown.cancelled().await;
                return None;
            }
            let index = self.next_node % self.nodes.len();
            self.next_node = (index + 1) % self.nodes.len();
            self.status.set_node(&self.nodes[index].label);
            let result = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.attempt(index) => r,
            };
            let error = match result {
                Ok(link) => {
                    self.linked(&link);
                    return Some(link);
                }
                Err(error) => error,
            };
            let node = &self.nodes[index];
            node.connects_failed.increment(1);
            self.status
                .attempt_failed(matches!(error, LinkError::ConnectTimeout(_)));
            let delay = self.backoff.next_delay(&mut rand::rng());
            warn!(upstream = %self.upstream, node = %node.label, uri = %redact(&node.uri), %error,
                retry_in_ms = delay.as_millis() as u64, "cannot connect to upstream broker");
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn backoff_grows_within_bounds_with_jitter() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let mut b = Backoff::new(min, max);
            let mut ceiling = min;
            for _ in 0..20 {
                let d = b.next_delay(&mut rng);
                assert!(d >= min && d <= max, "{d:?} outside [{min:?}, {max:?}]");
                assert!(d <= ceiling, "{d:?} above this step's ceiling {ceiling:?}");
                assert!(
                    d >= (ceiling / 2).max(min),
                    "{d:?} below half of {ceiling:?}"
                );
                ceiling = (ceiling * 2).min(max);
            }
        }
    }

    #[test]
    fn backoff_jitters_and_resets() {
        let mut rng = StdRng::seed_from_u64(1);
        let max = Duration::from_secs(10);
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_millis(100), max);
                for _ in 0..9 {
                    b.next_delay(&mut rng);
                }
                b.next_delay(&mut rng)
            })
            .collect();
        assert!(delays.len() > 1, "the same step gives different delays");
        assert!(delays.iter().all(|d| *d >= max / 2 && *d <= max));

        let mut b = Backoff::new(Duration::from_millis(100), max);
        for _ in 0..10 {
            b.next_delay(&mut rng);
        }
        b.reset();
        assert_eq!(b.next_delay(&mut rng), Duration::from_millis(100));
    }

    #[test]
    fn backoff_survives_huge_failure_counts() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_secs(1));
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(
            redact("amqp://edge:s3cret@broker-1:5672/%2f"),
            "amqp://edge:***@broker-1:5672/%2f"
        );
        // Hides too much rather than too little.
        assert_eq!(redact("amqps://u:p:q@h/v?x=a@b"), "amqps://u:***@b");
        assert_eq!(redact("amqp://u:pa/ss@h"), "amqp://u:***@h");
        assert_eq!(redact("amqp://edge@h"), "amqp://edge@h");
        assert_eq!(redact("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(redact("not a uri"), "not a uri");
    }
}
