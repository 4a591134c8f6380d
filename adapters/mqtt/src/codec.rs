//! Framing on top of rumqttd's v4 codec.
//!
//! rumqttd decodes and encodes the packets, but keeps the QoS and packet id
//! of a `Publish` crate-private, so this module reads them from the frame
//! before handing it to the codec, and encodes outgoing PUBLISH packets
//! itself. It also reads the protocol name and level of CONNECT first:
//! MQTT 3.1 (`MQIsdp`, level 3) is served like 3.1.1, other levels get a
//! CONNACK refusal rather than a dropped socket.

use bytes::{Buf, BufMut, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{self, Connect, Login, Packet, Protocol};

use crate::error::ProtocolError;
use crate::will::Will;

const CONNECT: u8 = 1;
const PUBLISH: u8 = 3;

/// One decoded packet, with what rumqttd does not expose of a PUBLISH.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub packet: Packet,
    /// QoS of a PUBLISH (0 for other packets).
    pub qos: u8,
    /// Packet id of a QoS 1/2 PUBLISH (0 otherwise).
    pub pkid: u16,
}

/// The protocol versions served, alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V311,
}

/// The first packet of a connection.
#[derive(Debug)]
pub(crate) enum Hello {
    /// MQTT 3.1.1 or 3.1, with its will (topic validated).
    Accepted {
        version: Version,
        connect: Connect,
        login: Option<Login>,
        will: Option<Will>,
    },
    /// `MQTT` at a level other than 4 (5 among them, until MQTT 5 is
    /// served) or `MQIsdp` at a level other than 3: refused with CONNACK
    /// 0x01 (unacceptable protocol version, MQTT-3.1.2-2).
    Unsupported { level: u8 },
}

/// Fixed header length and total frame length of the first packet in
/// `buf`, once the whole packet is there. An oversized packet is refused
/// as soon as its fixed header is readable, before its body arrives.
fn frame(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, ProtocolError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    match v4::length(buf[1..].iter()) {
        Ok((len_len, remaining)) => {
            let header = 1 + len_len;
            let size = header + remaining;
            if size > max {
                Err(ProtocolError::TooLarge { size, max })
            } else if buf.len() < size {
                Ok(None)
            } else {
                Ok(Some((header, size)))
            }
        }
        Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(ProtocolError::Malformed(e)),
    }
}

/// QoS and packet id of a PUBLISH frame; (0, 0) for anything else or when
/// the frame is too short (the codec then reports it as malformed).
fn publish_ids(frame: &[u8], header: usize) -> (u8, u16) {
    if frame[0] >> 4 != PUBLISH {
        return (0, 0);
    }
    let qos = (frame[0] >> 1) & 0b11;
    if qos == 0 {
        return (0, 0);
    }
    let body = &frame[header..];
    let pkid = body
        .get(..2)
        .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        .and_then(|topic_len| body.get(2 + topic_len..4 + topic_len))
        .map_or(0, |id| u16::from_be_bytes([id[0], id[1]]));
    (qos, pkid)
}

/// Decodes the next packet from `buf`, consuming it; `None` until a whole
/// packet is buffered.
pub(crate) fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, ProtocolError> {
    let Some((header, size)) = frame(buf, max)? else {
        return Ok(None);
    };
    let (qos, pkid) = publish_ids(&buf[..size], header);
    let packet = V4.read_mut(buf, max).map_err(ProtocolError::Malformed)?;
    Ok(Some(Inbound { packet, qos, pkid }))
}

