//! The AMQP frame decoder the connections use, on any bytes: never a
//! panic; nothing consumed while it waits for more; a frame consumes
//! exactly what its header announced; the stream fed byte by byte gives
//! the same frames and the same first error as fed in one go. The first
//! byte picks frame-max (4 KiB to 1 MiB).

#![no_main]

use bytes::{BufMut, BytesMut};
use edge_amqp::fuzzing::{DecodeError, decode};
use libfuzzer_sys::fuzz_target;

fn frames(data: &[u8], chunk: usize, frame_max: u32) -> (Vec<String>, Option<DecodeError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.put_slice(piece);
        loop {
            let before = buf.len();
            let announced = (before >= 7)
                .then(|| u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize + 8);
            match decode(&mut buf, frame_max) {
                Ok(Some(frame)) => {
                    assert_eq!(Some(before - buf.len()), announced);
                    out.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    let frame_max = 4096u32 << (pick % 9);
    let whole = frames(stream, stream.len().max(1), frame_max);
    assert_eq!(frames(stream, 1, frame_max), whole);
});
