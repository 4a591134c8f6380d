//! The gateway process: build every part from a validated [`Config`], run
//! until told to stop, then drain in order under a grace timeout.
//!
//! Start: open the store (its cursors are the configured upstreams) → build
//! the router from the routes → bind the MQTT, AMQP and metrics listeners
//! (so a bad address fails before anything runs) → spawn the MQTT and AMQP
//! servers, one replicator per upstream and one downstream consumer per
//! downstream.
//!
//! Shutdown: stop the MQTT and AMQP listeners and the downstreams (inputs
//! all: connections send the acks of what is already committed, downstreams
//! acknowledge upstream what committed) → stop the replicators (they wait
//! briefly for outstanding confirms and persist their cursors) → close the
//! store.

pub mod backlog;
mod cli;
pub mod security;
mod telemetry;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use edge_amqp::AmqpListener;
use edge_config::{Config, OnCorrupt};
use edge_core::{Route, Router, RouterOptions, Routes};
use edge_mqtt::MqttListener;
use edge_store::{Store, StoreOptions};
use edge_upstream::{Downstream, Replicator};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use cli::cli_main;
pub use telemetry::init_logging;

/// Writer inbox capacity: enough for several full batches in flight.
const STORE_INBOX: usize = 8192;

/// The gateway identity: the configured one, else the one recorded in the
/// store, else a new one (`<host name>-<8 hex digits>`, unique across a fleet
/// of identically named boxes). Whatever is used is recorded in the store.
async fn resolve_id(store: &Store, configured: Option<&str>) -> anyhow::Result<String> {
    let reader = store.clone();
    let recorded = tokio::task::spawn_blocking(move || reader.gateway_id())
        .await
        .context("reading the recorded gateway id")?
        .context("reading the recorded gateway id")?;
    let id = match (configured, recorded.as_deref()) {
        (Some(c), Some(r)) if c != r => {
            tracing::warn!(
                configured = c,
                recorded = r,
                "gateway.id differs from the id this store's messages were made with; new messages use the configured id"
            );
            c.to_string()
        }
        (Some(c), _) => c.to_string(),
        (None, Some(r)) => r.to_string(),
        (None, None) => generated_id(),
    };
    if recorded.as_deref() != Some(id.as_str()) {
        store
            .set_gateway_id(&id)
            .await
            .context("recording the gateway id")?;
    }
    Ok(id)
}

fn generated_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(48)
        .collect();
    let host = if host.is_empty() {
        "edge".to_string()
    } else {
        host
    };
    // RandomState is seeded from the OS's randomness.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{host}-{:08x}", random & 0xffff_ffff)
}

/// First seq of a store created now: the wall clock in microseconds. A store
/// that replaces a lost or damaged one thus starts above every seq its
/// predecessor could have used (it would have needed more than a million
/// appends a second), so `<gateway id>:<seq>` stays unique for downstream
/// de-duplication — provided the clock does not go back past the old
/// store's creation.
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1)
        .max(1)
}

/// How the gateway opens its store: the configured quota and batching,
/// one cursor per configured upstream (others are dropped at open).
/// Every durable cursor the upstreams own: one each and one per priority
/// lane (`edge_upstream::cursor_names`).
pub(crate) fn upstream_cursors(config: &Config) -> Vec<String> {
    let routes = Routes::from_config(&config.routes);
    config
        .upstreams
        .iter()
        .flat_map(|u| edge_upstream::cursor_names(&u.name, &routes))
        .collect()
}

pub(crate) fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        max_bytes: config.store.max_bytes,
        min_free: config.store.min_free,
        max_age: config.store.max_age,
        batch_max_messages: config.store.batch_max_messages,
        batch_max_bytes: config.store.batch_max_bytes,
        inbox_capacity: NonZeroUsize::new(STORE_INBOX).unwrap_or(NonZeroUsize::MIN),
        cursors: upstream_cursors(config),
        retire_without_cursors: true,
        when_full: match config.store.when_full {
            edge_config::WhenFull::Reject => edge_store::WhenFull::Reject,
            edge_config::WhenFull::DropOldest => edge_store::WhenFull::DropOldest,
        },
    }
}

/// Outcome of one attempt to open the store.
enum Opened {
    Store(Store),
    /// The file is damaged; the text says how.
    Damaged(String),
    /// Any other failure (locked, permissions, schema): never moved aside.
    Failed(edge_store::OpenError),
}

