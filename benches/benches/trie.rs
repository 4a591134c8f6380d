//! Topic matching: the trie against today's per-session filter scan, with
//! 1 matching subscription, 1 matching among 1k–100k that do not, and
//! 10,000 matching (the cases are in `edge_benches::topic_match`).
//!
//! One criterion iteration is one topic matched and every match counted.
//! For (b)/(a) ratios on a busy machine prefer `trie-figures`, which
//! interleaves the cases.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use edge_benches::topic_match::{
    CASES, TOPIC, sessions_of, subscriptions, trie_match, trie_of, vec_scan_match,
};

fn topic_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_match");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, case, scan) in CASES {
        let subscriptions = subscriptions(case);

        let trie = trie_of(&subscriptions).expect("valid filters");
        assert_eq!(trie_match(&trie, TOPIC), case.matches(), "trie, {name}");
        group.bench_function(BenchmarkId::new("trie", name), |b| {
            b.iter(|| trie_match(&trie, black_box(TOPIC)))
        });

        if scan {
            let sessions = sessions_of(&subscriptions);
            assert_eq!(
                vec_scan_match(&sessions, TOPIC),
                case.matches(),
                "vec_scan, {name}"
            );
            group.bench_function(BenchmarkId::new("vec_scan", name), |b| {
                b.iter(|| vec_scan_match(&sessions, black_box(TOPIC)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, topic_match);
criterion_main!(benches);
