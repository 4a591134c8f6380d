//! One AMQP queue: a core session (`amqp:<name>`) whose filters are the
//! queue's bindings, and the messages it holds for its consumers.
//!
//! A pump task (`queue/pump.rs`) drains the session's deliveries into
//! `ready` (bounded in count and bytes; beyond that the pump stops and the
//! core keeps durable entries in the store and drops transient ones,
//! counted). A durable queue's entries live in the store's queue until
//! acknowledged: the pump reads them from there when the session lagged
//! and at start, skipping the ones it holds already.
//!
//! Consumers pull: a connection with credit takes from `ready`; what it
//! takes without no-ack waits in `unacked` until ack (the store entry goes)
//! or nack/reject with requeue, a closed channel or connection (back to
//! `ready` at its place, marked redelivered).
//!
//! `ready` is ordered by priority, then arrival; a priority queue's
//! stored entries beyond memory wait in a spill of (priority, seq)
//! (`queue/priority.rs`). Of a single-active-consumer queue only the first
//! consumer takes. An `x-expires` queue is watched by one task
//! (`queue/expiry.rs`). A durable queue's `DELIVERED_ROW` and entry states
//! keep the redelivered flag across restarts (`queue/delivered.rs`).
//!
//! A message that leaves without being delivered (`dead_letter.rs`) goes
//! to the queue's dead-letter task, which republishes it to the queue's
//! dead-letter exchange (if any) and only then acknowledges its store
//! entry (`queue/dying.rs`). Limits (`x-max-length`, `x-max-length-bytes`)
//! count ready messages and their payload bytes. With `drop-head` the head
//! (the next message to deliver: of a priority queue the highest priority)
//! dies whenever messages arrive, and before every count (declare-ok,
//! get-ok) and every take: a durable queue counts its entries not in
//! memory (in the store, in a priority queue's spill, or on their way;
//! their bytes once read) and, when its head is among them, reads it from
//! the store to drop it. So a count never exceeds the limit and no
//! consumer gets a message that was beyond it; what "never" leaves out:
//! between a commit and the pump's next turn the store holds the new
//! entries too (a queue whose memory is full looks again every 100 ms),
//! and a crash then leaves them to be trimmed at the next start. With
//! `reject-publish(-dlx)` the queue's [`Admission`] refuses a message at
//! publish time, before the publisher's confirm. Expired messages die when
//! they reach the head of their priority (the pump wakes for the earliest
//! such expiry) or when a consumer would have got them.
//!
//! Invariants: a message is in at most one of `ready` and `unacked`;
//! `held` is exactly the seqs of the durable ones among them and of those
//! whose dead-lettering is under way (retried while the store refuses the
//! copy); `acking` counts the durable ones let go of whose acknowledgement
//! has not committed yet (the store's count still has them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use edge_core::{
    Acker, AttachOptions, Delivery, Gate, Message, QoS, Router, SessionError, SessionExpiry,
    Subscriber,
};
use edge_store::Seq;

use crate::args::{Overflow, QueueArgs};
use crate::broker::Broker;
use crate::dead_letter::{Dead, Reason};
use crate::limits::Admission;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Deliveries the core may queue for the pump.
const LIVE_QUEUE: usize = 1024;
/// Messages held in memory per queue, at most (ready and unacked).
const MAX_HELD: usize = 4096;
/// Payload bytes held in memory per queue, at most.
const MAX_HELD_BYTES: usize = 32 << 20;
/// Entries read from the store at once.
const BACKLOG_PAGE: usize = 256;
/// Stored entries a priority queue knows by priority and seq only, at most
/// (beyond that the store is read on in arrival order as room frees).
const MAX_SPILLED: usize = 1 << 18;
/// How often a `drop-head` queue whose memory is full looks for arrivals
/// that put it over its limit.
const LIMIT_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

mod delivered;
mod dying;
mod expiry;
mod priority;
mod pump;

pub(crate) use expiry::until_expired;

/// The definition row saying a durable queue may have delivered messages
/// since it last recorded which (`Queue::close`): `amqp/delivered/<name>`.
pub(crate) const DELIVERED_ROW: &str = "amqp/delivered/";

/// The core session of a queue.
pub(crate) fn session_id(queue: &str) -> Arc<str> {
    format!("{}{queue}", edge_core::session::AMQP_QUEUE_PREFIX).into()
}

/// One connection, for exclusive queues and consumer wake-ups.
pub(crate) type ConnId = u64;

