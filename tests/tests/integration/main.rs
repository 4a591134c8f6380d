//! The integration tests: a real gateway (in-process or a child process),
//! a private RabbitMQ node, real MQTT and AMQP clients. One binary, modules
//! by area.

#![allow(clippy::unwrap_used)]

mod amqp_blocked;
mod amqp_clients;
mod amqp_consumers;
mod amqp_dead_letters;
mod amqp_exchanges;
mod amqp_frames;
mod amqp_queue_mix;
mod amqp_tools;
mod backlog;
mod chains;
mod config;
mod corrupt;
mod crash;
mod dead_letters;
mod disk_full;
mod downstream;
mod flood;
mod forward;
mod harness;
mod identity;
mod link;
mod local;
mod malformed;
mod mqtt311;
mod mqtt5;
mod observability;
mod paho;
mod pika;
mod priority;
mod quota;
mod retained;
mod security_abuse;
mod security_acl;
mod security_tls;
mod security_tls_close;
mod sessions;
mod shared;
mod tls;
mod uplink;
mod upstream_faults;
mod websocket;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edge_tests::{RabbitNode, Received};

/// Generous bound for anything that should take a second or two.
pub const SHORT: Duration = Duration::from_secs(15);
/// Bound for bulk transfers and broker restarts.
pub const LONG: Duration = Duration::from_secs(120);

/// The gateway binary built from this crate.
pub fn gateway_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_gateway-under-test"))
}

/// The process-wide RabbitMQ node (booted once, off the async threads).
pub async fn shared_node() -> Result<&'static RabbitNode> {
    tokio::task::spawn_blocking(RabbitNode::shared).await?
}

/// Runs blocking node management (start/stop/kill) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f).await?
}

/// Runs a Python script with Debian's own `/usr/bin/python3` (where
/// scripts/test.sh installs python3-paho-mqtt and python3-pika), bounded
/// by [`LONG`]; its stdout lines, or its stderr as the error.
pub async fn run_python(what: &str, script: &str, args: &[&str]) -> Result<Vec<String>> {
    let out = tokio::time::timeout(
        LONG,
        tokio::process::Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{what} script hung"))?
    .with_context(|| format!("running /usr/bin/python3 for {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// `<publisher>:<counter>`: what every load message carries.
pub fn payload(publisher: &str, n: u64) -> Vec<u8> {
    format!("{publisher}:{n:08}").into_bytes()
}

pub fn parse_payload(body: &[u8]) -> Result<(String, u64)> {
    let text = std::str::from_utf8(body).context("payload is not UTF-8")?;
    let (publisher, n) = text
        .rsplit_once(':')
        .with_context(|| format!("payload {text:?} is not publisher:counter"))?;
    Ok((publisher.to_string(), n.parse()?))
}

/// The log sequence in a `message_id` of `<gateway id>:<seq>`.
pub fn message_seq(gateway_id: &str, m: &Received) -> Result<u64> {
    let id = m
        .message_id
        .as_deref()
        .context("message without message_id")?;
    let seq = id
        .strip_prefix(gateway_id)
        .and_then(|rest| rest.strip_prefix(':'))
        .with_context(|| format!("message_id {id:?} is not {gateway_id}:<seq>"))?;
    Ok(seq.parse()?)
}

/// The at-least-once contract over what arrived upstream:
/// - one message id always carries the same payload and one payload is
///   always sent under the same message id (duplicates are recognisable);
/// - with duplicates removed, each publisher's counters strictly increase.
///
/// Returns, per publisher, the counters received (duplicates removed).
pub fn check_order_and_identity(
    gateway_id: &str,
    received: &[Received],
) -> Result<HashMap<String, Vec<u64>>> {
    let mut body_of_id: HashMap<String, Vec<u8>> = HashMap::new();
    let mut id_of_body: HashMap<Vec<u8>, String> = HashMap::new();
    let mut per_publisher: HashMap<String, Vec<u64>> = HashMap::new();
    for m in received {
        message_seq(gateway_id, m)?;
        let id = m.message_id.clone().unwrap_or_default();
        if let Some(body) = body_of_id.get(&id) {
            if *body != m.body {
                bail!(
                    "message_id {id} carried {:?} and {:?}",
                    String::from_utf8_lossy(body),
                    m.body_str()
                );
            }
            continue; // a duplicate, recognisable by its id
        }
        if let Some(other) = id_of_body.get(&m.body) {
            bail!(
                "payload {:?} arrived under two message ids: {other} and {id}",
                m.body_str()
            );
        }
        body_of_id.insert(id.clone(), m.body.clone());
        id_of_body.insert(m.body.clone(), id);
        let (publisher, n) = parse_payload(&m.body)?;
        let seen = per_publisher.entry(publisher.clone()).or_default();
        if let Some(last) = seen.last()
            && n <= *last
        {
            bail!("publisher {publisher}: counter {n} arrived after {last}");
        }
        seen.push(n);
    }
    Ok(per_publisher)
}
