//! One channel's state: the content being received, its consumers, the
//! deliveries awaiting an ack (by delivery tag), and what a transaction
//! holds until its commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use amq_protocol::protocol::basic::{AMQPProperties, Publish};
use bytes::Bytes;

use crate::error::{Exception, PRECONDITION_FAILED, UNEXPECTED_FRAME};
use crate::queue::Queue;

/// Settled deliveries, grouped by their queue: (queue, message ids).
pub(crate) type ByQueue = Vec<(Arc<Queue>, Vec<u64>)>;

/// A consumer of a channel.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub queue: Arc<Queue>,
    pub no_ack: bool,
    /// Its key in the queue's consumer list (unique per connection).
    pub key: u64,
    /// basic.qos (global = false) when it was created: its unacked
    /// deliveries at most (0: no limit).
    pub prefetch: u16,
    /// Its deliveries awaiting an ack.
    pub unacked: usize,
}

/// A delivery the client has not acknowledged yet.
#[derive(Debug)]
pub(crate) struct Unacked {
    pub queue: Arc<Queue>,
    pub id: u64,
    /// The consumer it went to (none for basic.get).
    pub consumer: Option<Arc<str>>,
}

/// A publish whose content is still arriving.
#[derive(Debug)]
struct Incoming {
    publish: Publish,
    header: Option<(u64, AMQPProperties)>,
    body: Vec<u8>,
}

/// Publishes, acks, nacks and rejects one transaction holds at most.
pub(crate) const TX_MAX_HELD: usize = 16 * 1024;
/// Message bytes one transaction holds at most.
pub(crate) const TX_MAX_BYTES: usize = 32 << 20;
/// Message bytes the transactions of all channels of one connection hold
/// at most together (else one client could hold `channel_max` times
/// [`TX_MAX_BYTES`]).
pub(crate) const TX_MAX_CONNECTION_BYTES: usize = 32 << 20;

/// The message bytes held by the transactions of one connection's channels.
pub(crate) type TxBudget = Arc<AtomicUsize>;

/// What a transaction holds until it is committed or rolled back.
#[derive(Debug)]
pub(crate) enum Held {
    Publish(Box<Content>),
    /// Deliveries settled in the transaction (no longer unacked on the
    /// channel): acked (`None`), requeued (`Some(true)`) or dropped.
    Settle {
        entries: Vec<(u64, Unacked)>,
        requeue: Option<bool>,
    },
}

/// A channel in transaction mode (tx.select).
#[derive(Debug, Default)]
pub(crate) struct Tx {
    pub held: Vec<Held>,
    bytes: usize,
    /// Shared by the connection's channels; this transaction's `bytes`
    /// are part of it until it ends.
    budget: TxBudget,
}

impl Tx {
    pub(crate) fn new(budget: TxBudget) -> Self {
        Tx {
            held: Vec::new(),
            bytes: 0,
            budget,
        }
    }

    /// What the transaction held is gone: its bytes leave the budget.
    fn release(&mut self) {
        self.budget.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        self.release();
    }
}

/// A publish with all of its content.
#[derive(Debug)]
pub(crate) struct Content {
    pub publish: Publish,
    pub properties: AMQPProperties,
    pub body: Bytes,
}

#[derive(Debug)]
pub(crate) struct Channel {
    /// Which opening of this channel number it is (outcomes of a closed
    /// one's publishes must not confirm a reopened one's).
    pub epoch: u64,
    /// We sent channel.close and wait for close-ok: other frames are dropped.
    pub closing: bool,
    /// channel.flow from the client: deliveries pause while false.
    pub active: bool,
    /// Publisher confirms (confirm.select).
    pub confirm: bool,
    /// Transaction mode (tx.select) and what the current one holds.
    pub tx: Option<Tx>,
    /// The delivery tag of the next publish in confirm mode.
    pub next_publish: u64,
    pub consumers: BTreeMap<String, Consumer>,
    pub unacked: BTreeMap<u64, Unacked>,
    pub next_tag: u64,
    /// basic.qos with global = true: unacked deliveries of the whole
    /// channel at most (0: no limit).
    pub prefetch: u16,
    /// basic.qos with global = false: the limit of each consumer created
    /// afterwards (RabbitMQ's reading of the flag).
    pub consumer_prefetch: u16,
    /// The queue declared last: what an empty queue name means.
    pub last_queue: Option<String>,
    incoming: Option<Incoming>,
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            epoch: 0,
            closing: false,
            active: true,
            confirm: false,
            tx: None,
            next_publish: 1,
            consumers: BTreeMap::new(),
            unacked: BTreeMap::new(),
            next_tag: 1,
            prefetch: 0,
            consumer_prefetch: 0,
            last_queue: None,
            incoming: None,
        }
    }
}

