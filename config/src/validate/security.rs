//! `[auth]`, `[tls]` and `[limits]`, and the checks that span sections:
//! listeners on distinct addresses, TLS listeners only with a certificate,
//! and no listener off loopback that lets anyone in unless the operator
//! said so (`auth.allow_anonymous = true`).

use std::path::PathBuf;
use std::time::Duration;

use super::{Checker, HOUR, MILLIS_100};
use crate::raw::{RawAuth, RawConfig, RawLimits, RawTls};
use crate::{AuthConfig, CertIdentity, Config, LimitsConfig, TlsConfig, defaults};

/// Largest rate worth expressing.
const MAX_RATE: f64 = 1e9;

fn path(c: &mut Checker, key: &str, value: Option<&str>) -> Option<PathBuf> {
    match value {
        Some("") => {
            c.problem(key, Some(String::new()), "a file path");
            None
        }
        Some(p) => Some(PathBuf::from(p)),
        None => None,
    }
}

pub(super) fn tls(c: &mut Checker, t: &RawTls) -> Option<TlsConfig> {
    let cert_file = path(c, "tls.cert_file", t.cert_file.as_deref());
    let key_file = path(c, "tls.key_file", t.key_file.as_deref());
    let client_ca_file = path(c, "tls.client_ca_file", t.client_ca_file.as_deref());
    let require_client_cert = t.require_client_cert.unwrap_or(false);
    let any = cert_file.is_some()
        || key_file.is_some()
        || client_ca_file.is_some()
        || t.require_client_cert.is_some();
    if !any {
        return None;
    }
    if require_client_cert && client_ca_file.is_none() {
        c.problem(
            "tls.require_client_cert",
            Some("true".to_string()),
            "tls.client_ca_file set as well (the CA client certificates are checked against)",
        );
    }
    match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Some(TlsConfig {
            cert_file,
            key_file,
            client_ca_file,
            require_client_cert,
        }),
        (cert, key) => {
            for (name, missing) in [
                ("tls.cert_file", cert.is_none()),
                ("tls.key_file", key.is_none()),
            ] {
                if missing {
                    c.problem(
                        name,
                        None,
                        "is required in [tls]: a PEM file (the certificate chain, or its private key)",
                    );
                }
            }
            None
        }
    }
}

pub(super) fn auth(c: &mut Checker, a: &RawAuth) -> AuthConfig {
    let password_file = path(c, "auth.password_file", a.password_file.as_deref());
    let acl_file = path(c, "auth.acl_file", a.acl_file.as_deref());
    let cert_identity = c.choice(
        "auth.cert_identity",
        a.cert_identity.as_deref(),
        &[
            ("none", CertIdentity::None),
            ("cn", CertIdentity::CommonName),
            ("san", CertIdentity::SubjectAltName),
        ],
    );
    // With users, anonymous access is opt-in; without, it is the default
    // (and `listeners` refuses it off loopback unless it was explicit).
    let allow_anonymous = a.allow_anonymous.unwrap_or(password_file.is_none());
    if !allow_anonymous && password_file.is_none() && cert_identity == CertIdentity::None {
        c.problem(
            "auth.allow_anonymous",
            Some("false".to_string()),
            "auth.password_file or auth.cert_identity set as well (otherwise nobody can log in)",
        );
    }
    let admin_users = a.admin_users.clone().unwrap_or_default();
    for (i, user) in admin_users.iter().enumerate() {
        if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
            c.problem(
                format!("auth.admin_users[{i}]"),
                Some(user.clone()),
                "a user name of the password file (no ':' or control characters)",
            );
        }
    }
    if !admin_users.is_empty() && password_file.is_none() {
        c.problem(
            "auth.admin_users",
            None,
            "auth.password_file set as well (admin users log in with their password)",
        );
    }
    AuthConfig {
        password_file,
        acl_file,
        allow_anonymous,
        cert_identity,
        admin_users,
    }
}

fn rate(c: &mut Checker, key: &str, value: Option<f64>) -> Option<f64> {
    let v = value?;
    if v.is_finite() && v > 0.0 && v <= MAX_RATE {
        Some(v)
    } else {
        c.problem(
            key,
            Some(v.to_string()),
            "a positive number per second, such as 100 or 0.5",
        );
        None
    }
}