/// A consumer's key in its queue's list: unique across connections.
pub(crate) fn consumer_key() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A message held by a queue.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    /// Queue-local, in arrival order: requeued messages go back to their place.
    pub id: u64,
    pub message: Arc<Message>,
    /// The store entry of a durable message.
    pub seq: Option<Seq>,
    /// It may have been delivered before.
    pub redelivered: bool,
    /// Times it came back to the queue (`x-delivery-count`).
    pub returns: u32,
}

/// How a queue was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Flags {
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// Its `x-` arguments.
    pub args: Arc<QueueArgs>,
}

impl Flags {
    /// Whether `message` is past its own expiry or the queue's TTL at `now`.
    pub(crate) fn expired(&self, message: &Message, now: u64) -> bool {
        self.expires_at(message).is_some_and(|at| at <= now)
    }

    /// When `message` expires here: its own expiry or the queue's TTL.
    fn expires_at(&self, message: &Message) -> Option<u64> {
        let ttl = self
            .args
            .message_ttl
            .map(|ttl| message.timestamp_ms.saturating_add(ttl));
        match (message.properties.expires_at_ms, ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether arrivals may push the head out.
    fn drops_head(&self) -> bool {
        self.args.overflow == Overflow::DropHead
            && (self.args.max_length.is_some() || self.args.max_length_bytes.is_some())
    }
}

/// Where a ready message waits: highest priority first (`x-max-priority`;
/// 0 for every message of a queue without it), arrival order within one.
type ReadyKey = (std::cmp::Reverse<u8>, u64);

#[derive(Debug)]
struct State {
    ready: BTreeMap<ReadyKey, Queued>,
    /// `x-max-priority`, if the queue has priorities.
    max_priority: Option<u8>,
    /// A priority queue's durable entries read but not held (`priority.rs`):
    /// the entry state each would have in the store (`delivered.rs`).
    spilled: BTreeMap<priority::SpillKey, u32>,
    unacked: HashMap<u64, Queued>,
    held: HashSet<Seq>,
    held_bytes: usize,
    /// Payload bytes of `ready`.
    ready_bytes: usize,
    /// To the dead-letter task.
    dead: Option<mpsc::UnboundedSender<Dead>>,
    admission: Option<Arc<Admission>>,
    /// Consumers: key → the waker of the connection that serves it.
    consumers: BTreeMap<u64, Arc<Notify>>,
    /// The key of an exclusive consumer, which keeps every other out.
    exclusive: Option<u64>,
    /// `x-single-active-consumer`: only the first consumer (the smallest
    /// key: keys grow in registration order) receives.
    single_active: bool,
    had_consumer: bool,
    /// The last use (declare, get, last consumer gone, start), for `x-expires`.
    last_used: Instant,
    /// Store entries up to this seq may have been delivered before the
    /// gateway stopped without recording which (`DELIVERED_ROW`); cleared
    /// once the pump has read every one of them.
    suspect_up_to: Option<Seq>,
    next_id: u64,
    /// Store entries below this seq have been read (or delivered live).
    read_from: Seq,
    /// Entries may wait in the store that are not in `ready`.
    catching_up: bool,
    /// The session's deliveries: drained by the pump, and by `take` (so a
    /// message confirmed to its publisher is in `ready` for a get).
    live: Option<mpsc::Receiver<Delivery>>,
}

impl State {
    fn new(flags: &Flags, catching_up: bool, live: mpsc::Receiver<Delivery>) -> State {
        State {
            ready: BTreeMap::new(),
            max_priority: flags.args.max_priority,
            spilled: BTreeMap::new(),
            unacked: HashMap::new(),
            held: HashSet::new(),
            held_bytes: 0,
            ready_bytes: 0,
            dead: None,
            admission: None,
            consumers: BTreeMap::new(),
            exclusive: None,
            single_active: flags.args.single_active_consumer,
            had_consumer: false,
            last_used: Instant::now(),
            suspect_up_to: None,
            next_id: 0,
            read_from: 0,
            catching_up,
            live: Some(live),
        }
    }

    /// Whether the consumer `key` may receive now.
    fn may_deliver_to(&self, key: u64) -> bool {
        !self.single_active || self.consumers.keys().next() == Some(&key)
    }

    fn has_room(&self) -> bool {
        self.ready.len() + self.unacked.len() < MAX_HELD && self.held_bytes < MAX_HELD_BYTES
    }

    /// A message arriving, after `returns` earlier returns to the queue.
    fn push(&mut self, message: Arc<Message>, seq: Option<Seq>, redelivered: bool, returns: u32) {
        if let Some(seq) = seq {
            self.held.insert(seq);
        }
        self.held_bytes += message.payload.len();
        let id = self.next_id;
        self.next_id += 1;
        self.put_ready(Queued {
            id,
            message,
            seq,
            redelivered: redelivered || returns > 0,
            returns,
        });
    }

    /// A live delivery (the caller checked `can_admit` and that the queue
    /// is not catching up with its store entries).
    fn accept(&mut self, d: Delivery) {
        if d.retained {
            // Retained messages are MQTT's; AMQP queues see publishes only.
            return;
        }
        match d.seq {
            Some(seq) => {
                if seq < self.read_from || self.held.contains(&seq) {
                    return;
                }
                self.read_from = seq + 1;
                self.admit(d.message, seq, 0);
            }
            None if self.has_room() => self.push(d.message, None, false, 0),
            // A priority queue's spill holds stored entries only.
            None => {
                if let Some(a) = &self.admission {
                    a.refund(&d.message);
                }
                crate::logs::dropped("amqp_queue_full", 1, || {
                    "a transient message found its priority queue's memory full".to_owned()
                });
            }
        }
    }

    fn release(&mut self, q: &Queued) {
        if let Some(seq) = q.seq {
            self.held.remove(&seq);
        }
        self.held_bytes = self.held_bytes.saturating_sub(q.message.payload.len());
    }

    fn wake(&self) {
        let wakers = self.consumers.values();
        // Of a single-active-consumer queue only the active one is woken.
        let n = if self.single_active { 1 } else { usize::MAX };
        for waker in wakers.take(n) {
            waker.notify_one();
        }
    }
}

/// Entries counted in [`Queue::acking`] until dropped; then the pump
/// looks at the limits again.
struct Acking {
    n: u64,
    acking: Arc<AtomicU64>,
    room: Arc<Notify>,
}

impl Drop for Acking {
    fn drop(&mut self) {
        self.acking.fetch_sub(self.n, Ordering::SeqCst);
        self.room.notify_one();
    }
}

/// A queue; shared by the broker's registry and the channels using it.
#[derive(Debug)]
pub(crate) struct Queue {
    pub name: Arc<str>,
    pub flags: Flags,
    /// The connection an exclusive queue belongs to.
    pub owner: Option<ConnId>,
    subscriber: Subscriber,
    acker: Option<Acker>,
    state: Mutex<State>,
    room: Arc<Notify>,
    /// Durable entries let go of (acknowledged, taken with no-ack, purged)
    /// whose store acknowledgement is still under way: the store counts
    /// them until it commits, so they are neither held nor beyond memory
    /// (`arrived`). Raised under the state lock with their release from
    /// `held`; lowered after the store's count is.
    acking: Arc<AtomicU64>,
    /// Woken when the queue is used or loses its last consumer (`x-expires`).
    used: Arc<Notify>,
    /// A durable queue's store, for its `DELIVERED_ROW`.
    store: Option<edge_store::Store>,
    /// The `DELIVERED_ROW` is written (this run, or left by the last one).
    delivered_mark: AtomicBool,
    stop: CancellationToken,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Queue {
    /// Attaches the queue's session (resuming a durable one with its
    /// entries) and starts its pump and its dead-letter task. `marked`: the
    /// queue's `DELIVERED_ROW` was found at start, so its stored entries
    /// may have been delivered.
    pub(crate) async fn start(
        router: &Router,
        broker: &Weak<Broker>,
        name: &str,
        flags: Flags,
        owner: Option<ConnId>,
        marked: bool,
    ) -> Result<Arc<Queue>, SessionError> {
        let persistent = flags.durable && !flags.exclusive;
        let args = &flags.args;
        let admission = (args.overflow != Overflow::DropHead
            && (args.max_length.is_some() || args.max_length_bytes.is_some()))
        .then(|| Arc::new(Admission::new(args.max_length, args.max_length_bytes)));
        let attached = router
            .attach(
                session_id(name),
                AttachOptions {
                    clean: !persistent,
                    expiry: if !persistent {
                        SessionExpiry::WithConnection
                    } else {
                        SessionExpiry::Default
                    },
                    queue: LIVE_QUEUE,
                    gate: admission.clone().map(|a| a as Arc<dyn Gate>),
                },
            )
            .await?;
        if let (Some(a), Some(stored)) = (&admission, attached.subscriber.queued_messages()) {
            a.add_stored(stored);
        }
        let (dead, graves) = mpsc::unbounded_channel();
        let acker = attached.subscriber.acker();
        // Only a resumed session can have entries to read; a new queue's
        // messages all come live (so a get right after a confirmed publish
        // to it finds the message).
        let resumed = persistent && attached.session_present;
        let mut state = State::new(&flags, resumed, attached.deliveries);
        state.dead = Some(dead);
        state.admission = admission;
        if persistent && marked {
            state.suspect_up_to = Some(*router.store().committed().borrow());
        }
        let queue = Arc::new(Queue {
            name: name.into(),
            flags,
            owner,
            subscriber: attached.subscriber,
            acker,
            state: Mutex::new(state),
            room: Arc::new(Notify::new()),
            acking: Arc::new(AtomicU64::new(0)),
            used: Arc::new(Notify::new()),
            store: persistent.then(|| router.store().clone()),
            delivered_mark: AtomicBool::new(persistent && marked),
            stop: CancellationToken::new(),
            pump: Mutex::new(None),
        });
        let task = tokio::spawn(pump::pump(Arc::downgrade(&queue)));
        *queue.pump.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        tokio::spawn(crate::dead_letter::run(
            Arc::downgrade(&queue),
            Weak::clone(broker),
            graves,
        ));
        Ok(queue)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a binding's filter (durable with a durable queue's session).
    pub(crate) async fn bind(&self, filter: &str) -> Result<(), SessionError> {
        self.subscriber
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .map(|_| ())
    }

    /// The session's filters (after a restart: those the core kept).
    pub(crate) fn filters(&self) -> Vec<String> {
        self.subscriber.filters()
    }

    pub(crate) async fn unbind(&self, filter: &str) -> Result<(), SessionError> {
        self.subscriber.unsubscribe(filter).await
    }

    /// Ready messages (not those awaiting an ack): a durable queue's
    /// entries in the store (a priority queue's spilled ones among them),
    /// less those delivered and unacknowledged or dying, plus its transient
    /// ones in memory; a transient queue's in memory.
    pub(crate) fn message_count(&self) -> u32 {
        let mut s = self.state();
        self.drain_live(&mut s);
        let in_memory = s.ready.len() as u64;
        // Read before the store's count (see `arrived`).
        let acking = self.acking.load(Ordering::SeqCst);
        let count = match self.subscriber.queued_messages() {
            Some(stored) => {
                // Held but not ready: unacked, and dying (dead-lettering).
                let durable = s.ready.values().filter(|q| q.seq.is_some()).count();
                let not_ready = s.held.len().saturating_sub(durable) as u64 + acking;
                let transient = s.ready.len() - durable;
                stored
                    .saturating_sub(not_ready)
                    .saturating_add(transient as u64)
                    .max(in_memory)
            }
            None => in_memory,
        };
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Takes what the session's channel holds now, while there is room and
    /// the store entries are not being caught up with.
    fn drain_live(&self, s: &mut State) {
        while s.can_admit() && !s.catching_up {
            if self.subscriber.take_lagged() {
                s.catching_up = true;
                // The pump reads the store.
                self.room.notify_one();
                break;
            }
            let Some(d) = s.live.as_mut().and_then(|live| live.try_recv().ok()) else {
                break;
            };
            s.accept(d);
        }
        if self.arrived(s) {
            // The pump reads the head (and what may come before it).
            self.room.notify_one();
        }
    }

    pub(crate) fn consumer_count(&self) -> u32 {
        self.state().consumers.len() as u32
    }

    /// Adds a consumer; false (and nothing added) when an exclusive one
    /// is asked for while there are others, or there is an exclusive one.
    /// Exclusive consumers are refused on a single-active-consumer queue,
    /// as RabbitMQ does.
    pub(crate) fn add_consumer(&self, key: u64, waker: Arc<Notify>, exclusive: bool) -> bool {
        let mut s = self.state();
        if s.exclusive.is_some() || exclusive && (s.single_active || !s.consumers.is_empty()) {
            return false;
        }
        if exclusive {
            s.exclusive = Some(key);
        }
        s.consumers.insert(key, waker);
        s.had_consumer = true;
        s.wake();
        drop(s);
        self.used.notify_one();
        true
    }

    /// Removes a consumer; true when it was the last one of a queue that
    /// had one (an auto-delete queue goes then).
    /// The next consumer of a single-active-consumer queue becomes active.
    pub(crate) fn remove_consumer(&self, key: u64) -> bool {
        let mut s = self.state();
        s.consumers.remove(&key);
        if s.exclusive == Some(key) {
            s.exclusive = None;
        }
        let last = s.had_consumer && s.consumers.is_empty();
        if s.consumers.is_empty() {
            s.last_used = Instant::now();
        }
        s.wake();
        drop(s);
        self.used.notify_one();
        last
    }

    /// A basic.get: `take` for nobody in particular; renews the lease.
    pub(crate) async fn get(&self, no_ack: bool) -> Option<Queued> {
        self.touch();
        self.take(None, 1, no_ack).await.pop()
    }

    /// Up to `max` ready messages for the consumer `consumer` (`None`: a
    /// get), in priority then arrival order; none for a waiting consumer of
    /// a single-active-consumer queue, and none for consumers of a priority
    /// queue while its backlog (as far as memory and the spill hold it) is
    /// still being read or a spilled entry comes first (so that it is
    /// ordered as a whole, `priority.rs`). Unless `no_ack`, they wait in
    /// `unacked`; with `no_ack` they count as delivered now. Expired ones
    /// met on the way die (dead-lettered).
    pub(crate) async fn take(
        &self,
        consumer: Option<u64>,
        max: usize,
        no_ack: bool,
    ) -> Vec<Queued> {
        loop {
            let marked = self.store.is_none() || self.delivered_mark.load(Ordering::Acquire);
            let Some((out, done, unmarked)) = self.take_now(consumer, max, no_ack, marked) else {
                return Vec::new();
            };
            if !out.is_empty() {
                self.room.notify_one();
            }
            self.forget(done).await;
            // A durable message waits for the mark; what came before it goes.
            if !unmarked || !out.is_empty() || !self.mark_delivered().await {
                return out;
            }
        }
    }

    /// `take` under the lock: `None` when `consumer` may not take now;
    /// else the messages, the store entries done with, and whether a
    /// durable message was left because the queue is not `marked` yet.
    fn take_now(
        &self,
        consumer: Option<u64>,
        max: usize,
        no_ack: bool,
        marked: bool,
    ) -> Option<(Vec<Queued>, Vec<Seq>, bool)> {
        let mut s = self.state();
        if let Some(key) = consumer
            && (!s.may_deliver_to(key)
                || s.max_priority.is_some() && s.catching_up && s.can_admit()
                || s.spill_first())
        {
            // The pump reads what comes first.
            self.room.notify_one();
            return None;
        }
        self.drain_live(&mut s);
        let mut out = Vec::new();
        let mut done = Vec::new();
        let now = edge_core::message::now_ms();
        while out.len() < max {
            let durable_head = s.ready.first_key_value().map(|(_, q)| q.seq.is_some());
            if durable_head == Some(true) && !marked {
                return Some((out, done, true));
            }
            let Some(q) = s.pop_ready() else {
                break;
            };
            if self.flags.expired(&q.message, now) {
                crate::telemetry::expired(&q.message);
                s.bury(q, Reason::Expired);
                continue;
            }
            if no_ack {
                s.release(&q);
                if let Some(seq) = q.seq {
                    self.acking.fetch_add(1, Ordering::SeqCst);
                    done.push(seq);
                }
            } else {
                s.unacked.insert(q.id, q.clone());
            }
            out.push(q);
        }
        Some((out, done, false))
    }

    /// The consumer has these messages: their store entries go.
    pub(crate) async fn ack(&self, ids: &[u64]) {
        let done = {
            let mut s = self.state();
            let mut done = Vec::new();
            for id in ids {
                if let Some(q) = s.unacked.remove(id) {
                    s.release(&q);
                    if let Some(seq) = q.seq {
                        self.acking.fetch_add(1, Ordering::SeqCst);
                        done.push(seq);
                    }
                }
            }
            done
        };
        self.room.notify_one();
        self.forget(done).await;
    }

    /// Acknowledges entries counted in `acking` (by the caller, under
    /// the lock that released them) in the background; they leave
    /// `acking` once the store's count no longer has them.
    async fn forget(&self, seqs: Vec<Seq>) {
        if seqs.is_empty() {
            return;
        }
        // Leaves `acking` when dropped: after the ack, or if this future
        // is dropped before the ack is registered.
        let counted = Acking {
            n: seqs.len() as u64,
            acking: Arc::clone(&self.acking),
            room: Arc::clone(&self.room),
        };
        let Some(acker) = &self.acker else {
            return;
        };
        // Awaited only for its registration: a later backlog read waits
        // for it, so an acknowledged entry is never read again.
        let task = acker.ack_in_background(seqs).await;
        tokio::spawn(async move {
            // Done (or failed: then they stay for the next start, as
            // entries nothing holds) either way; the store's count is down
            // before they leave `acking`.
            let _ = task.await;
            drop(counted);
        });
    }

    /// Drops every ready message (not those awaiting an ack), the durable
    /// ones not read into memory yet included; returns how many.
    pub(crate) async fn purge(&self) -> Result<u32, SessionError> {
        let (mut count, seqs, catching_up, released) = {
            let mut s = self.state();
            let mut seqs = Vec::new();
            let mut count = 0;
            while let Some(q) = s.pop_ready() {
                s.release(&q);
                seqs.extend(q.seq);
                count += 1;
            }
            let spilled = std::mem::take(&mut s.spilled);
            if let Some(a) = &s.admission {
                spilled.keys().for_each(|_| a.left(0));
            }
            seqs.extend(spilled.keys().map(|(_, seq)| *seq));
            count += spilled.len() as u32;
            // Neither held nor spilled now, but counted by the store until
            // acknowledged.
            let released = seqs.len() as u64;
            self.acking.fetch_add(released, Ordering::SeqCst);
            (count, seqs, s.catching_up, released)
        };
        let counted = Acking {
            n: released,
            acking: Arc::clone(&self.acking),
            room: Arc::clone(&self.room),
        };
        if let Some(acker) = &self.acker {
            let acked = acker.ack(seqs).await;
            drop(counted);
            acked?;
            if catching_up {
                loop {
                    let from = self.state().read_from;
                    let page = self.subscriber.backlog(from, BACKLOG_PAGE).await?;
                    let last = page.last().map(|e| e.seq);
                    let seqs: Vec<Seq> = {
                        let s = self.state();
                        let seqs: Vec<Seq> = page
                            .iter()
                            .map(|e| e.seq)
                            .filter(|seq| !s.held.contains(seq))
                            .collect();
                        if let Some(a) = &s.admission {
                            seqs.iter().for_each(|_| a.left(0));
                        }
                        seqs
                    };
                    count += seqs.len() as u32;
                    acker.ack(seqs).await?;
                    match last {
                        Some(last) => self.state().read_from = last + 1,
                        None => break,
                    }
                    if page.len() < BACKLOG_PAGE {
                        break;
                    }
                }
            }
        }
        self.room.notify_one();
        Ok(count)
    }

    /// Stops the pump and ends the core session (a durable one's store
    /// queue and record go with it). Returns the ready messages dropped.
    pub(crate) async fn delete(&self, router: &Router) -> Result<u32, SessionError> {
        self.stop.cancel();
        let dropped = self.message_count();
        // A clean attach takes the session over and discards it; dropping
        // the new attachment then removes it from the router.
        let replaced = router
            .attach(
                session_id(&self.name),
                AttachOptions {
                    clean: true,
                    expiry: SessionExpiry::WithConnection,
                    queue: 1,
                    gate: None,
                },
            )
            .await?;
        drop(replaced);
        {
            let mut s = self.state();
            s.ready.clear();
            s.spilled.clear();
            s.held.clear();
            s.held_bytes = 0;
            s.ready_bytes = 0;
            // Their connections cancel them (basic.cancel).
            s.wake();
        }
        Ok(dropped)
    }

    /// At shutdown: stops the pump and detaches the session, waiting for
    /// its record to be written (see `Subscriber::leave`), if this is the
    /// last handle of the queue.
    pub(crate) async fn close(queue: Arc<Queue>) {
        queue.stop.cancel();
        let task = queue
            .pump
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        queue.record_delivered().await;
        match Arc::try_unwrap(queue) {
            Ok(queue) => {
                if let Err(error) = queue.subscriber.leave().await {
                    tracing::warn!(queue = %queue.name, %error, "cannot record the queue's session as left");
                }
            }
            Err(queue) => tracing::debug!(queue = %queue.name, "queue still in use at shutdown"),
        }
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Deliveries awaiting an ack, and the payload bytes held in memory
    /// (ready and unacked), for the queue gauges (`telemetry.rs`).
    pub(crate) fn held(&self) -> (usize, usize) {
        let s = self.state();
        (s.unacked.len(), s.held_bytes)
    }
}
