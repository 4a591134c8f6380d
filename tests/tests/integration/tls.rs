//! `amqps://` upstreams against one private RabbitMQ node with a TLS
//! listener that requires a client certificate, every certificate made by
//! the test (rcgen). The node's certificate is for `broker.example` only
//! (the gateway connects to 127.0.0.1); for other SNI names it presents a
//! certificate that expired years ago, one valid only from 2090, and one
//! for TLS clients only.
//!
//! One gateway carries one upstream per case, each with its own route: the
//! cases differ only on the gateway's side, so one broker start serves them
//! all. The upstream with the right CA, client certificate and
//! `tls_server_name` forwards; every other one forwards nothing, logs its
//! own reason, and counts it in `edge_upstream_tls_failures_total` under its
//! own label. The gateway only ever knows the TLS port: there is nothing to
//! fall back to.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use edge_tests::amqp::{AmqpQueue, QueueSpec};
use edge_tests::http::metric;
use edge_tests::pki::{CertFiles, Pki};
use edge_tests::{GatewayProcess, Publisher, RabbitNode, TestGateway, unique, wait_for};

use crate::{SHORT, blocking, gateway_bin};

/// The name in the node's default certificate.
const BROKER_NAME: &str = "broker.example";
/// The SNI name for which the node presents its expired certificate.
const EXPIRED_NAME: &str = "expired.example";
/// The SNI name for which the node presents a certificate valid from 2090.
const FUTURE_NAME: &str = "future.example";
/// The SNI name for which the node presents a client-only certificate.
const PURPOSE_NAME: &str = "purpose.example";

/// Every `reason` of `edge_upstream_tls_failures_total` (the README lists
/// them for operators' alerts).
const REASONS: [&str; 7] = [
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "name_mismatch",
    "client_cert_refused",
    "handshake",
    "setup",
];

/// `"text"` as a TOML string (or an Erlang string: same escapes for paths).
fn quoted(s: impl AsRef<str>) -> String {
    format!("{:?}", s.as_ref())
}

fn path_value(p: &Path) -> String {
    quoted(p.display().to_string())
}

