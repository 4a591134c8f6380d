//! The router: hands what must be durable to the store, then fans each
//! message out to the sessions whose subscriptions match it.
//!
//! A message is logged when it is QoS 1 or 2 (its acknowledgement promises
//! durability), when a route matches it (it is bound upstream) or when a
//! persistent session takes it (its queue entry references the log). A
//! retained message also sets (or, with an empty payload, clears) the
//! retained message of its topic, in the same commit.
//!
//! **Delivery after acceptance.** Nothing is handed to a subscriber before
//! the store accepted it: [`Router::publish`] queues the commit with one
//! dispatcher task, which awaits commits in publish order and only then fans
//! out and resolves the publisher's [`Receipt`]. So an online subscriber never
//! sees a message the store refused (and the publisher's retry would
//! duplicate), and every publisher's order is kept, QoS 0 included.
//!
//! Matching uses one [`TopicTrie`] over every session's filters, online or
//! not: its cost does not grow with non-matching subscriptions. A session
//! matched by several filters gets one copy at the highest QoS granted
//! (MQTT-3.3.5-1). A shared subscription's group (`share.rs`) adds one
//! member per matching group, chosen round-robin, merged likewise.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use edge_config::AckPoint;
use edge_store::{Placement, Retain, Seq, Store};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::error::PublishError;
use crate::level::{Over, QueueLevel};
use crate::message::{Message, QoS};
use crate::progress::Progress;
use crate::receipt::Receipt;
use crate::retained::RetainedIndex;
use crate::route::Routes;
use crate::session::{SessionExpiry, SubOptions};
use crate::share::{self, Shares};
use crate::trie::TopicTrie;

/// Deliveries dropped because a subscriber's queue was full, summarised.
pub(crate) static QUEUE_FULL: edge_log::Summary = edge_log::Summary::new(
    "subscriber queues full: deliveries dropped",
    edge_log::Level::Warn,
);

/// Identifies one connection's attachment to a session.
pub type SessionId = u64;

/// Commits awaiting fan-out, at most (back-pressure on publishers).
const DISPATCH_QUEUE: usize = 4096;

/// A message on its way to one subscriber, at the QoS granted to it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    /// Set for a persistent session's QoS ≥ 1 delivery: the queue entry to
    /// acknowledge ([`crate::Subscriber::ack`]) once the client has it.
    pub seq: Option<Seq>,
    /// Sent because of a subscription's retained message, not a publish.
    pub retained: bool,
    /// A live delivery of a message published retained, to a subscription
    /// that keeps the flag (MQTT 5 retain as published).
    pub retain_as_published: bool,
    /// Subscription identifiers of the matching filters (MQTT 5; empty for
    /// most, and then not allocated).
    pub sub_ids: Vec<u32>,
    /// The shared subscription (`$share/{group}/{filter}`) it was chosen
    /// through, if any: one its connection does not complete goes to
    /// another member ([`Router::redistribute`]).
    pub share: Option<Arc<str>>,
}

/// Router-wide settings.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// How long a persistent session is kept after its client left.
    pub session_expiry: Duration,
    /// Queue entries a persistent MQTT session holds at most (AMQP queues'
    /// sessions are bounded by the store quota only); further messages
    /// are not queued for it (policy `drop-new`, as Mosquitto's
    /// `max_queued_messages`; counted: `session_queue_full`).
    pub max_session_queue: usize,
    /// Encoded bytes a persistent session's queue holds at most (same
    /// policy; counted: `session_queue_bytes`). An empty queue takes one
    /// message of any size.
    pub max_session_queue_bytes: u64,
    /// The upstreams' positions, for routes with `ack = "upstream-confirmed"`.
    pub progress: Progress,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            session_expiry: Duration::from_secs(2 * 3600),
            max_session_queue: 100_000,
            max_session_queue_bytes: 64 << 20,
            progress: Progress::default(),
        }
    }
}

/// One session in the registry.
#[derive(Debug)]
pub(crate) struct Slot {
    pub key: u64,
    pub client_id: Arc<str>,
    pub filters: BTreeMap<String, SubOptions>,
    pub durable: Option<Durable>,
    pub online: Option<Online>,
}

