//! MQTT 3.1.1 server adapter: decodes client packets with rumqttd's
//! `protocol` codec, publishes into the [`edge_core::Router`], acknowledges
//! QoS 1/2 publishes only once they are committed to the store, and writes
//! the router's deliveries back to subscribers.
//!
//! MQTT 3.1 and 5 clients are refused with CONNACK 0x01; persistent
//! sessions, retained messages, wills and authentication are not served yet.

mod codec;
mod connection;
mod error;
mod listener;
mod outbox;
mod session;

pub use error::MqttError;
pub use listener::MqttListener;
