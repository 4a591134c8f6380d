//! Logs (tracing) and the HTTP endpoint with `/metrics` and `/healthz`
//! (HTTPS with `metrics.tls`), and the admin endpoints (`/backlog`,
//! `/dead-letters`): with `auth.admin_users`, only those users (HTTP basic
//! authentication against the password file); without, only loopback
//! clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router as HttpRouter;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{get, post};
use edge_amqp::OpenConnections;
use edge_core::Routes;
use edge_upstream::LinkStatus;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backlog::{self, DeadLetterAction, UpstreamRef};

/// Default log filter. lapin logs a dropped upstream link at ERROR from
/// its I/O loop; the replicator already reports it at WARN with context,
/// and ERROR is reserved for data loss or operator action.
const DEFAULT_LOG_FILTER: &str = "info,lapin=off";

/// Installs the log subscriber (`RUST_LOG`, default [`DEFAULT_LOG_FILTER`]).
/// Safe to call twice.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    // Logs go to stderr (stdout stays free), coloured only on a terminal.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        "edge_upstream_state",
        "1 for the upstream's state (down, up, stalled: backlog and link present, nothing confirmed for confirm_timeout), 0 for the others."
    );
    describe_gauge!(
        "edge_upstream_node_up",
        "1 for the broker node the upstream link is on."
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
    describe_gauge!("edge_amqp_channels", "AMQP channels open now.");
    describe_counter!(
        "edge_amqp_confirms_total",
        "Publishes confirmed to AMQP clients in confirm mode, by result (ack, nack)."
    );
    describe_counter!(
        "edge_amqp_exceptions_total",
        "AMQP channel and connection exceptions sent, by scope and reply code."
    );
    describe_gauge!("edge_amqp_queues", "AMQP queues declared now.");
    describe_gauge!(
        "edge_amqp_queue_messages",
        "Messages of an AMQP queue, ready or unacked (at most 64 queue names, the rest under queue=\"_other\")."
    );
    describe_gauge!(
        "edge_amqp_queue_bytes",
        "Payload bytes an AMQP queue holds in memory."
    );
    describe_gauge!("edge_amqp_queue_consumers", "Consumers of an AMQP queue.");
}

#[derive(Clone)]
struct HttpState {
    admin: Arc<Admin>,
    store: edge_store::Store,
    metrics: PrometheusHandle,
    links: Vec<(String, LinkStatus)>,
    /// Every configured route, and each upstream's own (for `/backlog` and
    /// the dead letters of one route).
    routes: Routes,
    own_routes: Arc<HashMap<String, Routes>>,
    store_failure: tokio::sync::watch::Receiver<Option<String>>,
    amqp: Option<(SocketAddr, OpenConnections)>,
    mqtt_ws: Option<(SocketAddr, String)>,
    downstreams: Vec<(String, LinkStatus)>,
}

/// The listeners `/healthz` reports on besides MQTT's TCP one.
#[derive(Debug, Clone)]
pub struct Listeners {
    /// The AMQP listener's address and its open connections.
    pub amqp: Option<(SocketAddr, OpenConnections)>,
    /// MQTT over WebSocket: address and path.
    pub mqtt_ws: Option<(SocketAddr, String)>,
    /// Each downstream's link.
    pub downstreams: Vec<(String, LinkStatus)>,
}

/// Who may use the admin endpoints, and the certificate for HTTPS.
#[derive(Debug)]
pub struct Admin {
    /// Serve HTTPS with this certificate (`metrics.tls`).
    pub tls: Option<Arc<edge_tls::ServerTls>>,
    /// `auth.admin_users`; empty: loopback clients only.
    pub users: Vec<String>,
    pub security: Arc<edge_auth::Security>,
}

/// Binds the telemetry listener; `serve` runs it.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener on {addr}"))
}

