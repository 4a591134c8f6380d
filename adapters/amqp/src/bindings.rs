//! What the topic trie cannot evaluate, evaluated here: headers exchanges
//! (a binding's arguments against a message's headers) and
//! exchange-to-exchange bindings, plus binding arguments and their rows.
//!
//! A publish to exchange S with key K is resolved into the topics the
//! core routes it on ([`Resolved`], `Router::publish_to`): S's own topic,
//! for each headers binding of a queue whose arguments match the headers
//! the queue's topic (`convert::headers_filter`), and for each exchange D
//! an exchange binding from a reached exchange matches (under that
//! exchange's type), D's own topic and D's bindings in turn. Each exchange
//! is visited once, so cycles end, and the core delivers once per queue.

use std::cmp::Ordering;
use std::collections::HashMap;

use amq_protocol::frame::WriteContext;
use amq_protocol::types::{AMQPValue, FieldTable};

use crate::convert::{self, AMQ_TOPIC, Kind};
use crate::error::{Exception, PRECONDITION_FAILED};

/// A binding's arguments, as their AMQP field-table encoding (empty for
/// none): what identifies a binding besides source, destination and key,
/// and what its row stores.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct BindArgs(Vec<u8>);

impl BindArgs {
    pub(crate) fn new(table: &FieldTable) -> Result<BindArgs, Exception> {
        if table.inner().is_empty() {
            return Ok(BindArgs::default());
        }
        let ctx = WriteContext::from(Vec::new());
        let ctx = amq_protocol::types::generation::gen_field_table(table)(ctx)
            .map_err(|e| Exception::connection(crate::error::INTERNAL_ERROR, e))?;
        Ok(BindArgs(ctx.into_inner().0))
    }

    /// Arguments read back from a row; `None` if they do not parse.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<BindArgs> {
        if bytes.is_empty() {
            return Some(BindArgs::default());
        }
        let (rest, _) = amq_protocol::types::parsing::parse_field_table(bytes).ok()?;
        rest.is_empty().then(|| BindArgs(bytes.to_vec()))
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub(crate) fn table(&self) -> FieldTable {
        if self.0.is_empty() {
            return FieldTable::default();
        }
        amq_protocol::types::parsing::parse_field_table(&self.0[..])
            .map(|(_, t)| t)
            .unwrap_or_default()
    }
}

/// How a headers binding combines its conditions (`x-match`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatchKind {
    All,
    Any,
}

/// A headers binding, ready to be matched against messages.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HeadersMatch {
    kind: MatchKind,
    /// Key and wanted value; `None` (a void value): present with any value.
    conditions: Vec<(String, Option<AMQPValue>)>,
}

impl HeadersMatch {
    /// The binding's arguments as RabbitMQ reads them: `x-match` is `all`
    /// (the default), `any`, `all-with-x` or `any-with-x`; other keys that
    /// start with `x-` are conditions only in the `-with-x` variants.
    pub(crate) fn parse(args: &FieldTable) -> Result<HeadersMatch, Exception> {
        let (kind, with_x) = match args.inner().get("x-match") {
            None => (MatchKind::All, false),
            Some(AMQPValue::LongString(s)) => match_kind(s.as_bytes())?,
            Some(AMQPValue::ShortString(s)) => match_kind(s.as_str().as_bytes())?,
            Some(other) => {
                return Err(Exception::channel(
                    PRECONDITION_FAILED,
                    format!("Invalid x-match field type {other:?}; expected longstr"),
                ));
            }
        };
        let conditions = args
            .inner()
            .iter()
            .filter(|(k, _)| {
                let k = k.as_str();
                k != "x-match" && (with_x || !k.starts_with("x-"))
            })
            .map(|(k, v)| {
                let wanted = match v {
                    AMQPValue::Void => None,
                    v => Some(v.clone()),
                };
                (k.as_str().to_string(), wanted)
            })
            .collect();
        Ok(HeadersMatch { kind, conditions })
    }

    /// Whether a message with `headers` matches: `all` needs every
    /// condition met (so no conditions match everything), `any` at least one.
    pub(crate) fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let met = |(key, wanted): &(String, Option<AMQPValue>)| {
            let Some(value) = headers.and_then(|h| h.inner().get(key.as_str())) else {
                return false;
            };
            wanted.as_ref().is_none_or(|w| same_value(w, value))
        };
        match self.kind {
            MatchKind::All => self.conditions.iter().all(met),
            MatchKind::Any => self.conditions.iter().any(met),
        }
    }
}

fn match_kind(value: &[u8]) -> Result<(MatchKind, bool), Exception> {
    Ok(match value {
        b"all" => (MatchKind::All, false),
        b"any" => (MatchKind::Any, false),
        b"all-with-x" => (MatchKind::All, true),
        b"any-with-x" => (MatchKind::Any, true),
        other => {
            return Err(Exception::channel(
                PRECONDITION_FAILED,
                format!(
                    "Invalid x-match field value \"{}\"; expected all, any, all-with-x, or any-with-x",
                    String::from_utf8_lossy(other)
                ),
            ));
        }
    })
}

