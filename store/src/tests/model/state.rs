//! The model: what the store must hold, in `BTreeMap`s, changed by rules
//! written from the store's documentation (`lib.rs`), not from its code.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::action::{Action, Reply};
use super::step::Step;
use crate::tests::record;
use crate::{
    DeadLetter, Entry, Parked, Placement, QueueEntry, Record, Replay, Retain, Seq, Store,
    StoreStats,
};

pub(super) const CURSORS: [&str; 2] = ["up-a", "up-b"];
pub(super) const QUEUES: [&str; 3] = ["q0", "q1", "q2"];
const TOPICS: [&str; 3] = ["r", "r/a/longer/topic", "s/x"];
/// Room for about ten of the largest records: refusals are common.
pub(super) const MAX_BYTES: u64 = 2_500;

#[derive(Debug, Clone)]
struct Queue {
    id: u64,
    /// seq -> the owner's state.
    entries: BTreeMap<Seq, u32>,
}

#[derive(Debug, Clone)]
struct Dead {
    original_seq: Seq,
    upstreams: Vec<String>,
    reason: String,
    record: Record,
}

impl Dead {
    /// Its value's length, from the layout in `dead.rs`.
    fn bytes(&self) -> u64 {
        let names: usize = self.upstreams.iter().map(|u| 2 + u.len()).sum();
        (1 + 8 + 2 + names + 4 + self.reason.len() + self.record.encoded_len()) as u64
    }
}

#[derive(Debug, Clone)]
pub(super) struct Model {
    log: BTreeMap<Seq, (Record, Option<Replay>)>,
    cursors: BTreeMap<&'static str, Seq>,
    queues: BTreeMap<&'static str, Queue>,
    /// The id each queue name was given last, kept after the queue is
    /// deleted: a caller may still name it.
    ids: BTreeMap<&'static str, u64>,
    next_queue_id: u64,
    retained: BTreeMap<String, Record>,
    dead: BTreeMap<Seq, Dead>,
    next_seq: Seq,
    /// What a refused append would have added, while later ones wait for
    /// it to fit (the writer's memory, not persisted).
    waiting_for: Option<u64>,
}

fn retained_bytes(topic: &str, record: &Record) -> u64 {
    (topic.len() + record.encoded_len()) as u64
}

impl Model {
    /// A new store: both cursors at the first seq.
    pub(super) fn new() -> Model {
        Model {
            log: BTreeMap::new(),
            cursors: CURSORS.iter().map(|c| (*c, 1)).collect(),
            queues: BTreeMap::new(),
            ids: BTreeMap::new(),
            next_queue_id: 1,
            retained: BTreeMap::new(),
            dead: BTreeMap::new(),
            next_seq: 1,
            waiting_for: None,
        }
    }

    /// A new writer forgets what it waited for.
    pub(super) fn restarted(&mut self) {
        self.waiting_for = None;
    }

    fn live_bytes(&self) -> u64 {
        self.log.values().map(|(r, _)| r.encoded_len() as u64).sum()
    }

    fn dead_bytes(&self) -> u64 {
        self.dead.values().map(Dead::bytes).sum()
    }

    fn retained_bytes(&self) -> u64 {
        self.retained
            .iter()
            .map(|(t, r)| retained_bytes(t, r))
            .sum()
    }

    /// Bytes counted toward the quota: log, dead letters, retained.
    fn used(&self) -> u64 {
        self.live_bytes() + self.dead_bytes() + self.retained_bytes()
    }

    /// Bytes that retiring the log cannot free.
    fn pinned(&self) -> u64 {
        self.dead_bytes() + self.retained_bytes()
    }

    fn queue_by_id(&mut self, id: u64) -> Option<&mut Queue> {
        self.queues.values_mut().find(|q| q.id == id)
    }

    /// Ids a snapshot looks at: every one handed out, and the next.
    pub(super) fn queue_ids(&self) -> Range<u64> {
        1..self.next_queue_id + 1
    }

