//! Summaries of records dropped or parked, one log line per route and
//! stretch instead of one per message (a route nobody bound parks every
//! message; one line each would flood an SD card).

use std::collections::BTreeMap;

use edge_store::Seq;
use tracing::{error, warn};

/// Records expired in the current stretch, summarised in one log line per route.
#[derive(Debug, Default)]
pub(crate) struct Expired(BTreeMap<String, (u64, Seq, Seq)>);

impl Expired {
    pub(crate) fn note(&mut self, route: &str, seq: Seq) {
        let e = self.0.entry(route.to_string()).or_insert((0, seq, seq));
        e.0 += 1;
        e.2 = seq;
    }

    pub(crate) fn log(&mut self, upstream: &str) {
        for (route, (count, first, last)) in std::mem::take(&mut self.0) {
            warn!(upstream, route = %route, count, first_seq = first, last_seq = last,
                "messages expired before they could be forwarded; dropped");
        }
    }
}

/// Records parked in the current stretch, summarised in one ERROR line per
/// route and kind (a route nobody bound parks every message: one line per
/// message would flood the log).
#[derive(Debug, Default)]
pub(crate) struct Parked(BTreeMap<(String, &'static str), ParkedRun>);

#[derive(Debug)]
pub(crate) struct ParkedRun {
    count: u64,
    first: Seq,
    last: Seq,
    topic: String,
    reason: String,
}

impl Parked {
    pub(crate) fn note(
        &mut self,
        route: &str,
        kind: &'static str,
        seq: Seq,
        topic: &str,
        reason: &str,
    ) {
        let run = self
            .0
            .entry((route.to_string(), kind))
            .or_insert_with(|| ParkedRun {
                count: 0,
                first: seq,
                last: seq,
                topic: String::new(),
                reason: String::new(),
            });
        run.count += 1;
        run.last = seq;
        topic.clone_into(&mut run.topic);
        reason.clone_into(&mut run.reason);
    }

    pub(crate) fn log(&mut self, upstream: &str) {
        for ((route, kind), run) in std::mem::take(&mut self.0) {
            error!(upstream, route = %route, kind, count = run.count, first_seq = run.first,
                last_seq = run.last, last_topic = %run.topic, last_reason = %run.reason,
                "messages parked in the dead-letter table");
        }
    }
}
