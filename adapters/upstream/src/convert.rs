//! A logged message → the AMQP publish that forwards it.
//!
//! Its properties map to AMQP's by the core's one mapping
//! (`edge_core::amqp`), then the gateway adds its own: `app_id` is the
//! gateway id (the publisher's goes in `x-app-id`), `user_id` moves to
//! `x-user-id` (a broker checks `user_id` against the connection's user),
//! `timestamp` is the publisher's or the receive time, and `message_id`
//! is `<gateway id>:<seq>`: stable across reconnects and restarts, so a
//! duplicate can be recognised downstream. When the publisher set its own
//! `message_id` (an AMQP application keeps its ids end to end), that one is
//! kept and the gateway's goes in `x-gateway-message-id` instead.
//! `priority` is the publisher's own, else the route's when it is above 0. The
//! original MQTT topic travels in `x-mqtt-topic` so the lossless topic
//! mapping can always be undone.
//!
//! Downstream, the other way: a delivery from a central queue becomes a
//! local [`Message`] ([`topic_of_delivery`], [`from_delivery`]). Its topic
//! is the `x-mqtt-topic` header when there is one, else its routing key
//! mapped back by the exact inverse of the forward mapping
//! ([`edge_core::topic::from_routing_key`], next to
//! [`edge_core::topic::to_routing_key`]), after the downstream's
//! `topic_prefix`. Its properties come through the core's one AMQP mapping.
//!
//! Dead letters: a parked record keeps, in the store's typed columns, the
//! upstreams that parked it and the seq of its message id. A replay appends
//! it under a new seq with that mark ([`edge_store::Replay`]); then only the
//! named upstreams forward it (the others skip it as done: they had
//! delivered or parked it themselves), and it goes out with its ORIGINAL
//! message id, so downstream can recognise it as the same message.

use std::time::Duration;

use std::sync::Arc;

use bytes::Bytes;
use edge_core::{Message, Origin, Protocol, QoS, Route, amqp, topic, topic::MQTT_TOPIC_HEADER};
use edge_store::Seq;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString, ShortString};

/// Header carrying the publisher of the original message (MQTT client id).
pub const PUBLISHER_HEADER: &str = "x-publisher";

/// Header carrying `<gateway id>:<seq>` when `message_id` is the
/// publisher's own (an AMQP application's); otherwise `message_id` is that
/// id and the header is left out: a header table costs the central broker
/// for every entry (benches/RESULTS.md, "Publish shapes").
pub const GATEWAY_ID_HEADER: &str = "x-gateway-message-id";

/// How much of its lifetime a message has left at forwarding time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lifetime {
    /// Neither the route nor the message sets a TTL.
    Unlimited,
    /// Milliseconds left (at least 1).
    Remaining(u64),
    /// Older than the route's TTL or past its own expiry: dropped, counted.
    Expired,
}

/// The lifetime of a message received at `timestamp_ms` under `ttl`, at `now_ms`.
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

/// The shorter of the route's lifetime and the message's own expiry.
pub(crate) fn lifetime_of(ttl: Option<Duration>, message: &Message, now_ms: u64) -> Lifetime {
    let route = lifetime(ttl, message.timestamp_ms, now_ms);
    let Some(at) = message.properties.expires_at_ms else {
        return route;
    };
    match (route, at.checked_sub(now_ms).filter(|left| *left > 0)) {
        (Lifetime::Expired, _) | (_, None) => Lifetime::Expired,
        (Lifetime::Unlimited, Some(own)) => Lifetime::Remaining(own),
        (Lifetime::Remaining(left), Some(own)) => Lifetime::Remaining(left.min(own)),
    }
}

/// Why a message cannot be expressed as an AMQP publish (it is parked).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConvertError {
    #[error("{field} is {len} bytes, AMQP allows 255")]
    TooLong { field: String, len: usize },
}

impl From<amqp::TooLong> for ConvertError {
    fn from(e: amqp::TooLong) -> Self {
        ConvertError::TooLong {
            field: e.field.to_string(),
            len: e.len,
        }
    }
}

/// Everything `basic_publish` needs for one message.
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

/// The seq of a returned message: from [`GATEWAY_ID_HEADER`], else from its
/// `message_id`.
pub(crate) fn seq_of_returned(gateway_id: &str, p: &BasicProperties) -> Option<Seq> {
    let header = p
        .headers()
        .as_ref()
        .and_then(|h| match h.inner().get(GATEWAY_ID_HEADER) {
            Some(AMQPValue::LongString(s)) => {
                std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned)
            }
            _ => None,
        });
    let id = header.or_else(|| p.message_id().as_ref().map(|m| m.as_str().to_owned()))?;
    seq_of_message_id(gateway_id, &id)
}

