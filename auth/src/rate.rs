//! A token bucket for rate limits (per-client publish rates, per-source
//! connection rates).
//!
//! Invariant: `tokens <= burst`; `tokens` may be negative after [`TokenBucket::take`]
//! owed tokens, and refills at `rate` per second from `last`.

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
///
/// A rate that is not a positive number (zero, negative, NaN) or is infinite
/// means "unlimited": every take succeeds.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        let burst = if burst.is_nan() { 0.0 } else { burst.max(0.0) };
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` tokens; Ok(()) or Err(wait) = how long until they would be
    /// available (tokens are then owed: the bucket goes negative, so the
    /// caller sleeps `wait` and proceeds).
    pub fn take(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        if self.unlimited() {
            return Ok(());
        }
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Ok(())
        } else {
            Err(Duration::try_from_secs_f64(-self.tokens / self.rate).unwrap_or(Duration::MAX))
        }
    }

    /// Takes `n` tokens if they are there now; otherwise takes nothing and
    /// returns false (for refusing work rather than delaying it).
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        if self.unlimited() {
            return true;
        }
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Whether the bucket has refilled to `burst` by `now` (nothing owed, nothing used).
    pub fn is_full(&self, now: Instant) -> bool {
        if self.unlimited() {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + self.rate * elapsed >= self.burst
    }

    fn unlimited(&self) -> bool {
        self.rate.is_nan() || self.rate <= 0.0 || self.rate.is_infinite()
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let elapsed = (now - self.last).as_secs_f64();
            self.tokens = (self.tokens + self.rate * elapsed).min(self.burst);
            self.last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        for _ in 0..3 {
            assert_eq!(b.take(1.0, t0), Ok(()));
        }
        // The fourth is owed: 1 token at 10/s = 100 ms.
        let wait = b.take(1.0, t0).expect_err("bucket is empty");
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // After the owed time has passed the debt is paid and the bucket is at zero.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(1.0, t1).is_err());
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!(b.take(0.0, t2), Ok(()));
    }

    #[test]
    fn owed_tokens_accumulate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        assert_eq!(b.take(100.0, t0), Ok(()));
        let first = b.take(50.0, t0).expect_err("empty");
        let second = b.take(50.0, t0).expect_err("still owed");
        assert!((first.as_secs_f64() - 0.5).abs() < 1e-9);
        assert!((second.as_secs_f64() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn refill_is_capped_at_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1.0, 2.0, t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(b.is_full(later));
        assert_eq!(b.take(2.0, later), Ok(()));
        assert!(b.take(1.0, later).is_err());
    }

    #[test]
    fn try_take_takes_nothing_when_short() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1.0, 1.0, t0);
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0 + Duration::from_millis(999)));
        assert!(b.try_take(1.0, t0 + Duration::from_secs(1)));
        assert!(!b.is_full(t0 + Duration::from_secs(1)));
        assert!(b.is_full(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn clock_going_back_is_ignored() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = TokenBucket::new(1.0, 1.0, t0);
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0 - Duration::from_secs(5)));
        assert!(b.try_take(1.0, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn non_positive_or_infinite_rate_is_unlimited() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut b = TokenBucket::new(rate, 1.0, t0);
            for _ in 0..1000 {
                assert_eq!(b.take(1.0, t0), Ok(()));
            }
        }
    }
}

/// What [`Pacer::charge`] decided about one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Within the rates.
    Go,
    /// Over them: stop reading the client until this instant. `first` is
    /// true when this starts a hold (for counting holds, not publishes).
    Held { until: Instant, first: bool },
    /// Over them for longer than the grace without a break.
    OverGrace,
}

/// A client's publish rates (messages and payload bytes a second) and how
/// long it has been over them without a break.
#[derive(Debug)]
pub struct Pacer {
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    grace: Duration,
    held_until: Option<Instant>,
    held_since: Option<Instant>,
}

impl Pacer {
    /// `None` for a rate means unlimited; a second's worth may come at once.
    pub fn new(messages: Option<f64>, bytes: Option<u64>, grace: Duration, now: Instant) -> Pacer {
        Pacer {
            messages: messages.map(|rate| TokenBucket::new(rate, rate.max(1.0), now)),
            bytes: bytes.map(|rate| TokenBucket::new(rate as f64, rate as f64, now)),
            grace,
            held_until: None,
            held_since: None,
        }
    }

    /// Whether the client is held back at `now`, and until when.
    pub fn held_at(&self, now: Instant) -> Option<Instant> {
        self.held_until.filter(|until| *until > now)
    }

    /// Whether the client is held back now, and until when. Reads the
    /// clock only while a hold is set: connections ask on every turn.
    pub fn held(&self) -> Option<Instant> {
        self.held_until.filter(|until| *until > Instant::now())
    }

    /// Charges one publish of `payload` bytes.
    pub fn charge(&mut self, payload: usize, now: Instant) -> Pace {
        if self.messages.is_none() && self.bytes.is_none() {
            return Pace::Go;
        }
        let mut wait = Duration::ZERO;
        if let Some(bucket) = &mut self.messages
            && let Err(w) = bucket.take(1.0, now)
        {
            wait = wait.max(w);
        }
        if let Some(bucket) = &mut self.bytes
            && let Err(w) = bucket.take(payload as f64, now)
        {
            wait = wait.max(w);
        }
        if wait.is_zero() {
            self.held_since = None;
            self.held_until = None;
            return Pace::Go;
        }
        let since = *self.held_since.get_or_insert(now);
        if now.duration_since(since) + wait > self.grace {
            return Pace::OverGrace;
        }
        let first = self.held_until.is_none_or(|until| until <= now);
        let until = now + wait;
        self.held_until = Some(until);
        Pace::Held { until, first }
    }
}

#[cfg(test)]
mod pacer_tests {
    use super::*;

    #[test]
    fn a_client_within_its_rate_goes_a_burst_is_held_a_flood_is_over_grace() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Some(10.0), None, Duration::from_secs(2), t0);
        // A second's worth at once.
        for _ in 0..10 {
            assert_eq!(p.charge(100, t0), Pace::Go);
        }
        let Pace::Held { until, first } = p.charge(100, t0) else {
            panic!("the 11th message in the same instant is held");
        };
        assert!(first && until > t0);
        assert!(p.held_at(t0).is_some() && p.held_at(until).is_none());
        // Paid off and slow again: goes, and the hold is over.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(p.charge(100, later), Pace::Go);
        // Always over: past the grace it is disconnected.
        let mut now = later;
        let mut outcome = Pace::Go;
        for _ in 0..100 {
            outcome = p.charge(100, now);
            if outcome == Pace::OverGrace {
                break;
            }
            now += Duration::from_millis(50);
        }
        assert_eq!(outcome, Pace::OverGrace);
    }

    #[test]
    fn byte_rates_count_payload_and_no_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut p = Pacer::new(None, Some(1000), Duration::from_secs(10), t0);
        assert_eq!(p.charge(1000, t0), Pace::Go);
        assert!(matches!(p.charge(1000, t0), Pace::Held { .. }));
        let mut free = Pacer::new(None, None, Duration::from_secs(1), t0);
        for _ in 0..10_000 {
            assert_eq!(free.charge(1 << 20, t0), Pace::Go);
        }
    }
}
