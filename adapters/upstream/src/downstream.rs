//! Downstream: commands from central to devices. One [`Downstream`] per
//! `[[downstream]]` consumes a queue on the central broker, over a
//! connection of its own to the nodes of its `[[upstream]]` (same URIs,
//! credentials, TLS and back-off; [`Connector`]), and publishes each
//! message locally through the [`Router`]: to MQTT subscribers, AMQP
//! consumers and the durable queues of offline persistent sessions.
//!
//! **Durability contract.** A delivery is acknowledged upstream
//! (`basic.ack`) only after the router's [`edge_core::Receipt`] for it
//! resolved, that is after its commit is durable in the local store. A
//! crash in between leaves it unacknowledged: the broker delivers it again.
//!
//! **Duplicates.** A delivery's AMQP `message_id` is recorded as the store
//! dedup key `downstream/<name>/<message_id>` in the SAME commit as the
//! message ([`Router::publish_matched`] with a key), and remembered in a
//! window of the last `dedup_window` ids (`dedup.rs`), loaded from the
//! store at start. A delivery whose id is in the window is acknowledged and
//! not published again (`edge_downstream_duplicates_total`). A message
//! without `message_id` is published each time it comes (at least once;
//! `edge_downstream_without_id_total`). With `qos = 0` a message nobody
//! takes is not stored at all, and its id is then remembered in memory only.
//!
//! **Order of acknowledgements.** Outcomes are settled in delivery order.
//! A duplicate of a message whose commit is still under way is settled
//! after it: acknowledged if that commit succeeded, returned to the queue
//! if it failed. A failed commit (store full or failed) drops the link
//! after what is under way has settled; its delivery and every
//! unacknowledged one go back to the queue, and consuming resumes once the
//! store takes messages again (when it was full), after the back-off: no
//! hot redelivery loop while the store is full. The back-off restarts from
//! its minimum only once a commit proved link and store.
//!
//! **What is not published.** A message nobody local takes is still
//! acknowledged (`edge_downstream_unmatched_total`, DEBUG). A message whose
//! topic cannot be mapped (no `x-mqtt-topic` and an empty routing key, an
//! invalid topic) or that the store can never hold (a field too long for
//! the format, larger than the whole quota) is rejected without requeue
//! (dead-lettered centrally if the queue has a DLX), with a WARN line and
//! `edge_downstream_rejected_total{reason}`.
//!
//! A missing queue is logged with what to do and retried with back-off
//! (unless `declare = true`: then it is declared durable). The link's state
//! is `edge_downstream_state{downstream, state}` (`up` or `down`).

mod dedup;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edge_config::{DownstreamConfig, UpstreamConfig};
use edge_core::{PublishError, QoS, Router};
use edge_store::StoreError;
use futures_util::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::connector::{Connector, Link};
use crate::convert;
use crate::error::DownstreamError;
use crate::exchanges::is_not_found;
use crate::health::{LinkState, LinkStatus};
use crate::metrics::DownstreamMetrics;
use dedup::DedupWindow;

/// Releases of dedup keys pushed out of the window, under way at most;
/// beyond it no delivery is taken until some are done.
const MAX_RELEASES: usize = 1024;
/// Wait before reading the dedup window again after a failed read.
const LOAD_RETRY: Duration = Duration::from_secs(1);

/// Test seam (see [`abort_after_downstream_commits`]); 0: never.
static ABORT_AFTER_COMMITS: AtomicU64 = AtomicU64::new(0);
static COMMITS: AtomicU64 = AtomicU64::new(0);

/// Test seam for crash tests, never set by the gateway itself (the test
/// build of the binary sets it from its environment): the process aborts
/// right after the `n`-th downstream message of this process is committed
/// locally, before its `basic.ack` is sent upstream.
pub fn abort_after_downstream_commits(n: u64) {
    ABORT_AFTER_COMMITS.store(n, Ordering::Relaxed);
}

/// One `[[downstream]]`: see the module documentation.
#[derive(Debug)]
pub struct Downstream {
    config: DownstreamConfig,
    upstream: UpstreamConfig,
    router: Router,
    gateway_id: String,
    qos: QoS,
    status: LinkStatus,
}

