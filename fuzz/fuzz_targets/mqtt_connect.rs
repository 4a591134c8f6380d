//! The first-packet decoder (`decode_connect`) on any bytes, then the
//! packet decoder on what follows a CONNECT: never a panic, a CONNECT
//! consumed whole and only it, the same outcome fed at once or byte by byte.

#![no_main]

use bytes::{BufMut, BytesMut};
use edge_mqtt::fuzzing::{self, DecodeError, Hello};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 16;

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

/// The hello and the bytes left after it, or the error.
fn hello(data: &[u8], chunk: usize) -> Result<Option<(Hello, BytesMut)>, DecodeError> {
    let mut buf = BytesMut::new();
    let mut pieces = data.chunks(chunk.max(1));
    loop {
        let Some(piece) = pieces.next() else {
            return Ok(None);
        };
        buf.put_slice(piece);
        let before = buf.clone();
        match fuzzing::decode_connect(&mut buf, MAX)? {
            Some(h) => {
                assert_eq!(Some(before.len() - buf.len()), announced_size(&before));
                assert_eq!(&before[before.len() - buf.len()..], &buf[..]);
                for rest in pieces {
                    buf.put_slice(rest);
                }
                return Ok(Some((h, buf)));
            }
            None => assert_eq!(buf, before),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = hello(data, data.len());
    let split = hello(data, 1);
    assert_eq!(whole, split);
    if let Ok(Some((hello, mut rest))) = whole {
        // What follows the CONNECT goes to the packet decoder of its
        // protocol version as it is.
        let v5 = matches!(hello, Hello::Accepted { level: 5, .. });
        while let Ok(Some(_)) = fuzzing::decode_as(&mut rest, MAX, v5) {}
    }
});
