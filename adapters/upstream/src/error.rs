use std::time::Duration;

use edge_store::{Seq, StoreError};

use crate::tls::TlsError;

/// Why a link to the upstream was given up. Every variant ends the
/// connection; forwarding resumes after a reconnect from the first
/// unconfirmed seq, with the same message ids.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connect failed: {0}")]
    Connect(#[source] lapin::Error),
    /// The TLS handshake (or the TLS setup) failed; never retried in
    /// plain TCP.
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("publish of seq {seq} failed: {source}")]
    Publish {
        seq: Seq,
        #[source]
        source: lapin::Error,
    },
    /// No longer produced: publishes are pipelined, so frames that are
    /// never written show up as [`LinkError::Watchdog`]. Kept for
    /// compatibility.
    #[error("publish of seq {seq} not sent within {waited:?} (connection blocked?)")]
    PublishTimeout { seq: Seq, waited: Duration },
    #[error("confirm of seq {seq} failed: {source}")]
    Confirm {
        seq: Seq,
        #[source]
        source: lapin::Error,
    },
    #[error("broker nacked seq {seq}")]
    Nack { seq: Seq },
    #[error("no confirm for {waited:?} with {in_flight} messages in flight")]
    Watchdog { waited: Duration, in_flight: usize },
    #[error("connection or channel closed")]
    Lost,
    #[error("cannot park seq {seq}: {source}")]
    Park {
        seq: Seq,
        #[source]
        source: StoreError,
    },
}

impl LinkError {
    /// A broker nack (counted in `edge_upstream_nacks_total`).
    pub fn is_nack(&self) -> bool {
        matches!(self, LinkError::Nack { .. })
    }
}

/// Why a downstream gave up its link. Every variant ends the connection;
/// its unacknowledged deliveries go back to the queue, and consuming
/// resumes after a reconnect (redeliveries of what was already committed
/// are recognised by their `message_id`).
#[derive(Debug, thiserror::Error)]
pub enum DownstreamError {
    #[error("connect failed: {0}")]
    Connect(#[from] LinkError),
    #[error(
        "queue {queue:?} does not exist on the upstream broker (declare it there, or set declare = true)"
    )]
    QueueMissing { queue: String },
    #[error("cannot declare or check queue {queue:?}: {source}")]
    Queue {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("cannot consume from queue {queue:?}: {source}")]
    Consume {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("delivery failed: {0}")]
    Delivery(#[source] lapin::Error),
    #[error("the broker cancelled the consumer (queue deleted?)")]
    Cancelled,
    #[error("cannot acknowledge delivery {tag}: {source}")]
    Ack {
        tag: u64,
        #[source]
        source: lapin::Error,
    },
    /// The local store refused the message (full, failed, closing): the
    /// delivery goes back to the queue.
    #[error("local publish refused: {0}")]
    Publish(#[source] edge_core::PublishError),
}
