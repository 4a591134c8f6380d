//! AMQP basic properties ↔ the core's `Message`.
//!
//! For now only the delivery mode travels (persistent ↔ QoS 1); the typed
//! properties of `edge_core::Message` will carry the others.

use amq_protocol::protocol::basic::AMQPProperties;
use edge_core::{Message, QoS};

/// The properties a message is delivered with.
pub(crate) fn of(message: &Message) -> AMQPProperties {
    let mode = if message.qos == QoS::AtMostOnce { 1 } else { 2 };
    AMQPProperties::default().with_delivery_mode(mode)
}

/// Carries a publish's properties into the message.
pub(crate) fn apply(_properties: &AMQPProperties, _message: &mut Message) {}
