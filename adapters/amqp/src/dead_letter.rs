//! Dead-lettering, as RabbitMQ does it: a message a queue lets go of
//! without delivering it (rejected or nacked without requeue, expired,
//! dropped or refused at `x-max-length`, returned more often than
//! `x-delivery-limit`) is published again to the queue's
//! `x-dead-letter-exchange`, with `x-dead-letter-routing-key` or else its
//! original routing key, and RabbitMQ's death headers:
//!
//! - `x-death`: an array of tables, the latest death first, one per
//!   (queue, reason): `count`, `reason`, `queue`, `time`, `exchange`,
//!   `routing-keys` and, when the message had one, `original-expiration`
//!   (the per-message `expiration` property is removed);
//! - `x-first-death-reason`, `-queue`, `-exchange` (set once) and
//!   `x-last-death-reason`, `-queue`, `-exchange` (RabbitMQ 3.13+).
//!
//! The original exchange and routing key come from the message's topic
//! (`convert::origin_of`). A dead-lettered copy goes through the router
//! like a publish; the queue acknowledges its store entry only once the
//! copy's receipt says committed (at least once: a crash in between
//! duplicates, never loses). A copy the store refuses for room or by
//! failing is published again after a pause (`run`), its entry held by
//! the queue until then. A dead-letter exchange that does not exist,
//! a copy that goes nowhere and a cycle (the copy would only reach queues
//! it died in before for an automatic reason, with no rejection since)
//! drop the message, counted and summarised. A full `reject-publish`
//! target refuses the copy like a publish (`Broker::refused`: counted as
//! `amqp_max_length`, summarised, dead-lettered onward by a
//! `reject-publish-dlx` queue).

use std::sync::Arc;

use std::sync::Weak;

use edge_core::{Message, PublishError, Receipt, Seq, Value};
use tokio::sync::mpsc;

use crate::args::QueueArgs;
use crate::broker::Broker;
use crate::convert;
use crate::queue::Queue;

/// Why a message left its queue dead (RabbitMQ's reason names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    Rejected,
    Expired,
    Maxlen,
    DeliveryLimit,
}

impl Reason {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::Maxlen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Dead-lettered messages dropped, summarised.
pub(crate) static DROPPED: edge_log::Summary = edge_log::Summary::new(
    "dead-lettered AMQP messages dropped (no such exchange, routed nowhere, or a cycle)",
    edge_log::Level::Warn,
);

const X_DEATH: &str = "x-death";

fn str_value(s: &str) -> Value {
    Value::Str(s.into())
}

fn field<'a>(table: &'a [(Arc<str>, Value)], name: &str) -> Option<&'a Value> {
    table.iter().find(|(k, _)| &**k == name).map(|(_, v)| v)
}

fn set(headers: &mut Vec<(Arc<str>, Value)>, name: &str, value: Value) {
    match headers.iter_mut().find(|(k, _)| &**k == name) {
        Some((_, v)) => *v = value,
        None => headers.push((name.into(), value)),
    }
}

/// The message's earlier deaths (the `x-death` tables).
fn deaths(message: &Message) -> impl Iterator<Item = &[(Arc<str>, Value)]> {
    let list = match field(&message.properties.headers, X_DEATH) {
        Some(Value::List(list)) => list.as_slice(),
        _ => &[],
    };
    list.iter().filter_map(|v| match v {
        Value::Table(t) => Some(t.as_slice()),
        _ => None,
    })
}

fn is_str(v: Option<&Value>, s: &str) -> bool {
    matches!(v, Some(Value::Str(v)) if &**v == s)
}

/// Whether dead-lettering `message` into `queue` closes a cycle: it died
/// in `queue` before, and never by rejection (RabbitMQ's rule).
pub(crate) fn is_cycle(message: &Message, queue: &str) -> bool {
    let mut seen = false;
    for d in deaths(message) {
        if is_str(field(d, "reason"), Reason::Rejected.name()) {
            return false;
        }
        seen |= is_str(field(d, "queue"), queue);
    }
    seen
}

