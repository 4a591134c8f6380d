//! What one logged-in client may do: its permissions (the ACL through
//! [`edge_auth::Authority`]) and its publish rates (`limits.publish_rate`,
//! `limits.publish_byte_rate`).
//!
//! A client over its rate is first held back: the connection stops
//! reading it until the tokens its publishes owe have come in, so TCP
//! pushes back on the client while its acks and deliveries still flow.
//! A client that stays over its rate for `limits.rate_grace` without a
//! break is disconnected (MQTT 5: reason 0x96, message rate too high).

use std::sync::Arc;
use std::time::Duration;

use edge_auth::{Principal, Security, TokenBucket};
use tokio::time::Instant;

use crate::error::Close;

#[derive(Debug)]
pub(crate) struct Access {
    security: Arc<Security>,
    who: Principal,
    client_id: Arc<str>,
    messages: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    /// Reading resumes at this instant (the client's debt is paid).
    held_until: Option<Instant>,
    /// Since when the client has been held back without a break.
    held_since: Option<Instant>,
}

impl Access {
    pub(crate) fn new(security: Arc<Security>, who: Principal, client_id: Arc<str>) -> Access {
        let now = std::time::Instant::now();
        let limits = security.client_limits;
        // A second's worth may come at once.
        let messages = limits
            .publish_rate
            .map(|rate| TokenBucket::new(rate, rate.max(1.0), now));
        let bytes = limits
            .publish_byte_rate
            .map(|rate| TokenBucket::new(rate as f64, rate as f64, now));
        Access {
            security,
            who,
            client_id,
            messages,
            bytes,
            held_until: None,
            held_since: None,
        }
    }

    pub(crate) fn user(&self) -> Option<&str> {
        self.who.user()
    }

    pub(crate) fn can_publish(&self, client_id: &str, topic: &str) -> bool {
        self.security
            .authority
            .can_publish(&self.who, client_id, topic)
    }

    pub(crate) fn can_subscribe(&self, client_id: &str, filter: &str) -> bool {
        self.security
            .authority
            .can_subscribe(&self.who, client_id, filter)
    }

    /// Whether reading is paused for the client's rate.
    pub(crate) fn held(&self) -> Option<Instant> {
        self.held_until.filter(|until| *until > Instant::now())
    }

    /// Charges one PUBLISH of `payload` bytes against the client's rates.
    pub(crate) fn charge(&mut self, payload: usize) -> Result<(), Close> {
        if self.messages.is_none() && self.bytes.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        let std_now = now.into_std();
        let mut wait = Duration::ZERO;
        if let Some(bucket) = &mut self.messages
            && let Err(w) = bucket.take(1.0, std_now)
        {
            wait = wait.max(w);
        }
        if let Some(bucket) = &mut self.bytes
            && let Err(w) = bucket.take(payload as f64, std_now)
        {
            wait = wait.max(w);
        }
        if wait.is_zero() {
            self.held_since = None;
            self.held_until = None;
            return Ok(());
        }
        let since = *self.held_since.get_or_insert(now);
        let grace = self.security.client_limits.rate_grace;
        if now.duration_since(since) + wait > grace {
            metrics::counter!("edge_rate_limited_total", "protocol" => "mqtt", "outcome" => "disconnected").increment(1);
            crate::logs::RATE_LIMITED.record("disconnected", || {
                format!(
                    "client_id={} user={:?} grace={grace:?}",
                    self.client_id,
                    self.who.user()
                )
            });
            return Err(Close::RateLimited(grace));
        }
        if self.held_until.is_none_or(|until| until <= now) {
            metrics::counter!("edge_rate_limited_total", "protocol" => "mqtt", "outcome" => "held")
                .increment(1);
            crate::logs::RATE_LIMITED.record("held", || {
                format!(
                    "client_id={} user={:?} wait={wait:?}",
                    self.client_id,
                    self.who.user()
                )
            });
        }
        self.held_until = Some(now + wait);
        Ok(())
    }
}
