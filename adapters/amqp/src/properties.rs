//! AMQP basic properties ↔ the core's `Message`, through the one mapping
//! in `edge_core::amqp` (the upstream client uses it too).

use amq_protocol::protocol::basic::AMQPProperties;
use edge_core::{Message, Protocol, message::now_ms};

/// Properties that cannot be sent (a value over a short string's 255
/// bytes, possible from MQTT 5), summarised.
static UNSENDABLE: edge_log::Summary = edge_log::Summary::new(
    "messages delivered to AMQP without their properties (a value too long for AMQP)",
    edge_log::Level::Warn,
);

/// The properties a message is delivered with: its own, the expiration
/// being what is left of it.
pub(crate) fn of(message: &Message) -> AMQPProperties {
    match edge_core::amqp::to_amqp(&message.properties, now_ms()) {
        Ok(p) => p,
        Err(error) => {
            UNSENDABLE.record("too_long", || format!("topic={} {error}", message.topic));
            let mode = if message.properties.persistent { 2 } else { 1 };
            AMQPProperties::default().with_delivery_mode(mode)
        }
    }
}

/// Carries a publish's properties into the message (origin: AMQP).
pub(crate) fn apply(properties: &AMQPProperties, message: &mut Message) {
    message.properties = edge_core::amqp::from_amqp(properties, message.timestamp_ms);
    message.origin.protocol = Protocol::Amqp;
}
