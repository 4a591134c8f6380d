//! The log lines that clients can trigger, each a rate-limited summary
//! (one line per reason per 10 s with the count and an example; see
//! `edge_log`). Metrics count every event exactly.

use edge_log::{Level, Summary};

pub(crate) static REFUSED: Summary = Summary::new("MQTT connections refused", Level::Warn);
pub(crate) static ACCEPT_FAILED: Summary =
    Summary::new("MQTT accept failed; retrying", Level::Warn);
pub(crate) static PROTOCOL_ERRORS: Summary =
    Summary::new("MQTT protocol errors: connections closed", Level::Info);
pub(crate) static CLOSED: Summary = Summary::new("MQTT connections closed", Level::Info);
pub(crate) static ENCODE_FAILED: Summary =
    Summary::new("cannot encode an MQTT packet", Level::Warn);
pub(crate) static STORE_REFUSED: Summary = Summary::new(
    "store refused messages: not acknowledged (MQTT 5: refused in the ack; 3.1.1: connection closed)",
    Level::Warn,
);
pub(crate) static WILLS_NOT_STORED: Summary = Summary::new(
    "MQTT wills not committed to the store (refused or timed out)",
    Level::Warn,
);
pub(crate) static FILTER_REFUSED: Summary =
    Summary::new("invalid topic filters refused", Level::Info);
pub(crate) static SHUTDOWN_UNACKED: Summary = Summary::new(
    "shutdown: commits still outstanding; closing without their acknowledgements",
    Level::Warn,
);
pub(crate) static NOT_SENT: Summary = Summary::new(
    "deliveries not sent: larger than the MQTT 5 client's maximum packet size",
    Level::Warn,
);
pub(crate) static WS_REFUSED: Summary =
    Summary::new("MQTT WebSocket upgrades refused", Level::Info);
pub(crate) static WS_CLOSED: Summary = Summary::new(
    "MQTT WebSocket connections closed for a WebSocket error",
    Level::Info,
);
pub(crate) static TLS_FAILED: Summary = Summary::new(
    "MQTT TLS handshakes failed: connections closed",
    Level::Info,
);
pub(crate) static LOGIN_REFUSED: Summary = Summary::new("MQTT logins refused", Level::Warn);
pub(crate) static DENIED: Summary = Summary::new(
    "MQTT publishes and subscriptions denied by the ACL",
    Level::Info,
);
pub(crate) static RATE_LIMITED: Summary = Summary::new(
    "MQTT clients held back by limits.publish_rate / publish_byte_rate",
    Level::Info,
);
