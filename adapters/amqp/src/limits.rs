//! Queue length limits decided at publish time: a `reject-publish` or
//! `reject-publish-dlx` queue's [`Admission`], the core session's
//! [`Gate`], so that a message over `x-max-length` / `x-max-length-bytes`
//! is refused before its publisher is confirmed (`basic.nack`) while the
//! other queues it is routed to still take it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use edge_core::{Gate, Message, Refused};

use crate::broker::Broker;

/// A `reject-publish` queue's admission: ready messages and their payload
/// bytes, counted when admitted (before the message is queued), taken off
/// when they leave `ready`, added back when requeued, refunded when the
/// core drops them before they reach the queue (the store refused the
/// publish; a transient one found the queue's channel full or expired on
/// the way). A durable queue's entries are counted again at start, their
/// bytes not.
#[derive(Debug)]
pub(crate) struct Admission {
    max_length: Option<u64>,
    max_bytes: Option<u64>,
    ready: AtomicU64,
    bytes: AtomicU64,
}

impl Admission {
    pub(crate) fn new(max_length: Option<u64>, max_bytes: Option<u64>) -> Admission {
        Admission {
            max_length,
            max_bytes,
            ready: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// A durable queue's entries at start (their bytes are not known).
    pub(crate) fn add_stored(&self, messages: u64) {
        self.ready.fetch_add(messages, Ordering::Relaxed);
    }

    /// A message left `ready`.
    pub(crate) fn left(&self, len: usize) {
        for (a, n) in [(&self.ready, 1), (&self.bytes, len as u64)] {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        }
    }

    /// A message is back in `ready`.
    pub(crate) fn back(&self, len: usize) {
        self.ready.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
}

impl Gate for Admission {
    fn admit(&self, message: &Message) -> bool {
        let len = message.payload.len() as u64;
        if self
            .max_bytes
            .is_some_and(|max| self.bytes.load(Ordering::Relaxed).saturating_add(len) > max)
        {
            return false;
        }
        let max = self.max_length.unwrap_or(u64::MAX);
        let admitted = self
            .ready
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
        admitted
    }

    fn refund(&self, message: &Message) {
        self.left(message.payload.len());
    }
}

impl Broker {
    /// A message some queues refused at their limit (`reject-publish`):
    /// counted and summarised (`amqp_max_length`, once per refusing
    /// queue; none of them has it); a `reject-publish-dlx` queue
    /// dead-letters it. `whence` describes where it came from, for the log.
    pub(crate) fn refused(&self, refused: Refused, whence: &dyn Fn() -> String) {
        let n = refused.sessions.len() as u64;
        crate::logs::dropped("amqp_max_length", n, || {
            let queues: Vec<&str> = refused
                .sessions
                .iter()
                .map(|s| {
                    s.strip_prefix(edge_core::session::AMQP_QUEUE_PREFIX)
                        .unwrap_or(s)
                })
                .collect();
            format!("{}: refused at x-max-length by queues {queues:?}", whence())
        });
        for session in &refused.sessions {
            if let Some(q) = self.queue_of_session(session) {
                q.refused(Arc::clone(&refused.message));
            }
        }
    }
}
