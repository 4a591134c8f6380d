use super::*;

fn full() -> Message {
    Message {
        topic: "sensors/a/temp".into(),
        payload: Bytes::from_static(b"{\"t\":21.5}"),
        qos: QoS::ExactlyOnce,
        retain: true,
        origin: Origin {
            protocol: Protocol::Amqp,
            publisher: "historian".into(),
        },
        timestamp_ms: 1_700_000_000_123,
        properties: Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("gzip".into()),
            correlation: Some(Bytes::from_static(b"\x00req-7")),
            reply_to: Some("replies/historian".into()),
            expires_at_ms: Some(1_700_000_060_000),
            priority: Some(7),
            persistent: true,
            message_id: Some("m-1".into()),
            kind: Some("reading".into()),
            user_id: Some("guest".into()),
            app_id: Some("plc-bridge".into()),
            sent_at: Some(1_700_000_000),
            payload_utf8: true,
            headers: vec![
                ("unit".into(), Value::Str("C".into())),
                ("count".into(), Value::Int(-3)),
                ("ok".into(), Value::Bool(true)),
                ("ratio".into(), Value::Float(0.25)),
                (
                    "price".into(),
                    Value::Decimal {
                        scale: 2,
                        value: 1999,
                    },
                ),
                ("raw".into(), Value::Bytes(Bytes::from_static(&[0, 1, 2]))),
                ("at".into(), Value::Timestamp(1_700_000_000)),
                ("none".into(), Value::Void),
                (
                    "x-death".into(),
                    Value::List(vec![Value::Table(vec![
                        ("queue".into(), Value::Str("q".into())),
                        ("count".into(), Value::Int(1)),
                    ])]),
                ),
            ],
        },
    }
}

fn minimal() -> Message {
    Message {
        topic: "a".into(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::AtLeastOnce,
        retain: false,
        origin: Origin {
            protocol: Protocol::Mqtt,
            publisher: "p".into(),
        },
        timestamp_ms: 2,
        properties: Properties::default(),
    }
}

#[test]
fn every_field_round_trips() {
    let m = full();
    let bytes = encode(&m).expect("encode");
    assert_eq!(bytes[0], FORMAT_VERSION);
    assert_eq!(decode(&bytes), Ok(m));
}

#[test]
fn byte_literal_of_a_minimal_message() {
    let expected: &[u8] = &[
        2, // version
        2, 0, 0, 0, 0, 0, 0, 0, // timestamp
        1, // qos
        0, // flags
        0, // mqtt
        1, 0, b'a', // topic
        1, 0, b'p', // publisher
        0, 0, // no properties
        0, 0, // no headers
        1, 0, 0, 0, b'x', // payload
    ];
    assert_eq!(&encode(&minimal()).expect("encode")[..], expected);
}

#[test]
fn a_schema_1_record_decodes_without_its_internal_headers() {
    let mut v1: Vec<u8> = vec![
        1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, b'a', 1, 0, b'p', 2, 0,
    ];
    for (key, value) in [("unit", "C"), ("x-edge-parked", "up")] {
        v1.extend_from_slice(&(key.len() as u16).to_le_bytes());
        v1.extend_from_slice(key.as_bytes());
        v1.extend_from_slice(&(value.len() as u32).to_le_bytes());
        v1.extend_from_slice(value.as_bytes());
    }
    v1.extend_from_slice(&[1, 0, 0, 0, b'x']);
    let m = decode(&Bytes::from(v1)).expect("decode");
    let expected = Message {
        retain: true,
        properties: Properties {
            headers: vec![("unit".into(), Value::Bytes(Bytes::from_static(b"C")))],
            ..Properties::default()
        },
        ..minimal()
    };
    assert_eq!(m, expected);
}

#[test]
fn the_payload_is_a_slice_of_the_record_not_a_copy() {
    let bytes = encode(&full()).expect("encode");
    let m = decode(&bytes).expect("decode");
    let start = bytes.as_ptr() as usize;
    let at = m.payload.as_ptr() as usize;
    assert!(at >= start && at + m.payload.len() <= start + bytes.len());
}

#[test]
fn every_strict_prefix_and_an_unknown_version_fail() {
    let bytes = encode(&full()).expect("encode");
    for cut in 0..bytes.len() {
        assert!(decode(&bytes.slice(..cut)).is_err(), "cut at {cut}");
    }
    let mut other = bytes.to_vec();
    other[0] = 9;
    assert_eq!(
        decode(&Bytes::from(other)),
        Err(DecodeError::UnknownVersion(9))
    );
}

#[test]
fn fields_over_their_length_prefix_are_refused_not_truncated() {
    let long: Arc<str> = "x".repeat(usize::from(u16::MAX) + 1).into();
    let mut m = minimal();
    m.topic = long.clone();
    assert_eq!(encode(&m), Err(EncodeError::TooLong("topic")));
    let mut m = minimal();
    m.properties.reply_to = Some(long.clone());
    assert_eq!(encode(&m), Err(EncodeError::TooLong("reply-to")));
    let mut m = minimal();
    m.properties.headers = vec![(long, Value::Void)];
    assert_eq!(encode(&m), Err(EncodeError::TooLong("header name")));
    let mut deep = Value::Void;
    for _ in 0..MAX_DEPTH {
        deep = Value::List(vec![deep]);
    }
    let mut m = minimal();
    m.properties.headers = vec![("deep".into(), deep)];
    assert_eq!(encode(&m), Err(EncodeError::TooLong("header nesting")));
}

#[test]
fn expiry_is_absolute() {
    let mut m = minimal();
    assert!(!m.is_expired(u64::MAX));
    m.properties.expires_at_ms = Some(1_000);
    assert!(!m.is_expired(999));
    assert!(m.is_expired(1_000));
}
