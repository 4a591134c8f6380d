//! Exchanges and routing keys ↔ the core's topics and filters (the mapping
//! is described in `lib.rs`), and the properties of a delivered message.

use edge_core::topic;

/// First level of the topics of every exchange but `amq.topic`. MQTT
/// wildcards never match it (a leading `+` or `#` skips `$` topics).
const NAMESPACE: &str = "$amqp";
/// The exchange where AMQP and MQTT meet.
pub(crate) const AMQ_TOPIC: &str = "amq.topic";

/// How an exchange routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl Kind {
    pub(crate) fn parse(s: &str) -> Option<Kind> {
        match s {
            "direct" => Some(Kind::Direct),
            "fanout" => Some(Kind::Fanout),
            "topic" => Some(Kind::Topic),
            "headers" => Some(Kind::Headers),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Fanout => "fanout",
            Kind::Topic => "topic",
            Kind::Headers => "headers",
        }
    }
}

/// A binding key that has no filter in the topic trie.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unmappable {
    #[error("binding key {0:?}: '#' is only supported as the last word")]
    InnerHash(String),
    #[error("binding key {0:?} has no MQTT filter (a malformed %-escape or '+')")]
    NotMqtt(String),
    /// A headers binding's filter names its queue (`headers_filter`).
    #[error("a headers exchange's bindings have no key filter")]
    Headers,
}

/// One name as one topic level: `%`, `/`, `+`, `#` and NUL %-escaped.
fn escape_level(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            '\0' => out.push_str("%00"),
            c => out.push(c),
        }
    }
}

fn unescape_level(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let code: String = chars.by_ref().take(2).collect();
        out.push(match code.as_str() {
            "25" => '%',
            "2F" => '/',
            "2B" => '+',
            "23" => '#',
            "00" => '\0',
            _ => return None,
        });
    }
    Some(out)
}

/// Whether `topic` lies in an exchange's own namespace (`$amqp/...`),
/// outside the MQTT topic space the topic rules speak of.
pub(crate) fn is_exchange_namespace(topic: &str) -> bool {
    topic == NAMESPACE || topic.starts_with("$amqp/")
}

fn prefix(exchange: &str) -> String {
    let mut out = String::with_capacity(NAMESPACE.len() + exchange.len() + 2);
    out.push_str(NAMESPACE);
    out.push('/');
    escape_level(exchange, &mut out);
    out.push('/');
    out
}

/// The level under a headers exchange's prefix that its bindings' filters
/// start with: `escape_level` never writes a `%` that is not followed by
/// two hex digits, so no publish to any exchange has this level.
const HEADERS_LEVEL: &str = "%headers";

/// The core topic of a publish to `exchange` (of `kind`) with `key`;
/// `None` when it cannot go anywhere (a key on `amq.topic` that is no MQTT
/// topic). A headers exchange's topic is its key as one level, which no
/// binding filter matches: its queues are found by their headers
/// (`bindings.rs`) and reached through [`headers_filter`].
pub(crate) fn topic_of(exchange: &str, kind: Kind, key: &str) -> Option<String> {
    if exchange == AMQ_TOPIC {
        let t = topic::from_routing_key(key)?;
        let reserved = t == NAMESPACE || t.starts_with("$amqp/");
        return (topic::is_valid_topic(&t) && !reserved).then_some(t);
    }
    let mut out = prefix(exchange);
    match kind {
        Kind::Direct | Kind::Fanout | Kind::Headers => escape_level(key, &mut out),
        Kind::Topic => {
            for (i, word) in key.split('.').enumerate() {
                if i > 0 {
                    out.push('/');
                }
                escape_level(word, &mut out);
            }
        }
    }
    Some(out)
}

/// The one filter (and topic) of every binding of `queue` to the headers
/// exchange `exchange`: `$amqp/<exchange>/%headers/<queue>`, a topic no
/// publish has, which the adapter adds to a publish whose headers match.
pub(crate) fn headers_filter(exchange: &str, queue: &str) -> String {
    let mut out = prefix(exchange);
    out.push_str(HEADERS_LEVEL);
    out.push('/');
    escape_level(queue, &mut out);
    out
}

