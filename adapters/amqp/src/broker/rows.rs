//! The encoding of the definition rows (the table is in `broker.rs`).
//!
//! Bindings:
//!
//! ```text
//! amqp/binding/<n>:<queue><m>:<exchange><key>
//!     a queue binding without arguments (the name version 1 rows have)
//! amqp/binding/<q|e>/<n>:<destination><m>:<source><k>:<key><arguments in hex>
//!     a queue (q) or exchange (e) binding with arguments, or an exchange
//!     binding without
//! value, version 2: u8 2, u8 destination (0 queue, 1 exchange), then
//!     destination, source and key (each u8 length + UTF-8), then the
//!     arguments' field table (AMQP encoding; nothing when none)
//! value, version 1 (still read): u8 1, then queue, exchange and key
//! ```

use std::sync::Arc;

use bytes::{Buf, BufMut};

use super::{BINDING_ROW, Exchange};
use crate::args::QueueArgs;
use crate::bindings::BindArgs;
use crate::convert::Kind;
use crate::queue::Flags;

/// What a binding leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest<'a> {
    Queue(&'a str),
    Exchange(&'a str),
}

/// A binding read back from its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    /// Its destination is an exchange (else a queue).
    pub to_exchange: bool,
    pub destination: String,
    pub source: String,
    pub key: String,
    pub args: BindArgs,
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

pub(crate) fn binding_row(dest: Dest<'_>, source: &str, key: &str, args: &BindArgs) -> String {
    let (tag, destination) = match dest {
        Dest::Queue(queue) if args.as_bytes().is_empty() => {
            return format!(
                "{BINDING_ROW}{}:{queue}{}:{source}{key}",
                queue.len(),
                source.len()
            );
        }
        Dest::Queue(queue) => ('q', queue),
        Dest::Exchange(exchange) => ('e', exchange),
    };
    let mut row = format!(
        "{BINDING_ROW}{tag}/{}:{destination}{}:{source}{}:{key}",
        destination.len(),
        source.len(),
        key.len()
    );
    for b in args.as_bytes() {
        row.push_str(&format!("{b:02x}"));
    }
    row
}

pub(crate) fn encode_binding(dest: Dest<'_>, source: &str, key: &str, args: &BindArgs) -> Vec<u8> {
    let (kind, destination) = match dest {
        Dest::Queue(q) => (0, q),
        Dest::Exchange(x) => (1, x),
    };
    let mut out = vec![2, kind];
    put_short(&mut out, destination);
    put_short(&mut out, source);
    put_short(&mut out, key);
    out.extend_from_slice(args.as_bytes());
    out
}

pub(crate) fn decode_binding(mut v: &[u8]) -> Option<Stored> {
    let version = *v.first()?;
    v.advance(1);
    let to_exchange = match version {
        1 => false,
        2 => {
            let kind = *v.first()?;
            v.advance(1);
            match kind {
                0 => false,
                1 => true,
                _ => return None,
            }
        }
        _ => return None,
    };
    let destination = get_short(&mut v)?;
    let source = get_short(&mut v)?;
    let key = get_short(&mut v)?;
    let args = match version {
        1 if v.is_empty() => BindArgs::default(),
        1 => return None,
        _ => BindArgs::from_bytes(v)?,
    };
    Some(Stored {
        to_exchange,
        destination,
        source,
        key,
        args,
    })
}

pub(super) fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Direct => 0,
        Kind::Fanout => 1,
        Kind::Topic => 2,
        Kind::Headers => 3,
    }
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
    use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

    #[test]
    fn rows_round_trip_and_refuse_cuts() {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("x-match"),
            AMQPValue::LongString("any".into()),
        );
        let args = BindArgs::new(&t).expect("args");
        for (dest, args) in [
            (Dest::Queue("q"), BindArgs::default()),
            (Dest::Queue("q"), args.clone()),
            (Dest::Exchange("d"), args.clone()),
        ] {
            let v = encode_binding(dest, "ex", "a.b", &args);
            let (to_exchange, destination) = match dest {
                Dest::Queue(q) => (false, q),
                Dest::Exchange(x) => (true, x),
            };
            assert_eq!(
                decode_binding(&v),
                Some(Stored {
                    to_exchange,
                    destination: destination.into(),
                    source: "ex".into(),
                    key: "a.b".into(),
                    args: args.clone(),
                })
            );
            let header = 2 + 2 + 3 + 4;
            for cut in 0..header {
                assert!(decode_binding(&v[..cut]).is_none(), "cut at {cut}");
            }
        }
        // A version 1 row, as earlier releases wrote them.
        let v1 = [&[1u8, 1, b'q', 2][..], b"ex", &[3], b"a.b"].concat();
        let old = decode_binding(&v1).expect("version 1");
        assert_eq!(
            (old.destination.as_str(), old.args),
            ("q", BindArgs::default())
        );
        assert_eq!(
            binding_row(Dest::Queue("q"), "ex", "a.b", &BindArgs::default()),
            "amqp/binding/1:q2:exa.b",
            "the name version 1 rows have"
        );
        assert_ne!(
            binding_row(Dest::Queue("ab"), "c", "", &BindArgs::default()),
            binding_row(Dest::Queue("a"), "bc", "", &BindArgs::default())
        );
        assert_ne!(
            binding_row(Dest::Queue("q"), "x", "k", &args),
            binding_row(Dest::Exchange("q"), "x", "k", &args)
        );
    }

    #[test]
    fn exchange_rows_decode() {
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
    }
}
