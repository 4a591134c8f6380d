//! Acknowledgements as values: an adapter acknowledges its client only when
//! the receipt of that message resolves — after the message is durable and
//! has been handed to the online subscribers (and, on a route with
//! `ack = "upstream-confirmed"`, once its upstream confirmed it).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use edge_store::Seq;
use tokio::sync::oneshot;

use crate::error::PublishError;

/// What the router promises for one published message.
pub enum Receipt {
    /// Nothing durable was needed: ack at once.
    Done,
    /// Resolves once the message is committed (its log seq, 0 when only
    /// delivered or retained) and fanned out, or refused.
    Pending(oneshot::Receiver<Result<Seq, PublishError>>),
    /// Like `Pending`, then until the upstreams of its routes with
    /// `ack = "upstream-confirmed"` forwarded it (`progress.rs`).
    Confirming(Pin<Box<dyn Future<Output = ReceiptResult> + Send>>),
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Receipt::Done => f.write_str("Done"),
            Receipt::Pending(rx) => f.debug_tuple("Pending").field(rx).finish(),
            Receipt::Confirming(_) => f.write_str("Confirming"),
        }
    }
}

/// Outcome of a receipt: the log position, if the message was logged.
pub type ReceiptResult = Result<Option<Seq>, PublishError>;

impl Future for Receipt {
    type Output = ReceiptResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReceiptResult> {
        match self.get_mut() {
            Receipt::Done => Poll::Ready(Ok(None)),
            Receipt::Pending(rx) => Pin::new(rx).poll(cx).map(|r| match r {
                Ok(Ok(0)) => Ok(None),
                Ok(Ok(seq)) => Ok(Some(seq)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(PublishError::Closed),
            }),
            Receipt::Confirming(confirming) => confirming.as_mut().poll(cx),
        }
    }
}
