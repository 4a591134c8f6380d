//! The log lines that clients can trigger, each a rate-limited summary
//! (see `edge_log`). Metrics count every event exactly.

use edge_log::{Level, Summary};

pub(crate) static DENIED: Summary = Summary::new(
    "AMQP operations refused by the ACL (403 ACCESS_REFUSED)",
    Level::Info,
);
pub(crate) static RATE_LIMITED: Summary = Summary::new(
    "AMQP connections held back by limits.publish_rate / publish_byte_rate",
    Level::Info,
);
pub(crate) static LOGIN_REFUSED: Summary = Summary::new("AMQP logins refused", Level::Warn);
pub(crate) static TLS_FAILED: Summary = Summary::new(
    "AMQP TLS handshakes failed: connections closed",
    Level::Info,
);
pub(crate) static GUARD_REFUSED: Summary = Summary::new(
    "AMQP connections refused by the per-source limits",
    Level::Warn,
);

pub(crate) static REFUSED: Summary = Summary::new(
    "store refused AMQP publishes (nacked in confirm mode)",
    Level::Warn,
);
pub(crate) static UNROUTABLE: Summary = Summary::new(
    "AMQP publishes routed nowhere (returned when mandatory)",
    Level::Info,
);
pub(crate) static ACCEPT_FAILED: Summary =
    Summary::new("AMQP accept failed; retrying", Level::Warn);
pub(crate) static OVER_LIMIT: Summary = Summary::new(
    "AMQP connections refused at amqp.max_connections",
    Level::Warn,
);
pub(crate) static DROPPED: Summary = Summary::new(
    "AMQP messages dropped (a full queue, a length limit, or dead-lettered without a dead-letter exchange)",
    Level::Warn,
);

/// `n` messages dropped for `reason`: counted
/// (`edge_messages_dropped_total{reason}`) and summarised in the log.
pub(crate) fn dropped(reason: &'static str, n: u64, example: impl FnOnce() -> String) {
    crate::telemetry::dropped(reason, n);
    DROPPED.record_n(reason, n, example);
}
