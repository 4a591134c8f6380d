//! The window of `message_id`s a downstream remembers, in memory and in the
//! store's dedup table.
//!
//! Invariants:
//! - An id is in the window from the moment its message is handed to the
//!   router until it is pushed out by `capacity` newer ids, or [`forget`]
//!   removes it because its commit failed. Its store key
//!   (`downstream/<name>/<message_id>`) is written in the message's own
//!   commit, so after a crash the store holds exactly the ids of the
//!   messages that were committed.
//! - The window holds at most `capacity` ids. An id pushed out is released
//!   from the store after its own commit was queued (the writer applies
//!   both in order), so the store holds at most `capacity` keys plus those
//!   whose release is still under way; [`DedupWindow::load`] trims the
//!   rest at start, keeping the newest by the seq of their commit.
//!
//! [`forget`]: DedupWindow::forget

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use edge_store::{Store, StoreError};

#[derive(Debug)]
pub(crate) struct DedupWindow {
    /// `downstream/<name>/`.
    prefix: String,
    capacity: usize,
    /// Oldest first.
    order: VecDeque<Arc<str>>,
    ids: HashSet<Arc<str>>,
}

impl DedupWindow {
    pub(crate) fn new(downstream: &str, capacity: usize) -> DedupWindow {
        DedupWindow {
            prefix: format!("downstream/{downstream}/"),
            capacity: capacity.max(1),
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    /// The window as the store has it, and the store keys beyond its
    /// capacity (the oldest), to release. Blocking (a store read).
    pub(crate) fn load(
        store: &Store,
        downstream: &str,
        capacity: usize,
    ) -> Result<(DedupWindow, Vec<String>), StoreError> {
        let mut window = DedupWindow::new(downstream, capacity);
        let mut keys = store.dedup_keys(&window.prefix)?;
        keys.sort_by_key(|(_, seq)| *seq);
        let excess = keys.len().saturating_sub(window.capacity);
        let release = keys.drain(..excess).map(|(key, _)| key).collect();
        for (key, _) in keys {
            if let Some(id) = key.strip_prefix(&window.prefix) {
                window.remember(Arc::from(id));
            }
        }
        Ok((window, release))
    }

    /// The store key of `id`.
    pub(crate) fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Remembers `id` (not [`contains`](Self::contains)ed); returns the
    /// store key of the id it pushed out, if it did.
    pub(crate) fn insert(&mut self, id: &str) -> Option<String> {
        self.remember(Arc::from(id));
        if self.order.len() <= self.capacity {
            return None;
        }
        let oldest = self.order.pop_front()?;
        self.ids.remove(&oldest);
        Some(self.key(&oldest))
    }

    /// Forgets `id`: its message was not committed (a redelivery must be
    /// published).
    pub(crate) fn forget(&mut self, id: &str) {
        if self.ids.remove(id)
            && let Some(at) = self.order.iter().rposition(|i| &**i == id)
        {
            self.order.remove(at);
        }
    }

    fn remember(&mut self, id: Arc<str>) {
        if self.ids.insert(Arc::clone(&id)) {
            self.order.push_back(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;

    #[test]
    fn the_oldest_id_is_pushed_out_beyond_capacity() {
        let mut w = DedupWindow::new("cmd", 2);
        assert_eq!(w.insert("a"), None);
        assert_eq!(w.insert("b"), None);
        assert!(w.contains("a") && w.contains("b"));
        assert_eq!(w.insert("c").as_deref(), Some("downstream/cmd/a"));
        assert!(!w.contains("a"));
        assert_eq!(w.len(), 2);
        w.forget("c");
        assert!(!w.contains("c"));
        assert_eq!(w.insert("d"), None, "a forgotten id frees its place");
        assert_eq!(w.insert("e").as_deref(), Some("downstream/cmd/b"));
        w.forget("nothing");
        assert_eq!(w.len(), 2);
    }

    #[tokio::test]
    async fn the_window_survives_a_reopen_trimmed_to_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = edge_store::StoreOptions {
            max_bytes: 1 << 30,
            batch_max_messages: NonZeroUsize::MIN,
            batch_max_bytes: NonZeroUsize::MIN,
            inbox_capacity: NonZeroUsize::MIN,
            cursors: Vec::new(),
            retire_without_cursors: true,
            when_full: edge_store::WhenFull::Reject,
            min_free: 0,
            max_age: None,
        };
        let store = Store::open(dir.path(), options).expect("open");
        for id in ["m1", "m2", "m3"] {
            let placement = edge_store::Placement {
                log: true,
                dedup: Some(format!("downstream/cmd/{id}")),
                ..edge_store::Placement::default()
            };
            let commit = store
                .submit_with(
                    edge_store::Record::new(bytes::Bytes::from_static(b"x")),
                    placement,
                )
                .await
                .expect("submitted");
            commit.await.expect("committed");
        }
        let other = edge_store::Placement {
            log: true,
            dedup: Some("downstream/cmdx/m9".into()),
            ..edge_store::Placement::default()
        };
        let commit = store
            .submit_with(
                edge_store::Record::new(bytes::Bytes::from_static(b"y")),
                other,
            )
            .await
            .expect("submitted");
        commit.await.expect("committed");

        let (w, release) = DedupWindow::load(&store, "cmd", 2).expect("loaded");
        assert_eq!(release, ["downstream/cmd/m1"]);
        assert!(!w.contains("m1"));
        assert!(w.contains("m2") && w.contains("m3"));
        assert!(!w.contains("m9"), "another downstream's ids are its own");
        assert_eq!(w.len(), 2);
    }
}
