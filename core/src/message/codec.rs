//! The versioned encoding of a [`Message`], as the store keeps it.
//!
//! Version 2 (written by this build; integers little-endian):
//!
//! ```text
//! u8    version = 2
//! u64   timestamp_ms        receive time, Unix milliseconds
//! u8    qos
//! u8    flags               bit 0 retain, bit 1 persistent, bit 2 UTF-8 payload
//! u8    origin protocol     0 mqtt, 1 amqp, 2 upstream
//! str16 topic
//! str16 publisher
//! u16   property mask       bit i set: property i follows, in bit order:
//!         0 content_type str16   1 content_encoding str16   2 correlation bytes32
//!         3 reply_to str16       4 expires_at_ms u64        5 priority u8
//!         6 message_id str16     7 kind str16               8 user_id str16
//!         9 app_id str16         10 sent_at u64
//! u16   header count, then per header: str16 key, value
//! u32   payload length, payload bytes
//!
//! str16 = u16 length + UTF-8; str32/bytes32 = u32 length + bytes
//! value = u8 tag + data: 0 void, 1 bool u8, 2 int i64, 3 float f64,
//!         4 decimal (u8 scale, u32 value), 5 str32, 6 bytes32, 7 timestamp u64,
//!         8 list (u32 count, values), 9 table (u16 count, (str16 key, value)*)
//! ```
//!
//! Version 1 (the record of schema 1, still found in logs migrated from it)
//! is decoded too: timestamp, qos, retain flag, topic, publisher, headers as
//! (str16, bytes32) pairs, payload. Its `x-edge-*` headers were the
//! gateway's bookkeeping and are dropped.
//!
//! Decoding an unknown version, a truncated or a malformed message is an
//! error, never a panic, and never reserves more memory than the input
//! could fill. The payload is a slice of the input, not a copy.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Message, Origin, Properties, Protocol, QoS, Value};

/// The version [`encode`] writes.
pub const FORMAT_VERSION: u8 = 2;

/// Tables and lists nested deeper than this are refused (a corrupt record
/// must not overflow the stack).
const MAX_DEPTH: usize = 16;

