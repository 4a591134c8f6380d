//! Generated tests of the message encoding: decoding any bytes is an error
//! or a message, never a panic; encoding round-trips; no strict prefix of an
//! encoding decodes.

use std::sync::Arc;

use bytes::Bytes;
use edge_core::message::DecodeError;
use edge_core::{Message, Origin, Properties, Protocol, QoS, Value};
use edge_store::Record;
use proptest::prelude::*;

fn text(max: usize) -> impl Strategy<Value = Arc<str>> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9/+#-]{1,24}",
        prop::collection::vec(any::<char>(), 0..16).prop_map(|v| v.into_iter().collect()),
        ("[a-zé€]{1,4}", 1..max.max(2)).prop_map(|(unit, n)| unit.repeat(n)),
    ]
    .prop_map(Arc::from)
}

fn blob() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64),
        1 => (any::<u8>(), 64usize..200_000).prop_map(|(seed, n)| {
            (0..n).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
        }),
    ]
    .prop_map(Bytes::from)
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Void),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        // Finite, so that equality holds after the round trip.
        (-1e9f64..1e9).prop_map(Value::Float),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| Value::Decimal { scale, value }),
        text(20).prop_map(Value::Str),
        blob().prop_map(Value::Bytes),
        any::<u64>().prop_map(Value::Timestamp),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::List),
            prop::collection::vec((text(10), inner), 0..4).prop_map(Value::Table),
        ]
    })
}

fn properties() -> impl Strategy<Value = Properties> {
    let o = |s| prop::option::of(text(s));
    (
        (
            o(40),
            o(10),
            prop::option::of(blob()),
            o(40),
            any::<Option<u64>>(),
        ),
        (
            any::<Option<u8>>(),
            any::<bool>(),
            o(40),
            o(10),
            o(10),
            o(10),
        ),
        (
            any::<Option<u64>>(),
            prop::collection::vec((text(20), value()), 0..4),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (content_type, content_encoding, correlation, reply_to, expires_at_ms),
                (priority, persistent, message_id, kind, user_id, app_id),
                (sent_at, headers, payload_utf8),
            )| Properties {
                content_type,
                content_encoding,
                correlation,
                reply_to,
                expires_at_ms,
                priority,
                persistent,
                message_id,
                kind,
                user_id,
                app_id,
                sent_at,
                headers,
                payload_utf8,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    (
        (any::<u64>(), 0u8..3, any::<bool>(), 0u8..3),
        (text(1_000), text(100), blob()),
        properties(),
    )
        .prop_map(
            |((timestamp_ms, qos, retain, protocol), (topic, publisher, payload), properties)| {
                Message {
                    topic,
                    payload,
                    qos: QoS::from_u8(qos).unwrap_or(QoS::AtLeastOnce),
                    retain,
                    origin: Origin {
                        protocol: [Protocol::Mqtt, Protocol::Amqp, Protocol::Upstream]
                            [usize::from(protocol)],
                        publisher,
                    },
                    timestamp_ms,
                    properties,
                }
            },
        )
}

fn encode(m: &Message) -> Result<Bytes, TestCaseError> {
    m.to_record()
        .map(Record::into_bytes)
        .map_err(|e| TestCaseError::fail(format!("encode: {e}")))
}

fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    Message::from_record(&Record::new(bytes.to_vec()))
}

/// Encodings with bytes changed, dropped, inserted or cut off.
fn mangled() -> impl Strategy<Value = Vec<u8>> {
    (
        message(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
    )
        .prop_map(|(m, edits)| {
            let mut bytes = m
                .to_record()
                .map(|r| r.into_bytes().to_vec())
                .unwrap_or_default();
            for (at, byte, op) in edits {
                if bytes.is_empty() {
                    bytes.push(byte);
                    continue;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => bytes[i] ^= 1 << (byte % 8),
                    2 => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, byte),
                }
            }
            bytes
        })
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (1u8..3, prop::collection::vec(any::<u8>(), 0..256)).prop_map(|(v, mut rest)| {
            rest.insert(0, v);
            rest
        }),
        mangled(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn decode_of_any_bytes_never_panics(bytes in any_input()) {
        if let Ok(m) = decode(&bytes) {
            // What decodes re-encodes into a fixed point (NaN-safe: bytes
            // are compared, not values).
            let again = encode(&m)?;
            let m2 = decode(&again).map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(encode(&m2)?, again);
        }
    }

    #[test]
    fn round_trip(m in message()) {
        let bytes = encode(&m)?;
        prop_assert_eq!(bytes[0], edge_core::message::FORMAT_VERSION);
        prop_assert_eq!(decode(&bytes), Ok(m));
    }

    #[test]
    fn every_strict_prefix_fails(m in message()) {
        let bytes = encode(&m)?;
        let step = (bytes.len() / 1_000).max(1);
        let cuts = (0..bytes.len().min(1_024))
            .chain((0..bytes.len()).step_by(step))
            .chain(bytes.len().saturating_sub(64)..bytes.len());
        for cut in cuts {
            prop_assert!(decode(&bytes[..cut]).is_err(), "prefix of {} of {} bytes decoded", cut, bytes.len());
        }
    }
}