/// The copy of `message` that dies in `queue` for `reason` at `now_ms`,
/// to be published with `key` on the dead-letter exchange's `topic`.
pub(crate) fn copy(
    message: &Message,
    queue: &str,
    reason: Reason,
    topic: String,
    now_ms: u64,
) -> Message {
    let (exchange, routing_key) = convert::origin_of(&message.topic);
    let mut properties = message.properties.clone();
    let original_expiration = properties
        .expires_at_ms
        .take()
        .map(|at| at.saturating_sub(message.timestamp_ms));
    let headers = &mut properties.headers;
    let mut list = match headers.iter().position(|(k, _)| &**k == X_DEATH) {
        Some(i) => match headers.remove(i).1 {
            Value::List(list) => list,
            _ => Vec::new(),
        },
        None => Vec::new(),
    };
    let same = list.iter().position(|v| {
        matches!(v, Value::Table(t)
            if is_str(field(t, "queue"), queue) && is_str(field(t, "reason"), reason.name()))
    });
    let time = Value::Timestamp(now_ms / 1000);
    let entry = match same.map(|i| list.remove(i)) {
        Some(Value::Table(mut t)) => {
            let count = match field(&t, "count") {
                Some(Value::Int(n)) => n.saturating_add(1),
                _ => 1,
            };
            set(&mut t, "count", Value::Int(count));
            set(&mut t, "time", time);
            t
        }
        _ => {
            let mut t: Vec<(Arc<str>, Value)> = vec![
                ("count".into(), Value::Int(1)),
                ("reason".into(), str_value(reason.name())),
                ("queue".into(), str_value(queue)),
                ("time".into(), time),
                ("exchange".into(), str_value(&exchange)),
                (
                    "routing-keys".into(),
                    Value::List(vec![str_value(&routing_key)]),
                ),
            ];
            if let Some(ms) = original_expiration {
                t.push(("original-expiration".into(), str_value(&ms.to_string())));
            }
            t
        }
    };
    list.insert(0, Value::Table(entry));
    headers.push((X_DEATH.into(), Value::List(list)));
    for (name, value) in [
        ("reason", reason.name()),
        ("queue", queue),
        ("exchange", exchange.as_str()),
    ] {
        let first = format!("x-first-death-{name}");
        if field(headers, &first).is_none() {
            headers.push((first.into(), str_value(value)));
        }
        set(headers, &format!("x-last-death-{name}"), str_value(value));
    }
    Message {
        topic: topic.into(),
        payload: message.payload.clone(),
        qos: message.qos,
        retain: false,
        origin: message.origin.clone(),
        // A queue's TTL counts from when the copy arrives there.
        timestamp_ms: now_ms,
        properties,
    }
}

/// The routing key a message dead-lettered with `dl_key` goes with: that
/// key, else its own.
pub(crate) fn routing_key(message: &Message, dl_key: Option<&str>) -> String {
    match dl_key {
        Some(key) => key.to_string(),
        None => convert::origin_of(&message.topic).1,
    }
}

