//! Last will (MQTT 3.1.1 §3.1.2.5–3.1.2.7): the message a client leaves in
//! its CONNECT for the gateway to publish when the connection ends without
//! the client's DISCONNECT.
//!
//! - Validated with the CONNECT: the will topic is a topic name like a
//!   PUBLISH's (UTF-8, non-empty, no wildcard, no NUL), or the connection is
//!   closed with a protocol error before any CONNACK.
//! - Published through the router, like a PUBLISH from the client, with its
//!   own topic, payload, QoS and retain flag, on every end of an accepted
//!   connection except DISCONNECT (which discards it): keep-alive timeout,
//!   the peer closing or a socket error, a protocol error, a write stall, a
//!   take-over by a newer connection with the same client id, a store
//!   refusal, and gateway shutdown (as Mosquitto does for clients that did
//!   not disconnect).
//! - A will the store refuses, or whose commit does not resolve within
//!   [`WILL_TIMEOUT`], is counted in `edge_mqtt_wills_total` and
//!   summarised, never retried.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edge_core::receipt::ReceiptResult;
use edge_core::{Message, PublishError, QoS, Receipt, Router, topic};
use rumqttd::protocol::LastWill;
use tokio::time::{Instant, timeout_at};

use crate::error::ProtocolError;
use crate::logs;

/// Bound on handing a will to the router and on its commit.
pub(crate) const WILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Every label of `edge_mqtt_wills_total`.
pub(crate) const OUTCOMES: [&str; 3] = ["published", "refused", "unconfirmed"];

/// A will from an accepted CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

impl TryFrom<LastWill> for Will {
    type Error = ProtocolError;

    fn try_from(will: LastWill) -> Result<Will, ProtocolError> {
        let topic = match std::str::from_utf8(&will.topic) {
            Ok(t) if topic::is_valid_topic(t) && !topic::is_amqp_namespace(t) => t.to_string(),
            _ => {
                return Err(ProtocolError::InvalidWillTopic(
                    String::from_utf8_lossy(&will.topic).into_owned(),
                ));
            }
        };
        // rumqttd refuses will QoS 3 itself (MQTT-3.1.2-14).
        let qos = QoS::from_u8(will.qos as u8).unwrap_or(QoS::AtMostOnce);
        Ok(Will {
            topic,
            payload: will.message,
            qos,
            retain: will.retain,
        })
    }
}

/// A will handed to the router, its commit still to be awaited.
#[derive(Debug)]
pub(crate) struct Published {
    receipt: Receipt,
    deadline: Instant,
    client_id: Arc<str>,
    topic: Arc<str>,
}

/// Hands `will` to the router (fan-out to subscribers and, when it must be
/// durable, the store). `None` when it did not get that far; that was
/// counted.
pub(crate) async fn publish(router: &Router, will: Will, client_id: Arc<str>) -> Option<Published> {
    let deadline = Instant::now() + WILL_TIMEOUT;
    let mut message = Message::new(will.topic, will.payload, will.qos, client_id.clone());
    message.retain = will.retain;
    let topic = message.topic.clone();
    match timeout_at(deadline, router.publish(message)).await {
        Ok(Ok(receipt)) => Some(Published {
            receipt,
            deadline,
            client_id,
            topic,
        }),
        Ok(Err(e)) => {
            refused(&e, &client_id, &topic);
            None
        }
        Err(_) => {
            unconfirmed(&client_id, &topic);
            None
        }
    }
}

impl Published {
    /// Waits (bounded) for the commit and counts the outcome.
    pub(crate) async fn settle(self) {
        let result: Result<ReceiptResult, _> = timeout_at(self.deadline, self.receipt).await;
        match result {
            Ok(Ok(_)) => {
                metrics::counter!("edge_mqtt_wills_total", "outcome" => "published").increment(1);
            }
            Ok(Err(e)) => refused(&e, &self.client_id, &self.topic),
            Err(_) => unconfirmed(&self.client_id, &self.topic),
        }
    }
}

fn refused(error: &PublishError, client_id: &str, topic: &str) {
    metrics::counter!("edge_mqtt_wills_total", "outcome" => "refused").increment(1);
    logs::WILLS_NOT_STORED.record(error.reason(), || {
        format!("client_id={client_id} will_topic={topic} error={error}")
    });
}

fn unconfirmed(client_id: &str, topic: &str) {
    metrics::counter!("edge_mqtt_wills_total", "outcome" => "unconfirmed").increment(1);
    logs::WILLS_NOT_STORED.record("timeout", || {
        format!("client_id={client_id} will_topic={topic} not committed within {WILL_TIMEOUT:?}")
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_will(topic: &[u8]) -> LastWill {
        LastWill {
            topic: Bytes::copy_from_slice(topic),
            message: Bytes::from_static(b"gone"),
            qos: rumqttd::protocol::QoS::ExactlyOnce,
            retain: true,
        }
    }

    #[test]
    fn will_topic_is_checked_like_a_topic_name() {
        let will = Will::try_from(last_will(b"status/dev-1")).expect("valid");
        assert_eq!(
            will,
            Will {
                topic: "status/dev-1".into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
            }
        );
        for bad in [&b""[..], b"a/+", b"a/#", b"a\0b", b"\xff\xfe"] {
            assert!(
                matches!(
                    Will::try_from(last_will(bad)),
                    Err(ProtocolError::InvalidWillTopic(_))
                ),
                "{bad:?} accepted"
            );
        }
    }
}
