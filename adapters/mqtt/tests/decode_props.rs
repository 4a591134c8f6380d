//! Generated tests of the MQTT decoder the connections use
//! (`edge_mqtt::fuzzing::{decode, decode_connect}`): it never panics, never
//! consumes more than one whole frame, decodes a stream fed byte by byte
//! exactly as the same stream fed at once, and refuses an oversized packet
//! from its fixed header alone.

mod support;

use bytes::{BufMut, BytesMut};
use edge_mqtt::fuzzing::{self, Connect, DecodeError, Hello, Login, Packet, Will};
use proptest::prelude::*;
use support::{packet, remaining_length, string};

/// What one call of a decoder did.
type Outcome<T> = Result<Option<T>, DecodeError>;

/// Size of the frame at the start of `buf` according to its fixed header,
/// when the header is complete and well formed (computed independently of
/// the codec).
fn announced_size(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + (i + 1) + remaining);
        }
    }
    None
}

/// A client packet the adapter accepts, with what decoding it must yield.
#[derive(Debug, Clone)]
enum Sent {
    Publish {
        qos: u8,
        pkid: u16,
        dup: bool,
        retain: bool,
        topic: String,
        payload: Vec<u8>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe(u16, Vec<(String, u8)>),
    Unsubscribe(u16, Vec<String>),
    PingReq,
    Disconnect,
}

impl Sent {
    fn encode(&self) -> Vec<u8> {
        match self {
            Sent::Publish {
                qos,
                pkid,
                dup,
                retain,
                topic,
                payload,
            } => {
                let mut body = Vec::new();
                string(&mut body, topic.as_bytes());
                if *qos > 0 {
                    body.extend_from_slice(&pkid.to_be_bytes());
                }
                body.extend_from_slice(payload);
                let byte1 = 0x30 | (u8::from(*dup) << 3) | (qos << 1) | u8::from(*retain);
                packet(byte1, &body)
            }
            Sent::PubAck(id) => packet(0x40, &id.to_be_bytes()),
            Sent::PubRec(id) => packet(0x50, &id.to_be_bytes()),
            Sent::PubRel(id) => packet(0x62, &id.to_be_bytes()),
            Sent::PubComp(id) => packet(0x70, &id.to_be_bytes()),
            Sent::Subscribe(id, filters) => {
                let mut body = id.to_be_bytes().to_vec();
                for (f, qos) in filters {
                    string(&mut body, f.as_bytes());
                    body.push(*qos);
                }
                packet(0x82, &body)
            }
            Sent::Unsubscribe(id, filters) => {
                let mut body = id.to_be_bytes().to_vec();
                for f in filters {
                    string(&mut body, f.as_bytes());
                }
                packet(0xA2, &body)
            }
            Sent::PingReq => vec![0xC0, 0],
            Sent::Disconnect => vec![0xE0, 0],
        }
    }

    /// Checks a decoded packet against what was sent.
    fn check(&self, got: &(Packet, u8, u16)) -> Result<(), TestCaseError> {
        let (packet, qos, pkid) = got;
        match (self, packet) {
            (
                Sent::Publish {
                    qos: q,
                    pkid: id,
                    retain,
                    topic,
                    payload,
                    ..
                },
                Packet::Publish(p, None),
            ) => {
                prop_assert_eq!(*qos, *q);
                prop_assert_eq!(*pkid, if *q > 0 { *id } else { 0 });
                prop_assert_eq!(p.retain, *retain);
                prop_assert_eq!(&p.topic[..], topic.as_bytes());
                prop_assert_eq!(&p.payload[..], &payload[..]);
            }
            (Sent::PubAck(id), Packet::PubAck(a, None)) => prop_assert_eq!(a.pkid, *id),
            (Sent::PubRec(id), Packet::PubRec(a, None)) => prop_assert_eq!(a.pkid, *id),
            (Sent::PubRel(id), Packet::PubRel(a, None)) => prop_assert_eq!(a.pkid, *id),
            (Sent::PubComp(id), Packet::PubComp(a, None)) => prop_assert_eq!(a.pkid, *id),
            (Sent::Subscribe(id, filters), Packet::Subscribe(s, None)) => {
                prop_assert_eq!(s.pkid, *id);
                let got: Vec<(String, u8)> = s
                    .filters
                    .iter()
                    .map(|f| (f.path.clone(), f.qos as u8))
                    .collect();
                prop_assert_eq!(&got, filters);
            }
            (Sent::Unsubscribe(id, filters), Packet::Unsubscribe(u, None)) => {
                prop_assert_eq!(u.pkid, *id);
                prop_assert_eq!(&u.filters, filters);
            }
            (Sent::PingReq, Packet::PingReq(_)) | (Sent::Disconnect, Packet::Disconnect(..)) => {}
            (sent, got) => prop_assert!(false, "sent {sent:?}, decoded {got:?}"),
        }
        if !matches!(self, Sent::Publish { .. }) {
            prop_assert_eq!((*qos, *pkid), (0, 0));
        }
        Ok(())
    }
}

fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,4}",
        // Multi-byte UTF-8 and long names (remaining length over 127 and 16383).
        "[a-zé€😀/]{1,40}",
        prop::collection::vec("[a-z]", 200..400).prop_map(|v| v.concat()),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::collection::vec(any::<u8>(), 100..20_000),
    ]
}

