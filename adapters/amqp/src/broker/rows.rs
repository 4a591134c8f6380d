//! The encoding of the definition rows (the table is in `broker.rs`).

use std::sync::Arc;

use bytes::{Buf, BufMut};

use super::{BINDING_ROW, Exchange};
use crate::args::QueueArgs;
use crate::convert::Kind;
use crate::queue::Flags;

pub(super) fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Direct => 0,
        Kind::Fanout => 1,
        Kind::Topic => 2,
        Kind::Headers => 3,
    }
}

fn put_short(out: &mut Vec<u8>, s: &str) {
    let s = crate::error::truncate(s, 255);
    out.put_u8(s.len() as u8);
    out.put_slice(s.as_bytes());
}

fn get_short(v: &mut &[u8]) -> Option<String> {
    let len = usize::from(*v.first()?);
    v.advance(1);
    let s = std::str::from_utf8(v.get(..len)?).ok()?.to_string();
    v.advance(len);
    Some(s)
}

pub(super) fn binding_row(queue: &str, exchange: &str, key: &str) -> String {
    format!(
        "{BINDING_ROW}{}:{queue}{}:{exchange}{key}",
        queue.len(),
        exchange.len()
    )
}

pub(super) fn encode_binding(queue: &str, exchange: &str, key: &str) -> Vec<u8> {
    let mut out = vec![1];
    put_short(&mut out, queue);
    put_short(&mut out, exchange);
    put_short(&mut out, key);
    out
}

pub(super) fn decode_binding(mut v: &[u8]) -> Option<(String, String, String)> {
    if v.first() != Some(&1) {
        return None;
    }
    v.advance(1);
    Some((get_short(&mut v)?, get_short(&mut v)?, get_short(&mut v)?))
}

pub(super) fn decode_exchange(v: &[u8]) -> Option<Exchange> {
    let [1, kind, flags] = *v else { return None };
    let kind = match kind {
        0 => Kind::Direct,
        1 => Kind::Fanout,
        2 => Kind::Topic,
        3 => Kind::Headers,
        _ => return None,
    };
    Some(Exchange {
        kind,
        durable: true,
        auto_delete: flags & 1 != 0,
        internal: flags & 2 != 0,
    })
}

pub(super) fn encode_queue(flags: &Flags) -> Vec<u8> {
    let mut row = vec![2, u8::from(flags.auto_delete)];
    flags.args.encode(&mut row);
    row
}

/// A stored durable queue: version 1 (flags, then an optional
/// x-message-ttl) or 2 (flags, then the arguments' fields).
pub(super) fn decode_queue(v: &[u8]) -> Option<Flags> {
    let (version, auto_delete, rest) = match v {
        [version, flags, rest @ ..] => (*version, flags & 1 != 0, rest),
        _ => return None,
    };
    let args = match (version, rest) {
        (1, []) => QueueArgs::default(),
        (1, ttl) => QueueArgs {
            message_ttl: Some(u64::from_le_bytes(ttl.try_into().ok()?)),
            ..QueueArgs::default()
        },
        (2, fields) => QueueArgs::decode(fields)?,
        _ => return None,
    };
    Some(Flags {
        durable: true,
        exclusive: false,
        auto_delete,
        args: Arc::new(args),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_refuse_cuts() {
        let v = encode_binding("q", "ex", "a.b");
        assert_eq!(
            decode_binding(&v),
            Some(("q".into(), "ex".into(), "a.b".into()))
        );
        for cut in 0..v.len() {
            assert!(decode_binding(&v[..cut]).is_none(), "cut at {cut}");
        }
        assert_eq!(
            decode_exchange(&[1, 2, 3]),
            Some(Exchange {
                kind: Kind::Topic,
                durable: true,
                auto_delete: true,
                internal: true
            })
        );
        assert_eq!(decode_exchange(&[2, 0, 0]), None);
        assert_ne!(binding_row("ab", "c", ""), binding_row("a", "bc", ""));
    }
}
