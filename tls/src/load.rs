//! Reading the TLS files and building the rustls server configuration.
//!
//! Every check an operator can fail is made here, before a configuration is
//! built, so that the error names the file: the chain must parse as X.509,
//! the key must load with the ring provider and match the chain's first
//! certificate, and the client CA file must hold at least one usable CA.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::TlsError;
use crate::server::TlsFiles;

/// A configuration built from the files, with its one-line description.
pub(crate) struct Loaded {
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) description: String,
}

/// Reads `files` and builds the server configuration (TLS 1.3 and 1.2, ring).
pub(crate) fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = read_chain(&files.cert_file)?;
    let description = describe_cert(&chain[0]);
    let key = read_key(&files.key_file, &provider)?;
    let certified = CertifiedKey::new(chain, key);
    match certified.keys_match() {
        // Unknown: the key type cannot report its public key; rustls accepts that too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch {
                cert: files.cert_file.clone(),
                key: files.key_file.clone(),
            });
        }
        Err(other) => {
            return Err(TlsError::Certificate {
                path: files.cert_file.clone(),
                reason: other.to_string(),
            });
        }
    }

    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.client_ca_file {
        Some(ca_file) => {
            let roots = read_roots(ca_file)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if files.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsError::Ca {
                path: ca_file.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None if files.require_client_cert => {
            return Err(TlsError::Config(
                "require_client_cert needs a client_ca_file to verify client certificates against"
                    .to_owned(),
            ));
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    Ok(Loaded {
        config: Arc::new(config),
        description,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificate chain in `path`, leaf first; never empty.
fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    for (index, cert) in chain.iter().enumerate() {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            return Err(TlsError::Certificate {
                path: path.to_owned(),
                reason: format!("certificate #{} is not valid X.509: {e}", index + 1),
            });
        }
    }
    Ok(chain)
}

/// The private key in `path`, loaded for signing.
fn read_key(
    path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
    let pem = read(path)?;
    let bad = |reason: String| TlsError::Key {
        path: path.to_owned(),
        reason,
    };
    // The pem error's text names the section or the base64 problem, never the key bytes.
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            bad("no PEM private key found (PKCS#8, PKCS#1 or SEC1)".to_owned())
        }
        other => bad(other.to_string()),
    })?;
    provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(e.to_string()))
}

/// The CA certificates in `path`, as trust anchors for client certificates.
fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = read(path)?;
    let bad = |reason: String| TlsError::Ca {
        path: path.to_owned(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no CA certificate found".to_owned()));
    }
    Ok(roots)
}

/// `subject CN, serial, not-after` of the server certificate, for a log line.
fn describe_cert(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((_, parsed)) => format!(
            "subject \"{}\", serial {}, not after {}",
            parsed.subject(),
            parsed.raw_serial_as_string(),
            parsed.validity().not_after,
        ),
        // read_chain has parsed it already.
        Err(_) => "unparsable certificate".to_owned(),
    }
}
