//! The gateway's configuration: TOML in, a validated [`Config`] out.
//!
//! Parsing happens in two steps. [`raw::RawConfig`] mirrors the file (serde,
//! unknown keys rejected); [`Config::from_raw`] turns it into typed values
//! (durations, byte sizes, socket addresses, non-zero limits) and reports
//! every problem at once, each naming its key, the value and what is allowed.
//! Nothing in the gateway starts before this has succeeded.

mod error;
pub mod raw;
mod validate;

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, Problem};

/// `uri` with the password of its user info replaced by `***`, for logs and
/// error messages. Errs on the side of hiding: the user info is taken to end
/// at the last `@`, so a password with unescaped `/`, `?`, `#` or `@` is
/// hidden too.
pub fn redact_uri(uri: &str) -> String {
    validate::redact_password(uri)
}
use raw::RawConfig;

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub mqtt: MqttConfig,
    /// `None` when `[amqp] enabled = false`.
    pub amqp: Option<AmqpConfig>,
    /// `None` when `[metrics] enabled = false`.
    pub metrics: Option<MetricsConfig>,
    pub store: StoreConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// Central queues consumed and published locally (`[[downstream]]`).
    pub downstreams: Vec<DownstreamConfig>,
    pub auth: AuthConfig,
    /// `None` without a `[tls]` section (then no TLS listener may be set).
    pub tls: Option<TlsConfig>,
    pub limits: LimitsConfig,
}

impl Config {
    /// Every listener address clients can connect to, with its key.
    pub fn client_listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut all = vec![("mqtt.listen", self.mqtt.listen)];
        let optional = [
            ("mqtt.tls_listen", self.mqtt.tls_listen),
            ("mqtt.ws_listen", self.mqtt.ws_listen),
            ("mqtt.wss_listen", self.mqtt.wss_listen),
            ("amqp.listen", self.amqp.as_ref().map(|a| a.listen)),
            (
                "amqp.tls_listen",
                self.amqp.as_ref().and_then(|a| a.tls_listen),
            ),
        ];
        all.extend(
            optional
                .into_iter()
                .filter_map(|(key, addr)| addr.map(|a| (key, a))),
        );
        all
    }
}

/// Who may connect, and what they may touch (`[auth]`).
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Users and their argon2id hashes (`edge-gateway passwd FILE USER`).
    pub password_file: Option<PathBuf>,
    /// Mosquitto-style topic rules plus AMQP permissions; `None`: every
    /// client that got in may publish and subscribe anywhere.
    pub acl_file: Option<PathBuf>,
    /// Clients without credentials are let in (as no user).
    pub allow_anonymous: bool,
    /// Which part of a verified client certificate is the user name.
    pub cert_identity: CertIdentity,
    /// Users allowed to use the admin HTTP API (dead letters) from
    /// anywhere; with none, the API answers loopback peers only.
    pub admin_users: Vec<String>,
}

/// Which part of a verified client certificate names the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CertIdentity {
    /// Certificates are checked, users log in with a password.
    #[default]
    None,
    /// The subject's common name.
    CommonName,
    /// The first DNS name, e-mail address or URI in subjectAltName.
    SubjectAltName,
}

/// The server certificate all TLS listeners share (`[tls]`), reloaded on SIGHUP.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CAs client certificates are verified against; `None`: no client
    /// certificates are asked for.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a valid certificate (mutual TLS).
    pub require_client_cert: bool,
}