#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    store: edge_store::Store,
    metrics: PrometheusHandle,
    links: Vec<(String, LinkStatus)>,
    routes: Routes,
    store_failure: tokio::sync::watch::Receiver<Option<String>>,
    listeners: Listeners,
    admin: Admin,
    shutdown: CancellationToken,
) {
    let tls = admin.tls.clone();
    let own_routes = Arc::new(backlog::routes_by_upstream(
        links.iter().map(|(name, _)| name.as_str()),
        &routes,
    ));
    let app = HttpRouter::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/backlog", get(get_backlog))
        .route("/dead-letters", get(list_dead_letters))
        .route("/dead-letters/replay", post(replay_dead_letters))
        .route("/dead-letters/purge", post(purge_dead_letters))
        .with_state(HttpState {
            admin: Arc::new(admin),
            store,
            metrics,
            links,
            routes,
            own_routes,
            store_failure,
            amqp: listeners.amqp,
            mqtt_ws: listeners.mqtt_ws,
            downstreams: listeners.downstreams,
        });
    if let Some(tls) = tls {
        serve_https(listener, app, tls, shutdown).await;
        return;
    }
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
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

/// 200 while the gateway is up: a down upstream is what the gateway
/// exists to ride out, and a full store (quota or disk) empties itself as
/// upstreams confirm, so both are reported in the body, not as unhealthy —
/// a supervisor restarting on them would only make things worse. 503 once
/// the store has failed (a restart is the recovery). The AMQP listener's
/// address and connection count follow, the MQTT over WebSocket listener's
/// address and path, then each upstream: `up`, `down` or `stalled` (see
/// `edge_upstream::LinkState`) and the node it is on or trying, then each
/// downstream likewise (`up` or `down`).
async fn healthz(State(state): State<HttpState>) -> (StatusCode, String) {
    let failure = state.store_failure.borrow().clone();
    let full = *state.store.full().borrow();
    let (status, mut body) = match (failure, full) {
        (Some(reason), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store failed: {reason}\n"),
        ),
        (None, Some(reason)) => (
            StatusCode::OK,
            format!("store: full ({reason}): new messages are refused\n"),
        ),
        (None, None) => (StatusCode::OK, String::from("ok\n")),
    };
    if let Some((addr, open)) = &state.amqp {
        body.push_str(&format!("amqp {addr}: {} connection(s)\n", open.get()));
    }
    if let Some((addr, path)) = &state.mqtt_ws {
        body.push_str(&format!("mqtt websocket {addr}: path {path}\n"));
    }
    for (name, link) in &state.links {
        let node = link.node();
        let on = if node.is_empty() {
            String::new()
        } else {
            format!(" ({node})")
        };
        let state = backlog::link_state(link);
        body.push_str(&format!("upstream {name}: {state}{on}\n"));
    }
    for (name, link) in &state.downstreams {
        let node = link.node();
        let on = if node.is_empty() {
            String::new()
        } else {
            format!(" ({node})")
        };
        body.push_str(&format!(
            "downstream {name}: {}{on}\n",
            link.state().as_str()
        ));
    }
    (status, body)
}

/// Dead letters listed per request at most (each is decoded whole).
const DEAD_LETTER_PAGE: usize = 100;

/// HTTPS: each connection's TLS handshake, then HTTP/1.1 on it.
async fn serve_https(
    listener: TcpListener,
    app: HttpRouter,
    tls: Arc<edge_tls::ServerTls>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let tls = tls.clone();
        let app = app.clone().layer(axum::Extension(ConnectInfo(peer)));
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HTTPS_HANDSHAKE_TIMEOUT, tls.accept(tcp)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    metrics::counter!("edge_tls_handshake_failures_total", "protocol" => "http", "reason" => error.reason()).increment(1);
                    tracing::debug!(%peer, %error, "metrics endpoint: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                served = connection => if let Err(error) = served {
                    tracing::debug!(%peer, %error, "metrics endpoint: connection failed");
                },
            }
        });
    }
}

/// Time an HTTPS client has for its TLS handshake.
const HTTPS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The admin endpoints change data. With `auth.admin_users` they need one
/// of those users' name and password (basic authentication, best over
/// HTTPS); without, they answer only to clients on this machine, even when
/// the metrics listener is opened to the network for Prometheus.
async fn admin_only(
    admin: &Admin,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), (StatusCode, String)> {
    if admin.users.is_empty() {
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err((
                StatusCode::FORBIDDEN,
                "the admin endpoints answer only to loopback clients (set auth.admin_users to open them to admin users)\n".to_string(),
            ))
        };
    }
    let unauthorized = || {
        (
            StatusCode::UNAUTHORIZED,
            "the admin endpoints need an admin user (HTTP basic authentication)\n".to_string(),
        )
    };
    let (user, password) = basic_credentials(headers).ok_or_else(unauthorized)?;
    if !admin.users.contains(&user) {
        metrics::counter!("edge_logins_total", "protocol" => "http", "outcome" => "not_admin")
            .increment(1);
        tracing::warn!(%peer, user = %user, "admin endpoint refused: not an admin user");
        return Err(unauthorized());
    }
    match admin
        .security
        .login(peer.ip(), None, Some(&user), Some(password.as_bytes()))
        .await
    {
        Ok(_) => {
            metrics::counter!("edge_logins_total", "protocol" => "http", "outcome" => "accepted")
                .increment(1);
            Ok(())
        }
        Err(_) => {
            metrics::counter!("edge_logins_total", "protocol" => "http", "outcome" => "bad_credentials").increment(1);
            tracing::warn!(%peer, user = %user, "admin endpoint refused: bad user name or password");
            Err(unauthorized())
        }
    }
}