/// What a persistent session keeps in the store.
#[derive(Debug, Clone)]
pub(crate) struct Durable {
    pub queue: u64,
    /// Held (shared) by acknowledgements under way, taken (exclusive) by a
    /// backlog read: a read never sees an entry whose ack is in flight.
    pub acks: Arc<tokio::sync::RwLock<()>>,
    /// Entries and bytes in its queue (counted here; `level.rs`).
    pub queued: Arc<QueueLevel>,
    /// When its client left (Unix ms), if offline.
    pub disconnected_at_ms: Option<u64>,
    /// How long it is kept after its client left.
    pub expiry: SessionExpiry,
}

#[derive(Debug)]
pub(crate) struct Online {
    pub conn: SessionId,
    pub tx: mpsc::Sender<Delivery>,
    pub taken_over: Arc<Notify>,
    /// A durable delivery did not fit the queue: the session must read its
    /// queue from the store to catch up.
    pub lagged: Arc<AtomicBool>,
    /// The session's own admission of messages.
    pub gate: Option<Arc<dyn crate::session::Gate>>,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Sessions' plain filters under their keys, group memberships under
    /// keys of their own (`share.rs`).
    pub trie: TopicTrie<SubOptions>,
    pub sessions: HashMap<Arc<str>, Slot>,
    pub by_key: HashMap<u64, Arc<str>>,
    pub shares: Shares,
}

impl Registry {
    /// The session of `key` (a session's own key).
    pub(crate) fn session(&self, key: u64) -> Option<&Slot> {
        self.sessions.get(self.by_key.get(&key)?)
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub store: Store,
    pub routes: Routes,
    pub options: RouterOptions,
    /// Some route has `ack = "upstream-confirmed"` (else publishes skip
    /// looking for one).
    pub confirming: bool,
    pub registry: RwLock<Registry>,
    pub retained: RwLock<RetainedIndex>,
    pub next_id: AtomicU64,
    dispatch: mpsc::Sender<Dispatch>,
}

/// One published message between its submit and its fan-out.
struct Dispatch {
    commit: Option<edge_store::Commit>,
    /// Encoded bytes (what each queue entry counts).
    size: u64,
    message: Arc<Message>,
    targets: Vec<Target>,
    retain: bool,
    reply: oneshot::Sender<Result<Seq, PublishError>>,
}

/// A session a message goes to, at the QoS it gets there.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub key: u64,
    pub qos: QoS,
    /// Queued durably for a persistent session.
    pub queued: bool,
    /// Keeps the message's RETAIN flag (retain as published).
    pub retain_as_published: bool,
    /// Subscription identifiers of the matching filters.
    pub sub_ids: Vec<u32>,
    /// The group that chose the session, if one did.
    pub share: Option<Arc<str>>,
}

/// Cheap to clone; one per gateway.
#[derive(Debug, Clone)]
pub struct Router {
    pub(crate) inner: Arc<Inner>,
}

impl Router {
    /// A router with default options and nothing loaded from the store
    /// (tests; the gateway uses [`Router::start`]). Needs a tokio runtime.
    pub fn new(store: Store, routes: Routes) -> Router {
        Router::with_options(store, routes, RouterOptions::default())
    }

    pub fn with_options(store: Store, routes: Routes, options: RouterOptions) -> Router {
        // Exist at zero from the start, for alerts.
        for reason in [
            "subscriber_queue_full",
            "session_queue_full",
            "shared_no_member",
        ] {
            metrics::counter!("edge_messages_dropped_total", "reason" => reason).increment(0);
        }
        metrics::counter!("edge_shared_redistributed_total").increment(0);
        let (dispatch, rx) = mpsc::channel(DISPATCH_QUEUE);
        let confirming = routes.iter().any(|r| r.ack == AckPoint::UpstreamConfirmed);
        let inner = Arc::new(Inner {
            store,
            routes,
            options,
            confirming,
            registry: RwLock::new(Registry::default()),
            retained: RwLock::new(RetainedIndex::default()),
            next_id: AtomicU64::new(1),
            dispatch,
        });
        tokio::spawn(dispatcher(Arc::downgrade(&inner), rx));
        Router { inner }
    }

