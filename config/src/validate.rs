//! `RawConfig` → `Config`, collecting every problem.

mod security;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use crate::raw::{RawAmqp, RawConfig, RawDownstream, RawRoute, RawUpstream};
use crate::{
    AckPoint, AmqpConfig, Config, ConfigError, DownstreamConfig, ExchangeType, GatewayConfig,
    LocalSource, MetricsConfig, MqttConfig, OnCorrupt, Problem, RouteConfig, StoreConfig,
    UpstreamConfig, UpstreamTls, WhenFull, defaults,
};

const MILLI: Duration = Duration::from_millis(1);
const MILLIS_100: Duration = Duration::from_millis(100);
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
/// Largest group commit in bytes; also keeps the value within `usize` on
/// 32-bit targets.
const MAX_BATCH_BYTES: u64 = 1 << 30;

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn problem(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        expected: impl Into<String>,
    ) {
        self.problems.push(Problem {
            key: key.into(),
            value,
            expected: expected.into(),
        });
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: &str) -> Duration {
        let text = value.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(_) => {
                self.problem(
                    key,
                    Some(text.to_string()),
                    "a duration such as \"250ms\", \"10s\" or \"1h\"",
                );
                Duration::ZERO
            }
        }
    }

    /// One of a closed set of names; the first is the default. A problem
    /// lists every allowed name.
    fn choice<T: Copy>(&mut self, key: &str, value: Option<&str>, allowed: &[(&str, T)]) -> T {
        let default = allowed[0].1;
        let Some(text) = value else { return default };
        if let Some((_, v)) = allowed.iter().find(|(name, _)| *name == text) {
            return *v;
        }
        let names: Vec<String> = allowed
            .iter()
            .map(|(name, _)| format!("{name:?}"))
            .collect();
        self.problem(
            key,
            Some(text.to_string()),
            format!("one of {}", names.join(" or ")),
        );
        default
    }

    /// A duration within `[min, max]`: zero or absurd values break timers
    /// and back-off rather than meaning anything useful.
    fn duration_within(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: &str,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let text = value.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) if d >= min && d <= max => d,
            _ => {
                self.problem(
                    key,
                    Some(text.to_string()),
                    format!(
                        "a duration from {} to {}, such as \"{default}\"",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                min
            }
        }
    }

    fn size(&mut self, key: &str, value: Option<&str>, default: &str) -> u64 {
        let text = value.unwrap_or(default);
        match text.trim().parse::<bytesize::ByteSize>() {
            Ok(s) if s.as_u64() > 0 => s.as_u64(),
            _ => {
                self.problem(
                    key,
                    Some(text.to_string()),
                    "a non-zero size such as \"512KiB\", \"8MiB\" or \"2GiB\"",
                );
                1
            }
        }
    }

    /// A size where 0 (`"0"`, `"0B"`) means "off".
    fn size_or_zero(&mut self, key: &str, value: Option<&str>, default: &str) -> u64 {
        let text = value.unwrap_or(default);
        match text.trim().parse::<bytesize::ByteSize>() {
            Ok(s) => s.as_u64(),
            _ => {
                self.problem(
                    key,
                    Some(text.to_string()),
                    "a size such as \"0\" (off), \"512KiB\", \"32MiB\" or \"1GiB\"",
                );
                0
            }
        }
    }

    fn non_zero(
        &mut self,
        key: &str,
        value: Option<i64>,
        default: usize,
        max: usize,
    ) -> NonZeroUsize {
        let v = value.unwrap_or(default as i64);
        match usize::try_from(v)
            .ok()
            .filter(|v| *v <= max)
            .and_then(NonZeroUsize::new)
        {
            Some(n) => n,
            None => {
                self.problem(
                    key,
                    Some(v.to_string()),
                    format!("an integer from 1 to {max}"),
                );
                NonZeroUsize::MIN
            }
        }
    }

    fn socket(&mut self, key: &str, value: Option<&str>, default: &str) -> SocketAddr {
        let text = value.unwrap_or(default);
        match text.parse() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    key,
                    Some(text.to_string()),
                    "an IP address and port such as \"127.0.0.1:1883\" or \"[::]:1883\"",
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            }
        }
    }

    /// An HTTP path: `/` then printable ASCII, no query or fragment.
    fn ws_path(&mut self, key: &str, value: Option<&str>) -> String {
        let text = value.unwrap_or(defaults::MQTT_WS_PATH);
        let valid = text.starts_with('/')
            && text.len() <= 1024
            && text
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#');
        if !valid {
            self.problem(
                key,
                Some(text.to_string()),
                "an HTTP path starting with '/' such as \"/mqtt\" (printable ASCII, no '?' or '#')",
            );
        }
        text.to_string()
    }

    fn name(&mut self, key: &str, value: Option<&str>) -> String {
        match value {
            None => {
                self.problem(
                    key,
                    None,
                    "is required: a name of letters, digits, '.', '_' or '-'",
                );
                String::new()
            }
            Some(v) if !is_name(v) => {
                self.problem(
                    key,
                    Some(v.to_string()),
                    "a name of 1 to 64 letters, digits, '.', '_' or '-'",
                );
                v.to_string()
            }
            Some(v) => v.to_string(),
        }
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// MQTT 3.1.1 §4.7 topic filter syntax.
pub(crate) fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains('#') && !l.contains('+'),
    })
}