/// A node whose TLS listener verifies clients against the test CA and
/// refuses those without a certificate; it presents `default` unless the
/// client's SNI names one of `by_name`.
async fn tls_node(
    pki: &Pki,
    default: &CertFiles,
    by_name: &[(&'static str, CertFiles)],
) -> Result<(RabbitNode, u16)> {
    let ca = pki.ca_file.clone();
    let default = default.clone();
    let sni_hosts: Vec<String> = by_name
        .iter()
        .map(|(name, files)| {
            format!(
                "{{{}, [{{certfile, {}}}, {{keyfile, {}}}]}}",
                quoted(name),
                path_value(&files.cert),
                path_value(&files.key)
            )
        })
        .collect();
    blocking(move || {
        RabbitNode::dedicated_with_advanced(
            "tls",
            &[],
            |_dir: &Path, port| format!("listeners.ssl.default = 127.0.0.1:{port}\n"),
            |_dir: &Path| {
                // rabbitmq.conf has no key for a certificate per SNI name.
                Some(format!(
                    "[{{rabbit, [{{ssl_options, [\n\
                     {{cacertfile, {}}},\n\
                     {{certfile, {}}},\n\
                     {{keyfile, {}}},\n\
                     {{verify, verify_peer}},\n\
                     {{fail_if_no_peer_cert, true}},\n\
                     {{sni_hosts, [{}]}}\n\
                     ]}}]}}].\n",
                    path_value(&ca),
                    path_value(&default.cert),
                    path_value(&default.key),
                    sni_hosts.join(", "),
                ))
            },
        )
    })
    .await
}

/// One upstream of the gateway: how its TLS keys differ from the trusted
/// upstream's and, for a failure, the metric reason and what each of its
/// log lines must say.
struct Case {
    upstream: &'static str,
    changes: Vec<(&'static str, Option<String>)>,
    failure: Option<(&'static str, &'static str)>,
}

impl Case {
    /// `trusted` with this case's changes: (key, raw TOML value).
    fn keys(&self, trusted: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut keys: Vec<(&'static str, String)> = trusted
            .iter()
            .filter(|(k, _)| !self.changes.iter().any(|(c, _)| c == k))
            .cloned()
            .collect();
        for (key, value) in &self.changes {
            if let Some(value) = value {
                keys.push((key, value.clone()));
            }
        }
        keys
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_forwards_over_mutual_tls_and_names_each_tls_failure() -> Result<()> {
    let pki = Pki::new()?;
    let dir = pki.path();
    let broker = pki
        .ca
        .server_for("broker", &[BROKER_NAME])?
        .write(dir, "broker")?;
    let expired = pki
        .ca
        .expired_server("expired broker", &[EXPIRED_NAME])?
        .write(dir, "expired")?;
    let future = pki
        .ca
        .server_with("future broker", &[FUTURE_NAME], |params| {
            params.not_before = rcgen::date_time_ymd(2090, 1, 1);
            params.not_after = rcgen::date_time_ymd(2091, 1, 1);
        })?
        .write(dir, "future")?;
    // A certificate for clients only (extended key usage clientAuth).
    let wrong_purpose = pki
        .ca
        .client("client only", &[PURPOSE_NAME])?
        .write(dir, "purpose")?;
    let client = pki
        .ca
        .client("edge-gateway", &["edge-gateway"])?
        .write(dir, "client")?;
    let stranger = pki
        .other_ca
        .client("edge-gateway", &["edge-gateway"])?
        .write(dir, "stranger")?;
    let by_name = [
        (EXPIRED_NAME, expired),
        (FUTURE_NAME, future),
        (PURPOSE_NAME, wrong_purpose),
    ];
    let (node, tls_port) = tls_node(&pki, &broker, &by_name).await?;

    // What the upstream that forwards has; each other case changes some of
    // it (`None`: the key is left out).
    let trusted = [
        ("tls_ca_file", path_value(&pki.ca_file)),
        ("tls_cert_file", path_value(&client.cert)),
        ("tls_key_file", path_value(&client.key)),
        ("tls_server_name", quoted(BROKER_NAME)),
    ];
    let set = |key, value: &str| (key, Some(value.to_string()));
    let cases = [
        Case {
            upstream: "trusted",
            // The system's roots besides the CA file: they add nothing the
            // test CA needs, and loading them must not break anything.
            changes: vec![set("tls_system_roots", "true")],
            failure: None,
        },
        Case {
            upstream: "other-ca",
            changes: vec![set("tls_ca_file", &path_value(&pki.other_ca_file))],
            failure: Some(("unknown_ca", "not signed by a trusted CA")),
        },
        Case {
            upstream: "system-roots",
            changes: vec![("tls_ca_file", None)],
            failure: Some(("unknown_ca", "not signed by a trusted CA")),
        },
        Case {
            upstream: "expired-cert",
            changes: vec![set("tls_server_name", &quoted(EXPIRED_NAME))],
            failure: Some(("expired", "has expired")),
        },
        Case {
            upstream: "future-cert",
            changes: vec![set("tls_server_name", &quoted(FUTURE_NAME))],
            failure: Some(("not_yet_valid", "is not valid yet")),
        },
        Case {
            upstream: "client-only-cert",
            changes: vec![set("tls_server_name", &quoted(PURPOSE_NAME))],
            failure: Some(("handshake", "TLS handshake with purpose.example failed")),
        },
        Case {
            upstream: "by-address",
            changes: vec![("tls_server_name", None)],
            failure: Some(("name_mismatch", "not valid for the name 127.0.0.1")),
        },
        Case {
            upstream: "wrong-name",
            changes: vec![set("tls_server_name", &quoted("wrong.example"))],
            failure: Some(("name_mismatch", "not valid for the name wrong.example")),
        },
        Case {
            upstream: "no-client-cert",
            changes: vec![("tls_cert_file", None), ("tls_key_file", None)],
            failure: Some(("client_cert_refused", "requires a client certificate")),
        },
        Case {
            upstream: "stranger-cert",
            changes: vec![
                set("tls_cert_file", &path_value(&stranger.cert)),
                set("tls_key_file", &path_value(&stranger.key)),
            ],
            failure: Some(("client_cert_refused", "refused the client certificate")),
        },
        Case {
            upstream: "someone-elses-key",
            // Both files are PEM (check-config passes): the setup finds
            // they do not belong together.
            changes: vec![set("tls_key_file", &path_value(&stranger.key))],
            failure: Some((
                "setup",
                "TLS setup failed: tls_cert_file and tls_key_file: the key is not the certificate's",
            )),
        },
    ];

    let prefix = unique("tls");
    let mut queue =
        AmqpQueue::open(&node.amqp_uri(), &QueueSpec::topic(&format!("{prefix}.#"))).await?;
    let amqps = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let mut builder = TestGateway::builder();
    for case in &cases {
        let keys = case.keys(&trusted);
        let extra: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
        builder = builder
            .upstream_with(case.upstream, std::slice::from_ref(&amqps), &extra)
            .route(
                case.upstream,
                &format!("{prefix}/{}/#", case.upstream),
                case.upstream,
            );
    }
    let gw = builder.spawn(gateway_bin()).await?;
    // One message per upstream, its name as payload, all on one connection.
    let messages: Vec<(String, Vec<u8>)> = cases
        .iter()
        .map(|c| (format!("{prefix}/{}/m", c.upstream), c.upstream.into()))
        .collect();
    let count = messages.len() as u64;
    let report = Publisher::new(gw.mqtt_addr(), &unique("tls-pub"))
        .run(count, SHORT, move |i| messages[i as usize].clone())
        .await;
    anyhow::ensure!(
        report.all_acked(count),
        "{report:?}; gateway log:\n{}",
        gw.log()
    );

    // Verified end to end: the broker's name comes from tls_server_name,
    // not from the URI's address, and the client certificate is accepted.
    let got = match queue.next(SHORT).await {
        Ok(got) => got,
        Err(e) => anyhow::bail!("{e}; gateway log:\n{}", gw.log()),
    };
    assert_eq!(got.body_str(), "trusted");

    for case in &cases {
        let Some((reason, says)) = case.failure else {
            continue;
        };
        let counted = wait_for(
            &format!("{} TLS failures of {}", reason, case.upstream),
            SHORT,
            || failures(&gw, case.upstream, reason),
        )
        .await;
        let log = full_log(&gw)?;
        counted.with_context(|| format!("gateway log:\n{log}"))?;
        // Every failed attempt of this upstream gives the same reason, the
        // alert racing the broker's reset or not.
        let upstream_field = format!("upstream={}", case.upstream);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("cannot connect to upstream broker") && l.contains(&upstream_field)
            })
            .collect();
        anyhow::ensure!(
            !lines.is_empty(),
            "no connect failure of {}:\n{log}",
            case.upstream
        );
        eprintln!(
            "{}: {} failures, the first: {}",
            case.upstream,
            lines.len(),
            lines[0]
        );
        for line in lines {
            assert!(
                line.contains(says),
                "{}: the log says {says:?}: {line}",
                case.upstream
            );
        }
        let text = gw.metrics().await?;
        for other in REASONS {
            if other != reason {
                let labels = [
                    format!("upstream=\"{}\"", case.upstream),
                    format!("reason=\"{other}\""),
                ];
                let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
                assert_eq!(
                    metric(&text, "edge_upstream_tls_failures_total", &labels),
                    Some(0.0),
                    "{}: only {reason} is counted",
                    case.upstream
                );
            }
        }
    }
    let trusted = gw.metrics().await?;
    assert_eq!(
        metric(
            &trusted,
            "edge_upstream_tls_failures_total",
            &["upstream=\"trusted\""]
        ),
        Some(0.0),
        "the trusted upstream never failed"
    );
    let log = full_log(&gw)?;
    assert!(!log.contains("guest:guest"), "password logged:\n{log}");
    // Every failing upstream has retried since its message was stored;
    // none of them may have let it through.
    if let Ok(extra) = queue.next(Duration::from_secs(1)).await {
        anyhow::bail!(
            "{:?} arrived through a link that failed its TLS checks",
            extra.body_str()
        );
    }
    Ok(())
}

/// The count of `reason` for `upstream` once it is at least 2 (a retry
/// after the first failure), read from `/metrics`.
async fn failures(gw: &GatewayProcess, upstream: &str, reason: &str) -> Option<f64> {
    let text = gw.metrics().await.ok()?;
    let labels = [
        format!("upstream=\"{upstream}\""),
        format!("reason=\"{reason}\""),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    metric(&text, "edge_upstream_tls_failures_total", &labels).filter(|n| *n >= 2.0)
}

fn full_log(gw: &GatewayProcess) -> Result<String> {
    Ok(std::fs::read_to_string(gw.log_path())?)
}
