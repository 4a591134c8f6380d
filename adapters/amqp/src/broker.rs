//! The exchanges, queues and bindings every AMQP connection shares, and
//! their persistence.
//!
//! Durable definitions are rows of the store's `definitions` table (one
//! commit each, before the declare-ok / bind-ok):
//!
//! ```text
//! amqp/exchange/<name>   u8 version = 1, u8 kind (0 direct, 1 fanout, 2 topic, 3 headers),
//!                        u8 flags (1 auto-delete, 2 internal)
//! amqp/queue/<name>      u8 version = 2, u8 flags (1 auto-delete), then the
//!                        arguments' fields (`args.rs`); version 1 (still read):
//!                        flags, then u64 LE x-message-ttl (ms) when it has one
//! amqp/binding/...      a binding of a queue or an exchange, with its
//!                        arguments (`broker/rows.rs`)
//! amqp/delivered/<name>  u8 1: the durable queue delivered since its last clean stop
//!                        (`queue/delivered.rs`)
//! ```
//!
//! The rows' encoding is `broker/rows.rs`. A queue with `x-expires` is
//! watched by one task (`watch_expiry`) that deletes it as queue.delete
//! does once it has been unused that long.
//!
//! A durable queue's messages are its core session's store queue; its
//! bindings are also the session's filters. The rows here are the source
//! of truth at start: every durable queue is attached again (resuming its
//! entries) and every binding subscribed again. Writes go row first on
//! bind and declare, row last on unbind and delete, so a crash in between
//! leaves a definition that start-up completes; a filter the session kept
//! that no row owns (a binding to a transient exchange, which ends with the
//! process) is dropped at start.
//!
//! Changes of definitions are serialised (`changes`), so the registry and
//! the store never disagree while one is under way.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use amq_protocol::types::FieldTable;
use edge_core::{Router, SessionError};
use edge_store::StoreError;

use crate::bindings::{self, BindArgs, Edges, Leads, Resolved};
use crate::convert::{self, Kind};
use crate::error::{
    ACCESS_REFUSED, Exception, INTERNAL_ERROR, NOT_FOUND, PRECONDITION_FAILED, RESOURCE_LOCKED,
};
use crate::queue::{ConnId, DELIVERED_ROW, Flags, Queue};

mod e2e;
mod queue_bindings;
mod rows;

use rows::{
    Dest, binding_row, decode_binding, decode_exchange, decode_queue, encode_queue, kind_code,
};

const EXCHANGE_ROW: &str = "amqp/exchange/";
const QUEUE_ROW: &str = "amqp/queue/";
const BINDING_ROW: &str = "amqp/binding/";

/// Exchanges every vhost has (AMQP 0-9-1 §3.1.3).
const BUILT_IN: [(&str, Kind); 6] = [
    ("", Kind::Direct),
    ("amq.direct", Kind::Direct),
    ("amq.fanout", Kind::Fanout),
    ("amq.topic", Kind::Topic),
    ("amq.headers", Kind::Headers),
    ("amq.match", Kind::Headers),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exchange {
    pub kind: Kind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
}

/// An exchange declaration as asked for.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeSpec {
    pub name: String,
    pub kind: String,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
}

/// A queue declaration as asked for.
#[derive(Debug, Clone)]
pub(crate) struct QueueSpec {
    pub name: String,
    pub passive: bool,
    pub flags: Flags,
}

#[derive(Debug, Default)]
struct Registry {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, Arc<Queue>>,
    /// queue → (exchange, key, arguments)
    bindings: BTreeMap<String, BTreeSet<(String, String, BindArgs)>>,
    /// Exchange bindings: (source, destination, key, arguments).
    e2e: BTreeSet<(String, String, String, BindArgs)>,
    /// The bindings the adapter evaluates, by source exchange: every
    /// binding to a headers exchange, every exchange binding.
    edges: Edges,
}

/// Shared by every connection of the listener.
#[derive(Debug)]
pub(crate) struct Broker {
    /// Itself, for the tasks it starts and the queues (they dead-letter
    /// through it).
    me: Weak<Broker>,
    router: Router,
    registry: Mutex<Registry>,
    changes: tokio::sync::Mutex<()>,
    next_name: AtomicU64,
}

fn internal(e: impl std::fmt::Display) -> Exception {
    Exception::connection(INTERNAL_ERROR, e)
}

fn store_err(e: StoreError) -> Exception {
    internal(format!("store: {e}"))
}

fn session_err(e: SessionError) -> Exception {
    internal(format!("queue session: {e}"))
}

