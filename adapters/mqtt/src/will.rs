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
use edge_core::{Message, Properties, PublishError, QoS, Receipt, Router, topic};
use rumqttd::protocol::{LastWill, LastWillProperties};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ProtocolError;
use crate::logs;

/// Bound on handing a will to the router and on its commit.
pub(crate) const WILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Every label of `edge_mqtt_wills_total`.
pub(crate) const OUTCOMES: [&str; 4] = ["published", "refused", "unconfirmed", "cancelled"];

/// Wills waiting out their MQTT 5 delay, by client id. A new connection
/// with the same client id cancels its will (MQTT-3.1.3-9); gateway
/// shutdown publishes the waiting ones at once, like the wills of the
/// connections it closes.
#[derive(Debug, Default)]
pub(crate) struct Delayed {
    pending: std::sync::Mutex<std::collections::HashMap<Arc<str>, (u64, CancellationToken)>>,
    next: std::sync::atomic::AtomicU64,
    tasks: TaskTracker,
}

impl Delayed {
    /// A connection of `client_id` began: its delayed will, if any, is
    /// not published.
    pub(crate) fn cancel(&self, client_id: &str) {
        let removed = self.lock().remove(client_id);
        if let Some((_, token)) = removed {
            token.cancel();
        }
    }

    /// Publishes `will` after `delay`, unless cancelled first.
    pub(crate) fn schedule(
        self: &Arc<Self>,
        router: Router,
        will: Will,
        client_id: Arc<str>,
        delay: Duration,
        shutdown: CancellationToken,
    ) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        if let Some((_, old)) = self.lock().insert(client_id.clone(), (id, token.clone())) {
            old.cancel();
        }
        let this = Arc::clone(self);
        self.tasks.spawn(async move {
            let publish = tokio::select! {
                _ = token.cancelled() => false,
                _ = tokio::time::sleep(delay) => true,
                _ = shutdown.cancelled() => true,
            };
            {
                let mut pending = this.lock();
                if pending.get(&client_id).is_some_and(|(i, _)| *i == id) {
                    pending.remove(&client_id);
                }
            }
            if publish && !token.is_cancelled() {
                if let Some(published) = self::publish(&router, will, client_id).await {
                    published.settle().await;
                }
            } else {
                cancelled(&client_id);
            }
        });
    }

    /// Waits for the delayed wills (after shutdown: until they are out).
    pub(crate) async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Arc<str>, (u64, CancellationToken)>>
    {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A will from an accepted CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 will delay interval: published this long after the
    /// connection ended, unless the client is back first.
    pub delay: Duration,
    /// MQTT 5 will properties; the expiry relative, seconds (it starts
    /// when the will is published).
    pub properties: Properties,
    pub expiry_secs: Option<u32>,
    /// MQTT 5 payload format indicator 1: the payload must be UTF-8.
    pub utf8: bool,
}

impl Will {
    /// The will of a CONNECT, with its MQTT 5 properties if any.
    pub(crate) fn new(
        will: LastWill,
        props: Option<LastWillProperties>,
    ) -> Result<Will, ProtocolError> {
        let mut out = Will::try_from(will)?;
        if let Some(p) = props {
            out.delay = Duration::from_secs(u64::from(p.delay_interval.unwrap_or(0)));
            out.expiry_secs = p.message_expiry_interval;
            out.utf8 = p.payload_format_indicator == Some(1);
            if out.utf8 && std::str::from_utf8(&out.payload).is_err() {
                return Err(ProtocolError::PayloadFormat);
            }
            out.properties = crate::v5::properties_in(crate::v5::InProps {
                content_type: p.content_type,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data,
                user_properties: p.user_properties,
                payload_utf8: out.utf8,
            });
        }
        Ok(out)
    }

    /// The message it publishes now, from `client_id`.
    fn message(self, client_id: Arc<str>) -> Message {
        let mut message = Message::new(self.topic, self.payload, self.qos, client_id);
        message.retain = self.retain;
        let persistent = message.properties.persistent;
        message.properties = Properties {
            persistent,
            ..self.properties
        };
        if let Some(secs) = self.expiry_secs {
            message.properties.expires_at_ms = Some(message.timestamp_ms + u64::from(secs) * 1000);
        }
        message
    }
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
            delay: Duration::ZERO,
            properties: Properties::default(),
            expiry_secs: None,
            utf8: false,
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
    let message = will.message(client_id.clone());
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

/// A delayed will not published: its client came back in time.
pub(crate) fn cancelled(client_id: &str) {
    metrics::counter!("edge_mqtt_wills_total", "outcome" => "cancelled").increment(1);
    tracing::debug!(client_id, "delayed will cancelled by a reconnect");
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
                delay: Duration::ZERO,
                properties: Properties::default(),
                expiry_secs: None,
                utf8: false,
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
