//! The pump: moves a queue's live deliveries, its stored entries (at start,
//! after a lag) and a priority queue's spilled entries (when their turn
//! comes) into `ready`; drops the head of a `drop-head` queue over its
//! limit and expires heads, at their time.

use std::sync::{Arc, Weak};

use tokio_util::sync::CancellationToken;

use super::{BACKLOG_PAGE, LIMIT_RECHECK, Queue, delivered};

/// Moves the session's deliveries (and, when it lagged, its store entries)
/// into `ready`, while there is room, until the queue is deleted or gone.
pub(super) async fn pump(queue: Weak<Queue>) {
    loop {
        let Some(q) = queue.upgrade() else { return };
        if q.stop.is_cancelled() {
            return;
        }
        let (room, catching_up, load) = {
            let mut s = q.state();
            if q.subscriber.take_lagged() {
                s.catching_up = true;
            }
            // Over its limit with the head not in memory: read it, room or
            // not (beyond the memory bound), to drop it; a priority queue's
            // head may be its best spilled entry.
            let over = q.arrived(&mut s);
            let spilled_head = if over { s.spilled_head() } else { None };
            if over && spilled_head.is_none() {
                s.catching_up = true;
            }
            (
                s.can_admit() || s.catching_up && q.flags.drops_head(),
                s.catching_up,
                spilled_head.or_else(|| s.next_to_load()),
            )
        };
        if let Some(key) = load {
            // A spilled entry's turn: read it back.
            match q.subscriber.backlog_with_expired(key.1, 1).await {
                Ok(mut entry) => {
                    let mut s = q.state();
                    s.loaded(key, entry.pop());
                    q.arrived(&mut s);
                    s.wake();
                    continue;
                }
                Err(error) => {
                    tracing::warn!(queue = %q.name, %error, "cannot read a stored message back; retrying");
                    let stop = q.stop.clone();
                    drop(q);
                    if !pause(&stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        if !room {
            let stop = q.stop.clone();
            let room = Arc::clone(&q.room);
            // A full `drop-head` queue also looks again for arrivals that
            // push it over its limit (they do not wake it).
            let recheck = q.flags.drops_head();
            drop(q);
            tokio::select! {
                _ = room.notified() => continue,
                _ = tokio::time::sleep(LIMIT_RECHECK), if recheck => continue,
                _ = stop.cancelled() => return,
            }
        }
        if catching_up {
            let from = q.state().read_from;
            match q.subscriber.backlog_with_expired(from, BACKLOG_PAGE).await {
                Ok(page) => {
                    let stalled = {
                        let mut s = q.state();
                        let caught_up = page.len() < BACKLOG_PAGE;
                        let mut admitted = false;
                        for e in page {
                            s.read_from = e.seq + 1;
                            if !s.held.contains(&e.seq) {
                                let suspect = s.suspect_up_to.is_some_and(|last| e.seq <= last);
                                let state = e.state | delivered::mark_if(suspect);
                                s.admit(e.message, e.seq, state);
                                admitted = true;
                            }
                        }
                        if caught_up {
                            s.catching_up = false;
                            s.suspect_up_to = None;
                        }
                        let over = q.arrived(&mut s);
                        s.wake();
                        caught_up && !admitted && over
                    };
                    if stalled {
                        // The store's count has entries the store has not
                        // (yet) given: reading again at once would spin.
                        // Looked at again when room frees or after a while.
                        let stop = q.stop.clone();
                        let room = Arc::clone(&q.room);
                        drop(q);
                        tokio::select! {
                            _ = room.notified() => {}
                            _ = tokio::time::sleep(LIMIT_RECHECK) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(queue = %q.name, %error, "cannot read the queue's stored messages; retrying");
                    let stop = q.stop.clone();
                    drop(q);
                    if !pause(&stop).await {
                        return;
                    }
                }
            }
            continue;
        }
        let stop = q.stop.clone();
        let room = Arc::clone(&q.room);
        let head_expires = q
            .state()
            .expire_heads(&q.flags, edge_core::message::now_ms());
        drop(q);
        let live = std::future::poll_fn(|cx| poll_live(&queue, cx));
        let expiry = async {
            match head_expires {
                Some(at) => {
                    let wait = at.saturating_sub(edge_core::message::now_ms());
                    tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            open = live => if !open { return },
            // A take() found the session lagged: read the store.
            _ = room.notified() => {}
            // A head expires: it dies (next turn).
            _ = expiry => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Waits a second before a failed store read is tried again; false if
/// the queue was deleted or closed meanwhile.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => true,
        _ = stop.cancelled() => false,
    }
}

/// Moves what the session's channel holds into `ready`; pending until
/// there is something (or no room: then ready, for the pump to wait for
/// room). Ready(false) once the channel or the queue is gone.
fn poll_live(queue: &Weak<Queue>, cx: &mut std::task::Context<'_>) -> std::task::Poll<bool> {
    use std::task::Poll;
    let Some(q) = queue.upgrade() else {
        return Poll::Ready(false);
    };
    let mut s = q.state();
    let mut moved = false;
    loop {
        if !s.can_admit() || s.catching_up {
            break;
        }
        if q.subscriber.take_lagged() {
            s.catching_up = true;
            break;
        }
        let Some(live) = s.live.as_mut() else {
            return Poll::Ready(false);
        };
        match live.poll_recv(cx) {
            Poll::Ready(Some(d)) => {
                s.accept(d);
                moved = true;
            }
            Poll::Ready(None) => return Poll::Ready(false),
            Poll::Pending if moved => break,
            Poll::Pending => return Poll::Pending,
        }
    }
    q.arrived(&mut s);
    s.wake();
    Poll::Ready(true)
}
