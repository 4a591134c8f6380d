//! The record of schema 1, as the migration to schema 2 reads it (frozen:
//! newer records are the core's encoded messages, opaque to the store).
//!
//! Version 1 layout (all integers little-endian):
//!
//! ```text
//! u8   version = 1
//! u64  timestamp_ms      receive time, Unix milliseconds
//! u8   qos
//! u8   flags             bit 0: retain
//! u16  topic length,     topic bytes (UTF-8)
//! u16  publisher length, publisher bytes (UTF-8)
//! u16  header count,     then per header: u16 key len, key, u32 value len, value
//! u32  payload length,   payload bytes
//! ```
//!
//! Decoding an unknown version or a truncated record is an error, never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;

/// A message as stored. Protocol-neutral: the store knows nothing of MQTT or AMQP.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Record {
    pub(crate) timestamp_ms: u64,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    /// MQTT-style topic (levels separated by `/`).
    pub(crate) topic: String,
    /// Who published it (MQTT client id, AMQP connection name).
    pub(crate) publisher: String,
    /// Extra properties (MQTT v5 user properties, content type, ...).
    pub(crate) headers: Vec<(String, Bytes)>,
    pub(crate) payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    #[error("record truncated")]
    Truncated,
    #[error("record field {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("record field {0} is too long to encode")]
    TooLong(&'static str),
}

impl Record {
    /// Exact size of [`Record::encode`]'s output.
    pub(crate) fn encoded_len(&self) -> usize {
        1 + 8
            + 1
            + 1
            + 2
            + self.topic.len()
            + 2
            + self.publisher.len()
            + 2
            + self
                .headers
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.payload.len()
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        out.put_u8(VERSION);
        out.put_u64_le(self.timestamp_ms);
        out.put_u8(self.qos);
        out.put_u8(u8::from(self.retain));
        put_str16(&mut out, &self.topic, "topic")?;
        put_str16(&mut out, &self.publisher, "publisher")?;
        let count =
            u16::try_from(self.headers.len()).map_err(|_| DecodeError::TooLong("headers"))?;
        out.put_u16_le(count);
        for (k, v) in &self.headers {
            put_str16(&mut out, k, "header key")?;
            let len = u32::try_from(v.len()).map_err(|_| DecodeError::TooLong("header value"))?;
            out.put_u32_le(len);
            out.put_slice(v);
        }
        let len = u32::try_from(self.payload.len()).map_err(|_| DecodeError::TooLong("payload"))?;
        out.put_u32_le(len);
        out.put_slice(&self.payload);
        Ok(out.to_vec())
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut b = bytes;
        let version = get_u8(&mut b)?;
        if version != VERSION {
            return Err(DecodeError::UnknownVersion(version));
        }
        need(b, 10)?;
        let timestamp_ms = b.get_u64_le();
        let qos = b.get_u8();
        let retain = b.get_u8() & 1 == 1;
        let topic = get_str16(&mut b, "topic")?;
        let publisher = get_str16(&mut b, "publisher")?;
        need(b, 2)?;
        let count = b.get_u16_le();
        // Each header takes at least 6 bytes: never reserve more than the
        // input could hold, whatever the count claims.
        let mut headers = Vec::with_capacity(usize::from(count).min(b.len() / 6));
        for _ in 0..count {
            let k = get_str16(&mut b, "header key")?;
            need(b, 4)?;
            let len = b.get_u32_le() as usize;
            need(b, len)?;
            headers.push((k, Bytes::copy_from_slice(&b[..len])));
            b.advance(len);
        }
        need(b, 4)?;
        let len = b.get_u32_le() as usize;
        need(b, len)?;
        let payload = Bytes::copy_from_slice(&b[..len]);
        Ok(Record {
            timestamp_ms,
            qos,
            retain,
            topic,
            publisher,
            headers,
            payload,
        })
    }
}

fn need(b: &[u8], n: usize) -> Result<(), DecodeError> {
    if b.len() < n {
        Err(DecodeError::Truncated)
    } else {
        Ok(())
    }
}

fn get_u8(b: &mut &[u8]) -> Result<u8, DecodeError> {
    need(b, 1)?;
    Ok(b.get_u8())
}

fn put_str16(out: &mut BytesMut, s: &str, field: &'static str) -> Result<(), DecodeError> {
    let len = u16::try_from(s.len()).map_err(|_| DecodeError::TooLong(field))?;
    out.put_u16_le(len);
    out.put_slice(s.as_bytes());
    Ok(())
}

fn get_str16(b: &mut &[u8], field: &'static str) -> Result<String, DecodeError> {
    need(b, 2)?;
    let len = usize::from(b.get_u16_le());
    need(b, len)?;
    let s = std::str::from_utf8(&b[..len])
        .map_err(|_| DecodeError::NotUtf8(field))?
        .to_string();
    b.advance(len);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            timestamp_ms: 1_700_000_000_123,
            qos: 1,
            retain: true,
            topic: "sensors/a/temp".into(),
            publisher: "dev-1".into(),
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            )],
            payload: Bytes::from_static(b"{\"t\":21.5}"),
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let bytes = r.encode().expect("encode");
        assert_eq!(bytes.len(), r.encoded_len());
        assert_eq!(Record::decode(&bytes), Ok(r));
    }

    #[test]
    fn byte_literal_of_a_minimal_record() {
        let r = Record {
            timestamp_ms: 2,
            qos: 1,
            topic: "a".into(),
            publisher: "p".into(),
            payload: Bytes::from_static(b"x"),
            ..Record::default()
        };
        let expected: &[u8] = &[
            1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, b'a', 1, 0, b'p', 0, 0, 1, 0, 0, 0, b'x',
        ];
        assert_eq!(r.encode().expect("encode"), expected);
    }

    #[test]
    fn unknown_version_and_truncation_are_errors() {
        let mut bytes = sample().encode().expect("encode");
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        bytes[0] = 9;
        assert_eq!(Record::decode(&bytes), Err(DecodeError::UnknownVersion(9)));
    }
}
