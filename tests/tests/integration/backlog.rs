//! The operator's tools: `edge-gateway backlog` against a running gateway
//! (its admin endpoint) and on a stopped one's data directory (read-only:
//! the same figures, not a byte changed); dead letters replayed and purged
//! by route; the systemd unit and the packaged configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use edge_gateway::backlog::{Report, RouteBacklog};
use edge_tests::amqp::{AmqpQueue, QueueSpec, connect};
use edge_tests::gateway::run_binary;
use edge_tests::{GatewayProcess, Publisher, TestGateway, free_port, unique, wait_for};

use crate::{LONG, SHORT, gateway_bin};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `edge-gateway <args>`: its exit code and output (stdout, then stderr).
async fn cli(args: &[&str]) -> Result<(Option<i32>, String)> {
    run_binary(gateway_bin(), args).await
}

/// `edge-gateway backlog --json <target>`, parsed.
async fn backlog_json(target: &[&str]) -> Result<Report> {
    let mut args = vec!["backlog", "--json"];
    args.extend_from_slice(target);
    let (code, out) = cli(&args).await?;
    if code != Some(0) {
        bail!("backlog {target:?} exited {code:?}: {out}");
    }
    Report::from_json(&out).with_context(|| format!("not a backlog: {out}"))
}

fn admin_of(gw: &GatewayProcess) -> String {
    format!("http://{}", gw.metrics_addr())
}

fn route<'r>(report: &'r Report, upstream: &str, name: &str) -> &'r RouteBacklog {
    report
        .route(upstream, name)
        .unwrap_or_else(|| panic!("no route {upstream}/{name} in {report:?}"))
}

