//! The metrics of one upstream, with handles resolved once.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edge_store::{Seq, Store, StoreStats};
use metrics::{Counter, Gauge, Histogram};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::tls::TlsFailure;

/// Every `reason` of `edge_messages_parked_total`.
pub(crate) const PARK_REASONS: [&str; 3] = ["exchange_not_found", "unconvertible", "unroutable"];

/// `edge_upstream_tls_failures_total{upstream, reason}`: one counter per
/// [`TlsFailure`], all registered at zero so that alerts can be written
/// before the first failure.
pub(crate) fn tls_failure_counters(upstream: &str) -> Vec<(TlsFailure, Counter)> {
    TlsFailure::ALL
        .iter()
        .map(|&reason| {
            let counter = metrics::counter!("edge_upstream_tls_failures_total",
                "upstream" => upstream.to_string(), "reason" => reason.label());
            counter.increment(0);
            (reason, counter)
        })
        .collect()
}

/// How often backlog figures are refreshed.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct UpstreamMetrics {
    upstream: String,
    link_up: Gauge,
    backlog_messages: Gauge,
    backlog_bytes: Gauge,
    oldest_unforwarded: Gauge,
    confirm_seconds: Histogram,
    nacks: Counter,
    forwarded: HashMap<String, Counter>,
    expired: HashMap<String, Counter>,
    parked: HashMap<&'static str, Counter>,
}

impl UpstreamMetrics {
    pub(crate) fn new(upstream: &str) -> UpstreamMetrics {
        let u = upstream.to_string();
        // Failure counters exist at zero, so alerts can be written before
        // the first failure.
        for reason in PARK_REASONS {
            metrics::counter!("edge_messages_parked_total",
                "upstream" => u.clone(), "reason" => reason)
            .increment(0);
        }
        metrics::counter!("edge_messages_dropped_total", "reason" => "unreadable").increment(0);
        UpstreamMetrics {
            link_up: metrics::gauge!("edge_upstream_link_up", "upstream" => u.clone()),
            backlog_messages: metrics::gauge!("edge_upstream_backlog_messages",
                "upstream" => u.clone()),
            backlog_bytes: metrics::gauge!("edge_upstream_backlog_bytes", "upstream" => u.clone()),
            oldest_unforwarded: metrics::gauge!("edge_upstream_oldest_unforwarded_seconds",
                "upstream" => u.clone()),
            confirm_seconds: metrics::histogram!("edge_upstream_confirm_seconds",
                "upstream" => u.clone()),
            nacks: metrics::counter!("edge_upstream_nacks_total", "upstream" => u.clone()),
            forwarded: HashMap::new(),
            expired: HashMap::new(),
            parked: HashMap::new(),
            upstream: u,
        }
    }

    pub(crate) fn link_up(&self, up: bool) {
        self.link_up.set(if up { 1.0 } else { 0.0 });
    }

    pub(crate) fn backlog(&self, messages: u64, bytes: u64) {
        self.backlog_messages.set(messages as f64);
        self.backlog_bytes.set(bytes as f64);
    }

    pub(crate) fn oldest_unforwarded(&self, age: Duration) {
        self.oldest_unforwarded.set(age.as_secs_f64());
    }

    pub(crate) fn confirmed(&self, latency: Duration) {
        self.confirm_seconds.record(latency.as_secs_f64());
    }

    pub(crate) fn nack(&self) {
        self.nacks.increment(1);
    }

    pub(crate) fn forwarded(&mut self, route: &str) {
        let upstream = &self.upstream;
        labelled(&mut self.forwarded, route, || {
            metrics::counter!("edge_messages_forwarded_total",
                "upstream" => upstream.clone(), "route" => route.to_string())
        })
        .increment(1);
    }

    pub(crate) fn expired(&mut self, route: &str, n: u64) {
        let upstream = &self.upstream;
        labelled(&mut self.expired, route, || {
            metrics::counter!("edge_messages_expired_total",
                "upstream" => upstream.clone(), "route" => route.to_string())
        })
        .increment(n);
    }

    pub(crate) fn parked(&mut self, reason: &'static str) {
        let upstream = &self.upstream;
        labelled(&mut self.parked, &reason, || {
            metrics::counter!("edge_messages_parked_total",
                "upstream" => upstream.clone(), "reason" => reason)
        })
        .increment(1);
    }
}

/// The counter for one label value, registered on first use.
fn labelled<'m, K, Q>(
    map: &'m mut HashMap<K, Counter>,
    key: &Q,
    register: impl FnOnce() -> Counter,
) -> &'m Counter
where
    K: Hash + Eq + std::borrow::Borrow<Q>,
    Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
{
    if !map.contains_key(key) {
        map.insert(key.to_owned(), register());
    }
    &map[key]
}