fn unexpected(detail: impl std::fmt::Display) -> Exception {
    Exception::connection(UNEXPECTED_FRAME, detail)
}

impl Channel {
    /// A channel just opened, the connection's `epoch`-th.
    pub(crate) fn open(epoch: u64) -> Channel {
        Channel {
            epoch,
            ..Channel::default()
        }
    }

    /// A channel we sent channel.close on, awaiting close-ok.
    pub(crate) fn closing() -> Channel {
        Channel {
            closing: true,
            ..Channel::default()
        }
    }

    /// Whether a publish waits for its content header or body (any method
    /// now is a 505).
    pub(crate) fn expects_content(&self) -> bool {
        self.incoming.is_some()
    }

    /// Deliveries that may still be sent to consumer `tag` before its own
    /// prefetch limit or the channel's.
    pub(crate) fn credit(&self, tag: &str) -> usize {
        let limit = |prefetch: u16, used: usize| match prefetch {
            0 => usize::MAX,
            n => usize::from(n).saturating_sub(used),
        };
        let own = self
            .consumers
            .get(tag)
            .map_or(usize::MAX, |c| limit(c.prefetch, c.unacked));
        own.min(limit(self.prefetch, self.unacked.len()))
    }

    pub(crate) fn start_publish(&mut self, publish: Publish) {
        self.incoming = Some(Incoming {
            publish,
            header: None,
            body: Vec::new(),
        });
    }

    /// The content header of the publish under way; the content when its
    /// body is empty.
    pub(crate) fn on_header(
        &mut self,
        class_id: u16,
        size: u64,
        properties: AMQPProperties,
        max_size: u64,
    ) -> Result<Option<Content>, Exception> {
        let Some(incoming) = self.incoming.as_mut() else {
            return Err(unexpected("content header without a basic.publish"));
        };
        if incoming.header.is_some() {
            return Err(unexpected("second content header for one basic.publish"));
        }
        if class_id != 60 {
            return Err(unexpected(format!("content header of class {class_id}")));
        }
        if size > max_size {
            self.incoming = None;
            return Err(Exception::channel(
                PRECONDITION_FAILED,
                format!("message size {size} is larger than configured max size {max_size}"),
            )
            .on(60, 40));
        }
        incoming.header = Some((size, properties));
        Ok(if size == 0 { self.complete() } else { None })
    }

    /// A content body frame; the content once the announced size is in.
    pub(crate) fn on_body(&mut self, chunk: Vec<u8>) -> Result<Option<Content>, Exception> {
        let Some(incoming) = self.incoming.as_mut() else {
            return Err(unexpected("content body without a basic.publish"));
        };
        let Some((size, _)) = &incoming.header else {
            return Err(unexpected("content body before its content header"));
        };
        let size = *size;
        if incoming.body.len() as u64 + chunk.len() as u64 > size {
            return Err(unexpected(format!(
                "content body exceeds the announced size of {size} octets"
            )));
        }
        if incoming.body.is_empty() {
            incoming.body = chunk;
        } else {
            incoming.body.extend_from_slice(&chunk);
        }
        Ok((incoming.body.len() as u64 == size)
            .then(|| self.complete())
            .flatten())
    }

    fn complete(&mut self) -> Option<Content> {
        let incoming = self.incoming.take()?;
        let (_, properties) = incoming.header?;
        Some(Content {
            publish: incoming.publish,
            properties,
            body: Bytes::from(incoming.body),
        })
    }

    /// Registers a delivery awaiting its ack; returns its delivery tag.
    pub(crate) fn delivered(
        &mut self,
        queue: &Arc<Queue>,
        id: u64,
        no_ack: bool,
        consumer: Option<&str>,
    ) -> u64 {
        let tag = self.next_tag;
        self.next_tag += 1;
        if !no_ack {
            let consumer = consumer.and_then(|t| {
                let c = self.consumers.get_mut(t)?;
                c.unacked += 1;
                Some(Arc::from(t))
            });
            self.unacked.insert(
                tag,
                Unacked {
                    queue: Arc::clone(queue),
                    id,
                    consumer,
                },
            );
        }
        tag
    }

    /// Deliveries leave (`back` false) or come back to their consumers'
    /// counts of unacked ones.
    fn count(&mut self, entries: &[(u64, Unacked)], back: bool) {
        for (_, u) in entries {
            if let Some(c) = u
                .consumer
                .as_deref()
                .and_then(|t| self.consumers.get_mut(t))
            {
                c.unacked = if back {
                    c.unacked + 1
                } else {
                    c.unacked.saturating_sub(1)
                };
            }
        }
    }

