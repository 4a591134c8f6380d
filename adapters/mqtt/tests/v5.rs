//! MQTT 5 against a real store and router, in raw bytes: what the spec
//! says each packet gets, and that a broken packet closes only its own
//! connection with the right reason code.

mod support;

use anyhow::{Result, bail};
use support::*;

/// An MQTT 5 CONNECT with property block `props` (its bytes, without the
/// length) and clean start.
fn connect5(client_id: &str, props: &[u8]) -> Vec<u8> {
    connect5_flags(client_id, 0x02, props, &[])
}

fn connect5_flags(client_id: &str, flags: u8, props: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(5);
    body.push(flags);
    body.extend_from_slice(&30u16.to_be_bytes());
    remaining_length(&mut body, props.len());
    body.extend_from_slice(props);
    string(&mut body, client_id.as_bytes());
    body.extend_from_slice(tail);
    packet(0x10, &body)
}

/// An MQTT 5 PUBLISH with property block `props`.
fn publish5(topic: &str, props: &[u8], payload: &[u8], qos: u8, pkid: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    remaining_length(&mut body, props.len());
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// An MQTT 5 SUBSCRIBE of one filter with options byte `options`.
fn subscribe5(pkid: u16, filter: &str, options: u8, props: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    remaining_length(&mut body, props.len());
    body.extend_from_slice(props);
    string(&mut body, filter.as_bytes());
    body.push(options);
    packet(0x82, &body)
}

/// A decoded packet from the server: type, the reason code after the
/// variable header's fixed part (if any), and its properties.
#[derive(Debug)]
struct Got {
    kind: u8,
    reason: Option<u8>,
    props: Vec<(u8, Vec<u8>)>,
}

impl Got {
    fn prop(&self, id: u8) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, v)| v.as_slice())
    }
}

fn varint(b: &[u8]) -> (usize, usize) {
    let mut v = 0;
    for (i, byte) in b.iter().enumerate() {
        v |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (v, b.len())
}

/// Splits a property block (length first) into (id, value bytes).
fn props(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let (len, n) = varint(b);
    let mut p = &b[n..n + len];
    let mut out = Vec::new();
    while let Some((&id, rest)) = p.split_first() {
        let size = match id {
            1 | 23 | 25 | 36 | 37 | 40 | 41 | 42 => 1,
            19 | 33 | 34 | 35 => 2,
            2 | 17 | 24 | 39 => 4,
            11 => varint(rest).1,
            38 => {
                let k = 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                k + 2 + usize::from(u16::from_be_bytes([rest[k], rest[k + 1]]))
            }
            _ => 2 + usize::from(u16::from_be_bytes([rest[0], rest[1]])),
        };
        out.push((id, rest[..size].to_vec()));
        p = &rest[size..];
    }
    out
}

async fn got(raw: &mut Raw) -> Result<Got> {
    let packet = raw.packet().await?;
    let kind = packet[0] >> 4;
    let (_, n) = varint(&packet[1..]);
    let body = &packet[1 + n..];
    let (reason, rest) = match kind {
        // CONNACK: flags, reason.
        2 => (body.get(1).copied(), body.get(2..)),
        // PUBACK..PUBCOMP, SUBACK, UNSUBACK: packet id first.
        4..=7 => (body.get(2).copied(), body.get(3..)),
        9 | 11 => {
            let p = props(&body[2..]);
            let (len, n) = varint(&body[2..]);
            return Ok(Got {
                kind,
                reason: body.get(2 + n + len).copied(),
                props: p,
            });
        }
        14 => (body.first().copied(), body.get(1..)),
        _ => (None, None),
    };
    Ok(Got {
        kind,
        reason,
        props: rest
            .filter(|r| !r.is_empty())
            .map(props)
            .unwrap_or_default(),
    })
}

/// Connects with MQTT 5 and reads the CONNACK.
async fn session5(server: &Server, client_id: &str, props: &[u8]) -> Result<(Raw, Got)> {
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect5(client_id, props)).await?;
    let connack = got(&mut raw).await?;
    if connack.kind != 2 || connack.reason != Some(0) {
        bail!("not accepted: {connack:?}");
    }
    Ok((raw, connack))
}

