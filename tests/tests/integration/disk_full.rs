//! A data directory on a filesystem smaller than the quota: when the disk,
//! not the quota, runs out, the gateway refuses new data like a full quota
//! and stays up; forwarding frees the space and publishes are accepted
//! again. Needs root for a small tmpfs; skipped (with the reason) otherwise.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::http::{get, metric};
use edge_tests::mqtt::publish_one;
use edge_tests::{Publisher, TestGateway, unique, wait_for};

use crate::{LONG, SHORT};

/// A tmpfs of a fixed size on a temporary directory, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// `None` (with the reason) where this test cannot mount one.
    fn mount(size: &str) -> Result<std::result::Result<SmallFs, String>> {
        let dir = tempfile::Builder::new().prefix("edgetest-fs-").tempdir()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(Ok(SmallFs { dir })),
            Ok(out) => Ok(Err(format!(
                "mount -t tmpfs failed (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))),
            Err(e) => Ok(Err(format!("cannot run mount: {e}"))),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_refuses_publishes_keeps_every_acked_one_and_recovers() -> Result<()> {
    let fs = match SmallFs::mount("16m")? {
        Ok(fs) => fs,
        Err(reason) => {
            eprintln!("SKIPPED disk_full: {reason}");
            return Ok(());
        }
    };
    let node = crate::shared_node().await?;
    // A broker user that does not exist yet: the backlog stays on the disk.
    let user = unique("edge-disk");
    let uri = format!("amqp://{user}:secret@127.0.0.1:{}/%2f", node.amqp_port());
    let prefix = unique("disk");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let data_dir = fs.path().join("data");
    let mut gw = TestGateway::builder()
        // The default 1 GiB quota is far beyond this 16 MiB filesystem.
        .set(
            "gateway.data_dir",
            &format!("{:?}", data_dir.display().to_string()),
        )
        .set("store.min_free", "\"2MiB\"")
        .upstream("disk", std::slice::from_ref(&uri))
        .route("all", &format!("{prefix}/#"), "disk")
        .spawn(crate::gateway_bin())
        .await?;
    assert!(
        gw.log()
            .contains("store.max_bytes exceeds what the filesystem can hold"),
        "no start-up warning about the quota: {}",
        gw.log()
    );

    // About 4 KiB per message; the disk fills after ~3,000.
    let filler = "f".repeat(4000);
    let topic = format!("{prefix}/fill");
    let (t, name) = (topic.clone(), filler.clone());
    let report = Publisher::new(gw.mqtt_addr(), &unique("filler"))
        .inflight(1)
        .run(20_000, Duration::from_secs(120), move |i| {
            (t.clone(), crate::payload(&name, i))
        })
        .await;
    let accepted = report.acked.len() as u64;
    assert!(
        accepted > 100 && accepted < 20_000,
        "the disk did not fill, or nothing was accepted: {} acked, {:?}",
        accepted,
        report.error
    );
    eprintln!("disk_full: {accepted} messages of 4 KiB accepted on a 16 MiB filesystem");

    // Still up, refuses more, says why, counts each refusal once.
    assert!(
        publish_one(gw.mqtt_addr(), &topic, filler.as_bytes())
            .await
            .is_err(),
        "a publish past the full disk was acknowledged"
    );
    let (status, body) = get(gw.metrics_addr(), "/healthz").await?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("store: full"), "{body}");
    let text = gw.metrics().await?;
    let rejected = metric(
        &text,
        "edge_store_rejected_total",
        &["reason=\"disk_full\""],
    )
    .context("edge_store_rejected_total{reason=disk_full}")?;
    assert!(rejected >= 2.0, "{rejected}");
    let quota = metric(&text, "edge_store_rejected_total", &["reason=\"full\""]).unwrap_or(0.0);
    let dropped = metric(
        &text,
        "edge_messages_dropped_total",
        &["reason=\"store_full\""],
    )
    .context("edge_messages_dropped_total{reason=store_full}")?;
    assert_eq!(rejected + quota, dropped, "one refusal, one count");
    assert_eq!(
        metric(&text, "edge_store_commit_failures_total", &[]),
        Some(0.0),
        "a full disk is not a store failure"
    );

    // A crash and a restart on the full directory: it comes up and stays up.
    gw.restart().await?;
    assert!(
        publish_one(gw.mqtt_addr(), &topic, filler.as_bytes())
            .await
            .is_err(),
        "the restarted gateway took data into the full disk"
    );
    let (status, body) = get(gw.metrics_addr(), "/healthz").await?;
    assert_eq!(status, 200, "{body}");
    assert!(gw.pid().is_some());

    // The user appears: the backlog drains, every acknowledged message with it.
    let ctl_user = user.clone();
    crate::blocking(move || {
        node.ctl(&["add_user", &ctl_user, "secret"])?;
        node.ctl(&["set_permissions", "-p", "/", &ctl_user, ".*", ".*", ".*"])
    })
    .await?;
    let last = crate::payload(&filler, accepted - 1);
    let drained = queue
        .take_until(LONG, |got| got.iter().any(|m| m.body == last))
        .await?;
    let per_publisher = crate::check_order_and_identity(gw.id(), &drained)?;
    let got: Vec<u64> = per_publisher.into_values().flatten().collect();
    assert_eq!(
        got,
        (0..accepted).collect::<Vec<_>>(),
        "every PUBACKed message, once, in order"
    );

    // Space came back by itself: publishes are accepted again.
    wait_for("the store to accept again", SHORT, || async {
        publish_one(gw.mqtt_addr(), &topic, b"again").await.ok()
    })
    .await?;
    let (_, body) = get(gw.metrics_addr(), "/healthz").await?;
    assert!(!body.contains("store: full"), "{body}");

    gw.terminate(SHORT).await?;
    queue.delete().await?;
    drop(fs);
    crate::blocking(move || node.ctl(&["delete_user", &user])).await
}
