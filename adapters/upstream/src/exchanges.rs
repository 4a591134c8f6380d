//! Whether the exchanges of the routes exist on the upstream broker.

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

/// Whether `exchange` exists, by a passive declare on a channel of its own
/// (the broker closes that channel when the exchange is missing).
pub(crate) async fn exchange_exists(
    connection: &Connection,
    exchange: &str,
) -> Result<bool, lapin::Error> {
    let channel = connection.create_channel().await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let declared = channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "exchange checked".into()).await;
            Ok(true)
        }
        Err(error) if is_not_found(&error) => Ok(false),
        Err(error) => {
            if channel.status().connected() {
                let _ = channel.close(200, "exchange check failed".into()).await;
            }
            Err(error)
        }
    }
}

/// The broker's 404 NOT_FOUND (channel closed for a missing exchange).
pub(crate) fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}