/// What became of one delivery.
#[derive(Debug)]
enum Outcome {
    /// Committed locally; `matched`: a session or a route took it.
    Committed { matched: bool },
    /// Its id is in the window.
    Duplicate,
    /// Rejected without requeue.
    Rejected { reason: &'static str, error: String },
    /// The local publish failed: back to the queue, link dropped.
    Failed(PublishError),
}

#[derive(Debug)]
struct Settled {
    tag: u64,
    message_id: Option<Arc<str>>,
    outcome: Outcome,
}

type Settling = Pin<Box<dyn Future<Output = Settled> + Send>>;
type Release = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// What lives across links.
struct State {
    window: DedupWindow,
    releases: FuturesUnordered<Release>,
    metrics: DownstreamMetrics,
}

/// How consuming over one link ended.
enum Ended {
    Shutdown,
    Lost(DownstreamError),
}

impl Downstream {
    /// The downstream `config` over the nodes of `upstream` (the
    /// `[[upstream]]` it names), publishing into `router`.
    pub fn new(
        config: DownstreamConfig,
        upstream: UpstreamConfig,
        router: Router,
        gateway_id: String,
    ) -> Downstream {
        let qos = QoS::from_u8(config.qos).unwrap_or(QoS::AtLeastOnce);
        let status = LinkStatus::downstream(&config.name);
        Downstream {
            config,
            upstream,
            router,
            gateway_id,
            qos,
            status,
        }
    }

    /// The link's state, for `/healthz`.
    pub fn link(&self) -> LinkStatus {
        self.status.clone()
    }

    /// Consumes until `shutdown`; then settles what is under way (each
    /// commit that completes is still acknowledged) and closes the link.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = tracing::info_span!("downstream", downstream = %self.config.name);
        self.run_inner(shutdown).instrument(span).await;
    }

    async fn run_inner(self, shutdown: CancellationToken) {
        let Some(window) = self.load_window(&shutdown).await else {
            return;
        };
        let mut state = State {
            window,
            releases: FuturesUnordered::new(),
            metrics: DownstreamMetrics::new(&self.config.name),
        };
        let mut connector = Connector::downstream(
            &self.upstream,
            &self.config.name,
            &self.gateway_id,
            self.status.clone(),
        );
        while let Some(link) = connector.connect(&shutdown).await {
            self.status.link_up();
            let ended = self
                .consume(&link, &mut connector, &mut state, &shutdown)
                .await;
            connector.link_down(link.node);
            self.status.set(LinkState::Down);
            match ended {
                Ended::Shutdown => {
                    link.close("shutdown").await;
                    break;
                }
                Ended::Lost(error) => {
                    warn!(upstream = %self.upstream.name, queue = %self.config.queue, %error,
                        "downstream link lost; unacknowledged deliveries go back to the queue");
                    link.close("downstream link lost").await;
                    let full = matches!(error, DownstreamError::Publish(PublishError::Full { .. }));
                    if full && !self.room(&shutdown).await {
                        break;
                    }
                    if !connector.pause(&shutdown).await {
                        break;
                    }
                }
            }
        }
        self.status.set(LinkState::Down);
        while let Some(result) = state.releases.next().await {
            released(result);
        }
    }

    /// Waits until the store takes appends again (it refused one for
    /// room); false on shutdown.
    async fn room(&self, shutdown: &CancellationToken) -> bool {
        let mut full = self.router.store().full();
        info!(queue = %self.config.queue, "store full: consuming resumes once it takes messages again");
        loop {
            if full.borrow_and_update().is_none() {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                changed = full.changed() => if changed.is_err() {
                    return false;
                },
            }
        }
    }

