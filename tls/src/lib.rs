//! Server-side TLS for every listener of the gateway.
//!
//! [`ServerTls`] holds the one rustls server configuration all listeners
//! share. It is built from the `[tls]` section's files ([`TlsFiles`]) by
//! [`ServerTls::load`], which checks everything an operator can get wrong
//! (unreadable file, no certificate, key not matching the certificate, bad
//! CA) and names the file in the error. [`ServerTls::reload`] swaps in a new
//! configuration only if the files load; otherwise the one in use stays.
//! A handshake takes a snapshot of the configuration when it starts, so
//! reloading never affects established or in-progress connections.
//!
//! [`ServerTls::accept`] performs the handshake; a failure is a
//! [`HandshakeError`] whose [`HandshakeError::reason`] is a stable label for
//! metrics. [`peer_identity`] reads the user name out of a verified client
//! certificate for certificate-based authentication.
//!
//! Only TLS 1.2 and 1.3 are offered, with rustls's ring provider.

mod error;
mod identity;
mod load;
mod server;

pub use error::{HandshakeError, TlsError};
pub use identity::{CertIdentity, peer_identity};
pub use server::{ServerTls, TlsFiles};
