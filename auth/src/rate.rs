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
