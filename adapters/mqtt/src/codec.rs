//! Framing on top of rumqttd's v4 and v5 codecs.
//!
//! rumqttd decodes and encodes the packets, but keeps the QoS and packet id
//! of a `Publish` crate-private, so this module reads them from the frame
//! before handing it to the codec, and encodes outgoing PUBLISH packets
//! itself (with their MQTT 5 properties). It also reads the protocol name
//! and level of CONNECT first: MQTT 3.1 (`MQIsdp`, level 3) is served like
//! 3.1.1, MQTT 5 by the v5 codec, other levels get a CONNACK refusal rather
//! than a dropped socket.
//!
//! What the v5 codec gets wrong is caught here, before it sees a frame:
//! - it panics (`unreachable!()`) on a CONNACK or UNSUBACK body from a
//!   client, so server-bound packet types are refused from the fixed
//!   header first (protocol error), and AUTH, which it does not know, too;
//! - it reads property blocks leniently, so each is checked from the raw
//!   bytes (`props.rs`), as are the CONNECT flags it does not check.

mod props;

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use edge_core::Value;
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{self, Connect, ConnectProperties, Login, Packet, Protocol};

use crate::error::ProtocolError;
use crate::will::Will;
use props::Block;

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
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl Version {
    pub(crate) fn is_v5(self) -> bool {
        self == Version::V5
    }
}

/// The first packet of a connection (read once, dropped with the
/// handshake: its size does not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Hello {
    /// MQTT 5, 3.1.1 or 3.1, with its will (topic validated).
    Accepted {
        version: Version,
        connect: Connect,
        /// MQTT 5 CONNECT properties (boxed: most CONNECTs have none).
        props: Option<Box<ConnectProperties>>,
        login: Option<Login>,
        will: Option<Will>,
    },
    /// `MQTT` at a level other than 4 or 5, or `MQIsdp` at a level other
    /// than 3: refused with CONNACK 0x01 (unacceptable protocol version,
    /// MQTT-3.1.2-2) to levels below 5, 0x84 in the MQTT 5 form above.
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
pub(crate) fn decode(
    buf: &mut BytesMut,
    max: usize,
    version: Version,
) -> Result<Option<Inbound>, ProtocolError> {
    let Some((header, size)) = frame(buf, max)? else {
        return Ok(None);
    };
    let (qos, pkid) = publish_ids(&buf[..size], header);
    let packet = if version.is_v5() {
        if let Err(e) = check_v5(&buf[..size], header) {
            // The frame is whole: consumed, so that the connection can
            // answer with DISCONNECT and close cleanly.
            buf.advance(size);
            return Err(e);
        }
        if let Some(packet) = short_disconnect(&buf[..size], header) {
            buf.advance(size);
            packet
        } else {
            V5.read_mut(buf, max).map_err(ProtocolError::Malformed)?
        }
    } else {
        V4.read_mut(buf, max).map_err(ProtocolError::Malformed)?
    };
    Ok(Some(Inbound { packet, qos, pkid }))
}

/// A DISCONNECT with a reason code and no property length (remaining
/// length 1, which MQTT 5 §3.14.2.2 allows): rumqttd's v5 codec wants the
/// property length and refuses it, so it is decoded here.
fn short_disconnect(frame: &[u8], header: usize) -> Option<Packet> {
    use rumqttd::protocol::{Disconnect, DisconnectReasonCode};
    if frame[0] != 0xE0 || frame.len() != header + 1 {
        return None;
    }
    let reason_code = match frame[header] {
        0x00 => DisconnectReasonCode::NormalDisconnection,
        0x04 => DisconnectReasonCode::DisconnectWithWillMessage,
        _ => DisconnectReasonCode::UnspecifiedError,
    };
    Some(Packet::Disconnect(Disconnect { reason_code }, None))
}

