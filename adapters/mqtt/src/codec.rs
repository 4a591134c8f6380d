//! Framing on top of rumqttd's v4 codec.
//!
//! rumqttd decodes and encodes the packets, but keeps the QoS and packet id
//! of a `Publish` crate-private, so this module reads them from the frame
//! before handing it to the codec, and encodes outgoing PUBLISH packets
//! itself. It also peeks at the protocol level of CONNECT so MQTT 3.1 and 5
//! clients get a CONNACK refusal rather than a dropped socket.

use bytes::{Buf, BufMut, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{self, Connect, Login, Packet, Protocol};

use crate::error::ProtocolError;

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

/// The first packet of a connection.
#[derive(Debug)]
pub(crate) enum Hello {
    /// MQTT 3.1.1.
    V311(Connect, Option<Login>),
    /// MQTT 3.1 (`MQIsdp`), 5 or an unknown level: refused with CONNACK 0x01.
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

/// Decodes the first packet of a connection, which must be CONNECT.
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
    match (name, level) {
        (b"MQTT", 4) => match V4.read_mut(buf, max).map_err(ProtocolError::Malformed)? {
            Packet::Connect(connect, _, will, _, login) => {
                if let Some(will) = will {
                    crate::logs::UNSUPPORTED.record("last_will", || {
                        format!(
                            "client_id={} will_topic={}",
                            connect.client_id,
                            String::from_utf8_lossy(&will.topic)
                        )
                    });
                }
                Ok(Some(Hello::V311(connect, login)))
            }
            _ => Err(ProtocolError::NotConnect(kind)),
        },
        (b"MQTT", _) | (b"MQIsdp", _) => {
            buf.advance(size);
            Ok(Some(Hello::Unsupported { level }))
        }
        _ => Err(ProtocolError::UnknownProtocol),
    }
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

    fn connect_frame(name: &[u8], level: u8, client_id: &str) -> BytesMut {
        let mut body = Vec::new();
        body.extend_from_slice(&(name.len() as u16).to_be_bytes());
        body.extend_from_slice(name);
        body.push(level);
        body.push(0x02); // clean session
        body.extend_from_slice(&30u16.to_be_bytes());
        if level == 5 {
            body.push(0); // empty property block
        }
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut frame = BytesMut::new();
        frame.put_u8(0x10);
        v4::write_remaining_length(&mut frame, body.len()).unwrap();
        frame.extend_from_slice(&body);
        frame
    }

    #[test]
    fn connect_levels() {
        let mut buf = connect_frame(b"MQTT", 4, "dev-1");
        match decode_connect(&mut buf, 1024).unwrap().unwrap() {
            Hello::V311(c, login) => {
                assert_eq!(c.client_id, "dev-1");
                assert_eq!(c.keep_alive, 30);
                assert!(c.clean_session);
                assert!(login.is_none());
            }
            other => panic!("{other:?}"),
        }
        for (name, level) in [(&b"MQTT"[..], 5), (&b"MQIsdp"[..], 3)] {
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
