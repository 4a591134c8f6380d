//! [`Security`]: what every listener holds to decide who gets in and what
//! they may do — the server TLS configuration, the users and permissions
//! ([`Authority`]), the per-source guard, and the per-client rates.
//!
//! Logging in checks an argon2id hash, which costs tens of milliseconds of
//! CPU on purpose. [`Security::login`] runs it on a blocking thread and at
//! most [`VERIFY_SLOTS`] at a time, so a flood of logins cannot take the
//! cores from the connections already in; a failure starts (or doubles)
//! the source's login back-off.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_tls::{CertIdentity, ServerTls};
use tokio::sync::Semaphore;

use crate::{Authority, GuardLimits, LoginError, Principal, SourceGuard};

/// Password verifications running at once.
pub const VERIFY_SLOTS: usize = 2;

/// Per-client publish limits (MQTT).
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientLimits {
    /// PUBLISH packets a second; `None`: unlimited.
    pub publish_rate: Option<f64>,
    /// Payload bytes a second; `None`: unlimited.
    pub publish_byte_rate: Option<u64>,
    /// Held back this long without a break: disconnected.
    pub rate_grace: Duration,
}

/// The security context of the listeners.
#[derive(Debug)]
pub struct Security {
    /// The server certificate; `None`: no TLS listener may run.
    pub tls: Option<Arc<ServerTls>>,
    /// Which part of a verified client certificate names the user.
    pub cert_identity: CertIdentity,
    pub authority: Arc<Authority>,
    pub guard: Arc<SourceGuard>,
    pub client_limits: ClientLimits,
    verify_slots: Semaphore,
}

impl Security {
    pub fn new(
        tls: Option<Arc<ServerTls>>,
        cert_identity: CertIdentity,
        authority: Arc<Authority>,
        guard: Arc<SourceGuard>,
        client_limits: ClientLimits,
    ) -> Arc<Security> {
        Arc::new(Security {
            tls,
            cert_identity,
            authority,
            guard,
            client_limits,
            verify_slots: Semaphore::new(VERIFY_SLOTS),
        })
    }

    /// Anyone may connect and do anything, without limits beyond generous
    /// per-source ones: for adapter tests and embedded use on loopback.
    pub fn open() -> Arc<Security> {
        let authority = Authority::without_files(true);
        Security::new(
            None,
            CertIdentity::None,
            authority,
            SourceGuard::new(GuardLimits {
                max_connections_per_source: usize::MAX,
                connections_per_second_per_source: 0.0,
                login_backoff_base: Duration::ZERO,
                login_backoff_max: Duration::ZERO,
                login_failures_allowed: u32::MAX,
            }),
            ClientLimits::default(),
        )
    }

    /// Logs a client in: by its certificate identity when it has one (and
    /// `auth.cert_identity` asks for it), else by user name and password.
    /// A refusal counts against `ip`'s login back-off.
    pub async fn login(
        &self,
        ip: IpAddr,
        certificate: Option<&str>,
        user: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, LoginError> {
        if let Some(identity) = certificate {
            return Ok(self.authority.login_certificate(identity));
        }
        let result = match (user, self.authority.has_password_file()) {
            // Only a password check is expensive.
            (Some(user), true) => {
                let Ok(_slot) = self.verify_slots.acquire().await else {
                    return Err(LoginError::NotAuthorized);
                };
                let authority = self.authority.clone();
                let user = user.to_string();
                let password = password.map(<[u8]>::to_vec);
                tokio::task::spawn_blocking(move || {
                    authority.login(Some(&user), password.as_deref())
                })
                .await
                .unwrap_or(Err(LoginError::NotAuthorized))
            }
            _ => self.authority.login(user, password),
        };
        if result.is_err() {
            self.guard.login_failed(ip, Instant::now());
        }
        result
    }

    /// The user name as it may be logged: a user of the password file by
    /// name, anything else by its length only (a password typed into the
    /// user name field must not reach the log).
    pub fn loggable_user(&self, user: Option<&str>) -> String {
        match user {
            None => "(none)".to_string(),
            Some(u) if self.authority.knows(u) => format!("{u:?}"),
            Some(u) => format!("(unknown, {} chars)", u.chars().count()),
        }
    }
}