/// `Authorization: Basic base64(user:password)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// `GET /dead-letters`: one line per parked message, oldest first:
/// `<seq> <topic> <payload bytes> <reason>`.
async fn list_dead_letters(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    if let Err(refused) = admin_only(&state.admin, peer, &headers).await {
        return refused;
    }
    let store = state.store.clone();
    let listed = tokio::task::spawn_blocking(move || store.dead_letters(0, DEAD_LETTER_PAGE)).await;
    match listed {
        Ok(Ok(letters)) => {
            let stats = state.store.stats();
            let mut body = format!(
                "{} dead letter(s), {} bytes; showing the first {}\n",
                stats.dead_letters,
                stats.dead_letter_bytes,
                letters.len()
            );
            for d in letters {
                let (topic, len) = match edge_core::Message::from_record(&d.record) {
                    Ok(m) => (m.topic.to_string(), m.payload.len()),
                    Err(e) => (format!("(unreadable: {e})"), 0),
                };
                body.push_str(&format!("{} {} {} {}\n", d.seq, topic, len, d.reason));
            }
            (StatusCode::OK, body)
        }
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `?route=R` of the replay and purge endpoints.
#[derive(Debug, serde::Deserialize)]
struct RouteQuery {
    route: Option<String>,
}

/// `POST /dead-letters/replay[?route=R]`: the dead letters (of that route)
/// go back into the log (new seqs) to be forwarded again by the upstreams
/// that parked them, e.g. after a missing exchange or binding was created.
async fn replay_dead_letters(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<HttpState>,
    Query(query): Query<RouteQuery>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    if let Err(refused) = admin_only(&state.admin, peer, &headers).await {
        return refused;
    }
    dead_letter_request(&state, query.route, DeadLetterAction::Replay).await
}

/// `POST /dead-letters/purge[?route=R]`: deletes the dead letters (of that route).
async fn purge_dead_letters(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<HttpState>,
    Query(query): Query<RouteQuery>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    if let Err(refused) = admin_only(&state.admin, peer, &headers).await {
        return refused;
    }
    dead_letter_request(&state, query.route, DeadLetterAction::Purge).await
}

/// Answers `<verb> <count>`; 400 for a route that is not configured.
async fn dead_letter_request(
    state: &HttpState,
    route: Option<String>,
    action: DeadLetterAction,
) -> (StatusCode, String) {
    if let Some(route) = &route
        && let Err(e) = backlog::check_route(&state.routes, route)
    {
        return (StatusCode::BAD_REQUEST, format!("{e}\n"));
    }
    let verb = action.verb();
    match backlog::act_on_dead_letters(
        &state.store,
        state.own_routes.clone(),
        route.clone(),
        action,
    )
    .await
    {
        Ok(total) => {
            tracing::warn!(
                count = total,
                route = route.as_deref().unwrap_or("(all)"),
                "dead letters {verb} on request"
            );
            (StatusCode::OK, format!("{verb} {total}\n"))
        }
        Err((total, e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{verb} {total}, then: {e:#}\n"),
        ),
    }
}

/// `GET /backlog`: per upstream its cursor and link state, per route of it
/// the messages still to forward (count, bytes, oldest age) and the parked
/// dead letters, as JSON ([`backlog::Report`]). Scans the log from the
/// smallest cursor on a blocking thread, in bounded chunks.
async fn get_backlog(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> (StatusCode, HeaderMap, String) {
    let mut json = HeaderMap::new();
    json.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if let Err((status, body)) = admin_only(&state.admin, peer, &headers).await {
        return (status, HeaderMap::new(), body);
    }
    let upstreams: Vec<UpstreamRef> = state
        .links
        .iter()
        .map(|(name, link)| UpstreamRef {
            name: name.clone(),
            link: Some(backlog::link_state(link)),
        })
        .collect();
    let (store, routes) = (state.store.clone(), state.routes.clone());
    let scanned = tokio::task::spawn_blocking(move || {
        backlog::scan(
            &store,
            &upstreams,
            &routes,
            "admin",
            edge_core::message::now_ms(),
        )
    })
    .await;
    match scanned {
        Ok(Ok(report)) => (StatusCode::OK, json, report.to_json()),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            HeaderMap::new(),
            format!("{e}\n"),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            HeaderMap::new(),
            format!("{e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(users: &[&str]) -> Admin {
        Admin {
            tls: None,
            users: users.iter().map(|u| u.to_string()).collect(),
            security: edge_auth::Security::open(),
        }
    }

    #[tokio::test]
    async fn without_admin_users_the_admin_endpoints_are_for_loopback_clients_only() {
        let admin = admin(&[]);
        let headers = HeaderMap::new();
        for peer in ["127.0.0.1:4000", "[::1]:4000"] {
            let peer = peer.parse().expect("addr");
            assert!(admin_only(&admin, peer, &headers).await.is_ok());
        }
        let refused = admin_only(&admin, "192.0.2.7:4000".parse().expect("addr"), &headers).await;
        assert_eq!(
            refused.map_err(|(status, _)| status),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[tokio::test]
    async fn with_admin_users_even_loopback_needs_credentials() {
        let admin = admin(&["ops"]);
        let peer = "127.0.0.1:4000".parse().expect("addr");
        let refused = admin_only(&admin, peer, &HeaderMap::new()).await;
        assert_eq!(
            refused.map_err(|(status, _)| status),
            Err(StatusCode::UNAUTHORIZED)
        );
        let mut headers = HeaderMap::new();
        // "intruder:x" is not an admin user.
        headers.insert(
            header::AUTHORIZATION,
            "Basic aW50cnVkZXI6eA==".parse().expect("header"),
        );
        assert!(admin_only(&admin, peer, &headers).await.is_err());
        assert_eq!(
            basic_credentials(&headers),
            Some(("intruder".to_string(), "x".to_string()))
        );
    }
}
