//! The random steps of the model test.

use proptest::prelude::*;

use super::super::disk::Kept;

/// One step, in terms of the model's names (indexes into `CURSORS`,
/// `QUEUES`, `TOPICS`; `pick` chooses among what the model holds). The
/// model turns it into an [`super::state::Action`].
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// A record of `payload` bytes, logged when `log` (or when it names a
    /// queue), with entries in `queues` (repeats allowed; a deleted queue
    /// is named by its last id) and a retained change `(topic, set)`.
    Append {
        payload: usize,
        log: bool,
        queues: Vec<usize>,
        retain: Option<(usize, bool)>,
    },
    Advance {
        cursor: usize,
        by: u64,
    },
    CreateQueue {
        queue: usize,
    },
    DeleteQueue {
        queue: usize,
    },
    /// Acks `count` entries of a queue from its `pick`th (a seq it does not
    /// hold when it is empty).
    Ack {
        queue: usize,
        pick: usize,
        count: usize,
    },
    SetState {
        queue: usize,
        pick: usize,
        state: u32,
    },
    /// Parks the `pick`th log record for `upstream`.
    Park {
        pick: usize,
        upstream: usize,
    },
    Purge {
        max: usize,
    },
    Replay {
        max: usize,
    },
    /// Drops the store and opens it again.
    Reopen,
    /// Cuts the power after `after` more writes and syncs (`None`: now,
    /// with nothing in flight); the disk then keeps `kept`.
    Crash {
        after: Option<u64>,
        kept: Kept,
    },
}

pub(super) fn step() -> impl Strategy<Value = Step> {
    let retain = prop_oneof![
        2 => Just(None),
        1 => (0usize..3, any::<bool>()).prop_map(Some),
    ];
    let append = (
        0usize..250,
        prop::bool::weighted(0.8),
        prop::collection::vec(0usize..3, 0..=3),
        retain,
    )
        .prop_map(|(payload, log, queues, retain)| Step::Append {
            payload,
            log,
            queues,
            retain,
        });
    let kept = prop_oneof![
        Just(Kept::Synced),
        Just(Kept::Written),
        any::<u64>().prop_map(Kept::Torn),
    ];
    let after = prop_oneof![Just(None), (0u64..40).prop_map(Some)];
    prop_oneof![
        10 => append,
        4 => (0usize..2, 0u64..8).prop_map(|(cursor, by)| Step::Advance { cursor, by }),
        2 => (0usize..3).prop_map(|queue| Step::CreateQueue { queue }),
        1 => (0usize..3).prop_map(|queue| Step::DeleteQueue { queue }),
        3 => (0usize..3, any::<usize>(), 1usize..3)
            .prop_map(|(queue, pick, count)| Step::Ack { queue, pick, count }),
        1 => (0usize..3, any::<usize>(), 1u32..4)
            .prop_map(|(queue, pick, state)| Step::SetState { queue, pick, state }),
        1 => (any::<usize>(), 0usize..2).prop_map(|(pick, upstream)| Step::Park { pick, upstream }),
        1 => (1usize..3).prop_map(|max| Step::Purge { max }),
        1 => (1usize..3).prop_map(|max| Step::Replay { max }),
        1 => Just(Step::Reopen),
        2 => (after, kept).prop_map(|(after, kept)| Step::Crash { after, kept }),
    ]
}
