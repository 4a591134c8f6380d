//! One AMQP queue: a core session (`amqp:<name>`) whose filters are the
//! queue's bindings, and the messages it holds for its consumers.
//!
//! A pump task drains the session's deliveries into `ready` (bounded in
//! count and bytes; beyond that the pump stops and the core keeps durable
//! entries in the store and drops transient ones, counted). A durable
//! queue's entries live in the store's queue until acknowledged: the pump
//! reads them from there when the session lagged and at start, skipping
//! the ones it holds already.
//!
//! Consumers pull: a connection with credit takes from `ready`; what it
//! takes without no-ack waits in `unacked` until ack (the store entry goes)
//! or nack/reject with requeue, a closed channel or connection (back to
//! `ready` at its place, marked redelivered).
//!
//! A message that leaves without being delivered (`dead_letter.rs`) goes
//! to the queue's dead-letter task, which republishes it to the queue's
//! dead-letter exchange (if any) and only then acknowledges its store
//! entry. Limits (`x-max-length`, `x-max-length-bytes`) count ready
//! messages and their payload bytes. With `drop-head` the oldest die
//! whenever messages arrive, and before every count (declare-ok, get-ok)
//! and every take: a durable queue counts its entries not in memory (in
//! the store, or on their way; their bytes once read) and, when its head
//! is among them, reads it from the store to drop it. So a count never
//! exceeds the limit and no consumer gets a message that was beyond it;
//! what "never" leaves out: between a commit and the pump's next turn the
//! store holds the new entries too (a queue whose memory is full looks
//! again every 100 ms), and a crash then leaves them to be trimmed at the
//! next start. With `reject-publish(-dlx)` the queue's [`Admission`]
//! refuses a message at publish time, before the publisher's confirm.
//! Expired messages die when they reach the head (the pump wakes for the
//! head's expiry) or when a consumer would have got them.
//!
//! Invariants: a message is in at most one of `ready` and `unacked`;
//! `held` is exactly the seqs of the durable ones among them and of those
//! whose dead-lettering is under way.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use edge_core::{
    Acker, AttachOptions, Delivery, Gate, Message, QoS, Router, SessionError, Subscriber,
};
use edge_store::Seq;

use crate::args::{Overflow, QueueArgs};
use crate::broker::Broker;
use crate::dead_letter::{Dead, Reason};
use crate::limits::Admission;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Deliveries the core may queue for the pump.
const LIVE_QUEUE: usize = 1024;
/// Messages held in memory per queue, at most (ready and unacked).
const MAX_HELD: usize = 4096;
/// Payload bytes held in memory per queue, at most.
const MAX_HELD_BYTES: usize = 32 << 20;
/// Entries read from the store at once.
const BACKLOG_PAGE: usize = 256;
/// How often a `drop-head` queue whose memory is full looks for arrivals
/// that put it over its limit.
const LIMIT_RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

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

    /// Whether arrivals may push the oldest messages out.
    fn drops_head(&self) -> bool {
        self.args.overflow == Overflow::DropHead
            && (self.args.max_length.is_some() || self.args.max_length_bytes.is_some())
    }
}

#[derive(Debug, Default)]
struct State {
    ready: BTreeMap<u64, Queued>,
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
    had_consumer: bool,
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
    fn has_room(&self) -> bool {
        self.ready.len() + self.unacked.len() < MAX_HELD && self.held_bytes < MAX_HELD_BYTES
    }

    /// A message arriving, after `returns` earlier returns to the queue.
    fn push(&mut self, message: Arc<Message>, seq: Option<Seq>, returns: u32) {
        if let Some(seq) = seq {
            self.held.insert(seq);
        }
        self.held_bytes += message.payload.len();
        self.ready_bytes += message.payload.len();
        let id = self.next_id;
        self.next_id += 1;
        self.ready.insert(
            id,
            Queued {
                id,
                message,
                seq,
                redelivered: returns > 0,
                returns,
            },
        );
    }