    /// Settled deliveries a transaction held are unacked again.
    pub(crate) fn restore(&mut self, entries: Vec<(u64, Unacked)>) {
        self.count(&entries, true);
        self.unacked.extend(entries);
    }

    /// The deliveries an ack, nack or reject settles: `tag` alone, with
    /// `multiple` every one up to it (tag 0 with `multiple`: all).
    pub(crate) fn settle(&mut self, tag: u64, multiple: bool) -> Result<ByQueue, Exception> {
        let settled = self.settle_entries(tag, multiple)?;
        Ok(by_queue(settled.into_iter().map(|(_, u)| u).collect()))
    }

    /// Like [`Channel::settle`], keeping the delivery tags (a transaction
    /// rolled back puts them back).
    pub(crate) fn settle_entries(
        &mut self,
        tag: u64,
        multiple: bool,
    ) -> Result<Vec<(u64, Unacked)>, Exception> {
        let settled: Vec<(u64, Unacked)> = if multiple && tag == 0 {
            std::mem::take(&mut self.unacked).into_iter().collect()
        } else if multiple {
            if !self.unacked.contains_key(&tag) {
                return Err(unknown_tag(tag));
            }
            let rest = self.unacked.split_off(&(tag + 1));
            std::mem::replace(&mut self.unacked, rest)
                .into_iter()
                .collect()
        } else {
            match self.unacked.remove(&tag) {
                Some(u) => vec![(tag, u)],
                None => return Err(unknown_tag(tag)),
            }
        };
        self.count(&settled, false);
        Ok(settled)
    }

    /// Adds to the transaction under way, within its bounds (406 beyond).
    pub(crate) fn hold(&mut self, held: Held) -> Result<(), Exception> {
        let Some(tx) = self.tx.as_mut() else {
            return Err(not_transactional());
        };
        let bytes = match &held {
            Held::Publish(c) => c.body.len(),
            Held::Settle { .. } => 0,
        };
        let held_by_connection = tx.budget.load(Ordering::Relaxed);
        let error = if tx.held.len() >= TX_MAX_HELD || tx.bytes + bytes > TX_MAX_BYTES {
            Some(format!(
                "a transaction holds at most {TX_MAX_HELD} publishes, acks and rejects and {TX_MAX_BYTES} message bytes: commit or roll back"
            ))
        } else if held_by_connection + bytes > TX_MAX_CONNECTION_BYTES {
            Some(format!(
                "the transactions of a connection hold at most {TX_MAX_CONNECTION_BYTES} message bytes together: commit or roll back"
            ))
        } else {
            None
        };
        if let Some(text) = error {
            if let Held::Settle { entries, .. } = held {
                self.restore(entries);
            }
            return Err(Exception::channel(PRECONDITION_FAILED, text));
        }
        tx.bytes += bytes;
        tx.budget.fetch_add(bytes, Ordering::Relaxed);
        tx.held.push(held);
        Ok(())
    }

    /// Ends the transaction under way: what it held, the channel staying
    /// in transaction mode.
    pub(crate) fn take_tx(&mut self) -> Result<Vec<Held>, Exception> {
        let tx = self.tx.as_mut().ok_or_else(not_transactional)?;
        tx.release();
        Ok(std::mem::take(&mut tx.held))
    }

    /// A rollback: the settled deliveries it held are unacked again (not
    /// redelivered until recovered or the channel closes, as RabbitMQ),
    /// its publishes discarded.
    pub(crate) fn roll_back(&mut self) -> Result<(), Exception> {
        for held in self.take_tx()? {
            if let Held::Settle { entries, .. } = held {
                self.restore(entries);
            }
        }
        Ok(())
    }

    /// Every unacknowledged delivery, by queue (recover).
    pub(crate) fn take_unacked(&mut self) -> ByQueue {
        let all: Vec<(u64, Unacked)> = std::mem::take(&mut self.unacked).into_iter().collect();
        self.count(&all, false);
        by_queue(all.into_iter().map(|(_, u)| u).collect())
    }

    /// At the channel's end: every delivery not settled for good, those an
    /// uncommitted transaction settled included, by queue.
    pub(crate) fn take_unsettled(&mut self) -> ByQueue {
        if let Some(tx) = self.tx.as_mut() {
            tx.release();
            for held in std::mem::take(&mut tx.held) {
                if let Held::Settle { entries, .. } = held {
                    self.restore(entries);
                }
            }
        }
        self.take_unacked()
    }
}

fn not_transactional() -> Exception {
    Exception::channel(PRECONDITION_FAILED, "channel is not transactional")
}

fn unknown_tag(tag: u64) -> Exception {
    Exception::channel(PRECONDITION_FAILED, format!("unknown delivery tag {tag}"))
}

