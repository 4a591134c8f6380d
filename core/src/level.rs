//! How full a persistent session's durable queue is: messages and bytes,
//! counted in memory (exactly at start-up, from the store), checked against
//! the per-session bounds on every fan-out.
//!
//! An acknowledgement names seqs, not sizes, so it takes away the queue's
//! mean message size per entry: the byte figure is an estimate between
//! restarts (exact again when the queue empties), good enough for a bound
//! that exists to keep one absent device from taking the whole quota.

use std::sync::atomic::{AtomicU64, Ordering};

/// Which bound a message did not fit under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    Messages,
    Bytes,
}

#[derive(Debug, Default)]
pub(crate) struct QueueLevel {
    messages: AtomicU64,
    bytes: AtomicU64,
}

impl QueueLevel {
    pub(crate) fn new(messages: u64, bytes: u64) -> QueueLevel {
        QueueLevel {
            messages: AtomicU64::new(messages),
            bytes: AtomicU64::new(bytes),
        }
    }

    pub(crate) fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Counts one message of `size` bytes, unless that would pass a bound.
    /// (Racing publishers may pass a bound by the messages in flight.)
    pub(crate) fn try_add(&self, size: u64, max_messages: u64, max_bytes: u64) -> Result<(), Over> {
        if self.messages() >= max_messages {
            return Err(Over::Messages);
        }
        // An empty queue takes any one message, so a message larger than
        // the bound is not refused for ever.
        if self.messages() > 0 && self.bytes().saturating_add(size) > max_bytes {
            return Err(Over::Bytes);
        }
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Takes back one message of `size` bytes (its append was refused).
    pub(crate) fn remove_exact(&self, size: u64) {
        sub(&self.messages, 1);
        sub(&self.bytes, size);
    }

    /// `n` entries acknowledged: their sizes are estimated at the mean.
    pub(crate) fn remove_acked(&self, n: u64) {
        let messages = self.messages();
        let bytes = self.bytes();
        let take = if n >= messages {
            bytes
        } else {
            bytes / messages.max(1) * n
        };
        sub(&self.messages, n);
        sub(&self.bytes, take);
        if self.messages() == 0 {
            self.bytes.store(0, Ordering::Relaxed);
        }
    }
}

fn sub(a: &AtomicU64, n: u64) {
    let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        Some(v.saturating_sub(n))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_by_messages_and_bytes() {
        let level = QueueLevel::default();
        assert_eq!(
            level.try_add(5_000, 10, 1_000),
            Ok(()),
            "an empty queue takes one"
        );
        assert_eq!(level.try_add(1, 10, 1_000), Err(Over::Bytes));
        level.remove_acked(1);
        assert_eq!((level.messages(), level.bytes()), (0, 0));
        for _ in 0..3 {
            assert_eq!(level.try_add(100, 3, 1_000), Ok(()));
        }
        assert_eq!(level.try_add(100, 3, 1_000), Err(Over::Messages));
        level.remove_exact(100);
        assert_eq!((level.messages(), level.bytes()), (2, 200));
        level.remove_acked(1);
        assert_eq!((level.messages(), level.bytes()), (1, 100));
        level.remove_acked(5);
        assert_eq!((level.messages(), level.bytes()), (0, 0));
    }
}
