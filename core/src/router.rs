//! The router: fans a published message out to online subscribers and hands
//! everything that must be durable to the store.
//!
//! A message is logged when it is QoS 1 or 2 (its acknowledgement promises
//! durability) or when any route matches it (it is bound upstream). The
//! returned [`Receipt`] resolves when the log commit is done; adapters
//! acknowledge only then. Online subscribers are fed from memory through a
//! bounded queue per session; a full queue drops the delivery for that
//! session, counted and logged (QoS 0 semantics for slow consumers until
//! persistent sessions exist).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use edge_store::{AppendError, Store};
use tokio::sync::{Notify, mpsc};

use crate::message::{Message, QoS};
use crate::receipt::Receipt;
use crate::route::Routes;
use crate::topic;

/// Deliveries dropped because a subscriber's queue was full, summarised.
static QUEUE_FULL: edge_log::Summary = edge_log::Summary::new(
    "subscriber queues full: deliveries dropped",
    edge_log::Level::Warn,
);

/// Prefix of the headers the gateway reserves for itself.
pub const RESERVED_HEADER_PREFIX: &str = "x-edge-";

/// Identifies one connected session inside the router.
pub type SessionId = u64;

/// A message on its way to one subscriber, at the QoS granted to it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The store did not take the message (closed while shutting down).
    #[error(transparent)]
    Store(#[from] AppendError),
}

#[derive(Debug)]
struct Session {
    client_id: Arc<str>,
    tx: mpsc::Sender<Delivery>,
    filters: Vec<(String, QoS)>,
    taken_over: Arc<Notify>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    routes: Routes,
    sessions: RwLock<HashMap<SessionId, Session>>,
    next_id: AtomicU64,
}

