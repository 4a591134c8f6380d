//! The forwarding loop over one link: read the log, publish, collect
//! confirms, settle the done prefix. The invariants are listed in
//! `replicator.rs`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use edge_auth::TokenBucket;
use edge_core::{Message, Route, Routes};
use edge_store::{Entry, Record, Seq, Store};
use futures_util::FutureExt;
use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::connector::{Connector, Link};
use crate::convert::{self, Lifetime, Publish};
use crate::cursor::CursorFlusher;
use crate::error::LinkError;
use crate::health::{LinkState, LinkStatus};
use crate::lanes::Lane;
use crate::metrics::UpstreamMetrics;
use crate::summary::{Expired, Parked};
use edge_core::window::Window;

/// How often the watchdog, the link check and the expiry summary run.
const TICK: Duration = Duration::from_secs(1);
/// How long shutdown waits for outstanding confirms.
const SHUTDOWN_CONFIRM_WAIT: Duration = Duration::from_secs(2);
/// Most records read from the log at once.
const READ_MAX_MESSAGES: usize = 1024;
/// Roughly the most bytes read from the log at once.
const READ_MAX_BYTES: usize = 4 << 20;
/// Most records taken from the log in one turn of the forwarding loop
/// before confirms, the timer and shutdown are looked at again.
const TURN_MAX_RECORDS: usize = 4096;
/// Window slots allowed beyond `max_in_flight`: records parked without a
/// publish and runs of skipped records between pending ones. Bounds the
/// window's memory whatever the backlog holds.
const SLOT_ALLOWANCE: usize = 1024;
/// Most records looked at per tick, while the link is down, for records
/// no route of the upstream matches.
const DOWN_SKIP_MAX_RECORDS: usize = 8192;
/// How often exchanges found missing are checked again while connected.
const EXCHANGE_RECHECK: Duration = Duration::from_secs(10);
/// A record bound for an exchange found missing is parked only after a
/// check at most this old. So right after the operator creates the
/// exchange, a replay of its dead letters goes through instead of being
/// parked again (a re-check on demand, rather than a signal from the store
/// on replay: it also covers an exchange created before new traffic, needs
/// nothing from the store, and costs at most one check per second while an
/// exchange stays missing).
const PARK_RECHECK: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The route of `upstream` that takes `record`: none when no route matches,
/// or when the record is a replayed dead letter of another upstream (that
/// upstream forwards it; this one delivered or parked it before).
fn route_for<'r>(
    routes: &'r Routes,
    upstream: &str,
    entry: &Entry,
    topic: &str,
) -> Option<&'r Route> {
    if entry.replay.as_ref().is_some_and(|r| !r.is_for(upstream)) {
        return None;
    }
    routes.first_match(topic)
}

/// [`route_for`] of an entry not yet decoded (none when it is unreadable).
fn route_of_entry<'r>(routes: &'r Routes, upstream: &str, entry: &Entry) -> Option<&'r Route> {
    let message = Message::from_record(&entry.record).ok()?;
    route_for(routes, upstream, entry, &message.topic)
}

/// What [`Forwarder::forward`] did with a record.
enum Forwarded {
    /// Published, or settled here (expired, parked, unreadable).
    Done,
    /// Not this lane's (or no route's): passed as done for it.
    Passed,
    /// To be published, but `max_in_flight` publishes are pending: given back.
    Full(Entry),
}

/// A record in the window.
#[derive(Debug)]
struct InFlight {
    record: Record,
    topic: Arc<str>,
    route: String,
    published_at: Instant,
    /// The seq of its message id, when that is not its own (a replay).
    original: Option<Seq>,
    /// Set when the record goes to the dead-letter table instead.
    park: Option<Park>,
}

#[derive(Debug)]
struct Park {
    kind: &'static str,
    reason: String,
}

/// One publish from the moment its frames are queued until the broker
/// confirms it: the write of the frames by lapin's I/O loop, then the
/// publisher confirm. Resolves to its lane, the seq and the confirmation,
/// or to the link error that stopped it.
type Publishing<'l> = Pin<Box<dyn Future<Output = Confirmed> + Send + 'l>>;