fn not_found_exchange(name: &str) -> Exception {
    Exception::channel(NOT_FOUND, format!("no exchange '{name}' in vhost '/'"))
}

fn not_found_queue(name: &str) -> Exception {
    Exception::channel(NOT_FOUND, format!("no queue '{name}' in vhost '/'"))
}

impl Broker {
    /// The built-in exchanges, then the durable definitions of the store,
    /// with every durable queue attached again.
    pub(crate) async fn load(router: Router) -> Result<Arc<Broker>, StoreError> {
        let store = router.store().clone();
        let rows = tokio::task::spawn_blocking(move || store.definitions("amqp/"))
            .await
            .map_err(|e| StoreError::Read(e.to_string()))??;
        let broker = Arc::new_cyclic(|me| Broker {
            me: me.clone(),
            router,
            registry: Mutex::default(),
            changes: tokio::sync::Mutex::new(()),
            next_name: AtomicU64::new(1),
        });
        {
            let mut r = broker.registry();
            for (name, kind) in BUILT_IN {
                r.exchanges.insert(
                    name.to_string(),
                    Exchange {
                        kind,
                        durable: true,
                        auto_delete: false,
                        internal: false,
                    },
                );
            }
        }
        let mut bindings: Vec<rows::Stored> = Vec::new();
        let delivered: HashSet<&str> = rows
            .iter()
            .filter_map(|(row, _)| row.strip_prefix(DELIVERED_ROW))
            .collect();
        for (row, value) in &rows {
            if let Some(name) = row.strip_prefix(EXCHANGE_ROW) {
                match decode_exchange(value) {
                    Some(x) => {
                        broker.registry().exchanges.insert(name.to_string(), x);
                    }
                    None => tracing::warn!(exchange = name, "unreadable stored exchange: ignored"),
                }
            } else if let Some(name) = row.strip_prefix(QUEUE_ROW) {
                let Some(flags) = decode_queue(value) else {
                    tracing::warn!(queue = name, "unreadable stored queue: ignored");
                    continue;
                };
                let marked = delivered.contains(name);
                match Queue::start(&broker.router, &broker.me, name, flags, None, marked).await {
                    Ok(q) => {
                        broker.watch_expiry(&q);
                        broker.registry().queues.insert(name.to_string(), q);
                    }
                    Err(error) => {
                        tracing::warn!(queue = name, %error, "cannot attach a stored queue")
                    }
                }
            } else if row.starts_with(BINDING_ROW) {
                match decode_binding(value) {
                    Some(b) => bindings.push(b),
                    None => tracing::warn!(row = %row, "unreadable stored binding: ignored"),
                }
            }
        }
        broker.restore(bindings).await;
        broker.reconcile().await;
        let (exchanges, queues) = {
            let r = broker.registry();
            (r.exchanges.len(), r.queues.len())
        };
        tracing::info!(exchanges, queues, "AMQP definitions loaded");
        Ok(broker)
    }

