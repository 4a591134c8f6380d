//! A log record → the AMQP publish that forwards it.
//!
//! `message_id` is `<gateway id>:<seq>`: stable across reconnects and
//! restarts, so a duplicate can be recognised downstream. The original MQTT
//! topic travels in `x-mqtt-topic` so the lossless topic mapping can always
//! be undone.
//!
//! Dead letters: a parked record keeps, in the store's typed columns, the
//! upstreams that parked it and the seq of its message id. A replay appends
//! it under a new seq with that mark ([`edge_store::Replay`]); then only the
//! named upstreams forward it (the others skip it as done: they had
//! delivered or parked it themselves), and it goes out with its ORIGINAL
//! message id, so downstream can recognise it as the same message.

use std::time::Duration;

use edge_core::{Route, topic::MQTT_TOPIC_HEADER};
use edge_store::{Record, Seq};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Header carrying the publisher of the original message (MQTT client id).
pub const PUBLISHER_HEADER: &str = "x-publisher";

/// Headers with this prefix were the gateway's own bookkeeping in schema 1
/// and are never sent to the broker.
const INTERNAL_PREFIX: &str = "x-edge-";

/// How much of a route's TTL a record has left at forwarding time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// The route has no TTL.
    Unlimited,
    /// Milliseconds left (at least 1).
    Remaining(u64),
    /// Older than the route's TTL: dropped, counted.
    Expired,
}

/// The lifetime of a record received at `timestamp_ms` under `ttl`, at `now_ms`.
/// A timestamp in the future (clock step) counts as age zero.
pub(crate) fn lifetime(ttl: Option<Duration>, timestamp_ms: u64, now_ms: u64) -> Lifetime {
    let Some(ttl) = ttl else {
        return Lifetime::Unlimited;
    };
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let age_ms = now_ms.saturating_sub(timestamp_ms);
    match ttl_ms.checked_sub(age_ms) {
        Some(left) if left > 0 => Lifetime::Remaining(left),
        _ => Lifetime::Expired,
    }
}

/// Why a record cannot be expressed as an AMQP publish (it is parked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConvertError {
    #[error("{field} is {len} bytes, AMQP allows 255")]
    TooLong { field: String, len: usize },
}

/// Everything `basic_publish` needs for one record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Publish {
    pub exchange: ShortString,
    pub routing_key: ShortString,
    pub properties: BasicProperties,
}

fn short(field: &str, value: String) -> Result<ShortString, ConvertError> {
    let len = value.len();
    ShortString::try_new(value).map_err(|_| ConvertError::TooLong {
        field: field.to_string(),
        len,
    })
}

pub(crate) fn message_id(gateway_id: &str, seq: Seq) -> String {
    format!("{gateway_id}:{seq}")
}

/// The seq in a `message_id` this gateway set, if it is one of ours.
pub(crate) fn seq_of_message_id(gateway_id: &str, message_id: &str) -> Option<Seq> {
    message_id
        .strip_prefix(gateway_id)?
        .strip_prefix(':')?
        .parse()
        .ok()
}