pub(crate) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut c = Checker::default();

    let id = raw
        .gateway
        .id
        .as_deref()
        .map(|v| c.name("gateway.id", Some(v)));
    let data_dir = match raw.gateway.data_dir.as_deref() {
        Some("") => {
            c.problem("gateway.data_dir", Some(String::new()), "a directory path");
            PathBuf::new()
        }
        v => PathBuf::from(v.unwrap_or(defaults::DATA_DIR)),
    };
    let gateway = GatewayConfig {
        id,
        data_dir,
        shutdown_grace: c.duration_within(
            "gateway.shutdown_grace",
            raw.gateway.shutdown_grace.as_deref(),
            defaults::SHUTDOWN_GRACE,
            MILLIS_100,
            HOUR,
        ),
    };

    let m = &raw.mqtt;
    let max_inflight = c.non_zero(
        "mqtt.max_inflight",
        m.max_inflight,
        defaults::MAX_INFLIGHT as usize,
        u16::MAX as usize,
    );
    let max_packet_size = c.size(
        "mqtt.max_packet_size",
        m.max_packet_size.as_deref(),
        defaults::MAX_PACKET_SIZE,
    );
    // MQTT's remaining length tops out at 256 MiB.
    if max_packet_size > 268_435_460 {
        c.problem(
            "mqtt.max_packet_size",
            m.max_packet_size.clone(),
            "at most \"256MiB\" (the MQTT limit)",
        );
    }
    let mqtt = MqttConfig {
        listen: c.socket("mqtt.listen", m.listen.as_deref(), defaults::MQTT_LISTEN),
        max_connections: c.non_zero(
            "mqtt.max_connections",
            m.max_connections,
            defaults::MAX_CONNECTIONS,
            1_000_000,
        ),
        max_handshakes: c.non_zero(
            "mqtt.max_handshakes",
            m.max_handshakes,
            defaults::MAX_HANDSHAKES,
            1_000_000,
        ),
        max_handshakes_per_source: c.non_zero(
            "mqtt.max_handshakes_per_source",
            m.max_handshakes_per_source,
            defaults::MAX_HANDSHAKES_PER_SOURCE,
            1_000_000,
        ),
        max_packet_size: NonZeroUsize::new(max_packet_size as usize).unwrap_or(NonZeroUsize::MIN),
        connect_timeout: c.duration_within(
            "mqtt.connect_timeout",
            m.connect_timeout.as_deref(),
            defaults::CONNECT_TIMEOUT,
            MILLIS_100,
            HOUR,
        ),
        max_inflight: NonZeroU16::new(max_inflight.get() as u16).unwrap_or(NonZeroU16::MIN),
        max_queued_messages: c.non_zero(
            "mqtt.max_queued_messages",
            m.max_queued_messages,
            defaults::MAX_QUEUED_MESSAGES,
            10_000_000,
        ),
        session_expiry: c.duration_within(
            "mqtt.session_expiry",
            m.session_expiry.as_deref(),
            defaults::SESSION_EXPIRY,
            SECOND,
            Duration::from_secs(10 * 365 * 24 * 3600),
        ),
        max_session_queue: c.non_zero(
            "mqtt.max_session_queue",
            m.max_session_queue,
            defaults::MAX_SESSION_QUEUE,
            100_000_000,
        ),
        max_session_queue_bytes: c.size(
            "mqtt.max_session_queue_bytes",
            m.max_session_queue_bytes.as_deref(),
            defaults::MAX_SESSION_QUEUE_BYTES,
        ),
        ws_listen: m
            .ws_listen
            .as_deref()
            .map(|text| c.socket("mqtt.ws_listen", Some(text), defaults::MQTT_LISTEN)),
        ws_path: c.ws_path("mqtt.ws_path", m.ws_path.as_deref()),
        tls_listen: m
            .tls_listen
            .as_deref()
            .map(|text| c.socket("mqtt.tls_listen", Some(text), defaults::MQTT_LISTEN)),
        wss_listen: m
            .wss_listen
            .as_deref()
            .map(|text| c.socket("mqtt.wss_listen", Some(text), defaults::MQTT_LISTEN)),
    };
    let amqp = match raw.amqp.enabled {
        Some(false) => None,
        _ => Some(amqp(&mut c, &raw.amqp)),
    };

    let metrics = match raw.metrics.enabled {
        Some(false) => None,
        _ => Some(MetricsConfig {
            listen: c.socket(
                "metrics.listen",
                raw.metrics.listen.as_deref(),
                defaults::METRICS_LISTEN,
            ),
            tls: raw.metrics.tls.unwrap_or(false),
        }),
    };

    let s = &raw.store;
    let when_full = c.choice(
        "store.when_full",
        s.when_full.as_deref(),
        &[
            ("reject", WhenFull::Reject),
            ("drop-oldest", WhenFull::DropOldest),
        ],
    );
    let on_corrupt = c.choice(
        "store.on_corrupt",
        s.on_corrupt.as_deref(),
        &[
            ("move-aside", OnCorrupt::MoveAside),
            ("refuse", OnCorrupt::Refuse),
        ],
    );
    let batch_bytes = c.size(
        "store.batch_max_bytes",
        s.batch_max_bytes.as_deref(),
        defaults::BATCH_MAX_BYTES,
    );
    if batch_bytes > MAX_BATCH_BYTES {
        c.problem(
            "store.batch_max_bytes",
            s.batch_max_bytes.clone(),
            "at most \"1GiB\"",
        );
    }
    let batch_max_bytes = usize::try_from(batch_bytes.min(MAX_BATCH_BYTES))
        .ok()
        .and_then(NonZeroUsize::new)
        .unwrap_or(NonZeroUsize::MIN);
    let max_age = s
        .max_age
        .as_deref()
        .map(|t| c.duration("store.max_age", Some(t), t));
    // (A value that is no duration at all has its problem already.)
    if s.max_age
        .as_deref()
        .is_some_and(|t| humantime::parse_duration(t).is_ok_and(|d| d < Duration::from_secs(1)))
    {
        c.problem(
            "store.max_age",
            s.max_age.clone(),
            "a duration of at least 1s, or no max_age key for no age bound",
        );
    }
    let store = StoreConfig {
        max_bytes: c.size(
            "store.max_bytes",
            s.max_bytes.as_deref(),
            defaults::STORE_MAX_BYTES,
        ),
        min_free: c.size_or_zero(
            "store.min_free",
            s.min_free.as_deref(),
            defaults::STORE_MIN_FREE,
        ),
        max_age,
        when_full,
        on_corrupt,
        batch_max_messages: c.non_zero(
            "store.batch_max_messages",
            s.batch_max_messages,
            defaults::BATCH_MAX_MESSAGES,
            1_000_000,
        ),
        batch_max_bytes,
    };

    let mut upstreams = Vec::new();
    let mut names = HashSet::new();
    for (i, u) in raw.upstreams.iter().enumerate() {
        let up = upstream(&mut c, i, u);
        if !up.name.is_empty() && !names.insert(up.name.clone()) {
            c.problem(
                format!("upstream[{i}].name"),
                Some(up.name.clone()),
                "a name not used by another [[upstream]]",
            );
        }
        upstreams.push(up);
    }

    let mut routes = Vec::new();
    let mut route_names = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let route = route(&mut c, i, r, &names);
        if !route.name.is_empty() && !route_names.insert(route.name.clone()) {
            c.problem(
                format!("route[{i}].name"),
                Some(route.name.clone()),
                "a name not used by another [[route]]",
            );
        }
        // One exchange of an upstream, one type to declare it with.
        let declared_otherwise = routes.iter().find(|other: &&RouteConfig| {
            other.upstream == route.upstream
                && other.exchange == route.exchange
                && other.declare_exchange.is_some()
                && route.declare_exchange.is_some()
                && other.declare_exchange != route.declare_exchange
        });
        if let (Some(other), Some(kind)) = (declared_otherwise, route.declare_exchange) {
            c.problem(
                format!("route[{i}].declare_exchange"),
                Some(kind.as_str().to_string()),
                format!(
                    "{:?}, the type route {:?} declares exchange {:?} with (one exchange has one type)",
                    other.declare_exchange.map_or("", ExchangeType::as_str),
                    other.name,
                    route.exchange,
                ),
            );
        }
        routes.push(route);
    }

    let mut downstreams = Vec::new();
    let mut downstream_names = HashSet::new();
    for (i, d) in raw.downstreams.iter().enumerate() {
        let down = downstream(&mut c, i, d, &names);
        if !down.name.is_empty() && !downstream_names.insert(down.name.clone()) {
            c.problem(
                format!("downstream[{i}].name"),
                Some(down.name.clone()),
                "a name not used by another [[downstream]]",
            );
        }
        downstreams.push(down);
    }

    let tls = security::tls(&mut c, &raw.tls);
    let auth = security::auth(&mut c, &raw.auth);
    let limits = security::limits(&mut c, &raw.limits);
    let config = Config {
        gateway,
        mqtt,
        amqp,
        metrics,
        store,
        upstreams,
        routes,
        downstreams,
        auth,
        tls,
        limits,
    };
    security::listeners(&mut c, &raw, &config);
    if c.problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            path: None,
            problems: c.problems,
        })
    }
}

