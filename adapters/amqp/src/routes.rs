//! Routes that select what AMQP clients publish to a local exchange
//! (`[[route]] local_exchange`, `local_routing_key`): their filter in the
//! core's topic space and the routing key of a matched publish, from the
//! exchange mapping of `convert.rs`.

use crate::convert::{self, Kind, Unmappable};

/// A `local_exchange` / `local_routing_key` pair without a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route over local exchange {exchange:?} with pattern {pattern:?}: {reason}")]
pub struct LocalRouteError {
    pub exchange: String,
    pub pattern: String,
    reason: Unmappable,
}

/// The core filter matching publishes to `exchange` whose routing key
/// matches the AMQP topic pattern `pattern`, as a topic exchange's binding
/// would (publishes to a direct or fanout exchange have their whole key as
/// one word: `#` matches them all, a one-word pattern that key exactly).
pub fn local_route_filter(exchange: &str, pattern: &str) -> Result<String, LocalRouteError> {
    convert::filter_of(exchange, Kind::Topic, pattern).map_err(|reason| LocalRouteError {
        exchange: exchange.to_string(),
        pattern: pattern.to_string(),
        reason,
    })
}

/// The routing key a publish had, from its core topic.
pub fn local_routing_key(topic: &str) -> String {
    convert::origin_of(topic).1
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::topic::matches;

    #[test]
    fn a_pattern_selects_publishes_to_its_exchange_by_key() {
        let filter = local_route_filter("orders", "eu.#").expect("filter");
        let topic =
            |x: &str, kind: Kind, key: &str| convert::topic_of(x, kind, key).expect("topic");
        assert!(matches(
            &filter,
            &topic("orders", Kind::Topic, "eu.de.berlin")
        ));
        assert!(!matches(&filter, &topic("orders", Kind::Topic, "us.ny")));
        assert!(!matches(&filter, &topic("returns", Kind::Topic, "eu.de")));
        assert!(
            !matches(&filter, "eu/de"),
            "MQTT topics are not an exchange's"
        );
        let all = local_route_filter("orders", "#").expect("filter");
        assert!(matches(&all, &topic("orders", Kind::Direct, "eu.de")));
        assert_eq!(
            local_routing_key(&topic("orders", Kind::Topic, "eu.de")),
            "eu.de"
        );
        assert_eq!(
            local_routing_key(&topic("orders", Kind::Direct, "eu.de")),
            "eu.de"
        );
        assert!(local_route_filter("orders", "a.#.b").is_err());
    }
}