/// A publish's lane (index), seq and outcome.
type Confirmed = (usize, Seq, Result<Confirmation, LinkError>);

/// A check of the exchanges found missing, running beside the forwarding
/// loop; resolves to those still missing.
type Check<'l> = Pin<Box<dyn Future<Output = BTreeSet<String>> + Send + 'l>>;

/// An attempt on the first node while linked to another (`return_to_first`).
type Probe = Pin<Box<dyn Future<Output = Option<Link>> + Send>>;

/// How a session ended without link trouble.
pub(crate) enum End {
    Shutdown,
    /// The first node answers again: the confirms outstanding were
    /// collected (within a bound) and forwarding goes on over this link.
    Return(Box<Link>),
}

/// Waits for the probe in progress; never resolves without one.
async fn probe_done(probe: &mut Option<Probe>) -> Option<Link> {
    match probe {
        Some(probe) => probe.await,
        None => std::future::pending().await,
    }
}

/// Waits for the check in progress; never resolves without one.
async fn check_done(check: &mut Option<Check<'_>>) -> BTreeSet<String> {
    match check {
        Some(check) => check.await,
        None => std::future::pending().await,
    }
}

/// Starts the publish of `seq` in lane `lane`.
///
/// lapin's `basic_publish` does its real work on the FIRST poll, without
/// suspending: it checks the channel, registers the next delivery tag for
/// the confirm and pushes the method, header and body frames onto the
/// connection's FIFO of publish frames; only then does it wait for the I/O
/// loop to have written them. So this polls the new future once, right
/// away: when it returns, the frames are queued behind those of the
/// previous seq (the order on the wire is the seq order) and the delivery
/// tag is taken, while the write and the confirm are collected later with
/// the other outstanding publishes.
fn start_publish<'l>(
    channel: &'l Channel,
    lane: usize,
    seq: Seq,
    publish: Publish,
    payload: Bytes,
) -> Publishing<'l> {
    let mut publishing: Publishing<'l> = Box::pin(async move {
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let sent = channel
            .basic_publish(
                publish.exchange,
                publish.routing_key,
                options,
                &payload,
                publish.properties,
            )
            .await;
        drop(payload);
        let outcome = match sent {
            Ok(confirm) => confirm
                .await
                .map_err(|source| LinkError::Confirm { seq, source }),
            Err(source) => Err(LinkError::Publish { seq, source }),
        };
        (lane, seq, outcome)
    });
    // The no-op waker is enough: the future goes into a FuturesUnordered,
    // which polls every newly added future again with its own waker.
    match publishing
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Pending => publishing,
        // Done already (e.g. the channel is closed): the outcome is
        // collected like any other.
        Poll::Ready(outcome) => Box::pin(std::future::ready(outcome)),
    }
}

/// A lane's per-link state.
struct LaneSession {
    window: Window<InFlight>,
    /// Read from the log, not yet published.
    buffer: VecDeque<Entry>,
    read_from: Seq,
}

/// Per-link state; dropped with the link.
struct Session<'l> {
    /// As [`Forwarder::lanes`], highest priority first.
    lanes: Vec<LaneSession>,
    /// The outstanding publishes (frames queued, not yet confirmed).
    publishing: FuturesUnordered<Publishing<'l>>,
    /// Last confirm, or the publish that started a wait for one.
    last_progress: Instant,
    /// The broker blocked the connection (resource alarm) at the last tick.
    blocked: bool,
    expired: Expired,
    parked: Parked,
    /// Exchanges of this upstream's routes that the broker does not have;
    /// records for them are parked instead of published.
    missing: BTreeSet<String>,
    /// When `missing` was last checked.
    checked_at: Instant,
    /// The check of `missing` in progress.
    check: Option<Check<'l>>,
    /// Replayed records in the window: original seq (of the message id) →
    /// log seq, to find the record a returned message names.
    replayed: HashMap<Seq, Seq>,
    /// `max_replay_rate`: tokens for publishes.
    cap: Option<TokenBucket>,
    /// Publishing waits until then (the cap's tokens are owed).
    paced_until: Option<tokio::time::Instant>,
    /// The attempt on the first node in progress, and when the last began.
    probe: Option<Probe>,
    probed_at: Instant,
}

