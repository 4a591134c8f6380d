//! The listeners' security context from the configuration: the server
//! certificate, users and permissions, per-source and per-client limits;
//! and their reload on SIGHUP (a reload that fails keeps what is in force
//! and says why).

use std::sync::Arc;

use anyhow::Context;
use edge_auth::{AuthSettings, Authority, ClientLimits, GuardLimits, Security, SourceGuard};
use edge_config::{CertIdentity, Config};
use edge_tls::{ServerTls, TlsFiles};
use tokio_util::sync::CancellationToken;

/// Reads the certificate, password and ACL files the configuration names.
pub fn build(config: &Config) -> anyhow::Result<Arc<Security>> {
    let tls = match &config.tls {
        Some(t) => {
            let tls = ServerTls::load(TlsFiles {
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
                client_ca_file: t.client_ca_file.clone(),
                require_client_cert: t.require_client_cert,
            })
            .context("loading the [tls] certificate")?;
            tracing::info!(certificate = %tls.describe(), client_ca = ?t.client_ca_file, require_client_cert = t.require_client_cert, "TLS certificate loaded");
            Some(tls)
        }
        None => None,
    };
    let a = &config.auth;
    let authority = Authority::load(AuthSettings {
        password_file: a.password_file.clone(),
        acl_file: a.acl_file.clone(),
        allow_anonymous: a.allow_anonymous,
    })
    .context("loading the [auth] files")?;
    let l = &config.limits;
    let guard = SourceGuard::new(GuardLimits {
        max_connections_per_source: l.max_connections_per_source.get(),
        connections_per_second_per_source: l.connection_rate_per_source,
        login_backoff_base: l.login_backoff,
        login_backoff_max: l.login_backoff_max,
        login_failures_allowed: l.login_failures_allowed,
    });
    let cert_identity = match a.cert_identity {
        CertIdentity::None => edge_tls::CertIdentity::None,
        CertIdentity::CommonName => edge_tls::CertIdentity::CommonName,
        CertIdentity::SubjectAltName => edge_tls::CertIdentity::SubjectAltName,
    };
    let exposed = config.exposed_listeners();
    if config.anonymous_exposed() {
        tracing::warn!(
            listeners = %exposed.join(", "),
            "auth.allow_anonymous = true on listeners beyond loopback: anyone who can reach them can publish and subscribe"
        );
    }
    tracing::info!(
        password_file = ?a.password_file,
        acl_file = ?a.acl_file,
        allow_anonymous = a.allow_anonymous,
        cert_identity = ?a.cert_identity,
        "authentication"
    );
    Ok(Security::new(
        tls,
        cert_identity,
        authority,
        guard,
        ClientLimits {
            publish_rate: l.publish_rate,
            publish_byte_rate: l.publish_byte_rate,
            rate_grace: l.rate_grace,
        },
    ))
}

/// Re-reads the certificate and the auth files on each SIGHUP until `stop`.
/// Established connections keep their TLS session; new ones get the new
/// certificate. A file that fails to load leaves the old one in force.
pub async fn reload_on_hangup(security: Arc<Security>, stop: CancellationToken) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot watch for SIGHUP: certificates and auth files are not reloaded");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = hangups.recv() => if got.is_none() { return },
        }
        reload(&security);
    }
}

/// One reload of everything reloadable; counted per outcome.
pub fn reload(security: &Security) {
    if let Some(tls) = &security.tls {
        match tls.reload() {
            Ok(()) => {
                metrics::counter!("edge_reloads_total", "what" => "tls", "outcome" => "ok")
                    .increment(1);
                tracing::info!(certificate = %tls.describe(), "TLS certificate reloaded");
            }
            Err(error) => {
                metrics::counter!("edge_reloads_total", "what" => "tls", "outcome" => "failed")
                    .increment(1);
                tracing::error!(error = %error, "TLS certificate not reloaded; the previous one stays in use");
            }
        }
    }
    match security.authority.reload() {
        Ok(()) => {
            metrics::counter!("edge_reloads_total", "what" => "auth", "outcome" => "ok")
                .increment(1);
        }
        Err(error) => {
            metrics::counter!("edge_reloads_total", "what" => "auth", "outcome" => "failed")
                .increment(1);
            tracing::error!(error = %error, "auth files not reloaded; the previous ones stay in force");
        }
    }
}