/// Limits against misbehaving clients (`[limits]`), for MQTT and AMQP.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Open connections from one source address, at most.
    pub max_connections_per_source: NonZeroUsize,
    /// New connections a second from one source address (bursts of twice
    /// that are let through).
    pub connection_rate_per_source: f64,
    /// Publishes a second per MQTT client or AMQP connection; `None`:
    /// unlimited.
    pub publish_rate: Option<f64>,
    /// Payload bytes a second, likewise; `None`: unlimited.
    pub publish_byte_rate: Option<u64>,
    /// An MQTT client held back by its rate for this long without a break
    /// is disconnected (AMQP connections are only held back).
    pub rate_grace: Duration,
    /// First back-off after a failed login from a source; doubles with
    /// each further failure up to `login_backoff_max`.
    pub login_backoff: Duration,
    pub login_backoff_max: Duration,
    /// Consecutive failed logins from a source before its back-off starts.
    pub login_failures_allowed: u32,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Identity of this gateway; prefix of every forwarded `message_id`.
    /// `None`: use the identity recorded in the store, or make one up at
    /// the first start (`<host name>-<8 hex digits>`) and record it.
    pub id: Option<String>,
    /// Directory holding the store (`edge.redb`).
    pub data_dir: PathBuf,
    /// How long shutdown waits for in-flight work before forcing.
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    /// Clients past CONNECT, at most.
    pub max_connections: NonZeroUsize,
    /// Connections that have not sent CONNECT yet, at most; at the limit the
    /// oldest of them is closed to make room, so idle sockets cannot keep a
    /// real client out.
    pub max_handshakes: NonZeroUsize,
    /// The same, per source address.
    pub max_handshakes_per_source: NonZeroUsize,
    /// Largest accepted packet, fixed header included.
    pub max_packet_size: NonZeroUsize,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// Unacknowledged QoS 1/2 deliveries per connection (until PUBACK or
    /// PUBCOMP), and QoS 1/2 publishes awaiting their commit before the
    /// connection stops reading.
    pub max_inflight: NonZeroU16,
    /// Messages queued for one subscriber before new ones are dropped (counted).
    pub max_queued_messages: NonZeroUsize,
    /// How long a persistent session (clean session = 0) is kept after its
    /// client left.
    pub session_expiry: Duration,
    /// Messages a persistent session's queue holds at most; newer ones are
    /// not queued for it (counted, `session_queue_full`).
    pub max_session_queue: NonZeroUsize,
    /// Encoded bytes a persistent session's queue holds at most; newer
    /// messages are not queued for it (counted, `session_queue_bytes`).
    pub max_session_queue_bytes: u64,
    /// MQTT over WebSocket: the listener's address; `None` = not served.
    pub ws_listen: Option<SocketAddr>,
    /// The HTTP path the WebSocket upgrade is accepted on.
    pub ws_path: String,
    /// MQTT over TLS (usually port 8883); needs `[tls]`.
    pub tls_listen: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS; needs `[tls]`.
    pub wss_listen: Option<SocketAddr>,
}

/// The AMQP 0-9-1 listener for local applications.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub listen: SocketAddr,
    /// Connections at once; a further one is closed after the protocol
    /// header with 530 (not allowed).
    pub max_connections: NonZeroUsize,
    /// Highest channel number a connection may open (proposed in Tune).
    pub channel_max: NonZeroU16,
    /// Largest frame, header and end octet included (proposed in Tune; a
    /// client may only lower it). A bigger frame closes the connection (501)
    /// from its 7-byte header, before it is buffered.
    pub frame_max: u32,
    /// Heartbeat interval proposed in Tune; zero proposes none. A connection
    /// that sends nothing for two intervals is closed.
    pub heartbeat: Duration,
    /// Time a new connection has to finish the handshake (up to Open).
    pub handshake_timeout: Duration,
    /// Largest message body accepted (406 on the channel beyond it).
    pub max_message_size: u64,
    /// Per connection: publishes awaiting their commit before the gateway
    /// stops reading the socket (back-pressure).
    pub max_unconfirmed: NonZeroUsize,
    /// AMQP over TLS (usually port 5671); needs `[tls]`.
    pub tls_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    /// Serve HTTPS with the `[tls]` certificate.
    pub tls: bool,
}

/// What the store does when a new message would exceed its quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Refuse the message: no acknowledgement, the publisher is told why.
    Reject,
    /// Delete the oldest unforwarded messages to make room (counted, logged
    /// at ERROR): for data where the newest matters most.
    DropOldest,
}

