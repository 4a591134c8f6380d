//! A damaged store file at start-up: salvaged and moved aside by default so
//! the gateway keeps accepting data and forwards what could be read, or a
//! refusal to start with `on_corrupt = "refuse"`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use std::path::Path;

use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::mqtt::publish_one;
use edge_tests::{Publisher, TestGateway, unique};

use crate::{LONG, gateway_bin, message_seq, parse_payload, payload, shared_node};

/// redb's page size: the unit of damage.
const PAGE: usize = 4096;
const MESSAGES: u64 = 2_000;

fn root_with_damaged_store() -> anyhow::Result<tempfile::TempDir> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("edge.redb"), vec![0xAB_u8; 64 * 1024])?;
    Ok(root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_moved_aside_and_the_gateway_starts_fresh() -> anyhow::Result<()> {
    let gw = TestGateway::builder()
        .root(root_with_damaged_store()?)
        .start()
        .await?;

    let names: Vec<String> = std::fs::read_dir(gw.data_dir())?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("edge.redb.corrupt-")),
        "the damaged file was not kept aside: {names:?}"
    );
    let before = gw.store().stats().next_seq;
    publish_one(gw.mqtt_addr(), &unique("after/corruption"), b"accepted").await?;
    // Committed (it has a seq); with no upstream nothing keeps it after.
    assert_eq!(
        gw.store().stats().next_seq,
        before + 1,
        "the fresh store took the message"
    );
    gw.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_corrupt_refuse_keeps_the_file_and_does_not_start() -> anyhow::Result<()> {
    // The builder deletes its root when start fails; the damaged data
    // directory lives outside it (linked in) so the test can look at it.
    let outer = root_with_damaged_store()?;
    let data = outer.path().join("data");
    let root = tempfile::tempdir()?;
    std::os::unix::fs::symlink(&data, root.path().join("data"))?;
    let result = TestGateway::builder()
        .set("store.on_corrupt", "\"refuse\"")
        .root(root)
        .start()
        .await;
    let err = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        err.contains("damaged"),
        "the gateway started on a damaged store: {err:?}"
    );
    assert!(
        data.join("edge.redb").exists(),
        "the damaged file was moved despite \"refuse\""
    );
    Ok(())
}

/// The counters `0..count` of `publisher`'s payloads that one of the
/// `damaged` pages held (they may be lost).
fn held_by(damaged: &[Vec<u8>], publisher: &str, count: u64) -> BTreeSet<u64> {
    (0..count)
        .filter(|&i| {
            let p = payload(publisher, i);
            damaged
                .iter()
                .any(|page| page.windows(p.len()).any(|w| w == &p[..]))
        })
        .collect()
}

/// Flips every byte of the pages of the store file in `data` that hold a
/// copy of one of `needles`; returns the damaged pages' bytes as they were.
fn damage_pages_holding(data: &Path, needles: &[Vec<u8>]) -> anyhow::Result<Vec<Vec<u8>>> {
    let path = data.join("edge.redb");
    let mut bytes = std::fs::read(&path)?;
    let mut pages = BTreeSet::new();
    for needle in needles {
        for (at, window) in bytes.windows(needle.len()).enumerate() {
            if window == &needle[..] {
                pages.insert(at / PAGE);
            }
        }
    }
    anyhow::ensure!(!pages.is_empty(), "no page holds the messages to damage");
    let mut before = Vec::new();
    let len = bytes.len();
    for &p in &pages {
        let page = &mut bytes[p * PAGE..((p + 1) * PAGE).min(len)];
        before.push(page.to_vec());
        for b in page.iter_mut() {
            *b ^= 0xFF;
        }
    }
    std::fs::write(&path, bytes)?;
    Ok(before)
}