fn sent() -> impl Strategy<Value = Sent> {
    let id = 1u16..;
    prop_oneof![
        6 => (0u8..3, id.clone(), any::<bool>(), any::<bool>(), topic(), payload()).prop_map(
            |(qos, pkid, dup, retain, topic, payload)| Sent::Publish {
                qos,
                pkid,
                dup,
                retain,
                topic,
                payload,
            }
        ),
        1 => id.clone().prop_map(Sent::PubAck),
        1 => id.clone().prop_map(Sent::PubRec),
        1 => id.clone().prop_map(Sent::PubRel),
        1 => id.clone().prop_map(Sent::PubComp),
        1 => (id.clone(), prop::collection::vec((topic(), 0u8..3), 1..4))
            .prop_map(|(id, f)| Sent::Subscribe(id, f)),
        1 => (id, prop::collection::vec(topic(), 1..4)).prop_map(|(id, f)| Sent::Unsubscribe(id, f)),
        1 => Just(Sent::PingReq),
        1 => Just(Sent::Disconnect),
    ]
}

/// A CONNECT, 3.1.1 or 3.1, and the `Hello` it must decode to.
fn connect() -> impl Strategy<Value = (Vec<u8>, Hello)> {
    (
        prop_oneof![Just((&b"MQTT"[..], 4u8)), Just((&b"MQIsdp"[..], 3u8))],
        "[a-zA-Z0-9-]{0,23}",
        any::<u16>(),
        any::<bool>(),
        prop::option::of((topic(), payload(), 0u8..3, any::<bool>())),
        prop::option::of("[a-z]{0,12}"),
        prop::option::of("[ -~]{0,12}"),
    )
        .prop_map(
            |((name, level), client_id, keep_alive, clean, will, user, pass)| {
                let mut flags = u8::from(clean) << 1;
                let mut tail = Vec::new();
                if let Some((topic, message, qos, retain)) = &will {
                    flags |= 0x04 | (qos << 3) | (u8::from(*retain) << 5);
                    string(&mut tail, topic.as_bytes());
                    string(&mut tail, message);
                }
                if let Some(u) = &user {
                    flags |= 0x80;
                    string(&mut tail, u.as_bytes());
                }
                if let Some(p) = &pass {
                    flags |= 0x40;
                    string(&mut tail, p.as_bytes());
                }
                let mut body = Vec::new();
                string(&mut body, name);
                body.push(level);
                body.push(flags);
                body.extend_from_slice(&keep_alive.to_be_bytes());
                string(&mut body, client_id.as_bytes());
                body.extend_from_slice(&tail);
                let username = user.unwrap_or_default();
                let password = pass.unwrap_or_default();
                let login = (!username.is_empty() || !password.is_empty())
                    .then_some(Login { username, password });
                let hello = Hello::Accepted {
                    level,
                    connect: Connect {
                        keep_alive,
                        client_id,
                        clean_session: clean,
                    },
                    login,
                    will: will.map(|(topic, payload, qos, retain)| Will {
                        topic,
                        payload: payload.into(),
                        qos,
                        retain,
                    }),
                };
                (packet(0x10, &body), hello)
            },
        )
}