/// Decodes the first packet of a connection, which must be CONNECT. An
/// unknown protocol name is an error: the connection is closed without a
/// CONNACK (MQTT-3.1.2-1).
pub(crate) fn decode_connect(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Hello>, ProtocolError> {
    let Some((header, size)) = frame(buf, max)? else {
        return Ok(None);
    };
    let kind = buf[0] >> 4;
    if kind != CONNECT {
        return Err(ProtocolError::NotConnect(kind));
    }
    let body = &buf[header..size];
    let name_len = body
        .get(..2)
        .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        .ok_or(ProtocolError::Malformed(protocol::Error::MalformedPacket))?;
    let name = body
        .get(2..2 + name_len)
        .ok_or(ProtocolError::Malformed(protocol::Error::MalformedPacket))?;
    let level = *body
        .get(2 + name_len)
        .ok_or(ProtocolError::Malformed(protocol::Error::MalformedPacket))?;
    let (version, packet) = match (name, level) {
        (b"MQTT", 4) => (
            Version::V311,
            V4.read_mut(buf, max).map_err(ProtocolError::Malformed)?,
        ),
        (b"MQIsdp", 3) => {
            let mut rewritten = v31_as_v311(buf[0], &body[2 + name_len + 1..])?;
            buf.advance(size);
            (
                Version::V31,
                V4.read_mut(&mut rewritten, max)
                    .map_err(ProtocolError::Malformed)?,
            )
        }
        (b"MQTT", _) | (b"MQIsdp", _) => {
            buf.advance(size);
            return Ok(Some(Hello::Unsupported { level }));
        }
        _ => return Err(ProtocolError::UnknownProtocol),
    };
    match packet {
        Packet::Connect(connect, _, will, _, login) => Ok(Some(Hello::Accepted {
            version,
            connect,
            login,
            will: will.map(Will::try_from).transpose()?,
        })),
        _ => Err(ProtocolError::NotConnect(kind)),
    }
}

/// An MQTT 3.1 CONNECT as the 3.1.1 CONNECT rumqttd's v4 codec parses.
///
/// The two differ only in the protocol name and level (`MQIsdp` 3 against
/// `MQTT` 4): the connect flags, keep-alive and the payload (client id,
/// will topic and message, user name, password) are laid out alike. So the
/// frame is rebuilt with the same first byte, a remaining length two bytes
/// shorter, name `MQTT` and level 4, and `rest` — every byte after the
/// level — unchanged. 3.1 limits client ids to 23 bytes; like Mosquitto,
/// longer ones are accepted.
fn v31_as_v311(first: u8, rest: &[u8]) -> Result<BytesMut, ProtocolError> {
    let remaining = 2 + 4 + 1 + rest.len();
    let mut out = BytesMut::with_capacity(5 + remaining);
    out.put_u8(first);
    v4::write_remaining_length(&mut out, remaining).map_err(ProtocolError::Malformed)?;
    out.put_u16(4);
    out.put_slice(b"MQTT");
    out.put_u8(4);
    out.put_slice(rest);
    Ok(out)
}

/// Appends an encoded packet (anything but an outgoing PUBLISH) to `out`.
pub(crate) fn encode(packet: Packet, out: &mut BytesMut) -> Result<(), protocol::Error> {
    V4.write(packet, out).map(|_| ())
}

/// Appends a PUBLISH to `out`. `pkid` is ignored at QoS 0.
pub(crate) fn encode_publish(
    out: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    retain: bool,
) -> Result<(), protocol::Error> {
    let topic_len = u16::try_from(topic.len()).map_err(|_| protocol::Error::PayloadTooLong)?;
    let id_len = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + id_len + payload.len();
    out.reserve(5 + remaining);
    out.put_u8(0b0011_0000 | (qos << 1) | u8::from(retain));
    v4::write_remaining_length(out, remaining)?;
    out.put_u16(topic_len);
    out.put_slice(topic.as_bytes());
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{ConnAck, ConnectReturnCode, PubAck, PubAckReason};

    #[test]
    fn outgoing_publish_bytes() {
        let mut out = BytesMut::new();
        encode_publish(&mut out, "a/b", b"hi", 1, 7, true).unwrap();
        assert_eq!(
            &out[..],
            &[0x33, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']
        );
        let mut out = BytesMut::new();
        encode_publish(&mut out, "t", b"", 0, 7, false).unwrap();
        assert_eq!(&out[..], &[0x30, 3, 0, 1, b't']);
    }

    #[test]
    fn outgoing_publish_round_trips_through_the_codec() {
        let payload = vec![0xAB; 300];
        let mut buf = BytesMut::new();
        encode_publish(&mut buf, "x/y", &payload, 1, 513, false).unwrap();
        let inbound = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((inbound.qos, inbound.pkid), (1, 513));
        match inbound.packet {
            Packet::Publish(p, None) => {
                assert_eq!(&p.topic[..], b"x/y");
                assert_eq!(&p.payload[..], &payload[..]);
            }
            other => panic!("not a publish: {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_packet_waits_for_more_bytes() {
        let mut buf = BytesMut::from(&[0x30, 5, 0, 1][..]);
        assert!(decode(&mut buf, 1024).unwrap().is_none());
        buf.extend_from_slice(b"txy");
        assert!(decode(&mut buf, 1024).unwrap().is_some());
    }

    #[test]
    fn oversized_packet_refused_from_its_header() {
        // Remaining length 16384 announced, only the header present.
        let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x01][..]);
        match decode(&mut buf, 1024) {
            Err(ProtocolError::TooLarge { size, max }) => assert_eq!((size, max), (16388, 1024)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let mut buf = BytesMut::from(&[0xF0, 0x00][..]);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(ProtocolError::Malformed(_))
        ));
        // Remaining length with five continuation bytes.
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(matches!(
            decode(&mut buf, usize::MAX),
            Err(ProtocolError::Malformed(_))
        ));
    }

    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    /// A CONNECT with clean session, keep-alive 30 and `flags` or'ed in;
    /// `tail` (will, user name, password) follows the client id.
    fn connect_with(name: &[u8], level: u8, client_id: &str, flags: u8, tail: &[u8]) -> BytesMut {
        let mut body = Vec::new();
        string(&mut body, name);
        body.push(level);
        body.push(0x02 | flags);
        body.extend_from_slice(&30u16.to_be_bytes());
        if level == 5 {
            body.push(0); // empty property block
        }
        string(&mut body, client_id.as_bytes());
        body.extend_from_slice(tail);
        let mut frame = BytesMut::new();
        frame.put_u8(0x10);
        v4::write_remaining_length(&mut frame, body.len()).unwrap();
        frame.extend_from_slice(&body);
        frame
    }

    fn connect_frame(name: &[u8], level: u8, client_id: &str) -> BytesMut {
        connect_with(name, level, client_id, 0, &[])
    }

    #[test]
    fn connect_levels() {
        let mut buf = connect_frame(b"MQTT", 4, "dev-1");
        match decode_connect(&mut buf, 1024).unwrap().unwrap() {
            Hello::Accepted {
                version,
                connect: c,
                login,
                will,
            } => {
                assert_eq!(version, Version::V311);
                assert_eq!(c.client_id, "dev-1");
                assert_eq!(c.keep_alive, 30);
                assert!(c.clean_session);
                assert!(login.is_none());
                assert!(will.is_none());
            }
            other => panic!("{other:?}"),
        }
        for (name, level) in [(&b"MQTT"[..], 5), (b"MQTT", 3), (b"MQIsdp", 4)] {
            let mut buf = connect_frame(name, level, "x");
            buf.extend_from_slice(&[0xC0, 0]);
            assert!(matches!(
                decode_connect(&mut buf, 1024).unwrap().unwrap(),
                Hello::Unsupported { level: l } if l == level
            ));
            assert_eq!(&buf[..], &[0xC0, 0], "refused CONNECT consumed whole");
        }
        let mut buf = connect_frame(b"XMPP", 4, "x");
        assert!(matches!(
            decode_connect(&mut buf, 1024),
            Err(ProtocolError::UnknownProtocol)
        ));
        let mut buf = BytesMut::from(&[0xC0, 0][..]);
        assert!(matches!(
            decode_connect(&mut buf, 1024),
            Err(ProtocolError::NotConnect(12))
        ));
    }

    /// Will (QoS 1, retain), user name and password after the client id.
    fn will_and_login(will_topic: &[u8]) -> (u8, Vec<u8>) {
        let mut tail = Vec::new();
        string(&mut tail, will_topic);
        string(&mut tail, b"offline");
        string(&mut tail, b"user");
        string(&mut tail, b"secret");
        (0x80 | 0x40 | 0x20 | (1 << 3) | 0x04, tail)
    }

    #[test]
    fn mqtt31_decodes_like_mqtt311() {
        // A client id over 3.1's 23 bytes, of a length that makes the
        // remaining length 128 (two bytes), 126 (one byte) once rewritten.
        let (flags, tail) = will_and_login(b"status/a");
        let id = format!("{:x<width$}", "mqtt31-client-", width = 114 - tail.len());
        let mut v31 = connect_with(b"MQIsdp", 3, &id, flags, &tail);
        assert_eq!(v31[1..3], [0x80, 0x01], "remaining length 128");
        v31.extend_from_slice(&[0xC0, 0]);
        let mut v311 = connect_with(b"MQTT", 4, &id, flags, &tail);
        let (
            Hello::Accepted {
                version: old,
                connect: c31,
                login: l31,
                will: w31,
            },
            Hello::Accepted {
                version: new,
                connect: c311,
                login: l311,
                will: w311,
            },
        ) = (
            decode_connect(&mut v31, 1024).unwrap().unwrap(),
            decode_connect(&mut v311, 1024).unwrap().unwrap(),
        )
        else {
            panic!("not accepted");
        };
        assert_eq!((old, new), (Version::V31, Version::V311));
        assert_eq!((&c31, &l31, &w31), (&c311, &l311, &w311));
        assert_eq!(c31.client_id, id);
        assert_eq!(l31.expect("login").username, "user");
        let will = w31.expect("will");
        assert_eq!(will.topic, "status/a");
        assert_eq!(&will.payload[..], b"offline");
        assert_eq!(will.qos, edge_core::QoS::AtLeastOnce);
        assert!(will.retain);
        assert_eq!(&v31[..], &[0xC0, 0], "3.1 CONNECT consumed whole");
    }

    #[test]
    fn invalid_will_topic_refuses_the_connect() {
        for version in [(&b"MQTT"[..], 4), (b"MQIsdp", 3)] {
            let (flags, tail) = will_and_login(b"status/#");
            let mut buf = connect_with(version.0, version.1, "dev", flags, &tail);
            assert!(matches!(
                decode_connect(&mut buf, 1024),
                Err(ProtocolError::InvalidWillTopic(t)) if t == "status/#"
            ));
        }
        // Will QoS 3 (MQTT-3.1.2-14) and will retain without a will
        // (MQTT-3.1.2-15) are malformed.
        let (_, tail) = will_and_login(b"status/a");
        let mut buf = connect_with(b"MQTT", 4, "dev", 0x04 | (3 << 3), &tail);
        assert!(matches!(
            decode_connect(&mut buf, 1024),
            Err(ProtocolError::Malformed(_))
        ));
        let mut buf = connect_with(b"MQTT", 4, "dev", 0x20, &[]);
        assert!(matches!(
            decode_connect(&mut buf, 1024),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn ack_bytes() {
        let mut out = BytesMut::new();
        encode(
            Packet::ConnAck(
                ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::RefusedProtocolVersion,
                },
                None,
            ),
            &mut out,
        )
        .unwrap();
        encode(
            Packet::PubAck(
                PubAck {
                    pkid: 258,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..], &[0x20, 2, 0, 1, 0x40, 2, 1, 2]);
    }
}