    /// A router with the persistent sessions and retained messages of the
    /// store loaded, and the expiry of offline sessions running.
    pub async fn start(
        store: Store,
        routes: Routes,
        options: RouterOptions,
    ) -> Result<Router, edge_store::StoreError> {
        let router = Router::with_options(store, routes, options);
        router.load().await?;
        tokio::spawn(crate::session::expire_sessions(Arc::downgrade(
            &router.inner,
        )));
        Ok(router)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn routes(&self) -> &Routes {
        &self.inner.routes
    }

    /// Sessions known (online, and persistent ones offline).
    pub fn session_count(&self) -> usize {
        self.inner.registry().sessions.len()
    }

    /// Whether a message on `topic` would go anywhere: a session's filter or
    /// a route matches it (AMQP `mandatory` returns the message otherwise).
    pub fn is_routed(&self, topic: &str) -> bool {
        self.is_routed_any(std::iter::once(topic))
    }

    /// Whether a message published on any of `topics` would go anywhere
    /// (see [`Router::publish_to`]).
    pub fn is_routed_any<'t>(&self, topics: impl IntoIterator<Item = &'t str>) -> bool {
        let registry = self.inner.registry();
        topics.into_iter().any(|topic| {
            if self.inner.routes.matching(topic).next().is_some() {
                return true;
            }
            let mut any = false;
            registry.trie.for_each_match(topic, |_, _, _| any = true);
            any
        })
    }

    /// The client ids of the sessions a message on any of `topics` would
    /// reach, each once.
    pub fn sessions_matching(&self, topics: &[&str]) -> Vec<Arc<str>> {
        let registry = self.inner.registry();
        let mut keys: Vec<u64> = Vec::new();
        for topic in topics {
            registry.trie.for_each_match(topic, |_, key, _| {
                let key = registry.owner(key);
                if !keys.contains(&key) {
                    keys.push(key);
                }
            });
        }
        keys.iter()
            .filter_map(|key| registry.by_key.get(key).cloned())
            .collect()
    }

    /// Routes one message. Waits only while the store's inbox or the
    /// dispatcher is full (back-pressure); the receipt resolves once the
    /// message is durable and handed to online subscribers.
    pub async fn publish(&self, message: Message) -> Result<Receipt, PublishError> {
        self.publish_keyed(message, None).await
    }

    /// Routes one message to the union of what its topic and each of
    /// `also` match, as if it were published on all of them at once: each
    /// session gets it once, at the highest QoS any matching filter grants,
    /// a route matching any of them takes it, and it is stored once. Its
    /// subscribers see it on its own topic. For adapters whose routing is
    /// more than one topic (AMQP headers exchanges, exchange-to-exchange
    /// bindings). Retaining concerns the message's own topic only.
    pub async fn publish_to(
        &self,
        message: Message,
        also: &[String],
    ) -> Result<Receipt, PublishError> {
        self.publish_inner(message, None, also)
            .await
            .map(|(receipt, _, _)| receipt)
    }

    /// Like [`Router::publish`], recording `dedup` (a key from
    /// [`crate::Subscriber::dedup_key`]) in the message's commit, so that a
    /// retransmission after a reconnect or a restart is recognised.
    pub async fn publish_keyed(
        &self,
        message: Message,
        dedup: Option<String>,
    ) -> Result<Receipt, PublishError> {
        self.publish_inner(message, dedup, &[])
            .await
            .map(|(receipt, _, _)| receipt)
    }

    /// Like [`Router::publish_keyed`], also telling whether anything took
    /// the message: a session's filter or a route (MQTT 5 answers a
    /// publish nothing took with reason 0x10, no matching subscribers).
    pub async fn publish_matched(
        &self,
        message: Message,
        dedup: Option<String>,
    ) -> Result<(Receipt, bool), PublishError> {
        self.publish_inner(message, dedup, &[])
            .await
            .map(|(receipt, _, matched)| (receipt, matched))
    }

    /// Like [`Router::publish_to`], also telling which sessions refused the
    /// message at their [`crate::session::Gate`] (decided before it was
    /// queued anywhere; none of them gets it), with the message itself
    /// when any did.
    pub async fn publish_gated(
        &self,
        message: Message,
        also: &[String],
    ) -> Result<Gated, PublishError> {
        self.publish_inner(message, None, also)
            .await
            .map(|(receipt, refused, _)| Gated { receipt, refused })
    }