/// Every file below `dir` with its bytes.
fn snapshot(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

/// Publishes `count` QoS 1 messages of `size` payload bytes on `topic`.
async fn publish(gw: &GatewayProcess, topic: &str, count: u64, size: usize) -> Result<()> {
    let topic = topic.to_string();
    let report = Publisher::new(gw.mqtt_addr(), &unique("ops"))
        .run(count, SHORT, move |i| {
            let mut payload = format!("{i:04}").into_bytes();
            payload.resize(size, b'.');
            (topic.clone(), payload)
        })
        .await;
    if !report.all_acked(count) {
        bail!("not every publish was acknowledged: {report:?}");
    }
    Ok(())
}

/// The figures both ways of asking must agree on: the report without
/// where and when it was taken, the link state and the ages.
fn figures(report: &Report) -> Report {
    let mut figures = report.clone();
    figures.taken_at_ms = 0;
    figures.source.clear();
    for u in &mut figures.upstreams {
        u.link = None;
        for r in &mut u.routes {
            r.oldest_age_seconds = None;
        }
    }
    figures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_a_running_then_a_stopped_gateway_per_route() -> Result<()> {
    // The upstream's port is closed: everything published stays in the log.
    let closed = free_port()?;
    let prefix = unique("bl");
    let mut gw = TestGateway::builder()
        .upstream(
            "central",
            &[format!("amqp://guest:guest@127.0.0.1:{closed}/%2f")],
        )
        .route("telemetry", &format!("{prefix}/t/#"), "central")
        .route("alarms", &format!("{prefix}/a/#"), "central")
        .spawn(gateway_bin())
        .await?;
    let before = now_ms();
    publish(&gw, &format!("{prefix}/t/meter"), 7, 10).await?;
    publish(&gw, &format!("{prefix}/a/door"), 3, 25).await?;
    // Logged (QoS 1) but no route of the upstream takes it.
    publish(&gw, &format!("{prefix}/elsewhere"), 2, 5).await?;
    let after = now_ms();

    let online = backlog_json(&["--admin", &admin_of(&gw)]).await?;
    assert_eq!(online.source, "admin");
    assert_eq!(online.upstreams.len(), 1, "{online:?}");
    let central = &online.upstreams[0];
    assert_eq!(
        (central.name.as_str(), central.link.as_deref()),
        ("central", Some("down"))
    );
    let (t, a) = (
        route(&online, "central", "telemetry"),
        route(&online, "central", "alarms"),
    );
    assert_eq!((t.messages, t.payload_bytes), (7, 70));
    assert_eq!((a.messages, a.payload_bytes), (3, 75));
    assert!(t.bytes > t.payload_bytes && a.bytes > a.payload_bytes);
    for r in [t, a] {
        let oldest = r.oldest_timestamp_ms.expect("an oldest message");
        assert!((before..=after).contains(&oldest), "{r:?}");
        assert!(r.oldest_age_seconds.is_some_and(|age| age >= 0.0));
        assert_eq!(r.dead_letters, 0);
    }
    assert_eq!(central.routes.len(), 2, "only the configured routes");

    let (code, table) = cli(&["backlog", "--admin", &admin_of(&gw)]).await?;
    assert_eq!(code, Some(0), "{table}");
    assert!(
        table.contains("upstream central") && table.contains("link down"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with("telemetry"))
        .unwrap_or_else(|| panic!("no telemetry row: {table}"));
    assert_eq!(row.split_whitespace().nth(1), Some("7"), "{row}");

    // Stopped: the same figures from the data directory, read-only.
    let status = gw.terminate(LONG).await?;
    assert!(status.success(), "{status:?}");
    let data_dir = gw.data_dir();
    let config = gw.config_path().display().to_string();
    let untouched = snapshot(&data_dir)?;
    let dir_arg = data_dir.display().to_string();
    let offline = backlog_json(&["--data-dir", &dir_arg, "--config", &config]).await?;
    assert_eq!(offline.source, "data-dir");
    assert_eq!(offline.upstreams[0].link, None);
    assert_eq!(figures(&offline), figures(&online));
    let (code, table) = cli(&["backlog", "--data-dir", &dir_arg, "--config", &config]).await?;
    assert_eq!(code, Some(0), "{table}");
    assert!(table.contains("gateway stopped"), "{table}");
    assert!(
        snapshot(&data_dir)? == untouched,
        "the data directory changed"
    );

    // Errors are said, with a non-zero exit.
    let missing = data_dir.join("no-such-dir").display().to_string();
    let (code, out) = cli(&["backlog", "--data-dir", &missing]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("does not exist"), "{out}");
    let nobody = format!("http://127.0.0.1:{}", free_port()?);
    let (code, out) = cli(&["backlog", "--admin", &nobody]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("cannot reach"), "{out}");

    // The gateway starts fine on the inspected store, which it now holds.
    gw.restart().await?;
    let again = backlog_json(&["--admin", &admin_of(&gw)]).await?;
    assert_eq!(figures(&again), figures(&online));
    let (code, out) = cli(&["backlog", "--data-dir", &dir_arg, "--config", &config]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("in use"), "{out}");
    gw.terminate(LONG).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_purged_and_replayed_by_route() -> Result<()> {
    let uri = crate::shared_node().await?.amqp_uri();
    let prefix = unique("blr");
    // Both routes' exchanges are missing: their messages are parked.
    let (exchange_a, exchange_b) = (unique("later-a"), unique("later-b"));
    let mut gw = TestGateway::builder()
        .upstream("central", std::slice::from_ref(&uri))
        .route_with(
            "late-a",
            &format!("{prefix}/a/#"),
            "central",
            &[("exchange", &format!("{exchange_a:?}"))],
        )
        .route_with(
            "late-b",
            &format!("{prefix}/b/#"),
            "central",
            &[("exchange", &format!("{exchange_b:?}"))],
        )
        .spawn(gateway_bin())
        .await?;
    publish(&gw, &format!("{prefix}/a/x"), 3, 8).await?;
    publish(&gw, &format!("{prefix}/b/y"), 2, 8).await?;
    let admin = admin_of(&gw);
    let parked = wait_for("both routes' messages to be parked", SHORT, || async {
        let report = backlog_json(&["--admin", &admin]).await.ok()?;
        let (a, b) = (
            route(&report, "central", "late-a"),
            route(&report, "central", "late-b"),
        );
        (a.dead_letters == 3 && b.dead_letters == 2).then_some(report)
    })
    .await?;
    assert!(route(&parked, "central", "late-a").dead_letter_bytes > 0);

    let (code, out) = cli(&["backlog", "purge", "--route", "late-b", "--admin", &admin]).await?;
    assert_eq!((code, out.trim()), (Some(0), "purged 2"));
    let after_purge = backlog_json(&["--admin", &admin]).await?;
    assert_eq!(route(&after_purge, "central", "late-a").dead_letters, 3);
    assert_eq!(route(&after_purge, "central", "late-b").dead_letters, 0);
    let (code, out) = cli(&["backlog", "purge", "--route", "nope", "--admin", &admin]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("no route named \"nope\""), "{out}");

    // Offline, on the stopped gateway's store: replay route A's.
    gw.terminate(LONG).await?;
    let dir = gw.data_dir().display().to_string();
    let config = gw.config_path().display().to_string();
    let (code, out) = cli(&[
        "backlog",
        "replay",
        "--route",
        "late-a",
        "--data-dir",
        &dir,
        "--config",
        &config,
    ])
    .await?;
    assert_eq!((code, out.trim()), (Some(0), "replayed 3"));
    let offline = backlog_json(&["--data-dir", &dir, "--config", &config]).await?;
    let a = route(&offline, "central", "late-a");
    assert_eq!(
        (a.dead_letters, a.messages),
        (0, 3),
        "back in the log: {a:?}"
    );

    // With the exchange there, the restarted gateway forwards them.
    let conn = connect(&uri).await?;
    crate::dead_letters::declare_exchange(&conn, &exchange_a).await?;
    let spec = QueueSpec {
        exchange: exchange_a.clone(),
        ..QueueSpec::topic(&format!("{prefix}.a.#"))
    };
    let mut queue = AmqpQueue::open(&uri, &spec).await?;
    gw.restart().await?;
    let arrived = queue.take(3, LONG).await?;
    let mut bodies: Vec<String> = arrived.iter().map(|m| m.body_str()).collect();
    bodies.sort();
    assert_eq!(bodies, ["0000....", "0001....", "0002...."]);
    assert!(
        arrived.iter().all(|m| m
            .message_id
            .as_deref()
            .is_some_and(|id| id.starts_with(&format!("{}:", gw.id())))),
        "{arrived:?}"
    );
    // The store is the running gateway's: an offline purge is refused.
    let (code, out) = cli(&["backlog", "purge", "--data-dir", &dir, "--config", &config]).await?;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("in use"), "{out}");

    queue.delete().await?;
    conn.close(200, "done".into()).await?;
    gw.terminate(LONG).await?;
    Ok(())
}

/// `GET /backlog` of an in-process gateway with no upstream: an empty
/// report, and the admin rule (loopback) applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_endpoint_without_upstreams() -> Result<()> {
    let gw = TestGateway::builder().start().await?;
    let admin = gw.metrics_addr().context("metrics listener")?;
    let (status, body) = edge_tests::http::get(admin, "/backlog").await?;
    assert_eq!(status, 200, "{body}");
    let report = Report::from_json(&body)?;
    assert!(report.upstreams.is_empty(), "{report:?}");
    let (code, table) = cli(&["backlog", "--admin", &format!("http://{admin}")]).await?;
    assert_eq!(code, Some(0), "{table}");
    assert!(table.contains("no upstream configured"), "{table}");
    gw.shutdown().await?;
    Ok(())
}

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file)
}