fn try_open(data_dir: &Path, options: StoreOptions) -> Opened {
    match std::panic::catch_unwind(|| Store::open_seeded(data_dir, options, clock_seed())) {
        Ok(Ok(store)) => Opened::Store(store),
        Ok(Err(e)) if e.is_corruption() => Opened::Damaged(e.to_string()),
        Ok(Err(e)) => Opened::Failed(e),
        Err(_) => Opened::Damaged("the storage engine panicked while reading the file".to_string()),
    }
}

/// Opens the store; a damaged file is handled by the `on_corrupt` policy.
/// A panic inside the storage engine while it reads a damaged file counts
/// as damage too (release builds unwind for this reason).
fn open_store(
    data_dir: &Path,
    options: StoreOptions,
    on_corrupt: OnCorrupt,
) -> anyhow::Result<Store> {
    let context = || format!("opening the store in {}", data_dir.display());
    let damage = match try_open(data_dir, options.clone()) {
        Opened::Store(store) => return Ok(store),
        Opened::Failed(e) => return Err(e).with_context(context),
        Opened::Damaged(damage) => damage,
    };
    if on_corrupt == OnCorrupt::Refuse {
        anyhow::bail!(
            "the store in {} is damaged ({damage}); store.on_corrupt = \"refuse\": move it aside by hand or set \"move-aside\"",
            data_dir.display()
        );
    }
    metrics::counter!("edge_store_corruptions_total").increment(1);
    match Store::salvage(data_dir, clock_seed()) {
        Ok(salvage) => tracing::error!(
            damage = %damage,
            moved_to = %salvage.moved_to.as_deref().unwrap_or(data_dir).display(),
            salvaged = %salvage.summary(|t| t.salvaged),
            lost = %salvage.summary(|t| t.lost),
            damaged_stretches = %salvage.summary(|t| t.damaged),
            journal_frames = salvage.journal_frames,
            contained_panics = salvage.panics,
            next_seq = salvage.next_seq,
            "store file is damaged: what could be read was salvaged into a fresh store (forwarded as before), the damaged file moved aside; the lost entries are not forwarded"
        ),
        // A salvage that failed after moving the file aside (its last
        // rename) left the finished salvage for the open to take.
        Err(error) if !data_dir.join(edge_store::DB_FILE).exists() => tracing::error!(
            damage = %damage,
            salvage = %error,
            "store file is damaged: salvaged and moved aside, but the salvaged file could not be renamed into place; the open that follows takes it"
        ),
        Err(error) => {
            let aside = Store::move_aside(data_dir).with_context(|| {
                format!("moving the damaged store in {} aside", data_dir.display())
            })?;
            tracing::error!(
                damage = %damage,
                salvage = %error,
                moved_to = %aside.display(),
                "store file is damaged and nothing could be salvaged: moved aside, starting on a fresh store; messages in the old file are not forwarded"
            );
        }
    }
    match try_open(data_dir, options) {
        Opened::Store(store) => Ok(store),
        Opened::Failed(e) => Err(e).with_context(context),
        Opened::Damaged(damage) => Err(anyhow::anyhow!(
            "{}: a fresh store is damaged too: {damage}",
            context()
        )),
    }
}

/// The configured routes; one over a local AMQP exchange gets its filter
/// and routing key from the AMQP adapter's exchange mapping.
pub fn routes(configs: &[edge_config::RouteConfig]) -> Result<Routes, edge_amqp::LocalRouteError> {
    let mut routes = Vec::with_capacity(configs.len());
    for c in configs {
        routes.push(match &c.local {
            Some(local) => Route::local(
                c.clone(),
                edge_amqp::local_route_filter(&local.exchange, &local.routing_key)?,
                edge_amqp::local_routing_key,
            ),
            None => Route::from_config(c),
        });
    }
    Ok(Routes::new(routes))
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    id: String,
    mqtt_addr: SocketAddr,
    mqtt_ws_addr: Option<SocketAddr>,
    mqtt_tls_addr: Option<SocketAddr>,
    mqtt_wss_addr: Option<SocketAddr>,
    amqp_addr: Option<SocketAddr>,
    amqp_tls_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    security: std::sync::Arc<edge_auth::Security>,
    grace: Duration,
    store: Store,
    listeners_stop: CancellationToken,
    listener_tasks: TaskTracker,
    upstream_stop: CancellationToken,
    upstream_tasks: TaskTracker,
    telemetry_stop: CancellationToken,
}