pub(super) fn limits(c: &mut Checker, l: &RawLimits) -> LimitsConfig {
    let publish_byte_rate = l
        .publish_byte_rate
        .as_deref()
        .map(|text| c.size("limits.publish_byte_rate", Some(text), "1MiB"));
    let login_backoff = c.duration_within(
        "limits.login_backoff",
        l.login_backoff.as_deref(),
        defaults::LOGIN_BACKOFF,
        Duration::ZERO,
        HOUR,
    );
    let login_backoff_max = c.duration_within(
        "limits.login_backoff_max",
        l.login_backoff_max.as_deref(),
        defaults::LOGIN_BACKOFF_MAX,
        Duration::ZERO,
        24 * HOUR,
    );
    if login_backoff_max < login_backoff {
        c.problem(
            "limits.login_backoff_max",
            l.login_backoff_max.clone(),
            "a duration no shorter than limits.login_backoff",
        );
    }
    let connection_rate = l
        .connection_rate_per_source
        .unwrap_or(defaults::CONNECTION_RATE_PER_SOURCE);
    LimitsConfig {
        max_connections_per_source: c.non_zero(
            "limits.max_connections_per_source",
            l.max_connections_per_source,
            defaults::MAX_CONNECTIONS_PER_SOURCE,
            1_000_000,
        ),
        connection_rate_per_source: rate(
            c,
            "limits.connection_rate_per_source",
            Some(connection_rate),
        )
        .unwrap_or(defaults::CONNECTION_RATE_PER_SOURCE),
        publish_rate: rate(c, "limits.publish_rate", l.publish_rate),
        publish_byte_rate,
        rate_grace: c.duration_within(
            "limits.rate_grace",
            l.rate_grace.as_deref(),
            defaults::RATE_GRACE,
            MILLIS_100,
            HOUR,
        ),
        login_backoff,
        login_backoff_max,
        login_failures_allowed: match l.login_failures_allowed {
            None => defaults::LOGIN_FAILURES_ALLOWED,
            Some(n) => match u32::try_from(n) {
                Ok(n) if n <= 1000 => n,
                _ => {
                    c.problem(
                        "limits.login_failures_allowed",
                        Some(n.to_string()),
                        "an integer from 0 to 1000",
                    );
                    0
                }
            },
        },
    }
}

/// Checks across sections, once each has been read.
pub(super) fn listeners(c: &mut Checker, raw: &RawConfig, config: &Config) {
    let mut addresses = config.client_listeners();
    if let Some(m) = &config.metrics {
        addresses.push(("metrics.listen", m.listen));
    }
    for (i, (key, addr)) in addresses.iter().enumerate() {
        if addr.port() == 0 {
            continue;
        }
        if let Some((first, _)) = addresses[..i].iter().find(|(_, a)| a == addr) {
            c.problem(
                *key,
                Some(addr.to_string()),
                format!("an address other than {first}'s (each listener needs its own port)"),
            );
        }
    }

    let need_tls = [
        ("mqtt.tls_listen", config.mqtt.tls_listen.is_some()),
        ("mqtt.wss_listen", config.mqtt.wss_listen.is_some()),
        (
            "amqp.tls_listen",
            config.amqp.as_ref().is_some_and(|a| a.tls_listen.is_some()),
        ),
        (
            "metrics.tls",
            config.metrics.as_ref().is_some_and(|m| m.tls),
        ),
    ];
    // A half-written [tls] section has its own problems already.
    if raw.tls.cert_file.is_none() && raw.tls.key_file.is_none() {
        for (key, set) in need_tls {
            if set {
                c.problem(
                    key,
                    None,
                    "a [tls] section with cert_file and key_file (the server certificate)",
                );
            }
        }
    }
    if config.auth.cert_identity != CertIdentity::None
        && config
            .tls
            .as_ref()
            .is_none_or(|t| t.client_ca_file.is_none())
    {
        c.problem(
            "auth.cert_identity",
            raw.auth.cert_identity.clone(),
            "tls.client_ca_file set as well (identities come from verified client certificates)",
        );
    }

    // Secure by default: anonymous access off loopback only when asked for.
    let exposed = config.exposed_listeners();
    if !exposed.is_empty()
        && config.auth.password_file.is_none()
        && raw.auth.allow_anonymous.is_none()
    {
        c.problem(
            "auth.allow_anonymous",
            None,
            format!(
                "an explicit choice, because {} listen beyond loopback: set auth.password_file (users: `edge-gateway passwd FILE USER`), or auth.allow_anonymous = true to let anyone in",
                exposed.join(", ")
            ),
        );
    }
}

