//! Whether the exchanges of the routes exist on the upstream broker.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use tracing::warn;

/// Longest wait for the check of one exchange.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the broker to confirm that a check's channel is closed.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why the existence of an exchange is unknown.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Whether `exchange` exists, by a passive declare on a channel of its own
/// (the broker closes that channel when the exchange is missing). Gives up
/// after `timeout`; the channel is closed whatever the outcome.
pub(crate) async fn exchange_exists(
    connection: &Connection,
    exchange: &str,
    timeout: Duration,
) -> Result<bool, CheckError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let channel = tokio::time::timeout_at(deadline, connection.create_channel())
        .await
        .map_err(|_| CheckError::Timeout(timeout))??;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let declare = channel.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        options,
        FieldTable::default(),
    );
    match tokio::time::timeout_at(deadline, declare).await {
        Ok(Ok(())) => {
            close(&channel, "exchange checked").await;
            Ok(true)
        }
        Ok(Err(error)) if is_not_found(&error) => Ok(false),
        Ok(Err(error)) => {
            close(&channel, "exchange check failed").await;
            Err(error.into())
        }
        Err(_) => {
            close(&channel, "exchange check timed out").await;
            Err(CheckError::Timeout(timeout))
        }
    }
}

async fn close(channel: &Channel, reason: &str) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_WAIT, channel.close(200, reason.into())).await;
    }
}

/// The exchanges among `exchanges` that the broker does not have. An
/// exchange that cannot be checked counts as present: its publishes tell.
/// Owns its timeouts, so it can run beside the forwarding loop.
pub(crate) async fn missing(
    upstream: String,
    connection: &Connection,
    exchanges: BTreeSet<String>,
) -> BTreeSet<String> {
    let mut missing = BTreeSet::new();
    // The default exchange always exists (and refuses declares).
    for exchange in exchanges.into_iter().filter(|x| !x.is_empty()) {
        match exchange_exists(connection, &exchange, CHECK_TIMEOUT).await {
            Ok(true) => {}
            Ok(false) => {
                missing.insert(exchange);
            }
            Err(error) => warn!(upstream = %upstream, exchange = %exchange, %error,
                "cannot check whether the exchange exists; publishing to it"),
        }
    }
    missing
}

/// The broker's 404 NOT_FOUND (channel closed for a missing exchange).
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}