    /// Turns a step into what is sent to the store; `None` when the step
    /// has nothing to act on. `n` numbers the record of an append.
    pub(super) fn resolve(&self, step: &Step, n: u64) -> Option<Action> {
        let action = match step {
            Step::Append {
                payload,
                log,
                queues,
                retain,
            } => Action::Append {
                record: record(n, *payload),
                placement: Placement {
                    log: *log,
                    queues: queues
                        .iter()
                        .filter_map(|q| self.ids.get(QUEUES[*q]).copied())
                        .collect(),
                    retain: retain.map(|(topic, set)| {
                        let topic = TOPICS[topic].to_string();
                        if set {
                            Retain::Set(topic)
                        } else {
                            Retain::Clear(topic)
                        }
                    }),
                    dedup: None,
                },
            },
            Step::Advance { cursor, by } => {
                let cursor = CURSORS[*cursor];
                Action::Advance {
                    cursor,
                    to: self.cursors[cursor] + by,
                }
            }
            Step::CreateQueue { queue } => Action::CreateQueue {
                name: QUEUES[*queue],
            },
            Step::DeleteQueue { queue } => Action::DeleteQueue {
                name: QUEUES[*queue],
            },
            Step::Ack { queue, pick, count } => {
                let name = QUEUES[*queue];
                let held: Vec<Seq> = self
                    .queues
                    .get(name)
                    .map_or_else(Vec::new, |q| q.entries.keys().copied().collect());
                let seqs = if held.is_empty() {
                    vec![(*pick as u64 % 64) + 1]
                } else {
                    let from = pick % held.len();
                    held[from..].iter().take(*count).copied().collect()
                };
                Action::Ack {
                    queue: *self.ids.get(name)?,
                    seqs,
                }
            }
            Step::SetState { queue, pick, state } => {
                let q = self.queues.get(QUEUES[*queue])?;
                let seq = *q.entries.keys().nth(pick % q.entries.len().max(1))?;
                Action::SetState {
                    queue: q.id,
                    seq,
                    state: *state,
                }
            }
            Step::Park { pick, upstream } => {
                let (seq, (record, replay)) = self.log.iter().nth(pick % self.log.len().max(1))?;
                let upstream = CURSORS[*upstream];
                Action::Park {
                    seq: *seq,
                    record: record.clone(),
                    parked: Parked {
                        upstream: upstream.into(),
                        original_seq: replay.as_ref().map_or(*seq, |r| r.original_seq),
                        reason: format!("{upstream} failed"),
                    },
                }
            }
            Step::Purge { max } => Action::Purge { max: *max },
            Step::Replay { max } => Action::Replay { max: *max },
            Step::Reopen | Step::Crash { .. } => return None,
        };
        Some(action)
    }

    /// Applies an action the store carried out; returns its reply.
    pub(super) fn apply(&mut self, action: &Action) -> Reply {
        let reply = match action {
            Action::Append { record, placement } => self.append(record, placement),
            Action::Advance { cursor, to } => {
                let at = self.cursors[cursor];
                self.cursors
                    .insert(cursor, (*to).min(self.next_seq).max(at));
                Reply::Done
            }
            Action::CreateQueue { name } => match self.queues.get(name) {
                Some(q) => Reply::Id(q.id),
                None => {
                    let id = self.next_queue_id;
                    self.next_queue_id += 1;
                    let entries = BTreeMap::new();
                    self.queues.insert(name, Queue { id, entries });
                    self.ids.insert(name, id);
                    Reply::Id(id)
                }
            },
            Action::DeleteQueue { name } => {
                self.queues.remove(name);
                Reply::Done
            }
            Action::Ack { queue, seqs } => {
                if let Some(q) = self.queue_by_id(*queue) {
                    for seq in seqs {
                        q.entries.remove(seq);
                    }
                }
                Reply::Done
            }
            Action::SetState { queue, seq, state } => {
                if let Some(at) = self
                    .queue_by_id(*queue)
                    .and_then(|q| q.entries.get_mut(seq))
                {
                    *at = *state;
                }
                Reply::Done
            }
            Action::Park {
                seq,
                record,
                parked,
            } => {
                let mut dead = Dead {
                    original_seq: parked.original_seq,
                    upstreams: vec![parked.upstream.clone()],
                    reason: parked.reason.clone(),
                    record: record.clone(),
                };
                // Parked again by another upstream: both names, both reasons.
                if let Some(old) = self.dead.get(seq) {
                    dead.original_seq = old.original_seq;
                    let mut upstreams = old.upstreams.clone();
                    if !upstreams.contains(&parked.upstream) {
                        upstreams.push(parked.upstream.clone());
                    }
                    dead.upstreams = upstreams;
                    if old.reason != parked.reason {
                        dead.reason = format!("{} | {}", old.reason, parked.reason);
                    }
                }
                self.dead.insert(*seq, dead);
                Reply::Done
            }
            Action::Purge { max } => {
                let mut done = 0;
                while done < *max && self.dead.pop_first().is_some() {
                    done += 1;
                }
                Reply::Count(done as u64)
            }
            Action::Replay { max } => {
                let mut done = 0;
                while done < *max {
                    let Some((_, dead)) = self.dead.pop_first() else {
                        break;
                    };
                    let replay = Replay {
                        original_seq: dead.original_seq,
                        upstreams: dead.upstreams,
                    };
                    self.log.insert(self.next_seq, (dead.record, Some(replay)));
                    self.next_seq += 1;
                    done += 1;
                }
                Reply::Count(done as u64)
            }
        };
        self.retire();
        reply
    }

