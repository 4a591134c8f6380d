//! Logs (tracing) and the HTTP endpoint with `/metrics` and `/healthz`.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use axum::Router as HttpRouter;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use edge_upstream::LinkStatus;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Default log filter. lapin logs a dropped upstream link at ERROR from
/// its I/O loop; the replicator already reports it at WARN with context,
/// and ERROR is reserved for data loss or operator action.
const DEFAULT_LOG_FILTER: &str = "info,lapin=off";

/// Installs the log subscriber (`RUST_LOG`, default [`DEFAULT_LOG_FILTER`]).
/// Safe to call twice.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The process-wide Prometheus recorder. Installed once, by whichever
/// gateway starts first: several gateways in one process (the integration
/// tests) share it, and concurrent starts wait for the one installation.
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    match HANDLE.get_or_init(|| install_recorder().map_err(|e| format!("{e:#}"))) {
        Ok(handle) => Ok(handle.clone()),
        Err(e) => anyhow::bail!("installing the metrics recorder: {e}"),
    }
}

fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("edge_store_batch_size".into()), BATCH_BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("edge_connections", "Open client connections by protocol.");
    describe_counter!(
        "edge_messages_in_total",
        "Messages received from clients by protocol."
    );
    describe_counter!(
        "edge_messages_out_total",
        "Messages delivered to local subscribers by protocol."
    );
    describe_counter!(
        "edge_messages_dropped_total",
        "Messages not delivered or not accepted, by reason."
    );
    describe_histogram!("edge_store_batch_size", "Records per group commit.");
    describe_histogram!(
        "edge_store_commit_seconds",
        "Duration of one group commit including fsync."
    );
    describe_gauge!(
        "edge_store_live_bytes",
        "Bytes of records in the log not yet retired."
    );
    describe_gauge!(
        "edge_store_live_messages",
        "Records in the log not yet retired."
    );
    describe_gauge!(
        "edge_upstream_link_up",
        "1 while the upstream link is connected."
    );
    describe_gauge!(
        "edge_upstream_backlog_messages",
        "Logged messages not yet confirmed by the upstream."
    );
    describe_gauge!(
        "edge_upstream_oldest_unforwarded_seconds",
        "Age of the oldest unforwarded message."
    );
    describe_histogram!(
        "edge_upstream_confirm_seconds",
        "Publish-to-confirm latency."
    );
    describe_counter!(
        "edge_messages_forwarded_total",
        "Messages confirmed by the upstream, by route."
    );
}

#[derive(Clone)]
struct HttpState {
    metrics: PrometheusHandle,
    links: Vec<(String, LinkStatus)>,
    store_failure: tokio::sync::watch::Receiver<Option<String>>,
}

/// Binds the telemetry listener; `serve` runs it.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}

pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    links: Vec<(String, LinkStatus)>,
    store_failure: tokio::sync::watch::Receiver<Option<String>>,
    shutdown: CancellationToken,
) {
    let app = HttpRouter::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(HttpState {
            metrics,
            links,
            store_failure,
        });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "metrics endpoint stopped");
    }
}

async fn render_metrics(State(state): State<HttpState>) -> String {
    state.metrics.render()
}

/// 200 while the gateway can take data: a down upstream is what the
/// gateway exists to ride out, so it is reported in the body, not as
/// unhealthy. 503 once the store has failed.
async fn healthz(State(state): State<HttpState>) -> (StatusCode, String) {
    let failure = state.store_failure.borrow().clone();
    let (status, mut body) = match failure {
        None => (StatusCode::OK, String::from("ok\n")),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store failed: {reason}\n"),
        ),
    };
    for (name, link) in &state.links {
        let state = if link.is_up() { "up" } else { "down" };
        body.push_str(&format!("upstream {name}: {state}\n"));
    }
    (status, body)
}
