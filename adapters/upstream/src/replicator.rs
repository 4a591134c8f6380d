//! One forwarder per upstream: cursor → publish → confirm → cursor.
//!
//! Invariants:
//! - Records are published in seq order on one channel, at most
//!   `max_in_flight` unconfirmed.
//! - The durable cursor moves only over the contiguous prefix of records
//!   that are done: confirmed, parked (returned as unroutable), expired or
//!   matched by no route of this upstream. A parked record is durable in
//!   the dead-letter table before the cursor passes it.
//! - Any link trouble (nack, channel or connection error, watchdog) drops
//!   the link; after the reconnect forwarding restarts from the first
//!   record not done, with the same message ids.
//! - After each connect the exchanges of the routes are checked (passive
//!   declare); the records of a route whose exchange is missing are parked
//!   (`exchange "x" not found`) so the other routes keep flowing. An
//!   exchange deleted while connected closes the channel (404): the link is
//!   rebuilt and the check after the reconnect parks its records. Before
//!   parking for a missing exchange, the exchange is checked again when the
//!   last check is over a second old; the checks run beside the loop, so
//!   confirms are collected meanwhile.
//! - A parked record carries `x-edge-upstream` (the upstream that parked
//!   it) and `x-edge-seq` (its first seq). Replayed, it is forwarded only by
//!   that upstream, with its original message id; the others pass it as
//!   done (see `convert.rs`). The parks of one settled prefix are queued
//!   together and share a group commit.
//! - The window holds at most `max_in_flight` pending records and a bounded
//!   number of other slots (runs of skipped records take one slot), so
//!   memory does not grow with the backlog.
//! - While the link is down the cursor still moves over leading records no
//!   route of this upstream matches (bounded work per second).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use edge_config::UpstreamConfig;
use edge_core::Routes;
use edge_store::{Seq, Store};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::connector::{Backoff, Connector};
use crate::cursor::CursorFlusher;
use crate::error::LinkError;
use crate::forwarder::{End, Forwarder};
use crate::health::{LinkState, LinkStatus};
use crate::lanes::{Lane, lane_cursor};
use crate::metrics::{UpstreamMetrics, spawn_reporter};

/// Forwards the log to one upstream. See the module documentation.
#[derive(Debug)]
pub struct Replicator {
    config: UpstreamConfig,
    routes: Routes,
    store: Store,
    gateway_id: String,
    link: LinkStatus,
    progress: Option<edge_core::Progress>,
}

impl Replicator {
    /// `routes` are this upstream's routes (others are ignored); the cursor
    /// is named after the upstream.
    pub fn new(
        config: UpstreamConfig,
        routes: Routes,
        store: Store,
        gateway_id: String,
    ) -> Replicator {
        let routes = routes.of_upstream(&config.name);
        Replicator {
            routes,
            store,
            gateway_id,
            link: LinkStatus::new(&config.name),
            config,
            progress: None,
        }
    }

