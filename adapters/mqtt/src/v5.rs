//! MQTT 5 on a connection: what the CONNECT asked for, topic aliases both
//! ways, and the mapping of MQTT 5 message properties to the core's
//! [`Properties`] (the AMQP server and the upstream client map those to
//! AMQP's basic properties in `edge_core::amqp`, so a property means the
//! same on every path):
//!
//! | MQTT 5                   | core `Properties`  | AMQP 0-9-1        |
//! |--------------------------|--------------------|-------------------|
//! | content type             | `content_type`     | `content_type`    |
//! | correlation data         | `correlation`      | `correlation_id`  |
//! | response topic           | `reply_to`         | `reply_to`        |
//! | user properties          | `headers` (`Str`)  | `headers`         |
//! | message expiry interval  | `expires_at_ms`    | `expiration`      |
//! | payload format indicator | `payload_utf8`     | (not carried)     |
//!
//! The expiry is absolute inside (receive time + interval) so that what a
//! subscriber sees, and what goes upstream, is the remaining lifetime.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use edge_core::message::now_ms;
use edge_core::{Properties, Value};
use rumqttd::protocol::{ConnectProperties, PublishProperties};

use crate::error::ProtocolError;

/// Topic aliases a client may set up towards the gateway
/// (CONNACK topic alias maximum).
pub(crate) const TOPIC_ALIAS_MAX: u16 = 64;

/// MQTT 5 properties of a PUBLISH or a will, as the core takes them.
#[derive(Debug, Default)]
pub(crate) struct InProps {
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
    pub payload_utf8: bool,
}

/// The core's properties of a message with `p` (its expiry set apart).
pub(crate) fn properties_in(p: InProps) -> Properties {
    Properties {
        content_type: p.content_type.map(Arc::from),
        correlation: p.correlation_data,
        reply_to: p.response_topic.map(Arc::from),
        headers: p
            .user_properties
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Value::Str(Arc::from(v))))
            .collect(),
        payload_utf8: p.payload_utf8,
        ..Properties::default()
    }
}

/// A PUBLISH's MQTT 5 properties, checked: the core's properties, and the
/// topic alias it carried.
pub(crate) fn publish_properties(
    p: Option<PublishProperties>,
    payload: &[u8],
) -> Result<(Properties, Option<u16>), ProtocolError> {
    let Some(p) = p else {
        return Ok((Properties::default(), None));
    };
    if let Some(t) = &p.response_topic
        && !edge_core::topic::is_valid_topic(t)
    {
        // MQTT-3.3.2-14: a topic name, no wildcards.
        return Err(ProtocolError::BadProperty {
            violation: true,
            why: format!("response topic {t:?} is not a topic name"),
        });
    }
    let utf8 = p.payload_format_indicator == Some(1);
    if utf8 && std::str::from_utf8(payload).is_err() {
        return Err(ProtocolError::PayloadFormat);
    }
    let mut props = properties_in(InProps {
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        payload_utf8: utf8,
    });
    if let Some(secs) = p.message_expiry_interval {
        props.expires_at_ms = Some(now_ms() + u64::from(secs) * 1000);
    }
    Ok((props, p.topic_alias))
}

/// Seconds left of a message's lifetime at `now_ms` (rounded up, so a
/// message with time left never goes out as 0); `None` without expiry.
pub(crate) fn remaining_secs(expires_at_ms: Option<u64>, now_ms: u64) -> Option<u32> {
    let left = expires_at_ms?.saturating_sub(now_ms);
    Some(u32::try_from(left.div_ceil(1000)).unwrap_or(u32::MAX))
}

/// One MQTT 5 connection's state.
#[derive(Debug)]
pub(crate) struct V5 {
    /// Reason strings and user properties may go on any packet (request
    /// problem information, default 1).
    pub problem_info: bool,
    /// The session expiry interval CONNECT set (DISCONNECT may not raise
    /// it from 0), or the one DISCONNECT set.
    pub session_expiry: u32,
    /// Largest packet the client takes (its maximum packet size).
    pub client_max_packet: usize,
    aliases_in: HashMap<u16, Arc<str>>,
    aliases_out: HashMap<Arc<str>, u16>,
    alias_out_max: u16,
}

