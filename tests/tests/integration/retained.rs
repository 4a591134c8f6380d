//! Retained messages (MQTT-3.3.1-5..12) with real clients: stored durably
//! before the PUBACK, only the newest per topic, an empty payload clears,
//! delivered with RETAIN set on SUBSCRIBE for matching filters (wildcards
//! included, `$` topics only for filters naming them), across a kill -9.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use edge_tests::{TestGateway, unique};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::SHORT;

/// Runs `mosquitto_pub` with `args` against `port`; fails unless it exits 0.
async fn pub_(port: u16, args: &[&str]) -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-i",
                &unique("rpub"),
            ])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow!("mosquitto_pub hung"))??;
    if !out.status.success() {
        bail!(
            "mosquitto_pub {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Subscribes `filter` with mosquitto_sub and returns the lines
/// `<retain flag> <topic> <payload>` it prints, up to and including the
/// first one on `marker_topic`, which is published (not retained) once the
/// subscription is in place.
async fn received_until_marker(port: u16, filter: &str, marker_topic: &str) -> Result<Vec<String>> {
    let mut child = Command::new("stdbuf")
        .args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-i", &unique("rsub"), "-q", "1", "-d", "-F", "MSG %r %t %p"])
        .args(["-t", filter, "-t", marker_topic])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning mosquitto_sub")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut got = Vec::new();
    let mut marked = false;
    loop {
        let line = tokio::time::timeout(SHORT, lines.next_line())
            .await
            .map_err(|_| anyhow!("mosquitto_sub: nothing more within {SHORT:?}; got {got:?}"))??
            .ok_or_else(|| anyhow!("mosquitto_sub exited; got {got:?}"))?;
        if line.contains("received SUBACK") && !marked {
            marked = true;
            pub_(port, &["-q", "1", "-t", marker_topic, "-m", "marker"]).await?;
        }
        if let Some(msg) = line.strip_prefix("MSG ") {
            got.push(msg.to_string());
            if msg.contains(marker_topic) {
                let _ = child.kill().await;
                return Ok(got);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_durable_newest_only_and_cleared_by_empty_payloads() -> Result<()> {
    let mut gw = TestGateway::builder().spawn(crate::gateway_bin()).await?;
    let port = gw.mqtt_addr().port();
    let p = unique("ret");
    let t = |leaf: &str| format!("{p}/{leaf}");
    pub_(port, &["-r", "-q", "1", "-t", &t("a"), "-m", "one"]).await?;
    pub_(port, &["-r", "-q", "1", "-t", &t("a"), "-m", "two"]).await?;
    pub_(port, &["-r", "-q", "0", "-t", &t("b/deep"), "-m", "three"]).await?;
    pub_(port, &["-r", "-q", "1", "-t", &t("c"), "-m", "gone"]).await?;
    pub_(port, &["-r", "-q", "1", "-t", &t("c"), "-n"]).await?;
    pub_(
        port,
        &["-r", "-q", "1", "-t", "$edge/status", "-m", "dollar"],
    )
    .await?;

    // Durable: kill -9 and start again on the same data.
    gw.restart().await?;

    let marker = format!("{p}-marker");
    let got = received_until_marker(port, &format!("{p}/#"), &marker).await?;
    let (retained, live) = got.split_at(got.len() - 1);
    let mut retained = retained.to_vec();
    retained.sort();
    assert_eq!(
        retained,
        [
            format!("1 {} two", t("a")),
            format!("1 {} three", t("b/deep"))
        ],
        "newest per topic, RETAIN set, the cleared one absent"
    );
    assert_eq!(
        live,
        [format!("0 {marker} marker")],
        "live messages have RETAIN 0"
    );

    // '#' does not reach '$' topics; a filter naming the '$' level does.
    let all = received_until_marker(port, "#", &format!("{marker}2")).await?;
    assert!(all.iter().all(|l| !l.contains("$edge")), "{all:?}");
    let dollar = received_until_marker(port, "$edge/+", &format!("{marker}3")).await?;
    assert_eq!(dollar[0], "1 $edge/status dollar");
    gw.terminate(SHORT).await?;
    Ok(())
}
