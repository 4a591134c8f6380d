//! One connected client's protocol state: publishes waiting for their
//! commit, QoS 2 packet ids awaiting PUBREL, subscriptions (held by the
//! router through the [`Subscriber`]) and the outbox of deliveries.
//!
//! Invariants:
//! - A PUBACK/PUBREC is written only after the receipt of its PUBLISH
//!   resolved `Ok` (the message is on disk), and acks leave in the order the
//!   publishes arrived: `pending` is a FIFO that yields in push order.
//! - `pending` holds at most `max_inflight` receipts; the connection stops
//!   reading the socket while it is full.
//! - A QoS 2 packet id is in `qos2` from its PUBLISH until its PUBREL; a
//!   PUBLISH with an id already there is a retransmission and is not routed
//!   again (MQTT-4.3.3-2). A PUBREL that comes before the PUBREC (the commit
//!   still under way) is a protocol error: answering it with PUBCOMP would
//!   complete a message that is not durable yet.
//! - Deliveries at QoS 1/2 hold their packet id in the outbox until PUBACK
//!   or PUBCOMP (`outbox.rs`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use edge_core::Seq;
use edge_core::receipt::ReceiptResult;
use edge_core::{
    Acker, Delivery, Message, PublishError, QoS, Receipt, RetainHandling, Router, SessionExpiry,
    SubOptions, Subscriber, topic,
};
use futures::stream::FuturesOrdered;
use rumqttd::protocol::{
    self, Disconnect, DisconnectProperties, DisconnectReasonCode, Packet, PingResp, PubAck,
    PubAckProperties, PubAckReason, PubComp, PubCompReason, PubRec, PubRecProperties, PubRecReason,
    PubRel, PubRelReason, Publish, PublishProperties, RetainForwardRule, SubAck, Subscribe,
    SubscribeProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use tokio::sync::mpsc;

use crate::access::Access;
use crate::codec::{self, Inbound, Version};
use crate::error::{Close, ProtocolError};
use crate::outbox::Outbox;
use crate::v5::{self, V5};

/// The acknowledgement a committed publish earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ack {
    PubAck,
    PubRec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Qos2 {
    /// Routed, waiting for the commit; PUBREC not sent yet.
    Committing,
    /// PUBREC sent, waiting for PUBREL.
    Received,
}

/// A publish waiting for its commit.
#[derive(Debug)]
pub(crate) struct PendingAck {
    pkid: u16,
    ack: Ack,
    topic: Arc<str>,
    /// A session or a route took it (else MQTT 5 acks with 0x10).
    matched: bool,
    receipt: Receipt,
}

#[derive(Debug)]
pub(crate) struct Committed {
    pkid: u16,
    ack: Ack,
    topic: Arc<str>,
    matched: bool,
    result: ReceiptResult,
}

impl Future for PendingAck {
    type Output = Committed;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Committed> {
        let this = self.get_mut();
        Pin::new(&mut this.receipt)
            .poll(cx)
            .map(|result| Committed {
                pkid: this.pkid,
                ack: this.ack,
                topic: this.topic.clone(),
                matched: this.matched,
                result,
            })
    }
}

#[derive(Debug)]
pub(crate) struct Session {
    /// Its permissions and publish rates.
    pub access: Access,
    pub client_id: Arc<str>,
    router: Router,
    pub subscriber: Subscriber,
    /// Receipts of QoS 1/2 publishes, in arrival order.
    pub pending: FuturesOrdered<PendingAck>,
    max_inflight: usize,
    qos2: HashMap<u16, Qos2>,
    pub outbox: Outbox,
    /// Deliveries that go out before the router's, with their DUP flag:
    /// retained messages of new subscriptions (MQTT-3.3.1-6) and a
    /// persistent session's queue read from the store.
    pub queued: VecDeque<(Delivery, bool)>,
    /// A persistent session's reading of its durable queue.
    durable: Option<Durable>,
    pub version: Version,
    /// MQTT 5 state (aliases, what CONNECT asked for); `None` for 3.1.x.
    pub v5: Option<V5>,
    /// QoS 1 publishes awaiting their commit (MQTT 5 receive maximum
    /// counts them with the QoS 2 ones not yet released).
    qos1_pending: usize,
}

/// Queue entries read from the store per turn.
const BACKLOG_PAGE: usize = 256;
/// Entry state bit: the client's PUBREC for this QoS 2 delivery arrived (the
/// low 16 bits are its packet id), so a resumed session sends PUBREL.
const RELEASED: u32 = 1 << 16;

/// How a persistent session takes its durable queue: from the store while
/// catching up (after a reconnect, or when the in-memory queue overflowed),
/// live from the router otherwise, never the same entry twice.
#[derive(Debug)]
struct Durable {
    acker: Acker,
    /// The next queue seq not yet taken, from the store or live.
    read_from: Seq,
    catching_up: bool,
    /// Deliveries still to send with DUP: they may have been sent before.
    dup_left: usize,
    /// Settled entries to acknowledge in the store (once per turn).
    to_ack: Vec<Seq>,
    /// Acknowledgements under way.
    in_flight: Vec<tokio::task::JoinHandle<()>>,
}

impl Session {
    /// `max_inflight` bounds both ways: publishes awaiting their commit
    /// (MQTT 5: the receive maximum granted), and deliveries awaiting
    /// their ack (MQTT 5: at most the client's receive maximum).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        access: Access,
        client_id: Arc<str>,
        router: Router,
        subscriber: Subscriber,
        max_inflight: u16,
        resumed: bool,
        version: Version,
        v5: Option<(V5, u16)>,
    ) -> Session {
        let (v5, out_max) = match v5 {
            Some((state, client_receive_max)) => {
                (Some(state), max_inflight.min(client_receive_max))
            }
            None => (None, max_inflight),
        };
        let durable = subscriber.acker().map(|acker| Durable {
            acker,
            read_from: 0,
            catching_up: true,
            dup_left: if resumed {
                usize::from(max_inflight)
            } else {
                0
            },
            to_ack: Vec::new(),
            in_flight: Vec::new(),
        });
        Session {
            access,
            durable,
            client_id,
            router,
            subscriber,
            pending: FuturesOrdered::new(),
            max_inflight: usize::from(max_inflight.max(1)),
            qos2: HashMap::new(),
            outbox: Outbox::new(out_max),
            queued: VecDeque::new(),
            version,
            v5,
            qos1_pending: 0,
        }
    }

    /// Writes a packet in this connection's protocol version.
    pub(crate) fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<(), Close> {
        write(packet, out, self.version)
    }

    /// A reason string for an MQTT 5 ack, when the client asked for them.
    fn reason(&self, why: impl FnOnce() -> String) -> Option<String> {
        self.v5.as_ref().is_some_and(|v5| v5.problem_info).then(why)
    }

    /// A resumed persistent session: the QoS 2 packet ids it had committed
    /// and not yet released (PUBREL) are known again.
    pub(crate) async fn load_inbound(&mut self) -> Result<(), Close> {
        let keys = self
            .subscriber
            .dedup_keys()
            .await
            .map_err(|e| Close::Session(e.to_string()))?;
        for key in keys {
            if let Ok(pkid) = key.parse::<u16>() {
                self.qos2.insert(pkid, Qos2::Received);
            }
        }
        Ok(())
    }

    /// A delivery settled; a queued one leaves the store with the next flush.
    pub(crate) fn settled(&mut self, seq: Option<Seq>) {
        if let (Some(seq), Some(d)) = (seq, self.durable.as_mut()) {
            d.to_ack.push(seq);
        }
    }

    /// The PUBREC of a queued QoS 2 delivery: recorded, so that a resumed
    /// session sends PUBREL, not the PUBLISH, under the same packet id.
    fn released(&mut self, seq: Seq, pkid: u16) {
        if let Some(d) = &self.durable {
            let acker = d.acker.clone();
            tokio::spawn(async move {
                let _ = acker.set_state(seq, RELEASED | u32::from(pkid)).await;
            });
        }
    }

    /// Acknowledges in the store the queue entries settled since the last
    /// call (one store operation per turn, in the background: at worst a
    /// crash resends them, with DUP).
    pub(crate) async fn flush_acks(&mut self) {
        let Some(d) = self.durable.as_mut() else {
            return;
        };
        if d.to_ack.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut d.to_ack);
        let acker = d.acker.clone();
        let done = acker.ack_in_background(seqs).await;
        d.in_flight.push(done);
        d.in_flight.retain(|h| !h.is_finished());
    }

    /// At the end of the connection: waits (bounded) for the
    /// acknowledgements under way.
    pub(crate) async fn finish_acks(&mut self) {
        self.flush_acks().await;
        let Some(d) = self.durable.as_mut() else {
            return;
        };
        for h in d.in_flight.drain(..) {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), h).await;
        }
    }

    /// The connection is over: leaves the session (as dropping it does),
    /// then hands the group deliveries it did not complete — in flight
    /// without PUBACK or PUBREC, waiting in `queued`, or still in the
    /// router's channel — to other members of their groups. Leaving first
    /// means nothing more is chosen for this connection meanwhile.
    pub(crate) fn hand_back(self, mut deliveries: mpsc::Receiver<Delivery>) {
        let Session {
            client_id,
            router,
            subscriber,
            mut outbox,
            queued,
            ..
        } = self;
        drop(subscriber);
        let mut undelivered = outbox.unsettled_shared();
        undelivered.extend(queued.into_iter().map(|(delivery, _)| delivery));
        deliveries.close();
        while let Ok(delivery) = deliveries.try_recv() {
            undelivered.push(delivery);
        }
        // The router keeps only the group deliveries no queue holds.
        undelivered.retain(|d| d.share.is_some() && d.seq.is_none());
        if !undelivered.is_empty() {
            router.redistribute(&client_id, undelivered);
        }
    }

    /// Whether deliveries are taken from the router now (not while the
    /// durable queue is read from the store).
    pub(crate) fn takes_live(&mut self) -> bool {
        let Some(d) = self.durable.as_mut() else {
            return true;
        };
        if self.subscriber.take_lagged() {
            d.catching_up = true;
        }
        !d.catching_up
    }

    /// A live delivery: false when it was already taken from the store.
    pub(crate) fn take_live(&mut self, delivery: &Delivery) -> bool {
        let (Some(d), Some(seq)) = (self.durable.as_mut(), delivery.seq) else {
            return true;
        };
        if seq < d.read_from || self.outbox.has_seq(seq) {
            return false;
        }
        d.read_from = seq + 1;
        true
    }

    /// Whether [`Session::fill_from_store`] has something to do now.
    pub(crate) fn needs_fill(&self) -> bool {
        self.durable.as_ref().is_some_and(|d| d.catching_up)
            && self.queued.is_empty()
            && self.outbox.has_room()
    }

    /// While catching up and with room in the window: reads the next page
    /// of the durable queue into `queued` (a QoS 2 delivery whose PUBREC had
    /// arrived gets its PUBREL now, written to `out`).
    pub(crate) async fn fill_from_store(&mut self, out: &mut BytesMut) -> Result<(), Close> {
        if !self.needs_fill() {
            return Ok(());
        }
        let Some(d) = self.durable.as_ref() else {
            return Ok(());
        };
        let from = d.read_from;
        let page = self
            .subscriber
            .backlog(from, BACKLOG_PAGE)
            .await
            .map_err(|e| Close::Session(e.to_string()))?;
        let caught_up = page.len() < BACKLOG_PAGE;
        for entry in page {
            let Some(d) = self.durable.as_mut() else {
                break;
            };
            d.read_from = entry.seq + 1;
            if self.outbox.has_seq(entry.seq) {
                continue;
            }
            if entry.state & RELEASED != 0 {
                let pkid = (entry.state & 0xFFFF) as u16;
                if self.outbox.resume_released(pkid, entry.seq, out) {
                    continue;
                }
            }
            // Queued under the filters of the time, maybe for another
            // user of this client id, or before the ACL changed: what this
            // client may not read now (a topic is a filter matching only
            // itself) leaves the queue undelivered.
            if !self
                .access
                .can_subscribe(&self.client_id, &entry.message.topic)
            {
                metrics::counter!("edge_acl_denied_total", "protocol" => "mqtt", "action" => "queued_delivery").increment(1);
                self.settled(Some(entry.seq));
                continue;
            }
            // Queued at QoS >= 1 under the filters of the time; a filter
            // since removed leaves it at QoS 1.
            let matched = self.subscriber.matched(&entry.message);
            let qos = matched
                .as_ref()
                .map_or(QoS::AtLeastOnce, |m| m.qos)
                .min(entry.message.qos)
                .max(QoS::AtLeastOnce);
            let (retain_as_published, sub_ids) =
                matched.map_or((false, Vec::new()), |m| (m.retain_as_published, m.sub_ids));
            let dup = d.dup_left > 0;
            d.dup_left = d.dup_left.saturating_sub(1);
            let delivery = Delivery {
                message: entry.message,
                qos,
                seq: Some(entry.seq),
                retained: false,
                retain_as_published,
                sub_ids,
                share: None,
            };
            self.queued.push_back((delivery, dup));
        }
        if caught_up && let Some(d) = self.durable.as_mut() {
            d.catching_up = false;
        }
        Ok(())
    }

    /// Whether another publish may be read (back-pressure on the socket).
    /// An MQTT 5 client is read on: it keeps to the receive maximum, and
    /// one that does not is disconnected with 0x93.
    pub(crate) fn can_read(&self) -> bool {
        (self.v5.is_some() || self.pending.len() < self.max_inflight)
            && self.access.held().is_none()
    }

    /// Handles one packet from the client, writing any reply into `out`.
    pub(crate) async fn on_packet(
        &mut self,
        inbound: Inbound,
        out: &mut BytesMut,
    ) -> Result<(), Close> {
        // The futures of the packets that wait for the core are boxed: held
        // inline, the largest of them (~2.9 KiB) would be part of every
        // connection's task, idle or not.
        match inbound.packet {
            Packet::Publish(publish, props) => {
                Box::pin(self.on_publish(publish, props, inbound.qos, inbound.pkid, out)).await
            }
            Packet::PubAck(ack, _) => {
                match self.outbox.puback(ack.pkid)? {
                    Some(settled) => self.settled(settled),
                    None => {
                        tracing::debug!(client_id = %self.client_id, pkid = ack.pkid, "PUBACK for a packet id not in flight");
                    }
                }
                Ok(())
            }
            Packet::PubRec(rec, _)
                if !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ) =>
            {
                // MQTT 5: the client refused it; the exchange ends here.
                if let Some(settled) = self.outbox.pubrec_failed(rec.pkid)? {
                    self.settled(settled);
                }
                Ok(())
            }
            Packet::PubRec(rec, _) => {
                // Answered even for an id not in flight (a repeated PUBREC
                // after PUBCOMP), as Mosquitto does: the client can finish.
                match self.outbox.pubrec(rec.pkid)? {
                    Some(Some(seq)) => self.released(seq, rec.pkid),
                    Some(None) => {}
                    None => {
                        tracing::debug!(client_id = %self.client_id, pkid = rec.pkid, "PUBREC for a packet id not in flight");
                    }
                }
                let rel = PubRel {
                    pkid: rec.pkid,
                    reason: PubRelReason::Success,
                };
                self.write(Packet::PubRel(rel, None), out)
            }
            Packet::PubComp(comp, _) => {
                match self.outbox.pubcomp(comp.pkid)? {
                    Some(settled) => self.settled(settled),
                    None => {
                        tracing::debug!(client_id = %self.client_id, pkid = comp.pkid, "PUBCOMP for a packet id not in flight");
                    }
                }
                Ok(())
            }
            Packet::PubRel(rel, _) => {
                if self.qos2.get(&rel.pkid) == Some(&Qos2::Committing) {
                    return Err(ProtocolError::EarlyPubRel(rel.pkid).into());
                }
                // An id not there was released before: PUBCOMP again
                // (MQTT 5 says so: 0x92, packet identifier not found).
                // A persistent session's id is forgotten durably first: a
                // crash before PUBCOMP only makes the client send PUBREL
                // again, while the other order could take a new message
                // under the id for a retransmission and drop it.
                let known = self.qos2.remove(&rel.pkid).is_some();
                if known
                    && let Err(e) =
                        Box::pin(self.subscriber.release_key(&rel.pkid.to_string())).await
                {
                    return Err(Close::Session(e.to_string()));
                }
                let comp = PubComp {
                    pkid: rel.pkid,
                    reason: if known || self.v5.is_none() {
                        PubCompReason::Success
                    } else {
                        PubCompReason::PacketIdentifierNotFound
                    },
                };
                self.write(Packet::PubComp(comp, None), out)
            }
            Packet::Subscribe(subscribe, props) => {
                Box::pin(self.on_subscribe(subscribe, props, out)).await
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                Box::pin(self.on_unsubscribe(unsubscribe, out)).await
            }
            Packet::PingReq(_) => self.write(Packet::PingResp(PingResp), out),
            Packet::Disconnect(disconnect, props) => {
                Box::pin(self.on_disconnect(disconnect, props)).await
            }
            Packet::Connect(..) => Err(ProtocolError::DuplicateConnect.into()),
            Packet::ConnAck(..) => Err(ProtocolError::Unexpected("CONNACK").into()),
            Packet::SubAck(..) => Err(ProtocolError::Unexpected("SUBACK").into()),
            Packet::UnsubAck(..) => Err(ProtocolError::Unexpected("UNSUBACK").into()),
            Packet::PingResp(..) => Err(ProtocolError::Unexpected("PINGRESP").into()),
        }
    }

    async fn on_publish(
        &mut self,
        publish: Publish,
        props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        out: &mut BytesMut,
    ) -> Result<(), Close> {
        let qos =
            QoS::from_u8(qos).ok_or(ProtocolError::Malformed(protocol::Error::InvalidQoS(qos)))?;
        let topic = std::str::from_utf8(&publish.topic).map_err(|_| ProtocolError::TopicNotUtf8)?;
        let (properties, aliased) = match self.v5.as_mut() {
            None => (None, None),
            Some(v5) => match v5::publish_properties(props, &publish.payload) {
                Ok((properties, alias)) => (Some(properties), v5.resolve(topic, alias)?),
                // QoS 1/2: refused in its ack, the connection stays.
                Err(ProtocolError::PayloadFormat) if qos != QoS::AtMostOnce => {
                    return self.refuse_publish(qos, pkid, 0x99, out);
                }
                Err(e) => return Err(e.into()),
            },
        };
        let topic: Arc<str> = match aliased {
            Some(t) => t,
            None => Arc::from(topic),
        };
        if !topic::is_valid_topic(&topic) {
            return Err(ProtocolError::InvalidTopic(topic.to_string()).into());
        }
        if topic::is_amqp_namespace(&topic) {
            return Err(ProtocolError::ReservedTopic(topic.to_string()).into());
        }
        self.access.charge(publish.payload.len())?;
        if !self.access.can_publish(&self.client_id, &topic) {
            metrics::counter!("edge_acl_denied_total", "protocol" => "mqtt", "action" => "publish")
                .increment(1);
            crate::logs::DENIED.record("publish", || {
                format!(
                    "client_id={} user={:?} topic={topic}",
                    self.client_id,
                    self.access.user()
                )
            });
            return match (self.v5.is_some(), qos) {
                (_, QoS::AtMostOnce) => Ok(()),
                (true, _) => self.refuse_publish(qos, pkid, 0x87, out),
                // MQTT 3.1.1 has no way to refuse a publish: it is
                // acknowledged and dropped, as the specification allows.
                (false, QoS::AtLeastOnce) => self.write(
                    Packet::PubAck(
                        PubAck {
                            pkid,
                            reason: PubAckReason::Success,
                        },
                        None,
                    ),
                    out,
                ),
                (false, QoS::ExactlyOnce) => {
                    // The exchange completes (PUBREL → PUBCOMP) as for a
                    // stored one; nothing is stored.
                    self.qos2.insert(pkid, Qos2::Received);
                    self.write(pubrec(pkid), out)
                }
            };
        }
        if qos == QoS::ExactlyOnce {
            match self.qos2.get(&pkid) {
                Some(Qos2::Committing) => return Ok(()),
                Some(Qos2::Received) => return self.write(pubrec(pkid), out),
                None => {}
            }
        }
        if self.v5.is_some()
            && qos != QoS::AtMostOnce
            && self.qos1_pending + self.qos2.len() >= self.max_inflight
        {
            return Err(ProtocolError::ReceiveMaximum(self.max_inflight as u16).into());
        }
        let mut message = Message::new(topic, publish.payload, qos, self.client_id.clone());
        message.retain = publish.retain;
        if let Some(properties) = properties {
            message.properties = edge_core::Properties {
                persistent: message.properties.persistent,
                ..properties
            };
        }
        let topic = message.topic.clone();
        metrics::counter!("edge_messages_in_total", "protocol" => "mqtt").increment(1);
        // A persistent session's QoS 2 packet id is committed with the
        // message, so a retransmission after a reconnect or a restart is
        // recognised (MQTT-4.3.3-2).
        let dedup = (qos == QoS::ExactlyOnce)
            .then(|| self.subscriber.dedup_key(&pkid.to_string()))
            .flatten();
        let (receipt, matched) = match self.router.publish_matched(message, dedup).await {
            Ok(published) => published,
            Err(e) => {
                let close = self.refused(e, &topic);
                return match (self.v5.is_some(), qos) {
                    // MQTT 5: the ack says why; a QoS 0 message is gone,
                    // counted by the store.
                    (true, QoS::AtMostOnce) => Ok(()),
                    (true, _) => self.refuse_publish(qos, pkid, refusal_code(&close), out),
                    (false, _) => Err(close),
                };
            }
        };
        let ack = match qos {
            // Nothing to acknowledge; the store counts what it refuses.
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => {
                self.qos1_pending += 1;
                Ack::PubAck
            }
            QoS::ExactlyOnce => {
                self.qos2.insert(pkid, Qos2::Committing);
                Ack::PubRec
            }
        };
        self.pending.push_back(PendingAck {
            pkid,
            ack,
            topic,
            matched,
            receipt,
        });
        Ok(())
    }

    /// MQTT 5: a QoS 1/2 publish refused in its PUBACK/PUBREC with `code`.
    fn refuse_publish(
        &mut self,
        qos: QoS,
        pkid: u16,
        code: u8,
        out: &mut BytesMut,
    ) -> Result<(), Close> {
        let why = self.reason(|| reason_text(code).to_string());
        if qos == QoS::ExactlyOnce {
            // The exchange ends with a failed PUBREC (MQTT 5 §4.3.3).
            self.qos2.remove(&pkid);
            let reason = match code {
                0x97 => PubRecReason::QuotaExceeded,
                0x99 => PubRecReason::PayloadFormatInvalid,
                0x87 => PubRecReason::NotAuthorized,
                _ => PubRecReason::UnspecifiedError,
            };
            let props = why.map(|reason_string| PubRecProperties {
                reason_string: Some(reason_string),
                user_properties: Vec::new(),
            });
            return self.write(Packet::PubRec(PubRec { pkid, reason }, props), out);
        }
        let reason = match code {
            0x97 => PubAckReason::QuotaExceeded,
            0x99 => PubAckReason::PayloadFormatInvalid,
            0x87 => PubAckReason::NotAuthorized,
            _ => PubAckReason::UnspecifiedError,
        };
        let props = why.map(|reason_string| PubAckProperties {
            reason_string: Some(reason_string),
            user_properties: Vec::new(),
        });
        self.write(Packet::PubAck(PubAck { pkid, reason }, props), out)
    }

    /// A receipt resolved: acknowledge, or close on a refusal (MQTT 5:
    /// refuse in the ack).
    pub(crate) fn on_committed(
        &mut self,
        committed: Committed,
        out: &mut BytesMut,
    ) -> Result<(), Close> {
        if committed.ack == Ack::PubAck {
            self.qos1_pending = self.qos1_pending.saturating_sub(1);
        }
        if let Err(e) = committed.result {
            let close = self.refused(e, &committed.topic);
            if self.v5.is_none() {
                return Err(close);
            }
            let qos = match committed.ack {
                Ack::PubAck => QoS::AtLeastOnce,
                Ack::PubRec => QoS::ExactlyOnce,
            };
            return self.refuse_publish(qos, committed.pkid, refusal_code(&close), out);
        }
        // MQTT 5: 0x10 when no session and no route took it.
        let unmatched = self.v5.is_some() && !committed.matched;
        match committed.ack {
            Ack::PubAck => {
                let ack = PubAck {
                    pkid: committed.pkid,
                    reason: if unmatched {
                        PubAckReason::NoMatchingSubscribers
                    } else {
                        PubAckReason::Success
                    },
                };
                self.write(Packet::PubAck(ack, None), out)
            }
            Ack::PubRec => {
                self.qos2.insert(committed.pkid, Qos2::Received);
                let rec = PubRec {
                    pkid: committed.pkid,
                    reason: if unmatched {
                        PubRecReason::NoMatchingSubscribers
                    } else {
                        PubRecReason::Success
                    },
                };
                self.write(Packet::PubRec(rec, None), out)
            }
        }
    }

    fn refused(&self, error: PublishError, topic: &str) -> Close {
        // A full store is counted by the store, once per refused append.
        crate::logs::STORE_REFUSED.record(error.reason(), || {
            format!("client_id={} topic={topic} error={error}", self.client_id)
        });
        Close::Store(error)
    }

    async fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        props: Option<SubscribeProperties>,
        out: &mut BytesMut,
    ) -> Result<(), Close> {
        let v5 = self.v5.is_some();
        let id = props.and_then(|p| p.id).map_or(0, |id| id as u32);
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        for filter in &subscribe.filters {
            // A shared subscription's own filter is checked (`$share/g/f`).
            let refused = match topic::parse_subscription(&filter.path) {
                None => Some("invalid_filter"),
                Some(s) if topic::is_amqp_namespace(s.filter()) => Some("reserved_filter"),
                Some(_) => None,
            };
            if let Some(reason) = refused {
                crate::logs::FILTER_REFUSED.record(reason, || {
                    format!("client_id={} filter={}", self.client_id, filter.path)
                });
                return_codes.push(if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            if !self.access.can_subscribe(&self.client_id, &filter.path) {
                metrics::counter!("edge_acl_denied_total", "protocol" => "mqtt", "action" => "subscribe").increment(1);
                crate::logs::DENIED.record("subscribe", || {
                    format!(
                        "client_id={} user={:?} filter={}",
                        self.client_id,
                        self.access.user(),
                        filter.path
                    )
                });
                return_codes.push(if v5 {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            if v5 && filter.nolocal && filter.path.starts_with("$share/") {
                return Err(ProtocolError::SharedNoLocal(filter.path.clone()).into());
            }
            let requested = QoS::from_u8(filter.qos as u8).unwrap_or(QoS::AtMostOnce);
            // 3.1.1 has none of the options: rumqttd reads them as unset.
            let options = SubOptions {
                qos: requested,
                no_local: v5 && filter.nolocal,
                retain_as_published: v5 && filter.preserve_retain,
                id,
            };
            let retain = match filter.retain_forward_rule {
                _ if !v5 => RetainHandling::Always,
                RetainForwardRule::OnEverySubscribe => RetainHandling::Always,
                RetainForwardRule::OnNewSubscribe => RetainHandling::IfNew,
                RetainForwardRule::Never => RetainHandling::Never,
            };
            let (granted, retained) = match self
                .subscriber
                .subscribe_with(&filter.path, options, retain)
                .await
            {
                Ok(granted) => granted,
                Err(error) => {
                    crate::logs::FILTER_REFUSED.record("session_store", || {
                        format!(
                            "client_id={} filter={} error={error}",
                            self.client_id, filter.path
                        )
                    });
                    return_codes.push(if v5 {
                        SubscribeReasonCode::Unspecified
                    } else {
                        SubscribeReasonCode::Failure
                    });
                    continue;
                }
            };
            tracing::debug!(client_id = %self.client_id, filter = %filter.path, granted = granted as u8, retained = retained.len(), "subscribed");
            for message in retained {
                let delivery = Delivery {
                    qos: granted.min(message.qos),
                    message,
                    seq: None,
                    retained: true,
                    retain_as_published: false,
                    sub_ids: if id == 0 { Vec::new() } else { vec![id] },
                    share: None,
                };
                self.queued.push_back((delivery, false));
            }
            return_codes.push(SubscribeReasonCode::Success(match granted {
                QoS::AtMostOnce => protocol::QoS::AtMostOnce,
                QoS::AtLeastOnce => protocol::QoS::AtLeastOnce,
                QoS::ExactlyOnce => protocol::QoS::ExactlyOnce,
            }));
        }
        let suback = SubAck {
            pkid: subscribe.pkid,
            return_codes,
        };
        self.write(Packet::SubAck(suback, None), out)
    }

    async fn on_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        out: &mut BytesMut,
    ) -> Result<(), Close> {
        let mut reasons = Vec::new();
        for filter in &unsubscribe.filters {
            let existed = self.subscriber.has_filter(filter);
            match self.subscriber.unsubscribe(filter).await {
                Ok(()) if existed => reasons.push(UnsubAckReason::Success),
                Ok(()) => reasons.push(UnsubAckReason::NoSubscriptionExisted),
                Err(error) => {
                    crate::logs::FILTER_REFUSED.record("session_store", || {
                        format!("client_id={} filter={filter} error={error}", self.client_id)
                    });
                    reasons.push(UnsubAckReason::UnspecifiedError);
                }
            }
        }
        if self.v5.is_none() {
            // 3.1.1's UNSUBACK has no reason codes.
            reasons.clear();
        }
        let unsuback = UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
        };
        self.write(Packet::UnsubAck(unsuback, None), out)
    }

    /// DISCONNECT from the client: MQTT 5 may change the session expiry
    /// (not from 0, MQTT-3.14.2-2) and ask for its will (0x04).
    async fn on_disconnect(
        &mut self,
        disconnect: Disconnect,
        props: Option<DisconnectProperties>,
    ) -> Result<(), Close> {
        let Some(v5) = &self.v5 else {
            return Err(Close::Disconnect);
        };
        if let Some(expiry) = props.and_then(|p| p.session_expiry_interval) {
            if v5.session_expiry == 0 && expiry != 0 {
                return Err(ProtocolError::ExpiryAfterZero.into());
            }
            self.subscriber
                .set_expiry(session_expiry(expiry))
                .await
                .map_err(|e| Close::Session(e.to_string()))?;
            // It bounds the will's delay too.
            if let Some(v5) = self.v5.as_mut() {
                v5.session_expiry = expiry;
            }
        }
        if disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
            Err(Close::DisconnectWithWill)
        } else {
            Err(Close::Disconnect)
        }
    }
}

/// The session expiry an MQTT 5 interval asks for.
pub(crate) fn session_expiry(interval: u32) -> SessionExpiry {
    match interval {
        0 => SessionExpiry::WithConnection,
        u32::MAX => SessionExpiry::Never,
        secs => SessionExpiry::After(std::time::Duration::from_secs(u64::from(secs))),
    }
}

/// The MQTT 5 reason code of a publish the store refused.
fn refusal_code(close: &Close) -> u8 {
    match close {
        Close::Store(PublishError::Full { .. }) => 0x97,
        _ => 0x80,
    }
}

fn reason_text(code: u8) -> &'static str {
    match code {
        0x97 => "the gateway's store is full",
        0x99 => "payload is not UTF-8 as its payload format indicator says",
        0x87 => "not authorized to publish to this topic",
        _ => "the gateway's store could not take the message",
    }
}

fn pubrec(pkid: u16) -> Packet {
    Packet::PubRec(
        PubRec {
            pkid,
            reason: PubRecReason::Success,
        },
        None,
    )
}

pub(crate) fn write(packet: Packet, out: &mut BytesMut, version: Version) -> Result<(), Close> {
    codec::encode(packet, out, version).map_err(Close::Encode)
}
