//! Errors a publisher must see, in the core's words: each adapter maps them
//! to its protocol (MQTT 5 0x97 / 3.1.1 disconnect, AMQP nack or
//! connection.blocked), without depending on the store.

use edge_store::{AppendError, FullReason};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Refused for room (quota, or the disk): nothing stored was touched;
    /// the publisher may retry once upstreams have confirmed.
    #[error("store full ({why}): {used_bytes} of {max_bytes} bytes used")]
    Full {
        why: &'static str,
        used_bytes: u64,
        max_bytes: u64,
    },
    /// The gateway is shutting down.
    #[error("gateway shutting down")]
    Closed,
    /// The message cannot be stored (a field too long for the format).
    #[error("message cannot be stored: {0}")]
    Invalid(#[from] crate::message::EncodeError),
    /// The store failed (I/O); nothing of the message was made durable.
    #[error("store failed: {0}")]
    Failed(String),
}

impl PublishError {
    /// Label for metrics and log summaries.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Full { .. } => "store_full",
            PublishError::Closed => "closed",
            PublishError::Invalid(_) => "invalid",
            PublishError::Failed(_) => "store_error",
        }
    }
}

impl From<AppendError> for PublishError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Full {
                reason,
                live_bytes,
                max_bytes,
                ..
            } => PublishError::Full {
                why: match reason {
                    FullReason::Quota => "quota reached",
                    FullReason::Disk => "filesystem out of space",
                },
                used_bytes: live_bytes,
                max_bytes,
            },
            AppendError::Closed => PublishError::Closed,
            AppendError::Io(e) => PublishError::Failed(e),
        }
    }
}