/// Issue 9: one damaged page used to cost every message in the store. The
/// gateway is restarted on a store with two damaged pages: every PUBACKed
/// message that was on neither reaches the broker, under its original
/// message id, and new messages get ids the old store never gave out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_salvaged_and_its_acknowledged_messages_reach_the_broker()
-> anyhow::Result<()> {
    let node = shared_node().await?;
    let prefix = unique("salvage");
    let route = |b: edge_tests::TestGatewayBuilder, uri: String| {
        b.upstream("central", &[uri])
            .route("telemetry", &format!("{prefix}/#"), "central")
    };
    // No broker at first: the PUBACKed messages wait in the store.
    let gw = route(
        TestGateway::builder(),
        "amqp://guest:guest@127.0.0.1:1/%2f".to_string(),
    )
    .start()
    .await?;
    let topic = format!("{prefix}/dev/data");
    let publish = {
        let topic = topic.clone();
        move |i| (topic.clone(), payload("salvage", i))
    };
    let report = Publisher::new(gw.mqtt_addr(), &unique("dev"))
        .run(MESSAGES, LONG, publish)
        .await;
    assert!(report.all_acked(MESSAGES), "publisher: {report:?}");
    // The seq each message was stored under (its id upstream).
    let mut seq_of = BTreeMap::new();
    for entry in gw.store().read(0, usize::MAX, usize::MAX)? {
        let bytes = entry.record.bytes();
        if let Some(i) = (0..MESSAGES).find(|&i| {
            let p = payload("salvage", i);
            bytes.windows(p.len()).any(|w| w == &p[..])
        }) {
            seq_of.insert(i, entry.seq);
        }
    }
    assert_eq!(seq_of.len() as u64, MESSAGES, "every message is in the log");
    let id = gw.id().to_string();
    let data = gw.data_dir().to_path_buf();
    let root = gw.shutdown().await?;

    // The first message's page (the open reads it) and one in the middle.
    let damaged = damage_pages_holding(&data, &[payload("salvage", 0), payload("salvage", 1_000)])?;
    let maybe_lost = held_by(&damaged, "salvage", MESSAGES);
    assert!(
        maybe_lost.len() < 200,
        "two pages hold a few dozen messages"
    );

    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let gw = route(TestGateway::builder().id(&id), node.amqp_uri())
        .root(root)
        .start()
        .await?;
    let names: Vec<String> = std::fs::read_dir(gw.data_dir())?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("edge.redb.corrupt-")),
        "the damaged file was not kept aside: {names:?}"
    );
    let must: BTreeSet<u64> = (0..MESSAGES).filter(|i| !maybe_lost.contains(i)).collect();
    let mut got = BTreeMap::new();
    let received = queue
        .take_until(LONG, |so_far| {
            for m in so_far {
                if let Ok((_, i)) = parse_payload(&m.body) {
                    got.insert(i, ());
                }
            }
            must.iter().all(|i| got.contains_key(i))
        })
        .await?;
    let mut forwarded = BTreeSet::new();
    for m in &received {
        let (_, i) = parse_payload(&m.body)?;
        assert_eq!(
            message_seq(&id, m)?,
            seq_of[&i],
            "message {i} came back under another id"
        );
        forwarded.insert(i);
    }
    assert!(
        !forwarded.contains(&0),
        "message 0 was only on a damaged page, yet it was forwarded"
    );

    let metrics = gw.metrics().await?;
    let salvaged_log = metrics
        .lines()
        .find(|l| l.starts_with("edge_store_salvaged_total{table=\"log\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(
        salvaged_log.is_some_and(|n| n >= must.len() as u64),
        "edge_store_salvaged_total{{table=\"log\"}}: {salvaged_log:?}"
    );

    // New messages get seqs above the damaged store's.
    publish_one(gw.mqtt_addr(), &topic, &payload("salvage", MESSAGES)).await?;
    let after = queue
        .take_until(LONG, |so_far| {
            so_far
                .iter()
                .any(|m| parse_payload(&m.body).is_ok_and(|(_, i)| i == MESSAGES))
        })
        .await?;
    let newest = after
        .iter()
        .find(|m| parse_payload(&m.body).is_ok_and(|(_, i)| i == MESSAGES))
        .map(|m| message_seq(&id, m))
        .transpose()?;
    let highest_old = seq_of.values().copied().max().unwrap_or(0);
    assert!(
        newest.is_some_and(|s| s > highest_old),
        "new message seq {newest:?}, old store went up to {highest_old}"
    );
    gw.shutdown().await?;
    Ok(())
}