/// A broken packet gets DISCONNECT with `code`, then the close.
async fn expect_disconnect(raw: &mut Raw, code: u8) -> Result<()> {
    let d = got(raw).await?;
    if d.kind != 14 || d.reason != Some(code) {
        bail!("expected DISCONNECT {code:#04x}, got {d:?}");
    }
    raw.expect_closed().await
}

#[tokio::test]
async fn connack_states_what_the_gateway_does() -> Result<()> {
    let server = Server::with(Options {
        max_inflight: 16,
        max_packet_size: 64 * 1024,
        ..Options::default()
    })
    .await?;
    let (_raw, connack) = session5(&server, "", &[]).await?;
    let u16_of = |id| connack.prop(id).map(|v| u16::from_be_bytes([v[0], v[1]]));
    assert_eq!(u16_of(33), Some(16), "receive maximum = mqtt.max_inflight");
    assert_eq!(u16_of(34), Some(64), "topic alias maximum");
    assert_eq!(connack.prop(39), Some(&(64u32 * 1024).to_be_bytes()[..]));
    for flag in [37, 40, 41, 42] {
        assert_eq!(connack.prop(flag), Some(&[1][..]), "availability {flag}");
    }
    let assigned = connack.prop(18).expect("an assigned client identifier");
    assert!(assigned.len() > 2, "{assigned:?}");
    server.stop().await
}

#[tokio::test]
async fn broken_properties_close_only_their_connection_with_the_right_code() -> Result<()> {
    let server = Server::start().await?;
    let (mut bystander, _) = session5(&server, "bystander", &[]).await?;
    let cases: [(&str, Vec<u8>, u8); 7] = [
        // Unknown property id 0x7F: malformed.
        ("unknown id", publish5("a/b", &[0x7F, 0], b"x", 0, 0), 0x81),
        // Message expiry twice: protocol error.
        (
            "duplicate",
            publish5("a/b", &[2, 0, 0, 0, 9, 2, 0, 0, 0, 9], b"x", 0, 0),
            0x82,
        ),
        // A property block longer than the packet: malformed.
        (
            "length past the packet",
            {
                let mut body = Vec::new();
                string(&mut body, b"a/b");
                body.extend_from_slice(&[40, 2, 0, 0, 0, 1]);
                packet(0x30, &body)
            },
            0x81,
        ),
        // Topic alias 0: topic alias invalid.
        ("alias 0", publish5("a/b", &[35, 0, 0], b"x", 0, 0), 0x94),
        // Subscription identifier from a client's PUBLISH: protocol error.
        (
            "sub id in PUBLISH",
            publish5("a/b", &[11, 1], b"x", 0, 0),
            0x82,
        ),
        // A second CONNECT.
        ("second CONNECT", connect5("again", &[]), 0x82),
        // No local on a shared subscription (MQTT-3.8.3-4).
        (
            "shared no local",
            subscribe5(1, "$share/g/t/#", 0x04 | 1, &[]),
            0x82,
        ),
    ];
    for (what, bytes, code) in cases {
        let (mut raw, _) = session5(&server, &format!("broken-{}", what.len()), &[]).await?;
        raw.send(&bytes).await?;
        expect_disconnect(&mut raw, code)
            .await
            .map_err(|e| e.context(what))?;
    }
    // Packets a client never sends, and AUTH: protocol errors, no panic.
    for (what, bytes) in [
        ("CONNACK", vec![0x20, 3, 0, 0, 0]),
        ("UNSUBACK", vec![0xB0, 4, 0, 1, 0, 0]),
        ("SUBACK", vec![0x90, 4, 0, 1, 0, 0]),
        ("AUTH", vec![0xF0, 2, 0x18, 0]),
    ] {
        let (mut raw, _) = session5(&server, what, &[]).await?;
        raw.send(&bytes).await?;
        expect_disconnect(&mut raw, 0x82)
            .await
            .map_err(|e| e.context(what))?;
    }
    // The bystander was not touched.
    bystander.send(&PINGREQ).await?;
    bystander.expect(&PINGRESP).await?;
    server.stop().await
}

