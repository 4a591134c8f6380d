//! Persisting the cursor: a group-committed write, so at most one in
//! flight and at most one every [`FLUSH_INTERVAL`]. Losing the latest value
//! in a crash only means re-forwarding (same message ids), never loss; so
//! each write is lazy ([`Store::advance_cursor_lazily`]): it rides in the
//! next commit that has other work (the next message's append) rather than
//! costing one of its own, and commits within [`edge_store::CURSOR_DELAY`]
//! at the latest. Only the last write, at [`CursorFlusher::finish`], is
//! committed at once.

use std::time::Duration;

use edge_store::{Seq, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct CursorFlusher {
    tx: watch::Sender<Seq>,
    task: JoinHandle<()>,
    store: Store,
    name: String,
    /// The value in the store when spawned.
    durable: Seq,
}

impl CursorFlusher {
    /// `durable` is the cursor's value in the store.
    pub(crate) fn spawn(store: Store, name: String, durable: Seq) -> CursorFlusher {
        let (tx, rx) = watch::channel(durable);
        let task = tokio::spawn(flush_loop(store.clone(), name.clone(), durable, rx));
        CursorFlusher {
            tx,
            task,
            store,
            name,
            durable,
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

    /// Writes the last value, at once, and stops. A lazy write still
    /// waiting for its commit is not awaited: it is committed with this
    /// one (the store never moves a cursor backwards).
    pub(crate) async fn finish(self) {
        self.task.abort();
        let _ = self.task.await;
        let next = *self.tx.borrow();
        if next > self.durable
            && let Err(error) = self.store.advance_cursor(&self.name, next).await
        {
            warn!(upstream = %self.name, cursor = next, %error,
                "cannot persist cursor; confirmed messages may be forwarded again");
        }
    }
}

async fn flush_loop(store: Store, name: String, mut durable: Seq, mut rx: watch::Receiver<Seq>) {
    loop {
        let closed = rx.changed().await.is_err();
        let next = *rx.borrow_and_update();
        if next > durable {
            match store.advance_cursor_lazily(&name, next).await {
                Ok(()) => {
                    debug!(upstream = %name, cursor = next, "cursor persisted");
                    durable = next;
                }
                Err(error) => {
                    warn!(upstream = %name, cursor = next, %error,
                        "cannot persist cursor; confirmed messages may be forwarded again");
                }
            }
        }
        if closed {
            return;
        }
        tokio::time::sleep(FLUSH_INTERVAL).await;
    }
}
