//! What the model test sends to the store, and what comes back.

use crate::{AppendError, Parked, Placement, Record, Seq, Store, StoreError};

/// A step made concrete against the model: what is sent to the store.
#[derive(Debug, Clone)]
pub(super) enum Action {
    Append {
        record: Record,
        placement: Placement,
    },
    Advance {
        cursor: &'static str,
        to: Seq,
    },
    CreateQueue {
        name: &'static str,
    },
    DeleteQueue {
        name: &'static str,
    },
    Ack {
        queue: u64,
        seqs: Vec<Seq>,
    },
    SetState {
        queue: u64,
        seq: Seq,
        state: u32,
    },
    Park {
        seq: Seq,
        record: Record,
        parked: Parked,
    },
    Purge {
        max: usize,
    },
    Replay {
        max: usize,
    },
}

/// The answer an action gets when the store works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Reply {
    /// Appended under this seq (0: not logged).
    Seq(Seq),
    /// Refused as full, with the quota's bytes in use.
    Full {
        used: u64,
    },
    Id(u64),
    Count(u64),
    Done,
}

/// Sends an action; `Err` is a failure (not a refusal).
pub(super) async fn run(store: &Store, action: Action) -> Result<Reply, String> {
    let done = |r: Result<(), StoreError>| r.map(|()| Reply::Done).map_err(|e| e.to_string());
    match action {
        Action::Append { record, placement } => {
            let commit = store
                .submit_with(record, placement)
                .await
                .map_err(|e| e.to_string())?;
            match commit.await {
                Ok(seq) => Ok(Reply::Seq(seq)),
                Err(AppendError::Full { live_bytes, .. }) => Ok(Reply::Full { used: live_bytes }),
                Err(e) => Err(e.to_string()),
            }
        }
        Action::Advance { cursor, to } => done(store.advance_cursor(cursor, to).await),
        Action::CreateQueue { name } => store
            .create_queue(name)
            .await
            .map(Reply::Id)
            .map_err(|e| e.to_string()),
        Action::DeleteQueue { name } => done(store.delete_queue(name).await),
        Action::Ack { queue, seqs } => done(store.queue_ack(queue, seqs).await),
        Action::SetState { queue, seq, state } => done(store.queue_set(queue, seq, state).await),
        Action::Park {
            seq,
            record,
            parked,
        } => done(store.park(seq, record, parked).await),
        Action::Purge { max } => store
            .purge_dead_letters(max)
            .await
            .map(Reply::Count)
            .map_err(|e| e.to_string()),
        Action::Replay { max } => store
            .replay_dead_letters(max)
            .await
            .map(Reply::Count)
            .map_err(|e| e.to_string()),
    }
}
