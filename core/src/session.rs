//! Sessions, protocol-neutral: a client's subscriptions and, when it is
//! persistent, its durable queue in the store. An adapter connection
//! attaches to a session ([`Router::attach`]) and keeps only wire state.
//!
//! A persistent session outlives its connections: its subscriptions stay in
//! the trie while its client is away, every QoS ≥ 1 message for it gets a
//! queue entry in the same commit as the message (stored once, however many
//! sessions take it), and on reconnect the adapter reads the queue
//! ([`Subscriber::backlog`]) before live deliveries. It is persisted in the
//! store's `sessions` table (layout below) and expires `session_expiry`
//! after its client left.
//!
//! Persisted session, version 2 (little-endian; version 1, without the
//! expiry and the options, is still read):
//!
//! ```text
//! u8   version = 2
//! u64  queue id
//! u64  disconnected at, Unix ms (0: connected when last written)
//! u64  expiry, ms (0: the router's session_expiry; u64::MAX: never)
//! u16  filter count, then per filter: u16 length, filter (UTF-8), u8 QoS,
//!      u8 flags (bit 0 no local, bit 1 retain as published),
//!      u32 subscription identifier (0: none)
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut};
use edge_store::{Seq, StoreError};
use tokio::sync::{Notify, mpsc};

use crate::level::QueueLevel;
use crate::message::{Message, QoS, now_ms};
use crate::router::{Delivery, Durable, Inner, Online, Router, SessionId, Slot};
use crate::topic::{self, Subscription};

/// Client ids of the AMQP adapter's queues (`amqp:<queue name>`): no
/// other adapter may attach to one (an MQTT client with such an id would
/// take the queue over, and with a clean session discard its messages).
pub const AMQP_QUEUE_PREFIX: &str = "amqp:";

/// Whether `client_id` names an AMQP queue's session (see
/// [`AMQP_QUEUE_PREFIX`]); adapters other than AMQP refuse such ids.
pub fn is_amqp_queue(client_id: &str) -> bool {
    client_id.starts_with(AMQP_QUEUE_PREFIX)
}

/// How often offline persistent sessions are checked for expiry.
const EXPIRY_CHECK: Duration = Duration::from_secs(1);

/// A session operation the store could not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("session store: {0}")]
    Store(String),
    #[error("invalid topic filter {0:?}")]
    InvalidFilter(String),
}

impl From<StoreError> for SessionError {
    fn from(e: StoreError) -> Self {
        SessionError::Store(e.to_string())
    }
}

/// How long a session outlives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionExpiry {
    /// It ends with the connection (MQTT 3.1.1 clean session, MQTT 5
    /// session expiry interval 0).
    WithConnection,
    /// The router's `session_expiry` after its client left (MQTT 3.1.1
    /// persistent sessions).
    Default,
    /// This long after its client left (MQTT 5 session expiry interval).
    After(Duration),
    /// Never (MQTT 5 interval `0xFFFFFFFF`).
    Never,
}

impl SessionExpiry {
    /// Milliseconds as persisted (0: default, `u64::MAX`: never).
    fn to_ms(self) -> u64 {
        match self {
            SessionExpiry::WithConnection | SessionExpiry::Default => 0,
            SessionExpiry::After(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1),
            SessionExpiry::Never => u64::MAX,
        }
    }

    fn from_ms(ms: u64) -> SessionExpiry {
        match ms {
            0 => SessionExpiry::Default,
            u64::MAX => SessionExpiry::Never,
            ms => SessionExpiry::After(Duration::from_millis(ms)),
        }
    }
}

/// A subscription's options (MQTT 5 §3.8.3.1; 3.1.1 and AMQP bindings use
/// the QoS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    /// The highest QoS granted.
    pub qos: QoS,
    /// Messages this session published itself are not delivered to it.
    pub no_local: bool,
    /// Live deliveries keep the RETAIN flag they were published with.
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier, sent with each matching delivery
    /// (0: none).
    pub id: u32,
}

impl SubOptions {
    /// Options of a subscription that only has a QoS.
    pub fn qos(qos: QoS) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            id: 0,
        }
    }
}

/// Which retained messages a new subscription is sent (MQTT 5 retain
/// handling; 3.1.1 always sends them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainHandling {
    /// Sent at every SUBSCRIBE.
    Always,
    /// Sent only when the subscription did not exist before.
    IfNew,
    /// Never sent.
    Never,
}

/// What a session's filters make of one topic (see [`Subscriber::matched`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub qos: QoS,
    pub retain_as_published: bool,
    /// The subscription identifiers of every matching filter, ascending.
    pub sub_ids: Vec<u32>,
}