#[tokio::test]
async fn enhanced_authentication_is_refused_in_the_connack() -> Result<()> {
    let server = Server::start().await?;
    let mut raw = Raw::connect(server.addr).await?;
    // Authentication method "SCRAM-SHA-1".
    let mut props = vec![21];
    string(&mut props, b"SCRAM-SHA-1");
    raw.send(&connect5("scram", &props)).await?;
    let connack = got(&mut raw).await?;
    assert_eq!((connack.kind, connack.reason), (2, Some(0x8C)));
    raw.expect_closed().await?;
    server.stop().await
}

#[tokio::test]
async fn pubacks_say_whether_anything_took_the_message() -> Result<()> {
    let server = Server::start().await?;
    let (mut raw, _) = session5(&server, "pub", &[]).await?;
    raw.send(&publish5("nobody/here", &[], b"x", 1, 1)).await?;
    let ack = got(&mut raw).await?;
    assert_eq!(
        (ack.kind, ack.reason),
        (4, Some(0x10)),
        "no matching subscribers"
    );
    // QoS 2: PUBREC 0x10 likewise.
    raw.send(&publish5("nobody/here", &[], b"x", 2, 2)).await?;
    let rec = got(&mut raw).await?;
    assert_eq!((rec.kind, rec.reason), (5, Some(0x10)));

    let (mut sub, _) = session5(&server, "sub", &[]).await?;
    sub.send(&subscribe5(1, "some/+", 1, &[])).await?;
    let suback = got(&mut sub).await?;
    assert_eq!((suback.kind, suback.reason), (9, Some(1)));
    raw.send(&publish5("some/one", &[], b"x", 1, 3)).await?;
    let ack = got(&mut raw).await?;
    assert_eq!(ack.kind, 4);
    assert_eq!(ack.reason.unwrap_or(0), 0, "success");
    server.stop().await
}

#[tokio::test]
async fn a_payload_that_is_not_the_utf8_it_claims_is_refused() -> Result<()> {
    let server = Server::start().await?;
    let (mut raw, _) = session5(&server, "fmt", &[]).await?;
    // Payload format indicator 1 with invalid UTF-8, QoS 1: PUBACK 0x99.
    raw.send(&publish5("t/fmt", &[1, 1], b"\xff\xfe", 1, 1))
        .await?;
    let ack = got(&mut raw).await?;
    assert_eq!((ack.kind, ack.reason), (4, Some(0x99)));
    assert!(ack.prop(31).is_some(), "a reason string");
    assert!(server.records().await?.is_empty(), "nothing stored");
    // At QoS 0 there is no ack to say it: DISCONNECT 0x99.
    raw.send(&publish5("t/fmt", &[1, 1], b"\xff", 0, 0)).await?;
    expect_disconnect(&mut raw, 0x99).await?;
    server.stop().await
}

#[tokio::test]
async fn a_client_over_the_receive_maximum_is_disconnected_with_0x93() -> Result<()> {
    let (server, gate) = Server::gated(Options {
        max_inflight: 2,
        ..Options::default()
    })
    .await?;
    let (mut raw, connack) = session5(&server, "greedy", &[]).await?;
    assert_eq!(connack.prop(33), Some(&[0, 2][..]));
    gate.close();
    for pkid in 1..=3 {
        raw.send(&publish5("t/many", &[], b"x", 1, pkid)).await?;
    }
    expect_disconnect(&mut raw, 0x93).await?;
    gate.open();
    server.stop().await
}

