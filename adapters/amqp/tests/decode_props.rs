//! The frame decoder on any bytes (the properties the `amqp_decode` fuzz
//! target checks): no panic; nothing consumed while it waits for more;
//! a frame consumes exactly the size its header announced; the stream fed
//! byte by byte gives the same frames and the same first error as in one go.

use bytes::{BufMut, BytesMut};
use edge_amqp::fuzzing::{DecodeError, decode};
use proptest::prelude::*;

const FRAME_MAX: u32 = 4096;

/// Frames and the first error, feeding `data` in pieces of `chunk`.
fn frames(data: &[u8], chunk: usize) -> (Vec<String>, Option<DecodeError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.put_slice(piece);
        loop {
            let before = buf.len();
            let announced = (before >= 7)
                .then(|| u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize + 8);
            match decode(&mut buf, FRAME_MAX) {
                Ok(Some(frame)) => {
                    assert_eq!(Some(before - buf.len()), announced, "consumed the frame");
                    out.push(frame);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "nothing consumed while waiting");
                    break;
                }
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

/// A valid channel.open on channel 1, to start streams that get further.
const OPEN: [u8; 13] = [1, 0, 1, 0, 0, 0, 5, 0, 20, 0, 10, 0, 0xce];

proptest! {
    #[test]
    fn any_bytes(data in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
        let whole = frames(&data, data.len().max(1));
        prop_assert_eq!(frames(&data, chunk), whole.clone());
        prop_assert_eq!(frames(&data, 1), whole);
    }

    #[test]
    fn valid_frames_then_anything(n in 0usize..4, tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut data: Vec<u8> = OPEN.iter().copied().cycle().take(OPEN.len() * n).collect();
        data.extend_from_slice(&tail);
        let (got, _) = frames(&data, 1);
        prop_assert!(got.len() >= n);
        prop_assert_eq!(frames(&data, data.len().max(1)).0, got);
    }
}