impl Gateway {
    /// Opens the store, binds the MQTT and metrics listeners (port 0 picks
    /// a free port) and spawns the MQTT server and one replicator per upstream.
    pub async fn start(config: Config) -> anyhow::Result<Gateway> {
        let metrics = match &config.metrics {
            Some(_) => Some(telemetry::metrics_handle()?),
            None => None,
        };

        let store = open_store(
            &config.gateway.data_dir,
            store_options(&config),
            config.store.on_corrupt,
        )?;
        let id = resolve_id(&store, config.gateway.id.as_deref()).await?;
        tracing::info!(id = %id, "gateway identity");
        let routes = routes(&config.routes)?;
        let progress = edge_core::Progress::new(
            config
                .upstreams
                .iter()
                .map(|u| (u.name.as_str(), routes.priorities(&u.name))),
        );
        let router = Router::start(
            store.clone(),
            routes.clone(),
            RouterOptions {
                session_expiry: config.mqtt.session_expiry,
                max_session_queue: config.mqtt.max_session_queue.get(),
                max_session_queue_bytes: config.mqtt.max_session_queue_bytes,
                progress: progress.clone(),
            },
        )
        .await
        .context("loading sessions and retained messages")?;

        let security = security::build(&config)?;
        let mqtt = MqttListener::bind(&config.mqtt, security.clone())
            .await
            .with_context(|| match config.mqtt.ws_listen {
                Some(ws) => format!(
                    "binding the MQTT listeners on {} and {ws} (WebSocket)",
                    config.mqtt.listen
                ),
                None => format!("binding the MQTT listener on {}", config.mqtt.listen),
            })?;
        let mqtt_addr = mqtt.local_addr();
        let mqtt_ws_addr = mqtt.ws_local_addr();
        let mqtt_tls_addr = mqtt.tls_local_addr();
        let mqtt_wss_addr = mqtt.wss_local_addr();
        let amqp = match &config.amqp {
            Some(a) => Some(
                AmqpListener::bind(a, security.clone())
                    .await
                    .with_context(|| format!("binding the AMQP listener on {}", a.listen))?,
            ),
            None => None,
        };
        let amqp_addr = amqp.as_ref().map(AmqpListener::local_addr);
        let amqp_tls_addr = amqp.as_ref().and_then(AmqpListener::tls_local_addr);
        let amqp_health = amqp
            .as_ref()
            .map(|a| (a.local_addr(), a.open_connections()));

        let telemetry_listener = match &config.metrics {
            Some(m) => Some(telemetry::bind(m.listen).await?),
            None => None,
        };
        let metrics_addr = telemetry_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok());

        let listeners_stop = CancellationToken::new();
        let listener_tasks = TaskTracker::new();
        if let Some(amqp) = amqp {
            listener_tasks.spawn(amqp.run(router.clone(), listeners_stop.clone()));
        }
        // Downstreams are inputs like the listeners: they stop with them.
        let mut downstream_links = Vec::new();
        for down in &config.downstreams {
            // Validation checked that the upstream exists.
            let Some(upstream) = config.upstreams.iter().find(|u| u.name == down.upstream) else {
                continue;
            };
            tracing::info!(
                downstream = %down.name, upstream = %upstream.name, queue = %down.queue,
                topic_prefix = %down.topic_prefix, qos = down.qos,
                "publishing downstream commands locally"
            );
            let downstream =
                Downstream::new(down.clone(), upstream.clone(), router.clone(), id.clone());
            downstream_links.push((down.name.clone(), downstream.link()));
            listener_tasks.spawn(downstream.run(listeners_stop.clone()));
        }
        listener_tasks.spawn(mqtt.run(router, listeners_stop.clone()));
        listener_tasks.close();

        let upstream_stop = CancellationToken::new();
        let upstream_tasks = TaskTracker::new();
        let mut links = Vec::new();
        for upstream in &config.upstreams {
            let own = routes.of_upstream(&upstream.name);
            for r in own.iter() {
                tracing::info!(
                    route = %r.name, filter = %r.filter, upstream = %upstream.name,
                    exchange = %r.exchange, routing_key = %r.routing_key,
                    "forwarding"
                );
            }
            let replicator = Replicator::new(upstream.clone(), own, store.clone(), id.clone())
                .with_progress(progress.clone());
            links.push((upstream.name.clone(), replicator.link()));
            upstream_tasks.spawn(replicator.run(upstream_stop.clone()));
        }
        upstream_tasks.close();
        if config.upstreams.is_empty() {
            tracing::info!(
                "no upstream configured: messages are kept in the local log up to the store quota"
            );
        }

