//! Deliveries to the client and their acknowledgements. A QoS 1 PUBLISH
//! holds its packet id until the client's PUBACK; a QoS 2 PUBLISH until
//! PUBREC, then (after the gateway's PUBREL) until PUBCOMP (MQTT 3.1.1
//! §4.3.3, sender side). Either way the id counts against `max_inflight`
//! until the last acknowledgement, and the connection stops taking
//! deliveries from the router while the window is full, so a slow client
//! fills its bounded router queue (where drops are counted) instead of this
//! process's memory.
//!
//! The window is per connection. A persistent session's deliveries carry
//! their queue seq: settling one releases its queue entry (the caller acks
//! it in the store), and the entries still queued after a reconnect are
//! sent again from the store, the first window of them with DUP set, under
//! their original packet ids (MQTT-4.4.0-1): a queued delivery's id is
//! derived from its seq ([`queued_pkid`]), so it is the same after a
//! reconnect or a restart without a write per send. Two deliveries in
//! flight whose seqs map to one id cannot both go: the later one waits for
//! the earlier one's acknowledgement ([`Outbox::fits`]). Deliveries that
//! are not queued (clean sessions, retained messages on SUBSCRIBE) take the
//! next free id. Within a connection nothing is resent.
//!
//! A delivery through a shared subscription that is not in a durable queue
//! (no seq) is kept while in flight, until PUBACK or PUBREC (the client
//! has it then): those the connection ends without go to another member
//! of the group ([`Outbox::unsettled_shared`], `Router::redistribute`).

use std::collections::{HashMap, HashSet};

use edge_core::Seq;

use bytes::BytesMut;
use edge_core::message::now_ms;
use edge_core::{Delivery, QoS};

use crate::codec::{self, OutProps, Outgoing};
use crate::error::ProtocolError;
use crate::v5::{self, V5};

/// What became of a delivery handed to [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    Sent,
    /// Not sent, for good (a queued one is settled): the label of
    /// `edge_messages_dropped_total` it counts under, or `expired`.
    Skipped(&'static str),
}

/// The acknowledgement a delivery in flight waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    /// PUBACK (QoS 1).
    Ack,
    /// PUBREC (QoS 2, PUBLISH sent).
    Rec,
    /// PUBCOMP (QoS 2, PUBREL sent: the PUBLISH is never sent again).
    Comp,
}

