//! MQTT topics and filters, and their lossless mapping to AMQP routing keys.
//!
//! The mapping follows RabbitMQ's MQTT plugin where that is lossless — the
//! level separator `/` becomes `.`, filter wildcards `+` and `#` become `*`
//! and `#` — and escapes what the plain swap would corrupt:
//!
//! | in an MQTT level | in the routing key |
//! |------------------|--------------------|
//! | `.`              | `%2E`              |
//! | `%`              | `%25`              |
//! | a level of `*`   | `%2A`              |
//! | a level of `#`   | `%23`              |
//!
//! So `spBv1.0/group/NDATA/node` travels as `spBv1%2E0.group.NDATA.node` and
//! comes back unchanged. Forwarded messages also carry the original topic
//! in the `x-mqtt-topic` header.

/// Header that carries the original MQTT topic on forwarded messages.
pub const MQTT_TOPIC_HEADER: &str = "x-mqtt-topic";

/// First level of the topics the AMQP adapter gives exchanges other than
/// `amq.topic` (`$amqp/<exchange>/<key>`): reserved to AMQP clients.
pub const AMQP_NAMESPACE: &str = "$amqp";

/// Whether a topic or filter lies in [`AMQP_NAMESPACE`] (MQTT clients may
/// neither publish nor subscribe there; `#` and `+` never reach it, as
/// they never reach a `$` topic).
pub fn is_amqp_namespace(topic_or_filter: &str) -> bool {
    topic_or_filter
        .strip_prefix(AMQP_NAMESPACE)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// MQTT 3.1.1 §4.7.3: a topic name is non-empty, has no wildcards and no NUL.
pub fn is_valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// MQTT 3.1.1 §4.7.1: `#` only as the whole last level, `+` only as a whole level.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let ok = match level {
            "#" => levels.peek().is_none(),
            "+" => true,
            l => !l.contains(['+', '#']),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// First level of a shared subscription's filter (MQTT 5 §4.8.2).
pub const SHARE_PREFIX: &str = "$share/";

/// What a SUBSCRIBE's topic filter asks for, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription<'f> {
    /// An ordinary filter: every match goes to the session.
    Plain(&'f str),
    /// `$share/{group}/{filter}`: each match goes to one member of the
    /// group `(group, filter)`.
    Shared { group: &'f str, filter: &'f str },
}

impl<'f> Subscription<'f> {
    /// The filter topics are matched against (a shared one's own filter).
    pub fn filter(self) -> &'f str {
        match self {
            Subscription::Plain(filter) | Subscription::Shared { filter, .. } => filter,
        }
    }
}

/// Validates a subscription's filter: a plain one by §4.7.1, a shared one
/// (`$share/` first) by MQTT 5 §4.8.2 — its ShareName non-empty and without
/// `/`, `+` or `#`, followed by `/` and a valid, non-empty filter.
/// `None` when invalid. (`$share` alone is a plain filter.)
pub fn parse_subscription(filter: &str) -> Option<Subscription<'_>> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return is_valid_filter(filter).then_some(Subscription::Plain(filter));
    };
    let (group, filter) = rest.split_once('/')?;
    let group_ok = !group.is_empty() && !group.contains(['+', '#', '\0']);
    (group_ok && is_valid_filter(filter)).then_some(Subscription::Shared { group, filter })
}

/// Whether `topic` matches `filter` (both assumed valid). Topics starting
/// with `$` are not matched by a leading wildcard (§4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn escape_level(level: &str, out: &mut String) {
    match level {
        "*" => out.push_str("%2A"),
        "#" => out.push_str("%23"),
        l => {
            for c in l.chars() {
                match c {
                    '.' => out.push_str("%2E"),
                    '%' => out.push_str("%25"),
                    c => out.push(c),
                }
            }
        }
    }
}

/// MQTT topic name → AMQP routing key (lossless).
pub fn to_routing_key(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len() + 8);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        escape_level(level, &mut out);
    }
    out
}

/// MQTT topic filter → AMQP binding key.
pub fn to_binding_key(filter: &str) -> String {
    let mut out = String::with_capacity(filter.len() + 8);
    for (i, level) in filter.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        match level {
            "+" => out.push('*'),
            "#" => out.push('#'),
            l => escape_level(l, &mut out),
        }
    }
    out
}

/// AMQP routing key → MQTT topic name; `None` if the key holds a malformed
/// escape or characters an MQTT topic name cannot have.
pub fn from_routing_key(key: &str) -> Option<String> {
    let mut out = String::with_capacity(key.len());
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        match c {
            '.' => out.push('/'),
            '%' => {
                let code: String = chars.by_ref().take(2).collect();
                out.push(match code.as_str() {
                    "2E" | "2e" => '.',
                    "25" => '%',
                    "2A" | "2a" => '*',
                    "23" => '#',
                    _ => return None,
                });
            }
            '+' | '#' | '\0' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rabbitmq_compatible_for_plain_topics() {
        assert_eq!(to_routing_key("sensors/a/temp"), "sensors.a.temp");
        assert_eq!(to_binding_key("sensors/+/temp"), "sensors.*.temp");
        assert_eq!(to_binding_key("sensors/#"), "sensors.#");
    }

    #[test]
    fn sparkplug_topics_survive() {
        let t = "spBv1.0/group/NDATA/node";
        assert_eq!(to_routing_key(t), "spBv1%2E0.group.NDATA.node");
        assert_eq!(from_routing_key(&to_routing_key(t)).as_deref(), Some(t));
    }

    #[test]
    fn matching() {
        assert!(matches("a/+/c", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("+/+", "/x"));
    }

    #[test]
    fn validity() {
        assert!(is_valid_filter("a/+/#"));
        assert!(!is_valid_filter("a/#/b"));
        assert!(!is_valid_filter("a+"));
        assert!(is_valid_topic("a/b"));
        assert!(!is_valid_topic("a/+"));
        assert!(!is_valid_topic(""));
    }

    #[test]
    fn shared_subscriptions_are_parsed_and_checked() {
        assert_eq!(
            parse_subscription("$share/g/t/#"),
            Some(Subscription::Shared {
                group: "g",
                filter: "t/#"
            })
        );
        assert_eq!(
            parse_subscription("$share/g/+").map(Subscription::filter),
            Some("+")
        );
        assert_eq!(parse_subscription("t/#"), Some(Subscription::Plain("t/#")));
        assert_eq!(
            parse_subscription("$share"),
            Some(Subscription::Plain("$share"))
        );
        assert_eq!(
            parse_subscription("$shared/g/t"),
            Some(Subscription::Plain("$shared/g/t"))
        );
        for invalid in [
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//t",
            "$share/g+/t",
            "$share/+/t",
            "$share/#/t",
            "$share/g#/t",
            "$share/g/t/#/x",
            "$share/g/t+",
            "a/#/b",
        ] {
            assert_eq!(parse_subscription(invalid), None, "{invalid:?}");
        }
    }

    proptest! {
        #[test]
        fn routing_key_round_trips(topic in "[a-z.%*/ ]{1,24}") {
            prop_assume!(is_valid_topic(&topic));
            prop_assert_eq!(from_routing_key(&to_routing_key(&topic)), Some(topic));
        }
    }
}
