//! edge-upstream: forwards the durable log to a central RabbitMQ.
//!
//! One [`Replicator`] per configured upstream reads the log from its cursor,
//! publishes each record over lapin with publisher confirms (at most
//! `max_in_flight` unconfirmed), and moves the durable cursor over the
//! contiguous prefix the broker confirmed. Returned (unroutable) records are
//! parked in the store's dead-letter table; expired ones are dropped and
//! counted. On link trouble it reconnects to the configured nodes in turn,
//! with exponential back-off and jitter, and republishes from the cursor
//! with the same `message_id`s (`<gateway id>:<seq>`).
//!
//! The other way, one [`Downstream`] per configured downstream consumes a
//! central queue and publishes each message locally through the router,
//! acknowledging it upstream only once it is committed (`downstream.rs`).

mod connector;
mod convert;
mod cursor;
mod downstream;
mod error;
mod exchanges;
mod forwarder;
mod health;
mod lanes;
mod metrics;
mod replicator;
mod summary;
mod tls;

pub use convert::PUBLISHER_HEADER;
pub use downstream::{Downstream, abort_after_downstream_commits};
pub use error::{DownstreamError, LinkError};
pub use health::{LinkState, LinkStatus};
pub use lanes::{cursor_names, lane_cursor};
pub use replicator::Replicator;
pub use tls::{TlsError, TlsFailure};