/// Byte strings near the valid ones: valid packets with bytes flipped,
/// dropped, inserted or the buffer truncated, so the fuzz reaches past the
/// packet type and remaining length checks.
fn mangled() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        prop::collection::vec(sent(), 1..4)
            .prop_map(|v| v.iter().flat_map(Sent::encode).collect::<Vec<u8>>()),
        connect().prop_map(|(bytes, _)| bytes),
    ];
    (
        base,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..6),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut bytes, edits, cut)| {
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
            let keep = bytes.len() - cut.index(bytes.len() + 1).min(bytes.len()) / 4;
            bytes.truncate(keep);
            bytes
        })
}

fn any_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..300), mangled(),]
}

fn max_size() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..300, Just(1 << 20), Just(usize::MAX)]
}

/// One decoder call on `buf`, checking what it consumed: nothing while it
/// waits for more bytes, exactly the announced frame when it yields a
/// packet, never more than the buffer.
fn step<T>(
    buf: &mut BytesMut,
    decode: impl Fn(&mut BytesMut) -> Outcome<T>,
) -> Result<Outcome<T>, TestCaseError> {
    // Copying the whole buffer at every byte of a large packet fed byte
    // by byte would be quadratic: the tail check is for small buffers.
    let before_len = buf.len();
    let before = if before_len <= 4096 {
        buf.clone()
    } else {
        BytesMut::from(&buf[..5])
    };
    let out = decode(buf);
    prop_assert!(buf.len() <= before_len);
    if before_len <= 4096 {
        prop_assert_eq!(
            &before[before_len - buf.len()..],
            &buf[..],
            "kept bytes are the tail"
        );
    }
    match &out {
        Ok(None) => prop_assert_eq!(buf.len(), before_len, "waiting consumes nothing"),
        Ok(Some(_)) => {
            let size = announced_size(&before);
            prop_assert_eq!(Some(before_len - buf.len()), size, "consumes one frame");
        }
        Err(_) => {}
    }
    Ok(out)
}