/// How a connection attaches.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Start afresh, discarding any earlier session (MQTT 3.1.1 clean
    /// session, MQTT 5 clean start).
    pub clean: bool,
    /// How long the session outlives the connection.
    pub expiry: SessionExpiry,
    /// Deliveries buffered in memory for the connection.
    pub queue: usize,
    /// The session's own bound on what it takes, asked for every message
    /// routed to it while this connection is attached (see [`Gate`]).
    pub gate: Option<Arc<dyn Gate>>,
}

/// A session's admission of messages, decided by its adapter (e.g. an AMQP
/// queue at its `x-max-length` with `reject-publish`). Asked by
/// [`Router::publish_gated`] (and every publish) before the message is
/// queued, while the router's registry is read-locked: it must only look
/// at atomics. A refused message is neither queued nor delivered to the
/// session, and the publisher learns which sessions refused it.
pub trait Gate: Send + Sync + std::fmt::Debug {
    /// Whether the session takes `message`; taking counts it.
    fn admit(&self, message: &Message) -> bool;

    /// An admitted message will not reach the session after all: the
    /// store refused it, or (not queued durably) it expired before its
    /// fan-out or found the session's channel full.
    fn refund(&self, message: &Message) {
        let _ = message;
    }
}

/// A connection attached to its session.
#[derive(Debug)]
pub struct Attached {
    pub subscriber: Subscriber,
    pub deliveries: mpsc::Receiver<Delivery>,
    /// An earlier session was resumed (MQTT CONNACK session present).
    pub session_present: bool,
}

/// One queue entry read back for a resumed session.
#[derive(Debug, Clone)]
pub struct Backlogged {
    pub seq: Seq,
    /// What the adapter recorded with [`Subscriber::set_state`] (0: queued).
    pub state: u32,
    pub message: Arc<Message>,
}

/// A connection's attachment to its session; dropping it detaches (a
/// persistent session stays, offline).
#[derive(Debug)]
pub struct Subscriber {
    conn: SessionId,
    key: u64,
    client_id: Arc<str>,
    queue: Option<u64>,
    taken_over: Arc<Notify>,
    lagged: Arc<AtomicBool>,
    /// Left the registry already (`leave`, or dropped).
    detached: bool,
    router: Router,
}

fn queue_name(client_id: &str) -> String {
    format!("session/{client_id}")
}

fn dedup_prefix(client_id: &str) -> String {
    format!("session/{client_id}/")
}

impl Router {
    /// A clean session for `client_id` (tests and simple callers).
    pub fn connect(
        &self,
        client_id: Arc<str>,
        queue: usize,
    ) -> (Subscriber, mpsc::Receiver<Delivery>) {
        let (subscriber, rx, _) = self.attach_slot(client_id, queue, None, true, None);
        (subscriber, rx)
    }

    /// Attaches a connection to the session of `client_id`: a new one, the
    /// persistent one it left (clean = false), or a fresh one replacing it
    /// (clean = true: the old queue and subscriptions are discarded). A
    /// connection already attached to it is told it was taken over.
    pub async fn attach(
        &self,
        client_id: Arc<str>,
        options: AttachOptions,
    ) -> Result<Attached, SessionError> {
        let store = &self.inner.store;
        // Past its expiry it is gone, even if the sweep (every
        // EXPIRY_CHECK) has not deleted it yet.
        if self.expired_offline(&client_id) {
            self.delete_expired(&client_id).await;
        }
        let existing = self
            .inner
            .registry()
            .sessions
            .get(&client_id)
            .map(|s| s.durable.is_some());
        // MQTT 5: resuming a stored session without an expiry resumes it,
        // and it ends when this connection does.
        let expiry = match options.expiry {
            SessionExpiry::WithConnection if !options.clean && existing == Some(true) => {
                SessionExpiry::After(Duration::ZERO)
            }
            expiry => expiry,
        };
        if options.clean && existing == Some(true) {
            self.forget(&client_id);
            store.delete_queue(&queue_name(&client_id)).await?;
            store.release_dedup(&dedup_prefix(&client_id), true).await?;
            store.delete_session(&client_id).await?;
        }
        if expiry == SessionExpiry::WithConnection {
            let (subscriber, deliveries, _) =
                self.attach_slot(client_id, options.queue, None, true, options.gate);
            return Ok(Attached {
                subscriber,
                deliveries,
                session_present: false,
            });
        }
        let queue = store.create_queue(&queue_name(&client_id)).await?;
        let (subscriber, deliveries, present) = self.attach_slot(
            client_id,
            options.queue,
            Some(queue),
            options.clean,
            options.gate,
        );
        if let Some(d) = self
            .inner
            .registry_mut()
            .sessions
            .get_mut(&subscriber.client_id)
            .and_then(|s| s.durable.as_mut())
        {
            d.expiry = expiry;
        }
        self.persist(&subscriber.client_id).await?;
        Ok(Attached {
            subscriber,
            deliveries,
            session_present: present,
        })
    }

