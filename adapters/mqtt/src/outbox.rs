//! Deliveries to the client: QoS 1 PUBLISHes wait in the inflight set until
//! the client's PUBACK. The connection stops taking deliveries from the
//! router while the set is full, so a slow client fills its bounded router
//! queue (where drops are counted) instead of this process's memory.

use std::collections::HashSet;

use bytes::BytesMut;
use edge_core::{Delivery, QoS};

use crate::codec;

#[derive(Debug)]
pub(crate) struct Outbox {
    inflight: HashSet<u16>,
    max_inflight: usize,
    next_pkid: u16,
}

impl Outbox {
    /// `max_inflight` is at most `u16::MAX`, so a free packet id always
    /// exists while [`Outbox::has_room`] holds.
    pub(crate) fn new(max_inflight: u16) -> Outbox {
        Outbox {
            inflight: HashSet::with_capacity(usize::from(max_inflight)),
            max_inflight: usize::from(max_inflight.max(1)),
            next_pkid: 0,
        }
    }

    pub(crate) fn has_room(&self) -> bool {
        self.inflight.len() < self.max_inflight
    }

    fn allocate(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Encodes `delivery` into `out`. The caller checks [`Outbox::has_room`] first.
    pub(crate) fn push(
        &mut self,
        delivery: &Delivery,
        out: &mut BytesMut,
    ) -> Result<(), rumqttd::protocol::Error> {
        let message = &delivery.message;
        let (qos, pkid) = match delivery.qos {
            QoS::AtMostOnce => (0, 0),
            QoS::AtLeastOnce | QoS::ExactlyOnce => (1, self.allocate()),
        };
        codec::encode_publish(
            out,
            &message.topic,
            &message.payload,
            qos,
            pkid,
            // MQTT-3.3.1-8/9: RETAIN is set only when a retained message
            // is sent for a new subscription, 0 on live deliveries.
            delivery.retained,
        )?;
        if qos > 0 {
            self.inflight.insert(pkid);
        }
        Ok(())
    }

    /// The client acknowledged `pkid`; false if it was not in flight.
    pub(crate) fn acked(&mut self, pkid: u16) -> bool {
        self.inflight.remove(&pkid)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use edge_core::Message;

    use super::*;

    fn delivery(qos: QoS) -> Delivery {
        Delivery {
            message: Arc::new(Message::new("t", Bytes::from_static(b"p"), qos, "c".into())),
            qos,
            seq: None,
            retained: false,
        }
    }

    #[test]
    fn qos1_fills_the_window_and_acks_free_it() {
        let mut outbox = Outbox::new(2);
        let mut out = BytesMut::new();
        outbox.push(&delivery(QoS::AtMostOnce), &mut out).unwrap();
        assert_eq!(outbox.inflight.len(), 0);
        outbox.push(&delivery(QoS::AtLeastOnce), &mut out).unwrap();
        outbox.push(&delivery(QoS::AtLeastOnce), &mut out).unwrap();
        assert!(!outbox.has_room());
        assert!(outbox.acked(1));
        assert!(!outbox.acked(1));
        assert!(outbox.has_room());
    }

    #[test]
    fn packet_ids_wrap_and_skip_ids_in_flight() {
        let mut outbox = Outbox::new(3);
        outbox.next_pkid = u16::MAX - 1;
        let mut out = BytesMut::new();
        outbox.push(&delivery(QoS::AtLeastOnce), &mut out).unwrap(); // 65535
        outbox.inflight.insert(1);
        outbox.push(&delivery(QoS::AtLeastOnce), &mut out).unwrap(); // skips 0 and 1
        let mut ids: Vec<u16> = outbox.inflight.iter().copied().collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, u16::MAX]);
    }
}