    /// Takes the oldest ready message.
    fn pop_head(&mut self) -> Option<Queued> {
        let (_, q) = self.ready.pop_first()?;
        let len = q.message.payload.len();
        self.ready_bytes = self.ready_bytes.saturating_sub(len);
        if let Some(a) = &self.admission {
            a.left(len);
        }
        Some(q)
    }

    /// A delivered message back in `ready` at its place, unless it came
    /// back more than `limit` times (then it dies).
    fn put_back(&mut self, mut q: Queued, limit: Option<u64>) {
        q.redelivered = true;
        q.returns = q.returns.saturating_add(1);
        if limit.is_some_and(|limit| u64::from(q.returns) > limit) {
            self.bury(q, Reason::DeliveryLimit);
            return;
        }
        let len = q.message.payload.len();
        self.ready_bytes += len;
        if let Some(a) = &self.admission {
            a.back(len);
        }
        self.ready.insert(q.id, q);
    }

    /// Hands a message (out of `ready` and `unacked`) to the dead-letter
    /// task; its seq stays held until its entry is acknowledged.
    fn bury(&mut self, q: Queued, reason: Reason) {
        self.held_bytes = self.held_bytes.saturating_sub(q.message.payload.len());
        let dead = Dead {
            message: q.message,
            seq: q.seq,
            reason,
        };
        if let Some(Err(mpsc::error::SendError(dead))) = self.dead.as_ref().map(|tx| tx.send(dead))
        {
            // The queue is going away: its entry stays for a restart.
            if let Some(seq) = dead.seq {
                self.held.remove(&seq);
            }
        }
    }

    /// `drop-head`: the oldest ready messages die while the queue is over
    /// a limit; `beyond` counts durable entries not read into memory yet.
    /// True when it is still over (the rest is not in memory).
    fn drop_head(&mut self, args: &QueueArgs, beyond: u64) -> bool {
        let over = |s: &State| {
            args.max_length
                .is_some_and(|max| s.ready.len() as u64 + beyond > max)
                || args
                    .max_length_bytes
                    .is_some_and(|max| s.ready_bytes as u64 > max)
        };
        while over(self) {
            let Some(q) = self.pop_head() else {
                return true;
            };
            self.bury(q, Reason::Maxlen);
        }
        false
    }

    /// Expired messages at the head die; returns when the head expires.
    fn expire_head(&mut self, flags: &Flags, now: u64) -> Option<u64> {
        loop {
            let head = self.ready.first_key_value()?.1;
            let at = flags.expires_at(&head.message)?;
            if at > now {
                return Some(at);
            }
            if let Some(q) = self.pop_head() {
                crate::telemetry::expired(&q.message);
                self.bury(q, Reason::Expired);
            }
        }
    }

    /// A live delivery (the caller checked there is room and the queue is
    /// not catching up with its store entries).
    fn accept(&mut self, d: Delivery) {
        if d.retained {
            // Retained messages are MQTT's; AMQP queues see publishes only.
            return;
        }
        if let Some(seq) = d.seq {
            if seq < self.read_from || self.held.contains(&seq) {
                return;
            }
            self.read_from = seq + 1;
        }
        self.push(d.message, d.seq, 0);
    }

    fn release(&mut self, q: &Queued) {
        if let Some(seq) = q.seq {
            self.held.remove(&seq);
        }
        self.held_bytes = self.held_bytes.saturating_sub(q.message.payload.len());
    }

