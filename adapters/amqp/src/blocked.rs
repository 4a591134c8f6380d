//! `connection.blocked` / `connection.unblocked` (RabbitMQ's extension):
//! a client that announced the `connection.blocked` capability in its
//! start-ok client-properties is told when the store starts refusing
//! publishes (quota or disk reserve) and when it takes them again, so it
//! can pause publishing instead of collecting nacks.
//!
//! As in RabbitMQ, only publishing connections are told: one that has sent
//! a `basic.publish` since it opened (at that publish if the store refuses
//! already). Clients such as lapin stop writing altogether while blocked,
//! so a connection that only consumes must not be, or it could not ack
//! or consume what would make room.
//!
//! The source is the store's `full` watch, which clears as soon as a
//! retirement makes room (not only at the next accepted append). Unlike
//! RabbitMQ the socket of a publishing connection is not paused: its
//! publishes meanwhile are nacked in confirm mode, as before.

use amq_protocol::protocol::{AMQPClass, basic, connection};
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
    pub(crate) told: bool,
    /// The connection has published.
    publisher: bool,
}

impl Blocked {
    pub(crate) fn new(full: watch::Receiver<Option<FullReason>>) -> Blocked {
        Blocked {
            full,
            told: false,
            publisher: false,
        }
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
    /// Before a method is handled: its first `basic.publish` makes the
    /// connection a publisher, told at once if the store refuses now.
    pub(crate) fn note_publish(&mut self, method: &AMQPClass) -> Result<(), Exception> {
        let publish = matches!(method, AMQPClass::Basic(basic::AMQPMethod::Publish(_)));
        match self.blocked.as_mut() {
            Some(b) if publish && !b.publisher => {
                b.publisher = true;
                self.tell_blocked()
            }
            _ => Ok(()),
        }
    }

    /// Tells a publishing client if the store's state differs from what it
    /// was last told (at its first publish and on every change).
    pub(crate) fn tell_blocked(&mut self) -> Result<(), Exception> {
        let Some(b) = self.blocked.as_mut() else {
            return Ok(());
        };
        // Seen either way, so that the next change is a new one.
        let now = *b.full.borrow_and_update();
        if !b.publisher {
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn properties(capability: Option<AMQPValue>) -> FieldTable {
        let mut caps = FieldTable::default();
        if let Some(v) = capability {
            caps.insert("connection.blocked".into(), v);
        }
        let mut props = FieldTable::default();
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        props
    }

    #[test]
    fn only_a_true_capability_announces_blocked() {
        assert!(announced(&properties(Some(AMQPValue::Boolean(true)))));
        assert!(!announced(&properties(Some(AMQPValue::Boolean(false)))));
        assert!(!announced(&properties(None)));
        assert!(!announced(&FieldTable::default()));
    }

    #[test]
    fn the_reason_names_the_setting() {
        assert!(reason(FullReason::Quota).contains("store.max_bytes"));
        assert!(reason(FullReason::Disk).contains("store.min_free"));
    }
}