/// What start-up does with a store file that is damaged (not merely locked
/// or of another schema).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnCorrupt {
    /// Salvage what can still be read into a fresh store, rename the
    /// damaged file to `edge.redb.corrupt-<unix seconds>`, log at ERROR with
    /// the counts, count it, and start: the gateway keeps accepting data
    /// and forwards what was salvaged.
    MoveAside,
    /// Refuse to start.
    Refuse,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Quota on live (not yet retired) record bytes.
    pub max_bytes: u64,
    /// Free space kept on the data directory's filesystem: below it the
    /// store refuses data rather than filling the disk.
    pub min_free: u64,
    /// Log records older than this are dropped, forwarded or not; `None`:
    /// no age bound.
    pub max_age: Option<Duration>,
    pub when_full: WhenFull,
    pub on_corrupt: OnCorrupt,
    /// Most appends in one group commit.
    pub batch_max_messages: NonZeroUsize,
    /// Most payload bytes in one group commit.
    pub batch_max_bytes: NonZeroUsize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// Broker nodes, tried in order: `amqp://` (plain TCP) or `amqps://`
    /// (TLS, certificate verified; never falls back to plain TCP).
    pub uris: Vec<String>,
    /// Published but unconfirmed messages at most.
    pub max_in_flight: NonZeroUsize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Backlog present, link up, no confirm for this long: rebuild the channel.
    pub confirm_timeout: Duration,
    /// For `amqps://` nodes: what to trust, the client identity, the name
    /// to verify.
    pub tls: UpstreamTls,
    /// Linked to a node other than the first: probe the first every
    /// `reconnect_max` and move back to it once it answers.
    pub return_to_first: bool,
    /// Most messages per second forwarded while a backlog drains (records
    /// older than the link); live traffic is not held back. None: no cap.
    pub max_replay_rate: Option<NonZeroU32>,
}

/// TLS settings of an upstream, with the files the config names
/// (`tls_ca_file`, `tls_cert_file`, `tls_key_file`) read and checked to
/// hold PEM certificates and a key when the config is checked.
#[derive(Clone, Default)]
pub struct UpstreamTls {
    /// PEM certificates of the CAs trusted to sign the broker's certificate.
    pub ca_pem: Option<String>,
    /// Trust the system's root certificates too (`tls_system_roots`; by
    /// default only when no `tls_ca_file` is given, so that a private CA is
    /// not widened to every public one).
    pub system_roots: bool,
    /// PEM certificate chain and PEM private key for mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// `tls_server_name`: the name sent as SNI and verified against the
    /// broker's certificate instead of each URI's host (a DNS name or an IP
    /// address).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca_pem.as_ref().map(|_| "(set)"))
            .field("system_roots", &self.system_roots)
            .field("identity", &self.identity.as_ref().map(|_| "(set)"))
            .field("server_name", &self.server_name)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// MQTT topic filter selecting the messages of this route. Empty for a
    /// route with `local`, whose filter in the core's topic space the
    /// gateway derives from it with the AMQP adapter's exchange mapping.
    pub filter: String,
    /// Instead of `filter`: what AMQP clients publish to a local exchange.
    pub local: Option<LocalSource>,
    /// Name of an `[[upstream]]`.
    pub upstream: String,
    pub exchange: String,
    /// Routing-key template; `{topic}` is the topic mapped to AMQP.
    pub routing_key: String,
    /// Higher drains first while a backlog is replayed.
    pub priority: u8,
    /// Messages older than this are dropped at forwarding time (counted).
    pub ttl: Option<Duration>,
    /// AMQP delivery mode 2 (persistent) when true.
    pub persistent: bool,
    /// When a publisher's message on this route is acknowledged.
    pub ack: AckPoint,
    /// Declare `exchange` (durable, of this type) on the upstream after
    /// each connect, before checking it exists; `None`: only check.
    pub declare_exchange: Option<ExchangeType>,
}

/// The type of an exchange the gateway declares upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }
}

/// A central queue whose messages the gateway publishes locally
/// (`[[downstream]]`): commands from central to devices.
#[derive(Debug, Clone)]
pub struct DownstreamConfig {
    /// Unique among downstreams; metrics label and dedup key prefix.
    pub name: String,
    /// Name of the `[[upstream]]` whose nodes, credentials and TLS settings
    /// are used (over a connection of the downstream's own).
    pub upstream: String,
    /// The central queue consumed.
    pub queue: String,
    /// Declare the queue (durable) instead of requiring that it exists.
    pub declare: bool,
    /// Prepended to the topic each message maps to.
    pub topic_prefix: String,
    /// QoS of the local publish: 0, 1 or 2.
    pub qos: u8,
    /// Unacknowledged deliveries at most (`basic.qos` prefetch count).
    pub prefetch: NonZeroU16,
    /// Message ids remembered for duplicate suppression.
    pub dedup_window: NonZeroUsize,
}

