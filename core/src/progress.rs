//! How far each upstream has forwarded the log, for the routes whose
//! publishers are acknowledged only once the central broker confirmed
//! (`ack = "upstream-confirmed"`).
//!
//! Each upstream's forwarder publishes its position (the first seq not
//! done: everything below is confirmed, parked as a dead letter, expired
//! or not its business); a receipt on such a route resolves once the
//! position of every upstream the message goes to is past its seq.

use std::collections::HashMap;
use std::sync::Arc;

use edge_store::Seq;
use tokio::sync::watch;

use crate::error::PublishError;

/// One position per upstream; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    upstreams: Arc<HashMap<String, watch::Sender<Seq>>>,
}

impl Progress {
    /// Positions for the named upstreams, each 0 until its forwarder starts.
    pub fn new<'a>(upstreams: impl IntoIterator<Item = &'a str>) -> Progress {
        let upstreams = upstreams
            .into_iter()
            .map(|name| (name.to_string(), watch::Sender::new(0)))
            .collect();
        Progress {
            upstreams: Arc::new(upstreams),
        }
    }

    /// Where the forwarder of `upstream` publishes its position.
    pub fn sender(&self, upstream: &str) -> Option<watch::Sender<Seq>> {
        self.upstreams.get(upstream).cloned()
    }

    pub(crate) fn receiver(&self, upstream: &str) -> Option<watch::Receiver<Seq>> {
        self.upstreams.get(upstream).map(watch::Sender::subscribe)
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
