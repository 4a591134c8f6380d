//! What one logged-in client may do: its permissions (the ACL through
//! [`edge_auth::Authority`]) and its publish rates (`limits.publish_rate`,
//! `limits.publish_byte_rate`).
//!
//! A client over its rate is first held back: the connection stops
//! reading it until the tokens its publishes owe have come in, so TCP
//! pushes back on the client while its acks and deliveries still flow.
//! A client that stays over its rate for `limits.rate_grace` without a
//! break is disconnected (MQTT 5: reason 0x96, message rate too high).

use edge_auth::{Pace, Pacer, Principal, Security};
use std::sync::Arc;
use tokio::time::Instant;

use crate::error::Close;

#[derive(Debug)]
pub(crate) struct Access {
    security: Arc<Security>,
    who: Principal,
    client_id: Arc<str>,
    pacer: Pacer,
}

impl Access {
    pub(crate) fn new(security: Arc<Security>, who: Principal, client_id: Arc<str>) -> Access {
        let limits = security.client_limits;
        let pacer = Pacer::new(
            limits.publish_rate,
            limits.publish_byte_rate,
            limits.rate_grace,
            std::time::Instant::now(),
        );
        Access {
            security,
            who,
            client_id,
            pacer,
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

    /// A resumed session keeps only what this client may read now: the ACL
    /// may have changed since, or another user may be using the client
    /// id. Filters it may not read are dropped; messages queued under them
    /// are skipped when the backlog is read (`Session::fill_from_store`).
    pub(crate) async fn prune_resumed(
        &self,
        subscriber: &edge_core::Subscriber,
    ) -> Result<(), edge_core::SessionError> {
        for filter in subscriber.filters() {
            if self.can_subscribe(&self.client_id, &filter) {
                continue;
            }
            metrics::counter!("edge_acl_denied_total", "protocol" => "mqtt", "action" => "resumed_subscription").increment(1);
            crate::logs::DENIED.record("resumed_subscription", || {
                format!(
                    "client_id={:?} user={:?} filter={filter}: dropped from the resumed session",
                    self.client_id,
                    self.who.user()
                )
            });
            subscriber.unsubscribe(&filter).await?;
        }
        Ok(())
    }

    /// Until when reading is paused for the client's rate.
    pub(crate) fn held(&self) -> Option<Instant> {
        self.pacer.held().map(Instant::from_std)
    }

    /// Charges one PUBLISH of `payload` bytes against the client's rates.
    pub(crate) fn charge(&mut self, payload: usize) -> Result<(), Close> {
        match self.pacer.charge(payload, std::time::Instant::now()) {
            Pace::Go => Ok(()),
            Pace::Held { until, first } => {
                if first {
                    metrics::counter!("edge_rate_limited_total", "protocol" => "mqtt", "outcome" => "held").increment(1);
                    crate::logs::RATE_LIMITED.record("held", || {
                        format!(
                            "client_id={} user={:?} wait={:?}",
                            self.client_id,
                            self.who.user(),
                            until.saturating_duration_since(std::time::Instant::now())
                        )
                    });
                }
                Ok(())
            }
            Pace::OverGrace => {
                let grace = self.security.client_limits.rate_grace;
                metrics::counter!("edge_rate_limited_total", "protocol" => "mqtt", "outcome" => "disconnected").increment(1);
                crate::logs::RATE_LIMITED.record("disconnected", || {
                    format!(
                        "client_id={} user={:?} grace={grace:?}",
                        self.client_id,
                        self.who.user()
                    )
                });
                Err(Close::RateLimited(grace))
            }
        }
    }
}
