//! A message inside the gateway, whichever protocol brought it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use edge_store::Record;

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

/// A published message. Cheap to clone: topic and publisher are shared,
/// the payload is reference-counted `Bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// MQTT-style topic name (levels separated by `/`), never a filter.
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Who published it: MQTT client id or AMQP connection name.
    pub publisher: Arc<str>,
    /// Receive time, Unix milliseconds.
    pub timestamp_ms: u64,
    /// Protocol properties carried along (v5 user properties, content type, ...).
    pub headers: Vec<(String, Bytes)>,
}

impl Message {
    /// A message received now.
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
            publisher,
            timestamp_ms: now_ms(),
            headers: Vec::new(),
        }
    }

    pub fn to_record(&self) -> Record {
        Record {
            timestamp_ms: self.timestamp_ms,
            qos: self.qos as u8,
            retain: self.retain,
            topic: self.topic.to_string(),
            publisher: self.publisher.to_string(),
            headers: self.headers.clone(),
            payload: self.payload.clone(),
        }
    }

    pub fn from_record(r: Record) -> Message {
        Message {
            topic: r.topic.into(),
            payload: r.payload,
            qos: QoS::from_u8(r.qos).unwrap_or(QoS::AtLeastOnce),
            retain: r.retain,
            publisher: r.publisher.into(),
            timestamp_ms: r.timestamp_ms,
            headers: r.headers,
        }
    }
}

/// Wall-clock Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