/// Prefix of the headers schema 1 used for the gateway's own bookkeeping.
const V1_INTERNAL_PREFIX: &str = "x-edge-";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{0} is too long to store")]
    TooLong(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown message format version {0}")]
    UnknownVersion(u8),
    #[error("message truncated")]
    Truncated,
    #[error("message field {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("message field {0} is invalid")]
    Invalid(&'static str),
}

pub(super) fn encode(m: &Message) -> Result<Bytes, EncodeError> {
    let p = &m.properties;
    let mut out = BytesMut::with_capacity(
        32 + m.topic.len() + m.origin.publisher.len() + m.payload.len() + 64 * p.headers.len(),
    );
    out.put_u8(FORMAT_VERSION);
    out.put_u64_le(m.timestamp_ms);
    out.put_u8(m.qos as u8);
    out.put_u8(u8::from(m.retain) | u8::from(p.persistent) << 1 | u8::from(p.payload_utf8) << 2);
    out.put_u8(m.origin.protocol as u8);
    put_str16(&mut out, &m.topic, "topic")?;
    put_str16(&mut out, &m.origin.publisher, "publisher")?;

    let strings = [
        (0, &p.content_type, "content type"),
        (1, &p.content_encoding, "content encoding"),
        (3, &p.reply_to, "reply-to"),
        (6, &p.message_id, "message id"),
        (7, &p.kind, "type"),
        (8, &p.user_id, "user id"),
        (9, &p.app_id, "app id"),
    ];
    let mut mask = 0u16;
    for (bit, value, _) in &strings {
        if value.is_some() {
            mask |= 1 << bit;
        }
    }
    for (bit, set) in [
        (2, p.correlation.is_some()),
        (4, p.expires_at_ms.is_some()),
        (5, p.priority.is_some()),
        (10, p.sent_at.is_some()),
    ] {
        if set {
            mask |= 1 << bit;
        }
    }
    out.put_u16_le(mask);
    let string = |out: &mut BytesMut, bit: u16| -> Result<(), EncodeError> {
        if let Some((_, Some(s), field)) = strings.iter().find(|(b, _, _)| *b == bit) {
            put_str16(out, s, field)?;
        }
        Ok(())
    };
    string(&mut out, 0)?;
    string(&mut out, 1)?;
    if let Some(c) = &p.correlation {
        put_bytes32(&mut out, c, "correlation")?;
    }
    string(&mut out, 3)?;
    if let Some(at) = p.expires_at_ms {
        out.put_u64_le(at);
    }
    if let Some(priority) = p.priority {
        out.put_u8(priority);
    }
    for bit in 6..=9 {
        string(&mut out, bit)?;
    }
    if let Some(at) = p.sent_at {
        out.put_u64_le(at);
    }

    let count = u16::try_from(p.headers.len()).map_err(|_| EncodeError::TooLong("headers"))?;
    out.put_u16_le(count);
    for (key, value) in &p.headers {
        put_str16(&mut out, key, "header name")?;
        put_value(&mut out, value, 0)?;
    }
    put_bytes32(&mut out, &m.payload, "payload")?;
    Ok(out.freeze())
}

pub(super) fn decode(bytes: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader {
        whole: bytes,
        at: 0,
    };
    match r.u8()? {
        1 => decode_v1(r),
        2 => decode_v2(r),
        v => Err(DecodeError::UnknownVersion(v)),
    }
}

fn decode_v2(mut r: Reader<'_>) -> Result<Message, DecodeError> {
    let timestamp_ms = r.u64()?;
    let qos = QoS::from_u8(r.u8()?).ok_or(DecodeError::Invalid("qos"))?;
    let flags = r.u8()?;
    let protocol = Protocol::from_u8(r.u8()?).ok_or(DecodeError::Invalid("origin"))?;
    let topic = r.str16("topic")?;
    let publisher = r.str16("publisher")?;
    let mask = r.u16()?;
    let has = |bit: u16| mask & (1 << bit) != 0;
    let mut p = Properties {
        persistent: flags & 2 != 0,
        payload_utf8: flags & 4 != 0,
        ..Properties::default()
    };
    if has(0) {
        p.content_type = Some(r.str16("content type")?);
    }
    if has(1) {
        p.content_encoding = Some(r.str16("content encoding")?);
    }
    if has(2) {
        p.correlation = Some(r.bytes32()?);
    }
    if has(3) {
        p.reply_to = Some(r.str16("reply-to")?);
    }
    if has(4) {
        p.expires_at_ms = Some(r.u64()?);
    }
    if has(5) {
        p.priority = Some(r.u8()?);
    }
    if has(6) {
        p.message_id = Some(r.str16("message id")?);
    }
    if has(7) {
        p.kind = Some(r.str16("type")?);
    }
    if has(8) {
        p.user_id = Some(r.str16("user id")?);
    }
    if has(9) {
        p.app_id = Some(r.str16("app id")?);
    }
    if has(10) {
        p.sent_at = Some(r.u64()?);
    }
    if mask >> 11 != 0 {
        return Err(DecodeError::Invalid("property mask"));
    }
    let count = r.u16()?;
    // A header takes at least 3 bytes: reserve no more than the input holds.
    p.headers = Vec::with_capacity(usize::from(count).min(r.left() / 3));
    for _ in 0..count {
        let key = r.str16("header name")?;
        let value = r.value(0)?;
        p.headers.push((key, value));
    }
    let payload = r.bytes32()?;
    Ok(Message {
        topic,
        payload,
        qos,
        retain: flags & 1 != 0,
        origin: Origin {
            protocol,
            publisher,
        },
        timestamp_ms,
        properties: p,
    })
}

fn decode_v1(mut r: Reader<'_>) -> Result<Message, DecodeError> {
    let timestamp_ms = r.u64()?;
    // Schema 1 never wrote a QoS above 2; anything else reads as QoS 1, as
    // schema 1's own reader did.
    let qos = QoS::from_u8(r.u8()?).unwrap_or(QoS::AtLeastOnce);
    let retain = r.u8()? & 1 == 1;
    let topic = r.str16("topic")?;
    let publisher = r.str16("publisher")?;
    let count = r.u16()?;
    let mut headers = Vec::with_capacity(usize::from(count).min(r.left() / 6));
    for _ in 0..count {
        let key = r.str16("header name")?;
        let value = r.bytes32()?;
        if !key.starts_with(V1_INTERNAL_PREFIX) {
            headers.push((key, Value::Bytes(value)));
        }
    }
    let payload = r.bytes32()?;
    Ok(Message {
        topic,
        payload,
        qos,
        retain,
        origin: Origin {
            protocol: Protocol::Mqtt,
            publisher,
        },
        timestamp_ms,
        properties: Properties {
            headers,
            ..Properties::default()
        },
    })
}

fn put_str16(out: &mut BytesMut, s: &str, field: &'static str) -> Result<(), EncodeError> {
    let len = u16::try_from(s.len()).map_err(|_| EncodeError::TooLong(field))?;
    out.put_u16_le(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn put_bytes32(out: &mut BytesMut, b: &[u8], field: &'static str) -> Result<(), EncodeError> {
    let len = u32::try_from(b.len()).map_err(|_| EncodeError::TooLong(field))?;
    out.put_u32_le(len);
    out.put_slice(b);
    Ok(())
}

fn put_value(out: &mut BytesMut, v: &Value, depth: usize) -> Result<(), EncodeError> {
    if depth >= MAX_DEPTH {
        return Err(EncodeError::TooLong("header nesting"));
    }
    match v {
        Value::Void => out.put_u8(0),
        Value::Bool(b) => {
            out.put_u8(1);
            out.put_u8(u8::from(*b));
        }
        Value::Int(i) => {
            out.put_u8(2);
            out.put_i64_le(*i);
        }
        Value::Float(f) => {
            out.put_u8(3);
            out.put_f64_le(*f);
        }
        Value::Decimal { scale, value } => {
            out.put_u8(4);
            out.put_u8(*scale);
            out.put_u32_le(*value);
        }
        Value::Str(s) => {
            out.put_u8(5);
            put_bytes32(out, s.as_bytes(), "header value")?;
        }
        Value::Bytes(b) => {
            out.put_u8(6);
            put_bytes32(out, b, "header value")?;
        }
        Value::Timestamp(t) => {
            out.put_u8(7);
            out.put_u64_le(*t);
        }
        Value::List(items) => {
            out.put_u8(8);
            let n = u32::try_from(items.len()).map_err(|_| EncodeError::TooLong("header list"))?;
            out.put_u32_le(n);
            for item in items {
                put_value(out, item, depth + 1)?;
            }
        }
        Value::Table(entries) => {
            out.put_u8(9);
            let n =
                u16::try_from(entries.len()).map_err(|_| EncodeError::TooLong("header table"))?;
            out.put_u16_le(n);
            for (key, value) in entries {
                put_str16(out, key, "header name")?;
                put_value(out, value, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// A cursor over the encoded bytes; slices of `whole` are shared, not copied.
struct Reader<'a> {
    whole: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.whole.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.left() < n {
            return Err(DecodeError::Truncated);
        }
        let s = &self.whole[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(self.take(2)?.get_u16_le())
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(self.take(4)?.get_u32_le())
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(self.take(8)?.get_u64_le())
    }

    fn str16(&mut self, field: &'static str) -> Result<Arc<str>, DecodeError> {
        let len = usize::from(self.u16()?);
        let raw = self.take(len)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::NotUtf8(field))?;
        Ok(Arc::from(s))
    }

    fn bytes32(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()? as usize;
        if self.left() < len {
            return Err(DecodeError::Truncated);
        }
        let b = self.whole.slice(self.at..self.at + len);
        self.at += len;
        Ok(b)
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth >= MAX_DEPTH {
            return Err(DecodeError::Invalid("header nesting"));
        }
        Ok(match self.u8()? {
            0 => Value::Void,
            1 => Value::Bool(self.u8()? != 0),
            2 => Value::Int(self.take(8)?.get_i64_le()),
            3 => Value::Float(self.take(8)?.get_f64_le()),
            4 => Value::Decimal {
                scale: self.u8()?,
                value: self.u32()?,
            },
            5 => {
                let b = self.bytes32()?;
                let s =
                    std::str::from_utf8(&b).map_err(|_| DecodeError::NotUtf8("header value"))?;
                Value::Str(Arc::from(s))
            }
            6 => Value::Bytes(self.bytes32()?),
            7 => Value::Timestamp(self.u64()?),
            8 => {
                let n = self.u32()? as usize;
                let mut items = Vec::with_capacity(n.min(self.left()));
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::List(items)
            }
            9 => {
                let n = usize::from(self.u16()?);
                let mut entries = Vec::with_capacity(n.min(self.left() / 3));
                for _ in 0..n {
                    let key = self.str16("header name")?;
                    let value = self.value(depth + 1)?;
                    entries.push((key, value));
                }
                Value::Table(entries)
            }
            _ => return Err(DecodeError::Invalid("header value type")),
        })
    }
}

#[cfg(test)]
mod tests;