/// When the gateway acknowledges a message to its publisher (MQTT PUBACK /
/// PUBREC, AMQP confirm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckPoint {
    /// Once it is fsynced in the local store (`"persisted"`).
    #[default]
    Persisted,
    /// Once the route's upstream broker confirmed it (`"upstream-confirmed"`);
    /// it is in the local store before that, too.
    UpstreamConfirmed,
}

/// A route's selection by local AMQP exchange and routing-key pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSource {
    /// A local exchange other than `amq.topic` (that one is the MQTT topic
    /// space: select it with `filter`).
    pub exchange: String,
    /// AMQP topic pattern over the publish's routing key: words separated
    /// by `.`, `*` one word, `#` (only as the last word) any number.
    pub routing_key: String,
}

/// The documented defaults, also used by `cargo run` without a file.
pub mod defaults {
    pub const MQTT_LISTEN: &str = "127.0.0.1:1883";
    pub const MQTT_WS_PATH: &str = "/mqtt";
    pub const AMQP_LISTEN: &str = "127.0.0.1:5672";
    pub const AMQP_CHANNEL_MAX: usize = 2047;
    pub const AMQP_FRAME_MAX: &str = "128KiB";
    pub const AMQP_HEARTBEAT: &str = "60s";
    pub const AMQP_HANDSHAKE_TIMEOUT: &str = "10s";
    pub const AMQP_MAX_MESSAGE_SIZE: &str = "16MiB";
    pub const AMQP_MAX_UNCONFIRMED: usize = 1024;
    pub const METRICS_LISTEN: &str = "127.0.0.1:9183";
    pub const DATA_DIR: &str = "./data";
    pub const SHUTDOWN_GRACE: &str = "10s";
    pub const MAX_CONNECTIONS: usize = 1024;
    pub const MAX_HANDSHAKES: usize = 256;
    pub const MAX_HANDSHAKES_PER_SOURCE: usize = 32;
    pub const MAX_PACKET_SIZE: &str = "1MiB";
    pub const CONNECT_TIMEOUT: &str = "5s";
    pub const MAX_INFLIGHT: u16 = 64;
    pub const MAX_QUEUED_MESSAGES: usize = 1000;
    pub const SESSION_EXPIRY: &str = "2h";
    pub const MAX_SESSION_QUEUE: usize = 100_000;
    pub const MAX_SESSION_QUEUE_BYTES: &str = "64MiB";
    pub const STORE_MAX_BYTES: &str = "1GiB";
    pub const STORE_MIN_FREE: &str = "32MiB";
    pub const BATCH_MAX_MESSAGES: usize = 4096;
    pub const BATCH_MAX_BYTES: &str = "8MiB";
    pub const MAX_IN_FLIGHT: usize = 256;
    pub const RECONNECT_MIN: &str = "100ms";
    pub const RECONNECT_MAX: &str = "30s";
    pub const CONFIRM_TIMEOUT: &str = "30s";
    pub const EXCHANGE: &str = "amq.topic";
    pub const ROUTING_KEY: &str = "{topic}";
    pub const DOWNSTREAM_QOS: u8 = 1;
    pub const DOWNSTREAM_PREFETCH: usize = 100;
    pub const DOWNSTREAM_DEDUP_WINDOW: usize = 10_000;
    pub const MAX_CONNECTIONS_PER_SOURCE: usize = 256;
    pub const CONNECTION_RATE_PER_SOURCE: f64 = 100.0;
    pub const RATE_GRACE: &str = "10s";
    pub const LOGIN_BACKOFF: &str = "1s";
    pub const LOGIN_BACKOFF_MAX: &str = "30s";
    pub const LOGIN_FAILURES_ALLOWED: u32 = 3;
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: None,
            message: e.to_string(),
        })?;
        Config::from_raw(raw)
    }

    /// The embedded defaults: what `edge-gateway` runs without `--config`.
    pub fn defaults() -> Result<Config, ConfigError> {
        Config::from_raw(RawConfig::default())
    }

    /// Validates every field, collecting all problems before failing.
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        validate::validate(raw)
    }

    /// The routes that forward to the named upstream.
    pub fn routes_of<'a>(&'a self, upstream: &'a str) -> impl Iterator<Item = &'a RouteConfig> {
        self.routes.iter().filter(move |r| r.upstream == upstream)
    }
}
