//! How far each upstream has forwarded the log, for the routes whose
//! publishers are acknowledged only once the central broker confirmed
//! (`ack = "upstream-confirmed"`).
//!
//! Each upstream's forwarder publishes its position (the first seq not
//! done: everything below is confirmed, parked as a dead letter, expired
//! or not its business) and, when its routes have more than one priority,
//! the position of each priority lane (a lane forwards the records whose
//! first matching route of that upstream has its priority, and passes the
//! others). A receipt on such a route resolves once, for every upstream
//! the message goes to, the position of the lane that forwards it is past
//! its seq; when the lane is not known, the upstream's own position.

use std::collections::HashMap;
use std::sync::Arc;

use edge_store::Seq;
use tokio::sync::watch;

use crate::error::PublishError;

/// An upstream's position and those of its lanes.
#[derive(Debug)]
struct Positions {
    all: watch::Sender<Seq>,
    /// By priority; empty with a single lane (its position is `all`).
    lanes: HashMap<u8, watch::Sender<Seq>>,
}

/// One position per upstream (and lane); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    upstreams: Arc<HashMap<String, Positions>>,
}

impl Progress {
    /// Positions for the named upstreams, each with the priorities of its
    /// routes (its lanes), each 0 until its forwarder starts.
    pub fn new<'a>(upstreams: impl IntoIterator<Item = (&'a str, Vec<u8>)>) -> Progress {
        let upstreams = upstreams
            .into_iter()
            .map(|(name, priorities)| {
                let lanes = if priorities.len() > 1 {
                    priorities
                        .into_iter()
                        .map(|p| (p, watch::Sender::new(0)))
                        .collect()
                } else {
                    HashMap::new()
                };
                let positions = Positions {
                    all: watch::Sender::new(0),
                    lanes,
                };
                (name.to_string(), positions)
            })
            .collect();
        Progress {
            upstreams: Arc::new(upstreams),
        }
    }

    /// Where the forwarder of `upstream` publishes its position.
    pub fn sender(&self, upstream: &str) -> Option<watch::Sender<Seq>> {
        self.upstreams.get(upstream).map(|p| p.all.clone())
    }

    /// Where the forwarder of `upstream` publishes the position of its lane
    /// of `priority`; none with a single lane.
    pub fn lane_sender(&self, upstream: &str, priority: u8) -> Option<watch::Sender<Seq>> {
        self.upstreams.get(upstream)?.lanes.get(&priority).cloned()
    }

    /// The position that tells when a record forwarded to `upstream` in the
    /// lane of `priority` is done (the upstream's when the lane is unknown).
    pub(crate) fn receiver(
        &self,
        upstream: &str,
        priority: Option<u8>,
    ) -> Option<watch::Receiver<Seq>> {
        let positions = self.upstreams.get(upstream)?;
        let lane = priority.and_then(|p| positions.lanes.get(&p));
        Some(lane.unwrap_or(&positions.all).subscribe())
    }
}

/// Waits until every position in `positions` is past `seq`.
pub(crate) async fn confirmed(
    positions: Vec<watch::Receiver<Seq>>,
    seq: Seq,
) -> Result<(), PublishError> {
    for mut position in positions {
        position
            .wait_for(|next| *next > seq)
            .await
            .map_err(|_| PublishError::Closed)?;
    }
    Ok(())
}