/// Decodes everything in `bytes` fed in one go or byte by byte, up to the
/// first error (after which the connection is closed).
fn run<T>(
    bytes: &[u8],
    byte_by_byte: bool,
    decode: impl Fn(&mut BytesMut) -> Outcome<T>,
) -> Result<(Vec<T>, Option<DecodeError>, usize), TestCaseError> {
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let chunks: Vec<&[u8]> = if byte_by_byte {
        bytes.chunks(1).collect()
    } else {
        vec![bytes]
    };
    for chunk in chunks {
        buf.put_slice(chunk);
        loop {
            match step(&mut buf, &decode)? {
                Ok(Some(p)) => got.push(p),
                Ok(None) => break,
                Err(e) => return Ok((got, Some(e), buf.len())),
            }
        }
    }
    Ok((got, None, buf.len()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_nor_overconsume(bytes in any_input(), max in max_size()) {
        run(&bytes, false, |b| fuzzing::decode(b, max))?;
        run(&bytes, false, |b| fuzzing::decode_as(b, max, true))?;
        run(&bytes, false, |b| fuzzing::decode_connect(b, max))?;
    }

    /// MQTT 5: the same, and the packet types rumqttd's v5 codec panics
    /// on (CONNACK, UNSUBACK bodies from a client) are an error.
    #[test]
    fn arbitrary_bytes_split_decode_the_same_in_mqtt5(bytes in any_input(), max in max_size()) {
        let (whole, whole_err, _) = run(&bytes, false, |b| fuzzing::decode_as(b, max, true))?;
        let (split, split_err, _) = run(&bytes, true, |b| fuzzing::decode_as(b, max, true))?;
        prop_assert_eq!(whole, split);
        prop_assert_eq!(whole_err, split_err);
    }

    #[test]
    fn server_bound_packets_never_reach_the_v5_codec(kind in 0u8..16, body in prop::collection::vec(any::<u8>(), 1..40)) {
        let mut frame = vec![kind << 4, body.len() as u8];
        frame.extend_from_slice(&body);
        let mut buf = BytesMut::from(&frame[..]);
        let out = fuzzing::decode_as(&mut buf, 1024, true);
        if matches!(kind, 2 | 9 | 11 | 13 | 15) {
            prop_assert!(out.is_err(), "type {} accepted", kind);
        }
    }

    /// Fed byte by byte, any input yields the same packets and the same
    /// first error as fed at once.
    #[test]
    fn arbitrary_bytes_split_decode_the_same(bytes in any_input(), max in max_size()) {
        let (whole, whole_err, _) = run(&bytes, false, |b| fuzzing::decode(b, max))?;
        let (split, split_err, _) = run(&bytes, true, |b| fuzzing::decode(b, max))?;
        prop_assert_eq!(whole, split);
        prop_assert_eq!(whole_err, split_err);
    }

    #[test]
    fn valid_packets_decode_whole_or_split(packets in prop::collection::vec(sent(), 1..6)) {
        let bytes: Vec<u8> = packets.iter().flat_map(Sent::encode).collect();
        let max = bytes.len();
        let (whole, err, left) = run(&bytes, false, |b| fuzzing::decode(b, max))?;
        prop_assert!(err.is_none(), "{err:?}");
        prop_assert_eq!(left, 0);
        prop_assert_eq!(whole.len(), packets.len());
        for (sent, got) in packets.iter().zip(&whole) {
            sent.check(got)?;
        }
        let (split, err, left) = run(&bytes, true, |b| fuzzing::decode(b, max))?;
        prop_assert!(err.is_none(), "{err:?}");
        prop_assert_eq!(left, 0);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn valid_connect_decodes_whole_or_split((bytes, hello) in connect(), next in sent()) {
        let mut stream = bytes.clone();
        stream.extend_from_slice(&next.encode());
        for byte_by_byte in [false, true] {
            let mut buf = BytesMut::new();
            let chunks: Vec<&[u8]> = if byte_by_byte {
                stream.chunks(1).collect()
            } else {
                vec![&stream[..]]
            };
            let mut got = None;
            for chunk in chunks {
                buf.put_slice(chunk);
                if got.is_none() {
                    got = step(&mut buf, |b| fuzzing::decode_connect(b, 1 << 20))?
                        .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                }
            }
            prop_assert_eq!(got.as_ref(), Some(&hello));
            // The CONNECT is consumed whole and nothing after it.
            let after = fuzzing::decode(&mut buf, 1 << 20)
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let after = after.ok_or_else(|| TestCaseError::fail("next packet lost"))?;
            next.check(&after)?;
            prop_assert!(buf.is_empty());
        }
    }

    /// A remaining length announcing more than `max` is refused as soon
    /// as the fixed header is readable, whatever part of the body is there.
    #[test]
    fn oversized_refused_from_the_header(
        byte1 in prop_oneof![Just(0x10u8), Just(0x30), Just(0x32), Just(0x82), any::<u8>()],
        max in 0usize..100_000,
        extra in 1usize..1_000_000,
        body_part in 0usize..64,
    ) {
        let remaining = (max + extra).min(268_435_455);
        let mut bytes = vec![byte1];
        remaining_length(&mut bytes, remaining);
        let size = bytes.len() + remaining;
        prop_assume!(size > max);
        bytes.extend(std::iter::repeat_n(0u8, body_part.min(remaining)));
        let mut buf = BytesMut::from(&bytes[..]);
        let err = fuzzing::decode(&mut buf, max).expect_err("oversized accepted");
        prop_assert_eq!(err.reason, "packet_too_large");
        prop_assert_eq!(buf.len(), bytes.len());
        let mut buf = BytesMut::from(&bytes[..]);
        let err = fuzzing::decode_connect(&mut buf, max).expect_err("oversized accepted");
        prop_assert_eq!(err.reason, "packet_too_large");
    }
}

#[test]
fn exactly_max_is_accepted_one_over_is_not() {
    let packet = Sent::Publish {
        qos: 1,
        pkid: 9,
        dup: false,
        retain: false,
        topic: "a/b".into(),
        payload: vec![7; 200],
    }
    .encode();
    let size = packet.len();
    let mut buf = BytesMut::from(&packet[..]);
    assert!(matches!(fuzzing::decode(&mut buf, size), Ok(Some(_))));
    // The fixed header alone (remaining length 209 takes two bytes).
    let mut buf = BytesMut::from(&packet[..3]);
    let err = fuzzing::decode(&mut buf, size - 1).expect_err("one byte over max");
    assert_eq!(err.reason, "packet_too_large");
    assert_eq!(
        err.message,
        format!(
            "packet of {size} bytes exceeds max_packet_size of {} bytes",
            size - 1
        )
    );
}

#[test]
fn trailing_garbage_after_a_packet_is_left_in_the_buffer() {
    let mut buf = BytesMut::from(&[0xC0, 0, 0xFF][..]);
    let first = fuzzing::decode(&mut buf, 1024).expect("pingreq");
    assert!(matches!(first, Some((Packet::PingReq(_), 0, 0))));
    assert_eq!(&buf[..], &[0xFF]);
}