/// Equality of header values as RabbitMQ compares them: numbers by value
/// whatever their width, strings by their bytes whatever their type.
fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    match (number(a), number(b)) {
        (Some(x), Some(y)) => return x.partial_cmp(&y) == Some(Ordering::Equal),
        (Some(_), None) | (None, Some(_)) => return false,
        (None, None) => {}
    }
    match (text(a), text(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => a == b,
        _ => false,
    }
}

fn number(v: &AMQPValue) -> Option<f64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => f64::from(*n),
        AMQPValue::ShortShortUInt(n) => f64::from(*n),
        AMQPValue::ShortInt(n) => f64::from(*n),
        AMQPValue::ShortUInt(n) => f64::from(*n),
        AMQPValue::LongInt(n) => f64::from(*n),
        AMQPValue::LongUInt(n) => f64::from(*n),
        AMQPValue::LongLongInt(n) => *n as f64,
        AMQPValue::Float(n) => f64::from(*n),
        AMQPValue::Double(n) => *n,
        _ => return None,
    })
}

fn text(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A topic exchange's matching, as RabbitMQ's: words split at `.`, `*`
/// one word, `#` zero or more, anywhere in the binding key.
pub(crate) fn topic_matches(binding: &str, key: &str) -> bool {
    fn go(b: &[&str], k: &[&str]) -> bool {
        match b.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|skip| go(rest, &k[skip..])),
            Some((&w, rest)) => match k.split_first() {
                Some((kw, krest)) if w == "*" || w == *kw => go(rest, krest),
                _ => false,
            },
        }
    }
    let b: Vec<&str> = binding.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&b, &k)
}

/// Which publishes a binding from an exchange takes, under that
/// exchange's type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Matcher {
    Direct(String),
    Fanout,
    Topic(String),
    Headers(HeadersMatch),
}

impl Matcher {
    /// The matcher of a binding from an exchange of `kind`.
    pub(crate) fn new(kind: Kind, key: &str, args: &BindArgs) -> Result<Matcher, Exception> {
        Ok(match kind {
            Kind::Direct => Matcher::Direct(key.to_string()),
            Kind::Fanout => Matcher::Fanout,
            Kind::Topic => Matcher::Topic(key.to_string()),
            Kind::Headers => Matcher::Headers(HeadersMatch::parse(&args.table())?),
        })
    }

    fn matches(&self, key: &str, headers: Option<&FieldTable>) -> bool {
        match self {
            Matcher::Direct(k) => k == key,
            Matcher::Fanout => true,
            Matcher::Topic(b) => topic_matches(b, key),
            Matcher::Headers(h) => h.matches(headers),
        }
    }
}

/// Where an evaluated binding leads.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Leads {
    /// A queue bound to a headers exchange: its topic there.
    Topic(String),
    /// Another exchange.
    Exchange(String),
}

/// A binding the adapter evaluates (not the trie).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Edge {
    pub matcher: Matcher,
    pub leads: Leads,
    /// With `leads`, what identifies the binding.
    pub key: String,
    pub args: BindArgs,
}

/// The edges of each exchange that has any, by source exchange.
pub(crate) type Edges = HashMap<String, Vec<Edge>>;

/// The topics one publish is routed on.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Resolved {
    /// The message's topic: the exchange's own, or, when an exchange
    /// binding reached `amq.topic`, the MQTT topic of the key there (so
    /// that MQTT subscribers see their topic).
    pub topic: Option<String>,
    /// The other topics it goes to as well.
    pub also: Vec<String>,
}

