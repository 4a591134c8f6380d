//! Write amplification of the store: bytes written per message for a
//! trickle (one append per commit) and for bursts (4 appenders × 100 in
//! flight), with every batch a durable redb commit ("redb only", the store
//! before the journal) and with the write-ahead journal ("journal", what
//! `Store::open` does). Each case runs on a fresh store in the target dir
//! (a real disk) and counts from the first append through `close`, so the
//! journal's final fold into redb is included.
//!
//! - **disk B/msg**: `/proc/self/io` `write_bytes` (page-granular, what
//!   reaches the block layer) per message;
//! - **handed B/msg**: bytes the store handed to `write` (database and
//!   journal) per message; **syncs**: `sync_data` calls.
//!
//! "backlog": no cursor, every record stays (an upstream that is down);
//! "forwarded": a cursor follows the acknowledgements, lazily (its moves
//! ride in the next append's commit, `advance_cursor_lazily`), as a forwarder does
//! when the upstream is up, so records are retired soon after they land.
//!
//! `cargo run --release -p edge-benches --bin store-wa [-- TRICKLE BURST_ROUNDS]`

use std::sync::Arc;

use bytes::Bytes;
use edge_benches::record;
use edge_store::{BackendCounters, SlowSyncBackend, Store, StoreOptions};

const PAYLOAD: usize = 100;

/// `write_bytes` of /proc/self/io.
fn proc_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    RedbOnly,
    Journal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// This many appends, each awaited before the next.
    Trickle(u64),
    /// This many rounds of 4 appenders submitting 100 each, then awaiting them.
    Burst(u64),
}

struct Opened {
    store: Store,
    counters: Vec<Arc<BackendCounters>>,
    _dir: tempfile::TempDir,
}

fn options(forwarded: bool) -> StoreOptions {
    let mut options = edge_benches::options();
    if forwarded {
        options.cursors = vec!["up".to_string()];
    }
    options
}

fn open(mode: Mode, forwarded: bool) -> anyhow::Result<Opened> {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::Builder::new()
        .prefix("edge-wa-")
        .tempdir_in(base)?;
    let zero = std::time::Duration::ZERO;
    let db = SlowSyncBackend::open(&dir.path().join(edge_store::DB_FILE), zero)?;
    let mut counters = vec![db.counters()];
    let store = match mode {
        Mode::RedbOnly => Store::open_with_backend(db, dir.path(), options(forwarded))?,
        Mode::Journal => {
            let journal =
                SlowSyncBackend::open_journal(&dir.path().join(edge_store::JOURNAL_FILE), zero)?;
            counters.push(journal.counters());
            Store::open_with_journal(
                db,
                journal,
                edge_store::JOURNAL_BYTES,
                dir.path(),
                options(forwarded),
            )?
        }
    };
    Ok(Opened {
        store,
        counters,
        _dir: dir,
    })
}

async fn run(store: &Store, load: Load, forwarded: bool) -> anyhow::Result<u64> {
    let payload = Bytes::from(vec![0xA5; PAYLOAD]);
    match load {
        Load::Trickle(n) => {
            // As a forwarder does: the cursor moves lazily, in the
            // background, and rides in the next append's commit.
            let mut moves = Vec::new();
            for i in 0..n {
                let seq = store.append(record(0, i, &payload)).await?;
                if forwarded {
                    let store = store.clone();
                    moves.push(tokio::spawn(async move {
                        store.advance_cursor_lazily("up", seq + 1).await
                    }));
                }
            }
            for m in moves {
                m.await??;
            }
            Ok(n)
        }
        Load::Burst(rounds) => {
            let mut tasks = Vec::new();
            for a in 0..4usize {
                let store = store.clone();
                let payload = payload.clone();
                tasks.push(tokio::spawn(async move {
                    for r in 0..rounds {
                        let mut commits = Vec::with_capacity(100);
                        for i in 0..100 {
                            commits.push(store.submit(record(a, r * 100 + i, &payload)).await?);
                        }
                        let mut last = 0;
                        for c in commits {
                            last = c.await?;
                        }
                        if forwarded {
                            store.advance_cursor_lazily("up", last + 1).await?;
                        }
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok(rounds * 400)
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let trickle: u64 = args.next().map_or(Ok(200), |s| s.parse())?;
    let rounds: u64 = args.next().map_or(Ok(50), |s| s.parse())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let size = record(0, 0, &Bytes::from(vec![0xA5; PAYLOAD])).encoded_len();
    println!("payload {PAYLOAD} B, record {size} B (encoded message)");
    println!(
        "| store | load | cursor | messages | disk B/msg | disk ÷ record | handed B/msg | syncs | commits |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    for load in [Load::Trickle(trickle), Load::Burst(rounds)] {
        for forwarded in [false, true] {
            for mode in [Mode::RedbOnly, Mode::Journal] {
                let opened = open(mode, forwarded)?;
                let handed0: u64 = opened.counters.iter().map(|c| c.bytes_written()).sum();
                let syncs0: u64 = opened.counters.iter().map(|c| c.syncs()).sum();
                let disk0 = proc_write_bytes();
                let messages = rt.block_on(run(&opened.store, load, forwarded))?;
                let commits = opened.store.commits();
                rt.block_on(opened.store.clone().close())?;
                drop(opened.store);
                let disk = proc_write_bytes().saturating_sub(disk0) as f64 / messages as f64;
                let handed: u64 = opened.counters.iter().map(|c| c.bytes_written()).sum();
                let syncs: u64 = opened.counters.iter().map(|c| c.syncs()).sum();
                println!(
                    "| {} | {} | {} | {messages} | {disk:.0} | {:.2} | {:.0} | {} | {commits} |",
                    match mode {
                        Mode::RedbOnly => "redb only",
                        Mode::Journal => "journal",
                    },
                    match load {
                        Load::Trickle(_) => "trickle 1/commit",
                        Load::Burst(_) => "burst 4×100",
                    },
                    if forwarded { "forwarded" } else { "backlog" },
                    disk / size as f64,
                    (handed - handed0) as f64 / messages as f64,
                    syncs - syncs0,
                );
            }
        }
    }
    Ok(())
}
