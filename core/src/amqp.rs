//! [`Properties`] ↔ AMQP 0-9-1 basic properties: the one mapping, used by
//! the upstream client (lapin) and the AMQP server alike (both on
//! amq-protocol's types), so a property means the same on every path.
//!
//! - `expiration` is relative milliseconds on the wire and absolute
//!   ([`Properties::expires_at_ms`]) inside; an unparsable one is dropped.
//! - `delivery_mode` 2 is [`Properties::persistent`].
//! - `correlation_id` is a short string; correlation data that is not UTF-8
//!   or longer than 255 bytes (possible from MQTT 5) travels in the header
//!   [`CORRELATION_HEADER`] instead, and comes back from it.
//! - Integers of every width become [`Value::Int`] (and go out as
//!   long-long-int); `ShortString` values become `Str`; byte arrays `Bytes`.

use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use bytes::Bytes;

use crate::message::{Properties, Value};

/// Header for correlation data that cannot be a `correlation_id`.
pub const CORRELATION_HEADER: &str = "x-correlation-data";

/// A property value too long for an AMQP short string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {len} bytes, AMQP allows 255")]
pub struct TooLong {
    pub field: &'static str,
    pub len: usize,
}

/// `value` as an AMQP short string.
pub fn short(field: &'static str, value: &str) -> Result<ShortString, TooLong> {
    ShortString::try_new(value).map_err(|_| TooLong {
        field,
        len: value.len(),
    })
}

pub fn value_to_amqp(value: &Value) -> AMQPValue {
    match value {
        Value::Void => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Int(i) => AMQPValue::LongLongInt(*i),
        Value::Float(f) => AMQPValue::Double(*f),
        Value::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        Value::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        Value::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.to_vec())),
        Value::Timestamp(t) => AMQPValue::Timestamp(*t),
        Value::List(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(value_to_amqp(item));
            }
            AMQPValue::FieldArray(array)
        }
        Value::Table(entries) => {
            let mut table = FieldTable::default();
            for (key, value) in entries {
                // Keys over 255 bytes cannot be AMQP field names: left out.
                if let Ok(key) = ShortString::try_new(key.to_string()) {
                    table.insert(key, value_to_amqp(value));
                }
            }
            AMQPValue::FieldTable(table)
        }
    }
}

pub fn value_from_amqp(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => Value::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => Value::Int(*i),
        AMQPValue::Float(f) => Value::Float(f64::from(*f)),
        AMQPValue::Double(f) => Value::Float(*f),
        AMQPValue::DecimalValue(d) => Value::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => Value::Str(Arc::from(s.as_str())),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => Value::Str(Arc::from(text)),
            Err(_) => Value::Bytes(Bytes::copy_from_slice(s.as_bytes())),
        },
        AMQPValue::FieldArray(items) => {
            Value::List(items.as_slice().iter().map(value_from_amqp).collect())
        }
        AMQPValue::Timestamp(t) => Value::Timestamp(*t),
        AMQPValue::FieldTable(table) => Value::Table(headers_from_table(table)),
        AMQPValue::ByteArray(b) => Value::Bytes(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => Value::Void,
    }
}

pub fn headers_from_table(table: &FieldTable) -> Vec<(Arc<str>, Value)> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (Arc::from(k.as_str()), value_from_amqp(v)))
        .collect()
}

/// The properties of an AMQP publish received at `now_ms`.
pub fn from_amqp(p: &BasicProperties, now_ms: u64) -> Properties {
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| Arc::from(s.as_str()));
    let mut headers = p
        .headers()
        .as_ref()
        .map(headers_from_table)
        .unwrap_or_default();
    let mut correlation = p
        .correlation_id()
        .as_ref()
        .map(|c| Bytes::copy_from_slice(c.as_str().as_bytes()));
    if let Some(at) = headers.iter().position(|(k, _)| &**k == CORRELATION_HEADER) {
        let (_, value) = headers.remove(at);
        if correlation.is_none() {
            correlation = match value {
                Value::Bytes(b) => Some(b),
                Value::Str(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
                _ => None,
            };
        }
    }
    Properties {
        content_type: text(p.content_type()),
        content_encoding: text(p.content_encoding()),
        correlation,
        reply_to: text(p.reply_to()),
        expires_at_ms: p
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
            .map(|ms| now_ms.saturating_add(ms)),
        priority: *p.priority(),
        persistent: *p.delivery_mode() == Some(2),
        message_id: text(p.message_id()),
        kind: text(p.kind()),
        user_id: text(p.user_id()),
        app_id: text(p.app_id()),
        sent_at: *p.timestamp(),
        headers,
        // AMQP has no payload format indicator.
        payload_utf8: false,
    }
}