    fn wake(&self) {
        for waker in self.consumers.values() {
            waker.notify_one();
        }
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
    stop: CancellationToken,
    pump: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Queue {
    /// Attaches the queue's session (resuming a durable one with its
    /// entries) and starts its pump.
    pub(crate) async fn start(
        router: &Router,
        broker: &Weak<Broker>,
        name: &str,
        flags: Flags,
        owner: Option<ConnId>,
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
        let queue = Arc::new(Queue {
            name: name.into(),
            flags,
            owner,
            subscriber: attached.subscriber,
            acker,
            state: Mutex::new(State {
                catching_up: persistent,
                live: Some(attached.deliveries),
                dead: Some(dead),
                admission,
                ..State::default()
            }),
            room: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
            pump: Mutex::new(None),
        });
        let task = tokio::spawn(pump(Arc::downgrade(&queue)));
        *queue.pump.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        tokio::spawn(crate::dead_letter::run(
            Arc::downgrade(&queue),
            Weak::clone(broker),
            graves,
        ));
        Ok(queue)
    }

    /// The delivery limit in force (`x-delivery-limit`).
    fn delivery_limit(&self) -> Option<u64> {
        self.flags.args.effective_delivery_limit()
    }

    /// Whether deliveries carry `x-delivery-count` (queues with a
    /// delivery limit, as RabbitMQ 4's quorum queues).
    pub(crate) fn counts_deliveries(&self) -> bool {
        self.delivery_limit().is_some()
    }

    /// `drop-head` after arrivals, counting a durable queue's entries not
    /// in memory (in the store, or on their way in the session's channel);
    /// true when the queue is still over its limit: its head is not in
    /// memory.
    fn arrived(&self, s: &mut State) -> bool {
        if !self.flags.drops_head() {
            return false;
        }
        let beyond = self
            .subscriber
            .queued_messages()
            .map_or(0, |stored| stored.saturating_sub(s.held.len() as u64));
        s.drop_head(&self.flags.args, beyond)
    }

    /// The dead-letter task is done with these entries: `done` are
    /// acknowledged (their copy is committed, or they were dropped),
    /// `failed` stay in the store for the next start.
    pub(crate) async fn buried(&self, done: Vec<Seq>, failed: &[Seq]) {
        if let (Some(acker), false) = (&self.acker, done.is_empty()) {
            // Awaited: until the entries are gone from the store's count,
            // `held` keeps them out of the ready count.
            if let Err(error) = acker.ack(done.clone()).await {
                tracing::warn!(queue = %self.name, %error, "cannot acknowledge dead-lettered entries; they come back at the next start");
            }
        }
        let mut s = self.state();
        for seq in done.iter().chain(failed) {
            s.held.remove(seq);
        }
        drop(s);
        self.room.notify_one();
    }

    /// A message this queue refused at publish (`reject-publish-dlx`).
    pub(crate) fn refused(&self, message: Arc<Message>) {
        if self.flags.args.overflow == Overflow::RejectPublishDlx
            && let Some(tx) = &self.state().dead
        {
            let _ = tx.send(Dead {
                message,
                seq: None,
                reason: Reason::Maxlen,
            });
        }
    }

    /// Rejected without requeue: they die.
    pub(crate) fn reject(&self, ids: &[u64]) {
        let mut s = self.state();
        for id in ids {
            if let Some(q) = s.unacked.remove(id) {
                s.bury(q, Reason::Rejected);
            }
        }
        drop(s);
        self.room.notify_one();
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
    /// entries in the store, less those delivered and unacknowledged, plus
    /// its transient ones in memory; a transient queue's in memory.
    pub(crate) fn message_count(&self) -> u32 {
        let mut s = self.state();
        self.drain_live(&mut s);
        let in_memory = s.ready.len() as u64;
        let count = match self.subscriber.queued_messages() {
            Some(stored) => {
                // Held but not ready: unacked, and dying (dead-lettering).
                let durable = s.ready.values().filter(|q| q.seq.is_some()).count();
                let not_ready = s.held.len().saturating_sub(durable) as u64;
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
        while s.has_room() && !s.catching_up {
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
        self.arrived(s);
    }

    pub(crate) fn consumer_count(&self) -> u32 {
        self.state().consumers.len() as u32
    }

    /// Adds a consumer; false (and nothing added) when an exclusive one
    /// is asked for while there are others, or there is an exclusive one.
    pub(crate) fn add_consumer(&self, key: u64, waker: Arc<Notify>, exclusive: bool) -> bool {
        let mut s = self.state();
        if s.exclusive.is_some() || exclusive && !s.consumers.is_empty() {
            return false;
        }
        if exclusive {
            s.exclusive = Some(key);
        }
        s.consumers.insert(key, waker);
        s.had_consumer = true;
        s.wake();
        true
    }

    /// Removes a consumer; true when it was the last one of a queue that
    /// had one (an auto-delete queue goes then).
    pub(crate) fn remove_consumer(&self, key: u64) -> bool {
        let mut s = self.state();
        s.consumers.remove(&key);
        if s.exclusive == Some(key) {
            s.exclusive = None;
        }
        s.had_consumer && s.consumers.is_empty()
    }

    /// Up to `max` ready messages, oldest first. Unless `no_ack`, they wait
    /// in `unacked`; with `no_ack` they count as delivered now.
    pub(crate) async fn take(&self, max: usize, no_ack: bool) -> Vec<Queued> {
        let (out, done) = {
            let mut s = self.state();
            self.drain_live(&mut s);
            let mut out = Vec::new();
            let mut done = Vec::new();
            let now = edge_core::message::now_ms();
            while out.len() < max {
                let Some(q) = s.pop_head() else {
                    break;
                };
                if self.flags.expired(&q.message, now) {
                    crate::telemetry::expired(&q.message);
                    s.bury(q, Reason::Expired);
                    continue;
                }
                if no_ack {
                    s.release(&q);
                    done.extend(q.seq);
                } else {
                    s.unacked.insert(q.id, q.clone());
                }
                out.push(q);
            }
            (out, done)
        };
        if !out.is_empty() {
            self.room.notify_one();
        }
        self.forget(done).await;
        out
    }

    /// The consumer has these messages: their store entries go.
    pub(crate) async fn ack(&self, ids: &[u64]) {
        let done = {
            let mut s = self.state();
            let mut done = Vec::new();
            for id in ids {
                if let Some(q) = s.unacked.remove(id) {
                    s.release(&q);
                    done.extend(q.seq);
                }
            }
            done
        };
        self.room.notify_one();
        self.forget(done).await;
    }

    /// Back to `ready` at their place, marked redelivered.
    /// A durable queue with a delivery limit records each entry's returns
    /// in the store (the entry's state), so the limit holds across restarts.
    pub(crate) fn requeue(&self, ids: &[u64]) {
        let limit = self.delivery_limit();
        let mut returned = Vec::new();
        let mut s = self.state();
        for id in ids {
            if let Some(q) = s.unacked.remove(id) {
                if let (Some(seq), Some(_)) = (q.seq, limit) {
                    returned.push((seq, q.returns.saturating_add(1)));
                }
                s.put_back(q, limit);
            }
        }
        s.wake();
        drop(s);
        if let (Some(acker), false) = (&self.acker, returned.is_empty()) {
            let acker = acker.clone();
            // A state set after the entry went (dead, acked) is a no-op.
            tokio::spawn(async move {
                for (seq, returns) in returned {
                    if let Err(error) = acker.set_state(seq, returns).await {
                        tracing::debug!(%error, "cannot record a delivery's returns");
                    }
                }
            });
        }
    }

    async fn forget(&self, seqs: Vec<Seq>) {
        if let (Some(acker), false) = (&self.acker, seqs.is_empty()) {
            // Awaited only for its registration: a later backlog read waits
            // for it, so an acknowledged entry is never read again.
            drop(acker.ack_in_background(seqs).await);
        }
    }

    /// Drops every ready message (not those awaiting an ack), the durable
    /// ones not read into memory yet included; returns how many.
    pub(crate) async fn purge(&self) -> Result<u32, SessionError> {
        let (mut count, seqs, catching_up) = {
            let mut s = self.state();
            let mut seqs = Vec::new();
            let mut count = 0;
            while let Some(q) = s.pop_head() {
                s.release(&q);
                seqs.extend(q.seq);
                count += 1;
            }
            (count, seqs, s.catching_up)
        };
        if let Some(acker) = &self.acker {
            acker.ack(seqs).await?;
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
                    queue: 1,
                    gate: None,
                },
            )
            .await?;
        drop(replaced);
        {
            let mut s = self.state();
            s.ready.clear();
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

/// Moves the session's deliveries (and, when it lagged, its store entries)
/// into `ready`, while there is room, until the queue is deleted or gone.
async fn pump(queue: Weak<Queue>) {
    loop {
        let Some(q) = queue.upgrade() else { return };
        if q.stop.is_cancelled() {
            return;
        }
        let (room, catching_up) = {
            let mut s = q.state();
            if q.subscriber.take_lagged() {
                s.catching_up = true;
            }
            // Over its limit with the head in the store: read it, room
            // or not (a page beyond the memory bound), to drop it.
            if q.arrived(&mut s) {
                s.catching_up = true;
            }
            (
                s.has_room() || s.catching_up && q.flags.drops_head(),
                s.catching_up,
            )
        };
        if !room {
            let stop = q.stop.clone();
            let room = Arc::clone(&q.room);
            // A full `drop-head` queue also looks again for arrivals that
            // push it over its limit (they do not wake it).
            let recheck = q.flags.drops_head();
            drop(q);
            tokio::select! {
                _ = room.notified() => continue,
                _ = tokio::time::sleep(LIMIT_RECHECK), if recheck => continue,
                _ = stop.cancelled() => return,
            }
        }
        if catching_up {
            let from = q.state().read_from;
            match q.subscriber.backlog_with_expired(from, BACKLOG_PAGE).await {
                Ok(page) => {
                    let mut s = q.state();
                    let caught_up = page.len() < BACKLOG_PAGE;
                    for e in page {
                        s.read_from = e.seq + 1;
                        if !s.held.contains(&e.seq) {
                            // The entry's state: its returns (`requeue`).
                            s.push(e.message, Some(e.seq), e.state);
                        }
                    }
                    if caught_up {
                        s.catching_up = false;
                    }
                    q.arrived(&mut s);
                    s.wake();
                }
                Err(error) => {
                    tracing::warn!(queue = %q.name, %error, "cannot read the queue's stored messages; retrying");
                    let stop = q.stop.clone();
                    drop(q);
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
            continue;
        }
        let stop = q.stop.clone();
        let room = Arc::clone(&q.room);
        let head_expires = q
            .state()
            .expire_head(&q.flags, edge_core::message::now_ms());
        drop(q);
        let live = std::future::poll_fn(|cx| poll_live(&queue, cx));
        let expiry = async {
            match head_expires {
                Some(at) => {
                    let wait = at.saturating_sub(edge_core::message::now_ms());
                    tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            open = live => if !open { return },
            // A take() found the session lagged: read the store.
            _ = room.notified() => {}
            // The head expires: it dies (next turn).
            _ = expiry => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Moves what the session's channel holds into `ready`; pending until
/// there is something (or no room: then ready, for the pump to wait for
/// room). Ready(false) once the channel or the queue is gone.
fn poll_live(queue: &Weak<Queue>, cx: &mut std::task::Context<'_>) -> std::task::Poll<bool> {
    use std::task::Poll;
    let Some(q) = queue.upgrade() else {
        return Poll::Ready(false);
    };
    let mut s = q.state();
    let mut moved = false;
    loop {
        if !s.has_room() || s.catching_up {
            break;
        }
        if q.subscriber.take_lagged() {
            s.catching_up = true;
            break;
        }
        let Some(live) = s.live.as_mut() else {
            return Poll::Ready(false);
        };
        match live.poll_recv(cx) {
            Poll::Ready(Some(d)) => {
                s.accept(d);
                moved = true;
            }
            Poll::Ready(None) => return Poll::Ready(false),
            Poll::Pending if moved => break,
            Poll::Pending => return Poll::Pending,
        }
    }
    q.arrived(&mut s);
    s.wake();
    Poll::Ready(true)
}
