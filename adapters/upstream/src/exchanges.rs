//! Whether the exchanges of the routes exist on the upstream broker, and
//! their declaration for routes with `declare_exchange`.

use std::collections::BTreeSet;
use std::time::Duration;

use edge_config::ExchangeType;
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

/// Why the declare of an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeclareError {
    /// 403 ACCESS_REFUSED: the user lacks the configure permission.
    #[error("access refused: {0}")]
    AccessRefused(String),
    /// 406 PRECONDITION_FAILED: it exists with another type or arguments.
    #[error("it exists with another type or arguments: {0}")]
    Mismatch(String),
    #[error(transparent)]
    Other(#[from] CheckError),
}

impl DeclareError {
    /// For the metric's `reason` label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            DeclareError::AccessRefused(_) => "access_refused",
            DeclareError::Mismatch(_) => "mismatch",
            DeclareError::Other(_) => "error",
        }
    }
}

/// Declares `exchange` durable, of `kind`, on a channel of its own (the
/// broker closes that channel when it refuses). Gives up after `timeout`.
pub(crate) async fn declare(
    connection: &Connection,
    exchange: &str,
    kind: ExchangeType,
    timeout: Duration,
) -> Result<(), DeclareError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let channel = tokio::time::timeout_at(deadline, connection.create_channel())
        .await
        .map_err(|_| CheckError::Timeout(timeout))?
        .map_err(CheckError::from)?;
    let kind = match kind {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Headers => ExchangeKind::Headers,
    };
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let declared = channel.exchange_declare(exchange.into(), kind, options, FieldTable::default());
    match tokio::time::timeout_at(deadline, declared).await {
        Ok(Ok(())) => {
            close(&channel, "exchange declared").await;
            Ok(())
        }
        Ok(Err(error)) => Err(match reply_code(&error) {
            Some(403) => DeclareError::AccessRefused(error.to_string()),
            Some(406) => DeclareError::Mismatch(error.to_string()),
            _ => {
                close(&channel, "exchange declare failed").await;
                CheckError::Broker(error).into()
            }
        }),
        Err(_) => {
            close(&channel, "exchange declare timed out").await;
            Err(CheckError::Timeout(timeout).into())
        }
    }
}

/// The AMQP reply code of a broker's channel or connection close.
fn reply_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => Some(e.get_id()),
        _ => None,
    }
}

/// The broker's 404 NOT_FOUND (channel closed for a missing exchange).
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    reply_code(error) == Some(404)
}