    /// Registers the connection with the slot of `client_id` (made if
    /// missing; a clean attach replaces a non-persistent one). Returns
    /// whether a persistent session was resumed.
    fn attach_slot(
        &self,
        client_id: Arc<str>,
        queue: usize,
        durable_queue: Option<u64>,
        clean: bool,
        gate: Option<Arc<dyn Gate>>,
    ) -> (Subscriber, mpsc::Receiver<Delivery>, bool) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let conn = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let taken_over = Arc::new(Notify::new());
        let lagged = Arc::new(AtomicBool::new(false));
        let mut registry = self.inner.registry_mut();
        let mut present = false;
        if let Some(slot) = registry.sessions.get_mut(&client_id) {
            if let Some(old) = slot.online.take() {
                old.taken_over.notify_one();
            }
            present = !clean && slot.durable.is_some();
            if clean || slot.durable.is_none() {
                // A clean start: the old subscriptions go.
                registry.unsubscribe_all(&client_id);
            }
        }
        let key = match registry.sessions.get(&client_id) {
            Some(slot) => slot.key,
            None => {
                let key = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                registry.by_key.insert(key, Arc::clone(&client_id));
                registry.sessions.insert(
                    Arc::clone(&client_id),
                    Slot {
                        key,
                        client_id: Arc::clone(&client_id),
                        filters: BTreeMap::new(),
                        durable: None,
                        online: None,
                    },
                );
                key
            }
        };
        if let Some(slot) = registry.sessions.get_mut(&client_id) {
            slot.durable = match (durable_queue, slot.durable.take()) {
                (None, _) => None,
                (Some(queue), Some(mut d)) if d.queue == queue => {
                    d.disconnected_at_ms = None;
                    Some(d)
                }
                (Some(queue), _) => Some(Durable {
                    queue,
                    acks: Arc::default(),
                    queued: Arc::default(),
                    disconnected_at_ms: None,
                    expiry: SessionExpiry::Default,
                }),
            };
            slot.online = Some(Online {
                conn,
                tx,
                taken_over: Arc::clone(&taken_over),
                lagged: Arc::clone(&lagged),
                gate,
            });
        }
        metrics::gauge!("edge_sessions").set(registry.sessions.len() as f64);
        drop(registry);
        let subscriber = Subscriber {
            conn,
            key,
            client_id,
            queue: durable_queue,
            taken_over,
            lagged,
            detached: false,
            router: self.clone(),
        };
        (subscriber, rx, present)
    }

    /// Removes a session from the registry and the trie.
    fn forget(&self, client_id: &str) {
        let mut registry = self.inner.registry_mut();
        registry.unsubscribe_all(client_id);
        if let Some(slot) = registry.sessions.remove(client_id) {
            registry.by_key.remove(&slot.key);
        }
        metrics::gauge!("edge_sessions").set(registry.sessions.len() as f64);
    }

    /// Writes a persistent session's record (no-op for a clean one).
    async fn persist(&self, client_id: &str) -> Result<(), SessionError> {
        let value = {
            let registry = self.inner.registry();
            let Some(slot) = registry.sessions.get(client_id) else {
                return Ok(());
            };
            let Some(durable) = &slot.durable else {
                return Ok(());
            };
            encode(durable, &slot.filters)
        };
        self.inner.store.put_session(client_id, value).await?;
        Ok(())
    }

    /// Loads the persistent sessions and retained messages of the store.
    pub(crate) async fn load(&self) -> Result<(), StoreError> {
        let store = self.inner.store.clone();
        let loaded = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let sessions = store.sessions()?;
            let mut out = Vec::new();
            for (id, value) in sessions {
                let Some(Stored {
                    queue,
                    disconnected,
                    expiry,
                    filters,
                }) = decode(&value)
                else {
                    tracing::warn!(client_id = %id, "unreadable stored session: dropped");
                    continue;
                };
                let entries = store.queue_entries(queue, 0, usize::MAX)?;
                let bytes = entries
                    .iter()
                    .filter_map(|e| e.record.as_ref())
                    .map(|r| r.encoded_len() as u64)
                    .sum();
                let queued = QueueLevel::new(entries.len() as u64, bytes);
                out.push((id, queue, disconnected, expiry, filters, queued));
            }
            Ok((out, store.retained()?))
        })
        .await
        .map_err(|e| StoreError::Read(e.to_string()))??;
        let (sessions, retained) = loaded;
        let now = now_ms();
        let count = sessions.len();
        {
            let mut registry = self.inner.registry_mut();
            for (id, queue, disconnected, expiry, filters, queued) in sessions {
                let id: Arc<str> = id.into();
                let key = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                for (filter, sub) in &filters {
                    // A shared filter rejoins its group.
                    if registry
                        .subscribe(key, filter, *sub, &self.inner.next_id)
                        .is_err()
                    {
                        tracing::warn!(client_id = %id, filter = %filter, "invalid stored filter: dropped");
                    }
                }
                registry.by_key.insert(key, Arc::clone(&id));
                registry.sessions.insert(
                    Arc::clone(&id),
                    Slot {
                        key,
                        client_id: id,
                        filters,
                        durable: Some(Durable {
                            queue,
                            acks: Arc::default(),
                            queued: Arc::new(queued),
                            // Connected when the gateway stopped: away since now.
                            disconnected_at_ms: Some(disconnected.unwrap_or(now)),
                            expiry,
                        }),
                        online: None,
                    },
                );
            }
        }
        {
            let mut index = self
                .inner
                .retained
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (topic, record) in retained {
                match Message::from_record(&record) {
                    Ok(message) => index.apply(&Arc::new(message)),
                    Err(error) => unreadable("retained message", &topic, &error),
                }
            }
            tracing::info!(
                sessions = count,
                retained = index.len(),
                "sessions and retained messages loaded"
            );
        }
        Ok(())
    }
}

