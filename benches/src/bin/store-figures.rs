//! Prints the store's figures for each (appenders, payload, backend) case:
//! durable messages/s, ack and commit latency, mean batch size and bytes
//! written per message (write amplification).
//!
//! `cargo run --release -p edge-benches --bin store-figures [-- SECONDS]`

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edge_benches::{BenchStore, SD_CARD_SYNC, Until, run_appenders};
use metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, SharedString, Unit};

/// Keeps the samples of `edge_store_commit_seconds`; everything else is dropped.
#[derive(Debug, Default)]
struct CommitSamples(Mutex<Vec<f64>>);

impl HistogramFn for CommitSamples {
    fn record(&self, value: f64) {
        if let Ok(mut v) = self.0.lock() {
            v.push(value);
        }
    }
}

#[derive(Debug)]
struct Recorder(Arc<CommitSamples>);

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == "edge_store_commit_seconds" {
            Histogram::from_arc(Arc::clone(&self.0))
        } else {
            Histogram::noop()
        }
    }
}

/// `write_bytes` of /proc/self/io: bytes this process sent to the block layer.
fn proc_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds: f64 = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 2.0,
    };
    let samples = Arc::new(CommitSamples::default());
    metrics::set_global_recorder(Recorder(Arc::clone(&samples)))
        .map_err(|e| format!("metrics recorder: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!(
        "| backend | appenders | payload | msgs/s | ack mean ms | ack p99 ms | commit mean ms | commit p99 ms | mean batch | backend B/msg | disk B/msg |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let backends = [("file", Duration::ZERO), ("slow-sync 10ms", SD_CARD_SYNC)];
    for (backend, delay) in backends {
        for payload in [64usize, 1024, 16 * 1024] {
            for appenders in [1usize, 8, 64] {
                let bench = BenchStore::open(delay)?;
                // Warm up: the first commits allocate the file's regions.
                rt.block_on(run_appenders(
                    &bench.store,
                    appenders,
                    payload,
                    Until::Count(5),
                ))?;
                if let Ok(mut s) = samples.0.lock() {
                    s.clear();
                }
                let commits0 = bench.store.commits();
                let bytes0 = bench.counters.bytes_written();
                let disk0 = proc_write_bytes();
                let started = Instant::now();
                let deadline = started + Duration::from_secs_f64(seconds);
                let acks = rt.block_on(run_appenders(
                    &bench.store,
                    appenders,
                    payload,
                    Until::Deadline(deadline),
                ))?;
                let elapsed = started.elapsed().as_secs_f64();
                let messages = acks.len() as f64;
                let commits = (bench.store.commits() - commits0) as f64;
                let backend_bytes = (bench.counters.bytes_written() - bytes0) as f64;
                let disk = match (disk0, proc_write_bytes()) {
                    (Some(a), Some(b)) => format!("{:.0}", b.saturating_sub(a) as f64 / messages),
                    _ => "n/a".to_string(),
                };
                let mut ack: Vec<f64> = acks.iter().map(|d| d.as_secs_f64() * 1e3).collect();
                ack.sort_by(f64::total_cmp);
                let mut commit: Vec<f64> = samples
                    .0
                    .lock()
                    .map(|s| s.iter().map(|v| v * 1e3).collect())
                    .unwrap_or_default();
                commit.sort_by(f64::total_cmp);
                println!(
                    "| {backend} | {appenders} | {payload} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} | {disk} |",
                    messages / elapsed,
                    mean(&ack),
                    percentile(&ack, 0.99),
                    mean(&commit),
                    percentile(&commit, 0.99),
                    messages / commits.max(1.0),
                    backend_bytes / messages,
                );
                rt.block_on(bench.store.clone().close())?;
            }
        }
    }
    Ok(())
}
