//! API SKETCH — to be replaced by the real implementation (see record.rs for the
//! record type). Every signature here is the contract other crates build against.

mod error;
mod record;

use std::future::Future;
use std::num::NonZeroUsize;
use std::path::Path;

pub use error::{AppendError, OpenError, StoreError};
pub use record::{DecodeError, Record};

/// Position in the log. The first appended record gets 1; 0 means "none".
pub type Seq = u64;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Quota on live record bytes (encoded size of records not yet retired).
    pub max_bytes: u64,
    /// Most appends in one group commit.
    pub batch_max_messages: NonZeroUsize,
    /// Most encoded bytes in one group commit.
    pub batch_max_bytes: NonZeroUsize,
    /// Capacity of the writer's inbox; a full inbox is back-pressure on callers.
    pub inbox_capacity: NonZeroUsize,
    /// Names of the cursors that hold records in the log (one per upstream).
    /// Records below the smallest of them are retired. Cursors stored under
    /// other names are deleted at open. With no cursor nothing is retired.
    pub cursors: Vec<String>,
}

/// Live figures, cheap to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Seq of the oldest record still in the log (0 when empty).
    pub first_seq: Seq,
    /// Seq the next append will get.
    pub next_seq: Seq,
    pub live_messages: u64,
    pub live_bytes: u64,
    pub max_bytes: u64,
}

/// Handle to the store; cheap to clone. The writer thread stops when the
/// last handle is dropped or [`Store::close`] is called.
#[derive(Debug, Clone)]
pub struct Store {}

/// Resolves once the append it belongs to is committed (or refused).
pub trait CommitFuture: Future<Output = Result<Seq, AppendError>> + Send + Unpin + 'static {}

impl Store {
    pub fn open(_path: &Path, _options: StoreOptions) -> Result<Store, OpenError> {
        unimplemented!()
    }

    /// Queues `record` for the next group commit. Waits only for room in
    /// the writer's inbox (back-pressure); the returned future resolves
    /// when the record is durable (`Durability::Immediate`) or refused.
    /// Records queued by one caller are committed in the order queued.
    pub async fn submit(&self, _record: Record) -> Result<Commit, AppendError> {
        unimplemented!()
    }

    /// `submit` then wait for the commit.
    pub async fn append(&self, record: Record) -> Result<Seq, AppendError> {
        self.submit(record).await?.await
    }

    /// Reads up to `max_messages` records (and roughly `max_bytes`) with
    /// seq >= `from`, in order. Blocking: call from `spawn_blocking`.
    pub fn read(
        &self,
        _from: Seq,
        _max_messages: usize,
        _max_bytes: usize,
    ) -> Result<Vec<(Seq, Record)>, StoreError> {
        unimplemented!()
    }

    /// The durable value of a cursor: the next seq its owner has to forward
    /// (everything below it is done). A cursor never set reads as the first
    /// seq in the log.
    pub fn cursor(&self, _name: &str) -> Result<Seq, StoreError> {
        unimplemented!()
    }

    /// Moves a cursor forward (never backward) in the next group commit and
    /// resolves once durable. Retires records no cursor needs any more.
    pub async fn advance_cursor(&self, _name: &str, _next: Seq) -> Result<(), StoreError> {
        unimplemented!()
    }

    /// Parks a record in the dead-letter table with a reason.
    pub async fn park(
        &self,
        _seq: Seq,
        _record: Record,
        _reason: String,
    ) -> Result<(), StoreError> {
        unimplemented!()
    }

    /// Watch of the last committed seq; changes after every commit.
    pub fn committed(&self) -> tokio::sync::watch::Receiver<Seq> {
        unimplemented!()
    }

    pub fn stats(&self) -> StoreStats {
        unimplemented!()
    }

    /// Lets queued work commit, then stops the writer thread.
    pub async fn close(self) -> Result<(), StoreError> {
        unimplemented!()
    }
}

/// See [`Store::submit`].
#[derive(Debug)]
pub struct Commit {
    rx: tokio::sync::oneshot::Receiver<Result<Seq, AppendError>>,
}

impl Future for Commit {
    type Output = Result<Seq, AppendError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(AppendError::Closed)))
    }
}
