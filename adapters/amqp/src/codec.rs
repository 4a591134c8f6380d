//! Frames on the wire, through amq-protocol's parser and generator.
//!
//! Before a frame is handed to the parser its 7-byte header is checked
//! here: the type octet, and the announced size against the negotiated
//! frame-max, so an oversized frame is refused before any of it is
//! buffered. The end octet is checked once the whole frame is in.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::constants::{
    FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD,
};
use bytes::{Buf, BytesMut};

/// The protocol header of AMQP 0-9-1, also the answer to a wrong one.
pub(crate) const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Type octet, channel (u16) and payload size (u32).
const HEADER_LEN: usize = 7;
/// Header and end octet around the payload.
pub(crate) const FRAME_OVERHEAD: usize = HEADER_LEN + 1;

/// A frame that cannot be read: the connection ends with 501 or 502.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame type {0} is not a method, header, body or heartbeat")]
    UnknownType(u8),
    #[error("frame of {size} octets exceeds the negotiated frame-max of {max}")]
    TooLarge { size: u64, max: u32 },
    #[error("frame end octet is {0:#04x}, not 0xce")]
    BadEnd(u8),
    #[error("malformed {kind} frame on channel {channel}")]
    Malformed { kind: &'static str, channel: u16 },
}

impl FrameError {
    /// The reply code of the connection close (AMQP 0-9-1 §4.2.3 and
    /// `constants`): framing is 501 FRAME_ERROR, a frame whose payload does
    /// not parse is 502 SYNTAX_ERROR.
    pub(crate) fn reply_code(&self) -> u16 {
        match self {
            FrameError::Malformed { .. } => 502,
            _ => 501,
        }
    }
}

/// The outcome of reading the 8-octet protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Greeting {
    /// Not all 8 octets are in yet.
    Incomplete,
    Accepted,
    /// Another protocol or version: answer [`PROTOCOL_HEADER`] and close.
    Refused,
}

/// Checks (and consumes) the protocol header at the start of `buf`.
pub(crate) fn greeting(buf: &mut BytesMut) -> Greeting {
    let n = buf.len().min(PROTOCOL_HEADER.len());
    if buf[..n] != PROTOCOL_HEADER[..n] {
        return Greeting::Refused;
    }
    if n < PROTOCOL_HEADER.len() {
        return Greeting::Incomplete;
    }
    buf.advance(PROTOCOL_HEADER.len());
    Greeting::Accepted
}

/// Takes the next whole frame off `buf`; `Ok(None)` until it is all in.
/// `frame_max` bounds the whole frame (header and end octet included).
pub(crate) fn decode(buf: &mut BytesMut, frame_max: u32) -> Result<Option<AMQPFrame>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = match buf[0] {
        FRAME_METHOD => "method",
        FRAME_HEADER => "content header",
        FRAME_BODY => "content body",
        FRAME_HEARTBEAT => "heartbeat",
        other => return Err(FrameError::UnknownType(other)),
    };
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let payload = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    let size = u64::from(payload) + FRAME_OVERHEAD as u64;
    if size > u64::from(frame_max) {
        return Err(FrameError::TooLarge {
            size,
            max: frame_max,
        });
    }
    let size = size as usize;
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    if buf[size - 1] != FRAME_END {
        return Err(FrameError::BadEnd(buf[size - 1]));
    }
    let frame = match parse_frame(&buf[..size]) {
        Ok((&[], frame)) => frame,
        _ => return Err(FrameError::Malformed { kind, channel }),
    };
    buf.advance(size);
    Ok(Some(frame))
}

/// A frame the generator refused (a value out of its range).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {frame}: {reason}")]
pub(crate) struct EncodeError {
    pub frame: String,
    pub reason: String,
}

/// Appends `frame` to `out`.
pub(crate) fn encode(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), EncodeError> {
    let start = out.len();
    match gen_frame(frame)(WriteContext::from(std::mem::take(out))) {
        Ok(ctx) => {
            *out = ctx.into_inner().0;
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(EncodeError {
                frame: frame.to_string(),
                reason: e.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{AMQPClass, channel};

    fn open_frame() -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            &mut out,
            &AMQPFrame::Method(
                1,
                AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            ),
        )
        .expect("encode");
        out
    }

    #[test]
    fn channel_open_is_the_spec_bytes_and_round_trips() {
        let bytes = open_frame();
        // method frame, channel 1, 5 octets: class 20, method 10, reserved shortstr.
        assert_eq!(bytes, [1, 0, 1, 0, 0, 0, 5, 0, 20, 0, 10, 0, 0xce]);
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = decode(&mut buf, 4096).expect("valid").expect("whole");
        assert_eq!(frame.channel_id(), 1);
        assert!(buf.is_empty());
    }

    #[test]
    fn every_cut_waits_for_more() {
        let bytes = open_frame();
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(decode(&mut buf, 4096), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header() {
        // Only the 7-byte header of a 1 MiB body frame.
        let mut buf = BytesMut::from(&[3u8, 0, 1, 0, 0x10, 0, 0][..]);
        assert_eq!(
            decode(&mut buf, 131_072),
            Err(FrameError::TooLarge {
                size: (1 << 20) + 8,
                max: 131_072
            })
        );
    }

    #[test]
    fn bad_end_octet_unknown_type_and_garbage_are_named() {
        let mut bytes = open_frame();
        let last = bytes.len() - 1;
        bytes[last] = 0;
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(decode(&mut buf, 4096), Err(FrameError::BadEnd(0)));
        let mut buf = BytesMut::from(&[9u8, 0, 0, 0, 0, 0, 0, 0xce][..]);
        assert_eq!(decode(&mut buf, 4096), Err(FrameError::UnknownType(9)));
        // A method frame naming class 999.
        let mut buf = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 4, 0x03, 0xe7, 0, 1, 0xce][..]);
        let e = decode(&mut buf, 4096).expect_err("unknown class");
        assert_eq!(e.reply_code(), 502);
    }

    #[test]
    fn protocol_headers() {
        let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01rest"[..]);
        assert_eq!(greeting(&mut buf), Greeting::Accepted);
        assert_eq!(&buf[..], b"rest");
        assert_eq!(
            greeting(&mut BytesMut::from(&b"AMQ"[..])),
            Greeting::Incomplete
        );
        assert_eq!(
            greeting(&mut BytesMut::from(&b"AMQP\x01\x01\x00\x09"[..])),
            Greeting::Refused
        );
        assert_eq!(
            greeting(&mut BytesMut::from(&b"GET / HTTP/1.1"[..])),
            Greeting::Refused
        );
    }
}