pub(crate) fn by_queue(settled: Vec<Unacked>) -> ByQueue {
    let mut out: ByQueue = Vec::new();
    for u in settled {
        match out.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
            Some((_, ids)) => ids.push(u.id),
            None => out.push((u.queue, vec![u.id])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish() -> Publish {
        Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: false,
        }
    }

    #[test]
    fn content_is_assembled_and_checked_against_its_size() {
        let mut ch = Channel::default();
        assert_eq!(
            ch.on_body(vec![1]).map(|_| ()).map_err(|e| e.code),
            Err(UNEXPECTED_FRAME)
        );
        ch.start_publish(publish());
        assert!(ch.expects_content());
        assert!(
            ch.on_header(60, 5, AMQPProperties::default(), 10)
                .expect("header")
                .is_none()
        );
        assert!(ch.on_body(b"he".to_vec()).expect("body").is_none());
        let c = ch
            .on_body(b"llo".to_vec())
            .expect("body")
            .expect("complete");
        assert_eq!(&c.body[..], b"hello");
        assert!(!ch.expects_content());

        ch.start_publish(publish());
        ch.on_header(60, 2, AMQPProperties::default(), 10)
            .expect("header");
        let e = ch.on_body(b"abc".to_vec()).expect_err("too long");
        assert_eq!(e.code, UNEXPECTED_FRAME);

        let mut ch = Channel::default();
        ch.start_publish(publish());
        let e = ch
            .on_header(60, 11, AMQPProperties::default(), 10)
            .expect_err("too large");
        assert_eq!(e.code, PRECONDITION_FAILED);
        let mut ch = Channel::default();
        ch.start_publish(publish());
        let empty = ch
            .on_header(60, 0, AMQPProperties::default(), 10)
            .expect("header");
        assert!(empty.is_some_and(|c| c.body.is_empty()));
    }

    #[test]
    fn a_transaction_is_bounded_and_needs_select() {
        let mut ch = Channel::default();
        let content = || {
            Box::new(Content {
                publish: publish(),
                properties: AMQPProperties::default(),
                body: Bytes::from_static(b"x"),
            })
        };
        let e = ch.hold(Held::Publish(content())).expect_err("no tx");
        assert_eq!(e.text, "PRECONDITION_FAILED - channel is not transactional");
        assert!(ch.roll_back().is_err());
        ch.tx = Some(Tx::default());
        for _ in 0..TX_MAX_HELD {
            ch.hold(Held::Publish(content())).expect("within bounds");
        }
        let e = ch.hold(Held::Publish(content())).expect_err("bounded");
        assert_eq!(e.code, PRECONDITION_FAILED);
        assert_eq!(ch.take_tx().expect("tx").len(), TX_MAX_HELD);
        let big = Box::new(Content {
            body: Bytes::from(vec![0u8; TX_MAX_BYTES + 1]),
            ..*content()
        });
        assert!(ch.hold(Held::Publish(big)).is_err(), "bytes bounded too");
        assert!(ch.take_tx().expect("still in tx mode").is_empty());
    }

    #[test]
    fn the_transactions_of_a_connection_share_one_byte_budget() {
        let budget = TxBudget::default();
        let content = |n: usize| {
            Box::new(Content {
                publish: publish(),
                properties: AMQPProperties::default(),
                body: Bytes::from(vec![0u8; n]),
            })
        };
        let mut a = Channel::default();
        let mut b = Channel::default();
        a.tx = Some(Tx::new(Arc::clone(&budget)));
        b.tx = Some(Tx::new(Arc::clone(&budget)));
        let part = TX_MAX_CONNECTION_BYTES / 2 + 1;
        a.hold(Held::Publish(content(part)))
            .expect("within both bounds");
        let e = b
            .hold(Held::Publish(content(part)))
            .expect_err("the connection's budget is spent");
        assert_eq!(e.code, PRECONDITION_FAILED);
        assert!(
            e.text.contains("transactions of a connection"),
            "{}",
            e.text
        );
        assert_eq!(budget.load(Ordering::Relaxed), part);
        // A commit (or rollback) gives the bytes back.
        assert_eq!(a.take_tx().expect("tx").len(), 1);
        assert_eq!(budget.load(Ordering::Relaxed), 0);
        b.hold(Held::Publish(content(part))).expect("room again");
        a.hold(Held::Publish(content(10))).expect("small");
        // So does the channel's end, with or without take_unsettled.
        drop(b);
        assert_eq!(budget.load(Ordering::Relaxed), 10);
        a.take_unsettled();
        assert_eq!(budget.load(Ordering::Relaxed), 0);
        drop(a);
        assert_eq!(budget.load(Ordering::Relaxed), 0);
    }
}