    async fn publish_inner(
        &self,
        message: Message,
        dedup: Option<String>,
        also: &[String],
    ) -> Result<(Receipt, Option<Refused>, bool), PublishError> {
        let record = message.to_record()?;
        let size = record.encoded_len() as u64;
        let topics = || std::iter::once(&*message.topic).chain(also.iter().map(String::as_str));
        let mut refused_by = Vec::new();
        let targets = self.targets(&message, topics(), size, &mut refused_by);
        let queues: Vec<u64> = {
            let registry = self.inner.registry();
            targets
                .iter()
                .filter(|t| t.queued)
                .filter_map(|t| {
                    let id = registry.by_key.get(&t.key)?;
                    registry.sessions.get(id)?.durable.as_ref().map(|d| d.queue)
                })
                .collect()
        };
        let retain = message.retain.then(|| {
            if message.payload.is_empty() {
                Retain::Clear(message.topic.to_string())
            } else {
                Retain::Set(message.topic.to_string())
            }
        });
        let routed = topics().any(|t| self.inner.routes.matching(t).next().is_some());
        let matched = routed || !targets.is_empty() || !refused_by.is_empty();
        let log = message.qos != QoS::AtMostOnce || routed || !queues.is_empty();
        let commit = if log || retain.is_some() {
            let placement = Placement {
                log,
                queues,
                retain,
                dedup,
            };
            match self.inner.store.submit_with(record, placement).await {
                Ok(commit) => Some(commit),
                Err(error) => {
                    self.inner.unqueue(&targets, size, &message);
                    return Err(error.into());
                }
            }
        } else {
            None
        };
        let positions = if log && self.inner.confirming {
            self.upstream_confirmations(&message.topic, topics())
        } else {
            Vec::new()
        };
        let (reply, rx) = oneshot::channel();
        let retain = message.retain;
        let message = Arc::new(message);
        let refused = (!refused_by.is_empty()).then(|| Refused {
            sessions: refused_by,
            message: Arc::clone(&message),
        });
        let dispatch = Dispatch {
            commit,
            size,
            retain,
            message,
            targets,
            reply,
        };
        self.inner
            .dispatch
            .send(dispatch)
            .await
            .map_err(|_| PublishError::Closed)?;
        let receipt = if positions.is_empty() {
            Receipt::Pending(rx)
        } else {
            Receipt::Confirming(Box::pin(async move {
                let logged = Receipt::Pending(rx).await?;
                if let Some(seq) = logged {
                    crate::progress::confirmed(positions, seq).await?;
                }
                Ok(logged)
            }))
        };
        Ok((receipt, refused, matched))
    }

    /// The positions of the upstreams whose routes take a message on
    /// `topics` with `ack = "upstream-confirmed"`, each once: of the lane
    /// that forwards a message on its `own` topic.
    fn upstream_confirmations<'t>(
        &self,
        own: &str,
        topics: impl Iterator<Item = &'t str>,
    ) -> Vec<watch::Receiver<Seq>> {
        let mut upstreams: Vec<&str> = Vec::new();
        for topic in topics {
            for route in self.inner.routes.matching(topic) {
                if route.ack == AckPoint::UpstreamConfirmed
                    && !upstreams.contains(&&*route.upstream)
                {
                    upstreams.push(&route.upstream);
                }
            }
        }
        upstreams
            .into_iter()
            .filter_map(|u| {
                // The lane that forwards it: the priority of the upstream's
                // first route matching the message's own topic.
                let lane = self
                    .inner
                    .routes
                    .matching(own)
                    .find(|r| r.upstream == u)
                    .map(|r| r.priority);
                self.inner.options.progress.receiver(u, lane)
            })
            .collect()
    }

    /// The sessions `topics` go to, once each at the highest QoS any of
    /// their matching filters grants (capped at the message's QoS).
    /// A session whose gate refuses the message is left out, its client id
    /// added to `refused`.
    fn targets<'t>(
        &self,
        message: &Message,
        topics: impl Iterator<Item = &'t str>,
        size: u64,
        refused: &mut Vec<Arc<str>>,
    ) -> Vec<Target> {
        let qos = message.qos;
        let registry = self.inner.registry();
        let mut best: Vec<(u64, Merged)> = Vec::new();
        let mut groups = share::Matches::default();
        for topic in topics {
            registry.trie.for_each_match(topic, |_, key, sub| {
                if let Some(member) = registry.shares.member(key) {
                    groups.add(member, key, *sub);
                } else if !(sub.no_local && is_own(&registry, key, message)) {
                    merge(&mut best, key, sub, None);
                }
            });
        }
        for (group, chosen) in groups.choose(&registry) {
            merge(&mut best, chosen.session, &chosen.options, Some(group));
        }
        let max = self.inner.options.max_session_queue as u64;
        let max_bytes = self.inner.options.max_session_queue_bytes;
        best.into_iter()
            .filter_map(|(key, merged)| {
                let qos = merged.qos.min(qos);
                let slot = registry
                    .by_key
                    .get(&key)
                    .and_then(|id| registry.sessions.get(id));
                let gate = slot.and_then(|s| s.online.as_ref()?.gate.as_ref());
                if let (Some(gate), Some(slot)) = (gate, slot)
                    && !gate.admit(message)
                {
                    refused.push(Arc::clone(&slot.client_id));
                    return None;
                }
                let durable = slot.and_then(|s| s.durable.as_ref());
                // An AMQP queue is bounded by the store's quota alone, as a
                // RabbitMQ queue without x-max-length is by its disk: its
                // publisher was confirmed, so dropping for it is not allowed.
                let (max, max_bytes) = match slot {
                    Some(s) if crate::session::is_amqp_queue(&s.client_id) => (u64::MAX, u64::MAX),
                    _ => (max, max_bytes),
                };
                let queued = qos != QoS::AtMostOnce
                    && durable.is_some_and(|d| match d.queued.try_add(size, max, max_bytes) {
                        Ok(()) => true,
                        Err(over) => {
                            session_queue_full(&registry, key, over, max, max_bytes);
                            false
                        }
                    });
                Some(Target {
                    key,
                    qos,
                    queued,
                    retain_as_published: merged.retain_as_published && message.retain,
                    sub_ids: merged.sub_ids,
                    share: merged.share,
                })
            })
            .collect()
    }
}

