//! The adapter's metric names, in one place.
//!
//! - `edge_connections{protocol="amqp"}`, `edge_connections_total{protocol="amqp"}`,
//!   `edge_connections_rejected_total{protocol="amqp",reason}`: as the MQTT adapter's.
//! - `edge_amqp_channels`: channels open now.
//! - `edge_amqp_confirms_total{result="ack"|"nack"}`: publishes confirmed to
//!   clients in confirm mode, one per message (an ack with `multiple`
//!   counts each tag it covers).
//! - `edge_amqp_queues`: queues declared now.
//! - `edge_amqp_queue_messages{queue,state="ready"|"unacked"}`,
//!   `edge_amqp_queue_bytes{queue}` (payload bytes the queue holds in
//!   memory, ready and unacked; a durable queue's backlog still in the store
//!   is counted in `ready`, not here), `edge_amqp_queue_consumers{queue}`:
//!   sampled every second. Label cardinality is bounded: at most
//!   [`QUEUE_SERIES`] queue names get series of their own over the
//!   process's life (first come, server-named `amq.gen-*` queues never),
//!   every other queue is summed under `queue="_other"`; a deleted queue's
//!   series stay, at zero.
//! - `edge_amqp_exceptions_total{scope="channel"|"connection",code}`: exceptions sent,
//!   by the spec's name of the reply code (`NOT_FOUND`, `FRAME_ERROR`, ...).
//! - `edge_amqp_closes_total{reason}`: how connections ended.
//! - `edge_messages_expired_total{protocol}`: as the core's, for a message
//!   that expired in a queue's memory.
//! - `edge_messages_in_total{protocol="amqp"}`, `edge_messages_out_total{protocol="amqp"}`.
//! - `edge_messages_dropped_total{reason="amqp_unroutable"|"amqp_rejected"|"amqp_refused"}`:
//!   a publish no queue, subscriber or route took; a delivery rejected
//!   without requeue (by a queue without a dead-letter exchange); a
//!   publish the store refused (confirm mode: nacked).
//! - `edge_messages_dropped_total{reason="amqp_expired"|"amqp_delivery_limit"}`: a message
//!   that expired or passed `x-delivery-limit` in a queue without a
//!   dead-letter exchange; `amqp_max_length`: one a queue at its limit
//!   dropped (`drop-head`, without a dead-letter exchange) or refused
//!   (`reject-publish`, per queue); `amqp_dead_letter_no_exchange`,
//!   `amqp_dead_letter_unroutable`, `amqp_dead_letter_cycle`: a dead-lettered
//!   message dropped because its dead-letter exchange does not exist, its
//!   copy went nowhere, or it went round in a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::error::{CODES, Scope, name};

pub(crate) const PROTOCOL: &str = "amqp";

/// Counters that exist at zero from the start (alerts can be written first).
pub(crate) fn zero() {
    for code in CODES {
        for scope in ["channel", "connection"] {
            metrics::counter!("edge_amqp_exceptions_total", "scope" => scope, "code" => name(code))
                .increment(0);
        }
    }
    for reason in [
        "amqp_unroutable",
        "amqp_rejected",
        "amqp_refused",
        "amqp_expired",
        "amqp_max_length",
        "amqp_delivery_limit",
        "amqp_dead_letter_no_exchange",
        "amqp_dead_letter_unroutable",
        "amqp_dead_letter_cycle",
    ] {
        metrics::counter!("edge_messages_dropped_total", "reason" => reason).increment(0);
    }
    metrics::counter!("edge_connections_rejected_total", "protocol" => PROTOCOL, "reason" => "max_connections")
        .increment(0);
    metrics::gauge!("edge_amqp_channels").increment(0.0);
    for result in ["ack", "nack"] {
        metrics::counter!("edge_amqp_confirms_total", "result" => result).increment(0);
    }
}