/// AMQP 0-9-1 frames are at least 4096 octets (frame-min-size); the
/// frame size is a 32-bit field.
const AMQP_FRAME_MIN: u64 = 4096;
const AMQP_FRAME_LIMIT: u64 = 1 << 30;

fn amqp(c: &mut Checker, a: &RawAmqp) -> AmqpConfig {
    let frame_max = c.size(
        "amqp.frame_max",
        a.frame_max.as_deref(),
        defaults::AMQP_FRAME_MAX,
    );
    if !(AMQP_FRAME_MIN..=AMQP_FRAME_LIMIT).contains(&frame_max) {
        c.problem(
            "amqp.frame_max",
            a.frame_max.clone(),
            "a size from \"4KiB\" (the AMQP frame-min-size) to \"1GiB\"",
        );
    }
    let heartbeat_text = a.heartbeat.as_deref().unwrap_or(defaults::AMQP_HEARTBEAT);
    let heartbeat = match humantime::parse_duration(heartbeat_text) {
        Ok(d) if d.subsec_nanos() == 0 && d.as_secs() <= u64::from(u16::MAX) => d,
        _ => {
            c.problem(
                "amqp.heartbeat",
                Some(heartbeat_text.to_string()),
                "whole seconds from \"0s\" (no heartbeats) to \"65535s\", such as \"60s\"",
            );
            Duration::ZERO
        }
    };
    let channel_max = c.non_zero(
        "amqp.channel_max",
        a.channel_max,
        defaults::AMQP_CHANNEL_MAX,
        u16::MAX as usize,
    );
    AmqpConfig {
        listen: c.socket("amqp.listen", a.listen.as_deref(), defaults::AMQP_LISTEN),
        max_connections: c.non_zero(
            "amqp.max_connections",
            a.max_connections,
            defaults::MAX_CONNECTIONS,
            1_000_000,
        ),
        channel_max: NonZeroU16::new(channel_max.get() as u16).unwrap_or(NonZeroU16::MIN),
        frame_max: frame_max.clamp(AMQP_FRAME_MIN, AMQP_FRAME_LIMIT) as u32,
        heartbeat,
        handshake_timeout: c.duration_within(
            "amqp.handshake_timeout",
            a.handshake_timeout.as_deref(),
            defaults::AMQP_HANDSHAKE_TIMEOUT,
            MILLIS_100,
            HOUR,
        ),
        max_message_size: c.size(
            "amqp.max_message_size",
            a.max_message_size.as_deref(),
            defaults::AMQP_MAX_MESSAGE_SIZE,
        ),
        max_unconfirmed: c.non_zero(
            "amqp.max_unconfirmed",
            a.max_unconfirmed,
            defaults::AMQP_MAX_UNCONFIRMED,
            1_000_000,
        ),
        tls_listen: a
            .tls_listen
            .as_deref()
            .map(|text| c.socket("amqp.tls_listen", Some(text), defaults::AMQP_LISTEN)),
    }
}

fn upstream(c: &mut Checker, i: usize, u: &RawUpstream) -> UpstreamConfig {
    let key = |field: &str| format!("upstream[{i}].{field}");
    let name = c.name(&key("name"), u.name.as_deref());
    let uris = u.uris.clone().unwrap_or_default();
    if uris.is_empty() {
        c.problem(
            key("uris"),
            None,
            "is required: a list of one or more \"amqp://\" or \"amqps://\" URIs",
        );
    }
    for (j, uri) in uris.iter().enumerate() {
        if !uri.starts_with("amqp://") && !uri.starts_with("amqps://") {
            c.problem(
                format!("upstream[{i}].uris[{j}]"),
                Some(redact_password(uri)),
                "a URI starting with \"amqp://\" or \"amqps://\"",
            );
        }
    }
    let uris = match upstream_password(c, i, u) {
        Some(password) => with_password(c, i, &uris, &password),
        None => uris,
    };
    let tls = upstream_tls(c, i, u);
    let problems_before = c.problems.len();
    let reconnect_min = c.duration_within(
        &key("reconnect_min"),
        u.reconnect_min.as_deref(),
        defaults::RECONNECT_MIN,
        MILLI,
        HOUR,
    );
    let reconnect_max = c.duration_within(
        &key("reconnect_max"),
        u.reconnect_max.as_deref(),
        defaults::RECONNECT_MAX,
        MILLI,
        HOUR,
    );
    if c.problems.len() == problems_before && reconnect_min > reconnect_max {
        c.problem(
            key("reconnect_min"),
            u.reconnect_min.clone(),
            "a duration no longer than reconnect_max",
        );
    }
    UpstreamConfig {
        name,
        uris,
        max_in_flight: c.non_zero(
            &key("max_in_flight"),
            u.max_in_flight,
            defaults::MAX_IN_FLIGHT,
            65_535,
        ),
        reconnect_min,
        reconnect_max,
        confirm_timeout: c.duration_within(
            &key("confirm_timeout"),
            u.confirm_timeout.as_deref(),
            defaults::CONFIRM_TIMEOUT,
            SECOND,
            HOUR,
        ),
        tls,
        return_to_first: u.return_to_first.unwrap_or(false),
        max_replay_rate: u.max_replay_rate.map(|rate| {
            let rate = c.non_zero(&key("max_replay_rate"), Some(rate), 1, 1_000_000);
            NonZeroU32::try_from(rate).unwrap_or(NonZeroU32::MIN)
        }),
    }
}

/// The password of `password_file` (its first line) or `password_env`, if
/// one is configured (at most one may be).
fn upstream_password(c: &mut Checker, i: usize, u: &RawUpstream) -> Option<String> {
    let key = |field: &str| format!("upstream[{i}].{field}");
    match (&u.password_file, &u.password_env) {
        (None, None) => None,
        (Some(_), Some(_)) => {
            c.problem(
                key("password_env"),
                None,
                "unset when password_file is set (one source)",
            );
            None
        }
        (Some(path), None) => match std::fs::read_to_string(path) {
            Ok(text) => {
                let password = text.lines().next().unwrap_or("").to_string();
                if password.is_empty() {
                    c.problem(
                        key("password_file"),
                        Some(path.clone()),
                        "a file whose first line is the password",
                    );
                    return None;
                }
                Some(password)
            }
            Err(e) => {
                c.problem(
                    key("password_file"),
                    Some(path.clone()),
                    format!("a readable file ({e})"),
                );
                None
            }
        },
        (None, Some(var)) => match std::env::var(var) {
            Ok(password) if !password.is_empty() => Some(password),
            _ => {
                c.problem(
                    key("password_env"),
                    Some(var.clone()),
                    "the name of a set, non-empty environment variable",
                );
                None
            }
        },
    }
}

