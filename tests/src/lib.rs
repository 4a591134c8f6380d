//! Test harness for edge-gateway: private RabbitMQ nodes, a `TestGateway`
//! builder (in-process or as a child process), MQTT and AMQP clients, and
//! small HTTP helpers for `/healthz` and `/metrics`.
//!
//! Every wait here is bounded: a poll of a condition with a deadline or an
//! awaited event under a timeout, never a fixed sleep.

#![allow(clippy::unwrap_used)]

pub mod amqp;
pub mod amqp_raw;
pub mod auth;
pub mod gateway;
pub mod http;
pub mod mqtt;
pub mod pki;
pub mod proxy;
pub mod rabbit;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use amqp::{AmqpQueue, Received};
pub use gateway::{GatewayProcess, TestGateway, TestGatewayBuilder};
pub use mqtt::{MqttSubscriber, PublishReport, Publisher};
pub use rabbit::RabbitNode;

/// A port that was free a moment ago (bound on 127.0.0.1:0, then released),
/// and never handed out before by this process, so two parts of one test
/// run do not both get it.
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
    bail!("no fresh free port in 100 tries")
}

/// A name unique to this test process and call: `<label>_<pid>_<n>`.
/// Safe as an MQTT topic level, an AMQP queue name and a client id.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{label}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `condition` every `every` until it returns `Some` or `timeout`
/// passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut condition: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut every = Duration::from_millis(10);
    loop {
        if let Some(v) = condition().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
        every = (every * 2).min(Duration::from_millis(200));
    }
}