/// A session's matching filters, merged into one delivery (MQTT-3.3.4-2/3,
/// MQTT 5 §3.3.4: the highest QoS, every subscription identifier).
pub(crate) struct Merged {
    pub qos: QoS,
    pub retain_as_published: bool,
    pub sub_ids: Vec<u32>,
    /// The first group that chose the session.
    pub share: Option<Arc<str>>,
}

/// Adds one matching subscription of session `key` to `best`.
fn merge(best: &mut Vec<(u64, Merged)>, key: u64, sub: &SubOptions, share: Option<Arc<str>>) {
    match best.iter_mut().find(|(k, _)| *k == key) {
        Some((_, m)) => {
            m.add(sub);
            if m.share.is_none() {
                m.share = share;
            }
        }
        None => {
            let mut m = Merged::new(sub);
            m.share = share;
            best.push((key, m));
        }
    }
}

impl Merged {
    pub(crate) fn new(sub: &SubOptions) -> Merged {
        let mut m = Merged {
            qos: sub.qos,
            retain_as_published: sub.retain_as_published,
            sub_ids: Vec::new(),
            share: None,
        };
        if sub.id != 0 {
            m.sub_ids.push(sub.id);
        }
        m
    }

    pub(crate) fn add(&mut self, sub: &SubOptions) {
        self.qos = self.qos.max(sub.qos);
        self.retain_as_published |= sub.retain_as_published;
        if sub.id != 0 && !self.sub_ids.contains(&sub.id) {
            self.sub_ids.push(sub.id);
            self.sub_ids.sort_unstable();
        }
    }
}

/// Whether `message` was published by the session of `key` (MQTT 5 no
/// local: its own messages are not sent back to it).
fn is_own(registry: &Registry, key: u64, message: &Message) -> bool {
    message.origin.protocol == crate::message::Protocol::Mqtt
        && registry
            .by_key
            .get(&key)
            .is_some_and(|id| **id == *message.origin.publisher)
}

/// What [`Router::publish_gated`] hands back.
#[derive(Debug)]
pub struct Gated {
    pub receipt: Receipt,
    /// Set when some session's gate refused the message.
    pub refused: Option<Refused>,
}

/// The sessions that refused a message at their gate, and the message.
#[derive(Debug)]
pub struct Refused {
    pub sessions: Vec<Arc<str>>,
    pub message: Arc<Message>,
}