    /// The dedup window from the store, retried until it can be read:
    /// consuming without it would publish redeliveries again. `None` on
    /// shutdown.
    async fn load_window(&self, shutdown: &CancellationToken) -> Option<DedupWindow> {
        loop {
            let store = self.router.store().clone();
            let name = self.config.name.clone();
            let capacity = self.config.dedup_window.get();
            let read =
                tokio::task::spawn_blocking(move || DedupWindow::load(&store, &name, capacity))
                    .await;
            let error = match read {
                Ok(Ok((window, release))) => {
                    let store = self.router.store();
                    let excess = release.len();
                    let results = futures_util::future::join_all(
                        release.iter().map(|key| store.release_dedup(key, false)),
                    )
                    .await;
                    results.into_iter().for_each(released);
                    info!(queue = %self.config.queue, remembered = window.len(), released = excess,
                        "dedup window loaded");
                    return Some(window);
                }
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            error!(%error, "cannot read the dedup window from the store; not consuming, retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(LOAD_RETRY) => {}
            }
        }
    }

    /// Checks (or declares) the queue and consumes it over `link` until
    /// shutdown or trouble, then settles what is under way.
    async fn consume(
        &self,
        link: &Link,
        connector: &mut Connector,
        state: &mut State,
        shutdown: &CancellationToken,
    ) -> Ended {
        let channel = &link.channel;
        let queue = self.config.queue.as_str();
        let declare = QueueDeclareOptions {
            passive: !self.config.declare,
            durable: true,
            ..QueueDeclareOptions::default()
        };
        if let Err(source) = channel
            .queue_declare(ShortString::from(queue), declare, FieldTable::default())
            .await
        {
            return Ended::Lost(if is_not_found(&source) {
                DownstreamError::QueueMissing {
                    queue: queue.to_string(),
                }
            } else {
                DownstreamError::Queue {
                    queue: queue.to_string(),
                    source,
                }
            });
        }
        let consume_failed = |source| {
            Ended::Lost(DownstreamError::Consume {
                queue: queue.to_string(),
                source,
            })
        };
        let prefetch = self.config.prefetch.get();
        if let Err(e) = channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
        {
            return consume_failed(e);
        }
        let tag = format!(
            "edge-gateway {} downstream {}",
            self.gateway_id, self.config.name
        );
        let mut consumer = match channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(tag),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
        {
            Ok(consumer) => consumer,
            Err(e) => return consume_failed(e),
        };
        info!(upstream = %self.upstream.name, node = %self.status.node(), queue, "consuming");

        let mut settling: FuturesOrdered<Settling> = FuturesOrdered::new();
        let ended = loop {
            let room =
                settling.len() < usize::from(prefetch) && state.releases.len() < MAX_RELEASES;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ended::Shutdown,
                Some(settled) = settling.next(), if !settling.is_empty() => {
                    match self.settle(channel, state, settled).await {
                        // A commit proves the link (and the store): the
                        // next failure backs off from the minimum again.
                        Ok(true) => connector.link_healthy(),
                        Ok(false) => {}
                        Err(e) => break Ended::Lost(e),
                    }
                }
                Some(result) = state.releases.next(), if !state.releases.is_empty() => {
                    released(result);
                }
                next = consumer.next(), if room => match next {
                    Some(Ok(delivery)) => settling.push_back(self.take(delivery, state).await),
                    Some(Err(e)) => break Ended::Lost(DownstreamError::Delivery(e)),
                    None => break Ended::Lost(DownstreamError::Cancelled),
                },
            }
        };
        // Every outcome under way: a commit that completes is acknowledged
        // while the channel takes it (fewer redeliveries), a failed one's id
        // is forgotten so that its redelivery is published.
        while let Some(settled) = settling.next().await {
            if let Err(error) = self.settle(channel, state, settled).await {
                debug!(%error, "settling after the link ended");
            }
        }
        ended
    }

