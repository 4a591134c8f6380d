//! The budget of connections that have not completed CONNECT.
//!
//! A socket that never sends CONNECT costs a task, a file descriptor and a
//! buffer until `connect_timeout`. Such sockets are capped apart from
//! established clients (`max_connections`): at most `max_handshakes` in
//! all and `max_handshakes_per_source` per source address. At either limit
//! the *oldest* pending handshake is closed to make room for the new one,
//! rather than the new one refused: a real client sends CONNECT within a
//! round trip, so it completes long before a flood can push it out, while
//! idle sockets are the oldest by construction. Established clients are
//! never touched.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub(crate) struct Handshakes {
    max: usize,
    max_per_source: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    /// Pending handshakes, oldest first.
    queue: VecDeque<Entry>,
    per_source: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    source: IpAddr,
    evict: CancellationToken,
}

/// A pending handshake's place in the budget; dropping it (CONNECT read, or
/// the connection gone) frees the place.
#[derive(Debug)]
pub(crate) struct Handshake {
    id: u64,
    source: IpAddr,
    evicted: CancellationToken,
    budget: Arc<Handshakes>,
}

/// Why a pending handshake was closed to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Evicted {
    /// `max_handshakes` pending handshakes in all.
    Total,
    /// `max_handshakes_per_source` from this handshake's source address.
    PerSource,
}

impl Evicted {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Evicted::Total => "max_handshakes",
            Evicted::PerSource => "max_handshakes_per_source",
        }
    }
}

impl Handshakes {
    pub(crate) fn new(max: usize, max_per_source: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            max: max.max(1),
            max_per_source: max_per_source.max(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Registers a new connection from `source`; returns its place and the
    /// handshakes closed to make room for it.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> (Handshake, Vec<Evicted>) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut evicted = Vec::new();
        let from_source = inner.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.max_per_source
            && let Some(i) = inner.queue.iter().position(|e| e.source == source)
        {
            inner.remove_at(i);
            evicted.push(Evicted::PerSource);
        }
        while !inner.queue.is_empty() && inner.queue.len() >= self.max {
            inner.remove_at(0);
            evicted.push(Evicted::Total);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let token = CancellationToken::new();
        inner.queue.push_back(Entry {
            id,
            source,
            evict: token.clone(),
        });
        *inner.per_source.entry(source).or_insert(0) += 1;
        let handshake = Handshake {
            id,
            source,
            evicted: token,
            budget: Arc::clone(self),
        };
        (handshake, evicted)
    }

    /// Pending handshakes now (tests, metrics).
    pub(crate) fn pending(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue
            .len()
    }
}

impl Inner {
    fn remove_at(&mut self, i: usize) {
        if let Some(entry) = self.queue.remove(i) {
            entry.evict.cancel();
            self.forget_source(entry.source);
        }
    }

    fn forget_source(&mut self, source: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

impl Handshake {
    /// Resolves when this handshake was closed to make room for newer ones.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await;
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if self.evicted.is_cancelled() {
            // Already removed by the eviction.
            return;
        }
        let mut inner = self
            .budget
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = inner.queue.iter().position(|e| e.id == self.id) {
            inner.queue.remove(i);
            inner.forget_source(self.source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn the_oldest_handshake_makes_room_and_places_come_back() {
        let budget = Handshakes::new(3, 10);
        let (a, none) = budget.admit(ip(1));
        assert!(none.is_empty());
        let (b, _) = budget.admit(ip(2));
        let (c, _) = budget.admit(ip(3));
        let (d, evicted) = budget.admit(ip(4));
        assert_eq!(evicted, vec![Evicted::Total]);
        assert!(a.evicted.is_cancelled(), "the oldest goes");
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(budget.pending(), 3);
        drop(a);
        assert_eq!(
            budget.pending(),
            3,
            "an evicted handshake was already removed"
        );
        drop(b);
        assert_eq!(budget.pending(), 2);
        drop((c, d));
        assert_eq!(budget.pending(), 0);
        assert!(lock(&budget).per_source.is_empty());
    }

    #[test]
    fn one_source_only_pushes_out_its_own_handshakes() {
        let budget = Handshakes::new(100, 2);
        let (other, _) = budget.admit(ip(1));
        let (f1, _) = budget.admit(ip(9));
        let (f2, _) = budget.admit(ip(9));
        let (_f3, evicted) = budget.admit(ip(9));
        assert_eq!(evicted, vec![Evicted::PerSource]);
        assert!(f1.evicted.is_cancelled());
        assert!(!f2.evicted.is_cancelled());
        assert!(!other.evicted.is_cancelled(), "another source is untouched");
        assert_eq!(lock(&budget).per_source.get(&ip(9)), Some(&2));
    }

    fn lock(b: &Handshakes) -> std::sync::MutexGuard<'_, Inner> {
        b.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