impl Session<'_> {
    fn new(
        starts: impl Iterator<Item = Seq>,
        missing: BTreeSet<String>,
        cap: Option<NonZeroU32>,
    ) -> Self {
        let now = Instant::now();
        Session {
            lanes: starts
                .map(|start| LaneSession {
                    window: Window::new(start),
                    buffer: VecDeque::new(),
                    read_from: start,
                })
                .collect(),
            publishing: FuturesUnordered::new(),
            last_progress: Instant::now(),
            blocked: false,
            expired: Expired::default(),
            parked: Parked::default(),
            missing,
            checked_at: Instant::now(),
            check: None,
            replayed: HashMap::new(),
            // A tenth of a second's worth may go at once.
            cap: cap.map(|rate| {
                let rate = f64::from(rate.get());
                TokenBucket::new(rate, (rate / 10.0).max(1.0), now)
            }),
            paced_until: None,
            probe: None,
            probed_at: now,
        }
    }

    /// Published records of every lane waiting for their confirm.
    fn in_flight(&self) -> usize {
        self.lanes.iter().map(|l| l.window.in_flight()).sum()
    }

    /// Whether no lane holds records read and not yet published.
    fn nothing_buffered(&self) -> bool {
        self.lanes.iter().all(|l| l.buffer.is_empty())
    }

    /// The lane whose window holds `seq`.
    fn lane_holding(&mut self, seq: Seq) -> Option<&mut InFlight> {
        self.lanes.iter_mut().find_map(|l| l.window.get_mut(seq))
    }
}

/// Forwarding state that outlives a link.
pub(crate) struct Forwarder {
    pub(crate) name: String,
    pub(crate) gateway_id: String,
    pub(crate) routes: Routes,
    pub(crate) store: Store,
    pub(crate) max_in_flight: usize,
    pub(crate) confirm_timeout: Duration,
    pub(crate) metrics: UpstreamMetrics,
    /// The link's state, as `/healthz` reports it.
    pub(crate) status: LinkStatus,
    /// `max_replay_rate`.
    pub(crate) replay_cap: Option<NonZeroU32>,
    /// How often the first node is probed while linked to another.
    pub(crate) return_check: Duration,
    /// Where `position` is published for `ack = "upstream-confirmed"`.
    pub(crate) progress: Option<tokio::sync::watch::Sender<Seq>>,
    pub(crate) flusher: CursorFlusher,
    /// First seq not done (the in-memory cursor, the lowest of the lanes');
    /// shared with the reporter.
    pub(crate) position: Arc<AtomicU64>,
    /// The priority lanes, highest first; at least one (`lanes.rs`).
    pub(crate) lanes: Vec<Lane>,
}

impl Forwarder {
    pub(crate) fn position(&self) -> Seq {
        self.position.load(Ordering::Relaxed)
    }