/// The MQTT topic a publish to `amq.topic` names in its `x-mqtt-topic`
/// header (a gateway upstream of this one, or a bridge whose routing key
/// lost the topic's `.`s), if it is a valid topic outside `$amqp/`.
pub(crate) fn named_mqtt_topic(
    headers: Option<&amq_protocol::types::FieldTable>,
) -> Option<String> {
    use amq_protocol::types::AMQPValue;
    let t = match headers?.inner().get(topic::MQTT_TOPIC_HEADER)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        _ => return None,
    };
    let reserved = t == NAMESPACE || t.starts_with("$amqp/");
    (topic::is_valid_topic(&t) && !reserved).then_some(t)
}

/// The trie filter of a binding of a queue to `exchange` with `key`.
pub(crate) fn filter_of(exchange: &str, kind: Kind, key: &str) -> Result<String, Unmappable> {
    let words = |out: &mut String, word: &dyn Fn(&str, &mut String) -> Result<(), Unmappable>| {
        let mut words = key.split('.').peekable();
        let mut first = true;
        while let Some(w) = words.next() {
            if !first {
                out.push('/');
            }
            first = false;
            match w {
                "*" => out.push('+'),
                "#" if words.peek().is_none() => out.push('#'),
                "#" => return Err(Unmappable::InnerHash(key.to_string())),
                w => word(w, out)?,
            }
        }
        Ok(())
    };
    if exchange == AMQ_TOPIC {
        let mut out = String::with_capacity(key.len());
        words(&mut out, &|w, out| {
            let level = topic::from_routing_key(w).ok_or(Unmappable::NotMqtt(key.to_string()))?;
            out.push_str(&level);
            Ok(())
        })?;
        return Ok(out);
    }
    let mut out = prefix(exchange);
    match kind {
        Kind::Direct => escape_level(key, &mut out),
        Kind::Fanout => out.push('#'),
        Kind::Topic => words(&mut out, &|w, out| {
            escape_level(w, out);
            Ok(())
        })?,
        Kind::Headers => return Err(Unmappable::Headers),
    }
    Ok(out)
}