/// Backlog of a cursor at `position`: (messages, approximate bytes). Bytes
/// are the live bytes scaled by the share of live messages in the backlog,
/// exact when this is the only cursor.
pub(crate) fn backlog(stats: &StoreStats, position: Seq) -> (u64, u64) {
    let from = position.max(stats.first_seq).max(1);
    let messages = stats.next_seq.saturating_sub(from);
    let bytes = if stats.live_messages == 0 {
        0
    } else if messages >= stats.live_messages {
        stats.live_bytes
    } else {
        let share =
            u128::from(stats.live_bytes) * u128::from(messages) / u128::from(stats.live_messages);
        u64::try_from(share).unwrap_or(u64::MAX)
    };
    (messages, bytes)
}

/// Refreshes the backlog gauges of one upstream every second, link up or
/// not, until shutdown. `position` is the forwarder's in-memory cursor.
pub(crate) fn spawn_reporter(
    store: Store,
    upstream: String,
    position: Arc<AtomicU64>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let metrics = UpstreamMetrics::new(&upstream);
        // (seq, timestamp_ms) of the oldest unforwarded record, read once per seq.
        let mut oldest: Option<(Seq, u64)> = None;
        let mut tick = tokio::time::interval(REPORT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let pos = position.load(Ordering::Relaxed);
            let stats = store.stats();
            let (messages, bytes) = backlog(&stats, pos);
            metrics.backlog(messages, bytes);
            if messages == 0 {
                oldest = None;
                metrics.oldest_unforwarded(Duration::ZERO);
                continue;
            }
            if oldest.is_none_or(|(seq, _)| seq < pos) {
                let s = store.clone();
                oldest = match tokio::task::spawn_blocking(move || s.read(pos, 1, 1)).await {
                    Ok(Ok(batch)) => batch.first().and_then(|e| {
                        let message = edge_core::Message::from_record(&e.record).ok()?;
                        Some((e.seq, message.timestamp_ms))
                    }),
                    _ => None,
                };
            }
            if let Some((_, ts)) = oldest {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                metrics.oldest_unforwarded(Duration::from_millis(now.saturating_sub(ts)));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(first_seq: Seq, next_seq: Seq, live_bytes: u64) -> StoreStats {
        StoreStats {
            first_seq,
            next_seq,
            live_messages: next_seq.saturating_sub(first_seq.max(1)),
            live_bytes,
            max_bytes: 1 << 30,
            ..StoreStats::default()
        }
    }

    #[test]
    fn backlog_of_the_only_cursor_is_exact() {
        assert_eq!(backlog(&stats(1, 101, 10_000), 1), (100, 10_000));
        assert_eq!(backlog(&stats(51, 101, 5_000), 51), (50, 5_000));
    }

    #[test]
    fn backlog_of_a_cursor_ahead_of_others_is_scaled() {
        assert_eq!(backlog(&stats(1, 101, 10_000), 76), (25, 2_500));
        assert_eq!(backlog(&stats(1, 101, 10_000), 101), (0, 0));
    }

    #[test]
    fn an_empty_log_has_no_backlog() {
        assert_eq!(backlog(&StoreStats::default(), 0), (0, 0));
        assert_eq!(backlog(&stats(0, 1, 0), 0), (0, 0));
    }
}

/// Every `reason` of `edge_downstream_rejected_total`: the mapping's, and
/// a message the store cannot hold (a field too long for the format).
pub(crate) const DOWNSTREAM_REJECT_REASONS: [&str; 3] = ["no_topic", "invalid_topic", "unstorable"];

/// The counters of one downstream, registered at zero (for alerts).
#[derive(Debug)]
pub(crate) struct DownstreamMetrics {
    /// `edge_downstream_received_total{downstream}`: every delivery.
    pub received: Counter,
    /// `edge_downstream_duplicates_total{downstream}`: deliveries whose
    /// `message_id` was in the window (acked, not published).
    pub duplicates: Counter,
    /// `edge_downstream_without_id_total{downstream}`: published without
    /// duplicate suppression (no `message_id`).
    pub without_id: Counter,
    /// `edge_downstream_unmatched_total{downstream}`: published, taken by
    /// no session and no route (acked all the same).
    pub unmatched: Counter,
    /// `edge_downstream_rejected_total{downstream, reason}`.
    rejected: Vec<(&'static str, Counter)>,
}

impl DownstreamMetrics {
    pub(crate) fn new(downstream: &str) -> DownstreamMetrics {
        let d = downstream.to_string();
        let counter = |name: &'static str| {
            let c = metrics::counter!(name, "downstream" => d.clone());
            c.increment(0);
            c
        };
        DownstreamMetrics {
            received: counter("edge_downstream_received_total"),
            duplicates: counter("edge_downstream_duplicates_total"),
            without_id: counter("edge_downstream_without_id_total"),
            unmatched: counter("edge_downstream_unmatched_total"),
            rejected: DOWNSTREAM_REJECT_REASONS
                .iter()
                .map(|&reason| {
                    let c = metrics::counter!("edge_downstream_rejected_total",
                        "downstream" => d.clone(), "reason" => reason);
                    c.increment(0);
                    (reason, c)
                })
                .collect(),
        }
    }

    pub(crate) fn rejected(&self, reason: &str) {
        if let Some((_, c)) = self.rejected.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
    }
}
