//! The file as written: every field optional, strings for durations and
//! sizes. Unknown keys are errors so a typo never silently means a default.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub amqp: RawAmqp,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
    #[serde(default, rename = "downstream")]
    pub downstreams: Vec<RawDownstream>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub id: Option<String>,
    pub data_dir: Option<String>,
    pub shutdown_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub listen: Option<String>,
    pub max_connections: Option<i64>,
    pub max_handshakes: Option<i64>,
    pub max_handshakes_per_source: Option<i64>,
    pub max_packet_size: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_inflight: Option<i64>,
    pub max_queued_messages: Option<i64>,
    pub session_expiry: Option<String>,
    pub max_session_queue: Option<i64>,
    pub max_session_queue_bytes: Option<String>,
    pub ws_listen: Option<String>,
    pub ws_path: Option<String>,
    pub tls_listen: Option<String>,
    pub wss_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmqp {
    pub enabled: Option<bool>,
    pub listen: Option<String>,
    pub max_connections: Option<i64>,
    pub channel_max: Option<i64>,
    pub frame_max: Option<String>,
    pub heartbeat: Option<String>,
    pub handshake_timeout: Option<String>,
    pub max_message_size: Option<String>,
    pub max_unconfirmed: Option<i64>,
    pub tls_listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub enabled: Option<bool>,
    pub listen: Option<String>,
    pub tls: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub password_file: Option<String>,
    pub acl_file: Option<String>,
    pub allow_anonymous: Option<bool>,
    pub cert_identity: Option<String>,
    pub admin_users: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub client_ca_file: Option<String>,
    pub require_client_cert: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections_per_source: Option<i64>,
    pub connection_rate_per_source: Option<f64>,
    pub publish_rate: Option<f64>,
    pub publish_byte_rate: Option<String>,
    pub rate_grace: Option<String>,
    pub login_backoff: Option<String>,
    pub login_backoff_max: Option<String>,
    pub login_failures_allowed: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub max_bytes: Option<String>,
    pub min_free: Option<String>,
    pub max_age: Option<String>,
    pub when_full: Option<String>,
    pub on_corrupt: Option<String>,
    pub batch_max_messages: Option<i64>,
    pub batch_max_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Option<String>,
    pub uris: Option<Vec<String>>,
    pub max_in_flight: Option<i64>,
    pub reconnect_min: Option<String>,
    pub reconnect_max: Option<String>,
    pub confirm_timeout: Option<String>,
    pub tls_ca_file: Option<String>,
    pub tls_cert_file: Option<String>,
    pub tls_key_file: Option<String>,
    pub tls_system_roots: Option<bool>,
    pub tls_server_name: Option<String>,
    pub password_file: Option<String>,
    pub password_env: Option<String>,
    pub return_to_first: Option<bool>,
    pub max_replay_rate: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<String>,
    pub filter: Option<String>,
    pub local_exchange: Option<String>,
    pub local_routing_key: Option<String>,
    pub upstream: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub priority: Option<i64>,
    pub ttl: Option<String>,
    pub persistent: Option<bool>,
    pub ack: Option<String>,
    pub declare_exchange: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDownstream {
    pub name: Option<String>,
    pub upstream: Option<String>,
    pub queue: Option<String>,
    pub declare: Option<bool>,
    pub topic_prefix: Option<String>,
    pub qos: Option<i64>,
    pub prefetch: Option<i64>,
    pub dedup_window: Option<i64>,
}
