//! Persisting the cursor: a group-committed write, so at most one in
//! flight and at most one every [`FLUSH_INTERVAL`]. Losing the latest value
//! in a crash only means re-forwarding (same message ids), never loss; so
//! each write is lazy ([`Store::advance_cursor_lazily`]): it rides in the
//! next commit that has other work (the next message's append) rather than
//! costing one of its own, and commits within [`edge_store::CURSOR_DELAY`]
//! at the latest. As one write waits for the previous one, the stored
//! cursor lags the confirmed one by at most about twice that delay plus
//! [`FLUSH_INTERVAL`]. A write that fails is tried again every
//! [`RETRY_INTERVAL`] (after a full disk, retiring is what makes room).
//! Only the last write, at [`CursorFlusher::finish`], is committed at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edge_store::{Seq, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct CursorFlusher {
    tx: watch::Sender<Seq>,
    task: JoinHandle<()>,
    store: Store,
    name: String,
    /// The value last written to the store.
    durable: Arc<AtomicU64>,
}

impl CursorFlusher {
    /// `durable` is the cursor's value in the store.
    pub(crate) fn spawn(store: Store, name: String, durable: Seq) -> CursorFlusher {
        let (tx, rx) = watch::channel(durable);
        let stored = Arc::new(AtomicU64::new(durable));
        let task = tokio::spawn(flush_loop(
            store.clone(),
            name.clone(),
            Arc::clone(&stored),
            rx,
        ));
        CursorFlusher {
            tx,
            task,
            store,
            name,
            durable: stored,
        }
    }

    /// The cursor may move to `next` (everything below it is done).
    pub(crate) fn set(&self, next: Seq) {
        self.tx.send_if_modified(|v| {
            if next > *v {
                *v = next;
                true
            } else {
                false
            }
        });
    }

    /// Writes the last value, at once, unless the store has it, and
    /// stops. A lazy write still waiting for its commit is not awaited: it
    /// is committed with this one (the store never moves a cursor
    /// backwards).
    pub(crate) async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        let next = *self.tx.borrow();
        if next > self.durable.load(Ordering::Acquire)
            && let Err(error) = self.store.advance_cursor(&self.name, next).await
        {
            warn!(upstream = %self.name, cursor = next, %error,
                "cannot persist cursor; confirmed messages may be forwarded again");
        }
    }
}

async fn flush_loop(
    store: Store,
    name: String,
    stored: Arc<AtomicU64>,
    mut rx: watch::Receiver<Seq>,
) {
    let mut durable = stored.load(Ordering::Acquire);
    let mut failing = false;
    loop {
        // After a failure the same value is written again, changed or not.
        let closed = if failing {
            rx.has_changed().is_err()
        } else {
            rx.changed().await.is_err()
        };
        let next = *rx.borrow_and_update();
        if next > durable {
            match store.advance_cursor_lazily(&name, next).await {
                Ok(()) => {
                    debug!(upstream = %name, cursor = next, "cursor persisted");
                    durable = next;
                    stored.store(next, Ordering::Release);
                    failing = false;
                }
                Err(error) if !failing => {
                    warn!(upstream = %name, cursor = next, %error,
                        "cannot persist cursor (trying again every second); confirmed messages may be forwarded again");
                    failing = true;
                }
                Err(error) => {
                    debug!(upstream = %name, cursor = next, %error, "cursor still not persisted")
                }
            }
        } else {
            failing = false;
        }
        if closed {
            return;
        }
        tokio::time::sleep(if failing {
            RETRY_INTERVAL
        } else {
            FLUSH_INTERVAL
        })
        .await;
    }
}
