//! Prints topic-matching figures: time per match of each case
//! (`edge_benches::topic_match`), trie and scan, and each case's ratio to
//! (a). Every timed batch of a case is paired with a batch of (a) right
//! next to it (before it in even rounds, after it in odd ones), and a ratio
//! is the median over rounds of those pairs, so load that comes and goes on
//! a shared machine weighs on both sides of a ratio alike.
//!
//! `cargo run --release -p edge-benches --bin trie-figures [-- ROUNDS]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use edge_benches::topic_match::{
    CASES, Sessions, TOPIC, sessions_of, subscriptions, trie_match, trie_of, vec_scan_match,
};
use edge_core::{QoS, TopicTrie};

/// Each timed batch runs about this long: short, so that few are preempted.
const BATCH: Duration = Duration::from_micros(500);

enum Index {
    Trie(TopicTrie<QoS>),
    Scan(Sessions),
}

struct Subject {
    way: &'static str,
    case: &'static str,
    index: Index,
    /// Matches per batch.
    batch: u32,
    /// ns per match, one per batch.
    samples: Vec<f64>,
    /// This case's batch over its paired (a) batch, one per round.
    ratios: Vec<f64>,
}

impl Subject {
    fn run(&self) -> usize {
        match &self.index {
            Index::Trie(trie) => trie_match(trie, black_box(TOPIC)),
            Index::Scan(sessions) => vec_scan_match(sessions, black_box(TOPIC)),
        }
    }

    /// ns per match over one batch.
    fn time(&self) -> f64 {
        let started = Instant::now();
        for _ in 0..self.batch {
            black_box(self.run());
        }
        started.elapsed().as_nanos() as f64 / f64::from(self.batch)
    }
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 201,
    };
    let mut subjects = Vec::new();
    for (case, c, scan) in CASES {
        let subscriptions = subscriptions(c);
        let mut indexes = vec![("trie", Index::Trie(trie_of(&subscriptions)?))];
        if scan {
            indexes.push(("vec_scan", Index::Scan(sessions_of(&subscriptions))));
        }
        for (way, index) in indexes {
            let mut subject = Subject {
                way,
                case,
                index,
                batch: 1,
                samples: Vec::new(),
                ratios: Vec::with_capacity(rounds),
            };
            if subject.run() != c.matches() {
                return Err(format!("{way} {case}: wrong number of matches").into());
            }
            while subject.batch < 1 << 24
                && subject.time() * f64::from(subject.batch) < BATCH.as_nanos() as f64
            {
                subject.batch *= 2;
            }
            subjects.push(subject);
        }
    }
    // Each subject's (a): the same way's first case.
    let baselines: Vec<usize> = subjects
        .iter()
        .map(|s| {
            subjects
                .iter()
                .position(|a| a.way == s.way && a.case == CASES[0].0)
                .unwrap_or(0)
        })
        .collect();

    for round in 0..rounds {
        for (i, &a) in baselines.iter().enumerate() {
            if a == i {
                continue;
            }
            let (ta, ts) = if round % 2 == 0 {
                let ta = subjects[a].time();
                (ta, subjects[i].time())
            } else {
                let ts = subjects[i].time();
                (subjects[a].time(), ts)
            };
            subjects[a].samples.push(ta);
            subjects[i].samples.push(ts);
            subjects[i].ratios.push(ts / ta);
        }
    }

    println!(
        "{rounds} rounds, batches of ~{BATCH:?}; ratio to (a): median over rounds of paired batches, and p10–p90"
    );
    println!("| way | case | median ns/match | ratio to (a) | p10–p90 |");
    println!("|---|---|---:|---:|---|");
    for subject in &subjects {
        let ratios = if subject.ratios.is_empty() {
            vec![1.0]
        } else {
            subject.ratios.clone()
        };
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2}–{:.2} |",
            subject.way,
            subject.case,
            percentile(subject.samples.clone(), 0.5),
            percentile(ratios.clone(), 0.5),
            percentile(ratios.clone(), 0.1),
            percentile(ratios, 0.9),
        );
    }
    Ok(())
}