/// The publish of `record` over `route`, with message id
/// `<gateway id>:<id_seq>` (its log seq, or a replay's original seq);
/// `lifetime` is the record's [`lifetime`] (an expired record should not get
/// here; it is published without expiration if it does).
pub(crate) fn to_publish(
    gateway_id: &str,
    id_seq: Seq,
    record: &Record,
    route: &Route,
    lifetime: Lifetime,
) -> Result<Publish, ConvertError> {
    let exchange = short("exchange", route.exchange.clone())?;
    let routing_key = short("routing key", route.routing_key_for(&record.topic))?;

    let mut headers = FieldTable::default();
    for (key, value) in &record.headers {
        if key.starts_with(INTERNAL_PREFIX) {
            continue;
        }
        headers.insert(
            short("header name", key.clone())?,
            AMQPValue::LongString(LongString::from(value.to_vec())),
        );
    }
    headers.insert(
        ShortString::from(MQTT_TOPIC_HEADER),
        AMQPValue::LongString(LongString::from(record.topic.as_bytes())),
    );
    headers.insert(
        ShortString::from(PUBLISHER_HEADER),
        AMQPValue::LongString(LongString::from(record.publisher.as_bytes())),
    );

    let mut properties = BasicProperties::default()
        .with_message_id(short("message_id", message_id(gateway_id, id_seq))?)
        .with_app_id(short("app_id", gateway_id.to_string())?)
        .with_timestamp(record.timestamp_ms / 1000)
        .with_headers(headers);
    if route.persistent {
        properties = properties.with_delivery_mode(2);
    }
    if let Lifetime::Remaining(ms) = lifetime {
        properties = properties.with_expiration(ShortString::from(ms.to_string()));
    }
    Ok(Publish {
        exchange,
        routing_key,
        properties,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn route(ttl: Option<Duration>, persistent: bool) -> Route {
        Route::new(edge_config::RouteConfig {
            name: "telemetry".into(),
            filter: "sensors/#".into(),
            upstream: "central".into(),
            exchange: "amq.topic".into(),
            routing_key: "edge.{topic}".into(),
            priority: 0,
            ttl,
            persistent,
        })
    }

    fn record() -> Record {
        Record {
            timestamp_ms: 1_700_000_000_123,
            qos: 1,
            retain: false,
            topic: "spBv1.0/g/NDATA/n".into(),
            publisher: "dev-1".into(),
            headers: vec![("unit".into(), Bytes::from_static(b"C"))],
            payload: Bytes::from_static(b"21.5"),
        }
    }

    fn header<'a>(p: &'a BasicProperties, key: &str) -> Option<&'a [u8]> {
        match p.headers().as_ref()?.inner().get(key)? {
            AMQPValue::LongString(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    #[test]
    fn a_record_becomes_a_persistent_publish_with_identity() {
        let p = to_publish(
            "gw-7",
            42,
            &record(),
            &route(None, true),
            Lifetime::Unlimited,
        )
        .expect("convertible");
        assert_eq!(p.exchange.as_str(), "amq.topic");
        assert_eq!(p.routing_key.as_str(), "edge.spBv1%2E0.g.NDATA.n");
        let props = &p.properties;
        assert_eq!(
            props.message_id().as_ref().map(ShortString::as_str),
            Some("gw-7:42")
        );
        assert_eq!(
            props.app_id().as_ref().map(ShortString::as_str),
            Some("gw-7")
        );
        assert_eq!(*props.timestamp(), Some(1_700_000_000));
        assert_eq!(*props.delivery_mode(), Some(2));
        assert_eq!(*props.expiration(), None);
        assert_eq!(
            header(props, MQTT_TOPIC_HEADER),
            Some(&b"spBv1.0/g/NDATA/n"[..])
        );
        assert_eq!(header(props, PUBLISHER_HEADER), Some(&b"dev-1"[..]));
        assert_eq!(header(props, "unit"), Some(&b"C"[..]));
    }

    #[test]
    fn transient_routes_and_remaining_ttl() {
        let p = to_publish(
            "gw",
            1,
            &record(),
            &route(Some(Duration::from_secs(60)), false),
            Lifetime::Remaining(1500),
        )
        .expect("convertible");
        assert_eq!(*p.properties.delivery_mode(), None);
        assert_eq!(
            p.properties.expiration().as_ref().map(ShortString::as_str),
            Some("1500")
        );
    }

    #[test]
    fn an_overlong_routing_key_is_an_error_not_a_panic() {
        let mut r = record();
        r.topic = "a/".repeat(200);
        let err =
            to_publish("gw", 1, &r, &route(None, true), Lifetime::Unlimited).expect_err("too long");
        assert!(matches!(err, ConvertError::TooLong { ref field, .. } if field == "routing key"));
    }

    #[test]
    fn ttl_expiry() {
        let ttl = Some(Duration::from_secs(10));
        assert_eq!(lifetime(None, 0, u64::MAX), Lifetime::Unlimited);
        assert_eq!(lifetime(ttl, 1_000, 1_000), Lifetime::Remaining(10_000));
        assert_eq!(lifetime(ttl, 1_000, 5_000), Lifetime::Remaining(6_000));
        assert_eq!(lifetime(ttl, 1_000, 10_999), Lifetime::Remaining(1));
        assert_eq!(lifetime(ttl, 1_000, 11_000), Lifetime::Expired);
        assert_eq!(lifetime(ttl, 1_000, 99_000), Lifetime::Expired);
        assert_eq!(
            lifetime(ttl, 9_000, 1_000),
            Lifetime::Remaining(10_000),
            "a timestamp in the future is age zero"
        );
    }

    #[test]
    fn message_ids_round_trip() {
        assert_eq!(message_id("gw:a", 9), "gw:a:9");
        assert_eq!(seq_of_message_id("gw:a", "gw:a:9"), Some(9));
        assert_eq!(seq_of_message_id("gw", "other:9"), None);
        assert_eq!(seq_of_message_id("gw", "gw:x"), None);
    }

    #[test]
    fn a_replayed_record_goes_out_with_its_original_id_and_no_internal_headers() {
        let mut r = record();
        r.headers
            .push(("x-edge-upstream".into(), Bytes::from_static(b"central")));
        let p = to_publish("gw-7", 42, &r, &route(None, true), Lifetime::Unlimited)
            .expect("convertible");
        let props = &p.properties;
        assert_eq!(
            props.message_id().as_ref().map(ShortString::as_str),
            Some("gw-7:42")
        );
        assert_eq!(seq_of_message_id("gw-7", "gw-7:42"), Some(42));
        let sent = props.headers().as_ref().expect("headers").inner();
        assert!(
            sent.keys().all(|k| !k.as_str().starts_with("x-edge-")),
            "{sent:?}"
        );
        assert!(sent.contains_key("unit"));
    }
}