impl Awaiting {
    fn name(self) -> &'static str {
        match self {
            Awaiting::Ack => "PUBACK",
            Awaiting::Rec => "PUBREC",
            Awaiting::Comp => "PUBCOMP",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Outbox {
    inflight: HashMap<u16, (Awaiting, Option<Seq>)>,
    /// Queue seqs of the deliveries in flight.
    seqs: HashSet<Seq>,
    /// Group deliveries in flight that no queue keeps, by packet id, with
    /// their place in send order.
    shared: HashMap<u16, (u64, Delivery)>,
    shared_sent: u64,
    max_inflight: usize,
    next_pkid: u16,
}

/// The packet id of the delivery of queue entry `seq`: the same every time
/// it is sent, on any connection (1..=65535; 0 is not a packet id).
pub(crate) fn queued_pkid(seq: Seq) -> u16 {
    (seq % u64::from(u16::MAX)) as u16 + 1
}

/// A delivery the client acknowledged for good: its queue seq, if any.
pub(crate) type Settled = Option<Seq>;

impl Outbox {
    /// `max_inflight` is at most `u16::MAX`, so a free packet id always
    /// exists while [`Outbox::has_room`] holds.
    pub(crate) fn new(max_inflight: u16) -> Outbox {
        Outbox {
            // Grows with use: an idle connection holds no table.
            inflight: HashMap::new(),
            seqs: HashSet::new(),
            shared: HashMap::new(),
            shared_sent: 0,
            max_inflight: usize::from(max_inflight.max(1)),
            next_pkid: 0,
        }
    }

    pub(crate) fn has_room(&self) -> bool {
        self.inflight.len() < self.max_inflight
    }

    /// Whether `delivery` can go now: room in the window, and its packet
    /// id (if derived from its seq) not in flight.
    pub(crate) fn fits(&self, delivery: &Delivery) -> bool {
        if !self.has_room() {
            return false;
        }
        match delivery.seq {
            Some(seq) if delivery.qos != QoS::AtMostOnce => {
                !self.inflight.contains_key(&queued_pkid(seq))
            }
            _ => true,
        }
    }

    /// The packet id of a delivery of QoS ≥ 1 ([`Outbox::fits`] held).
    fn pkid_for(&mut self, delivery: &Delivery) -> u16 {
        match delivery.seq {
            Some(seq) => queued_pkid(seq),
            None => self.allocate(),
        }
    }

    fn allocate(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Whether the delivery of queue entry `seq` is in flight.
    pub(crate) fn has_seq(&self, seq: Seq) -> bool {
        self.seqs.contains(&seq)
    }

    /// A resumed session's QoS 2 delivery whose PUBREC had arrived before:
    /// writes PUBREL under its original packet id and awaits PUBCOMP. False
    /// when that id is taken (the caller sends the PUBLISH again instead).
    pub(crate) fn resume_released(&mut self, pkid: u16, seq: Seq, out: &mut BytesMut) -> bool {
        if pkid == 0 || self.inflight.contains_key(&pkid) {
            return false;
        }
        // PUBREL: type 6, flags 0b0010, remaining length 2.
        out.extend_from_slice(&[0x62, 0x02]);
        out.extend_from_slice(&pkid.to_be_bytes());
        self.inflight.insert(pkid, (Awaiting::Comp, Some(seq)));
        self.seqs.insert(seq);
        true
    }

    /// Encodes `delivery` into `out` (DUP set with `dup`), with its MQTT 5
    /// properties and topic alias when `v5` is given. The caller checks
    /// [`Outbox::fits`] first. A message past its expiry, or (MQTT 5)
    /// larger than the client's maximum packet size, is not sent
    /// (MQTT-3.3.2-5, MQTT-3.1.2-25).
    pub(crate) fn push(
        &mut self,
        delivery: &Delivery,
        dup: bool,
        out: &mut BytesMut,
        v5: Option<&mut V5>,
    ) -> Result<Pushed, rumqttd::protocol::Error> {
        let message = &delivery.message;
        let now = now_ms();
        if message.is_expired(now) {
            return Ok(Pushed::Skipped("expired"));
        }
        let (qos, awaiting) = match delivery.qos {
            QoS::AtMostOnce => (0, None),
            QoS::AtLeastOnce => (1, Some(Awaiting::Ack)),
            QoS::ExactlyOnce => (2, Some(Awaiting::Rec)),
        };
        let alias = v5.as_deref().and_then(|v5| v5.alias_for(&message.topic));
        let p = &message.properties;
        let props = v5.is_some().then(|| OutProps {
            payload_utf8: p.payload_utf8,
            expiry_secs: v5::remaining_secs(p.expires_at_ms, now),
            alias: alias.map(|(a, _)| a),
            // An AMQP reply_to may be no topic name (wildcards): left out.
            response_topic: p
                .reply_to
                .as_deref()
                .filter(|t| edge_core::topic::is_valid_topic(t)),
            correlation: p.correlation.as_deref(),
            content_type: p.content_type.as_deref(),
            user: &p.headers,
            sub_ids: &delivery.sub_ids,
        });
        let mut packet = Outgoing {
            topic: match alias {
                Some((_, true)) => "",
                _ => &message.topic,
            },
            payload: &message.payload,
            qos,
            pkid: 0,
            // MQTT-3.3.1-8/9: RETAIN is set when a retained message is
            // sent for a new subscription, and on live deliveries only
            // for a subscription with retain as published.
            retain: delivery.retained || delivery.retain_as_published,
            dup,
            props,
        };
        if let Some(v5) = v5.as_deref()
            && packet.size() > v5.client_max_packet
        {
            return Ok(Pushed::Skipped("client_max_packet_size"));
        }
        if qos > 0 {
            packet.pkid = self.pkid_for(delivery);
        }
        codec::encode_publish(out, &packet)?;
        if let (Some(v5), Some((alias, false))) = (v5, alias) {
            v5.remember(&message.topic, alias);
        }
        if let Some(awaiting) = awaiting {
            self.inflight.insert(packet.pkid, (awaiting, delivery.seq));
            if let Some(seq) = delivery.seq {
                self.seqs.insert(seq);
            }
            self.keep_shared(packet.pkid, delivery);
        }
        Ok(Pushed::Sent)
    }

    /// An MQTT 5 PUBREC with a failure reason: the QoS 2 delivery ends
    /// there, no PUBREL (MQTT 5 §4.3.3).
    pub(crate) fn pubrec_failed(&mut self, pkid: u16) -> Result<Option<Settled>, ProtocolError> {
        self.advance(Awaiting::Rec, pkid, &[Awaiting::Rec], None)
    }

    /// Keeps a group delivery that only this connection holds.
    fn keep_shared(&mut self, pkid: u16, delivery: &Delivery) {
        if delivery.share.is_some() && delivery.seq.is_none() {
            self.shared_sent += 1;
            self.shared
                .insert(pkid, (self.shared_sent, delivery.clone()));
        }
    }

    /// The group deliveries sent and not yet received by the client (no
    /// PUBACK or PUBREC), for another member to take at the end of the
    /// connection; in the order they were sent.
    pub(crate) fn unsettled_shared(&mut self) -> Vec<Delivery> {
        let mut unsettled: Vec<(u64, Delivery)> = self.shared.drain().map(|(_, d)| d).collect();
        unsettled.sort_unstable_by_key(|(sent, _)| *sent);
        unsettled
            .into_iter()
            .map(|(_, delivery)| delivery)
            .collect()
    }

    /// `got` arrived for `pkid`. In a state of `accepts`, the delivery moves
    /// on to `next` (settled when `None`): `Some(its queue seq)`. Not in
    /// flight: `None`. In any other state the client acknowledged with the
    /// wrong packet.
    fn advance(
        &mut self,
        got: Awaiting,
        pkid: u16,
        accepts: &[Awaiting],
        next: Option<Awaiting>,
    ) -> Result<Option<Settled>, ProtocolError> {
        match self.inflight.get(&pkid).copied() {
            None => Ok(None),
            Some((state, seq)) if accepts.contains(&state) => {
                // PUBACK or PUBREC: the client has the message.
                self.shared.remove(&pkid);
                match next {
                    Some(next) => {
                        self.inflight.insert(pkid, (next, seq));
                    }
                    None => {
                        self.inflight.remove(&pkid);
                        if let Some(seq) = seq {
                            self.seqs.remove(&seq);
                        }
                    }
                }
                Ok(Some(seq))
            }
            Some((state, _)) => Err(ProtocolError::AckMismatch {
                got: got.name(),
                pkid,
                awaiting: state.name(),
            }),
        }
    }

    /// PUBACK: settles a QoS 1 delivery.
    pub(crate) fn puback(&mut self, pkid: u16) -> Result<Option<Settled>, ProtocolError> {
        self.advance(Awaiting::Ack, pkid, &[Awaiting::Ack], None)
    }

    /// PUBREC: a QoS 2 delivery now awaits PUBCOMP; the caller sends PUBREL
    /// (again, for a repeated PUBREC).
    pub(crate) fn pubrec(&mut self, pkid: u16) -> Result<Option<Settled>, ProtocolError> {
        self.advance(
            Awaiting::Rec,
            pkid,
            &[Awaiting::Rec, Awaiting::Comp],
            Some(Awaiting::Comp),
        )
    }

    /// PUBCOMP: settles a QoS 2 delivery whose PUBREL was sent.
    pub(crate) fn pubcomp(&mut self, pkid: u16) -> Result<Option<Settled>, ProtocolError> {
        self.advance(Awaiting::Comp, pkid, &[Awaiting::Comp], None)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use edge_core::Message;

    use super::*;

    impl Outbox {
        fn push_plain(
            &mut self,
            d: &Delivery,
            out: &mut BytesMut,
        ) -> Result<(), rumqttd::protocol::Error> {
            self.push(d, false, out, None).map(drop)
        }
    }

    fn delivery(qos: QoS) -> Delivery {
        Delivery {
            message: Arc::new(Message::new("t", Bytes::from_static(b"p"), qos, "c".into())),
            qos,
            seq: None,
            retained: false,
            retain_as_published: false,
            sub_ids: Vec::new(),
            share: None,
        }
    }

    #[test]
    fn queued_deliveries_keep_their_packet_id_and_a_colliding_one_waits() {
        let queued = |seq| Delivery {
            seq: Some(seq),
            ..delivery(QoS::AtLeastOnce)
        };
        let (a, b) = (queued(70_000), queued(70_000 + u64::from(u16::MAX)));
        assert_eq!(
            queued_pkid(70_000),
            queued_pkid(70_000 + u64::from(u16::MAX))
        );
        let mut outbox = Outbox::new(10);
        let mut out = BytesMut::new();
        assert!(outbox.fits(&a));
        outbox.push_plain(&a, &mut out).expect("encodes");
        // Another connection (a reconnect) sends it with the same id.
        let mut again = BytesMut::new();
        Outbox::new(10).push_plain(&a, &mut again).expect("encodes");
        assert_eq!(out, again);
        assert!(!outbox.fits(&b), "its id is in flight");
        assert!(
            outbox.fits(&delivery(QoS::AtLeastOnce)),
            "others take a free id"
        );
        outbox.puback(queued_pkid(70_000)).expect("in flight");
        assert!(outbox.fits(&b));
    }

    #[test]
    fn qos1_fills_the_window_and_acks_free_it() {
        let mut outbox = Outbox::new(2);
        let mut out = BytesMut::new();
        outbox
            .push_plain(&delivery(QoS::AtMostOnce), &mut out)
            .unwrap();
        assert_eq!(outbox.inflight.len(), 0);
        outbox
            .push_plain(&delivery(QoS::AtLeastOnce), &mut out)
            .unwrap();
        outbox
            .push_plain(&delivery(QoS::AtLeastOnce), &mut out)
            .unwrap();
        assert!(!outbox.has_room());
        assert!(outbox.puback(1).unwrap().is_some());
        assert!(outbox.puback(1).unwrap().is_none());
        assert!(outbox.has_room());
    }

    #[test]
    fn qos2_holds_its_id_until_pubcomp() {
        let mut outbox = Outbox::new(1);
        let mut out = BytesMut::new();
        outbox
            .push_plain(&delivery(QoS::ExactlyOnce), &mut out)
            .unwrap();
        // PUBLISH, QoS 2, packet id 1: topic "t", payload "p".
        assert_eq!(&out[..], &[0x34, 6, 0, 1, b't', 0, 1, b'p']);
        assert!(!outbox.has_room());
        assert!(matches!(
            outbox.pubcomp(1),
            Err(ProtocolError::AckMismatch { .. })
        ));
        assert!(matches!(
            outbox.puback(1),
            Err(ProtocolError::AckMismatch { .. })
        ));
        assert!(outbox.pubrec(1).unwrap().is_some());
        assert!(!outbox.has_room(), "PUBREC does not free the window");
        assert!(
            outbox.pubrec(1).unwrap().is_some(),
            "a repeated PUBREC gets PUBREL again"
        );
        assert!(outbox.pubcomp(1).unwrap().is_some());
        assert!(outbox.has_room());
        assert!(outbox.pubcomp(1).unwrap().is_none());
        assert!(outbox.pubrec(1).unwrap().is_none());
    }

    #[test]
    fn qos1_delivery_is_not_completed_by_qos2_acks() {
        let mut outbox = Outbox::new(4);
        let mut out = BytesMut::new();
        outbox
            .push_plain(&delivery(QoS::AtLeastOnce), &mut out)
            .unwrap();
        assert!(matches!(
            outbox.pubrec(1),
            Err(ProtocolError::AckMismatch {
                got: "PUBREC",
                pkid: 1,
                awaiting: "PUBACK"
            })
        ));
        assert!(matches!(
            outbox.pubcomp(1),
            Err(ProtocolError::AckMismatch { .. })
        ));
    }

    #[test]
    fn unacknowledged_group_deliveries_are_handed_back() {
        let shared = |qos| Delivery {
            share: Some("$share/g/t".into()),
            ..delivery(qos)
        };
        let queued = Delivery {
            seq: Some(7),
            ..shared(QoS::AtLeastOnce)
        };
        let mut outbox = Outbox::new(10);
        let mut out = BytesMut::new();
        for d in [
            shared(QoS::AtMostOnce),
            shared(QoS::AtLeastOnce),
            shared(QoS::AtLeastOnce),
            shared(QoS::ExactlyOnce),
            shared(QoS::ExactlyOnce),
            delivery(QoS::AtLeastOnce),
            queued,
        ] {
            outbox.push_plain(&d, &mut out).expect("encodes");
        }
        // Ids 1..=4 are the group's QoS 1 and 2 deliveries, 5 a plain one.
        outbox.puback(1).expect("in flight");
        outbox.pubrec(3).expect("in flight");
        outbox.puback(5).expect("in flight");
        let back = outbox.unsettled_shared();
        let qos: Vec<QoS> = back.iter().map(|d| d.qos).collect();
        assert_eq!(
            qos,
            [QoS::AtLeastOnce, QoS::ExactlyOnce],
            "the unacknowledged QoS 1 and the QoS 2 without PUBREC, in send order"
        );
        assert!(outbox.unsettled_shared().is_empty());
    }

    #[test]
    fn packet_ids_wrap_and_skip_ids_in_flight() {
        let mut outbox = Outbox::new(3);
        outbox.next_pkid = u16::MAX - 1;
        let mut out = BytesMut::new();
        outbox
            .push_plain(&delivery(QoS::AtLeastOnce), &mut out)
            .unwrap(); // 65535
        outbox.inflight.insert(1, (Awaiting::Ack, None));
        outbox
            .push_plain(&delivery(QoS::AtLeastOnce), &mut out)
            .unwrap(); // skips 0 and 1
        let mut ids: Vec<u16> = outbox.inflight.keys().copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, u16::MAX]);
    }
}