/// `uris` with `password` put into each one's user information, which must
/// name a user and no password (`amqps://edge@host/%2f`).
fn with_password(c: &mut Checker, i: usize, uris: &[String], password: &str) -> Vec<String> {
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut out = Vec::with_capacity(uris.len());
    for (j, uri) in uris.iter().enumerate() {
        let start = uri.find("://").map_or(0, |at| at + 3);
        let authority_end = uri[start..].find('/').map_or(uri.len(), |at| start + at);
        match uri[start..authority_end].rsplit_once('@') {
            Some((user, _)) if !user.is_empty() && !user.contains(':') => {
                let at = start + user.len();
                out.push(format!("{}:{encoded}{}", &uri[..at], &uri[at..]));
            }
            _ => {
                c.problem(
                    format!("upstream[{i}].uris[{j}]"),
                    Some(redact_password(uri)),
                    "a user and no password (\"amqps://USER@host/vhost\") when \
                     password_file or password_env is set",
                );
                out.push(uri.clone());
            }
        }
    }
    out
}

/// The upstream's TLS settings, with its files read and parsed now, so that
/// a missing, unreadable or wrong file is a config problem (with its key),
/// not a failure at the first connect.
fn upstream_tls(c: &mut Checker, i: usize, u: &RawUpstream) -> UpstreamTls {
    let key = |field: &str| format!("upstream[{i}].{field}");
    let mut read = |field: &str, path: &Option<String>, what: &str, valid: fn(&[u8]) -> bool| {
        let path = path.as_ref()?;
        match std::fs::read(path) {
            Ok(bytes) if valid(&bytes) => Some(bytes),
            Ok(_) => {
                c.problem(
                    key(field),
                    Some(path.clone()),
                    format!("a PEM file holding {what}"),
                );
                None
            }
            Err(e) => {
                c.problem(
                    key(field),
                    Some(path.clone()),
                    format!("a readable PEM file holding {what} ({e})"),
                );
                None
            }
        }
    };
    let ca = read(
        "tls_ca_file",
        &u.tls_ca_file,
        "one or more CA certificates",
        holds_certificates,
    );
    let cert = read(
        "tls_cert_file",
        &u.tls_cert_file,
        "the client certificate chain",
        holds_certificates,
    );
    let private = read(
        "tls_key_file",
        &u.tls_key_file,
        "the client's private key (PKCS#8, PKCS#1 or SEC1)",
        holds_private_key,
    );
    let identity = match (cert, private, &u.tls_cert_file, &u.tls_key_file) {
        (Some(cert), Some(private), _, _) => Some((cert, private)),
        (_, _, Some(_), None) => {
            c.problem(
                key("tls_key_file"),
                None,
                "set when tls_cert_file is (mutual TLS needs both)",
            );
            None
        }
        (_, _, None, Some(_)) => {
            c.problem(
                key("tls_cert_file"),
                None,
                "set when tls_key_file is (mutual TLS needs both)",
            );
            None
        }
        _ => None,
    };
    // A private CA alone by default: adding the system's public roots to it
    // would let any public CA vouch for the broker.
    let system_roots = u.tls_system_roots.unwrap_or(u.tls_ca_file.is_none());
    if !system_roots && u.tls_ca_file.is_none() {
        c.problem(
            key("tls_system_roots"),
            Some("false".into()),
            "true, or tls_ca_file set (otherwise no broker certificate can be trusted)",
        );
    }
    let server_name = u.tls_server_name.as_ref().and_then(|name| {
        if rustls_pki_types::ServerName::try_from(name.as_str()).is_ok() {
            Some(name.clone())
        } else {
            c.problem(
                key("tls_server_name"),
                Some(name.clone()),
                "a DNS name (\"broker.example.com\") or an IP address, as in the broker's certificate",
            );
            None
        }
    });
    UpstreamTls {
        ca_pem: ca.map(|b| String::from_utf8_lossy(&b).into_owned()),
        system_roots,
        identity,
        server_name,
    }
}

/// At least one PEM certificate, and nothing unparsable among them.
fn holds_certificates(pem: &[u8]) -> bool {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        if cert.is_err() {
            return false;
        }
        count += 1;
    }
    count > 0
}

/// A PEM private key of a kind rustls can use.
fn holds_private_key(pem: &[u8]) -> bool {
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem).is_ok()
}

/// `uri` with the password of its user information replaced by `***`, for
/// problem messages. Errs on the side of hiding: the user information ends at
/// the last `@`, so a password holding an unescaped `/`, `?`, `#` or `@` is
/// hidden too, and a URI without `://` is treated as if it were all
/// authority.
pub(crate) fn redact_password(uri: &str) -> String {
    let start = uri.find("://").map_or(0, |i| i + 3);
    let rest = &uri[start..];
    let Some((userinfo, after)) = rest.rsplit_once('@') else {
        return uri.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{}{user}:***@{after}", &uri[..start]),
        None => uri.to_string(),
    }
}

fn route(c: &mut Checker, i: usize, r: &RawRoute, upstreams: &HashSet<String>) -> RouteConfig {
    let key = |field: &str| format!("route[{i}].{field}");
    let name = c.name(&key("name"), r.name.as_deref());
    let local = local_source(c, i, r);
    let filter = r.filter.clone().unwrap_or_default();
    if local.is_none() && !is_valid_filter(&filter) {
        c.problem(key("filter"), r.filter.clone(), "an MQTT topic filter such as \"sensors/+/temp\" or \"#\" ('#' only as the last level, '+' only as a whole level), or local_exchange instead");
    }
    let upstream = known_upstream(c, &key("upstream"), r.upstream.as_deref(), upstreams);
    let exchange = r
        .exchange
        .clone()
        .unwrap_or_else(|| defaults::EXCHANGE.to_string());
    if exchange.len() > 255 {
        c.problem(
            key("exchange"),
            Some(exchange.clone()),
            "an exchange name of at most 255 bytes",
        );
    }
    let routing_key = r
        .routing_key
        .clone()
        .unwrap_or_else(|| defaults::ROUTING_KEY.to_string());
    if routing_key.replace("{topic}", "").contains(['{', '}']) {
        c.problem(
            key("routing_key"),
            Some(routing_key.clone()),
            "a routing key template whose only placeholder is {topic}",
        );
    }
    let priority = match r.priority.unwrap_or(0) {
        p @ 0..=9 => p as u8,
        p => {
            c.problem(
                key("priority"),
                Some(p.to_string()),
                "an integer from 0 to 9 (higher drains first)",
            );
            0
        }
    };
    let ttl = r
        .ttl
        .as_deref()
        .map(|t| c.duration(&key("ttl"), Some(t), t));
    if ttl.is_some_and(|t| t < MILLI) {
        c.problem(
            key("ttl"),
            r.ttl.clone(),
            "a non-zero duration, or no ttl key for no expiry",
        );
    }
    let declare_exchange = r.declare_exchange.as_deref().map(|kind| {
        c.choice(
            &key("declare_exchange"),
            Some(kind),
            &[
                ("topic", ExchangeType::Topic),
                ("direct", ExchangeType::Direct),
                ("fanout", ExchangeType::Fanout),
                ("headers", ExchangeType::Headers),
            ],
        )
    });
    if declare_exchange.is_some() && (exchange.is_empty() || exchange.starts_with("amq.")) {
        c.problem(
            key("declare_exchange"),
            r.declare_exchange.clone(),
            format!(
                "no declare_exchange for exchange {exchange:?}: the default and amq.* exchanges exist on every broker and cannot be declared (remove the key)"
            ),
        );
    }
    RouteConfig {
        name,
        filter,
        local,
        upstream,
        exchange,
        routing_key,
        priority,
        ttl,
        persistent: r.persistent.unwrap_or(true),
        ack: c.choice(
            &key("ack"),
            r.ack.as_deref(),
            &[
                ("persisted", AckPoint::Persisted),
                ("upstream-confirmed", AckPoint::UpstreamConfirmed),
            ],
        ),
        declare_exchange,
    }
}

