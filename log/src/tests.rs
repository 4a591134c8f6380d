use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// Collects formatted log lines.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
    fn count(&self) -> usize {
        self.text().lines().count()
    }
}

/// `flush_all` reaches every summary of the process: tests that count
/// lines must not run while another test flushes.
static SERIAL: Mutex<()> = Mutex::new(());

fn capture<T>(f: impl FnOnce() -> T) -> (T, Lines) {
    let _serial = lock(&SERIAL);
    let lines = Lines::default();
    let writer = lines.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    (out, lines)
}

#[test]
fn a_flood_is_one_line_then_one_summary_with_the_exact_count() {
    static FLOOD: Summary = Summary::new("test flood", Level::Warn);
    let ((), lines) = capture(|| {
        for i in 0..10_000 {
            FLOOD.record("limit", || format!("peer {i}"));
        }
        // The first event was written at once; the rest wait for the interval.
        assert_eq!(FLOOD.pending(), 9_999);
        FLOOD.flush(Instant::now(), false);
        assert_eq!(FLOOD.pending(), 9_999, "not due yet");
        FLOOD.flush(Instant::now(), true);
    });
    assert_eq!(FLOOD.pending(), 0);
    let text = lines.text();
    assert_eq!(lines.count(), 2, "{text}");
    assert!(text.contains("count=1 "), "{text}");
    assert!(text.contains("count=9999 "), "{text}");
    // The example of the second line is the first event it covers.
    assert!(text.contains("example=\"peer 1\""), "{text}");
    assert!(
        text.contains("reason=\"limit\"") || text.contains("reason=limit"),
        "{text}"
    );
}

#[test]
fn keys_are_reported_separately() {
    static KEYED: Summary = Summary::new("test keyed", Level::Info);
    let ((), lines) = capture(|| {
        KEYED.record("a", String::new);
        KEYED.record("b", String::new);
        KEYED.record("a", String::new);
        KEYED.flush(Instant::now(), true);
    });
    // a (at once), b (at once), a (pending, flushed).
    assert_eq!(lines.count(), 3, "{}", lines.text());
}

#[test]
fn a_quiet_stretch_is_flushed_by_the_timer_once_due() {
    static SHORT: Summary = Summary::every("test short", Level::Error, Duration::from_millis(1));
    let ((), lines) = capture(|| {
        SHORT.record("k", String::new);
        SHORT.record("k", String::new);
        SHORT.record("k", String::new);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Due after 1 ms; bounded wait for the interval to pass.
        while SHORT.pending() > 0 && Instant::now() < deadline {
            std::thread::yield_now();
            SHORT.flush(Instant::now(), false);
        }
    });
    assert_eq!(SHORT.pending(), 0);
    assert!(lines.text().contains("count=2"), "{}", lines.text());
}

#[test]
fn keys_beyond_the_bound_are_counted_not_lost() {
    static MANY: Summary = Summary::new("test many", Level::Info);
    const NAMES: [&str; 20] = [
        "k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9", "k10", "k11", "k12", "k13",
        "k14", "k15", "k16", "k17", "k18", "k19",
    ];
    let ((), _lines) = capture(|| {
        for _ in 0..2 {
            for name in NAMES {
                MANY.record(name, String::new);
            }
        }
        // First round: 16 keys logged at once, 4 overflowed into the last
        // key (pending). Second round: everything pending.
        assert_eq!(MANY.pending(), 4 + 20);
        assert_eq!(lock(&MANY.keys).len(), MAX_KEYS);
        MANY.flush(Instant::now(), true);
    });
    assert_eq!(MANY.pending(), 0);
}

#[test]
fn summaries_register_on_first_use_for_the_timer() {
    static LATE: Summary = Summary::new("test registry", Level::Info);
    let registered = || lock(&REGISTRY).iter().any(|s| std::ptr::eq(*s, &LATE));
    assert!(!registered());
    let ((), _lines) = capture(|| {
        LATE.record("k", String::new);
        LATE.record("k", String::new);
    });
    assert!(registered());
    let ((), _lines) = capture(flush_all);
    assert_eq!(
        LATE.pending(),
        0,
        "flush_all reaches every registered summary"
    );
}