impl Inner {
    /// A refused append: the queue entries counted for it were not made.
    /// (Gates that admitted it are refunded.)
    pub(crate) fn unqueue(&self, targets: &[crate::router::Target], size: u64, message: &Message) {
        let registry = self.registry();
        for t in targets {
            let Some(slot) = registry
                .by_key
                .get(&t.key)
                .and_then(|id| registry.sessions.get(id))
            else {
                continue;
            };
            if let Some(gate) = slot.online.as_ref().and_then(|o| o.gate.as_ref()) {
                gate.refund(message);
            }
            if let (true, Some(d)) = (t.queued, &slot.durable) {
                d.queued.remove_exact(size);
            }
        }
    }
}

/// Deletes persistent sessions whose client has been away longer than
/// `session_expiry`, until the router is gone.
pub(crate) async fn expire_sessions(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(EXPIRY_CHECK);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let default = u64::try_from(inner.options.session_expiry.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let expired: Vec<Arc<str>> = inner
            .registry()
            .sessions
            .values()
            .filter(|s| s.online.is_none())
            .filter(|s| {
                s.durable
                    .as_ref()
                    .is_some_and(|d| is_expired(d, default, now))
            })
            .map(|s| Arc::clone(&s.client_id))
            .collect();
        let router = Router { inner };
        for id in expired {
            router.delete_expired(&id).await;
        }
    }
}

/// Whether an offline persistent session has been away past its expiry
/// (`default_ms`: the router's `session_expiry`).
fn is_expired(d: &crate::router::Durable, default_ms: u64, now: u64) -> bool {
    let expiry = match d.expiry {
        SessionExpiry::Default | SessionExpiry::WithConnection => default_ms,
        e => e.to_ms(),
    };
    d.disconnected_at_ms
        .is_some_and(|at| now.saturating_sub(at) >= expiry)
}

impl Router {
    /// Deletes an expired session: memory, queue, dedup keys, record.
    async fn delete_expired(&self, id: &Arc<str>) {
        self.forget(id);
        let store = &self.inner.store;
        let result = async {
            store.delete_queue(&queue_name(id)).await?;
            store.release_dedup(&dedup_prefix(id), true).await?;
            store.delete_session(id).await
        }
        .await;
        metrics::counter!("edge_sessions_expired_total").increment(1);
        match result {
            Ok(()) => tracing::info!(client_id = %id, "persistent session expired"),
            Err(error) => {
                tracing::warn!(client_id = %id, %error, "cannot delete an expired session")
            }
        }
    }

    /// Whether `client_id`'s session is offline and past its expiry, the
    /// sweep not having reached it yet.
    fn expired_offline(&self, client_id: &str) -> bool {
        let default =
            u64::try_from(self.inner.options.session_expiry.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        self.inner
            .registry()
            .sessions
            .get(client_id)
            .filter(|s| s.online.is_none())
            .and_then(|s| s.durable.as_ref())
            .is_some_and(|d| is_expired(d, default, now))
    }
}

impl Subscriber {
    pub fn id(&self) -> SessionId {
        self.conn
    }

    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    /// Whether the session outlives the connection.
    pub fn is_persistent(&self) -> bool {
        self.queue.is_some()
    }

    /// Entries in a persistent session's durable queue (delivered but not
    /// yet acknowledged ones included); `None` for a clean session.
    pub fn queued_messages(&self) -> Option<u64> {
        self.router
            .inner
            .registry()
            .sessions
            .get(&self.client_id)
            .and_then(|s| s.durable.as_ref())
            .map(|d| d.queued.messages())
    }

    /// Adds or replaces a subscription (`filter` must be valid: a topic
    /// filter, or `$share/{group}/{filter}` to join that group, see
    /// [`crate::topic::parse_subscription`]); returns the QoS granted and
    /// the retained messages it matches, to be sent now (none for a shared
    /// subscription, MQTT 5 §4.8.2). A persistent session's subscription is
    /// durable on return.
    pub async fn subscribe(
        &self,
        filter: &str,
        qos: QoS,
    ) -> Result<(QoS, Vec<Arc<Message>>), SessionError> {
        self.subscribe_with(filter, SubOptions::qos(qos), RetainHandling::Always)
            .await
    }

