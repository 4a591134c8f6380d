//! Model test: random appends, cursor advances and reopens against a
//! `BTreeMap` model of what the log must hold.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{options, record};
use crate::{AppendError, Record, Seq, Store};

const CURSORS: [&str; 2] = ["up-a", "up-b"];

#[derive(Debug, Clone)]
enum Step {
    Append { payload: usize },
    Advance { cursor: usize, by: u64 },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0usize..200).prop_map(|payload| Step::Append { payload }),
        3 => (0usize..2, 0u64..6).prop_map(|(cursor, by)| Step::Advance { cursor, by }),
        1 => Just(Step::Reopen),
    ]
}

#[derive(Debug, Default)]
struct Model {
    log: BTreeMap<Seq, Record>,
    cursors: BTreeMap<String, Seq>,
    next_seq: Seq,
    /// Size of a refused record the store waits to have room for.
    waiting_for: Option<u64>,
}

impl Model {
    fn live_bytes(&self) -> u64 {
        self.log.values().map(|r| r.encoded_len() as u64).sum()
    }

    fn retire(&mut self) {
        if CURSORS.iter().all(|c| self.cursors.contains_key(*c)) {
            let below = self.cursors.values().copied().min().unwrap_or(0);
            self.log = self.log.split_off(&below);
        }
    }

    fn cursor(&self, name: &str) -> Seq {
        self.cursors
            .get(name)
            .copied()
            .unwrap_or_else(|| self.log.keys().next().copied().unwrap_or(self.next_seq))
    }
}

const MAX_BYTES: u64 = 2_000;

async fn check(steps: Vec<Step>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = || options(MAX_BYTES, &CURSORS);
    let mut store = Store::open(dir.path(), opts()).unwrap();
    let mut model = Model {
        next_seq: 1,
        ..Model::default()
    };
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Append { payload } => {
                let r = record(n as u64, payload);
                let len = r.encoded_len() as u64;
                let got = store.append(r.clone()).await;
                let live = model.live_bytes();
                if model.waiting_for.is_some_and(|w| live + w <= MAX_BYTES) {
                    model.waiting_for = None;
                }
                if model.waiting_for.is_some() || live + len > MAX_BYTES {
                    assert!(matches!(got, Err(AppendError::Full { .. })), "{got:?}");
                    if len <= MAX_BYTES && live + len > MAX_BYTES {
                        model.waiting_for = model.waiting_for.max(Some(len));
                    }
                } else {
                    assert_eq!(got.unwrap(), model.next_seq);
                    model.log.insert(model.next_seq, r);
                    model.next_seq += 1;
                }
            }
            Step::Advance { cursor, by } => {
                let name = CURSORS[cursor];
                let old = model.cursors.get(name).copied().unwrap_or(0);
                let to = (model.cursor(name) + by).min(model.next_seq).max(old);
                store
                    .advance_cursor(name, model.cursor(name) + by)
                    .await
                    .unwrap();
                if to != old {
                    model.cursors.insert(name.to_string(), to);
                }
            }
            Step::Reopen => {
                drop(store);
                store = Store::open(dir.path(), opts()).unwrap();
                model.waiting_for = None;
            }
        }
        model.retire();
        let got: Vec<(Seq, Record)> = store
            .read(0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|e| (e.seq, e.record))
            .collect();
        let want: Vec<(Seq, Record)> = model.log.iter().map(|(s, r)| (*s, r.clone())).collect();
        assert_eq!(got, want);
        let stats = store.stats();
        assert_eq!(stats.next_seq, model.next_seq);
        assert_eq!(stats.live_bytes, model.live_bytes());
        assert_eq!(stats.live_messages, model.log.len() as u64);
        assert_eq!(
            stats.first_seq,
            model.log.keys().next().copied().unwrap_or(0)
        );
        for c in CURSORS {
            assert_eq!(store.cursor(c).unwrap(), model.cursor(c), "cursor {c}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_btreemap_model(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(check(steps));
    }
}