/// The publish of `message` over `route`, with gateway message id
/// `<gateway id>:<id_seq>` (its log seq, or a replay's original seq);
/// `lifetime` is its [`lifetime_of`] (an expired message should not get
/// here; it is published without expiration if it does).
pub(crate) fn to_publish(
    gateway_id: &str,
    id_seq: Seq,
    message: &Message,
    route: &Route,
    lifetime: Lifetime,
    now_ms: u64,
) -> Result<Publish, ConvertError> {
    let exchange = short("exchange", route.exchange.clone())?;
    let routing_key = short("routing key", route.routing_key_for(&message.topic))?;

    let mut own = message.properties.clone();
    // The lifetime below replaces the message's own expiry.
    own.expires_at_ms = None;
    // Upstream, the route decides (DESIGN.md: persistent unless it says not).
    own.persistent = route.persistent;
    // A publisher's own priority (an AMQP application's) is kept; else the
    // route's, so a central priority queue orders like the drain does.
    if own.priority.is_none() && route.priority > 0 {
        own.priority = Some(route.priority);
    }
    let app_id = own.app_id.take();
    let user_id = own.user_id.take();
    let mut properties = amqp::to_amqp(&own, now_ms)?;
    let mut headers = properties.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
    let gateway_message_id = message_id(gateway_id, id_seq);
    if own.message_id.is_some() {
        headers.insert(
            ShortString::from(GATEWAY_ID_HEADER),
            text(&gateway_message_id),
        );
    }
    headers.insert(ShortString::from(MQTT_TOPIC_HEADER), text(&message.topic));
    headers.insert(
        ShortString::from(PUBLISHER_HEADER),
        text(message.publisher()),
    );
    if let Some(app_id) = app_id {
        headers.insert(ShortString::from("x-app-id"), text(&app_id));
    }
    if let Some(user_id) = user_id {
        headers.insert(ShortString::from("x-user-id"), text(&user_id));
    }
    if own.message_id.is_none() {
        properties = properties.with_message_id(short("message_id", gateway_message_id)?);
    }
    if own.sent_at.is_none() {
        properties = properties.with_timestamp(message.timestamp_ms / 1000);
    }
    properties = properties
        .with_app_id(short("app_id", gateway_id.to_string())?)
        .with_headers(headers);
    if let Lifetime::Remaining(ms) = lifetime {
        properties = properties.with_expiration(ShortString::from(ms.to_string()));
    }
    Ok(Publish {
        exchange,
        routing_key,
        properties,
    })
}

/// Why a delivery from a downstream queue cannot be published locally
/// (it is rejected without requeue: dead-lettered if the queue has a DLX).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Unmappable {
    #[error("no x-mqtt-topic header and an empty routing key")]
    NoTopic,
    #[error("the x-mqtt-topic header is not a string")]
    TopicHeaderNotText,
    #[error("routing key {0:?} does not map back to an MQTT topic")]
    RoutingKey(String),
    #[error("{0:?} is not a valid MQTT topic name")]
    InvalidTopic(String),
}

impl Unmappable {
    /// Its `reason` in `edge_downstream_rejected_total`.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Unmappable::NoTopic => "no_topic",
            _ => "invalid_topic",
        }
    }
}

/// The local topic of a delivery: `topic_prefix` then the `x-mqtt-topic`
/// header, or else the routing key mapped back.
pub(crate) fn topic_of_delivery(
    topic_prefix: &str,
    routing_key: &str,
    properties: &BasicProperties,
) -> Result<String, Unmappable> {
    let header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(MQTT_TOPIC_HEADER));
    let mapped = match header {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes())
            .map_err(|_| Unmappable::TopicHeaderNotText)?
            .to_string(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
        Some(_) => return Err(Unmappable::TopicHeaderNotText),
        None if routing_key.is_empty() => return Err(Unmappable::NoTopic),
        None => topic::from_routing_key(routing_key)
            .ok_or_else(|| Unmappable::RoutingKey(routing_key.to_string()))?,
    };
    let topic = format!("{topic_prefix}{mapped}");
    // MQTT carries a topic's length in two bytes.
    if !topic::is_valid_topic(&topic) || topic.len() > usize::from(u16::MAX) {
        return Err(Unmappable::InvalidTopic(topic));
    }
    Ok(topic)
}

