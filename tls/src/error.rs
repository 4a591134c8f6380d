//! Errors of loading the TLS files ([`TlsError`]) and of a handshake
//! ([`HandshakeError`]), with the classification of rustls's errors into the
//! handshake failure labels used by metrics.

use std::io;
use std::path::PathBuf;

/// Why the TLS files could not be turned into a server configuration.
///
/// Every variant about a file names it; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The certificate file holds no PEM `CERTIFICATE` section.
    #[error("{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\")", path.display())]
    NoCertificate {
        /// The certificate file.
        path: PathBuf,
    },
    /// The certificate file holds a section that is not a valid certificate.
    #[error("{}: bad certificate: {reason}", path.display())]
    Certificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The key file holds no usable private key.
    #[error("{}: bad private key: {reason}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it (never the key itself).
        reason: String,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("private key {} does not match certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The client CA file holds no usable CA certificate.
    #[error("{}: bad client CA: {reason}", path.display())]
    Ca {
        /// The client CA file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The files are fine but do not make a configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Why a TLS handshake with a client failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client offered only protocol versions we do not accept (below TLS 1.2).
    #[error("TLS handshake: unsupported protocol version: {0}")]
    ProtocolVersion(rustls::Error),
    /// A client certificate is required and the client sent none.
    #[error("TLS handshake: client presented no certificate")]
    NoClientCert,
    /// The client's certificate did not verify (unknown issuer, expired, ...).
    #[error("TLS handshake: bad client certificate: {0}")]
    BadClientCert(rustls::CertificateError),
    /// The peer's bytes are not TLS (e.g. plain MQTT, AMQP or HTTP on a TLS port).
    #[error("TLS handshake: peer does not speak TLS: {0}")]
    NotTls(rustls::Error),
    /// The peer closed the connection before the handshake completed.
    #[error("TLS handshake: peer closed the connection")]
    Eof,
    /// Reading or writing the socket failed.
    #[error("TLS handshake: I/O error: {0}")]
    Io(#[source] io::Error),
    /// Any other TLS failure (e.g. the client rejected our certificate).
    #[error("TLS handshake failed: {0}")]
    Other(rustls::Error),
}

impl HandshakeError {
    /// A short stable label for metrics: `"protocol_version"`,
    /// `"no_client_cert"`, `"bad_client_cert"`, `"not_tls"`, `"eof"`, `"io"`
    /// or `"other"`.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ProtocolVersion(_) => "protocol_version",
            Self::NoClientCert => "no_client_cert",
            Self::BadClientCert(_) => "bad_client_cert",
            Self::NotTls(_) => "not_tls",
            Self::Eof => "eof",
            Self::Io(_) => "io",
            Self::Other(_) => "other",
        }
    }

    /// Classifies the error tokio-rustls's accept returned: a rustls error
    /// travels inside the `io::Error`.
    pub(crate) fn from_io(err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            return Self::Eof;
        }
        // rustls::Error is Clone; cloning avoids unwrapping the box by hand.
        match err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => Self::from_tls(tls.clone()),
            None => Self::Io(err),
        }
    }

    fn from_tls(err: rustls::Error) -> Self {
        use rustls::{Error, PeerIncompatible};
        match err {
            Error::NoCertificatesPresented => Self::NoClientCert,
            Error::InvalidCertificate(cert) => Self::BadClientCert(cert),
            // The first record is not a TLS record, or not a handshake, or the
            // handshake is not a ClientHello: whatever it is, it is not a TLS client.
            Error::InvalidMessage(_)
            | Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. } => Self::NotTls(err),
            Error::PeerIncompatible(
                PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled
                | PeerIncompatible::SupportedVersionsExtensionRequired
                | PeerIncompatible::ServerDoesNotSupportTls12Or13
                // signature_algorithms came with TLS 1.2 and rustls checks for it
                // before the version: a hello without it is from a TLS 1.0/1.1 client.
                | PeerIncompatible::SignatureAlgorithmsExtensionRequired,
            ) => Self::ProtocolVersion(err),
            other => Self::Other(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_without_a_tls_error_stay_io() {
        let err = HandshakeError::from_io(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(err.reason(), "io");
        let err = HandshakeError::from_io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "tls handshake eof",
        ));
        assert_eq!(err.reason(), "eof");
    }

    #[test]
    fn rustls_errors_map_to_labels() {
        let wrap = |e: rustls::Error| {
            HandshakeError::from_io(io::Error::new(io::ErrorKind::InvalidData, e))
        };
        let cases = [
            (rustls::Error::NoCertificatesPresented, "no_client_cert"),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                "bad_client_cert",
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                "not_tls",
            ),
            (
                rustls::PeerIncompatible::Tls12NotOffered.into(),
                "protocol_version",
            ),
            (
                rustls::PeerIncompatible::NoCipherSuitesInCommon.into(),
                "other",
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
                "other",
            ),
        ];
        for (err, label) in cases {
            let text = err.to_string();
            assert_eq!(wrap(err).reason(), label, "{text}");
        }
    }
}