    /// Moves `lane` to `next` (if that is forward) and the upstream's
    /// position to the lowest lane's.
    fn set_lane_position(&mut self, lane: usize, next: Seq) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.set_position(next);
        }
        let lowest = self.lanes.iter().map(|l| l.position).min().unwrap_or(next);
        if lowest > self.position() {
            self.position.store(lowest, Ordering::Relaxed);
            self.flusher.set(lowest);
            if let Some(progress) = &self.progress {
                progress.send_replace(lowest);
            }
        }
    }

    /// Whether a record on `route` belongs to lane `lane` (with one lane,
    /// every record does).
    fn in_lane(&self, lane: usize, route: &Route) -> bool {
        self.lanes.len() == 1
            || self
                .lanes
                .get(lane)
                .is_some_and(|l| l.priority == route.priority)
    }

    /// Room for one more record in `lane`'s window: its slots within
    /// their bound. (A publish also needs fewer than `max_in_flight`
    /// pending over all lanes: [`Forwarder::forward`] checks.)
    fn has_slots(&self, s: &Session<'_>, lane: usize) -> bool {
        s.lanes
            .get(lane)
            .is_some_and(|l| l.window.slots() < self.max_in_flight.saturating_add(SLOT_ALLOWANCE))
    }

    /// Forwards over one link until shutdown or a return to the first node
    /// (`Ok`) or link trouble (`Err`).
    pub(crate) async fn session(
        &mut self,
        link: &Link,
        connector: &mut Connector,
        shutdown: &CancellationToken,
    ) -> Result<End, LinkError> {
        let missing = self.check_exchanges(link).await;
        let starts = self.lanes.iter().map(|l| l.position);
        let mut s = Session::new(starts, missing, self.replay_cap);
        let result = self.pump(link, connector, shutdown, &mut s).await;
        if matches!(result, Err(ref e) if !matches!(e, LinkError::Park { .. })) {
            // Keep what was confirmed before the failure, so fewer
            // messages are forwarded twice. (Not after a failed park: the
            // cursor must stay on the record that is not parked.)
            let _ = self.settle(&mut s).await;
            s.expired.log(&self.name);
        }
        s.parked.log(&self.name);
        result
    }

    async fn pump<'l>(
        &mut self,
        link: &'l Link,
        connector: &mut Connector,
        shutdown: &CancellationToken,
        s: &mut Session<'l>,
    ) -> Result<End, LinkError> {
        let mut committed = self.store.committed();
        let mut committed_open = true;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Bounded work per turn: a long run of records skipped or
            // parked without a publish must not keep confirms, the timer
            // and shutdown waiting.
            //
            // Lanes in priority order: a lower lane gets the publish slots
            // a higher one leaves because it has nothing (more) to read
            // now; it still passes the records that are not its own while
            // the higher ones fill `max_in_flight`, so its cursor (and
            // retirement) does not stand still behind them.
            //
            // One look at the committed seq per turn, for every lane: a
            // commit after it wakes the loop again (`changed` below).
            //
            // Records a lane only passes (another lane's) count against a
            // budget of its own per turn, so a higher lane scanning past a
            // lower lane's backlog does not hold the lower one's publishes
            // back until the scan ends.
            let last_committed = *committed.borrow_and_update();
            let mut left = TURN_MAX_RECORDS;
            let mut scanned_out = false;
            for lane in 0..s.lanes.len() {
                let mut passes = TURN_MAX_RECORDS;
                while left > 0
                    && passes > 0
                    && self.has_slots(s, lane)
                    && s.paced_until.is_none()
                    && !shutdown.is_cancelled()
                {
                    if s.lanes[lane].buffer.is_empty() {
                        s.expired.log(&self.name);
                        if !self.refill(s, lane, last_committed).await {
                            break;
                        }
                        // Confirms that came in while reading.
                        self.harvest(s, connector)?;
                        continue;
                    }
                    let Some(entry) = s.lanes[lane].buffer.pop_front() else {
                        break;
                    };
                    if self.must_wait_for_check(link, s, lane, &entry) {
                        s.lanes[lane].buffer.push_front(entry);
                        break;
                    }
                    match self.forward(link, s, lane, entry)? {
                        Forwarded::Done => left -= 1,
                        Forwarded::Passed => passes -= 1,
                        Forwarded::Full(entry) => {
                            // Every publish slot is taken.
                            s.lanes[lane].buffer.push_front(entry);
                            break;
                        }
                    }
                }
                scanned_out |= passes == 0;
            }
            self.settle(s).await?;
            let more = (left == 0 || scanned_out) && s.paced_until.is_none();
            // Some lane would read more if there were more: wake on a commit.
            let idle =
                (0..s.lanes.len()).any(|l| s.lanes[l].buffer.is_empty() && self.has_slots(s, l));
            let paced_until = s.paced_until;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.drain(s, "shutdown").await;
                    return Ok(End::Shutdown);
                }
                Some((lane, seq, result)) = s.publishing.next(), if !s.publishing.is_empty() => {
                    self.on_confirm(s, lane, seq, result)?;
                    self.harvest(s, connector)?;
                }
                still = check_done(&mut s.check), if s.check.is_some() => {
                    self.checked(s, still);
                }
                first = probe_done(&mut s.probe), if s.probe.is_some() => {
                    s.probe = None;
                    s.probed_at = Instant::now();
                    if let Some(first) = first {
                        self.drain(s, "return to the first node").await;
                        return Ok(End::Return(Box::new(first)));
                    }
                }
                () = tokio::time::sleep_until(paced_until.unwrap_or_else(tokio::time::Instant::now)),
                    if paced_until.is_some() => {
                    s.paced_until = None;
                }
                changed = committed.changed(), if idle && committed_open => {
                    committed_open = changed.is_ok();
                }
                _ = tick.tick() => {
                    s.expired.log(&self.name);
                    s.parked.log(&self.name);
                    if !link.is_usable() {
                        return Err(LinkError::Lost);
                    }
                    if !s.missing.is_empty() && s.checked_at.elapsed() >= EXCHANGE_RECHECK {
                        self.start_check(link, s);
                    }
                    if s.probe.is_none()
                        && connector.wants_first(link)
                        && s.probed_at.elapsed() >= self.return_check
                    {
                        s.probe = Some(Box::pin(connector.probe_first()));
                    }
                    // Confirms already in count before the watchdog judges.
                    self.harvest(s, connector)?;
                    let blocked = link.connection.status().blocked();
                    if blocked {
                        // Confirms cannot come while the broker blocks us,
                        // and a new connection would be blocked as well.
                        s.last_progress = Instant::now();
                        if !s.blocked && s.in_flight() > 0 {
                            warn!(upstream = %self.name, in_flight = s.in_flight(),
                                "broker blocks publishing (resource alarm); waiting");
                        }
                    }
                    s.blocked = blocked;
                    let waited = s.last_progress.elapsed();
                    let in_flight = s.in_flight();
                    if in_flight > 0 && waited > self.confirm_timeout {
                        if self.status.set(LinkState::Stalled) != LinkState::Stalled {
                            warn!(upstream = %self.name, waited_ms = waited.as_millis() as u64,
                                in_flight, "upstream stalled: link up, nothing confirmed; rebuilding it");
                        }
                        return Err(LinkError::Watchdog { waited, in_flight });
                    }
                    if in_flight == 0 && s.nothing_buffered() {
                        // Nothing to forward: no stall either.
                        self.progressed();
                    }
                }
                // The turn stopped on its bound: go on after the above had
                // their chance.
                () = std::future::ready(()), if more => {}
            }
        }
    }

    /// Handles the confirms that are already in, without waiting.
    fn harvest(&mut self, s: &mut Session<'_>, connector: &mut Connector) -> Result<(), LinkError> {
        let mut any = false;
        while let Some(Some((lane, seq, result))) = s.publishing.next().now_or_never() {
            self.on_confirm(s, lane, seq, result)?;
            any = true;
        }
        if any {
            connector.link_healthy();
            self.progressed();
        }
        Ok(())
    }

    /// Forward progress: a stalled link is up again.
    fn progressed(&self) {
        if self.status.progress() {
            info!(upstream = %self.name, cursor = self.position(), "upstream moving again");
        }
    }

    /// Reads the next batch into `lane`'s buffer; false when there is
    /// nothing (more) to read now.
    async fn refill(&mut self, s: &mut Session<'_>, lane: usize, last_committed: Seq) -> bool {
        let max = READ_MAX_MESSAGES.min(self.max_in_flight.max(64));
        let Some(l) = s.lanes.get_mut(lane) else {
            return false;
        };
        let from = l.read_from;
        if from > last_committed {
            return false;
        }
        let store = self.store.clone();
        let read = tokio::task::spawn_blocking(move || store.read(from, max, READ_MAX_BYTES)).await;
        match read {
            Ok(Ok(batch)) => {
                let Some(last) = batch.last().map(|e| e.seq) else {
                    return false;
                };
                l.read_from = last + 1;
                l.buffer.extend(batch);
                true
            }
            Ok(Err(error)) => {
                warn!(upstream = %self.name, from, %error, "cannot read the log; retrying");
                false
            }
            Err(error) => {
                warn!(upstream = %self.name, from, %error, "log read task failed; retrying");
                false
            }
        }
    }

    /// Starts the publish of one record of `lane`, or settles it at once
    /// (no route, another lane's, expired, unconvertible). Gives the entry
    /// back when it is to be published and `max_in_flight` publishes are
    /// pending already.
    fn forward<'l>(
        &mut self,
        link: &'l Link,
        s: &mut Session<'l>,
        lane: usize,
        entry: Entry,
    ) -> Result<Forwarded, LinkError> {
        let full = s.in_flight() >= self.max_in_flight;
        let Some(l) = s.lanes.get_mut(lane) else {
            return Ok(Forwarded::Done);
        };
        let window = &mut l.window;
        let message = match Message::from_record(&entry.record) {
            Ok(message) => message,
            Err(error) => {
                error!(upstream = %self.name, seq = entry.seq, %error,
                    "record in the log is unreadable; skipped, it cannot be forwarded");
                metrics::counter!("edge_messages_dropped_total", "reason" => "unreadable")
                    .increment(1);
                window.skip(entry.seq);
                return Ok(Forwarded::Done);
            }
        };
        let route = route_for(&self.routes, &self.name, &entry, &message.topic);
        let Some(route) = route.filter(|r| self.in_lane(lane, r)) else {
            window.skip(entry.seq);
            return Ok(Forwarded::Passed);
        };
        let Entry {
            seq,
            record,
            replay,
        } = entry;
        let original = replay.as_ref().map(|r| r.original_seq);
        let now = now_ms();
        let lifetime = convert::lifetime_of(route.ttl, &message, now);
        if lifetime == Lifetime::Expired {
            self.metrics.expired(&route.name, 1);
            s.expired.note(&route.name, seq);
            window.skip(seq);
            return Ok(Forwarded::Done);
        }
        let missing = s.missing.contains(&route.exchange);
        if full && !missing {
            // (Before converting: it would be done again.)
            return Ok(Forwarded::Full(Entry {
                seq,
                record,
                replay,
            }));
        }
        let route_name = route.name.clone();
        let converted = if missing {
            Err(Park {
                kind: "exchange_not_found",
                reason: format!("exchange {:?} not found", route.exchange),
            })
        } else {
            convert::to_publish(
                &self.gateway_id,
                original.unwrap_or(seq),
                &message,
                route,
                lifetime,
                now,
            )
            .map_err(|e| Park {
                kind: "unconvertible",
                reason: format!("cannot be expressed in AMQP: {e}"),
            })
        };
        let publish = match converted {
            Ok(p) => p,
            Err(park) => {
                window.push_done(
                    seq,
                    InFlight {
                        record,
                        topic: message.topic,
                        route: route_name,
                        published_at: Instant::now(),
                        original,
                        park: Some(park),
                    },
                );
                return Ok(Forwarded::Done);
            }
        };
        if let Some(original) = original {
            s.replayed.insert(original, seq);
        }
        if let Some(cap) = &mut s.cap {
            // Publish now, owing the token when there is none: the next
            // publish waits until it is paid.
            let now = tokio::time::Instant::now();
            if let Err(wait) = cap.take(1.0, now.into_std()) {
                s.paced_until = Some(now + wait);
            }
        }
        let publishing = start_publish(&link.channel, lane, seq, publish, message.payload);
        let published_at = Instant::now();
        if s.in_flight() == 0 {
            s.last_progress = published_at;
        }
        let Some(window) = s.lanes.get_mut(lane).map(|l| &mut l.window) else {
            return Ok(Forwarded::Done);
        };
        window.push(
            seq,
            InFlight {
                record,
                topic: message.topic,
                route: route_name,
                published_at,
                original,
                park: None,
            },
        );
        s.publishing.push(publishing);
        Ok(Forwarded::Done)
    }

    fn on_confirm(
        &mut self,
        s: &mut Session<'_>,
        lane: usize,
        seq: Seq,
        result: Result<Confirmation, LinkError>,
    ) -> Result<(), LinkError> {
        let returned = match result? {
            Confirmation::Ack(returned) => returned,
            Confirmation::Nack(_) => return Err(LinkError::Nack { seq }),
            Confirmation::NotRequested => return Err(LinkError::Lost),
        };
        if let Some(message) = returned {
            // lapin hands a returned message to the next confirm that
            // resolves, which may belong to another seq: our message_id
            // names the record it really is (a replay by its original seq).
            let target = convert::seq_of_returned(&self.gateway_id, &message.delivery.properties)
                .map_or(seq, |id| s.replayed.get(&id).copied().unwrap_or(id));
            let reason = format!(
                "unroutable: exchange {:?}, routing key {:?}: {} {}",
                message.delivery.exchange.as_str(),
                message.delivery.routing_key.as_str(),
                message.reply_code,
                message.reply_text,
            );
            match s.lane_holding(target) {
                Some(item) => {
                    item.park = Some(Park {
                        kind: "unroutable",
                        reason,
                    })
                }
                None => warn!(upstream = %self.name, seq = target, %reason,
                    "broker returned a message that is no longer in flight"),
            }
        }
        let confirmed = s.lanes.get_mut(lane).and_then(|l| l.window.confirm(seq));
        if let Some(item) = confirmed {
            self.metrics.confirmed(item.published_at.elapsed());
        }
        s.last_progress = Instant::now();
        Ok(())
    }

    /// Moves the cursor over the done prefix, parking the records in it that
    /// are to be parked first. Their parks are queued together so that they
    /// share one group commit (one fsync), not one each.
    async fn settle(&mut self, s: &mut Session<'_>) -> Result<(), LinkError> {
        let mut parks = Vec::new();
        let mut notes = Vec::new();
        for (lane, l) in s.lanes.iter_mut().enumerate() {
            while let Some((seq, item)) = l.window.pop_done() {
                let Some(item) = item else { continue };
                if let Some(original) = item.original.filter(|o| s.replayed.get(o) == Some(&seq)) {
                    s.replayed.remove(&original);
                }
                match item.park {
                    None => self.metrics.forwarded(&item.route),
                    Some(park) => {
                        let parked = edge_store::Parked {
                            upstream: self.name.clone(),
                            original_seq: item.original.unwrap_or(seq),
                            reason: park.reason.clone(),
                        };
                        parks.push(self.store.park(seq, item.record, parked));
                        notes.push((lane, seq, item.route, item.topic, park));
                    }
                }
            }
        }
        let mut result = Ok(());
        // A lane whose park failed stays on the first record not parked.
        let mut held: Vec<(usize, Seq)> = Vec::new();
        let parked = join_all(parks).await;
        for ((lane, seq, route, topic, park), parked) in notes.into_iter().zip(parked) {
            if held.iter().any(|(l, _)| *l == lane) {
                continue;
            }
            if let Err(source) = parked {
                held.push((lane, seq));
                if result.is_ok() {
                    result = Err(LinkError::Park { seq, source });
                }
                continue;
            }
            self.metrics.parked(park.kind);
            s.parked.note(&route, park.kind, seq, &topic, &park.reason);
        }
        for lane in 0..s.lanes.len() {
            let next = match held.iter().find(|(l, _)| *l == lane) {
                Some((_, seq)) => *seq,
                None => s.lanes[lane].window.next(),
            };
            self.set_lane_position(lane, next);
        }
        result
    }

    /// Shutdown or a move to another link (`why`): publish nothing more,
    /// wait briefly for the outstanding confirms, settle what is done.
    async fn drain(&mut self, s: &mut Session<'_>, why: &str) {
        let deadline = tokio::time::sleep(SHUTDOWN_CONFIRM_WAIT);
        tokio::pin!(deadline);
        while s.in_flight() > 0 {
            tokio::select! {
                _ = &mut deadline => {
                    warn!(upstream = %self.name, in_flight = s.in_flight(),
                        "{why}: confirms still outstanding; they will be forwarded again");
                    break;
                }
                next = s.publishing.next() => {
                    let Some((lane, seq, result)) = next else { break };
                    if let Err(error) = self.on_confirm(s, lane, seq, result) {
                        warn!(upstream = %self.name, %error, "{why}: link failed while draining");
                        break;
                    }
                }
            }
        }
        s.expired.log(&self.name);
        if let Err(error) = self.settle(s).await {
            warn!(upstream = %self.name, %error, "{why}: cannot settle confirmed messages");
        }
        s.parked.log(&self.name);
    }
}

mod down;
mod exchange_checks;
#[cfg(test)]
mod tests;