    /// The quota (lib.rs, "Quota"): an append that would take the log, the
    /// dead letters and the retained messages past `max_bytes` is refused;
    /// so is every later one until what the largest refused one would add
    /// fits, unless that can never fit beside what retirement cannot free.
    fn append(&mut self, record: &Record, placement: &Placement) -> Reply {
        let len = record.encoded_len() as u64;
        let logged = placement.log || !placement.queues.is_empty();
        let topic = placement.retain.as_ref().map(Retain::topic);
        let replaced = topic
            .and_then(|t| Some(retained_bytes(t, self.retained.get(t)?)))
            .unwrap_or(0);
        let set = match &placement.retain {
            Some(Retain::Set(t)) => retained_bytes(t, record),
            _ => 0,
        };
        let adds = (if logged { len } else { 0 } + set).saturating_sub(replaced);
        let (used, pinned) = (self.used(), self.pinned());
        let fits = |n: u64| used + n <= MAX_BYTES;
        let can_fit = |n: u64| pinned + n <= MAX_BYTES;
        if self.waiting_for.is_some_and(|w| fits(w) || !can_fit(w)) {
            self.waiting_for = None;
        }
        if self.waiting_for.is_some() || !fits(adds) {
            if can_fit(adds) && !fits(adds) {
                self.waiting_for = self.waiting_for.max(Some(adds));
            }
            return Reply::Full { used };
        }
        match &placement.retain {
            Some(Retain::Set(t)) => {
                self.retained.insert(t.clone(), record.clone());
            }
            Some(Retain::Clear(t)) => {
                self.retained.remove(t);
            }
            None => {}
        }
        if !logged {
            return Reply::Seq(0);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.log.insert(seq, (record.clone(), None));
        // One entry per queue that exists, however often it is named.
        let named: BTreeSet<u64> = placement.queues.iter().copied().collect();
        for id in named {
            if let Some(q) = self.queue_by_id(id) {
                q.entries.insert(seq, 0);
            }
        }
        Reply::Seq(seq)
    }

    /// The reference rule: a record stays while a cursor is at or below it
    /// or a queue entry references it.
    fn retire(&mut self) {
        let below = self.cursors.values().copied().min().unwrap_or(0);
        let held: BTreeSet<Seq> = self
            .queues
            .values()
            .flat_map(|q| q.entries.keys().copied())
            .collect();
        self.log
            .retain(|seq, _| *seq >= below || held.contains(seq));
    }

    /// What the store must show.
    pub(super) fn snapshot(&self, ids: Range<u64>) -> Snapshot {
        let entries = ids
            .map(|id| {
                let q = self.queues.values().find(|q| q.id == id);
                let entries = q.map_or_else(Vec::new, |q| {
                    q.entries
                        .iter()
                        .map(|(seq, state)| QueueEntry {
                            seq: *seq,
                            state: *state,
                            record: self.log.get(seq).map(|(r, _)| r.clone()),
                        })
                        .collect()
                });
                (id, entries)
            })
            .collect();
        Snapshot {
            stats: StoreStats {
                first_seq: self.log.keys().next().copied().unwrap_or(0),
                next_seq: self.next_seq,
                live_messages: self.log.len() as u64,
                live_bytes: self.live_bytes(),
                dead_letters: self.dead.len() as u64,
                dead_letter_bytes: self.dead_bytes(),
                retained: self.retained.len() as u64,
                retained_bytes: self.retained_bytes(),
                max_bytes: MAX_BYTES,
            },
            committed: self.next_seq - 1,
            log: self
                .log
                .iter()
                .map(|(seq, (record, replay))| Entry {
                    seq: *seq,
                    record: record.clone(),
                    replay: replay.clone(),
                })
                .collect(),
            cursors: self
                .cursors
                .iter()
                .map(|(c, at)| (c.to_string(), *at))
                .collect(),
            queues: self
                .queues
                .iter()
                .map(|(name, q)| (name.to_string(), q.id))
                .collect(),
            entries,
            retained: self
                .retained
                .iter()
                .map(|(t, r)| (t.clone(), r.clone()))
                .collect(),
            dead: self
                .dead
                .iter()
                .map(|(seq, d)| DeadLetter {
                    seq: *seq,
                    original_seq: d.original_seq,
                    upstreams: d.upstreams.clone(),
                    reason: d.reason.clone(),
                    record: d.record.clone(),
                })
                .collect(),
        }
    }
}

/// Everything the model checks, as the store reports it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Snapshot {
    stats: StoreStats,
    /// The `committed` watch: the last seq appended.
    committed: Seq,
    log: Vec<Entry>,
    cursors: Vec<(String, Seq)>,
    queues: Vec<(String, u64)>,
    /// Per queue id: `queue_entries(id, 0, MAX)`.
    entries: Vec<(u64, Vec<QueueEntry>)>,
    /// Sorted by topic.
    retained: Vec<(String, Record)>,
    dead: Vec<DeadLetter>,
}

impl Snapshot {
    pub(super) fn read(store: &Store, ids: Range<u64>) -> Snapshot {
        let mut retained = store.retained().unwrap();
        retained.sort_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            stats: store.stats(),
            committed: *store.committed().borrow(),
            log: store.read(0, usize::MAX, usize::MAX).unwrap(),
            cursors: CURSORS
                .iter()
                .map(|c| (c.to_string(), store.cursor(c).unwrap()))
                .collect(),
            queues: store.queues().unwrap(),
            entries: ids
                .map(|id| (id, store.queue_entries(id, 0, usize::MAX).unwrap()))
                .collect(),
            retained,
            dead: store.dead_letters(0, usize::MAX).unwrap(),
        }
    }
}