/// What rumqttd's v5 codec must not see: packet types a client never sends
/// (it panics on some), AUTH, and property blocks that break the spec.
fn check_v5(frame: &[u8], header: usize) -> Result<(), ProtocolError> {
    let body = &frame[header..];
    match frame[0] >> 4 {
        0 => Err(ProtocolError::Malformed(
            protocol::Error::InvalidPacketType(0),
        )),
        1 => Err(ProtocolError::DuplicateConnect),
        2 => Err(ProtocolError::Unexpected("CONNACK")),
        9 => Err(ProtocolError::Unexpected("SUBACK")),
        11 => Err(ProtocolError::Unexpected("UNSUBACK")),
        13 => Err(ProtocolError::Unexpected("PINGRESP")),
        15 => Err(ProtocolError::Auth),
        PUBLISH => {
            let qos = (frame[0] >> 1) & 0b11;
            let topic = props::field_len(body)?;
            let at = topic + if qos > 0 { 2 } else { 0 };
            let rest = body
                .get(at..)
                .ok_or(ProtocolError::Malformed(protocol::Error::MalformedPacket))?;
            props::check(Block::Publish, rest).map(drop)
        }
        // PUBACK, PUBREC, PUBREL, PUBCOMP: packet id, then an optional
        // reason code and an optional property block.
        4..=7 if body.len() > 3 => props::check(Block::Ack, &body[3..]).map(drop),
        8 if body.len() > 2 => props::check(Block::Subscribe, &body[2..]).map(drop),
        10 if body.len() > 2 => props::check(Block::Unsubscribe, &body[2..]).map(drop),
        14 if body.len() > 1 => props::check(Block::Disconnect, &body[1..]).map(drop),
        _ => Ok(()),
    }
}

