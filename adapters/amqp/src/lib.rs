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
//!   reaches AMQP queues bound there. A publish to `amq.topic` with an
//!   `x-mqtt-topic` header (a valid topic outside `$amqp/`) has that MQTT
//!   topic, and the routing key's topic as an extra topic, so bindings
//!   still match the key (`convert::named_mqtt_topic`).
//! - **Every other exchange X** routes in a namespace of the same trie
//!   that MQTT wildcards never match, because it starts with `$`: a publish
//!   with key K becomes the topic `$amqp/<X>/<K>` where X and (for direct
//!   and fanout exchanges) K are each one level, `%`-escaping `%`, `/`, `+`,
//!   `#` and NUL; a topic exchange maps K's words to levels. A direct
//!   binding is the exact filter, a fanout binding `$amqp/<X>/#`, a topic
//!   binding its words with `*` → `+` and a last `#` → `#`. The default
//!   exchange is X = "" with every queue bound by its name.
//! - **What the trie cannot match is evaluated here** (`bindings.rs`) and
//!   handed to the core as extra topics of one publish
//!   (`Router::publish_to`: each queue once, stored once). A **headers
//!   exchange** X publishes to `$amqp/<X>/<K>` (K one level, which no
//!   filter matches); every queue Q bound to it has the one filter
//!   `$amqp/<X>/%headers/<Q>` (a level no publish has), and a publish
//!   whose headers match one of Q's bindings (`x-match` `all`, the
//!   default, `any`, `all-with-x`, `any-with-x`; a void value asks for
//!   presence; `x-` keys count only in the `-with-x` variants) also goes to
//!   that topic. **Exchange-to-exchange bindings**: a publish to S with
//!   key K also goes to the topic of K on every exchange D bound to S
//!   whose binding matches under S's type (headers too), and on from D,
//!   each exchange visited once (cycles end). When that reaches
//!   `amq.topic`, the message's own topic is the MQTT topic of K there (so
//!   MQTT subscribers see their topic), and AMQP consumers see it as from
//!   `amq.topic` (RabbitMQ would name the exchange it was published to).
//!   A binding is identified by source, destination, key and arguments.
//!   An auto-delete exchange goes when it stops being the source of any
//!   binding; deleting an exchange removes the bindings it is the source
//!   or destination of.
//! - **Routes over a local exchange** (`[[route]] local_exchange`,
//!   `local_routing_key`, `routes.rs`): the pattern becomes a topic
//!   binding's filter under `$amqp/<X>/`, and the upstream routing key is
//!   the publish's own key.
//! - **Durable exchanges, queues and bindings** are rows of the store's
//!   `definitions` table (`broker.rs`), loaded when the listener starts; a
//!   binding with its arguments (`broker/rows.rs`), an exchange binding
//!   when both exchanges are durable.
//! - **Publishes** go through `Router::publish`: persistent
//!   (`delivery_mode` 2) as QoS 1, which the store commits before the
//!   receipt resolves (and queues durably for durable queues), transient
//!   as QoS 0. In confirm mode `basic.ack` is sent only once the receipt
//!   says committed, `basic.nack` when the store refused; a publish that
//!   matches no queue, subscriber or route (by any path) is counted, and
//!   returned (312 NO_ROUTE) when mandatory.
//! - **Transactions** (`tx.rs`): on a channel after `tx.select`,
//!   publishes, acks, nacks and rejects are held (at most 16 Ki of them
//!   and 32 MiB of bodies per channel, 32 MiB of bodies over all channels
//!   of a connection, 406 beyond) until `tx.commit`, which performs
//!   them in order and answers commit-ok once every held publish is
//!   committed to the store (406 `partial tx completion` if one was
//!   refused); a held publish whose exchange went away closes the channel
//!   (404) and the acks held after it are not performed (the close
//!   requeues those deliveries, as RabbitMQ); `tx.rollback` discards the publishes and leaves the
//!   deliveries it settled unacknowledged (redelivered once recovered or
//!   the channel closes), as RabbitMQ. Confirm and tx mode exclude each
//!   other (406), commit or rollback without select is 406.
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
//! # Queue arguments served
//!
//! Every RabbitMQ queue argument is read, compared on a redeclare (406)
//! and kept with a durable queue (`args.rs`). In effect:
//!
//! - `x-message-ttl` and the per-message `expiration` (`queue.rs`,
//!   `Flags::expired`): an expired message dies when it reaches the head
//!   of its priority in its queue (the pump wakes for the earliest such
//!   expiry) or when a consumer would have got it. (RabbitMQ's priority
//!   queues expire only at the head of the whole queue, so expired lower
//!   priorities wait behind live higher ones; here they die on time.)
//! - `x-max-priority` (`queue/priority.rs`): a higher `priority` property
//!   is delivered first (missing: 0, above the maximum: the maximum),
//!   arrival order within a priority, requeued messages back at their
//!   place. The order covers the whole backlog: a durable queue's stored
//!   entries beyond its memory (4096 messages / 32 MiB) are known by
//!   priority and seq (up to 262144 of them) and read back when their turn
//!   comes; only further back is the store read in arrival order.
//!   Consumers wait while that backlog is read (at start, after a lag);
//!   basic.get does not wait. A transient message that finds a priority
//!   queue's memory full is dropped (counted, `amqp_queue_full`, and
//!   summarised in the log), as the core drops what a full queue cannot
//!   hold.
//! - `x-single-active-consumer`: only the first registered consumer
//!   receives; when it is cancelled or its channel or connection ends, the
//!   next in registration order does. As in RabbitMQ, a basic.cancel
//!   leaves the cancelled consumer's unacked messages with its channel (to
//!   ack, or to come back when it nacks or closes; with a delivery limit
//!   each such return counts); an exclusive consume on such a queue is
//!   refused (403).
//! - `x-expires`: a queue without consumers that nobody declared (passive
//!   declares included, as in RabbitMQ) or got from for that long is
//!   deleted as by queue.delete; a durable one's time counts from the
//!   gateway's start. One timer per such queue.
//! - `x-max-length`, `x-max-length-bytes` (ready messages and their
//!   payload bytes, not unacknowledged ones) with `x-overflow`:
//!   `drop-head` drops (dead-letters, reason `maxlen`) the head after each
//!   arrival: the oldest message, of a priority queue the oldest of the
//!   highest priority (as RabbitMQ), read back from the store if spilled;
//!   `reject-publish` refuses the message for that queue at publish time
//!   (`limits.rs`: the core session's `Gate`, so other queues still get
//!   it) and a confirming publisher gets `basic.nack`;
//!   `reject-publish-dlx` also dead-letters the refused message. Each
//!   refusal is counted (`amqp_max_length`) and summarised in the log; a
//!   dead-lettered copy is refused the same way (dropped when every target
//!   refused it, as RabbitMQ's at-most-once dead-lettering does).
//! - `x-dead-letter-exchange`, `x-dead-letter-routing-key`
//!   (`dead_letter.rs`): rejected or nacked without requeue, expired,
//!   dropped at the length limit or past the delivery limit, a message is
//!   published to the dead-letter exchange with RabbitMQ's `x-death`,
//!   `x-first-death-*` and `x-last-death-*` headers; its store entry is
//!   acknowledged only once that copy is committed (at least once). A
//!   copy the store refuses (full, or failing) is published again every
//!   second, its message held by the queue (not ready) meanwhile.
//!   Cycles without a rejection, a missing exchange and copies routed
//!   nowhere are dropped, counted; so is a message of a queue without a
//!   dead-letter exchange (`amqp_rejected`, `amqp_expired`,
//!   `amqp_max_length`, `amqp_delivery_limit`). Every drop is also
//!   summarised in the log (one line per reason per interval).
//! - `x-delivery-limit` (quorum queues: 20 unless declared): a message
//!   returned to its queue more often dies (reason `delivery_limit`);
//!   redeliveries from such a queue carry `x-delivery-count`. A durable
//!   queue records the count in its store entry (so it holds across
//!   restarts; a delivery unacknowledged at a crash is not counted as
//!   returned).
//!
//! The redelivered flag survives restarts (`queue/delivered.rs`): a
//! durable queue writes the definition row `amqp/delivered/<queue>` once,
//! before its first delivery of a run; a clean stop records the stored
//! entries that may have been delivered (the `DELIVERED` bit of the entry
//! state, whose other bits are the delivery limit's return count) and
//! removes the row. A start that finds the row (the gateway died after
//! delivering) reports every entry stored then as redelivered; otherwise
//! only the recorded ones (and those with returns).
//!
//! Dead-lettering publishes the copy with the dead-letter routing key (or
//! the original one) only, not the original's CC/BCC keys; a copy that
//! reaches several queues, some in a cycle, goes to all of them (RabbitMQ
//! leaves out the cycling ones).
//!
//! `connection.blocked` / `connection.unblocked` go to publishing
//! connections whose clients announce the capability, while the store
//! refuses (quota or disk reserve; `blocked.rs`), as RabbitMQ blocks only
//! publishers; the socket is not paused meanwhile, publishes are nacked in
//! confirm mode.
//!
//! Metrics (`telemetry.rs`): connections, channels, per-queue depth,
//! bytes and consumers (bounded label cardinality), confirms, exceptions
//! by reply code, messages in and out; `/healthz` gets the listener's
//! address and connection count from [`AmqpListener::open_connections`].
//!
//! Not yet: exchange arguments (`alternate-exchange`; refused, 540).
//!
//! `basic.qos` reads `global` as RabbitMQ does: false limits each consumer
//! created afterwards, true the channel as a whole (both may apply).

mod args;
mod bindings;
mod blocked;
mod broker;
mod channel;
mod codec;
mod connection;
mod convert;
mod dead_letter;
mod error;
mod handshake;
mod limits;
mod listener;
mod logs;
mod methods;
mod permissions;
mod properties;
mod queue;
mod routes;
mod telemetry;
mod tx;

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
