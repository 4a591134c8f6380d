//! Per-source limits against misbehaving clients, shared by the MQTT and
//! AMQP listeners: concurrent connections, connection rate, and a doubling
//! back-off after failed logins. Keyed by source IP; loopback is not exempt.
//!
//! Memory bound: an entry with no connections, a full bucket and no back-off
//! running holds nothing worth keeping and is removed by a lazy prune (every
//! [`PRUNE_EVERY`] admissions, or when the map outgrows its high-water mark).
//! A pruned source's back-off level is forgotten once its back-off has run out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::rate::TokenBucket;

/// Admissions between two prunes of idle entries.
pub const PRUNE_EVERY: u64 = 1024;
/// The map may grow to this many entries before a size-triggered prune.
const MIN_HIGH_WATER: usize = 4096;

/// The per-source limits.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardLimits {
    /// Concurrent connections one source may hold.
    pub max_connections_per_source: usize,
    /// New connections per second per source (token bucket rate, burst =
    /// max(1, 2 × rate)). Zero, negative, NaN or infinite: no rate limit.
    pub connections_per_second_per_source: f64,
    /// First back-off after a failed login (e.g. 1 s); doubled per further failure.
    pub login_backoff_base: Duration,
    /// Cap of the login back-off (e.g. 60 s).
    pub login_backoff_max: Duration,
    /// Consecutive failed logins a source may make before the back-off
    /// starts: a mistyped password or a misconfigured local application
    /// must not lock every client of that address out at once.
    pub login_failures_allowed: u32,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The source already holds `max_connections_per_source` connections.
    #[error("the source holds limits.max_connections_per_source connections")]
    TooManyConnections,
    /// The source opens connections faster than `connections_per_second_per_source`.
    #[error("the source opens connections faster than limits.connection_rate_per_source")]
    ConnectionRate,
    /// A failed login's back-off is still running for this source.
    #[error("a failed login's back-off runs for {remaining:?} more (limits.login_backoff)")]
    LoginBackoff {
        /// Time left until the back-off ends.
        remaining: Duration,
    },
}

impl Refusal {
    /// The limit's name, for logs and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooManyConnections => "max_connections_per_source",
            Refusal::ConnectionRate => "connection_rate",
            Refusal::LoginBackoff { .. } => "login_backoff",
        }
    }
}

#[derive(Debug)]
struct Entry {
    connections: usize,
    bucket: TokenBucket,
    /// The back-off last imposed (zero: none since the last success).
    backoff: Duration,
    /// When the running back-off ends (None: none imposed yet).
    backoff_until: Option<Instant>,
    /// Failed logins not yet forgotten (see [`SourceGuard::quiet`]).
    failures: u32,
    /// The latest failed login.
    last_failure: Option<Instant>,
}

impl Entry {
    fn idle(&self, now: Instant, quiet: Duration) -> bool {
        self.connections == 0
            && self.bucket.is_full(now)
            && self.backoff_until.is_none_or(|until| until <= now)
            && self.forgotten(now, quiet)
    }

    /// No failed login for `quiet`: the failures are forgotten.
    fn forgotten(&self, now: Instant, quiet: Duration) -> bool {
        self.last_failure
            .is_none_or(|at| now.saturating_duration_since(at) > quiet)
    }
}

/// Failures are forgotten after this long without one, at the least.
const MIN_QUIET: Duration = Duration::from_secs(60);

/// The key a source is counted under: an IPv4 address (IPv4-mapped IPv6
/// included) as it is, an IPv6 address by its /64, which is what one
/// host or site holds (it could take a new address for every connection).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) if v6.is_loopback() => IpAddr::V6(v6),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
    }
}

#[derive(Debug)]
struct State {
    entries: HashMap<IpAddr, Entry>,
    admissions: u64,
    high_water: usize,
}

/// Counts connections, connection rate and login failures per source IP.
#[derive(Debug)]
pub struct SourceGuard {
    limits: GuardLimits,
    state: Mutex<State>,
}

/// One admitted connection; dropping it gives the source's slot back.
pub struct SourcePermit {
    guard: Arc<SourceGuard>,
    ip: IpAddr,
}