/// The CONNECT flags and property blocks of an MQTT 5 CONNECT, from the
/// connect flags on (`rest`): what rumqttd's v5 codec does not check.
fn check_v5_connect(rest: &[u8]) -> Result<(), ProtocolError> {
    let malformed = || ProtocolError::Malformed(protocol::Error::MalformedPacket);
    let flags = *rest.first().ok_or_else(malformed)?;
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0x20 != 0;
    // MQTT-3.1.2-3 (reserved bit), -11/-12/-13 (will QoS and retain).
    if flags & 1 != 0 || will_qos == 3 || (!will && (will_qos != 0 || will_retain)) {
        return Err(malformed());
    }
    let mut at = 3;
    at += props::check(Block::Connect, rest.get(at..).ok_or_else(malformed)?)?;
    at += props::field_len(rest.get(at..).ok_or_else(malformed)?)?;
    if will {
        props::check(Block::Will, rest.get(at..).ok_or_else(malformed)?)?;
    }
    Ok(())
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
        (b"MQTT", 5) => {
            if let Err(e) = check_v5_connect(&body[2 + name_len + 1..]) {
                buf.advance(size);
                return Err(e);
            }
            (
                Version::V5,
                V5.read_mut(buf, max).map_err(ProtocolError::Malformed)?,
            )
        }
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
        Packet::Connect(connect, props, will, will_props, login) => Ok(Some(Hello::Accepted {
            version,
            connect,
            props: props.map(Box::new),
            login,
            will: will.map(|w| Will::new(w, will_props)).transpose()?,
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
pub(crate) fn encode(
    packet: Packet,
    out: &mut BytesMut,
    version: Version,
) -> Result<(), protocol::Error> {
    if version.is_v5() {
        V5.write(packet, out).map(|_| ())
    } else {
        V4.write(packet, out).map(|_| ())
    }
}

/// An outgoing PUBLISH.
#[derive(Debug)]
pub(crate) struct Outgoing<'a> {
    /// Empty when a topic alias the client knows stands for it.
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    /// Ignored at QoS 0.
    pub pkid: u16,
    pub retain: bool,
    pub dup: bool,
    /// MQTT 5 properties; `None` for 3.1.1.
    pub props: Option<OutProps<'a>>,
}

/// The MQTT 5 properties of an outgoing PUBLISH.
#[derive(Debug, Default)]
pub(crate) struct OutProps<'a> {
    pub payload_utf8: bool,
    /// Remaining lifetime, seconds.
    pub expiry_secs: Option<u32>,
    pub alias: Option<u16>,
    pub response_topic: Option<&'a str>,
    pub correlation: Option<&'a [u8]>,
    pub content_type: Option<&'a str>,
    /// Headers; those that are not text-like are left out.
    pub user: &'a [(Arc<str>, Value)],
    pub sub_ids: &'a [u32],
}

/// A header value as an MQTT 5 user property value (text), if it has one.
pub(crate) fn user_value(value: &Value) -> Option<std::borrow::Cow<'_, str>> {
    use std::borrow::Cow;
    Some(match value {
        Value::Str(s) => Cow::Borrowed(&**s),
        Value::Bool(b) => Cow::Owned(b.to_string()),
        Value::Int(i) => Cow::Owned(i.to_string()),
        Value::Float(f) => Cow::Owned(f.to_string()),
        Value::Timestamp(t) => Cow::Owned(t.to_string()),
        Value::Bytes(b) => Cow::Borrowed(std::str::from_utf8(b).ok()?),
        _ => return None,
    })
}

fn fits16(s: &str) -> bool {
    s.len() <= usize::from(u16::MAX)
}

fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

fn put_str(out: &mut BytesMut, id: u8, s: &[u8]) {
    out.put_u8(id);
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

impl OutProps<'_> {
    fn len(&self) -> usize {
        let mut len = 0;
        if self.payload_utf8 {
            len += 2;
        }
        if self.expiry_secs.is_some() {
            len += 5;
        }
        if self.alias.is_some() {
            len += 3;
        }
        if let Some(t) = self.response_topic.filter(|t| fits16(t)) {
            len += 3 + t.len();
        }
        if let Some(c) = self
            .correlation
            .filter(|c| c.len() <= usize::from(u16::MAX))
        {
            len += 3 + c.len();
        }
        if let Some(t) = self.content_type.filter(|t| fits16(t)) {
            len += 3 + t.len();
        }
        for (key, value) in self.user {
            if let Some(v) = user_value(value).filter(|v| fits16(v) && fits16(key)) {
                len += 5 + key.len() + v.len();
            }
        }
        for id in self.sub_ids {
            len += 1 + varint_len(*id as usize);
        }
        len
    }

    fn write(&self, len: usize, out: &mut BytesMut) {
        put_varint(out, len);
        if self.payload_utf8 {
            out.put_slice(&[1, 1]);
        }
        if let Some(secs) = self.expiry_secs {
            out.put_u8(2);
            out.put_u32(secs);
        }
        if let Some(t) = self.content_type.filter(|t| fits16(t)) {
            put_str(out, 3, t.as_bytes());
        }
        if let Some(t) = self.response_topic.filter(|t| fits16(t)) {
            put_str(out, 8, t.as_bytes());
        }
        if let Some(c) = self
            .correlation
            .filter(|c| c.len() <= usize::from(u16::MAX))
        {
            put_str(out, 9, c);
        }
        for id in self.sub_ids {
            out.put_u8(11);
            put_varint(out, *id as usize);
        }
        if let Some(alias) = self.alias {
            out.put_u8(35);
            out.put_u16(alias);
        }
        for (key, value) in self.user {
            if let Some(v) = user_value(value).filter(|v| fits16(v) && fits16(key)) {
                put_str(out, 38, key.as_bytes());
                out.put_u16(v.len() as u16);
                out.put_slice(v.as_bytes());
            }
        }
    }
}

impl Outgoing<'_> {
    /// (remaining length, property block length) of the packet.
    fn lengths(&self) -> (usize, usize) {
        let id_len = if self.qos > 0 { 2 } else { 0 };
        let props = self.props.as_ref().map_or(0, OutProps::len);
        let props_block = if self.props.is_some() {
            varint_len(props) + props
        } else {
            0
        };
        (
            2 + self.topic.len() + id_len + props_block + self.payload.len(),
            props,
        )
    }

    /// Bytes the whole packet takes on the wire.
    pub(crate) fn size(&self) -> usize {
        let (remaining, _) = self.lengths();
        1 + varint_len(remaining) + remaining
    }
}

