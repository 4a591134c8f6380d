//! Authentication and authorisation for the gateway's listeners: who a
//! client is ([`Authority::login`], [`Authority::login_certificate`]), what it
//! may do ([`Authority::can_publish`], [`Authority::can_subscribe`],
//! [`Authority::amqp_allows`]), and per-source limits ([`SourceGuard`]).
//!
//! Files: a password file of `name:PHC` lines ([`passwd`]) and a
//! Mosquitto-style ACL file with AMQP permission lines ([`acl`]). Both are
//! read at [`Authority::load`] and again at [`Authority::reload`]; a reload
//! that fails keeps the files in force. Everything is synchronous; password
//! verification is CPU-heavy and belongs on a blocking thread.

use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

pub mod acl;
pub mod error;
pub mod guard;
pub mod passwd;
pub mod rate;
pub mod security;

pub use acl::{Acl, AmqpPermission};
pub use error::AuthError;
pub use guard::{GuardLimits, Refusal, SourceGuard, SourcePermit};
pub use passwd::{PasswordFile, hash_password, remove_user, set_user, validate_user_name};
pub use rate::{Pace, Pacer, TokenBucket};
pub use security::{ClientLimits, Security};

/// Who a connection is, once logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user name; None = anonymous.
    pub user: Option<Arc<str>>,
}

impl Principal {
    /// The anonymous principal.
    pub fn anonymous() -> Principal {
        Principal { user: None }
    }

    /// The user name, if any.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }
}

/// Why a login was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Unknown user, wrong or missing password.
    #[error("bad user name or password")]
    BadCredentials,
    /// Anonymous access is refused, or the identity is not allowed.
    #[error("not authorized")]
    NotAuthorized,
}

/// Where the authentication files are and whether anonymous clients may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// The password file; None = no credentials to check.
    pub password_file: Option<PathBuf>,
    /// The ACL file; None = every client may do everything.
    pub acl_file: Option<PathBuf>,
    /// Whether clients without credentials are accepted.
    pub allow_anonymous: bool,
}

/// What the listeners hold: the settings and the files now in force.
#[derive(Debug)]
pub struct Authority {
    settings: AuthSettings,
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl: RwLock<Option<Arc<Acl>>>,
}

type Files = (Option<Arc<PasswordFile>>, Option<Arc<Acl>>);

impl Authority {
    /// Reads both files now.
    pub fn load(settings: AuthSettings) -> Result<Arc<Authority>, AuthError> {
        let (passwords, acl) = read_files(&settings)?;
        Ok(Arc::new(Authority {
            settings,
            passwords: RwLock::new(passwords),
            acl: RwLock::new(acl),
        }))
    }

    /// Without a password file or an ACL (nothing to read, so nothing
    /// can fail): anonymous clients may do everything, or nobody gets in.
    pub fn without_files(allow_anonymous: bool) -> Arc<Authority> {
        Arc::new(Authority {
            settings: AuthSettings {
                password_file: None,
                acl_file: None,
                allow_anonymous,
            },
            passwords: RwLock::new(None),
            acl: RwLock::new(None),
        })
    }

    /// Re-reads both files; on error keeps the old ones and returns the error (caller logs).
    pub fn reload(&self) -> Result<(), AuthError> {
        let (passwords, acl) = read_files(&self.settings)?;
        *self
            .passwords
            .write()
            .unwrap_or_else(PoisonError::into_inner) = passwords;
        *self.acl.write().unwrap_or_else(PoisonError::into_inner) = acl;
        tracing::info!(
            password_file = ?self.settings.password_file,
            acl_file = ?self.settings.acl_file,
            "authentication files reloaded"
        );
        Ok(())
    }

    /// username/password login (MQTT CONNECT, AMQP PLAIN/AMQPLAIN).
    ///
    /// - user None, password None: an anonymous attempt, accepted iff allow_anonymous.
    /// - user None, password Some: refused as bad credentials.
    /// - user Some with a password file: verified (CPU-heavy: callers run it
    ///   in spawn_blocking); a missing password fails.
    /// - user Some without a password file: accepted as anonymous if
    ///   allow_anonymous (no file = no credentials to check, so the name
    ///   cannot pick an ACL section).
    pub fn login(
        &self,
        user: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Principal, LoginError> {
        let Some(user) = user else {
            return match password {
                Some(_) => Err(LoginError::BadCredentials),
                None if self.settings.allow_anonymous => Ok(Principal::anonymous()),
                None => Err(LoginError::NotAuthorized),
            };
        };
        match self.passwords() {
            Some(file) => {
                // Verify even without a password, so timing says nothing.
                let verified = file.verify(user, password.unwrap_or_default());
                if verified && password.is_some() {
                    Ok(named(user))
                } else {
                    Err(LoginError::BadCredentials)
                }
            }
            // Nothing to check the name against: it would let anyone be
            // any user of the ACL. The client is anonymous.
            None if self.settings.allow_anonymous => Ok(Principal::anonymous()),
            None => Err(LoginError::NotAuthorized),
        }
    }

    /// mTLS identity (CN or SAN chosen by the caller): accepted as that user without password.
    pub fn login_certificate(&self, identity: &str) -> Principal {
        named(identity)
    }

    /// Whether `who` may publish to `topic`; no acl_file = true.
    pub fn can_publish(&self, who: &Principal, client_id: &str, topic: &str) -> bool {
        self.acl()
            .is_none_or(|acl| acl.can_publish(who.user(), client_id, topic))
    }

    /// Whether `who` may subscribe to `filter`; no acl_file = true.
    pub fn can_subscribe(&self, who: &Principal, client_id: &str, filter: &str) -> bool {
        self.acl()
            .is_none_or(|acl| acl.can_subscribe(who.user(), client_id, filter))
    }

    /// Whether `who` holds AMQP permission `p` on `resource`; no acl_file = true.
    pub fn amqp_allows(&self, who: &Principal, p: AmqpPermission, resource: &str) -> bool {
        self.acl()
            .is_none_or(|acl| acl.amqp_allows(who.user(), p, resource))
    }

    /// Whether `user` is in the password file.
    pub fn knows(&self, user: &str) -> bool {
        self.passwords().is_some_and(|f| f.contains(user))
    }

    /// Whether a password file is configured (so credentials are checked).
    pub fn has_password_file(&self) -> bool {
        self.settings.password_file.is_some()
    }

    /// The settings this authority was loaded with.
    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    fn passwords(&self) -> Option<Arc<PasswordFile>> {
        self.passwords
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn acl(&self) -> Option<Arc<Acl>> {
        // Asked on every publish: without an ACL file, no lock at all.
        self.settings.acl_file.as_ref()?;
        self.acl
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn named(user: &str) -> Principal {
    Principal {
        user: Some(Arc::from(user)),
    }
}

fn read_files(settings: &AuthSettings) -> Result<Files, AuthError> {
    let passwords = match &settings.password_file {
        Some(path) => Some(Arc::new(PasswordFile::load(path)?)),
        None => None,
    };
    let acl = match &settings.acl_file {
        Some(path) => Some(Arc::new(Acl::load(path)?)),
        None => None,
    };
    Ok((passwords, acl))
}

#[cfg(test)]
mod tests;