impl Broker {
    /// Publishes the dead-lettered copy of a message that died in
    /// `queue`: the copy's receipt, `None` when it is dropped (no
    /// dead-letter exchange; or counted: see the module doc).
    pub(crate) async fn dead_letter(
        &self,
        queue: &str,
        args: &QueueArgs,
        message: &Message,
        reason: Reason,
    ) -> Result<Option<Receipt>, PublishError> {
        let Some(dlx) = args.dead_letter_exchange.as_deref() else {
            return Ok(None);
        };
        let drop = |why: &'static str, detail: &dyn Fn() -> String| {
            crate::telemetry::dropped(why, 1);
            DROPPED.record(why, detail);
            Ok(None)
        };
        let key = routing_key(message, args.dead_letter_routing_key.as_deref());
        if self.exchange(dlx).is_err() {
            return drop("amqp_dead_letter_no_exchange", &|| {
                format!("queue={queue:?} x-dead-letter-exchange={dlx:?}: no such exchange")
            });
        }
        let now = edge_core::message::now_ms();
        // The copy's headers (x-death among them) are what a headers
        // exchange or binding matches.
        let mut copy = copy(message, queue, reason, String::new(), now);
        let headers = crate::properties::of(&copy).headers().clone();
        let resolved = match self.route(dlx, &key, headers.as_ref()) {
            Ok((_, resolved)) => resolved,
            Err(_) => {
                return drop("amqp_dead_letter_no_exchange", &|| {
                    format!("queue={queue:?} x-dead-letter-exchange={dlx:?}: no such exchange")
                });
            }
        };
        let topics = || {
            resolved
                .topic
                .iter()
                .chain(resolved.also.iter())
                .map(String::as_str)
        };
        let routed = resolved.topic.is_some() && self.router().is_routed_any(topics());
        let Some(topic) = resolved.topic.clone().filter(|_| routed) else {
            return drop("amqp_dead_letter_unroutable", &|| {
                format!("queue={queue:?} exchange={dlx:?} routing_key={key:?}")
            });
        };
        copy.topic = topic.into();
        let targets = self.queues_for(&topics().collect::<Vec<_>>());
        if !targets.is_empty() && targets.iter().all(|q| is_cycle(&copy, q)) {
            return drop("amqp_dead_letter_cycle", &|| {
                format!("queue={queue:?} exchange={dlx:?}: dead-lettered in a cycle")
            });
        }
        let gated = self.router().publish_gated(copy, &resolved.also).await?;
        if let Some(refused) = gated.refused {
            // A full `reject-publish` target does not take it (nor does
            // RabbitMQ's, dead-lettering at most once); when every target
            // refused, the copy is gone: counted and logged as dropped.
            let all = refused.sessions.len() >= targets.len();
            self.refused(refused, &|| {
                format!(
                    "dead-lettered from queue={queue:?} via exchange={dlx:?}{}",
                    if all { ", dropped" } else { "" }
                )
            });
        }
        Ok(Some(gated.receipt))
    }
}

/// A message leaving its queue dead, for the dead-letter task.
#[derive(Debug)]
pub(crate) struct Dead {
    pub message: Arc<Message>,
    pub seq: Option<Seq>,
    pub reason: Reason,
}

/// Messages dead-lettered at once, at most (their copies are committed
/// together).
const DEAD_BATCH: usize = 64;

/// How long the dead-letter task waits before it publishes again the
/// copies the store refused (full, or failing).
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Dead-lettered copies the store refused, retried, summarised.
pub(crate) static RETRYING: edge_log::Summary = edge_log::Summary::new(
    "dead-lettered AMQP messages the store refused (full or failing); retried every second",
    edge_log::Level::Warn,
);