impl Config {
    /// Keys of the client listeners bound beyond loopback.
    pub fn exposed_listeners(&self) -> Vec<&'static str> {
        self.client_listeners()
            .into_iter()
            .filter(|(_, addr)| !addr.ip().is_loopback())
            .map(|(key, _)| key)
            .collect()
    }

    /// True when clients off loopback can get in without credentials (the
    /// gateway warns about it at start).
    pub fn anonymous_exposed(&self) -> bool {
        self.auth.allow_anonymous && !self.exposed_listeners().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use crate::{CertIdentity, Config, ConfigError};

    fn keys(err: &ConfigError) -> Vec<&str> {
        let mut keys: Vec<&str> = err.problems().iter().map(|p| p.key.as_str()).collect();
        keys.sort_unstable();
        keys
    }

    const TLS: &str = "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";

    #[test]
    fn anonymous_by_default_only_on_loopback() {
        let c = Config::defaults().expect("defaults");
        assert!(c.auth.allow_anonymous && !c.anonymous_exposed());

        let err = Config::parse("[mqtt]\nlisten = \"0.0.0.0:1883\"\n").expect_err("exposed");
        assert_eq!(keys(&err), ["auth.allow_anonymous"]);
        let text = err.to_string();
        assert!(
            text.contains("mqtt.listen") && text.contains("auth.password_file"),
            "{text}"
        );

        // An AMQP listener counts as much as an MQTT one.
        let err = Config::parse("[amqp]\nlisten = \"[::]:5672\"\n").expect_err("exposed");
        assert!(err.to_string().contains("amqp.listen"), "{err}");

        let c =
            Config::parse("[mqtt]\nlisten = \"0.0.0.0:1883\"\n[auth]\nallow_anonymous = true\n")
                .expect("explicit");
        assert!(c.anonymous_exposed());

        let c =
            Config::parse("[mqtt]\nlisten = \"0.0.0.0:1883\"\n[auth]\npassword_file = \"users\"\n")
                .expect("users");
        assert!(!c.auth.allow_anonymous && !c.anonymous_exposed());
    }

    #[test]
    fn tls_listeners_need_a_certificate() {
        let err = Config::parse(
            "[mqtt]\ntls_listen = \"127.0.0.1:8883\"\nwss_listen = \"127.0.0.1:8084\"\n[amqp]\ntls_listen = \"127.0.0.1:5671\"\n[metrics]\ntls = true\n",
        )
        .expect_err("no [tls]");
        assert_eq!(
            keys(&err),
            [
                "amqp.tls_listen",
                "metrics.tls",
                "mqtt.tls_listen",
                "mqtt.wss_listen"
            ]
        );
        let c = Config::parse(&format!(
            "[mqtt]\ntls_listen = \"127.0.0.1:8883\"\n[amqp]\ntls_listen = \"127.0.0.1:5671\"\n{TLS}"
        ))
        .expect("with [tls]");
        assert_eq!(c.mqtt.tls_listen.map(|a| a.port()), Some(8883));
        let tls = c.tls.expect("tls");
        assert!(tls.client_ca_file.is_none() && !tls.require_client_cert);

        let err = Config::parse("[tls]\ncert_file = \"c.pem\"\nrequire_client_cert = true\n")
            .expect_err("half a section");
        assert_eq!(keys(&err), ["tls.key_file", "tls.require_client_cert"]);
    }

    #[test]
    fn identities_from_certificates_need_a_client_ca() {
        let err =
            Config::parse(&format!("[auth]\ncert_identity = \"cn\"\n{TLS}")).expect_err("no CA");
        assert_eq!(keys(&err), ["auth.cert_identity"]);
        let err = Config::parse("[auth]\ncert_identity = \"subject\"\n").expect_err("bad name");
        assert!(err.to_string().contains("\"cn\" or \"san\""), "{err}");
        let c = Config::parse(&format!(
            "[auth]\ncert_identity = \"san\"\nallow_anonymous = false\n{TLS}client_ca_file = \"ca.pem\"\nrequire_client_cert = true\n"
        ))
        .expect("valid");
        assert_eq!(c.auth.cert_identity, CertIdentity::SubjectAltName);
        assert!(!c.auth.allow_anonymous);

        let err = Config::parse("[auth]\nallow_anonymous = false\n").expect_err("nobody");
        assert_eq!(keys(&err), ["auth.allow_anonymous"]);
        let err = Config::parse("[auth]\nadmin_users = [\"ops\"]\n").expect_err("no file");
        assert_eq!(keys(&err), ["auth.admin_users"]);
    }

    #[test]
    fn listeners_need_their_own_ports() {
        let err = Config::parse(&format!(
            "[mqtt]\nlisten = \"127.0.0.1:1883\"\ntls_listen = \"127.0.0.1:1883\"\n[metrics]\nlisten = \"127.0.0.1:1883\"\n{TLS}"
        ))
        .expect_err("same port");
        assert_eq!(keys(&err), ["metrics.listen", "mqtt.tls_listen"]);
        assert!(err.to_string().contains("mqtt.listen's"), "{err}");
    }

    #[test]
    fn limits_are_checked_by_name() {
        let c = Config::defaults().expect("defaults");
        assert_eq!(c.limits.max_connections_per_source.get(), 256);
        assert_eq!(c.limits.publish_rate, None);
        let c = Config::parse(
            "[limits]\npublish_rate = 50\npublish_byte_rate = \"64KiB\"\nconnection_rate_per_source = 2.5\nlogin_backoff = \"0s\"\n",
        )
        .expect("valid");
        assert_eq!(c.limits.publish_rate, Some(50.0));
        assert_eq!(c.limits.publish_byte_rate, Some(64 << 10));
        assert!(c.limits.login_backoff.is_zero());
        let err = Config::parse(
            "[limits]\npublish_rate = -1\nconnection_rate_per_source = 0\nmax_connections_per_source = 0\nrate_grace = \"0s\"\nlogin_backoff = \"1m\"\nlogin_backoff_max = \"10s\"\n",
        )
        .expect_err("invalid");
        assert_eq!(
            keys(&err),
            [
                "limits.connection_rate_per_source",
                "limits.login_backoff_max",
                "limits.max_connections_per_source",
                "limits.publish_rate",
                "limits.rate_grace"
            ]
        );
    }
}
