//! Route exchanges missing on the broker: checked after each connect and
//! again while connected, so their routes park, then resume.

use std::collections::BTreeSet;
use std::time::Instant;

use edge_store::Entry;
use tracing::{error, info, warn};

use super::{Forwarder, PARK_RECHECK, Session, route_of_entry};
use crate::connector::Link;
use crate::exchanges::{self, CHECK_TIMEOUT};

impl Forwarder {
    /// After a connect: declares the exchanges of routes with
    /// `declare_exchange`, then finds which route exchanges are missing.
    /// Logged at ERROR once per route and connect; their records are parked.
    pub(super) async fn check_exchanges(&self, link: &Link) -> BTreeSet<String> {
        self.declare_exchanges(link).await;
        let exchanges = self.routes.iter().map(|r| r.exchange.clone()).collect();
        let missing = exchanges::missing(self.name.clone(), &link.connection, exchanges).await;
        for route in self.routes.iter().filter(|r| missing.contains(&r.exchange)) {
            error!(upstream = %self.name, route = %route.name, exchange = %route.exchange,
                "exchange not found on the upstream broker; the route's messages are parked \
                 in the dead-letter table until it exists");
        }
        missing
    }

    /// Declares each exchange a route asks for, once per connect. A refusal
    /// is logged at ERROR with what to fix and counted
    /// (`edge_upstream_declare_failures_total{upstream,exchange,reason}`);
    /// the check that follows then tells whether the exchange exists anyway.
    async fn declare_exchanges(&self, link: &Link) {
        let mut declared = BTreeSet::new();
        for route in self.routes.iter() {
            let Some(kind) = route.declare_exchange else {
                continue;
            };
            if !declared.insert(route.exchange.clone()) {
                continue;
            }
            let outcome =
                exchanges::declare(&link.connection, &route.exchange, kind, CHECK_TIMEOUT).await;
            let Err(error) = outcome else {
                info!(upstream = %self.name, exchange = %route.exchange, kind = kind.as_str(),
                    "exchange declared on the upstream broker");
                continue;
            };
            metrics::counter!("edge_upstream_declare_failures_total",
                "upstream" => self.name.clone(), "exchange" => route.exchange.clone(),
                "reason" => error.reason())
            .increment(1);
            match &error {
                exchanges::DeclareError::AccessRefused(_) => error!(upstream = %self.name,
                    route = %route.name, exchange = %route.exchange, %error,
                    "cannot declare the exchange: the upstream user lacks the configure \
                     permission on it (grant it, or create the exchange centrally and remove \
                     declare_exchange); forwarding to it if it exists"),
                exchanges::DeclareError::Mismatch(_) => error!(upstream = %self.name,
                    route = %route.name, exchange = %route.exchange, kind = kind.as_str(),
                    %error, "the exchange exists with another type or arguments than \
                     declare_exchange says; forwarding to it as it is"),
                exchanges::DeclareError::Other(_) => warn!(upstream = %self.name,
                    exchange = %route.exchange, %error,
                    "cannot declare the exchange; checking whether it exists"),
            }
        }
    }

    /// While connected: starts a check of the missing exchanges (unless one
    /// runs); [`Forwarder::checked`] takes its outcome.
    pub(super) fn start_check<'l>(&self, link: &'l Link, s: &mut Session<'l>) {
        if s.check.is_none() {
            let check = exchanges::missing(self.name.clone(), &link.connection, s.missing.clone());
            s.check = Some(Box::pin(check));
        }
    }

    /// The outcome of a check: exchanges that exist now are forwarded to again.
    pub(super) fn checked(&self, s: &mut Session<'_>, still: BTreeSet<String>) {
        s.check = None;
        s.checked_at = Instant::now();
        for exchange in s.missing.difference(&still) {
            info!(upstream = %self.name, exchange = %exchange,
                "exchange exists now; forwarding its routes again");
        }
        s.missing = still;
    }

    /// Whether `record` has to wait for a check before it is parked for a
    /// missing exchange: one is in progress, or the last is older than
    /// [`PARK_RECHECK`] (then one starts).
    pub(super) fn must_wait_for_check<'l>(
        &self,
        link: &'l Link,
        s: &mut Session<'l>,
        lane: usize,
        entry: &Entry,
    ) -> bool {
        if s.missing.is_empty() {
            return false;
        }
        let route = route_of_entry(&self.routes, &self.name, entry);
        // Another lane's record is only passed here: no check needed.
        let Some(route) = route.filter(|r| self.in_lane(lane, r)) else {
            return false;
        };
        if !s.missing.contains(&route.exchange) {
            return false;
        }
        if s.check.is_none() && s.checked_at.elapsed() < PARK_RECHECK {
            return false;
        }
        self.start_check(link, s);
        true
    }
}