impl V5 {
    pub(crate) fn new(props: Option<&ConnectProperties>) -> V5 {
        V5 {
            problem_info: props.and_then(|p| p.request_problem_info) != Some(0),
            session_expiry: props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
            client_max_packet: props
                .and_then(|p| p.max_packet_size)
                .map_or(usize::MAX, |m| m as usize),
            aliases_in: HashMap::new(),
            aliases_out: HashMap::new(),
            alias_out_max: props.and_then(|p| p.topic_alias_max).unwrap_or(0),
        }
    }

    /// The topic of an inbound PUBLISH: its own, recorded under its alias
    /// when it has one, or the one its alias stands for (MQTT 5 §3.3.2.3.4).
    pub(crate) fn resolve(
        &mut self,
        topic: &str,
        alias: Option<u16>,
    ) -> Result<Option<Arc<str>>, ProtocolError> {
        let Some(alias) = alias else {
            return Ok(None);
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAX {
            return Err(ProtocolError::TopicAlias {
                alias,
                why: "outside 1..=topic alias maximum",
            });
        }
        if topic.is_empty() {
            return match self.aliases_in.get(&alias) {
                Some(t) => Ok(Some(Arc::clone(t))),
                None => Err(ProtocolError::TopicAlias {
                    alias,
                    why: "empty topic and the alias was never set",
                }),
            };
        }
        let topic: Arc<str> = Arc::from(topic);
        self.aliases_in.insert(alias, Arc::clone(&topic));
        Ok(Some(topic))
    }

    /// The alias an outbound PUBLISH on `topic` may use: `(alias, known)`
    /// — known: the client has it, the topic can be left out. Taking a
    /// new alias is [`V5::remember`]ed only once the packet goes out.
    pub(crate) fn alias_for(&self, topic: &Arc<str>) -> Option<(u16, bool)> {
        if let Some(alias) = self.aliases_out.get(topic) {
            return Some((*alias, true));
        }
        let next = self.aliases_out.len() + 1;
        (next <= usize::from(self.alias_out_max)).then_some((next as u16, false))
    }

    pub(crate) fn remember(&mut self, topic: &Arc<str>, alias: u16) {
        self.aliases_out.insert(Arc::clone(topic), alias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve_both_ways() {
        let mut v5 = V5::new(Some(&ConnectProperties {
            session_expiry_interval: None,
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_max: Some(2),
            request_response_info: None,
            request_problem_info: None,
            user_properties: Vec::new(),
            authentication_method: None,
            authentication_data: None,
        }));
        assert_eq!(v5.resolve("a/b", None).expect("ok"), None);
        assert_eq!(
            v5.resolve("a/b", Some(3)).expect("set").as_deref(),
            Some("a/b")
        );
        assert_eq!(
            v5.resolve("", Some(3)).expect("known").as_deref(),
            Some("a/b")
        );
        assert!(matches!(
            v5.resolve("", Some(4)),
            Err(ProtocolError::TopicAlias { alias: 4, .. })
        ));
        assert!(matches!(
            v5.resolve("x", Some(0)),
            Err(ProtocolError::TopicAlias { alias: 0, .. })
        ));
        assert!(v5.resolve("x", Some(TOPIC_ALIAS_MAX + 1)).is_err());

        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) = ("t/a".into(), "t/b".into(), "t/c".into());
        assert_eq!(v5.alias_for(&a), Some((1, false)));
        v5.remember(&a, 1);
        assert_eq!(v5.alias_for(&a), Some((1, true)));
        assert_eq!(v5.alias_for(&b), Some((2, false)));
        v5.remember(&b, 2);
        assert_eq!(v5.alias_for(&c), None, "the client's maximum is 2");
    }

    #[test]
    fn remaining_lifetime_rounds_up() {
        assert_eq!(remaining_secs(None, 5), None);
        assert_eq!(remaining_secs(Some(10_000), 8_999), Some(2));
        assert_eq!(remaining_secs(Some(10_000), 9_000), Some(1));
        assert_eq!(remaining_secs(Some(10_000), 10_000), Some(0));
    }
}