    /// [`Subscriber::subscribe`] with every option: the retained messages
    /// returned are those `retain` asks for. No local on a shared
    /// subscription is refused as an invalid filter (MQTT-3.8.3-4).
    pub async fn subscribe_with(
        &self,
        filter: &str,
        options: SubOptions,
        retain: RetainHandling,
    ) -> Result<(QoS, Vec<Arc<Message>>), SessionError> {
        let invalid = || SessionError::InvalidFilter(filter.to_string());
        let shared = match topic::parse_subscription(filter).ok_or_else(invalid)? {
            Subscription::Shared { .. } if options.no_local => return Err(invalid()),
            Subscription::Shared { .. } => true,
            Subscription::Plain(_) => false,
        };
        let existed = {
            let mut registry = self.router.inner.registry_mut();
            if registry.session(self.key).is_none() {
                // The session is gone (replaced by a clean start, or
                // expired): a subscription of it would stay behind.
                return Ok((options.qos, Vec::new()));
            }
            let existed = registry
                .subscribe(self.key, filter, options, &self.router.inner.next_id)
                .map_err(|_| invalid())?
                .is_some();
            if let Some(slot) = registry.sessions.get_mut(&self.client_id) {
                slot.filters.insert(filter.to_string(), options);
            }
            existed
        };
        self.router.persist(&self.client_id).await?;
        let send = !shared
            && match retain {
                RetainHandling::Always => true,
                RetainHandling::IfNew => !existed,
                RetainHandling::Never => false,
            };
        let retained = if send {
            self.router
                .inner
                .retained
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .matching(filter)
        } else {
            Vec::new()
        };
        Ok((options.qos, retained))
    }

    /// Whether the session has a subscription to exactly `filter`.
    pub fn has_filter(&self, filter: &str) -> bool {
        self.router
            .inner
            .registry()
            .sessions
            .get(&self.client_id)
            .is_some_and(|slot| slot.filters.contains_key(filter))
    }