    /// Drops the filters a durable queue's session kept that no stored
    /// binding owns (bindings to transient exchanges, which end with the
    /// process; an unbind whose row deletion a crash cut short).
    async fn reconcile(&self) {
        let queues: Vec<(Arc<Queue>, BTreeSet<String>)> = {
            let r = self.registry();
            r.queues
                .values()
                .map(|q| {
                    let mut wanted = BTreeSet::new();
                    wanted.extend(convert::filter_of("", Kind::Direct, &q.name).ok());
                    for (x, key, _) in r.bindings.get(q.name.as_ref()).into_iter().flatten() {
                        if let Some(e) = r.exchanges.get(x) {
                            wanted.extend(Self::binding_filter(x, e.kind, key, &q.name).ok());
                        }
                    }
                    (Arc::clone(q), wanted)
                })
                .collect()
        };
        for (q, wanted) in queues {
            for filter in q.filters() {
                if !wanted.contains(&filter) {
                    tracing::info!(queue = %q.name, filter = %filter, "dropping a filter no stored binding owns");
                    if let Err(error) = q.unbind(&filter).await {
                        tracing::warn!(queue = %q.name, %error, "cannot drop a stale filter");
                    }
                }
            }
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn router(&self) -> &Router {
        &self.router
    }

    /// The exchange a publish goes to and the topics it is routed on.
    pub(crate) fn route(
        &self,
        name: &str,
        key: &str,
        headers: Option<&FieldTable>,
    ) -> Result<(Exchange, Resolved), Exception> {
        let r = self.registry();
        let x = r
            .exchanges
            .get(name)
            .copied()
            .ok_or_else(|| not_found_exchange(name))?;
        let resolved = bindings::resolve(name, x.kind, key, headers, &r.edges, |d| {
            r.exchanges.get(d).map(|e| e.kind)
        });
        Ok((x, resolved))
    }

    /// The exchange a publish goes to.
    pub(crate) fn exchange(&self, name: &str) -> Result<Exchange, Exception> {
        self.registry()
            .exchanges
            .get(name)
            .copied()
            .ok_or_else(|| not_found_exchange(name))
    }

    /// Declares (or checks, when passive) an exchange.
    pub(crate) async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), Exception> {
        let _change = self.changes.lock().await;
        let existing = self.registry().exchanges.get(&spec.name).copied();
        if spec.passive {
            return existing
                .map(|_| ())
                .ok_or_else(|| not_found_exchange(&spec.name));
        }
        let kind = Kind::parse(&spec.kind).ok_or_else(|| {
            Exception::connection(503, format!("invalid exchange type '{}'", spec.kind))
        })?;
        if let Some(x) = existing {
            if x.kind != kind || x.durable != spec.durable && !spec.name.starts_with("amq.") {
                let what = if x.kind != kind { "type" } else { "durable" };
                return Err(Exception::channel(
                    PRECONDITION_FAILED,
                    format!(
                        "inequivalent arg '{what}' for exchange '{}' in vhost '/': received '{}' but current is '{}'",
                        spec.name,
                        if x.kind != kind {
                            spec.kind.clone()
                        } else {
                            spec.durable.to_string()
                        },
                        if x.kind != kind {
                            x.kind.name().to_string()
                        } else {
                            x.durable.to_string()
                        },
                    ),
                ));
            }
            return Ok(());
        }
        if spec.name.starts_with("amq.") {
            return Err(Exception::channel(
                ACCESS_REFUSED,
                format!(
                    "exchange name '{}' contains reserved prefix 'amq.*'",
                    spec.name
                ),
            ));
        }
        let exchange = Exchange {
            kind,
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
        };
        if spec.durable {
            let flags = u8::from(spec.auto_delete) | (u8::from(spec.internal) << 1);
            self.router
                .store()
                .put_definition(
                    &format!("{EXCHANGE_ROW}{}", spec.name),
                    vec![1, kind_code(kind), flags],
                )
                .await
                .map_err(store_err)?;
        }
        self.registry()
            .exchanges
            .insert(spec.name.clone(), exchange);
        Ok(())
    }

    /// Deletes an exchange and the bindings to it.
    pub(crate) async fn delete_exchange(
        &self,
        name: &str,
        if_unused: bool,
    ) -> Result<(), Exception> {
        let _change = self.changes.lock().await;
        if name.is_empty() || name.starts_with("amq.") {
            return Err(Exception::channel(
                ACCESS_REFUSED,
                format!("exchange '{name}' in vhost '/' cannot be deleted"),
            ));
        }
        let Some(exchange) = self.registry().exchanges.get(name).copied() else {
            return Err(not_found_exchange(name));
        };
        if if_unused && self.registry().is_source(name) {
            return Err(Exception::channel(
                PRECONDITION_FAILED,
                format!("exchange '{name}' in vhost '/' in use"),
            ));
        }
        let bound: Vec<(String, String, BindArgs)> = self
            .registry()
            .bindings
            .iter()
            .flat_map(|(q, set)| {
                set.iter()
                    .filter(|(x, _, _)| x == name)
                    .map(move |(_, k, a)| (q.clone(), k.clone(), a.clone()))
            })
            .collect();
        for (queue, key, args) in bound {
            self.remove_binding(&queue, name, exchange.kind, &key, &args)
                .await?;
        }
        let sources = self.unlink_all(name).await?;
        self.forget_exchange(name, exchange.durable).await?;
        for source in sources {
            self.drop_if_unused(&source).await?;
        }
        Ok(())
    }

    /// Removes an exchange from the registry and, when durable, its row.
    async fn forget_exchange(&self, name: &str, durable: bool) -> Result<(), Exception> {
        if durable {
            self.router
                .store()
                .delete_definition(&format!("{EXCHANGE_ROW}{name}"))
                .await
                .map_err(store_err)?;
        }
        let mut r = self.registry();
        r.exchanges.remove(name);
        r.edges.remove(name);
        Ok(())
    }

    /// A fresh server-chosen queue name.
    fn generated_name(&self) -> String {
        let n = self.next_name.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("amq.gen-{nanos:x}-{n}")
    }

    /// The queue `name`, if `conn` may use it (405 for another
    /// connection's exclusive queue).
    pub(crate) fn queue(&self, name: &str, conn: ConnId) -> Result<Arc<Queue>, Exception> {
        let q = self
            .registry()
            .queues
            .get(name)
            .cloned()
            .ok_or_else(|| not_found_queue(name))?;
        if q.owner.is_some_and(|owner| owner != conn) {
            return Err(Exception::channel(
                RESOURCE_LOCKED,
                format!("cannot obtain exclusive access to locked queue '{name}' in vhost '/'"),
            ));
        }
        Ok(q)
    }

    /// Declares (or checks) a queue; returns it.
    pub(crate) async fn declare_queue(
        &self,
        spec: &QueueSpec,
        conn: ConnId,
    ) -> Result<Arc<Queue>, Exception> {
        let _change = self.changes.lock().await;
        if spec.passive {
            let q = self.queue(&spec.name, conn)?;
            q.touch();
            return Ok(q);
        }
        let name = if spec.name.is_empty() {
            self.generated_name()
        } else if spec.name.starts_with("amq.") {
            return Err(Exception::channel(
                ACCESS_REFUSED,
                format!(
                    "queue name '{}' contains reserved prefix 'amq.*'",
                    spec.name
                ),
            ));
        } else {
            spec.name.clone()
        };
        // Looked up on its own line: a guard in an `if let` scrutinee lives
        // through the block, and `queue` below locks the registry again.
        let existing = self.registry().queues.get(&name).cloned();
        if let Some(existing) = existing {
            let q = self.queue(&name, conn)?;
            let (had, asked) = (&existing.flags, &spec.flags);
            for (arg, a, b) in [
                ("durable", had.durable, asked.durable),
                ("exclusive", had.exclusive, asked.exclusive),
                ("auto_delete", had.auto_delete, asked.auto_delete),
            ] {
                if a != b {
                    return Err(Exception::channel(
                        PRECONDITION_FAILED,
                        format!(
                            "inequivalent arg '{arg}' for queue '{name}' in vhost '/': received '{b}' but current is '{a}'"
                        ),
                    ));
                }
            }
            if let Some((arg, asked, had)) = asked.args.inequivalent(&had.args) {
                return Err(Exception::channel(
                    PRECONDITION_FAILED,
                    format!(
                        "inequivalent arg '{arg}' for queue '{name}' in vhost '/': received {asked} but current is {had}"
                    ),
                ));
            }
            q.touch();
            return Ok(q);
        }
        let durable = spec.flags.durable && !spec.flags.exclusive;
        if durable {
            self.router
                .store()
                .put_definition(&format!("{QUEUE_ROW}{name}"), encode_queue(&spec.flags))
                .await
                .map_err(store_err)?;
        }
        let owner = spec.flags.exclusive.then_some(conn);
        let q = Queue::start(
            &self.router,
            &self.me,
            &name,
            spec.flags.clone(),
            owner,
            false,
        )
        .await
        .map_err(session_err)?;
        self.watch_expiry(&q);
        // The default exchange: every queue is bound by its name.
        let filter = convert::filter_of("", Kind::Direct, &name).map_err(internal)?;
        q.bind(&filter).await.map_err(session_err)?;
        self.registry().queues.insert(name, Arc::clone(&q));
        Ok(q)
    }

    /// Deletes a queue; returns the messages it held.
    pub(crate) async fn delete_queue(
        &self,
        name: &str,
        conn: ConnId,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32, Exception> {
        let _change = self.changes.lock().await;
        let q = self.queue(name, conn)?;
        if if_unused && q.consumer_count() > 0 {
            return Err(Exception::channel(
                PRECONDITION_FAILED,
                format!("queue '{name}' in vhost '/' in use"),
            ));
        }
        if if_empty && q.message_count() > 0 {
            return Err(Exception::channel(
                PRECONDITION_FAILED,
                format!("queue '{name}' in vhost '/' is not empty"),
            ));
        }
        self.remove_queue(&q).await
    }

    async fn remove_queue(&self, q: &Arc<Queue>) -> Result<u32, Exception> {
        let name = q.name.to_string();
        self.registry().queues.remove(&name);
        let bound = self.registry().bindings.remove(&name).unwrap_or_default();
        let count = q.delete(&self.router).await.map_err(session_err)?;
        if q.flags.durable && !q.flags.exclusive {
            let store = self.router.store();
            for (exchange, key, args) in &bound {
                store
                    .delete_definition(&binding_row(Dest::Queue(&name), exchange, key, args))
                    .await
                    .map_err(store_err)?;
            }
            store
                .delete_definition(&format!("{DELIVERED_ROW}{name}"))
                .await
                .map_err(store_err)?;
            store
                .delete_definition(&format!("{QUEUE_ROW}{name}"))
                .await
                .map_err(store_err)?;
        }
        {
            let mut r = self.registry();
            for (x, key, args) in &bound {
                let filter = convert::headers_filter(x, &name);
                r.remove_edge(x, &Leads::Topic(filter), key, args);
            }
        }
        let exchanges: BTreeSet<&str> = bound.iter().map(|(x, _, _)| x.as_str()).collect();
        for x in exchanges {
            self.drop_if_unused(x).await?;
        }
        Ok(count)
    }

    /// Deletes an auto-delete queue that lost its last consumer, or the
    /// exclusive queues of a connection that ended.
    pub(crate) async fn drop_queue(&self, q: &Arc<Queue>) {
        let _change = self.changes.lock().await;
        if q.is_deleted() {
            return;
        }
        if let Err(error) = self.remove_queue(q).await {
            tracing::warn!(queue = %q.name, %error, "cannot delete the queue");
        }
    }

    /// Deletes `q` once it has been unused for its `x-expires` (a task that
    /// holds neither the queue nor the broker while it waits).
    fn watch_expiry(&self, q: &Arc<Queue>) {
        if q.flags.args.expires.is_none() {
            return;
        }
        let (broker, queue) = (self.me.clone(), Arc::downgrade(q));
        tokio::spawn(async move {
            while let Some(q) = crate::queue::until_expired(queue.clone()).await {
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                if broker.expire(&q).await {
                    return;
                }
            }
        });
    }

    /// Deletes an expired queue as queue.delete does; false if it was used
    /// meanwhile (then it is watched on).
    async fn expire(&self, q: &Arc<Queue>) -> bool {
        let _change = self.changes.lock().await;
        if q.is_deleted() {
            return true;
        }
        if !q.is_expired() {
            return false;
        }
        tracing::info!(queue = %q.name, "deleting the queue: unused for its x-expires");
        if let Err(error) = self.remove_queue(q).await {
            tracing::warn!(queue = %q.name, %error, "cannot delete the expired queue");
        }
        true
    }

    /// At shutdown, once every connection ended: detaches every queue's
    /// session, so that nothing holds the store after this returns.
    pub(crate) async fn close(&self) {
        let queues: Vec<Arc<Queue>> = self.registry().queues.drain().map(|(_, q)| q).collect();
        for q in queues {
            Queue::close(q).await;
        }
    }

    /// Every queue now (for the queue gauges, `telemetry.rs`).
    pub(crate) fn queues(&self) -> Vec<Arc<Queue>> {
        self.registry().queues.values().cloned().collect()
    }

    /// The exclusive queues of a connection.
    pub(crate) fn owned_by(&self, conn: ConnId) -> Vec<Arc<Queue>> {
        self.registry()
            .queues
            .values()
            .filter(|q| q.owner == Some(conn))
            .cloned()
            .collect()
    }

    /// The queues a message published on any of `topics` would reach
    /// (dead-lettering's cycle check).
    pub(crate) fn queues_for(&self, topics: &[&str]) -> Vec<String> {
        self.router
            .sessions_matching(topics)
            .iter()
            .filter_map(|id| id.strip_prefix(edge_core::session::AMQP_QUEUE_PREFIX))
            .map(str::to_string)
            .collect()
    }

    /// The queue of a core session (`amqp:<name>`), if registered.
    pub(crate) fn queue_of_session(&self, session: &str) -> Option<Arc<Queue>> {
        let name = session.strip_prefix(edge_core::session::AMQP_QUEUE_PREFIX)?;
        self.registry().queues.get(name).cloned()
    }

    /// Deletes an auto-delete exchange that lost its last binding (as the
    /// source, RabbitMQ's rule).
    /// Bindings that lead to it go with it, and so do auto-delete
    /// exchanges that were their sources and have no binding left.
    async fn drop_if_unused(&self, name: &str) -> Result<(), Exception> {
        let mut work = vec![name.to_string()];
        while let Some(name) = work.pop() {
            let unused = {
                let r = self.registry();
                r.exchanges
                    .get(&name)
                    .filter(|x| x.auto_delete && !r.is_source(&name))
                    .copied()
            };
            let Some(exchange) = unused else { continue };
            work.extend(self.unlink_all(&name).await?);
            self.forget_exchange(&name, exchange.durable).await?;
        }
        Ok(())
    }
}
