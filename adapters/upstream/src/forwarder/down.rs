//! While the link is down: keep the cursor moving over records that no
//! route of this upstream takes.

use std::future::Future;

use tracing::debug;

use super::{
    DOWN_SKIP_MAX_RECORDS, Forwarder, READ_MAX_BYTES, READ_MAX_MESSAGES, TICK, route_of_entry,
};

impl Forwarder {
    /// Runs `link_attempt` (a connect or the pause before one) and, while it
    /// runs, moves the cursor over records that no route of this upstream
    /// matches, so traffic never bound here does not hold the log while the
    /// link is down.
    pub(crate) async fn while_down<F: Future>(&mut self, link_attempt: F) -> F::Output {
        tokio::pin!(link_attempt);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                out = &mut link_attempt => return out,
                _ = tick.tick() => self.skip_unmatched(DOWN_SKIP_MAX_RECORDS).await,
            }
        }
    }

    /// Moves the cursor over the leading run of records that no route of
    /// this upstream matches, looking at most at `max` records. Stops at
    /// the first record that needs forwarding, and at anything it cannot
    /// read (the next link handles that).
    pub(crate) async fn skip_unmatched(&mut self, max: usize) {
        let start = self.position();
        let mut from = start;
        let mut left = max;
        'read: while left > 0 {
            let store = self.store.clone();
            let n = left.min(READ_MAX_MESSAGES);
            let batch = match tokio::task::spawn_blocking(move || {
                store.read(from, n, READ_MAX_BYTES)
            })
            .await
            {
                Ok(Ok(batch)) if !batch.is_empty() => batch,
                _ => break,
            };
            left = left.saturating_sub(batch.len());
            for entry in &batch {
                if route_of_entry(&self.routes, &self.name, entry).is_some() {
                    from = entry.seq;
                    break 'read;
                }
                from = entry.seq + 1;
            }
        }
        if from > start {
            debug!(upstream = %self.name, from = start, to = from,
                "link down: cursor moved over messages no route of this upstream takes");
            self.set_position(from);
        }
    }
}