/// The name of a configured upstream (a problem otherwise, listing them).
fn known_upstream(
    c: &mut Checker,
    key: &str,
    value: Option<&str>,
    upstreams: &HashSet<String>,
) -> String {
    let upstream = value.unwrap_or_default().to_string();
    if !upstreams.contains(&upstream) {
        let mut known: Vec<&str> = upstreams.iter().map(String::as_str).collect();
        known.sort_unstable();
        let allowed = if known.is_empty() {
            "the name of an [[upstream]] (none is configured)".to_string()
        } else {
            format!("one of the configured upstreams: {}", known.join(", "))
        };
        c.problem(key, value.map(str::to_string), allowed);
    }
    upstream
}

/// Longest MQTT topic (a two-byte length on the wire).
const MAX_TOPIC_BYTES: usize = 65_535;

fn downstream(
    c: &mut Checker,
    i: usize,
    d: &RawDownstream,
    upstreams: &HashSet<String>,
) -> DownstreamConfig {
    let key = |field: &str| format!("downstream[{i}].{field}");
    let name = c.name(&key("name"), d.name.as_deref());
    let upstream = known_upstream(c, &key("upstream"), d.upstream.as_deref(), upstreams);
    let queue = d.queue.clone().unwrap_or_default();
    if queue.is_empty() || queue.len() > 255 {
        c.problem(
            key("queue"),
            d.queue.clone(),
            "is required: the name of a queue on the upstream broker, 1 to 255 bytes",
        );
    }
    let topic_prefix = d.topic_prefix.clone().unwrap_or_default();
    if topic_prefix.contains(['+', '#', '\0']) || topic_prefix.len() > MAX_TOPIC_BYTES {
        c.problem(
            key("topic_prefix"),
            d.topic_prefix.clone(),
            "the start of an MQTT topic name such as \"site1/\" (no '+', '#' or NUL)",
        );
    }
    let qos = match d.qos.unwrap_or(i64::from(defaults::DOWNSTREAM_QOS)) {
        q @ 0..=2 => q as u8,
        q => {
            c.problem(key("qos"), Some(q.to_string()), "0, 1 or 2");
            defaults::DOWNSTREAM_QOS
        }
    };
    let prefetch = c.non_zero(
        &key("prefetch"),
        d.prefetch,
        defaults::DOWNSTREAM_PREFETCH,
        usize::from(u16::MAX),
    );
    let dedup_window = c.non_zero(
        &key("dedup_window"),
        d.dedup_window,
        defaults::DOWNSTREAM_DEDUP_WINDOW,
        10_000_000,
    );
    if dedup_window < prefetch {
        // A duplicate settled after its id left the window would look
        // like one whose first copy failed to commit, and go back.
        c.problem(
            key("dedup_window"),
            Some(dedup_window.to_string()),
            format!("at least prefetch ({prefetch}): every unacknowledged delivery's id must stay in the window"),
        );
    }
    DownstreamConfig {
        name,
        upstream,
        queue,
        declare: d.declare.unwrap_or(false),
        topic_prefix,
        qos,
        prefetch: u16::try_from(prefetch.get())
            .ok()
            .and_then(NonZeroU16::new)
            .unwrap_or(NonZeroU16::MIN),
        dedup_window,
    }
}