#[tokio::test]
async fn topic_aliases_from_the_client_stand_for_their_topic() -> Result<()> {
    let server = Server::start().await?;
    let (mut raw, _) = session5(&server, "alias", &[]).await?;
    raw.send(&publish5("plant/line/7", &[35, 0, 5], b"a", 1, 1))
        .await?;
    got(&mut raw).await?;
    raw.send(&publish5("", &[35, 0, 5], b"b", 1, 2)).await?;
    got(&mut raw).await?;
    let records = server.records().await?;
    let topics: Vec<&str> = records.iter().map(|m| &*m.topic).collect();
    assert_eq!(topics, ["plant/line/7", "plant/line/7"]);
    // An alias never set, with an empty topic: 0x94.
    raw.send(&publish5("", &[35, 0, 6], b"c", 1, 3)).await?;
    expect_disconnect(&mut raw, 0x94).await?;
    server.stop().await
}

#[tokio::test]
async fn the_store_full_is_said_in_the_puback_and_the_client_stays() -> Result<()> {
    let server = Server::with(Options {
        max_bytes: 4 * 1024,
        ..Options::default()
    })
    .await?;
    let (mut raw, _) = session5(&server, "filler", &[]).await?;
    let payload = vec![b'x'; 1024];
    let mut refused = None;
    for pkid in 1..=20u16 {
        raw.send(&publish5("fill/up", &[], &payload, 1, pkid))
            .await?;
        let ack = got(&mut raw).await?;
        assert_eq!(ack.kind, 4);
        if ack.reason == Some(0x97) {
            refused = Some(pkid);
            break;
        }
    }
    assert!(refused.is_some(), "the store never said full");
    raw.send(&PINGREQ).await?;
    raw.expect(&PINGRESP).await?;
    server.stop().await
}

#[tokio::test]
async fn a_stored_session_ends_with_a_connection_without_expiry() -> Result<()> {
    let server = Server::start().await?;
    // Session expiry 3600 s, clean start 0: persistent.
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect5_flags("keeper", 0, &[17, 0, 0, 0x0E, 0x10], &[]))
        .await?;
    let connack = got(&mut raw).await?;
    assert_eq!(connack.reason, Some(0));
    raw.send(&subscribe5(1, "keep/#", 1, &[])).await?;
    got(&mut raw).await?;
    raw.send(&[0xE0, 0]).await?;
    raw.expect_closed().await?;
    // Back with expiry 0 and clean start 0: resumed (session present), and
    // it ends with this connection.
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect5_flags("keeper", 0, &[], &[])).await?;
    let connack = got(&mut raw).await?;
    assert_eq!(connack.reason, Some(0));
    raw.send(&[0xE0, 0]).await?;
    raw.expect_closed().await?;
    let deadline = std::time::Instant::now() + PATIENCE;
    while server.router.session_count() != 0 {
        assert!(std::time::Instant::now() < deadline, "the session stayed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.stop().await
}

#[tokio::test]
async fn disconnect_with_a_reason_code_and_no_properties_is_read() -> Result<()> {
    let server = Server::start().await?;
    let (mut sub, _) = session5(&server, "watcher", &[]).await?;
    sub.send(&subscribe5(1, "wills/#", 1, &[])).await?;
    got(&mut sub).await?;
    // A will on wills/w, then DISCONNECT 0x04 in its short form.
    let mut tail = Vec::new();
    tail.push(0); // will properties
    string(&mut tail, b"wills/w");
    string(&mut tail, b"gone");
    let mut raw = Raw::connect(server.addr).await?;
    raw.send(&connect5_flags(
        "leaver",
        0x02 | 0x04 | (1 << 3),
        &[],
        &tail,
    ))
    .await?;
    assert_eq!(got(&mut raw).await?.reason, Some(0));
    raw.send(&[0xE0, 1, 0x04]).await?;
    raw.expect_closed().await?;
    let will = sub.packet().await?;
    assert_eq!(will[0] >> 4, 3, "the will is published: {will:02x?}");
    server.stop().await
}
