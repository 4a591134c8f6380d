//! Typed dead-letter and replay metadata: the store's own columns, never
//! message headers.
//!
//! Dead letter (`dead_letters` value; key: the log seq it was parked at):
//!
//! ```text
//! u8   version = 2
//! u64  original seq      seq of its message id (its first log seq)
//! u16  upstream count,   then per upstream: u16 length, name (UTF-8)
//! u32  reason length,    reason (UTF-8)
//! ...  the encoded record
//! ```
//!
//! Replay mark (`replays` value; key: the log seq of the replayed copy):
//!
//! ```text
//! u64  original seq
//! u16  upstream count,   then per upstream: u16 length, name (UTF-8)
//! ```

use bytes::{Buf, BufMut};

use crate::Seq;

const VERSION: u8 = 2;

/// Why and by whom a record is parked (the input of [`crate::Store::park`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    /// The cursor (upstream) that parks it.
    pub upstream: String,
    /// The seq of its message id: its own seq, or for a replayed dead letter
    /// the seq it was first forwarded under.
    pub original_seq: Seq,
    pub reason: String,
}

/// A replayed dead letter in the log: forwarded only by the upstreams that
/// parked it, under its original message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub original_seq: Seq,
    pub upstreams: Vec<String>,
}

impl Replay {
    /// Whether `upstream` is to forward the replayed copy.
    pub fn is_for(&self, upstream: &str) -> bool {
        self.upstreams.iter().any(|u| u == upstream)
    }
}

/// The typed part of a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    pub original_seq: Seq,
    pub upstreams: Vec<String>,
    pub reason: String,
}

pub(crate) fn encode(meta: &Meta, record: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + meta.reason.len() + record.len());
    out.put_u8(VERSION);
    put_replay(
        &mut out,
        &Replay {
            original_seq: meta.original_seq,
            upstreams: meta.upstreams.clone(),
        },
    );
    out.put_u32_le(meta.reason.len() as u32);
    out.put_slice(meta.reason.as_bytes());
    out.put_slice(record);
    out
}

/// Splits a dead-letter value; `None` if it is not one this store wrote.
pub(crate) fn decode(mut value: &[u8]) -> Option<(Meta, &[u8])> {
    if value.first() != Some(&VERSION) {
        return None;
    }
    value.advance(1);
    let replay = take_replay(&mut value)?;
    let len = take_u32(&mut value)? as usize;
    let reason = take_str(&mut value, len)?;
    Some((
        Meta {
            original_seq: replay.original_seq,
            upstreams: replay.upstreams,
            reason,
        },
        value,
    ))
}

/// The dead letter for a seq parked again by another upstream: both names
/// kept, reasons joined when they differ.
pub(crate) fn merge(old: &Meta, new: &Meta) -> Meta {
    let mut upstreams = old.upstreams.clone();
    for u in &new.upstreams {
        if !upstreams.contains(u) {
            upstreams.push(u.clone());
        }
    }
    let reason = if old.reason == new.reason {
        new.reason.clone()
    } else {
        format!("{} | {}", old.reason, new.reason)
    };
    Meta {
        original_seq: old.original_seq,
        upstreams,
        reason,
    }
}

pub(crate) fn encode_replay(replay: &Replay) -> Vec<u8> {
    let mut out = Vec::new();
    put_replay(&mut out, replay);
    out
}

pub(crate) fn decode_replay(mut value: &[u8]) -> Option<Replay> {
    take_replay(&mut value)
}

fn put_replay(out: &mut Vec<u8>, replay: &Replay) {
    out.put_u64_le(replay.original_seq);
    out.put_u16_le(replay.upstreams.len().min(u16::MAX as usize) as u16);
    for u in replay.upstreams.iter().take(u16::MAX as usize) {
        let name = &u.as_bytes()[..u.len().min(u16::MAX as usize)];
        out.put_u16_le(name.len() as u16);
        out.put_slice(name);
    }
}

fn take_replay(value: &mut &[u8]) -> Option<Replay> {
    let original_seq = take_u64(value)?;
    let count = take_u16(value)?;
    let mut upstreams = Vec::with_capacity(usize::from(count).min(value.len() / 2));
    for _ in 0..count {
        let len = usize::from(take_u16(value)?);
        upstreams.push(take_str(value, len)?);
    }
    Some(Replay {
        original_seq,
        upstreams,
    })
}

fn take_u16(v: &mut &[u8]) -> Option<u16> {
    (v.len() >= 2).then(|| v.get_u16_le())
}

fn take_u32(v: &mut &[u8]) -> Option<u32> {
    (v.len() >= 4).then(|| v.get_u32_le())
}

fn take_u64(v: &mut &[u8]) -> Option<u64> {
    (v.len() >= 8).then(|| v.get_u64_le())
}

fn take_str(v: &mut &[u8], len: usize) -> Option<String> {
    let bytes = v.get(..len)?;
    let s = std::str::from_utf8(bytes).ok()?.to_string();
    v.advance(len);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_layout() {
        let meta = Meta {
            original_seq: 7,
            upstreams: vec!["a".into(), "bc".into()],
            reason: "no".into(),
        };
        let value = encode(&meta, b"REC");
        assert_eq!(
            value,
            [
                &[2u8][..],
                &7u64.to_le_bytes(),
                &[2, 0, 1, 0, b'a', 2, 0, b'b', b'c'],
                &[2, 0, 0, 0, b'n', b'o'],
                b"REC"
            ]
            .concat()
        );
        assert_eq!(decode(&value), Some((meta, &b"REC"[..])));
    }

    #[test]
    fn every_cut_is_refused_or_shorter_never_a_panic() {
        let meta = Meta {
            original_seq: 1,
            upstreams: vec!["up".into()],
            reason: "r".into(),
        };
        let value = encode(&meta, b"");
        for cut in 0..value.len() {
            assert!(decode(&value[..cut]).is_none(), "cut at {cut}");
        }
        let replay = Replay {
            original_seq: 3,
            upstreams: vec!["x".into()],
        };
        let bytes = encode_replay(&replay);
        assert_eq!(decode_replay(&bytes), Some(replay));
        for cut in 0..bytes.len() {
            assert!(decode_replay(&bytes[..cut]).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn merging_keeps_both_names_and_reasons() {
        let a = Meta {
            original_seq: 5,
            upstreams: vec!["a".into()],
            reason: "x".into(),
        };
        let b = Meta {
            original_seq: 9,
            upstreams: vec!["b".into(), "a".into()],
            reason: "y".into(),
        };
        let m = merge(&a, &b);
        assert_eq!(m.upstreams, vec!["a", "b"]);
        assert_eq!(m.reason, "x | y");
        assert_eq!(m.original_seq, 5);
    }
}
