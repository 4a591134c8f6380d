//! Shared by the store benches (`benches/store_append.rs`) and the
//! `store-figures` binary: a store on a counting (optionally slow-fsync)
//! backend in a temporary directory, and appenders that loop `Store::append`.
//! [`topic_match`] holds the cases of the topic-matching bench
//! (`benches/trie.rs`) and of the `trie-figures` binary; [`mqtt`] the MQTT
//! clients and brokers of `mqtt-load` and `session-figures`.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_store::{BackendCounters, Record, SlowSyncBackend, Store, StoreOptions};

pub mod mqtt;
pub mod topic_match;

/// fsync delay that stands in for an SD card (5–50 ms per fsync).
pub const SD_CARD_SYNC: Duration = Duration::from_millis(10);

/// A store in its own temporary directory; the directory goes with it.
#[derive(Debug)]
pub struct BenchStore {
    pub store: Store,
    pub counters: Arc<BackendCounters>,
    dir: tempfile::TempDir,
}

impl BenchStore {
    /// Opens a fresh store whose fsync takes at least `sync_delay`. The data
    /// directory is under `target/` (a real disk, not tmpfs).
    pub fn open(sync_delay: Duration) -> std::io::Result<BenchStore> {
        let base = std::env::var_os("CARGO_TARGET_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
            });
        std::fs::create_dir_all(&base)?;
        let dir = tempfile::Builder::new()
            .prefix("edge-bench-")
            .tempdir_in(base)?;
        let backend = SlowSyncBackend::open(&dir.path().join(edge_store::DB_FILE), sync_delay)
            .map_err(std::io::Error::other)?;
        let counters = backend.counters();
        let store = Store::open_with_backend(backend, dir.path(), options())
            .map_err(std::io::Error::other)?;
        Ok(BenchStore {
            store,
            counters,
            dir,
        })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Store options of the benches: no quota, no cursor (nothing retired).
pub fn options() -> StoreOptions {
    StoreOptions {
        retire_without_cursors: false,
        max_bytes: u64::MAX,
        batch_max_messages: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
        batch_max_bytes: NonZeroUsize::new(8 << 20).unwrap_or(NonZeroUsize::MIN),
        inbox_capacity: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
        cursors: Vec::new(),
        when_full: Default::default(),
        min_free: 0,
        max_age: None,
    }
}

/// A record as an MQTT device would send it, with `payload` bytes of payload.
pub fn record(appender: usize, n: u64, payload: &Bytes) -> Record {
    let mut m = edge_core::Message::new(
        format!("site/line-{appender}/sensor/temperature"),
        payload.clone(),
        edge_core::QoS::AtLeastOnce,
        format!("device-{appender}").into(),
    );
    m.timestamp_ms = 1_700_000_000_000 + n;
    // A topic and publisher this short always fit the format.
    m.to_record().unwrap_or_default()
}

/// When the appenders stop.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// Each appender does this many appends.
    Count(u64),
    /// Each appender loops until this instant.
    Deadline(Instant),
}

/// Runs `appenders` tasks, each looping `store.append` (waiting for each
/// commit before the next), and returns every append's latency
/// (submit to durable).
pub async fn run_appenders(
    store: &Store,
    appenders: usize,
    payload_len: usize,
    until: Until,
) -> Result<Vec<Duration>, edge_store::AppendError> {
    let payload = Bytes::from(vec![0xA5; payload_len]);
    let mut tasks = Vec::with_capacity(appenders);
    for a in 0..appenders {
        let store = store.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            loop {
                match until {
                    Until::Count(c) if n >= c => break,
                    Until::Deadline(d) if Instant::now() >= d => break,
                    _ => {}
                }
                let started = Instant::now();
                store.append(record(a, n, &payload)).await?;
                latencies.push(started.elapsed());
                n += 1;
            }
            Ok::<_, edge_store::AppendError>(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        match t.await {
            Ok(latencies) => all.extend(latencies?),
            Err(e) => return Err(edge_store::AppendError::Io(format!("appender task: {e}"))),
        }
    }
    Ok(all)
}
