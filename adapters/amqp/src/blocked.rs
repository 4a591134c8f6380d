//! `connection.blocked` / `connection.unblocked` (RabbitMQ's extension):
//! a client that announced the `connection.blocked` capability in its
//! start-ok client-properties is told when the store starts refusing
//! publishes (quota or disk reserve) and when it takes them again, so it
//! can pause publishing instead of collecting nacks.
//!
//! The source is the store's `full` watch, which clears as soon as a
//! retirement makes room (not only at the next accepted append). Unlike
//! RabbitMQ the socket of a publishing connection is not paused: its
//! publishes meanwhile are nacked in confirm mode, as before.

use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::{AMQPValue, FieldTable};
use edge_store::FullReason;
use tokio::sync::watch;

use crate::connection::Connection;
use crate::error::Exception;

/// The store's refusal state, for a client that wants to hear about it.
#[derive(Debug)]
pub(crate) struct Blocked {
    full: watch::Receiver<Option<FullReason>>,
    /// What the client was last told (`true`: blocked).
    told: bool,
}

impl Blocked {
    pub(crate) fn new(full: watch::Receiver<Option<FullReason>>) -> Blocked {
        Blocked { full, told: false }
    }
}

/// Whether start-ok's client-properties announce `connection.blocked`.
pub(crate) fn announced(client_properties: &FieldTable) -> bool {
    match client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(caps)) => matches!(
            caps.inner().get("connection.blocked"),
            Some(AMQPValue::Boolean(true))
        ),
        _ => false,
    }
}

/// The reason text of connection.blocked: the cause and the setting behind it.
pub(crate) fn reason(full: FullReason) -> &'static str {
    match full {
        FullReason::Quota => "store full: store.max_bytes quota reached",
        FullReason::Disk => "low on disk: store.min_free reserve reached",
    }
}

/// Resolves when the store's refusal state changed; never for a client
/// that did not ask (or once the store is gone).
pub(crate) async fn changed(blocked: &mut Option<Blocked>) {
    match blocked {
        Some(b) => {
            if b.full.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

impl Connection {
    /// Tells the client if the store's state differs from what it was
    /// last told (called after open-ok and on every change).
    pub(crate) fn tell_blocked(&mut self) -> Result<(), Exception> {
        let Some(b) = self.blocked.as_mut() else {
            return Ok(());
        };
        let now = *b.full.borrow_and_update();
        let method = match (now, b.told) {
            (Some(full), false) => connection::AMQPMethod::Blocked(connection::Blocked {
                reason: reason(full).into(),
            }),
            (None, true) => connection::AMQPMethod::Unblocked(connection::Unblocked {}),
            _ => return Ok(()),
        };
        b.told = now.is_some();
        tracing::debug!(peer = %self.peer, blocked = b.told, "telling the client the store's state");
        self.method(0, AMQPClass::Connection(method))
    }
}