/// The AMQP properties of `p` at `now_ms` (expiration is what is left; an
/// expiry already past goes out as `0`: deliver now or drop).
pub fn to_amqp(p: &Properties, now_ms: u64) -> Result<BasicProperties, TooLong> {
    let mut out = BasicProperties::default();
    if let Some(v) = &p.content_type {
        out = out.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &p.content_encoding {
        out = out.with_content_encoding(short("content_encoding", v)?);
    }
    let mut headers = FieldTable::default();
    for (key, value) in &p.headers {
        headers.insert(short("header name", key)?, value_to_amqp(value));
    }
    if let Some(c) = &p.correlation {
        match std::str::from_utf8(c)
            .ok()
            .and_then(|s| ShortString::try_new(s).ok())
        {
            Some(id) => out = out.with_correlation_id(id),
            None => {
                headers.insert(
                    ShortString::from(CORRELATION_HEADER),
                    AMQPValue::ByteArray(ByteArray::from(c.to_vec())),
                );
            }
        }
    }
    if let Some(v) = &p.reply_to {
        out = out.with_reply_to(short("reply_to", v)?);
    }
    if let Some(at) = p.expires_at_ms {
        out = out.with_expiration(ShortString::from(at.saturating_sub(now_ms).to_string()));
    }
    if let Some(v) = p.priority {
        out = out.with_priority(v);
    }
    if p.persistent {
        out = out.with_delivery_mode(2);
    }
    if let Some(v) = &p.message_id {
        out = out.with_message_id(short("message_id", v)?);
    }
    if let Some(v) = &p.kind {
        out = out.with_type(short("type", v)?);
    }
    if let Some(v) = &p.user_id {
        out = out.with_user_id(short("user_id", v)?);
    }
    if let Some(v) = &p.app_id {
        out = out.with_app_id(short("app_id", v)?);
    }
    if let Some(v) = p.sent_at {
        out = out.with_timestamp(v);
    }
    if !headers.inner().is_empty() {
        out = out.with_headers(headers);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_property_round_trips() {
        let p = Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("gzip".into()),
            correlation: Some(Bytes::from_static(b"req-7")),
            reply_to: Some("replies".into()),
            expires_at_ms: Some(61_000),
            priority: Some(5),
            persistent: true,
            message_id: Some("m-1".into()),
            kind: Some("reading".into()),
            user_id: Some("guest".into()),
            app_id: Some("bridge".into()),
            sent_at: Some(1_700_000_000),
            payload_utf8: false,
            headers: vec![
                (
                    "a-list".into(),
                    Value::List(vec![Value::Int(1), Value::Bool(false)]),
                ),
                ("b-raw".into(), Value::Bytes(Bytes::from_static(&[0xFF, 0]))),
                ("c-unit".into(), Value::Str("C".into())),
                (
                    "d-table".into(),
                    Value::Table(vec![("k".into(), Value::Decimal { scale: 1, value: 5 })]),
                ),
            ],
        };
        let amqp = to_amqp(&p, 1_000).expect("fits");
        assert_eq!(
            amqp.expiration().as_ref().map(|e| e.as_str()),
            Some("60000")
        );
        assert_eq!(from_amqp(&amqp, 1_000), p);
    }

    #[test]
    fn binary_correlation_data_travels_in_a_header() {
        let p = Properties {
            correlation: Some(Bytes::from_static(&[0, 0xFF, 1])),
            ..Properties::default()
        };
        let amqp = to_amqp(&p, 0).expect("fits");
        assert!(amqp.correlation_id().is_none());
        assert_eq!(from_amqp(&amqp, 0), p);
    }

    #[test]
    fn integers_of_every_width_read_as_int_and_long_strings_as_text() {
        let mut table = FieldTable::default();
        table.insert("n".into(), AMQPValue::ShortInt(-2));
        table.insert("s".into(), AMQPValue::LongString(LongString::from("x")));
        let props = BasicProperties::default().with_headers(table);
        assert_eq!(
            from_amqp(&props, 0).headers,
            vec![
                ("n".into(), Value::Int(-2)),
                ("s".into(), Value::Str("x".into()))
            ]
        );
    }

    #[test]
    fn a_value_too_long_for_a_short_string_is_an_error() {
        let p = Properties {
            reply_to: Some("r".repeat(256).into()),
            ..Properties::default()
        };
        assert_eq!(
            to_amqp(&p, 0),
            Err(TooLong {
                field: "reply_to",
                len: 256
            })
        );
    }
}