/// `local_exchange` (+ `local_routing_key`), the alternative to `filter`.
fn local_source(c: &mut Checker, i: usize, r: &RawRoute) -> Option<LocalSource> {
    let key = |field: &str| format!("route[{i}].{field}");
    let Some(exchange) = r.local_exchange.clone() else {
        if r.local_routing_key.is_some() {
            c.problem(
                key("local_routing_key"),
                r.local_routing_key.clone(),
                "no local_routing_key without local_exchange (it selects within that exchange)",
            );
        }
        return None;
    };
    if r.filter.is_some() {
        c.problem(
            key("filter"),
            r.filter.clone(),
            "either filter (MQTT topics) or local_exchange (what AMQP clients publish to a local exchange), not both",
        );
    }
    if exchange.is_empty() || exchange.len() > 255 || exchange == defaults::EXCHANGE {
        c.problem(
            key("local_exchange"),
            Some(exchange.clone()),
            "the name of a local AMQP exchange (1 to 255 bytes) other than amq.topic, which is the MQTT topic space: select that with filter",
        );
    }
    let routing_key = r
        .local_routing_key
        .clone()
        .unwrap_or_else(|| "#".to_string());
    let words: Vec<&str> = routing_key.split('.').collect();
    let inner_hash = words[..words.len() - 1].contains(&"#");
    if routing_key.is_empty() || routing_key.len() > 255 || inner_hash {
        c.problem(
            key("local_routing_key"),
            Some(routing_key.clone()),
            "an AMQP topic pattern such as \"eu.#\" or \"*.orders\" (words separated by '.', '*' one word, '#' any number and only as the last word), at most 255 bytes",
        );
    }
    Some(LocalSource {
        exchange,
        routing_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_selects_by_local_exchange_and_routing_key_pattern() {
        let route = |lines: &str| {
            Config::parse(&format!(
                "[[upstream]]\nname = \"central\"\nuris = [\"amqp://127.0.0.1:5672/%2f\"]\n\
                 [[route]]\nname = \"orders\"\nupstream = \"central\"\n{lines}\n"
            ))
        };
        let c = route("local_exchange = \"orders\"\nlocal_routing_key = \"eu.#\"").expect("valid");
        assert_eq!(
            c.routes[0].local,
            Some(LocalSource {
                exchange: "orders".into(),
                routing_key: "eu.#".into()
            })
        );
        let all = route("local_exchange = \"orders\"").expect("valid");
        assert_eq!(
            all.routes[0].local.as_ref().map(|l| l.routing_key.as_str()),
            Some("#")
        );
        for (lines, problem) in [
            (
                "local_exchange = \"orders\"\nfilter = \"a/#\"",
                "route[0].filter",
            ),
            (
                "local_routing_key = \"eu.#\"\nfilter = \"a/#\"",
                "route[0].local_routing_key",
            ),
            ("local_exchange = \"amq.topic\"", "route[0].local_exchange"),
            ("local_exchange = \"\"", "route[0].local_exchange"),
            (
                "local_exchange = \"x\"\nlocal_routing_key = \"a.#.b\"",
                "route[0].local_routing_key",
            ),
            ("", "route[0].filter"),
        ] {
            let err = route(lines).expect_err(lines).to_string();
            assert!(err.contains(problem), "{lines:?}: {err}");
        }
    }

    #[test]
    fn declare_exchange_takes_an_exchange_type_and_a_declarable_name() {
        let route = |lines: &str| {
            Config::parse(&format!(
                "[[upstream]]\nname = \"central\"\nuris = [\"amqp://127.0.0.1:5672/%2f\"]\n\
                 [[route]]\nname = \"r\"\nfilter = \"#\"\nupstream = \"central\"\n{lines}\n"
            ))
        };
        let c = route("exchange = \"site\"\ndeclare_exchange = \"fanout\"").expect("valid");
        assert_eq!(c.routes[0].declare_exchange, Some(ExchangeType::Fanout));
        assert_eq!(route("").expect("valid").routes[0].declare_exchange, None);
        for (lines, allowed) in [
            (
                "exchange = \"site\"\ndeclare_exchange = \"queue\"",
                "\"topic\" or \"direct\" or \"fanout\" or \"headers\"",
            ),
            ("declare_exchange = \"topic\"", "amq.*"),
            (
                "exchange = \"site\"\ndeclare_exchange = \"topic\"\n\
                 [[route]]\nname = \"s\"\nfilter = \"#\"\nupstream = \"central\"\n\
                 exchange = \"site\"\ndeclare_exchange = \"direct\"",
                "one exchange has one type",
            ),
            ("exchange = \"\"\ndeclare_exchange = \"topic\"", "amq.*"),
        ] {
            let err = route(lines).expect_err(lines).to_string();
            assert!(
                err.contains("].declare_exchange") && err.contains(allowed),
                "{lines:?}: {err}"
            );
        }
    }

    #[test]
    fn defaults_are_valid_and_loopback_only() {
        let c = Config::defaults().expect("defaults validate");
        assert!(c.mqtt.listen.ip().is_loopback());
        assert!(
            c.metrics
                .as_ref()
                .is_some_and(|m| m.listen.ip().is_loopback())
        );
        assert_eq!(c.store.max_bytes, 1 << 30);
        assert!(c.upstreams.is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_key_and_allowed_values() {
        let err = Config::parse(
            r#"
            [mqtt]
            listen = "nowhere"
            max_inflight = 0
            [store]
            when_full = "explode"
            max_bytes = "lots"
            [[route]]
            name = "r"
            filter = "a/#/b"
            upstream = "missing"
            "#,
        )
        .expect_err("invalid");
        let mut keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "mqtt.listen",
                "mqtt.max_inflight",
                "route[0].filter",
                "route[0].upstream",
                "store.max_bytes",
                "store.when_full"
            ]
        );
        let text = err.to_string();
        assert!(text.contains("\"reject\""), "{text}");
        assert!(text.contains("none is configured"), "{text}");
    }

    #[test]
    fn websocket_listener_is_optional_and_its_keys_validated_by_name() {
        let c = Config::defaults().expect("defaults");
        assert_eq!(c.mqtt.ws_listen, None);
        assert_eq!(c.mqtt.ws_path, "/mqtt");
        let c = Config::parse("[mqtt]\nws_listen = \"127.0.0.1:8083\"\nws_path = \"/ws/mqtt\"\n")
            .expect("valid");
        assert_eq!(
            c.mqtt.ws_listen,
            Some("127.0.0.1:8083".parse().expect("addr"))
        );
        assert_eq!(c.mqtt.ws_path, "/ws/mqtt");
        for (toml, key) in [
            ("ws_listen = \"8083\"", "mqtt.ws_listen"),
            (
                "listen = \"127.0.0.1:1883\"\nws_listen = \"127.0.0.1:1883\"",
                "mqtt.ws_listen",
            ),
            ("ws_path = \"mqtt\"", "mqtt.ws_path"),
            ("ws_path = \"/mqtt?x=1\"", "mqtt.ws_path"),
            ("ws_path = \"/a b\"", "mqtt.ws_path"),
        ] {
            let err = Config::parse(&format!("[mqtt]\n{toml}\n")).expect_err(toml);
            let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, [key], "{toml}");
        }
    }

    #[test]
    fn amqp_keys_are_validated_by_name() {
        let c = Config::defaults().expect("defaults");
        let a = c.amqp.expect("enabled by default");
        assert_eq!(a.listen.to_string(), "127.0.0.1:5672");
        assert_eq!(a.frame_max, 131_072);
        assert_eq!(a.heartbeat, Duration::from_secs(60));
        let err = Config::parse(
            "[amqp]\nlisten = \"x\"\nframe_max = \"1KiB\"\nheartbeat = \"1.5s\"\nchannel_max = 70000\n",
        )
        .expect_err("invalid");
        let mut keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "amqp.channel_max",
                "amqp.frame_max",
                "amqp.heartbeat",
                "amqp.listen"
            ]
        );
        assert!(err.to_string().contains("frame-min-size"), "{err}");
        let off = Config::parse("[amqp]\nenabled = false\n").expect("valid");
        assert!(off.amqp.is_none());
    }

    #[test]
    fn durations_and_sizes_out_of_range_are_named() {
        let err = Config::parse(
            r#"
            [gateway]
            shutdown_grace = "0s"
            [store]
            batch_max_bytes = "2GiB"
            [[upstream]]
            name = "u"
            uris = ["amqp://127.0.0.1"]
            confirm_timeout = "0s"
            reconnect_max = "1000000000y"
            "#,
        )
        .expect_err("invalid");
        let mut keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "gateway.shutdown_grace",
                "store.batch_max_bytes",
                "upstream[0].confirm_timeout",
                "upstream[0].reconnect_max"
            ]
        );
        assert!(err.to_string().contains("from 1s to 1h"), "{err}");
    }

    #[test]
    fn store_max_age_is_off_by_default_a_duration_and_at_least_a_second() {
        let c = Config::parse("").expect("valid");
        assert_eq!(c.store.max_age, None);
        let c = Config::parse("[store]\nmax_age = \"7days\"\n").expect("valid");
        assert_eq!(c.store.max_age, Some(Duration::from_secs(7 * 86_400)));
        for bad in ["0s", "500ms", "a week"] {
            let err =
                Config::parse(&format!("[store]\nmax_age = \"{bad}\"\n")).expect_err("invalid");
            let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
            assert_eq!(keys, ["store.max_age"], "{bad}: {err}");
        }
    }

    #[test]
    fn when_full_policies() {
        let c = Config::parse("[store]\nwhen_full = \"drop-oldest\"\n").expect("valid");
        assert_eq!(c.store.when_full, WhenFull::DropOldest);
        let err = Config::parse("[store]\nwhen_full = \"drop-newest\"\n").expect_err("invalid");
        assert!(
            err.to_string().contains("\"reject\" or \"drop-oldest\""),
            "{err}"
        );
    }

    #[test]
    fn uplink_keys_take_their_values_and_name_what_is_allowed() {
        let toml = |upstream: &str, route: &str| {
            format!(
                "[[upstream]]\nname = \"central\"\nuris = [\"amqp://h\"]\n{upstream}\n\
                 [[route]]\nname = \"r\"\nfilter = \"#\"\nupstream = \"central\"\n{route}\n"
            )
        };
        let c = Config::parse(&toml(
            "return_to_first = true\nmax_replay_rate = 500",
            "ack = \"upstream-confirmed\"",
        ))
        .expect("valid");
        assert!(c.upstreams[0].return_to_first);
        assert_eq!(c.upstreams[0].max_replay_rate.map(|r| r.get()), Some(500));
        assert_eq!(c.routes[0].ack, AckPoint::UpstreamConfirmed);
        let c = Config::parse(&toml("", "")).expect("valid");
        assert!(!c.upstreams[0].return_to_first);
        assert_eq!(c.upstreams[0].max_replay_rate, None);
        assert_eq!(c.routes[0].ack, AckPoint::Persisted);

        let err =
            Config::parse(&toml("max_replay_rate = 0", "ack = \"broker\"")).expect_err("invalid");
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["upstream[0].max_replay_rate", "route[0].ack"],
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("\"persisted\" or \"upstream-confirmed\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = Config::parse("[mqtt]\nlisten_on = \"x\"\n").expect_err("unknown key");
        assert!(err.to_string().contains("listen_on"), "{err}");
    }

    #[test]
    fn downstreams_take_defaults_and_name_every_bad_value() {
        let central = "[[upstream]]\nname = \"central\"\nuris = [\"amqp://h\"]\n";
        let c = Config::parse(&format!(
            "{central}[[downstream]]\nname = \"commands\"\nupstream = \"central\"\nqueue = \"edge.site1.commands\"\n"
        ))
        .expect("valid");
        let d = &c.downstreams[0];
        assert_eq!(d.queue, "edge.site1.commands");
        assert!(!d.declare);
        assert_eq!(d.topic_prefix, "");
        assert_eq!(d.qos, 1);
        assert_eq!(d.prefetch.get(), 100);
        assert_eq!(d.dedup_window.get(), 10_000);

        let err = Config::parse(&format!(
            "{central}[[downstream]]\nname = \"a b\"\nupstream = \"nowhere\"\n\
             topic_prefix = \"site/+/\"\nqos = 3\nprefetch = 0\ndedup_window = -1\n\
             [[downstream]]\nname = \"twice\"\nupstream = \"central\"\nqueue = \"q\"\n\
             [[downstream]]\nname = \"twice\"\nupstream = \"central\"\nqueue = \"q\"\n"
        ))
        .expect_err("invalid");
        assert_eq!(
            problem_keys(&err),
            [
                "downstream[0].name",
                "downstream[0].upstream",
                "downstream[0].queue",
                "downstream[0].topic_prefix",
                "downstream[0].qos",
                "downstream[0].prefetch",
                "downstream[0].dedup_window",
                "downstream[2].name",
            ],
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.contains("one of the configured upstreams: central"),
            "{text}"
        );
        assert!(text.contains("0, 1 or 2"), "{text}");
        let err = Config::parse("[[downstream]]\nname = \"d\"\nqueue = \"q\"\nretries = 1\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("retries"), "{err}");
        let err = Config::parse(&format!(
            "{central}[[downstream]]\nname = \"d\"\nupstream = \"central\"\nqueue = \"q\"\n\
             prefetch = 500\ndedup_window = 100\n"
        ))
        .expect_err("a window smaller than prefetch");
        assert_eq!(problem_keys(&err), ["downstream[0].dedup_window"], "{err}");
        assert!(err.to_string().contains("at least prefetch (500)"), "{err}");
    }

    #[test]
    fn routes_resolve_against_upstreams() {
        let c = Config::parse(
            r#"
            [[upstream]]
            name = "central"
            uris = ["amqp://127.0.0.1:5672/%2f"]
            [[route]]
            name = "telemetry"
            filter = "sensors/#"
            upstream = "central"
            ttl = "1h"
            "#,
        )
        .expect("valid");
        let r = &c.routes[0];
        assert_eq!(r.exchange, "amq.topic");
        assert_eq!(r.routing_key, "{topic}");
        assert_eq!(r.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(c.routes_of("central").count(), 1);
    }

    #[test]
    fn the_example_file_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("edge-gateway.example.toml");
        let c = Config::load(&path).expect("example config validates");
        assert_eq!(c.gateway.id.as_deref(), Some("edge-01"));
        assert_eq!(c.routes[0].upstream, "central");
        assert_eq!(c.downstreams[0].upstream, "central");
        assert_eq!(c.downstreams[0].queue, "edge.site1.commands");
    }

    /// A config of one upstream "central" with `uris` (TOML list items) and
    /// `extra` lines.
    fn central(uris: &str, extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[[upstream]]\nname = \"central\"\nuris = [{uris}]\n{extra}\n"
        ))
    }

    /// The keys of the upstream's three TLS files, in problem order.
    const TLS_FILE_KEYS: [&str; 3] = [
        "upstream[0].tls_ca_file",
        "upstream[0].tls_cert_file",
        "upstream[0].tls_key_file",
    ];

    fn problem_keys(err: &ConfigError) -> Vec<&str> {
        err.problems().iter().map(|p| p.key.as_str()).collect()
    }

    /// `dir/name` holding one PEM block of `label` (a placeholder body: the
    /// check parses PEM, not DER).
    fn pem_file(dir: &std::path::Path, name: &str, label: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("-----BEGIN {label}-----\nAAAA\n-----END {label}-----\n"),
        )
        .expect("write");
        path
    }

    #[test]
    fn passwords_come_from_a_file_or_the_environment_not_the_uri() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("central.secret");
        std::fs::write(&file, "p@ss/w:rd\nignored\n").expect("write");
        let c = central(
            r#""amqps://edge@10.0.0.2:5671/%2f", "amqp://edge@10.0.0.3""#,
            &format!("password_file = {file:?}"),
        )
        .expect("valid");
        assert_eq!(
            c.upstreams[0].uris,
            [
                "amqps://edge:p%40ss%2Fw%3Ard@10.0.0.2:5671/%2f",
                "amqp://edge:p%40ss%2Fw%3Ard@10.0.0.3"
            ]
        );
        // HOME is set wherever tests run.
        let home = std::env::var("HOME").expect("HOME");
        let c = central(r#""amqp://edge@h/%2f""#, "password_env = \"HOME\"").expect("valid");
        assert!(c.upstreams[0].uris[0].starts_with("amqp://edge:"));
        assert!(!home.contains('/') || c.upstreams[0].uris[0].contains("%2F"));

        let err = central(
            r#""amqp://edge:inline@h/%2f""#,
            &format!(
                "password_file = {file:?}\npassword_env = \"EDGE_NO_SUCH_VARIABLE_FOR_TESTS\""
            ),
        )
        .expect_err("two sources");
        let keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["upstream[0].password_env"], "{err}");
        let err = central(
            r#""amqp://edge:inline@h/%2f""#,
            &format!("password_file = {file:?}"),
        )
        .expect_err("a password in the URI too");
        assert_eq!(err.problems()[0].key, "upstream[0].uris[0]");
        assert!(!err.to_string().contains("inline") && !err.to_string().contains("p@ss"));
    }

    #[test]
    fn amqps_uris_take_tls_files_read_when_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pem_file(dir.path(), "ca.pem", "CERTIFICATE");
        let not_pem = dir.path().join("notes.txt");
        std::fs::write(&not_pem, "hello").expect("write");
        let c = central(
            r#""amqps://guest:s3cret@10.0.0.2:5671/%2f""#,
            &format!("tls_ca_file = {ca:?}"),
        )
        .expect("amqps with a CA file is accepted");
        assert!(
            c.upstreams[0]
                .tls
                .ca_pem
                .as_deref()
                .is_some_and(|p| p.contains("BEGIN"))
        );
        assert!(c.upstreams[0].tls.identity.is_none());
        assert!(
            !format!("{:?}", c.upstreams[0].tls).contains("BEGIN"),
            "never printed"
        );

        let err = central(
            r#""amqps://guest:s3cret@10.0.0.2:5671/%2f""#,
            &format!("tls_ca_file = \"/nonexistent/ca.pem\"\ntls_cert_file = {not_pem:?}"),
        )
        .expect_err("bad TLS files");
        assert_eq!(problem_keys(&err), TLS_FILE_KEYS, "{err}");
        assert!(!err.to_string().contains("s3cret"));
    }

    #[test]
    fn system_roots_by_default_only_without_a_ca_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = pem_file(dir.path(), "ca.pem", "CERTIFICATE");
        let amqps = r#""amqps://edge@10.0.0.2:5671/%2f""#;
        let tls = |extra: &str| central(amqps, extra).map(|c| c.upstreams[0].tls.clone());

        let public = tls("").expect("no TLS keys");
        assert!(public.system_roots && public.ca_pem.is_none());
        let private = tls(&format!("tls_ca_file = {ca:?}")).expect("a CA file");
        assert!(!private.system_roots && private.ca_pem.is_some());
        let both = tls(&format!("tls_ca_file = {ca:?}\ntls_system_roots = true")).expect("both");
        assert!(both.system_roots && both.ca_pem.is_some());

        let err = tls("tls_system_roots = false").expect_err("nothing trusted");
        assert_eq!(err.problems()[0].key, "upstream[0].tls_system_roots");
        assert!(err.to_string().contains("tls_ca_file"), "{err}");
    }

    #[test]
    fn tls_server_name_is_a_dns_name_or_an_ip_address() {
        let amqps = r#""amqps://edge@10.0.0.2:5671/%2f""#;
        for name in ["broker.example.com", "broker-1", "10.0.0.2", "::1"] {
            let c = central(amqps, &format!("tls_server_name = {name:?}")).expect(name);
            assert_eq!(c.upstreams[0].tls.server_name.as_deref(), Some(name));
        }
        assert_eq!(
            central(amqps, "").expect("valid").upstreams[0]
                .tls
                .server_name,
            None
        );
        for bad in ["", "broker example", "http://broker", "a..b"] {
            let err = central(amqps, &format!("tls_server_name = {bad:?}")).expect_err(bad);
            assert_eq!(
                err.problems()[0].key,
                "upstream[0].tls_server_name",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tls_files_must_hold_what_their_key_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key_only = pem_file(dir.path(), "client.key", "PRIVATE KEY");
        let cert_only = pem_file(dir.path(), "client.pem", "CERTIFICATE");
        let amqps = r#""amqps://edge@10.0.0.2:5671/%2f""#;
        let c = central(
            amqps,
            &format!("tls_cert_file = {cert_only:?}\ntls_key_file = {key_only:?}"),
        )
        .expect("a certificate and a key");
        assert!(c.upstreams[0].tls.identity.is_some());
        assert!(
            !format!("{:?}", c.upstreams[0].tls).contains("PRIVATE"),
            "the key is never printed"
        );
        // Swapped: a key where certificates belong and the other way round.
        let err = central(
            amqps,
            &format!(
                "tls_ca_file = {key_only:?}\ntls_cert_file = {key_only:?}\ntls_key_file = {cert_only:?}"
            ),
        )
        .expect_err("swapped files");
        assert_eq!(problem_keys(&err), TLS_FILE_KEYS, "{err}");
    }

    #[test]
    fn other_schemes_are_refused_without_printing_the_password() {
        let err = Config::parse(
            r#"
            [[upstream]]
            name = "central"
            uris = ["http://guest:s3cret@10.0.0.1/"]
            "#,
        )
        .expect_err("http is refused");
        assert!(err.to_string().contains("upstream[0].uris[0]"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn redacting_hides_every_password_shape() {
        for (uri, shown) in [
            ("amqps://u:p@h:5671/%2f", "amqps://u:***@h:5671/%2f"),
            ("amqp://u:p:q@h/v?x=1", "amqp://u:***@h/v?x=1"),
            // Unescaped characters that end the authority in a URI parser.
            ("amqps://u:p/q@h/v", "amqps://u:***@h/v"),
            ("amqps://u:p@q#r@h/v", "amqps://u:***@h/v"),
            // No "://": the whole text is taken as authority.
            ("amqps:/u:p@h", "amqps:***@h"),
            // Nothing to hide.
            ("amqps://h:5671/%2f", "amqps://h:5671/%2f"),
            ("amqps://u@h/v", "amqps://u@h/v"),
        ] {
            assert_eq!(redact_password(uri), shown, "{uri}");
        }
    }

    #[test]
    fn filter_syntax() {
        for ok in ["#", "a/+/c", "a/#", "+", "a//b"] {
            assert!(is_valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a+/b", "a/b#"] {
            assert!(!is_valid_filter(bad), "{bad}");
        }
    }
}