/// Resolves a publish to `exchange` (of `kind`) with `key` and `headers`
/// through `edges`; `kinds` gives the type of every exchange reached.
pub(crate) fn resolve(
    exchange: &str,
    kind: Kind,
    key: &str,
    headers: Option<&FieldTable>,
    edges: &Edges,
    kinds: impl Fn(&str) -> Option<Kind>,
) -> Resolved {
    let topic = convert::topic_of(exchange, kind, key);
    if !edges.contains_key(exchange) {
        return Resolved {
            topic,
            also: Vec::new(),
        };
    }
    let mut also = Vec::new();
    let mut visited: Vec<&str> = vec![exchange];
    let mut next = 0;
    let mut mqtt = None;
    while let Some(&x) = visited.get(next) {
        next += 1;
        for edge in edges.get(x).into_iter().flatten() {
            if !edge.matcher.matches(key, headers) {
                continue;
            }
            match &edge.leads {
                Leads::Topic(t) => also.push(t.clone()),
                Leads::Exchange(d) if !visited.contains(&d.as_str()) => {
                    visited.push(d);
                    let Some(dkind) = kinds(d) else { continue };
                    match convert::topic_of(d, dkind, key) {
                        Some(t) if d == AMQ_TOPIC => mqtt = Some(t),
                        Some(t) if dkind != Kind::Headers => also.push(t),
                        _ => {}
                    }
                }
                Leads::Exchange(_) => {}
            }
        }
    }
    match mqtt {
        Some(t) => {
            also.extend(topic);
            Resolved {
                topic: Some(t),
                also,
            }
        }
        None => Resolved { topic, also },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::{LongString, ShortString};

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(ShortString::from(*k), v.clone());
        }
        t
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn headers_match_like_rabbitmq() {
        let all = HeadersMatch::parse(&table(&[
            ("format", s("pdf")),
            ("type", s("report")),
            ("x-tag", s("a")),
        ]))
        .expect("parse");
        let msg = table(&[("format", s("pdf")), ("type", s("report"))]);
        assert!(all.matches(Some(&msg)), "x- keys are ignored");
        let wrong = table(&[("format", s("pdf")), ("type", s("log"))]);
        assert!(!all.matches(Some(&wrong)));
        assert!(!all.matches(None));

        let any = HeadersMatch::parse(&table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("n", AMQPValue::LongInt(1)),
        ]))
        .expect("parse");
        assert!(any.matches(Some(&table(&[("n", AMQPValue::LongLongInt(1))]))));
        assert!(!any.matches(Some(&table(&[("n", s("1"))]))));
        assert!(!any.matches(Some(&table(&[]))));

        let present = HeadersMatch::parse(&table(&[("k", AMQPValue::Void)])).expect("parse");
        assert!(present.matches(Some(&table(&[("k", s("whatever"))]))));
        assert!(!present.matches(Some(&table(&[("j", s("whatever"))]))));

        let with_x =
            HeadersMatch::parse(&table(&[("x-match", s("all-with-x")), ("x-tag", s("a"))]))
                .expect("parse");
        assert!(with_x.matches(Some(&table(&[("x-tag", s("a"))]))));
        assert!(!with_x.matches(Some(&table(&[("x-tag", s("b"))]))));
        let any_x = HeadersMatch::parse(&table(&[("x-match", s("any-with-x")), ("x-a", s("1"))]))
            .expect("parse");
        assert!(any_x.matches(Some(&table(&[("x-a", s("1"))]))));

        let empty = HeadersMatch::parse(&table(&[])).expect("parse");
        assert!(empty.matches(None), "all of nothing");
        let e = HeadersMatch::parse(&table(&[("x-match", s("some"))])).expect_err("invalid");
        assert_eq!(e.code, PRECONDITION_FAILED);
    }

    #[test]
    fn topic_matching_has_hash_anywhere() {
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*.c", "a.c"));
        assert!(topic_matches("a.#.c", "a.c"));
        assert!(topic_matches("a.#.c", "a.x.y.c"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "a.b"));
        assert!(!topic_matches("a", "a.b"));
    }

    #[test]
    fn args_round_trip() {
        let t = table(&[("x-match", s("any")), ("a", AMQPValue::LongInt(3))]);
        let a = BindArgs::new(&t).expect("encode");
        assert_eq!(BindArgs::from_bytes(a.as_bytes()), Some(a.clone()));
        assert_eq!(a.table(), t);
        assert_eq!(
            BindArgs::new(&FieldTable::default()).expect("empty"),
            BindArgs::default()
        );
        assert_eq!(BindArgs::from_bytes(&a.as_bytes()[..3]), None);
    }

    #[test]
    fn exchange_bindings_resolve_once_and_end_in_cycles() {
        let mut edges = Edges::new();
        let ex = |d: &str| Edge {
            matcher: Matcher::Fanout,
            leads: Leads::Exchange(d.to_string()),
            key: String::new(),
            args: BindArgs::default(),
        };
        edges.insert("s".into(), vec![ex("d1"), ex("d2")]);
        edges.insert("d1".into(), vec![ex("s"), ex("d2")]);
        let kinds = |_: &str| Some(Kind::Fanout);
        let r = resolve("s", Kind::Fanout, "k", None, &edges, kinds);
        assert_eq!(r.topic.as_deref(), Some("$amqp/s/k"));
        assert_eq!(r.also, ["$amqp/d1/k", "$amqp/d2/k"]);

        edges.insert("d2".into(), vec![ex(AMQ_TOPIC)]);
        let kinds = |x: &str| {
            Some(if x == AMQ_TOPIC {
                Kind::Topic
            } else {
                Kind::Fanout
            })
        };
        let r = resolve("s", Kind::Fanout, "a.b", None, &edges, kinds);
        assert_eq!(r.topic.as_deref(), Some("a/b"), "MQTT sees its topic");
        assert_eq!(r.also, ["$amqp/d1/a.b", "$amqp/d2/a.b", "$amqp/s/a.b"]);
    }
}