    /// Publishes the forwarder's position (the first seq not done) and its
    /// lanes' in `progress`, for routes with `ack = "upstream-confirmed"`.
    pub fn with_progress(mut self, progress: edge_core::Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// A cheap handle telling the link's state.
    pub fn link(&self) -> LinkStatus {
        self.link.clone()
    }

    /// Runs until `shutdown` is cancelled: connect, forward, reconnect forever.
    /// On shutdown waits briefly for outstanding confirms, persists the
    /// cursor and closes the link.
    pub async fn run(self, shutdown: CancellationToken) {
        let name = self.config.name.clone();
        let metrics = UpstreamMetrics::new(&name);
        metrics.link_up(false);
        let Some(own) = initial_cursor(&self.store, &name, &shutdown).await else {
            return;
        };
        let Some(lanes) = self.lanes(own, &shutdown).await else {
            return;
        };
        let start = lanes.iter().map(|l| l.position).min().unwrap_or(own);
        info!(upstream = %name, cursor = start, routes = self.routes.iter().count(),
            lanes = lanes.len(), "upstream forwarder starting");
        let position = Arc::new(AtomicU64::new(start));
        let reporter = spawn_reporter(
            self.store.clone(),
            name.clone(),
            position.clone(),
            shutdown.clone(),
        );
        let mut forwarder = Forwarder {
            name: name.clone(),
            gateway_id: self.gateway_id.clone(),
            routes: self.routes,
            store: self.store.clone(),
            max_in_flight: self.config.max_in_flight.get(),
            confirm_timeout: self.config.confirm_timeout,
            metrics,
            status: self.link.clone(),
            replay_cap: self.config.max_replay_rate,
            progress: self.progress.as_ref().and_then(|p| p.sender(&name)),
            return_check: self.config.reconnect_max,
            flusher: CursorFlusher::spawn(self.store.clone(), name.clone(), own),
            position,
            lanes,
        };
        forwarder.flusher.set(start);
        for lane in &forwarder.lanes {
            if let Some(progress) = &lane.progress {
                progress.send_replace(lane.position);
            }
        }
        if let Some(progress) = &forwarder.progress {
            progress.send_replace(start);
        }
        let mut connector = Connector::new(&self.config, &self.gateway_id, self.link.clone());
        // While the link is down the forwarder still moves its cursor over
        // records none of its routes take (see `Forwarder::while_down`).
        let mut next = forwarder.while_down(connector.connect(&shutdown)).await;
        while let Some(link) = next.take() {
            self.link.link_up();
            forwarder.metrics.link_up(true);
            let outcome = forwarder.session(&link, &mut connector, &shutdown).await;
            forwarder.metrics.link_up(false);
            match outcome {
                Ok(End::Shutdown) => {
                    self.link.set(LinkState::Down);
                    link.close("edge-gateway shutting down").await;
                    info!(upstream = %name, cursor = forwarder.position(), "upstream link closed");
                    break;
                }
                Ok(End::Return(first)) => {
                    info!(upstream = %name, from = %link.uri, to = %first.uri,
                        resume_from = forwarder.position(), "returning to the first node");
                    let from = link.node;
                    link.close("edge-gateway returns to the first node").await;
                    connector.returned(&first, from);
                    next = Some(*first);
                }
                Err(error) => {
                    if error.is_nack() {
                        forwarder.metrics.nack();
                    }
                    // A stall (the watchdog) stays reported until progress.
                    if !matches!(error, LinkError::Watchdog { .. }) {
                        self.link.set(LinkState::Down);
                    }
                    warn!(upstream = %name, uri = %link.uri, %error,
                        resume_from = forwarder.position(),
                        "upstream link dropped; reconnecting");
                    connector.link_down(link.node);
                    link.close("edge-gateway link error").await;
                    if forwarder.while_down(connector.pause(&shutdown)).await {
                        next = forwarder.while_down(connector.connect(&shutdown)).await;
                    }
                }
            }
        }
        self.link.set(LinkState::Down);
        forwarder.flusher.finish().await;
        for lane in forwarder.lanes {
            lane.finish().await;
        }
        let _ = reporter.await;
    }

    /// The lanes (`lanes.rs`), each from the higher of its cursor and the
    /// upstream's `own`; none on shutdown.
    async fn lanes(&self, own: Seq, shutdown: &CancellationToken) -> Option<Vec<Lane>> {
        let name = &self.config.name;
        let priorities = self.routes.priorities(name);
        if priorities.len() <= 1 {
            return Some(vec![Lane {
                priority: priorities.first().copied().unwrap_or(0),
                position: own,
                flusher: None,
                progress: None,
            }]);
        }
        let mut lanes = Vec::with_capacity(priorities.len());
        for priority in priorities {
            let cursor = lane_cursor(name, priority, &self.routes);
            let stored = initial_cursor(&self.store, &cursor, shutdown).await?;
            let position = stored.max(own);
            let flusher = CursorFlusher::spawn(self.store.clone(), cursor, stored);
            // A new lane cursor sits at the log's first record: up to the
            // upstream's, so it does not hold retirement back.
            flusher.set(position);
            lanes.push(Lane {
                priority,
                position,
                flusher: Some(flusher),
                progress: self
                    .progress
                    .as_ref()
                    .and_then(|p| p.lane_sender(name, priority)),
            });
        }
        Some(lanes)
    }
}

async fn initial_cursor(store: &Store, name: &str, shutdown: &CancellationToken) -> Option<Seq> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let (s, n) = (store.clone(), name.to_string());
        let error = match tokio::task::spawn_blocking(move || s.cursor(&n)).await {
            Ok(Ok(seq)) => return Some(seq),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        error!(upstream = %name, %error, "cannot read the upstream cursor; retrying");
        let delay = backoff.next_delay(&mut rand::rng());
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
