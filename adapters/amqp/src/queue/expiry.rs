//! `x-expires`: a queue unused for that long (no consumers, no declare,
//! no get) is deleted; the broker watches each such queue with one task
//! (`Broker::watch_expiry`) that waits here, on one timer at a time.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::Queue;

/// Resolves with the queue once it has been unused (no consumers, no
/// declare or get) for its `x-expires`; `None` when it has none, or is
/// deleted or gone first. One timer at a time, reset when it is used.
pub(crate) async fn until_expired(queue: Weak<Queue>) -> Option<Arc<Queue>> {
    loop {
        let q = queue.upgrade()?;
        q.flags.args.expires?;
        if q.stop.is_cancelled() {
            return None;
        }
        let deadline = q.expires_at();
        if deadline.is_some_and(|at| at <= Instant::now()) {
            return Some(q);
        }
        let (stop, used) = (q.stop.clone(), Arc::clone(&q.used));
        drop(q);
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = timer => {}
            _ = used.notified() => {}
            _ = stop.cancelled() => return None,
        }
    }
}

impl Queue {
    /// A declare (passive or not) or get renews an `x-expires` lease, as
    /// in RabbitMQ.
    pub(crate) fn touch(&self) {
        if self.flags.args.expires.is_some() {
            self.state().last_used = Instant::now();
            self.used.notify_one();
        }
    }

    /// When the queue expires if nobody uses it; `None` while it has
    /// consumers or without `x-expires`.
    fn expires_at(&self) -> Option<Instant> {
        let expires = Duration::from_millis(self.flags.args.expires?);
        let s = self.state();
        s.consumers.is_empty().then(|| s.last_used + expires)
    }

    /// Whether the queue is unused past its `x-expires` now.
    pub(crate) fn is_expired(&self) -> bool {
        self.expires_at().is_some_and(|at| at <= Instant::now())
    }
}
