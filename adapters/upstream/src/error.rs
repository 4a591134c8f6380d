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