/// Appends a PUBLISH to `out`.
pub(crate) fn encode_publish(out: &mut BytesMut, p: &Outgoing<'_>) -> Result<(), protocol::Error> {
    let topic_len = u16::try_from(p.topic.len()).map_err(|_| protocol::Error::PayloadTooLong)?;
    let (remaining, props_len) = p.lengths();
    out.reserve(5 + remaining);
    let dup = if p.dup && p.qos > 0 { 0b1000 } else { 0 };
    out.put_u8(0b0011_0000 | dup | (p.qos << 1) | u8::from(p.retain));
    v4::write_remaining_length(out, remaining)?;
    out.put_u16(topic_len);
    out.put_slice(p.topic.as_bytes());
    if p.qos > 0 {
        out.put_u16(p.pkid);
    }
    if let Some(props) = &p.props {
        props.write(props_len, out);
    }
    out.put_slice(p.payload);
    Ok(())
}

/// Appends an MQTT 5 DISCONNECT with `code`, and `reason` as its reason
/// string when given (cut to fit a packet's string).
pub(crate) fn encode_disconnect(out: &mut BytesMut, code: u8, reason: Option<&str>) {
    let reason = reason.map(|r| {
        let mut end = r.len().min(1024);
        while !r.is_char_boundary(end) {
            end -= 1;
        }
        &r[..end]
    });
    let props = reason.map_or(0, |r| 3 + r.len());
    let remaining = 1 + varint_len(props) + props;
    out.put_u8(0xE0);
    put_varint(out, remaining);
    out.put_u8(code);
    put_varint(out, props);
    if let Some(r) = reason {
        put_str(out, 31, r.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{ConnAck, ConnectReturnCode, PubAck, PubAckReason};

    fn plain<'a>(
        topic: &'a str,
        payload: &'a [u8],
        qos: u8,
        pkid: u16,
        retain: bool,
    ) -> Outgoing<'a> {
        Outgoing {
            topic,
            payload,
            qos,
            pkid,
            retain,
            dup: false,
            props: None,
        }
    }

    fn encode_publish_plain(
        out: &mut BytesMut,
        topic: &str,
        payload: &[u8],
        qos: u8,
        pkid: u16,
        retain: bool,
    ) -> Result<(), protocol::Error> {
        encode_publish(out, &plain(topic, payload, qos, pkid, retain))
    }

    #[test]
    fn outgoing_publish_bytes() {
        let mut out = BytesMut::new();
        encode_publish_plain(&mut out, "a/b", b"hi", 1, 7, true).unwrap();
        assert_eq!(
            &out[..],
            &[0x33, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']
        );
        let mut out = BytesMut::new();
        encode_publish_plain(&mut out, "t", b"", 0, 7, false).unwrap();
        assert_eq!(&out[..], &[0x30, 3, 0, 1, b't']);
    }

    #[test]
    fn outgoing_publish_round_trips_through_the_codec() {
        let payload = vec![0xAB; 300];
        let mut buf = BytesMut::new();
        encode_publish_plain(&mut buf, "x/y", &payload, 1, 513, false).unwrap();
        let inbound = decode(&mut buf, 1024, Version::V311).unwrap().unwrap();
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
        assert!(decode(&mut buf, 1024, Version::V311).unwrap().is_none());
        buf.extend_from_slice(b"txy");
        assert!(decode(&mut buf, 1024, Version::V311).unwrap().is_some());
    }

    #[test]
    fn oversized_packet_refused_from_its_header() {
        // Remaining length 16384 announced, only the header present.
        let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x01][..]);
        match decode(&mut buf, 1024, Version::V311) {
            Err(ProtocolError::TooLarge { size, max }) => assert_eq!((size, max), (16388, 1024)),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_malformed() {
        let mut buf = BytesMut::from(&[0xF0, 0x00][..]);
        assert!(matches!(
            decode(&mut buf, 1024, Version::V311),
            Err(ProtocolError::Malformed(_))
        ));
        // Remaining length with five continuation bytes.
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(matches!(
            decode(&mut buf, usize::MAX, Version::V311),
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
                ..
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
        for (name, level) in [(&b"MQTT"[..], 6), (b"MQTT", 3), (b"MQIsdp", 4)] {
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
                ..
            },
            Hello::Accepted {
                version: new,
                connect: c311,
                login: l311,
                will: w311,
                ..
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
            Version::V311,
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
            Version::V311,
        )
        .unwrap();
        assert_eq!(&out[..], &[0x20, 2, 0, 1, 0x40, 2, 1, 2]);
    }
}
