//! Store append throughput: 1, 8 and 64 concurrent appenders (tasks looping
//! `Store::append`), payloads of 64 B, 1 KiB and 16 KiB, on the plain file
//! backend and on one whose fsync takes 10 ms (SD-card class).
//!
//! One criterion iteration is one durable append; throughput is in
//! elements (messages) per second.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edge_benches::{BenchStore, SD_CARD_SYNC, Until, run_appenders};

const APPENDERS: [usize; 3] = [1, 8, 64];
const PAYLOADS: [usize; 3] = [64, 1024, 16 * 1024];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn bench_backend(c: &mut Criterion, name: &str, sync_delay: Duration, payloads: &[usize]) {
    let rt = runtime();
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    for &payload in payloads {
        for appenders in APPENDERS {
            let bench = BenchStore::open(sync_delay).expect("open bench store");
            let id = BenchmarkId::new(format!("{payload}B"), format!("{appenders}-appenders"));
            group.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let per = iters.div_ceil(appenders as u64);
                    let started = Instant::now();
                    rt.block_on(run_appenders(
                        &bench.store,
                        appenders,
                        payload,
                        Until::Count(per),
                    ))
                    .expect("appends");
                    // Report the time per requested iteration.
                    started
                        .elapsed()
                        .mul_f64(iters as f64 / (per * appenders as u64) as f64)
                })
            });
        }
    }
    group.finish();
}

fn store_append(c: &mut Criterion) {
    bench_backend(c, "store_append/file", Duration::ZERO, &PAYLOADS);
    bench_backend(c, "store_append/slow_sync_10ms", SD_CARD_SYNC, &[1024]);
}

criterion_group!(benches, store_append);
criterion_main!(benches);