/// Cheap to clone; one per gateway.
#[derive(Debug, Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl Router {
    pub fn new(store: Store, routes: Routes) -> Router {
        // Exists at zero from the start, for alerts.
        metrics::counter!("edge_messages_dropped_total", "reason" => "subscriber_queue_full")
            .increment(0);
        Router {
            inner: Arc::new(Inner {
                store,
                routes,
                sessions: RwLock::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn routes(&self) -> &Routes {
        &self.inner.routes
    }

    /// Sessions currently registered.
    pub fn session_count(&self) -> usize {
        self.inner
            .sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Registers a session. Its deliveries arrive on the returned receiver,
    /// which holds at most `queue` of them. A session already registered
    /// under the same client id is told it was taken over (MQTT §3.1.4).
    pub fn connect(
        &self,
        client_id: Arc<str>,
        queue: usize,
    ) -> (Subscriber, mpsc::Receiver<Delivery>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let taken_over = Arc::new(Notify::new());
        let mut sessions = self
            .inner
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        for s in sessions.values().filter(|s| s.client_id == client_id) {
            s.taken_over.notify_one();
        }
        sessions.insert(
            id,
            Session {
                client_id: client_id.clone(),
                tx,
                filters: Vec::new(),
                taken_over: taken_over.clone(),
            },
        );
        metrics::gauge!("edge_sessions").set(sessions.len() as f64);
        let subscriber = Subscriber {
            id,
            client_id,
            taken_over,
            router: self.clone(),
        };
        (subscriber, rx)
    }

    /// Routes one message. Waits only while the store's inbox is full
    /// (back-pressure); the receipt resolves once the message is durable.
    pub async fn publish(&self, mut message: Message) -> Result<Receipt, PublishError> {
        // `x-edge-*` headers are the gateway's own bookkeeping (which
        // upstream parked a record, its original seq): a client cannot set them.
        message
            .headers
            .retain(|(key, _)| !key.starts_with(RESERVED_HEADER_PREFIX));
        let logged = message.qos != QoS::AtMostOnce
            || self.inner.routes.matching(&message.topic).next().is_some();
        let record = logged.then(|| message.to_record());
        self.fan_out(message);
        match record {
            Some(record) => Ok(Receipt::Pending(self.inner.store.submit(record).await?)),
            None => Ok(Receipt::Done),
        }
    }

    fn fan_out(&self, message: Message) {
        let sessions = self
            .inner
            .sessions
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut shared: Option<Arc<Message>> = None;
        for (id, session) in sessions.iter() {
            let granted = session
                .filters
                .iter()
                .filter(|(f, _)| topic::matches(f, &message.topic))
                .map(|(_, q)| *q)
                .max();
            let Some(granted) = granted else { continue };
            let delivery = Delivery {
                qos: granted.min(message.qos),
                message: shared
                    .get_or_insert_with(|| Arc::new(message.clone()))
                    .clone(),
            };
            if session.tx.try_send(delivery).is_err() {
                metrics::counter!("edge_messages_dropped_total", "reason" => "subscriber_queue_full").increment(1);
                QUEUE_FULL.record("subscriber_queue_full", || {
                    format!(
                        "session={id} client_id={} topic={}",
                        session.client_id, message.topic
                    )
                });
            }
        }
    }

    fn update(&self, id: SessionId, f: impl FnOnce(&mut Vec<(String, QoS)>)) {
        let mut sessions = self
            .inner
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = sessions.get_mut(&id) {
            f(&mut s.filters);
        }
    }

    fn disconnect(&self, id: SessionId) {
        let mut sessions = self
            .inner
            .sessions
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        sessions.remove(&id);
        metrics::gauge!("edge_sessions").set(sessions.len() as f64);
    }
}

/// A session's registration with the router; dropping it unregisters.
#[derive(Debug)]
pub struct Subscriber {
    id: SessionId,
    client_id: Arc<str>,
    taken_over: Arc<Notify>,
    router: Router,
}

impl Subscriber {
    pub fn id(&self) -> SessionId {
        self.id
    }

    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    /// Adds or replaces a subscription; returns the QoS granted (the one
    /// requested: every QoS is served). `filter` must be valid.
    pub fn subscribe(&self, filter: &str, qos: QoS) -> QoS {
        let granted = qos.min(QoS::ExactlyOnce);
        self.router.update(self.id, |filters| {
            match filters.iter_mut().find(|(f, _)| f == filter) {
                Some(existing) => existing.1 = granted,
                None => filters.push((filter.to_string(), granted)),
            }
        });
        granted
    }

    pub fn unsubscribe(&self, filter: &str) {
        self.router
            .update(self.id, |filters| filters.retain(|(f, _)| f != filter));
    }

    /// Resolves when another connection registered the same client id.
    /// Cancel-safe.
    pub async fn taken_over(&self) {
        self.taken_over.notified().await
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.router.disconnect(self.id);
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use bytes::Bytes;
    use edge_store::StoreOptions;

    use super::*;
    use crate::route::Route;

    fn store(dir: &std::path::Path) -> Store {
        Store::open(
            dir,
            StoreOptions {
                max_bytes: 1 << 20,
                batch_max_messages: NonZeroUsize::new(64).expect("non-zero"),
                batch_max_bytes: NonZeroUsize::new(1 << 20).expect("non-zero"),
                inbox_capacity: NonZeroUsize::new(64).expect("non-zero"),
                cursors: vec![],
                when_full: Default::default(),
                min_free: 0,
            },
        )
        .expect("open store")
    }

    fn route(filter: &str) -> Route {
        Route::new(edge_config::RouteConfig {
            name: "r".into(),
            filter: filter.into(),
            upstream: "up".into(),
            exchange: "amq.topic".into(),
            routing_key: "{topic}".into(),
            priority: 0,
            ttl: None,
            persistent: true,
        })
    }

    fn msg(topic: &str, qos: QoS) -> Message {
        Message::new(topic, Bytes::from_static(b"x"), qos, "pub".into())
    }

    #[tokio::test]
    async fn logs_qos1_and_routed_messages_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let router = Router::new(store(dir.path()), Routes::new(vec![route("up/#")]));

        let r = router
            .publish(msg("local/a", QoS::AtMostOnce))
            .await
            .expect("publish");
        assert!(matches!(r, Receipt::Done), "unrouted QoS 0 is not logged");
        let seq = router
            .publish(msg("local/b", QoS::AtLeastOnce))
            .await
            .expect("publish")
            .await;
        assert_eq!(seq.expect("committed"), Some(1));
        let seq = router
            .publish(msg("up/c", QoS::AtMostOnce))
            .await
            .expect("publish")
            .await;
        assert_eq!(seq.expect("committed"), Some(2));

        let stored = router.store().read(1, 10, 1 << 20).expect("read");
        let topics: Vec<&str> = stored.iter().map(|(_, r)| r.topic.as_str()).collect();
        assert_eq!(topics, ["local/b", "up/c"]);
    }

    #[tokio::test]
    async fn fans_out_once_per_session_at_the_granted_qos() {
        let dir = tempfile::tempdir().expect("tempdir");
        let router = Router::new(store(dir.path()), Routes::default());
        let (sub, mut rx) = router.connect("s".into(), 8);
        assert_eq!(sub.subscribe("a/+", QoS::AtMostOnce), QoS::AtMostOnce);
        assert_eq!(sub.subscribe("a/#", QoS::ExactlyOnce), QoS::ExactlyOnce);
        let (other, mut other_rx) = router.connect("o".into(), 8);
        other.subscribe("b/#", QoS::AtLeastOnce);

        router
            .publish(msg("a/x", QoS::AtLeastOnce))
            .await
            .expect("publish");
        let d = rx.recv().await.expect("delivery");
        assert_eq!(&*d.message.topic, "a/x");
        assert_eq!(d.qos, QoS::AtLeastOnce);
        assert!(rx.try_recv().is_err(), "overlapping filters deliver once");
        assert!(
            other_rx.try_recv().is_err(),
            "non-matching session gets nothing"
        );

        sub.unsubscribe("a/#");
        sub.unsubscribe("a/+");
        router
            .publish(msg("a/y", QoS::AtMostOnce))
            .await
            .expect("publish");
        assert!(rx.try_recv().is_err(), "unsubscribed");
    }

    #[tokio::test]
    async fn clients_cannot_set_reserved_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let router = Router::new(store(dir.path()), Routes::default());
        let mut m = msg("a", QoS::AtLeastOnce);
        m.headers
            .push(("x-edge-upstream".into(), Bytes::from_static(b"other")));
        m.headers
            .push(("content-type".into(), Bytes::from_static(b"text/plain")));
        router
            .publish(m)
            .await
            .expect("publish")
            .await
            .expect("committed");
        let stored = router.store().read(1, 1, 1 << 20).expect("read");
        let keys: Vec<&str> = stored[0]
            .1
            .headers
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["content-type"]);
    }

    #[tokio::test]
    async fn full_subscriber_queue_drops_instead_of_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let router = Router::new(store(dir.path()), Routes::default());
        let (sub, mut rx) = router.connect("slow".into(), 1);
        sub.subscribe("#", QoS::AtMostOnce);
        for _ in 0..3 {
            router
                .publish(msg("t", QoS::AtMostOnce))
                .await
                .expect("publish");
        }
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "only the queue's capacity was kept");
    }

    #[tokio::test]
    async fn same_client_id_takes_over_and_drop_unregisters() {
        let dir = tempfile::tempdir().expect("tempdir");
        let router = Router::new(store(dir.path()), Routes::default());
        let (first, _rx1) = router.connect("dev".into(), 1);
        let (second, _rx2) = router.connect("dev".into(), 1);
        tokio::time::timeout(std::time::Duration::from_secs(5), first.taken_over())
            .await
            .expect("first session is told it was taken over");
        drop(first);
        assert_eq!(router.inner.sessions.read().expect("lock").len(), 1);
        drop(second);
        assert!(router.inner.sessions.read().expect("lock").is_empty());
    }
}