/// The local message of a delivery on `topic`, published by the downstream
/// `downstream` at `qos`, received at `now_ms`. AMQP properties map as
/// everywhere (`expiration` → expiry, `correlation_id` / `reply_to` →
/// correlation data / response topic, headers → user properties); the
/// `x-mqtt-topic` header, spent on the topic, is not passed on.
pub(crate) fn from_delivery(
    downstream: &str,
    topic: String,
    qos: QoS,
    payload: Vec<u8>,
    properties: &BasicProperties,
    now_ms: u64,
) -> Message {
    let mut own = amqp::from_amqp(properties, now_ms);
    own.headers.retain(|(k, _)| &**k != MQTT_TOPIC_HEADER);
    own.persistent |= qos != QoS::AtMostOnce;
    Message {
        topic: topic.into(),
        payload: Bytes::from(payload),
        qos,
        retain: false,
        origin: Origin {
            protocol: Protocol::Upstream,
            publisher: Arc::from(downstream),
        },
        timestamp_ms: now_ms,
        properties: own,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use edge_core::{QoS, Value};

    use super::*;

    fn route(ttl: Option<Duration>, persistent: bool) -> Route {
        Route::new(edge_config::RouteConfig {
            name: "telemetry".into(),
            filter: "sensors/#".into(),
            local: None,
            upstream: "central".into(),
            exchange: "amq.topic".into(),
            routing_key: "edge.{topic}".into(),
            priority: 0,
            ttl,
            persistent,
            ack: edge_config::AckPoint::Persisted,
            declare_exchange: None,
        })
    }

    fn record() -> Message {
        let mut m = Message::new(
            "spBv1.0/g/NDATA/n",
            Bytes::from_static(b"21.5"),
            QoS::AtLeastOnce,
            "dev-1".into(),
        );
        m.timestamp_ms = 1_700_000_000_123;
        m.properties.headers = vec![("unit".into(), Value::Str("C".into()))];
        m
    }

    fn to_publish(
        gateway_id: &str,
        id_seq: Seq,
        message: &Message,
        route: &Route,
        lifetime: Lifetime,
    ) -> Result<Publish, ConvertError> {
        super::to_publish(gateway_id, id_seq, message, route, lifetime, 0)
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
        assert_eq!(seq_of_returned("gw-7", props), Some(42));
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
        assert_eq!(
            header(props, GATEWAY_ID_HEADER),
            None,
            "message_id is the gateway's id: no header repeats it"
        );
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
        r.topic = "a/".repeat(200).into();
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
    fn amqp_properties_of_the_publisher_go_upstream() {
        let mut m = record();
        let p = &mut m.properties;
        p.message_id = Some("app-1".into());
        p.correlation = Some(Bytes::from_static(b"req-9"));
        p.reply_to = Some("replies".into());
        p.content_type = Some("application/json".into());
        p.priority = Some(4);
        p.user_id = Some("guest".into());
        p.app_id = Some("historian".into());
        p.sent_at = Some(1_600_000_000);
        p.expires_at_ms = Some(5_000);
        let lifetime = lifetime_of(None, &m, 1_000);
        assert_eq!(lifetime, Lifetime::Remaining(4_000));
        let out = super::to_publish("gw", 7, &m, &route(None, true), lifetime, 1_000)
            .expect("convertible");
        let props = &out.properties;
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
        assert_eq!(text(props.message_id()).as_deref(), Some("app-1"));
        assert_eq!(
            seq_of_returned("gw", props),
            Some(7),
            "the gateway id rides along"
        );
        assert_eq!(header(props, GATEWAY_ID_HEADER), Some(&b"gw:7"[..]));
        assert_eq!(text(props.correlation_id()).as_deref(), Some("req-9"));
        assert_eq!(text(props.reply_to()).as_deref(), Some("replies"));
        assert_eq!(
            text(props.content_type()).as_deref(),
            Some("application/json")
        );
        assert_eq!(text(props.expiration()).as_deref(), Some("4000"));
        assert_eq!(text(props.app_id()).as_deref(), Some("gw"));
        assert_eq!(*props.user_id(), None, "a broker would check it");
        assert_eq!(*props.priority(), Some(4));
        assert_eq!(*props.timestamp(), Some(1_600_000_000));
        assert_eq!(header(props, "x-user-id"), Some(&b"guest"[..]));
        assert_eq!(header(props, "x-app-id"), Some(&b"historian"[..]));
        assert_eq!(lifetime_of(None, &m, 5_000), Lifetime::Expired);
        assert_eq!(
            lifetime_of(Some(Duration::from_secs(1)), &m, 1_700_000_000_123),
            Lifetime::Expired
        );
    }

    fn with_header(key: &str, value: AMQPValue) -> BasicProperties {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(ShortString::from(key), value);
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_forwarded_topic_maps_back_from_its_routing_key() {
        let plain = route(None, true);
        let mut config = (*plain).clone();
        config.routing_key = "{topic}".into();
        let plain = Route::new(config);
        for t in [
            "cmd/dev-1/reboot",
            "spBv1.0/g/NCMD/node",
            "a/*/b",
            "a/x*y/%2E/100%",
            "level.with.dots/and%percent",
            "/leading/and/trailing/",
            "*/%2A/%",
        ] {
            assert!(topic::is_valid_topic(t), "{t:?}");
            let key = plain.routing_key_for(t);
            let back = topic_of_delivery("", &key, &BasicProperties::default());
            assert_eq!(back.as_deref(), Ok(t), "via {key:?}");
        }
        assert_eq!(
            topic_of_delivery("site1/", "cmd.dev-1", &BasicProperties::default()).as_deref(),
            Ok("site1/cmd/dev-1")
        );
    }

    #[test]
    fn the_topic_header_wins_and_bad_topics_are_named() {
        let header = with_header(MQTT_TOPIC_HEADER, AMQPValue::LongString("cmd/a.b".into()));
        assert_eq!(
            topic_of_delivery("p/", "ignored.key", &header).as_deref(),
            Ok("p/cmd/a.b")
        );
        let none = BasicProperties::default();
        assert_eq!(topic_of_delivery("", "", &none), Err(Unmappable::NoTopic));
        assert_eq!(
            topic_of_delivery("", "a.%2X", &none),
            Err(Unmappable::RoutingKey("a.%2X".into()))
        );
        assert_eq!(
            topic_of_delivery("", "a.+", &none),
            Err(Unmappable::RoutingKey("a.+".into()))
        );
        let wildcard = with_header(MQTT_TOPIC_HEADER, AMQPValue::LongString("cmd/#".into()));
        assert_eq!(
            topic_of_delivery("", "k", &wildcard),
            Err(Unmappable::InvalidTopic("cmd/#".into()))
        );
        let number = with_header(MQTT_TOPIC_HEADER, AMQPValue::LongInt(7));
        assert_eq!(
            topic_of_delivery("", "k", &number),
            Err(Unmappable::TopicHeaderNotText)
        );
        assert_eq!(Unmappable::NoTopic.reason(), "no_topic");
        assert_eq!(
            Unmappable::RoutingKey(String::new()).reason(),
            "invalid_topic"
        );
    }

    #[test]
    fn a_delivery_keeps_its_properties_but_not_the_topic_header() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            ShortString::from(MQTT_TOPIC_HEADER),
            AMQPValue::LongString("cmd/x".into()),
        );
        headers.insert(
            ShortString::from("op"),
            AMQPValue::LongString("reboot".into()),
        );
        let p = BasicProperties::default()
            .with_headers(headers)
            .with_content_type("application/json".into())
            .with_correlation_id("req-1".into())
            .with_reply_to("replies/gw".into())
            .with_message_id("m-1".into())
            .with_expiration("5000".into());
        let m = from_delivery(
            "commands",
            "cmd/x".into(),
            QoS::AtLeastOnce,
            b"{}".to_vec(),
            &p,
            1_000,
        );
        assert_eq!(&*m.topic, "cmd/x");
        assert_eq!(m.payload, Bytes::from_static(b"{}"));
        assert_eq!(m.qos, QoS::AtLeastOnce);
        assert_eq!(m.origin.protocol, Protocol::Upstream);
        assert_eq!(&*m.origin.publisher, "commands");
        let own = &m.properties;
        assert_eq!(own.content_type.as_deref(), Some("application/json"));
        assert_eq!(own.correlation, Some(Bytes::from_static(b"req-1")));
        assert_eq!(own.reply_to.as_deref(), Some("replies/gw"));
        assert_eq!(own.message_id.as_deref(), Some("m-1"));
        assert_eq!(own.expires_at_ms, Some(6_000));
        assert!(own.persistent);
        assert_eq!(
            own.headers,
            vec![("op".into(), Value::Str("reboot".into()))]
        );
    }

    #[test]
    fn the_route_sets_the_priority_unless_the_publisher_did() {
        let mut r = route(None, true);
        let mut config = (*r).clone();
        config.priority = 7;
        r = Route::new(config);
        let mut m = record();
        let out = to_publish("gw", 1, &m, &r, Lifetime::Unlimited).expect("convertible");
        assert_eq!(*out.properties.priority(), Some(7));
        m.properties.priority = Some(2);
        let out = to_publish("gw", 1, &m, &r, Lifetime::Unlimited).expect("convertible");
        assert_eq!(*out.properties.priority(), Some(2), "the publisher's own");
        let out = to_publish("gw", 1, &record(), &route(None, true), Lifetime::Unlimited)
            .expect("convertible");
        assert_eq!(*out.properties.priority(), None, "priority 0 sets none");
    }
}