/// The queue's dead-letter task: publishes the dead messages' copies in
/// order, then acknowledges their store entries (at least once). Copies
/// the store refuses for room or by failing are published again after a
/// pause ([`RETRY`]), their entries held by the queue meanwhile (so they
/// count neither as ready nor as stored beyond memory); a copy that can
/// never be stored is dropped, counted. At shutdown, entries not yet
/// dead-lettered stay in the store for the next start.
pub(crate) async fn run(
    queue: Weak<Queue>,
    broker: Weak<Broker>,
    mut graves: mpsc::UnboundedReceiver<Dead>,
) {
    let mut batch = Vec::with_capacity(DEAD_BATCH);
    loop {
        if batch.is_empty() {
            if graves.recv_many(&mut batch, DEAD_BATCH).await == 0 {
                return;
            }
        } else {
            // Refused last time: after a pause, with what came since.
            let Some(stop) = queue.upgrade().map(|q| q.stopping()) else {
                return;
            };
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = stop.cancelled() => return,
            }
            while batch.len() < DEAD_BATCH {
                match graves.try_recv() {
                    Ok(d) => batch.push(d),
                    Err(_) => break,
                }
            }
        }
        let (Some(q), Some(broker)) = (queue.upgrade(), broker.upgrade()) else {
            return;
        };
        // Published in order, then their commits awaited together.
        let mut receipts = Vec::with_capacity(batch.len());
        for d in &batch {
            receipts.push(
                broker
                    .dead_letter(&q.name, &q.flags.args, &d.message, d.reason)
                    .await,
            );
        }
        let mut done = Vec::new();
        let mut again = Vec::new();
        for (d, receipt) in batch.drain(..).zip(receipts) {
            let outcome = match receipt {
                Ok(Some(receipt)) => receipt.await.map(Some),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(published) => {
                    if published.is_none() && q.flags.args.dead_letter_exchange.is_none() {
                        let why = match d.reason {
                            Reason::Rejected => "amqp_rejected",
                            Reason::Expired => "amqp_expired",
                            Reason::Maxlen => "amqp_max_length",
                            Reason::DeliveryLimit => "amqp_delivery_limit",
                        };
                        crate::logs::dropped(why, 1, || {
                            format!("queue={:?}: no dead-letter exchange", q.name)
                        });
                    }
                    done.extend(d.seq);
                }
                // Shutting down: the entry stays for the next start.
                Err(PublishError::Closed) => return,
                Err(error @ PublishError::Invalid(_)) => {
                    crate::telemetry::dropped("amqp_dead_letter_invalid", 1);
                    DROPPED.record("amqp_dead_letter_invalid", || {
                        format!("queue={:?}: {error}", q.name)
                    });
                    done.extend(d.seq);
                }
                Err(error) => {
                    RETRYING.record(error.reason(), || format!("queue={:?}: {error}", q.name));
                    again.push(d);
                }
            }
        }
        q.buried(done).await;
        batch = again;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use edge_core::QoS;

    fn table(v: &Value) -> &[(Arc<str>, Value)] {
        match v {
            Value::Table(t) => t,
            other => panic!("not a table: {other:?}"),
        }
    }

    #[test]
    fn deaths_are_counted_per_queue_and_reason_latest_first() {
        let mut m = Message::new(
            "$amqp/orders/new",
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            "p".into(),
        );
        m.properties.expires_at_ms = Some(m.timestamp_ms + 5_000);
        let once = copy(&m, "work", Reason::Expired, "$amqp/dlx/new".into(), 10_000);
        assert_eq!(once.properties.expires_at_ms, None);
        let list = match field(&once.properties.headers, X_DEATH) {
            Some(Value::List(l)) => l.clone(),
            other => panic!("{other:?}"),
        };
        let d = table(&list[0]);
        assert_eq!(field(d, "count"), Some(&Value::Int(1)));
        assert!(is_str(field(d, "exchange"), "orders"));
        assert!(is_str(field(d, "original-expiration"), "5000"));
        assert_eq!(
            field(d, "routing-keys"),
            Some(&Value::List(vec![str_value("new")]))
        );
        assert!(is_cycle(&once, "work"));
        assert!(!is_cycle(&once, "other"));
        let twice = copy(&once, "dlq", Reason::Rejected, "$amqp/x/new".into(), 11_000);
        assert!(!is_cycle(&twice, "work"), "a rejection breaks the cycle");
        let again = copy(
            &twice,
            "work",
            Reason::Expired,
            "$amqp/dlx/new".into(),
            12_000,
        );
        let list = match field(&again.properties.headers, X_DEATH) {
            Some(Value::List(l)) => l.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(list.len(), 2);
        assert_eq!(field(table(&list[0]), "count"), Some(&Value::Int(2)));
        assert!(is_str(field(table(&list[1]), "queue"), "dlq"));
        let h = &again.properties.headers;
        assert!(is_str(field(h, "x-first-death-queue"), "work"));
        assert!(is_str(field(h, "x-first-death-reason"), "expired"));
        assert!(is_str(field(h, "x-last-death-reason"), "expired"));
        assert!(is_str(field(h, "x-last-death-exchange"), "x"));
    }
}
