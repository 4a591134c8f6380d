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
//! - **Routes over a local exchange** (`[[route]] local_exchange`,
//!   `local_routing_key`, `routes.rs`): the pattern becomes a topic
//!   binding's filter under `$amqp/<X>/`, and the upstream routing key is
//!   the publish's own key.
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
//! `connection.blocked` / `connection.unblocked` go to publishing
//! connections whose clients announce the capability, while the store refuses (quota or disk
//! reserve; `blocked.rs`); the socket is not paused meanwhile, publishes
//! are nacked in confirm mode.
//!
//! Metrics (`telemetry.rs`): connections, channels, per-queue depth,
//! bytes and consumers (bounded label cardinality), confirms, exceptions
//! by reply code, messages in and out; `/healthz` gets the listener's
//! address and connection count from [`AmqpListener::open_connections`].
//!
//! Queue argument `x-message-ttl` is served (`queue.rs`, `Flags::expired`).
//! Not yet: `tx`, headers exchanges, exchange-to-exchange bindings, other
//! queue and exchange arguments (all refused, 540), the
//! redelivered flag across restarts, basic.qos `global` (prefetch is per
//! channel either way).

mod args;
mod blocked;
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
mod routes;
mod telemetry;

pub use error::AmqpError;
pub use listener::{AmqpListener, OpenConnections};
pub use routes::{LocalRouteError, local_route_filter, local_routing_key};

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
