//! The adapter's metric names, in one place.
//!
//! - `edge_connections{protocol="amqp"}`, `edge_connections_total{protocol="amqp"}`,
//!   `edge_connections_rejected_total{protocol="amqp",reason}`: as the MQTT adapter's.
//! - `edge_amqp_channels`: channels open now.
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