        let telemetry_stop = CancellationToken::new();
        tokio::spawn(flush_log_summaries(telemetry_stop.clone()));
        tokio::spawn(security::reload_on_hangup(
            security.clone(),
            telemetry_stop.clone(),
        ));
        if let (Some(listener), Some(handle)) = (telemetry_listener, metrics) {
            tokio::spawn(telemetry::serve(
                listener,
                store.clone(),
                handle,
                links,
                routes.clone(),
                store.failure(),
                telemetry::Listeners {
                    amqp: amqp_health,
                    mqtt_ws: mqtt_ws_addr.map(|addr| (addr, config.mqtt.ws_path.clone())),
                    downstreams: downstream_links,
                },
                telemetry::Admin {
                    tls: config
                        .metrics
                        .as_ref()
                        .is_some_and(|m| m.tls)
                        .then(|| security.tls.clone())
                        .flatten(),
                    users: config.auth.admin_users.clone(),
                    security: security.clone(),
                },
                telemetry_stop.clone(),
            ));
            if let Some(addr) = metrics_addr {
                tracing::info!(listen = %addr, "metrics on /metrics, health on /healthz");
            }
        }

        Ok(Gateway {
            id,
            mqtt_addr,
            mqtt_ws_addr,
            mqtt_tls_addr,
            mqtt_wss_addr,
            amqp_addr,
            amqp_tls_addr,
            metrics_addr,
            security,
            grace: config.gateway.shutdown_grace,
            store,
            listeners_stop,
            listener_tasks,
            upstream_stop,
            upstream_tasks,
            telemetry_stop,
        })
    }

    /// The gateway identity in use (configured, recorded or generated).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The MQTT over WebSocket listener's address (`None` without `mqtt.ws_listen`).
    pub fn mqtt_ws_addr(&self) -> Option<SocketAddr> {
        self.mqtt_ws_addr
    }

    /// The MQTT over TLS listener's address (`None` without `mqtt.tls_listen`).
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    /// The MQTT over WebSocket over TLS listener's address.
    pub fn mqtt_wss_addr(&self) -> Option<SocketAddr> {
        self.mqtt_wss_addr
    }

    /// The AMQP over TLS listener's address (`None` without `amqp.tls_listen`).
    pub fn amqp_tls_addr(&self) -> Option<SocketAddr> {
        self.amqp_tls_addr
    }

    /// Re-reads the certificate and the auth files, as SIGHUP does.
    pub fn reload(&self) {
        security::reload(&self.security);
    }

    /// The AMQP listener's address (`None` when `[amqp] enabled = false`).
    pub fn amqp_addr(&self) -> Option<SocketAddr> {
        self.amqp_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Resolves with the reason when the store fails (a commit hit an I/O
    /// error). Nothing can be stored after that; the process should stop so
    /// that its supervisor restarts it: reopening the store is the recovery.
    pub async fn store_failed(&self) -> String {
        let mut failure = self.store.failure();
        loop {
            if let Some(reason) = failure.borrow_and_update().clone() {
                return reason;
            }
            if failure.changed().await.is_err() {
                // The store is gone without a failure: wait forever.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The store, for inspection (tests, admin tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops accepting, lets in-flight commits finish, flushes cursors,
    /// closes upstream links; bounded by `gateway.shutdown_grace`.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        // Each stage gets its own share of the grace period, so a slow MQTT
        // drain cannot leave the replicators without time to settle their
        // confirms and flush their cursors (fewer duplicates after restart).
        let start = tokio::time::Instant::now();
        let listeners_deadline = start + self.grace.mul_f32(0.4);
        let upstream_deadline = start + self.grace.mul_f32(0.9);
        let store_deadline = start + self.grace;
        self.listeners_stop.cancel();
        if tokio::time::timeout_at(listeners_deadline, self.listener_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "MQTT and AMQP connections and downstreams did not finish within their share of the grace period");
        }
        self.upstream_stop.cancel();
        if tokio::time::timeout_at(upstream_deadline, self.upstream_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.grace, "replicators did not finish within their share of the grace period");
        }
        self.telemetry_stop.cancel();
        match tokio::time::timeout_at(
            store_deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)),
            self.store.close(),
        )
        .await
        {
            Ok(result) => result.context("closing the store")?,
            Err(_) => tracing::warn!(
                "store did not close in time; committed data is safe, pending appends were not acknowledged"
            ),
        }
        edge_log::flush_all();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Writes the rate-limited log summaries that are due, once a second, so a
/// burst of refusals is reported even if nothing follows it.
async fn flush_log_summaries(stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => edge_log::flush_due(),
        }
    }
}
