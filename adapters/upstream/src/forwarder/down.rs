//! While the link is down: keep the cursor moving over records that no
//! route of this upstream takes.

use std::future::Future;

use edge_store::Seq;
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

    /// Moves each lane's cursor over the leading run of records it does
    /// not take (no route of this upstream matches, or the first match is
    /// another lane's), looking at most at `max` records per lane. Stops at
    /// the first record the lane has to forward, and at anything it cannot
    /// read (the next link handles that).
    pub(crate) async fn skip_unmatched(&mut self, max: usize) {
        for lane in 0..self.lanes.len() {
            let Some(start) = self.lanes.get(lane).map(|l| l.position) else {
                continue;
            };
            let from = self.skip_from(lane, start, max).await;
            if from > start {
                debug!(upstream = %self.name, lane_priority = self.lanes[lane].priority,
                    from = start, to = from,
                    "link down: cursor moved over messages this lane does not take");
                self.set_lane_position(lane, from);
            }
        }
    }

    /// The first seq at or after `start` that lane `lane` has to forward,
    /// within `max` records.
    async fn skip_from(&self, lane: usize, start: Seq, max: usize) -> Seq {
        let mut from = start;
        let mut left = max;
        while left > 0 {
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
                let route = route_of_entry(&self.routes, &self.name, entry);
                if route.is_some_and(|r| self.in_lane(lane, r)) {
                    return entry.seq;
                }
                from = entry.seq + 1;
            }
        }
        from
    }
}