    /// Changes how long a persistent session is kept after its client
    /// leaves (MQTT 5 DISCONNECT with a session expiry interval); durable
    /// on return. No-op for a session that ends with its connection.
    pub async fn set_expiry(&self, expiry: SessionExpiry) -> Result<(), SessionError> {
        let changed = {
            let mut registry = self.router.inner.registry_mut();
            match registry
                .sessions
                .get_mut(&self.client_id)
                .and_then(|s| s.durable.as_mut())
            {
                Some(d) if self.queue.is_some() => {
                    // Ending with the connection, for a stored session, is
                    // a zero expiry (WithConnection is stored as Default).
                    d.expiry = match expiry {
                        SessionExpiry::WithConnection => SessionExpiry::After(Duration::ZERO),
                        e => e,
                    };
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.router.persist(&self.client_id).await?;
        }
        Ok(())
    }

    pub async fn unsubscribe(&self, filter: &str) -> Result<(), SessionError> {
        {
            let mut registry = self.router.inner.registry_mut();
            registry.unsubscribe(self.key, filter);
            if let Some(slot) = registry.sessions.get_mut(&self.client_id) {
                slot.filters.remove(filter);
            }
        }
        self.router.persist(&self.client_id).await
    }

    /// Resolves when another connection attached to this session.
    /// Cancel-safe.
    pub async fn taken_over(&self) {
        self.taken_over.notified().await
    }

    /// Whether durable deliveries were left in the queue because the
    /// in-memory queue was full since the last call: then read the backlog.
    pub fn take_lagged(&self) -> bool {
        self.lagged.swap(false, Ordering::AcqRel)
    }

    /// Up to `max` entries of the session's queue from `from` on, in order.
    /// Entries whose message is gone (`drop-oldest`), unreadable or past its
    /// expiry ([`crate::Properties::expires_at_ms`]) are acknowledged and
    /// skipped (an expired one counted: `edge_messages_expired_total`).
    pub async fn backlog(&self, from: Seq, max: usize) -> Result<Vec<Backlogged>, SessionError> {
        self.read_queue(from, max, true).await
    }

    /// Like [`Subscriber::backlog`], but entries past their expiry are
    /// returned too: the adapter decides their fate (e.g. an AMQP queue
    /// dead-letters them).
    pub async fn backlog_with_expired(
        &self,
        from: Seq,
        max: usize,
    ) -> Result<Vec<Backlogged>, SessionError> {
        self.read_queue(from, max, false).await
    }

    async fn read_queue(
        &self,
        from: Seq,
        max: usize,
        drop_expired: bool,
    ) -> Result<Vec<Backlogged>, SessionError> {
        let Some(queue) = self.queue else {
            return Ok(Vec::new());
        };
        let mut gone = Vec::new();
        let mut out = Vec::with_capacity(max.min(1024));
        let mut from = from;
        let now = now_ms();
        // Entries skipped (gone, unreadable, expired) do not shorten the
        // page: fewer than `max` returned means the queue has no more.
        while out.len() < max {
            let want = max - out.len();
            let store = self.router.inner.store.clone();
            let entries =
                tokio::task::spawn_blocking(move || store.queue_entries(queue, from, want))
                    .await
                    .map_err(|e| SessionError::Store(e.to_string()))??;
            let read = entries.len();
            let Some(last) = entries.last().map(|e| e.seq) else {
                break;
            };
            for e in entries {
                let message = e.record.and_then(|record| {
                    Message::from_record(&record)
                        .map_err(|error| unreadable("queued message", &e.seq.to_string(), &error))
                        .ok()
                });
                match message {
                    Some(message) if drop_expired && message.is_expired(now) => {
                        expired(&message);
                        gone.push(e.seq);
                    }
                    Some(message) => out.push(Backlogged {
                        seq: e.seq,
                        state: e.state,
                        message: Arc::new(message),
                    }),
                    // Gone (`drop-oldest`) or unreadable: acknowledged, skipped.
                    None => gone.push(e.seq),
                }
            }
            if read < want {
                break;
            }
            from = last.saturating_add(1);
        }
        if !gone.is_empty() {
            self.ack(gone).await?;
        }
        Ok(out)
    }

    /// The client has these durable deliveries: their queue entries go.
    pub async fn ack(&self, seqs: Vec<Seq>) -> Result<(), SessionError> {
        match self.acker() {
            Some(acker) => acker.ack(seqs).await,
            None => Ok(()),
        }
    }

    /// Records the adapter's state of a queued delivery (e.g. MQTT QoS 2
    /// PUBREC received), read back by [`Subscriber::backlog`].
    pub async fn set_state(&self, seq: Seq, state: u32) -> Result<(), SessionError> {
        match self.acker() {
            Some(acker) => acker.set_state(seq, state).await,
            None => Ok(()),
        }
    }

    /// A handle for acknowledging queue entries from another task
    /// (`None` for a clean session, which has no queue).
    pub fn acker(&self) -> Option<Acker> {
        let queue = self.queue?;
        let (queued, acks) = self
            .router
            .inner
            .registry()
            .sessions
            .get(&self.client_id)
            .and_then(|s| s.durable.as_ref())
            .map(|d| (Arc::clone(&d.queued), Arc::clone(&d.acks)))?;
        Some(Acker {
            store: self.router.inner.store.clone(),
            queue,
            queued,
            acks,
        })
    }

    /// A persistent session's key for a publish it must recognise again
    /// (e.g. an MQTT QoS 2 packet id until PUBREL); `None` for a clean
    /// session, whose state ends with the connection.
    pub fn dedup_key(&self, suffix: &str) -> Option<String> {
        self.queue
            .map(|_| format!("{}{suffix}", dedup_prefix(&self.client_id)))
    }

    /// The suffixes of this session's recorded dedup keys.
    pub async fn dedup_keys(&self) -> Result<Vec<String>, SessionError> {
        if self.queue.is_none() {
            return Ok(Vec::new());
        }
        let prefix = dedup_prefix(&self.client_id);
        let store = self.router.inner.store.clone();
        let p = prefix.clone();
        let keys = tokio::task::spawn_blocking(move || store.dedup_keys(&p))
            .await
            .map_err(|e| SessionError::Store(e.to_string()))??;
        Ok(keys
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Forgets a dedup key of this session (the publisher released it).
    pub async fn release_key(&self, suffix: &str) -> Result<(), SessionError> {
        match self.dedup_key(suffix) {
            Some(key) => Ok(self.router.inner.store.release_dedup(&key, false).await?),
            None => Ok(()),
        }
    }

    /// The session's filters (a resumed persistent session's included), so
    /// an owner that keeps its own record of them can reconcile the two.
    pub fn filters(&self) -> Vec<String> {
        self.router
            .inner
            .registry()
            .sessions
            .get(&self.client_id)
            .map(|slot| slot.filters.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// What this session's filters make of `message` (a resumed session's
    /// queued messages go out with it; its groups' filters count, as the
    /// message may have been queued through one): the highest QoS they grant, its
    /// RETAIN flag kept or not, their subscription identifiers. `None` when
    /// none matches (any more), or only no-local ones and it is its own.
    pub fn matched(&self, message: &Message) -> Option<Matched> {
        let registry = self.router.inner.registry();
        let own = message.origin.protocol == crate::message::Protocol::Mqtt
            && *message.origin.publisher == *self.client_id;
        let mut out: Option<crate::router::Merged> = None;
        registry.trie.for_each_match(&message.topic, |_, key, sub| {
            if registry.owner(key) != self.key || (sub.no_local && own) {
                return;
            }
            match out.as_mut() {
                Some(m) => m.add(sub),
                None => out = Some(crate::router::Merged::new(sub)),
            }
        });
        out.map(|m| Matched {
            qos: m.qos,
            retain_as_published: m.retain_as_published && message.retain,
            sub_ids: m.sub_ids,
        })
    }
}

/// Acknowledges a persistent session's queue entries; cheap to clone.
#[derive(Debug, Clone)]
pub struct Acker {
    store: edge_store::Store,
    queue: u64,
    queued: Arc<QueueLevel>,
    acks: Arc<tokio::sync::RwLock<()>>,
}

impl Acker {
    /// Acknowledges in a background task; returns once the task is
    /// registered, so that a later [`Subscriber::backlog`] (of this or a
    /// newer connection) waits for it and never reads the entries again.
    pub async fn ack_in_background(&self, seqs: Vec<Seq>) -> tokio::task::JoinHandle<()> {
        let guard = Arc::clone(&self.acks).read_owned().await;
        let acker = self.clone();
        tokio::spawn(async move {
            if let Err(error) = acker.ack(seqs).await {
                tracing::warn!(%error, "cannot acknowledge queued deliveries; they will be sent again");
            }
            drop(guard);
        })
    }

    pub async fn ack(&self, seqs: Vec<Seq>) -> Result<(), SessionError> {
        let n = seqs.len() as u64;
        self.store.queue_ack(self.queue, seqs).await?;
        self.queued.remove_acked(n);
        Ok(())
    }

    pub async fn set_state(&self, seq: Seq, state: u32) -> Result<(), SessionError> {
        Ok(self.store.queue_set(self.queue, seq, state).await?)
    }

    /// Resolves once every acknowledgement started with
    /// [`Acker::ack_in_background`] before this call is done.
    pub async fn settled(&self) {
        drop(self.acks.write().await);
    }
}

impl Subscriber {
    /// Detaches now; for a persistent session, returns when its record
    /// says it left. Dropping a subscriber does the same with the write in
    /// the background; a caller about to close the store uses this, so
    /// that no write (and no store handle) outlives it.
    pub async fn leave(mut self) -> Result<(), SessionError> {
        if let Some((store, id, value)) = self.detach() {
            store.put_session(&id, value).await?;
        }
        Ok(())
    }

    /// Leaves the registry (once); returns the record write a persistent
    /// session owes.
    fn detach(&mut self) -> Option<(edge_store::Store, String, Vec<u8>)> {
        if std::mem::replace(&mut self.detached, true) {
            return None;
        }
        let router = &self.router;
        let mut registry = router.inner.registry_mut();
        let slot = registry.sessions.get_mut(&self.client_id)?;
        if slot.online.as_ref().is_none_or(|o| o.conn != self.conn) {
            // Taken over: the session belongs to the newer connection.
            return None;
        }
        slot.online = None;
        let write = match slot.durable.as_mut() {
            None => {
                let key = slot.key;
                registry.unsubscribe_all(&self.client_id);
                registry.sessions.remove(&self.client_id);
                registry.by_key.remove(&key);
                None
            }
            Some(d) => {
                d.disconnected_at_ms = Some(now_ms());
                let value = encode(d, &slot.filters);
                Some((
                    router.inner.store.clone(),
                    self.client_id.to_string(),
                    value,
                ))
            }
        };
        metrics::gauge!("edge_sessions").set(registry.sessions.len() as f64);
        write
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let Some((store, id, value)) = self.detach() else {
            return;
        };
        // Best effort: a session found connected at start counts as away
        // since that start.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.put_session(&id, value).await;
            });
        }
    }
}

const FLAG_NO_LOCAL: u8 = 1;
const FLAG_RETAIN_AS_PUBLISHED: u8 = 2;

fn encode(durable: &Durable, filters: &BTreeMap<String, SubOptions>) -> Vec<u8> {
    let mut out = Vec::with_capacity(27 + filters.keys().map(|f| f.len() + 8).sum::<usize>());
    out.put_u8(2);
    out.put_u64_le(durable.queue);
    out.put_u64_le(durable.disconnected_at_ms.unwrap_or(0));
    out.put_u64_le(durable.expiry.to_ms());
    let filters: Vec<_> = filters
        .iter()
        .filter(|(f, _)| f.len() <= usize::from(u16::MAX))
        .take(usize::from(u16::MAX))
        .collect();
    out.put_u16_le(filters.len() as u16);
    for (filter, sub) in filters {
        out.put_u16_le(filter.len() as u16);
        out.put_slice(filter.as_bytes());
        out.put_u8(sub.qos as u8);
        let mut flags = 0;
        if sub.no_local {
            flags |= FLAG_NO_LOCAL;
        }
        if sub.retain_as_published {
            flags |= FLAG_RETAIN_AS_PUBLISHED;
        }
        out.put_u8(flags);
        out.put_u32_le(sub.id);
    }
    out
}

/// A persisted session, decoded.
#[derive(Debug, PartialEq)]
struct Stored {
    queue: u64,
    disconnected: Option<u64>,
    expiry: SessionExpiry,
    filters: BTreeMap<String, SubOptions>,
}

fn decode(mut v: &[u8]) -> Option<Stored> {
    let version = *v.first()?;
    let header = match version {
        1 => 19,
        2 => 27,
        _ => return None,
    };
    if v.len() < header {
        return None;
    }
    v.advance(1);
    let queue = v.get_u64_le();
    let disconnected = Some(v.get_u64_le()).filter(|at| *at != 0);
    let expiry = if version == 2 {
        SessionExpiry::from_ms(v.get_u64_le())
    } else {
        SessionExpiry::Default
    };
    let count = v.get_u16_le();
    let mut filters = BTreeMap::new();
    for _ in 0..count {
        if v.len() < 2 {
            return None;
        }
        let len = usize::from(v.get_u16_le());
        let filter = std::str::from_utf8(v.get(..len)?).ok()?.to_string();
        v.advance(len);
        if v.is_empty() {
            return None;
        }
        let mut sub = SubOptions::qos(QoS::from_u8(v.get_u8())?);
        if version == 2 {
            if v.len() < 5 {
                return None;
            }
            let flags = v.get_u8();
            sub.no_local = flags & FLAG_NO_LOCAL != 0;
            sub.retain_as_published = flags & FLAG_RETAIN_AS_PUBLISHED != 0;
            sub.id = v.get_u32_le();
        }
        filters.insert(filter, sub);
    }
    Some(Stored {
        queue,
        disconnected,
        expiry,
        filters,
    })
}

/// The expiry a persisted session record holds (router tests).
#[cfg(test)]
pub(crate) fn tests_decode_expiry(v: &[u8]) -> Option<SessionExpiry> {
    decode(v).map(|s| s.expiry)
}

/// A message past its expiry, not delivered: counted.
pub(crate) fn expired(message: &Message) {
    metrics::counter!("edge_messages_expired_total", "protocol" => message.origin.protocol.as_str())
        .increment(1);
}

/// A stored message this build cannot decode: skipped, counted, logged.
fn unreadable(what: &str, key: &str, error: &crate::message::DecodeError) {
    tracing::error!(what, key, %error, "stored message is unreadable; skipped");
    metrics::counter!("edge_messages_dropped_total", "reason" => "unreadable").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn durable(queue: u64, at: Option<u64>, expiry: SessionExpiry) -> Durable {
        Durable {
            queue,
            acks: Arc::default(),
            queued: Arc::default(),
            disconnected_at_ms: at,
            expiry,
        }
    }

    #[test]
    fn persisted_session_round_trips_and_cuts_are_refused() {
        let mut filters = BTreeMap::new();
        filters.insert("a/+".to_string(), SubOptions::qos(QoS::AtLeastOnce));
        filters.insert(
            "b/#".to_string(),
            SubOptions {
                qos: QoS::ExactlyOnce,
                no_local: true,
                retain_as_published: true,
                id: 268_435_455,
            },
        );
        for expiry in [
            SessionExpiry::Default,
            SessionExpiry::Never,
            SessionExpiry::After(Duration::from_secs(90)),
        ] {
            let bytes = encode(&durable(7, Some(1_700_000_000_000), expiry), &filters);
            assert_eq!(
                decode(&bytes),
                Some(Stored {
                    queue: 7,
                    disconnected: Some(1_700_000_000_000),
                    expiry,
                    filters: filters.clone(),
                })
            );
            for cut in 0..bytes.len() {
                assert!(decode(&bytes[..cut]).is_none(), "cut at {cut}");
            }
        }
        let empty = decode(&encode(
            &durable(1, None, SessionExpiry::Default),
            &BTreeMap::new(),
        ))
        .expect("decodes");
        assert_eq!((empty.queue, empty.disconnected), (1, None));
    }

    #[test]
    fn version_1_records_are_still_read() {
        // Version 1: queue 7, away since 1000, one filter "a/#" at QoS 1.
        let mut v1 = vec![1];
        v1.extend_from_slice(&7u64.to_le_bytes());
        v1.extend_from_slice(&1000u64.to_le_bytes());
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&3u16.to_le_bytes());
        v1.extend_from_slice(b"a/#");
        v1.push(1);
        let stored = decode(&v1).expect("version 1 decodes");
        assert_eq!(stored.queue, 7);
        assert_eq!(stored.disconnected, Some(1000));
        assert_eq!(stored.expiry, SessionExpiry::Default);
        assert_eq!(
            stored.filters.get("a/#"),
            Some(&SubOptions::qos(QoS::AtLeastOnce))
        );
    }
}
