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
    pub async fn publish(&self, message: Message) -> Result<Receipt, PublishError> {
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
            let message = shared
                .get_or_insert_with(|| Arc::new(message.clone()))
                .clone();
            let delivery = Delivery {
                qos: granted.min(message.qos),
                message,
            };
            if session.tx.try_send(delivery).is_err() {
                metrics::counter!("edge_messages_dropped_total", "reason" => "subscriber_queue_full").increment(1);
                tracing::warn!(session = id, client_id = %session.client_id, "subscriber queue full: delivery dropped");
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

    /// Adds or replaces a subscription; returns the QoS granted (at most 1
    /// until QoS 2 delivery exists). `filter` must be valid.
    pub fn subscribe(&self, filter: &str, qos: QoS) -> QoS {
        let granted = qos.min(QoS::AtLeastOnce);
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