    /// Maps one delivery and hands it to the router; the future resolves
    /// with its outcome once its commit did (or at once when it is not
    /// published).
    async fn take(&self, delivery: Delivery, state: &mut State) -> Settling {
        state.metrics.received.increment(1);
        let tag = delivery.delivery_tag;
        let settled = |message_id, outcome| -> Settling {
            Box::pin(std::future::ready(Settled {
                tag,
                message_id,
                outcome,
            }))
        };
        let topic = match convert::topic_of_delivery(
            &self.config.topic_prefix,
            delivery.routing_key.as_str(),
            &delivery.properties,
        ) {
            Ok(topic) => topic,
            Err(e) => {
                let outcome = Outcome::Rejected {
                    reason: e.reason(),
                    error: e.to_string(),
                };
                return settled(None, outcome);
            }
        };
        let message_id: Option<Arc<str>> = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| Arc::from(id.as_str()));
        let dedup = match &message_id {
            Some(id) if state.window.contains(id) => {
                return settled(message_id, Outcome::Duplicate);
            }
            Some(id) => {
                if let Some(old) = state.window.insert(id) {
                    let store = self.router.store().clone();
                    state.releases.push(Box::pin(
                        async move { store.release_dedup(&old, false).await },
                    ));
                }
                Some(state.window.key(id))
            }
            None => {
                state.metrics.without_id.increment(1);
                None
            }
        };
        // Less than the record will take: one above the whole quota can
        // never be stored.
        let least_bytes = (topic.len() + delivery.data.len()) as u64;
        let quota = self.router.store().max_bytes();
        let message = convert::from_delivery(
            &self.config.name,
            topic,
            self.qos,
            delivery.data,
            &delivery.properties,
            edge_core::message::now_ms(),
        );
        match self.router.publish_matched(message, dedup).await {
            Ok((receipt, matched)) => Box::pin(async move {
                let outcome = match receipt.await {
                    Ok(_) => Outcome::Committed { matched },
                    Err(e) => failed(e, least_bytes, quota),
                };
                Settled {
                    tag,
                    message_id,
                    outcome,
                }
            }),
            Err(e) => settled(message_id, failed(e, least_bytes, quota)),
        }
    }

    /// Acknowledges, rejects or returns one delivery by its outcome; true
    /// when it was committed.
    async fn settle(
        &self,
        channel: &Channel,
        state: &mut State,
        settled: Settled,
    ) -> Result<bool, DownstreamError> {
        let Settled {
            tag,
            message_id,
            outcome,
        } = settled;
        match outcome {
            Outcome::Committed { matched } => {
                abort_if_asked();
                if !matched {
                    state.metrics.unmatched.increment(1);
                    debug!(
                        message_id = message_id.as_deref().unwrap_or(""),
                        "no local session or route took the message; acknowledged"
                    );
                }
                ack(channel, tag).await.map(|()| true)
            }
            Outcome::Duplicate => {
                let id = message_id.as_deref().unwrap_or("");
                if state.window.contains(id) {
                    state.metrics.duplicates.increment(1);
                    debug!(message_id = id, "duplicate suppressed");
                    ack(channel, tag).await.map(|()| false)
                } else {
                    // The commit of the first copy failed: this one is
                    // published after its redelivery.
                    reject(channel, tag, true).await.map(|()| false)
                }
            }
            Outcome::Rejected { reason, error } => {
                if let Some(id) = &message_id {
                    state.window.forget(id);
                }
                state.metrics.rejected(reason);
                warn!(queue = %self.config.queue, reason, %error,
                    message_id = message_id.as_deref().unwrap_or(""),
                    "downstream message rejected without requeue (dead-lettered if the queue has a DLX)");
                reject(channel, tag, false).await.map(|()| false)
            }
            Outcome::Failed(error) => {
                if let Some(id) = &message_id {
                    state.window.forget(id);
                }
                Err(DownstreamError::Publish(error))
            }
        }
    }
}

/// A publish that failed: a message the store can never hold (a field too
/// long for the format, larger than the whole quota) is rejected, any other
/// failure (full, failed, closing) returns it to the queue.
fn failed(error: PublishError, least_bytes: u64, quota: u64) -> Outcome {
    match error {
        PublishError::Full { .. } if least_bytes > quota => Outcome::Rejected {
            reason: "unstorable",
            error: format!(
                "{least_bytes} bytes or more, above the whole store quota ({quota} bytes)"
            ),
        },
        PublishError::Invalid(e) => Outcome::Rejected {
            reason: "unstorable",
            error: e.to_string(),
        },
        other => Outcome::Failed(other),
    }
}

async fn ack(channel: &Channel, tag: u64) -> Result<(), DownstreamError> {
    channel
        .basic_ack(tag, BasicAckOptions::default())
        .await
        .map_err(|source| DownstreamError::Ack { tag, source })
}

async fn reject(channel: &Channel, tag: u64, requeue: bool) -> Result<(), DownstreamError> {
    channel
        .basic_reject(tag, BasicRejectOptions { requeue })
        .await
        .map_err(|source| DownstreamError::Ack { tag, source })
}

fn released(result: Result<(), StoreError>) {
    if let Err(error) = result {
        // The key stays; the next start trims it.
        warn!(%error, "cannot release a dedup key pushed out of the window");
    }
}

/// The test seam of [`abort_after_downstream_commits`].
fn abort_if_asked() {
    let at = ABORT_AFTER_COMMITS.load(Ordering::Relaxed);
    if at == 0 {
        return;
    }
    let n = COMMITS.fetch_add(1, Ordering::Relaxed) + 1;
    if n >= at {
        eprintln!("test seam: aborting after downstream commit {n}, before its ack");
        std::process::abort();
    }
}