impl std::fmt::Debug for SourcePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourcePermit")
            .field("ip", &self.ip)
            .finish()
    }
}

impl SourcePermit {
    /// The source this permit counts against.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for SourcePermit {
    fn drop(&mut self) {
        let mut state = self.guard.lock();
        if let Some(entry) = state.entries.get_mut(&self.ip) {
            entry.connections = entry.connections.saturating_sub(1);
        }
    }
}

impl SourceGuard {
    /// A guard with no sources yet.
    pub fn new(limits: GuardLimits) -> Arc<SourceGuard> {
        Arc::new(SourceGuard {
            limits,
            state: Mutex::new(State {
                entries: HashMap::new(),
                admissions: 0,
                high_water: MIN_HIGH_WATER,
            }),
        })
    }

    /// At accept: counts the connection for `ip` until the permit drops.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<SourcePermit, Refusal> {
        let ip = source_key(ip);
        let quiet = self.quiet();
        let mut state = self.lock();
        state.admissions = state.admissions.wrapping_add(1);
        if state.admissions.is_multiple_of(PRUNE_EVERY) || state.entries.len() >= state.high_water {
            state.entries.retain(|_, e| !e.idle(now, quiet));
            state.high_water = MIN_HIGH_WATER.max(state.entries.len().saturating_mul(2));
        }
        let entry = state
            .entries
            .entry(ip)
            .or_insert_with(|| self.new_entry(now));
        if let Some(until) = entry.backoff_until
            && until > now
        {
            return Err(Refusal::LoginBackoff {
                remaining: until - now,
            });
        }
        if entry.connections >= self.limits.max_connections_per_source {
            return Err(Refusal::TooManyConnections);
        }
        if !entry.bucket.try_take(1.0, now) {
            return Err(Refusal::ConnectionRate);
        }
        entry.connections += 1;
        Ok(SourcePermit {
            guard: Arc::clone(self),
            ip,
        })
    }

    /// After a failed login from ip: beyond the allowed failures, doubles
    /// its back-off (base, 2*base, ... up to max); while it runs, admit()
    /// refuses with LoginBackoff. Returns the back-off now in force.
    ///
    /// A successful login does not reset the count (an attacker with an
    /// account of its own, or anonymous access, could otherwise guess
    /// forever); failures are forgotten after [`SourceGuard::quiet`]
    /// without one.
    pub fn login_failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let ip = source_key(ip);
        let limits = &self.limits;
        let quiet = self.quiet();
        let mut state = self.lock();
        let entry = state
            .entries
            .entry(ip)
            .or_insert_with(|| self.new_entry(now));
        if entry.forgotten(now, quiet) {
            entry.failures = 0;
            entry.backoff = Duration::ZERO;
        }
        entry.last_failure = Some(now);
        entry.failures = entry.failures.saturating_add(1);
        if entry.failures <= limits.login_failures_allowed {
            return Duration::ZERO;
        }
        let next = if entry.backoff.is_zero() {
            limits.login_backoff_base
        } else {
            entry.backoff.saturating_mul(2)
        };
        let backoff = next.min(limits.login_backoff_max);
        entry.backoff = backoff;
        entry.backoff_until = Some(now.checked_add(backoff).unwrap_or(now));
        backoff
    }

    /// How long a source must go without a failed login for its failures
    /// to be forgotten: twice the longest back-off, at least a minute.
    pub fn quiet(&self) -> Duration {
        self.limits
            .login_backoff_max
            .saturating_mul(2)
            .max(MIN_QUIET)
    }

    /// Entries held (for a gauge and tests).
    pub fn sources(&self) -> usize {
        self.lock().entries.len()
    }

    fn new_entry(&self, now: Instant) -> Entry {
        let rate = self.limits.connections_per_second_per_source;
        let burst = (2.0 * rate).max(1.0);
        Entry {
            connections: 0,
            bucket: TokenBucket::new(rate, burst, now),
            backoff: Duration::ZERO,
            backoff_until: None,
            failures: 0,
            last_failure: None,
        }
    }

    /// The state; a panic while it was held left only counters behind, so a
    /// poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests;