/// `key=value` lines of a unit file, a key given twice keeping both values.
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            settings
                .entry(key.trim().to_string())
                .or_default()
                .push(value.trim().to_string());
        }
    }
    settings
}

#[tokio::test]
async fn the_systemd_unit_restarts_on_failure_keeps_its_state_and_is_hardened() -> Result<()> {
    let path = packaging("edge-gateway.service");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let settings = unit_settings(&text);
    let one = |key: &str| -> &str {
        match settings.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key}: expected one value, found {other:?}"),
        }
    };
    assert_eq!(one("Type"), "simple");
    assert_eq!(
        one("ExecStart"),
        "/usr/bin/edge-gateway --config /etc/edge-gateway/edge-gateway.toml"
    );
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(
        one("RestartPreventExitStatus"),
        "64",
        "a bad config is not retried"
    );
    assert_eq!(one("StateDirectory"), "edge-gateway");
    assert_eq!(one("User"), "edge-gateway");
    for key in [
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "RestrictNamespaces",
        "RestrictSUIDSGID",
        "LockPersonality",
    ] {
        assert_eq!(one(key), "yes", "{key}");
    }
    assert_eq!(one("ProtectSystem"), "strict");
    let mut families: Vec<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    families.sort_unstable();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    let files: u64 = one("LimitNOFILE").parse()?;
    assert!(files >= 65_536, "LimitNOFILE={files}");

    // The packaged configuration's data_dir is the unit's state directory.
    let config = edge_config::Config::load(&packaging("edge-gateway.toml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(config.gateway.data_dir, Path::new("/var/lib/edge-gateway"));

    // systemd's own check, where it exists: the unit with ExecStart on the
    // binary built here (verify wants an executable that exists).
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if analyze.exists() {
        let dir = tempfile::tempdir()?;
        let unit = dir.path().join("edge-gateway.service");
        std::fs::write(
            &unit,
            text.replace(
                "/usr/bin/edge-gateway",
                &gateway_bin().display().to_string(),
            ),
        )?;
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(analyze)
                .arg("verify")
                .arg(&unit)
                .output(),
        )
        .await??;
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "systemd-analyze verify: {said}");
        assert!(!said.contains("edge-gateway.service:"), "warnings: {said}");
    }
    Ok(())
}

#[tokio::test]
async fn the_packaged_configuration_is_valid() -> Result<()> {
    let file = packaging("edge-gateway.toml").display().to_string();
    let (code, out) = cli(&["check-config", &file]).await?;
    assert_eq!(code, Some(0), "{out}");
    Ok(())
}