/// Publishes confirmed to a client: `n` acks, or one nack.
pub(crate) fn confirmed(acked: bool, n: u64) {
    let result = if acked { "ack" } else { "nack" };
    metrics::counter!("edge_amqp_confirms_total", "result" => result).increment(n);
}

/// Queue names with series of their own, at most, over the process's life.
pub(crate) const QUEUE_SERIES: usize = 64;
/// The series every other queue is summed under.
const OTHER_QUEUES: &str = "_other";
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// One series' figures.
#[derive(Debug, Default, Clone, Copy)]
struct Depth {
    ready: u64,
    unacked: u64,
    bytes: u64,
    consumers: u64,
}

/// Sets the queue gauges every second until `stop`. Holds a queue only
/// while sampling it, never across an await, so that closing the broker
/// finds itself the last owner once this task has ended.
pub(crate) async fn sample_queues(broker: Weak<Broker>, stop: CancellationToken) {
    let mut named: BTreeSet<Arc<str>> = BTreeSet::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(broker) = broker.upgrade() else {
            return;
        };
        let queues = broker.queues();
        drop(broker);
        // Every name ever given a series is set, at zero once it is gone.
        let mut depths: BTreeMap<Arc<str>, Depth> = named
            .iter()
            .map(|n| (Arc::clone(n), Depth::default()))
            .collect();
        depths.insert(OTHER_QUEUES.into(), Depth::default());
        metrics::gauge!("edge_amqp_queues").set(queues.len() as f64);
        for q in queues {
            let own = named.contains(&q.name)
                || (named.len() < QUEUE_SERIES && !q.name.starts_with("amq.gen-"));
            let label = if own {
                named.insert(Arc::clone(&q.name));
                Arc::clone(&q.name)
            } else {
                OTHER_QUEUES.into()
            };
            let (unacked, bytes) = q.held();
            let d = depths.entry(label).or_default();
            d.ready += u64::from(q.message_count());
            d.unacked += unacked as u64;
            d.bytes += bytes as u64;
            d.consumers += u64::from(q.consumer_count());
        }
        for (queue, d) in depths {
            let queue = queue.to_string();
            metrics::gauge!("edge_amqp_queue_messages", "queue" => queue.clone(), "state" => "ready")
                .set(d.ready as f64);
            metrics::gauge!("edge_amqp_queue_messages", "queue" => queue.clone(), "state" => "unacked")
                .set(d.unacked as f64);
            metrics::gauge!("edge_amqp_queue_bytes", "queue" => queue.clone()).set(d.bytes as f64);
            metrics::gauge!("edge_amqp_queue_consumers", "queue" => queue).set(d.consumers as f64);
        }
    }
}

pub(crate) fn exception(scope: Scope, code: u16) {
    let scope = match scope {
        Scope::Channel => "channel",
        Scope::Connection => "connection",
    };
    metrics::counter!("edge_amqp_exceptions_total", "scope" => scope, "code" => name(code))
        .increment(1);
}

pub(crate) fn dropped(reason: &'static str, n: u64) {
    metrics::counter!("edge_messages_dropped_total", "reason" => reason).increment(n);
}

pub(crate) fn channels(delta: f64) {
    metrics::gauge!("edge_amqp_channels").increment(delta);
}

pub(crate) fn message_in() {
    metrics::counter!("edge_messages_in_total", "protocol" => PROTOCOL).increment(1);
}

pub(crate) fn message_out() {
    metrics::counter!("edge_messages_out_total", "protocol" => PROTOCOL).increment(1);
}

/// A message whose expiry passed while it waited in a queue.
pub(crate) fn expired(message: &edge_core::Message) {
    metrics::counter!("edge_messages_expired_total", "protocol" => message.origin.protocol.as_str())
        .increment(1);
}

pub(crate) fn closed(reason: &'static str) {
    metrics::counter!("edge_amqp_closes_total", "reason" => reason).increment(1);
}
