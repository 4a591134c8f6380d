//! Acknowledgements as values: an adapter acknowledges its client only when
//! the receipt of that message resolves.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use edge_store::{AppendError, Commit, Seq};

/// What the router promises for one published message.
#[derive(Debug)]
pub enum Receipt {
    /// Nothing durable was needed (QoS 0, or no route and QoS 0): ack at once.
    Done,
    /// Resolves when the message is committed to the log.
    Pending(Commit),
}

/// Outcome of a receipt: the log position, if the message was logged.
pub type ReceiptResult = Result<Option<Seq>, AppendError>;

impl Future for Receipt {
    type Output = ReceiptResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReceiptResult> {
        match self.get_mut() {
            Receipt::Done => Poll::Ready(Ok(None)),
            Receipt::Pending(commit) => Pin::new(commit).poll(cx).map(|r| r.map(Some)),
        }
    }
}
