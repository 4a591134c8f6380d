//! A message inside the gateway, whichever protocol brought it: the one
//! place its fields are defined. Adapters map their protocol's properties to
//! and from [`Properties`]; the store keeps the bytes of
//! [`Message::to_record`] without looking inside (format in `codec.rs`).

mod codec;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use edge_store::Record;

pub use codec::{DecodeError, EncodeError, FORMAT_VERSION};

/// Delivery guarantee requested by the publisher or granted to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The protocol a message came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// MQTT 3.1, 3.1.1 or 5.0.
    #[default]
    Mqtt = 0,
    /// AMQP 0-9-1 from a local application.
    Amqp = 1,
    /// Consumed from an upstream broker.
    Upstream = 2,
}

impl Protocol {
    fn from_u8(v: u8) -> Option<Protocol> {
        match v {
            0 => Some(Protocol::Mqtt),
            1 => Some(Protocol::Amqp),
            2 => Some(Protocol::Upstream),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Amqp => "amqp",
            Protocol::Upstream => "upstream",
        }
    }
}

/// Who published a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Origin {
    pub protocol: Protocol,
    /// MQTT client id, AMQP connection name, or the name of the
    /// downstream that consumed it from an upstream broker.
    pub publisher: Arc<str>,
}

/// A header or user-property value. MQTT user properties are strings; AMQP
/// field tables carry the rest (integers of every width arrive as `Int`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Void,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// AMQP decimal: `value` × 10^-`scale`.
    Decimal {
        scale: u8,
        value: u32,
    },
    Str(Arc<str>),
    Bytes(Bytes),
    /// Seconds since the Unix epoch (AMQP timestamp).
    Timestamp(u64),
    List(Vec<Value>),
    Table(Vec<(Arc<str>, Value)>),
}

/// The properties both protocols know, each set or not. MQTT 5 and AMQP
/// 0-9-1 map to these (DESIGN.md "Topic mapping"); MQTT 3.1.1 has none.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Properties {
    /// MIME type of the payload (MQTT 5 content type, AMQP content_type).
    pub content_type: Option<Arc<str>>,
    /// AMQP content_encoding (MQTT 5: payload format indicator maps to none).
    pub content_encoding: Option<Arc<str>>,
    /// MQTT 5 correlation data, AMQP correlation_id.
    pub correlation: Option<Bytes>,
    /// MQTT 5 response topic, AMQP reply_to.
    pub reply_to: Option<Arc<str>>,
    /// Absolute expiry, Unix milliseconds (MQTT 5 message expiry interval,
    /// AMQP expiration, both relative on the wire).
    pub expires_at_ms: Option<u64>,
    /// AMQP priority 0–9 (none in MQTT).
    pub priority: Option<u8>,
    /// AMQP delivery_mode 2. MQTT messages of QoS ≥ 1 count as persistent.
    pub persistent: bool,
    /// The publisher's own message id (AMQP message_id).
    pub message_id: Option<Arc<str>>,
    /// AMQP `type`.
    pub kind: Option<Arc<str>>,
    /// AMQP user_id.
    pub user_id: Option<Arc<str>>,
    /// AMQP app_id.
    pub app_id: Option<Arc<str>>,
    /// The publisher's timestamp, Unix seconds (AMQP timestamp).
    pub sent_at: Option<u64>,
    /// MQTT 5 user properties (as `Str`), AMQP headers (any value), in order.
    pub headers: Vec<(Arc<str>, Value)>,
    /// MQTT 5 payload format indicator 1: the payload is UTF-8 text
    /// (checked when it came in; sent on to MQTT 5 subscribers).
    pub payload_utf8: bool,
}

/// A published message. Cheap to clone: strings are shared, the payload is
/// reference-counted `Bytes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// MQTT-style topic name (levels separated by `/`), never a filter.
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub origin: Origin,
    /// Receive time, Unix milliseconds.
    pub timestamp_ms: u64,
    pub properties: Properties,
}

impl Message {
    /// A message received now from an MQTT client (persistent when QoS ≥ 1,
    /// as RabbitMQ's MQTT plugin has it).
    pub fn new(
        topic: impl Into<Arc<str>>,
        payload: Bytes,
        qos: QoS,
        publisher: Arc<str>,
    ) -> Message {
        Message {
            topic: topic.into(),
            payload,
            qos,
            retain: false,
            origin: Origin {
                protocol: Protocol::Mqtt,
                publisher,
            },
            timestamp_ms: now_ms(),
            properties: Properties {
                persistent: qos != QoS::AtMostOnce,
                ..Properties::default()
            },
        }
    }

    /// Who published it.
    pub fn publisher(&self) -> &Arc<str> {
        &self.origin.publisher
    }

    /// True once its absolute expiry has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.properties.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// The encoded message, as the store keeps it.
    pub fn to_record(&self) -> Result<Record, EncodeError> {
        codec::encode(self).map(Record::new)
    }

    /// Decodes a record of any format version this build knows.
    pub fn from_record(record: &Record) -> Result<Message, DecodeError> {
        codec::decode(record.bytes())
    }
}

/// Wall-clock Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