/// Issue 9's own case: the gateway is killed (`kill -9`: the store file is
/// not closed, its newest batches are in the journal only) and then a page
/// of the file is found damaged. The restarted gateway finds the damage at
/// open, salvages the file and the journal, says so in one ERROR line with
/// the counts, and forwards every PUBACKed message that was not on the
/// damaged page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_whose_store_lost_a_page_forwards_the_rest_after_restart()
-> anyhow::Result<()> {
    const KILLED: u64 = 12_000;
    let node = shared_node().await?;
    let prefix = unique("salvage-kill");
    let nowhere = "amqp://guest:guest@127.0.0.1:1/%2f".to_string();
    let mut gw = TestGateway::builder()
        .upstream("central", std::slice::from_ref(&nowhere))
        .route("telemetry", &format!("{prefix}/#"), "central")
        .spawn(gateway_bin())
        .await?;
    let topic = format!("{prefix}/dev/data");
    let publish = {
        let topic = topic.clone();
        move |i| (topic.clone(), payload("killed", i))
    };
    // The first half, then a clean stop: its checkpoint folds them into
    // the file. The second half is in the journal only when the kill comes.
    const HALF: u64 = KILLED / 2;
    let report = Publisher::new(gw.mqtt_addr(), &unique("dev"))
        .run(HALF, LONG, publish.clone())
        .await;
    assert!(report.all_acked(HALF), "publisher: {report:?}");
    let status = gw.terminate(LONG).await?;
    anyhow::ensure!(status.success(), "the gateway's clean stop: {status}");
    gw.restart().await?;
    let report = Publisher::new(gw.mqtt_addr(), &unique("dev"))
        .run(HALF, LONG, move |i| publish(HALF + i))
        .await;
    assert!(report.all_acked(HALF), "publisher: {report:?}");
    gw.kill().await?;

    // A message the checkpoints folded into the file (not only in the
    // journal): its page is lost.
    let damaged = damage_pages_holding(&gw.data_dir(), &[payload("killed", 1_000)])?;
    let maybe_lost = held_by(&damaged, "killed", KILLED);
    assert!(
        maybe_lost.len() < 200,
        "one page holds a few dozen messages"
    );

    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let config = std::fs::read_to_string(gw.config_path())?;
    anyhow::ensure!(
        config.contains(&nowhere),
        "the upstream is not in the config"
    );
    std::fs::write(gw.config_path(), config.replace(&nowhere, &node.amqp_uri()))?;
    gw.restart().await?;

    let must: BTreeSet<u64> = (0..KILLED).filter(|i| !maybe_lost.contains(i)).collect();
    let mut got = BTreeSet::new();
    queue
        .take_until(LONG, |so_far| {
            for m in so_far {
                if let Ok((_, i)) = parse_payload(&m.body) {
                    got.insert(i);
                }
            }
            must.is_subset(&got)
        })
        .await?;
    assert!(
        !got.contains(&1_000),
        "message 1000 was on the damaged page only"
    );
    let log = std::fs::read_to_string(gw.log_path())?;
    let line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("salvaged="))
        .with_context(|| format!("no salvage ERROR line in the log:\n{}", gw.log()))?;
    eprintln!("{line}");
    // The batches after the last checkpoint were in the journal only.
    let frames: u64 = line
        .split("journal_frames=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no journal_frames in {line:?}"))?;
    assert!(frames > 0, "the journal was not replayed: {line}");
    assert!(line.contains("lost=") && line.contains("log="), "{line}");
    gw.kill().await?;
    Ok(())
}
