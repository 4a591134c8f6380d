//! The topic-matching cases, shared by `benches/trie.rs` (criterion) and
//! the `trie-figures` binary: one published topic matched against the
//! subscriptions, two ways.
//!
//! - `trie`: `edge_core::TopicTrie::for_each_match`;
//! - `vec_scan`: what `Router::fan_out` does today, a `Vec<(filter, QoS)>`
//!   per session, every filter of every session tried with `topic::matches`.
//!
//! The topic is `site/dev-999/status`. Cases: (a) the 1 subscription that
//! matches (`site/+/status`); (b) the same plus 1k, 10k or 100k that do not
//! (devices' own `site/dev-N/cmd/#` and `site/dev-N/config/+`, dashboards'
//! `site/+/telemetry/#`; device 999's own `cmd/#` among them); (c) 10,000
//! that all match, over five filters (fan-out). One subscription per
//! session.

use std::collections::HashMap;
use std::hint::black_box;

use edge_core::{QoS, TopicTrie, topic};

pub const TOPIC: &str = "site/dev-999/status";

#[derive(Debug, Clone, Copy)]
pub enum Case {
    /// The matching subscription and this many that do not: (a) with 0, (b).
    Others(u64),
    /// (c) this many subscriptions, all matching.
    FanOut(u64),
}

impl Case {
    /// How many subscriptions match [`TOPIC`].
    pub fn matches(self) -> usize {
        match self {
            Case::Others(_) => 1,
            Case::FanOut(n) => n as usize,
        }
    }
}

/// (name, case, whether `vec_scan` runs it: not at 100k, ~6 ms an iteration).
pub const CASES: [(&str, Case, bool); 5] = [
    ("a_1_matching", Case::Others(0), true),
    ("b_1_matching_1k_others", Case::Others(1_000), true),
    ("b_1_matching_10k_others", Case::Others(10_000), true),
    ("b_1_matching_100k_others", Case::Others(100_000), false),
    ("c_10k_matching", Case::FanOut(10_000), true),
];

/// (session, filter) pairs of a case.
pub fn subscriptions(case: Case) -> Vec<(u64, String)> {
    match case {
        Case::Others(others) => std::iter::once((0, "site/+/status".to_string()))
            .chain((1..=others).map(|id| {
                let filter = match id % 3 {
                    0 => format!("site/dev-{id}/cmd/#"),
                    1 => format!("site/dev-{id}/config/+"),
                    _ => "site/+/telemetry/#".to_string(),
                };
                (id, filter)
            }))
            .collect(),
        Case::FanOut(n) => (0..n)
            .map(|id| {
                let filters = ["site/+/status", "site/#", "+/dev-999/#", "#", TOPIC];
                (id, filters[(id % 5) as usize].to_string())
            })
            .collect(),
    }
}

/// Every filter of every session, as the router keeps them today.
pub type Sessions = HashMap<u64, Vec<(String, QoS)>>;

pub fn trie_of(
    subscriptions: &[(u64, String)],
) -> Result<TopicTrie<QoS>, edge_core::InvalidFilter> {
    let mut trie = TopicTrie::new();
    for (id, filter) in subscriptions {
        trie.insert(filter, *id, QoS::AtLeastOnce)?;
    }
    Ok(trie)
}

pub fn sessions_of(subscriptions: &[(u64, String)]) -> Sessions {
    let mut sessions = Sessions::new();
    for (id, filter) in subscriptions {
        sessions
            .entry(*id)
            .or_default()
            .push((filter.clone(), QoS::AtLeastOnce));
    }
    sessions
}

/// Matches `topic`; returns how many subscriptions matched.
pub fn trie_match(trie: &TopicTrie<QoS>, topic: &str) -> usize {
    let mut deliveries = 0;
    trie.for_each_match(topic, |_, key, qos| {
        black_box((key, qos));
        deliveries += 1;
    });
    deliveries
}

/// `Router::fan_out`'s scan: the highest QoS among each session's matching
/// filters; returns how many sessions matched.
pub fn vec_scan_match(sessions: &Sessions, topic: &str) -> usize {
    let mut deliveries = 0;
    for (id, filters) in sessions {
        let granted = filters
            .iter()
            .filter(|(f, _)| topic::matches(f, topic))
            .map(|(_, q)| *q)
            .max();
        if let Some(granted) = granted {
            black_box((id, granted));
            deliveries += 1;
        }
    }
    deliveries
}
