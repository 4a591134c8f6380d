//! [`ServerTls`]: the shared, reloadable server configuration and the
//! handshake on an accepted stream.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{HandshakeError, TlsError};
use crate::load::{Loaded, load};

/// Where the server's TLS material comes from (`[tls]` section of the config).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the first certificate.
    pub key_file: PathBuf,
    /// PEM CA certificates that client certificates must chain to; without
    /// it clients are not asked for a certificate.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients that present no certificate (needs `client_ca_file`).
    pub require_client_cert: bool,
}

/// The server TLS configuration all listeners share; reloadable.
pub struct ServerTls {
    files: TlsFiles,
    /// Swapped whole by `reload`; a handshake clones the `Arc` when it starts.
    current: RwLock<Arc<Loaded>>,
}

impl ServerTls {
    /// Reads and checks the files now (cert chain parses, key matches cert,
    /// CA parses); the error names the file and the problem.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] for the first problem found.
    pub fn load(files: TlsFiles) -> Result<Arc<ServerTls>, TlsError> {
        let loaded = load(&files)?;
        Ok(Arc::new(ServerTls {
            files,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// Re-reads the files; on failure keeps the configuration in use and
    /// returns the error. Established connections are untouched; new
    /// handshakes use the new configuration.
    ///
    /// # Errors
    ///
    /// As [`ServerTls::load`]; the configuration in use is then unchanged.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = Arc::new(load(&self.files)?);
        // No code panics while holding the lock, so a poisoned lock still holds a valid value.
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = loaded;
        Ok(())
    }

    /// Handshakes on `stream` with the current configuration.
    ///
    /// There is no timeout here: the caller bounds the handshake (a client
    /// that sends nothing keeps this pending).
    ///
    /// # Errors
    ///
    /// A [`HandshakeError`]; its [`HandshakeError::reason`] labels it for metrics.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> Result<tokio_rustls::server::TlsStream<S>, HandshakeError> {
        let config = Arc::clone(&self.loaded().config);
        tokio_rustls::TlsAcceptor::from(config)
            .accept(stream)
            .await
            .map_err(HandshakeError::from_io)
    }

    /// The subject, serial and not-after of the current server certificate,
    /// for a log line after (re)load.
    pub fn describe(&self) -> String {
        self.loaded().description.clone()
    }

    fn loaded(&self) -> Arc<Loaded> {
        let current = self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(&current)
    }
}

impl fmt::Debug for ServerTls {
    /// Files and certificate description only: never key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .field("certificate", &self.describe())
            .finish_non_exhaustive()
    }
}
