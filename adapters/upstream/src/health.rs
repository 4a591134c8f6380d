//! Health as forward progress: what an upstream's link is doing, for
//! `/healthz`, the metrics and the logs.
//!
//! - `down`: no link (connecting, or waiting to retry).
//! - `up`: a link is up and the backlog moves (or there is none).
//! - `stalled`: there is something to forward and nothing was confirmed
//!   for `confirm_timeout`, though the link looked up. The watchdog then
//!   drops the link; the state stays `stalled` through the reconnect
//!   attempts that time out (a path that swallows packets without FIN or
//!   RST looks exactly like that) and ends with the next confirm (`up`), a
//!   link with nothing to forward (`up`) or a connect attempt that fails
//!   outright (`down`).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use metrics::Gauge;

/// The state of one upstream link; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Down,
    Up,
    Stalled,
}

impl LinkState {
    pub const ALL: [LinkState; 3] = [LinkState::Down, LinkState::Up, LinkState::Stalled];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Up => "up",
            LinkState::Stalled => "stalled",
        }
    }

    fn from_u8(v: u8) -> LinkState {
        match v {
            1 => LinkState::Up,
            2 => LinkState::Stalled,
            _ => LinkState::Down,
        }
    }
}

/// The state of an upstream's link and the node it is on; cheap to clone,
/// shared by the forwarder (writer) and the telemetry endpoint (reader).
/// Each change is mirrored in `edge_upstream_state{upstream, state}` (1 for
/// the current state, 0 for the others).
#[derive(Debug, Clone)]
pub struct LinkStatus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: AtomicU8,
    /// `host:port` of the node linked to (or last tried).
    node: Mutex<String>,
    gauges: [Gauge; 3],
}

impl LinkStatus {
    pub fn new(upstream: &str) -> LinkStatus {
        LinkStatus::with_gauges(LinkState::ALL.map(|state| {
            metrics::gauge!("edge_upstream_state",
                "upstream" => upstream.to_string(), "state" => state.as_str())
        }))
    }

    /// The link of a downstream (its own connection to its upstream's
    /// broker), mirrored in `edge_downstream_state{downstream, state}`. A
    /// downstream's link is `up` or `down`: it never stalls.
    pub fn downstream(downstream: &str) -> LinkStatus {
        LinkStatus::with_gauges(LinkState::ALL.map(|state| {
            metrics::gauge!("edge_downstream_state",
                "downstream" => downstream.to_string(), "state" => state.as_str())
        }))
    }

    fn with_gauges(gauges: [Gauge; 3]) -> LinkStatus {
        let status = LinkStatus {
            inner: Arc::new(Inner {
                state: AtomicU8::new(LinkState::Down as u8),
                node: Mutex::new(String::new()),
                gauges,
            }),
        };
        status.publish(LinkState::Down);
        status
    }

    pub fn state(&self) -> LinkState {
        LinkState::from_u8(self.inner.state.load(Ordering::Relaxed))
    }

    /// A link is up (possibly stalled).
    pub fn is_up(&self) -> bool {
        self.state() != LinkState::Down
    }

    /// The node linked to, or last tried; empty before the first attempt.
    pub fn node(&self) -> String {
        self.inner
            .node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_node(&self, node: &str) {
        let mut current = self
            .inner
            .node
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *current != node {
            node.clone_into(&mut current);
        }
    }

    /// Sets the state; returns the one before.
    pub(crate) fn set(&self, state: LinkState) -> LinkState {
        let before = LinkState::from_u8(self.inner.state.swap(state as u8, Ordering::Relaxed));
        if before != state {
            self.publish(state);
        }
        before
    }

    /// A link came up: `up`, unless it is stalled (then it stays so until
    /// it proves itself with a confirm).
    pub(crate) fn link_up(&self) {
        let _ = self.inner.state.compare_exchange(
            LinkState::Down as u8,
            LinkState::Up as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.publish(self.state());
    }

    /// Forward progress (a confirm, or nothing left to forward): a stalled
    /// link is up again. True when it was stalled.
    pub(crate) fn progress(&self) -> bool {
        let was_stalled = self
            .inner
            .state
            .compare_exchange(
                LinkState::Stalled as u8,
                LinkState::Up as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok();
        if was_stalled {
            self.publish(LinkState::Up);
        }
        was_stalled
    }

    /// A connect attempt failed: `down`, unless it timed out on a stalled
    /// link (the path still swallows what is sent).
    pub(crate) fn attempt_failed(&self, timed_out: bool) {
        if !(timed_out && self.state() == LinkState::Stalled) {
            self.set(LinkState::Down);
        }
    }

    fn publish(&self, state: LinkState) {
        for (gauge, s) in self.inner.gauges.iter().zip(LinkState::ALL) {
            gauge.set(if s == state { 1.0 } else { 0.0 });
        }
    }
}

/// `host:port` of an AMQP URI, for logs and metric labels: no scheme, no
/// credentials, no vhost or query.
pub(crate) fn node_label(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let default_port = if uri.starts_with("amqps://") {
        5671
    } else {
        5672
    };
    let has_port = match host.rsplit_once(':') {
        // An IPv6 literal without a port ends with ']'.
        Some((_, port)) => !port.contains(']') && !port.is_empty(),
        None => false,
    };
    if has_port {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_labels_carry_host_and_port_only() {
        assert_eq!(
            node_label("amqp://edge:s3cret@broker-1:5673/%2f"),
            "broker-1:5673"
        );
        assert_eq!(
            node_label("amqps://u:p@central.example"),
            "central.example:5671"
        );
        assert_eq!(node_label("amqp://10.0.0.1/vhost?x=1"), "10.0.0.1:5672");
        assert_eq!(node_label("amqp://[::1]:5700/v"), "[::1]:5700");
        assert_eq!(node_label("amqp://[::1]/v"), "[::1]:5672");
        assert!(!node_label("amqp://u:p@a:b@h:1/").contains('p'));
    }

    #[test]
    fn a_stall_ends_with_progress_or_a_failed_connect_but_not_a_timeout() {
        let status = LinkStatus::new("health-test");
        assert_eq!(status.state(), LinkState::Down);
        status.link_up();
        assert_eq!(status.state(), LinkState::Up);
        status.set(LinkState::Stalled);
        // The watchdog dropped the link; reconnects time out.
        status.attempt_failed(true);
        assert_eq!(status.state(), LinkState::Stalled);
        status.link_up();
        assert_eq!(
            status.state(),
            LinkState::Stalled,
            "up again only after progress"
        );
        assert!(status.progress());
        assert_eq!(status.state(), LinkState::Up);
        assert!(!status.progress());
        status.set(LinkState::Stalled);
        status.attempt_failed(false);
        assert_eq!(status.state(), LinkState::Down);
    }
}