/// A message not queued for a persistent session (policy `drop-new`):
/// counted, summarised in the log.
fn session_queue_full(registry: &Registry, key: u64, over: Over, max: u64, max_bytes: u64) {
    let client_id = registry.by_key.get(&key).map_or("?", |id| &**id);
    let reason = match over {
        Over::Messages => "session_queue_full",
        Over::Bytes => "session_queue_bytes",
    };
    metrics::counter!("edge_messages_dropped_total", "reason" => reason).increment(1);
    QUEUE_FULL.record(reason, || match over {
        Over::Messages => {
            format!("client_id={client_id}: {max} messages queued (mqtt.max_session_queue)")
        }
        Over::Bytes => format!(
            "client_id={client_id}: {max_bytes} bytes queued (mqtt.max_session_queue_bytes)"
        ),
    });
}

impl Inner {
    pub(crate) fn registry(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn registry_mut(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands a committed message to the online sessions it targets. One
    /// already past its expiry goes to nobody (a queued entry of it is
    /// acknowledged when the session reads its queue). A group's member
    /// that left, went away or filled its queue since it was chosen, and
    /// did not queue the message durably, is passed over for another
    /// online member of the group.
    fn fan_out(&self, message: &Arc<Message>, seq: Seq, targets: &[Target]) {
        let expired = message.is_expired(crate::message::now_ms());
        if expired {
            crate::session::expired(message);
        }
        let registry = self.registry();
        let targeted = |session: u64| targets.iter().any(|t| t.key == session);
        let pass_on = |t: &Target| match &t.share {
            Some(group) if !t.queued && !expired => {
                share::pass_on(&registry, group, message, targeted)
            }
            _ => false,
        };
        for t in targets {
            let Some((slot, online)) = registry
                .session(t.key)
                .and_then(|s| Some((s, s.online.as_ref()?)))
            else {
                pass_on(t);
                continue;
            };
            let refund = || {
                if let Some(gate) = &online.gate {
                    gate.refund(message);
                }
            };
            if expired {
                if t.queued {
                    online.lagged.store(true, Ordering::Release);
                } else {
                    refund();
                }
                continue;
            }
            let delivery = Delivery {
                message: Arc::clone(message),
                qos: t.qos,
                seq: (t.queued && seq != 0).then_some(seq),
                retained: false,
                retain_as_published: t.retain_as_published,
                sub_ids: t.sub_ids.clone(),
                share: t.share.clone(),
            };
            if online.tx.try_send(delivery).is_err() {
                if t.queued {
                    // Still in its queue: the session reads it from there.
                    online.lagged.store(true, Ordering::Release);
                    continue;
                }
                refund();
                if pass_on(t) {
                    continue;
                }
                metrics::counter!("edge_messages_dropped_total", "reason" => "subscriber_queue_full").increment(1);
                QUEUE_FULL.record("subscriber_queue_full", || {
                    format!("client_id={} topic={}", slot.client_id, message.topic)
                });
            }
        }
    }
}

/// Awaits commits in publish order; after each, updates the retained
/// index, fans out, and resolves the publisher's receipt.
async fn dispatcher(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<Dispatch>) {
    type Done = (
        Result<Seq, PublishError>,
        u64,
        Arc<Message>,
        Vec<Target>,
        bool,
        oneshot::Sender<Result<Seq, PublishError>>,
    );
    let mut waiting: FuturesOrdered<futures::future::BoxFuture<'static, Done>> =
        FuturesOrdered::new();
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some(d) = next else { break };
                waiting.push_back(Box::pin(async move {
                    let result = match d.commit {
                        Some(commit) => commit.await.map_err(PublishError::from),
                        None => Ok(0),
                    };
                    (result, d.size, d.message, d.targets, d.retain, d.reply)
                }));
            }
            Some((result, size, message, targets, retain, reply)) = waiting.next(), if !waiting.is_empty() => {
                let Some(inner) = inner.upgrade() else { break };
                match &result {
                    Ok(seq) => {
                        if retain {
                            inner
                                .retained
                                .write()
                                .unwrap_or_else(PoisonError::into_inner)
                                .apply(&message);
                        }
                        inner.fan_out(&message, *seq, &targets);
                    }
                    Err(_) => inner.unqueue(&targets, size, &message),
                }
                let _ = reply.send(result);
            }
        }
    }
    // Receipts still waiting resolve as closed when dropped.
}

#[cfg(test)]
mod tests;
