//! The MQTT 5 packet decoder of the connections on any byte stream: never a
//! panic, never more consumed than one whole frame, the same packets and
//! the same first error whether the stream arrives at once or byte by byte.
//!
//! Input: one byte choosing `max_packet_size`, then the stream.

#![no_main]

use bytes::{BufMut, BytesMut};
use edge_mqtt::fuzzing::{self, DecodeError, Packet};
use libfuzzer_sys::fuzz_target;

type Decoded = (Packet, u8, u16);

fn max_size(selector: u8) -> usize {
    match selector % 4 {
        0 => usize::from(selector),
        1 => 1024,
        2 => 1 << 20,
        _ => usize::MAX,
    }
}

/// Frame size announced by the fixed header at the start of `buf`.
fn announced_size(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(2 + i + remaining);
        }
    }
    None
}

fn run(stream: &[u8], chunk: usize, max: usize) -> (Vec<Decoded>, Option<DecodeError>) {
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buf.put_slice(piece);
        loop {
            let before = buf.clone();
            let out = fuzzing::decode_as(&mut buf, max, true);
            assert!(buf.len() <= before.len());
            assert_eq!(&before[before.len() - buf.len()..], &buf[..]);
            match out {
                Ok(Some(p)) => {
                    assert_eq!(Some(before.len() - buf.len()), announced_size(&before));
                    got.push(p);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before.len());
                    break;
                }
                Err(e) => return (got, Some(e)),
            }
        }
    }
    (got, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let max = max_size(selector);
    let whole = run(stream, stream.len(), max);
    let split = run(stream, 1, max);
    assert_eq!(whole, split);
});
