//! Rate-limited log summaries.
//!
//! Anything a client can make happen many times a second — a refused
//! connection, a dropped delivery, a protocol error — must not write one log
//! line per event: on an SD card that is wear and a full log partition, and
//! an attacker's lever. Such events go through a [`Summary`] instead. The
//! first event of a quiet stretch is logged at once (so a one-off is seen
//! when it happens); later ones within [`Summary::every`] are only counted,
//! and the count, the interval it covers and the first example of it are
//! logged when the interval has passed: by the next event, or by
//! [`flush_due`], which the gateway calls on a timer, or by [`flush_all`] at
//! shutdown. Nothing counted is ever left unreported.
//!
//! A summary is a `static` that registers itself on first use, so the
//! flushing timer finds every summary of every crate without wiring.
//! Each summary holds a few keys (for instance one per refusal reason), each
//! reported on its own line. Metrics remain the exact record; these lines
//! are for the operator reading the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Severity of a summary's lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// Default interval between two lines of one key.
pub const EVERY: Duration = Duration::from_secs(10);

/// Most distinct keys one summary tracks; events of further keys are
/// counted under the last one so that a summary never grows without bound.
const MAX_KEYS: usize = 16;

/// One kind of event, summarised. See the crate documentation.
#[derive(Debug)]
pub struct Summary {
    what: &'static str,
    level: Level,
    every: Duration,
    registered: AtomicBool,
    keys: Mutex<Vec<Key>>,
}

#[derive(Debug)]
struct Key {
    key: &'static str,
    /// When the last line for this key was written.
    last_line: Option<Instant>,
    /// Events counted since then and not yet reported.
    pending: u64,
    /// When the first of them happened, and what it was.
    first: Option<Instant>,
    example: String,
}

static REGISTRY: Mutex<Vec<&'static Summary>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Summary {
    /// `what` is the sentence of every line, e.g. `"MQTT connection refused"`.
    pub const fn new(what: &'static str, level: Level) -> Summary {
        Summary::every(what, level, EVERY)
    }

    /// Like [`Summary::new`] with another interval between lines.
    pub const fn every(what: &'static str, level: Level, every: Duration) -> Summary {
        Summary {
            what,
            level,
            every,
            registered: AtomicBool::new(false),
            keys: Mutex::new(Vec::new()),
        }
    }

    /// Counts one event of `key`. `example` describes it (peer, client id,
    /// topic, figures); it is called only when the event is logged or kept
    /// as the example of a stretch, so a flood costs no formatting.
    pub fn record(&'static self, key: &'static str, example: impl FnOnce() -> String) {
        self.record_n(key, 1, example);
    }

    /// Counts `n` events of `key` at once (a batch dropped together).
    pub fn record_n(&'static self, key: &'static str, n: u64, example: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        self.register();
        let now = Instant::now();
        let mut keys = lock(&self.keys);
        let index = match keys.iter().position(|k| k.key == key) {
            Some(i) => i,
            None if keys.len() < MAX_KEYS => {
                keys.push(Key {
                    key,
                    last_line: None,
                    pending: 0,
                    first: None,
                    example: String::new(),
                });
                keys.len() - 1
            }
            None => keys.len() - 1,
        };
        let k = &mut keys[index];
        if k.pending == 0 {
            k.first = Some(now);
            k.example = example();
        }
        k.pending += n;
        if k.last_line
            .is_none_or(|t| now.duration_since(t) >= self.every)
        {
            self.emit(k, now);
        }
    }

    /// Writes the pending line of every key whose interval has passed (all
    /// of them with `force`).
    fn flush(&self, now: Instant, force: bool) {
        let mut keys = lock(&self.keys);
        for k in keys.iter_mut() {
            let due = force
                || k.last_line
                    .is_none_or(|t| now.duration_since(t) >= self.every);
            if k.pending > 0 && due {
                self.emit(k, now);
            }
        }
    }

    fn emit(&self, k: &mut Key, now: Instant) {
        let count = k.pending;
        let over = k.first.map_or(Duration::ZERO, |f| now.duration_since(f));
        let over = format!("{:.1}s", over.as_secs_f64());
        let key = k.key;
        let example = k.example.as_str();
        match self.level {
            Level::Info => {
                tracing::info!(reason = key, count, over, example, "{}", self.what)
            }
            Level::Warn => {
                tracing::warn!(reason = key, count, over, example, "{}", self.what)
            }
            Level::Error => {
                tracing::error!(reason = key, count, over, example, "{}", self.what)
            }
        }
        k.pending = 0;
        k.first = None;
        k.example.clear();
        k.last_line = Some(now);
    }

    /// Events counted and not yet written, over all keys.
    pub fn pending(&self) -> u64 {
        lock(&self.keys).iter().map(|k| k.pending).sum()
    }

    fn register(&'static self) {
        if !self.registered.swap(true, Ordering::AcqRel) {
            lock(&REGISTRY).push(self);
        }
    }
}

/// Writes every summary line whose interval has passed. The gateway calls
/// this about once a second, so a stretch of events is reported within
/// [`Summary::every`] of its first event even if no further event comes.
pub fn flush_due() {
    flush(false);
}

/// Writes every pending line now (shutdown).
pub fn flush_all() {
    flush(true);
}

fn flush(force: bool) {
    let now = Instant::now();
    let summaries: Vec<&'static Summary> = lock(&REGISTRY).clone();
    for s in summaries {
        s.flush(now, force);
    }
}

#[cfg(test)]
mod tests;