/// The exchange and routing key a message on `topic` is delivered with:
/// the inverse of [`topic_of`]; an MQTT publish is seen on `amq.topic`.
pub(crate) fn origin_of(topic: &str) -> (String, String) {
    let Some(rest) = topic.strip_prefix("$amqp/") else {
        return (AMQ_TOPIC.to_string(), topic::to_routing_key(topic));
    };
    let (exchange, key) = rest.split_once('/').unwrap_or((rest, ""));
    let exchange = unescape_level(exchange).unwrap_or_else(|| exchange.to_string());
    let key: Vec<String> = key
        .split('/')
        .map(|l| unescape_level(l).unwrap_or_else(|| l.to_string()))
        .collect();
    (exchange, key.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::topic::matches;

    #[test]
    fn amq_topic_is_the_mqtt_mapping() {
        assert_eq!(
            topic_of(AMQ_TOPIC, Kind::Topic, "sensors.a.temp").as_deref(),
            Some("sensors/a/temp")
        );
        assert_eq!(
            filter_of(AMQ_TOPIC, Kind::Topic, "sensors.*.#").as_deref(),
            Ok("sensors/+/#")
        );
        assert_eq!(
            topic_of(AMQ_TOPIC, Kind::Topic, "spBv1%2E0.g").as_deref(),
            Some("spBv1.0/g")
        );
        assert_eq!(
            origin_of("spBv1.0/g"),
            (AMQ_TOPIC.into(), "spBv1%2E0.g".into())
        );
        assert_eq!(topic_of(AMQ_TOPIC, Kind::Topic, "$amqp.x.y"), None);
        assert_eq!(topic_of(AMQ_TOPIC, Kind::Topic, ""), None);
        assert_eq!(
            filter_of(AMQ_TOPIC, Kind::Topic, "a.#.b"),
            Err(Unmappable::InnerHash("a.#.b".into()))
        );
    }

    #[test]
    fn direct_keys_are_one_level_and_round_trip() {
        for key in ["plain", "with.dots", "a/b+c#d%e", "", "q\0"] {
            let t = topic_of("ex", Kind::Direct, key).expect("topic");
            assert_eq!(t.matches('/').count(), 2, "{t}");
            assert!(matches(
                &filter_of("ex", Kind::Direct, key).expect("filter"),
                &t
            ));
            assert_eq!(origin_of(&t), ("ex".into(), key.into()));
        }
        let t = topic_of("", Kind::Direct, "orders").expect("default exchange");
        assert_eq!(t, "$amqp//orders");
        assert_eq!(origin_of(&t), (String::new(), "orders".into()));
    }

    #[test]
    fn fanout_and_topic_exchanges_match_like_rabbitmq() {
        let f = filter_of("logs", Kind::Fanout, "ignored").expect("filter");
        assert!(matches(
            &f,
            &topic_of("logs", Kind::Fanout, "any.key").expect("t")
        ));
        assert!(!matches(
            &f,
            &topic_of("other", Kind::Fanout, "k").expect("t")
        ));
        let f = filter_of("tx", Kind::Topic, "a.*.c").expect("filter");
        assert!(matches(
            &f,
            &topic_of("tx", Kind::Topic, "a.b.c").expect("t")
        ));
        assert!(!matches(
            &f,
            &topic_of("tx", Kind::Topic, "a.b.c.d").expect("t")
        ));
        let f = filter_of("tx", Kind::Topic, "a.#").expect("filter");
        assert!(matches(&f, &topic_of("tx", Kind::Topic, "a").expect("t")));
        assert!(matches(
            &f,
            &topic_of("tx", Kind::Topic, "a.b/c").expect("t")
        ));
        assert_eq!(
            origin_of(&topic_of("tx", Kind::Topic, "a.b/c").expect("t")),
            ("tx".into(), "a.b/c".into())
        );
    }

    proptest::proptest! {
        #[test]
        fn any_names_round_trip_and_match_their_bindings(
            exchange in "[a-z./+#%\\x00 ]{0,12}",
            key in "[a-z./+#%*\\x00 ]{0,16}",
        ) {
            for kind in [Kind::Direct, Kind::Topic] {
                let t = topic_of(&exchange, kind, &key).expect("a topic");
                proptest::prop_assert_eq!(origin_of(&t), (exchange.clone(), key.clone()));
                proptest::prop_assert!(!matches("#", &t), "MQTT's # never sees {}", t);
            }
            let direct = topic_of(&exchange, Kind::Direct, &key).expect("a topic");
            let f = filter_of(&exchange, Kind::Direct, &key).expect("a filter");
            proptest::prop_assert!(matches(&f, &direct));
            let fanout = filter_of(&exchange, Kind::Fanout, "x").expect("a filter");
            proptest::prop_assert!(matches(&fanout, &direct));
        }
    }

    #[test]
    fn headers_filters_match_no_publish_but_their_own_topic() {
        let f = headers_filter("hx", "q/1");
        assert!(matches(&f, &f), "the filter is its own topic");
        for kind in [Kind::Direct, Kind::Fanout, Kind::Topic, Kind::Headers] {
            for key in ["%headers.q/1", "%headers", "", "q/1"] {
                let t = topic_of("hx", kind, key).expect("a topic");
                assert!(!matches(&f, &t), "{t}");
            }
        }
        let fanout = filter_of("hx", Kind::Fanout, "").expect("filter");
        assert!(matches(&fanout, &f), "only a fanout of the same name would");
    }

    #[test]
    fn mqtt_wildcards_never_reach_the_namespace() {
        let t = topic_of("ex", Kind::Direct, "k").expect("t");
        assert!(!matches("#", &t));
        assert!(!matches("+/ex/k", &t));
    }
}
