//! AMQP 0-9-1 server adapter for local applications (pika, lapin, the
//! RabbitMQ clients): frames through amq-protocol's parser and generator,
//! queues on the core's sessions and the store's durable queues, so AMQP
//! and MQTT traffic meet in one routing core.
//!
//! # Mapping onto the core
//!
//! - **A queue is a core session** with client id `amqp:<queue name>`
//!   (`queue.rs`), persistent iff the queue is durable (and not
//!   exclusive): its messages are the session's entries in the store's
//!   durable queue and survive kill -9; its bindings are the session's
//!   filters in the one topic trie. A pump task moves the session's
//!   deliveries into the queue's bounded memory, from where consumers
//!   with credit (prefetch) pull them.
//! - **`amq.topic` is MQTT**: a routing key is the MQTT topic under the
//!   core's lossless mapping (`edge_core::topic`: `.` ↔ `/`, `*` ↔ `+`,
//!   `#` ↔ `#`, `%`-escapes for what would be corrupted), so an AMQP
//!   publish to `amq.topic` reaches MQTT subscribers and an MQTT publish
//!   reaches AMQP queues bound there.
//! - **Every other exchange X** routes in a namespace of the same trie
//!   that MQTT wildcards never match, because it starts with `$`: a publish
//!   with key K becomes the topic `$amqp/<X>/<K>` where X and (for direct
//!   and fanout exchanges) K are each one level, `%`-escaping `%`, `/`, `+`,
//!   `#` and NUL; a topic exchange maps K's words to levels. A direct
//!   binding is the exact filter, a fanout binding `$amqp/<X>/#`, a topic
//!   binding its words with `*` → `+` and a last `#` → `#`. The default
//!   exchange is X = "" with every queue bound by its name. Headers
//!   exchanges are refused (540) until they are implemented.
//! - **Durable exchanges, queues and bindings** are rows of the store's
//!   `definitions` table (`broker.rs`), loaded when the listener starts.
//! - **Publishes** go through `Router::publish`: persistent
//!   (`delivery_mode` 2) as QoS 1, which the store commits before the
//!   receipt resolves (and queues durably for durable queues), transient
//!   as QoS 0. In confirm mode `basic.ack` is sent only once the receipt
//!   says committed, `basic.nack` when the store refused; a publish that
//!   matches no queue, subscriber or route is counted, and returned (312
//!   NO_ROUTE) when mandatory.
//!
//! # Protocol
//!
//! Handshake with PLAIN or AMQPLAIN (user `guest`, password `guest`, over
//! loopback only, until authentication exists) and vhost `/`; tune
//! (channel-max, frame-max, heartbeat; two silent heartbeat intervals
//! close the connection, and so do two intervals, or 30 s without
//! heartbeats, in which the client read nothing of what waits for it); frames larger than frame-max are refused from
//! their 7-byte header (501). Channels: open/close/flow, interleaved
//! content; a method on an unopened channel is 504, content out of order
//! 505. Exceptions use RabbitMQ's reply codes and texts; a channel
//! exception closes that channel only.
//!
//! Queue arguments served (`queue.rs`; every RabbitMQ one is read, compared
//! on a redeclare (406) and kept, `args.rs`):
//! - `x-message-ttl` (`Flags::expired`).
//! - `x-max-priority`: a higher `priority` property is delivered first
//!   (missing: 0, above the maximum: the maximum), arrival order within a
//!   priority, requeued messages back at their place. The order covers the
//!   whole backlog: a durable queue's stored entries beyond its memory
//!   (4096 messages / 32 MiB) are known by priority and seq (up to 262144
//!   of them, `queue/priority.rs`) and read back when their turn comes;
//!   only further back is the store read in arrival order. Consumers wait
//!   while that backlog is read (at start, after a lag); basic.get does
//!   not wait. A transient message that finds a priority queue's memory
//!   full is dropped (counted), as the core drops what a full queue
//!   cannot hold.
//! - `x-single-active-consumer`: only the first registered consumer
//!   receives; when it is cancelled or its channel or connection ends, the
//!   next in registration order does. As in RabbitMQ, a basic.cancel
//!   leaves the cancelled consumer's unacked messages with its channel (to
//!   ack, or to come back when it nacks or closes); an exclusive consume
//!   on such a queue is refused (403).
//! - `x-expires`: a queue without consumers that nobody declared (passive
//!   declares included, as in RabbitMQ) or got from for that long is
//!   deleted as by queue.delete; a durable one's time counts from the
//!   gateway's start. One timer per such queue.
//! - The redelivered flag survives restarts: a durable queue writes the
//!   definition row `amqp/delivered/<queue>` once, before its first
//!   delivery of a run; a clean stop records the stored entries that may
//!   have been delivered (entry state 1) and removes the row. A start that
//!   finds the row (the gateway died after delivering) reports every entry
//!   stored then as redelivered; otherwise only the recorded ones.
//!
//! Not yet: `tx`, headers exchanges, exchange-to-exchange bindings,
//! exchange arguments, the effect of the other queue arguments
//! (`x-max-length`, dead-lettering, `x-delivery-limit`),
//! `connection.blocked`, basic.qos `global` (prefetch is per channel either
//! way).

mod args;
mod broker;
mod channel;
mod codec;
mod connection;
mod convert;
mod error;
mod handshake;
mod listener;
mod logs;
mod methods;
mod properties;
mod queue;
mod telemetry;

pub use error::AmqpError;
pub use listener::AmqpListener;

/// The frame decoder the connections use, reachable from property tests
/// and fuzz targets. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use bytes::BytesMut;

    /// A frame that cannot be read: the reply code of the connection
    /// close (501 or 502) and its text.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DecodeError {
        pub code: u16,
        pub message: String,
    }

    /// Takes the next whole frame off `buf` (its `Display`), `None` until
    /// it is all in; `frame_max` bounds the whole frame.
    pub fn decode(buf: &mut BytesMut, frame_max: u32) -> Result<Option<String>, DecodeError> {
        crate::codec::decode(buf, frame_max)
            .map(|f| f.map(|f| format!("{f:?}")))
            .map_err(|e| DecodeError {
                code: e.reply_code(),
                message: e.to_string(),
            })
    }
}
