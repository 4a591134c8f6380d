//! TLS to `amqps://` nodes: the rustls client configuration of one upstream
//! (ring provider), built once when its connector is made, and the
//! translation of a failed handshake into a reason an operator can act on.
//!
//! Trust is exactly what the config says: the certificates of `tls_ca_file`
//! and, with `tls_system_roots`, the system's roots. Verification is always
//! on; there is no switch to turn it off. The name verified, and sent as
//! SNI, is `tls_server_name` when set, else the host of the node's URI. With
//! `tls_cert_file` and `tls_key_file` the gateway presents a client
//! certificate (mutual TLS).
//!
//! A failure is one of the [`TlsFailure`] reasons, counted in
//! `edge_upstream_tls_failures_total{upstream,reason}`. The reason comes
//! from the rustls error found in the failed connect's source chain
//! (`lapin::Error` → `io::Error` → `rustls::Error`): a certificate the
//! gateway rejected, or an alert by which the broker rejected the gateway's.
//! In TLS 1.3 the broker judges the client certificate after the client has
//! finished its handshake, so its alert can race the gateway's first write
//! and be lost to a TCP reset; a connection the broker drops right after a
//! handshake in which it asked for a client certificate is therefore a
//! refused client certificate too.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use edge_config::UpstreamTls;
use lapin::tcp::RustlsConnector;
use metrics::Counter;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, SignatureScheme};
use tracing::{error, info, warn};

/// Why a TLS connection to a broker node could not be made. Each has a
/// stable metric label ([`TlsFailure::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The broker's certificate chains to no trusted CA.
    UnknownCa,
    /// The broker's certificate (or one of its chain) has expired.
    Expired,
    /// The broker's certificate is not valid yet: often this gateway's
    /// clock (a box without a real-time clock that booted offline).
    NotYetValid,
    /// The broker's certificate is not valid for the name verified.
    NameMismatch,
    /// The broker refused the gateway's client certificate, or wanted one
    /// and got none.
    ClientCertRefused,
    /// Any other handshake failure.
    Handshake,
    /// The TLS configuration could not be built (no usable trust anchor,
    /// a key that does not match its certificate, ...).
    Setup,
}

impl TlsFailure {
    /// Every reason, in the order of their labels' documentation.
    pub const ALL: [TlsFailure; 7] = [
        TlsFailure::UnknownCa,
        TlsFailure::Expired,
        TlsFailure::NotYetValid,
        TlsFailure::NameMismatch,
        TlsFailure::ClientCertRefused,
        TlsFailure::Handshake,
        TlsFailure::Setup,
    ];

    /// The `reason` label of `edge_upstream_tls_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::UnknownCa => "unknown_ca",
            TlsFailure::Expired => "expired",
            TlsFailure::NotYetValid => "not_yet_valid",
            TlsFailure::NameMismatch => "name_mismatch",
            TlsFailure::ClientCertRefused => "client_cert_refused",
            TlsFailure::Handshake => "handshake",
            TlsFailure::Setup => "setup",
        }
    }

    /// The reason behind a rustls error.
    fn of(error: &rustls::Error) -> TlsFailure {
        use AlertDescription as A;
        use CertificateError as C;
        use rustls::Error::{AlertReceived, InvalidCertificate};
        match error {
            InvalidCertificate(C::UnknownIssuer) => TlsFailure::UnknownCa,
            InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => TlsFailure::Expired,
            InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
                TlsFailure::NotYetValid
            }
            InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                TlsFailure::NameMismatch
            }
            // What the broker says of the gateway's certificate.
            AlertReceived(
                A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown,
            ) => TlsFailure::ClientCertRefused,
            _ => TlsFailure::Handshake,
        }
    }
}

/// A failed TLS connection to one node: the reason, the name that was
/// verified and what rustls said. Its `Display` is the sentence for the
/// log: what went wrong and which setting to look at.
#[derive(Debug, Clone)]
pub struct TlsError {
    /// Why.
    pub reason: TlsFailure,
    /// The name verified against the broker's certificate.
    pub server_name: String,
    /// rustls' own words (or the setup problem).
    pub detail: String,
    /// A client certificate is configured (`tls_cert_file`).
    pub with_client_cert: bool,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, detail) = (&self.server_name, &self.detail);
        match self.reason {
            TlsFailure::UnknownCa => write!(
                f,
                "server certificate of {name} not signed by a trusted CA \
                 (tls_ca_file, tls_system_roots): {detail}"
            ),
            TlsFailure::Expired => {
                write!(f, "server certificate of {name} has expired: {detail}")
            }
            TlsFailure::NotYetValid => write!(
                f,
                "server certificate of {name} is not valid yet (is this gateway's clock \
                 right?): {detail}"
            ),
            TlsFailure::NameMismatch => write!(
                f,
                "server certificate not valid for the name {name} (put a name the \
                 certificate holds in the URI or in tls_server_name): {detail}"
            ),
            TlsFailure::ClientCertRefused if !self.with_client_cert => write!(
                f,
                "broker {name} requires a client certificate (tls_cert_file, tls_key_file): \
                 {detail}"
            ),
            TlsFailure::ClientCertRefused => write!(
                f,
                "broker {name} refused the client certificate (tls_cert_file, tls_key_file; \
                 does the broker trust their CA?): {detail}"
            ),
            TlsFailure::Handshake => write!(f, "TLS handshake with {name} failed: {detail}"),
            TlsFailure::Setup => write!(f, "TLS setup failed: {detail}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// The TLS side of one upstream: its rustls configuration (or why there is
/// none), the name override and the failure counters.
pub(crate) struct TlsClient {
    upstream: String,
    /// Built once; cloning shares the configuration (and its session cache).
    connector: Result<RustlsConnector, String>,
    /// Serves the client certificate and counts the broker's requests.
    client_cert: Arc<ClientCert>,
    server_name: Option<String>,
    failures: Vec<(TlsFailure, Counter)>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("upstream", &self.upstream)
            .field("ready", &self.connector.is_ok())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Builds the client configuration of `upstream`. A configuration that
    /// cannot be built is logged now and fails every `amqps://` attempt
    /// with [`TlsFailure::Setup`] (the config check has already read and
    /// parsed the files, so this is rare: a key that does not match its
    /// certificate, a CA file rustls cannot use, no system roots).
    pub(crate) fn new(upstream: &str, tls: &UpstreamTls) -> TlsClient {
        let failures = crate::metrics::tls_failure_counters(upstream);
        let build = || match client_cert(tls) {
            Ok(cert) => {
                let cert = Arc::new(cert);
                let config = client_config(tls, cert.clone());
                (config.map(|c| RustlsConnector::from(Arc::new(c))), cert)
            }
            Err(e) => (Err(e), Arc::new(ClientCert::default())),
        };
        // Reading and parsing the system's roots blocks for a while (tens to
        // hundreds of milliseconds): off the runtime's other tasks.
        let on_workers = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let (connector, client_cert) = if on_workers {
            tokio::task::block_in_place(build)
        } else {
            build()
        };
        match &connector {
            Ok(_) => info!(
                upstream,
                ca_file = tls.ca_pem.is_some(),
                system_roots = tls.system_roots,
                client_certificate = tls.identity.is_some(),
                server_name = tls.server_name.as_deref().unwrap_or("(the URI's host)"),
                "TLS ready for amqps:// nodes"
            ),
            Err(detail) => error!(upstream, %detail,
                "TLS setup failed: amqps:// nodes of this upstream cannot be reached"),
        }
        TlsClient {
            upstream: upstream.to_string(),
            connector,
            client_cert,
            server_name: tls.server_name.clone(),
            failures,
        }
    }

    /// The name to send as SNI and to verify for a node whose URI names
    /// `host`.
    pub(crate) fn server_name<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }

    /// A TLS connection attempt to a node whose URI names `host`; a
    /// [`TlsFailure::Setup`] error (counted) when there is no configuration.
    /// Attempts of one upstream are made one at a time.
    pub(crate) fn attempt(&self, host: &str) -> Result<TlsAttempt, TlsError> {
        let server_name = self.server_name(host).to_string();
        match &self.connector {
            Ok(connector) => Ok(TlsAttempt {
                connector: connector.clone(),
                server_name,
                client_cert: self.client_cert.clone(),
                requests_before: self.client_cert.requests(),
                handshake: Arc::new(Handshake::default()),
            }),
            Err(detail) => Err(self.count(TlsError {
                reason: TlsFailure::Setup,
                server_name,
                detail: detail.clone(),
                with_client_cert: self.client_cert.key.is_some(),
            })),
        }
    }

    /// The TLS failure behind a failed `attempt` (counted), or `None` when
    /// TLS is not to blame.
    pub(crate) fn failure(&self, error: &lapin::Error, attempt: &TlsAttempt) -> Option<TlsError> {
        let server_name = attempt.server_name.clone();
        if let Some(cause) = rustls_cause(error) {
            return Some(self.count(TlsError {
                reason: TlsFailure::of(cause),
                server_name,
                detail: cause.to_string(),
                with_client_cert: self.client_cert.key.is_some(),
            }));
        }
        let dropped = matches!(error.kind(), lapin::ErrorKind::IOError(e) if matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
        ));
        let handshake = &attempt.handshake;
        let after_request = handshake.done.load(Ordering::Acquire)
            && handshake.cert_requested.load(Ordering::Acquire);
        if !(dropped && after_request) {
            return None;
        }
        Some(self.count(TlsError {
            reason: TlsFailure::ClientCertRefused,
            server_name,
            detail: format!(
                "the broker asked for a client certificate and dropped the connection \
                 right after the TLS handshake: {error}"
            ),
            with_client_cert: self.client_cert.key.is_some(),
        }))
    }

    fn count(&self, error: TlsError) -> TlsError {
        if let Some((_, counter)) = self.failures.iter().find(|(r, _)| *r == error.reason) {
            counter.increment(1);
        }
        error
    }
}

/// One TLS connection attempt: what the handshake needs, and what it
/// learnt, for telling why the connection failed.
#[derive(Debug)]
pub(crate) struct TlsAttempt {
    connector: RustlsConnector,
    server_name: String,
    client_cert: Arc<ClientCert>,
    /// The broker's requests for a client certificate before this attempt.
    requests_before: u64,
    /// Shared with the transport, which lapin's I/O loop runs.
    handshake: Arc<Handshake>,
}

#[derive(Debug, Default)]
struct Handshake {
    done: AtomicBool,
    cert_requested: AtomicBool,
}

impl TlsAttempt {
    /// The connector and the name to send as SNI and to verify.
    pub(crate) fn connector(&self) -> (&RustlsConnector, &str) {
        (&self.connector, &self.server_name)
    }

    /// The handshake of this attempt completed.
    pub(crate) fn handshake_done(&self) {
        let requested = self.client_cert.requests() > self.requests_before;
        self.handshake
            .cert_requested
            .store(requested, Ordering::Release);
        self.handshake.done.store(true, Ordering::Release);
    }
}

/// The client certificate of an upstream (if any), offered whenever the
/// broker asks for one; the requests are counted.
#[derive(Debug, Default)]
struct ClientCert {
    key: Option<Arc<CertifiedKey>>,
    requests: AtomicU64,
}

impl ClientCert {
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }
}

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _acceptable_issuers: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// The rustls error in `error`'s source chain. `io::Error` hides the error
/// it wraps from `source()` (it returns the inner error's source), so each
/// `io::Error` is looked into as well.
fn rustls_cause<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<rustls::Error>() {
            return Some(found);
        }
        if let Some(found) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The ring provider, the one crypto of this crate.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client certificate and key of `tls`, checked to belong together.
fn client_cert(tls: &UpstreamTls) -> Result<ClientCert, String> {
    let Some((chain, key)) = &tls.identity else {
        return Ok(ClientCert::default());
    };
    let chain = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_cert_file: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls_key_file: {e}"))?;
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "tls_cert_file and tls_key_file: the key is not the certificate's".to_string()
        }
        e => format!("tls_cert_file and tls_key_file: {e}"),
    })?;
    Ok(ClientCert {
        key: Some(Arc::new(key)),
        requests: AtomicU64::new(0),
    })
}

/// The rustls client configuration `tls` asks for, with the ring provider
/// and `client_cert` answering the broker's certificate requests.
fn client_config(tls: &UpstreamTls, client_cert: Arc<ClientCert>) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    if let Some(pem) = &tls.ca_pem {
        for (n, cert) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
            let cert = cert.map_err(|e| format!("tls_ca_file: certificate {}: {e}", n + 1))?;
            roots.add(cert).map_err(|e| {
                format!(
                    "tls_ca_file: certificate {} is no usable trust anchor: {e}",
                    n + 1
                )
            })?;
        }
    }
    if tls.system_roots {
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            warn!(error = %e, "cannot read some of the system's root certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            warn!(
                ignored,
                "some system root certificates cannot be used and are ignored"
            );
        }
        if added == 0 && tls.ca_pem.is_none() {
            return Err(
                "tls_system_roots: no system root certificate found (install \
                        ca-certificates, or name the broker's CA in tls_ca_file)"
                    .into(),
            );
        }
    }
    if roots.is_empty() {
        return Err("no trusted certificate (tls_ca_file, tls_system_roots)".into());
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_root_certificates(roots)
        .with_client_cert_resolver(client_cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapped(e: rustls::Error) -> lapin::Error {
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    #[test]
    fn reasons_come_from_the_rustls_error_in_the_chain() {
        use AlertDescription as A;
        use CertificateError as C;
        use TlsFailure as F;
        let cert = rustls::Error::InvalidCertificate;
        let alert = rustls::Error::AlertReceived;
        let cases = [
            (cert(C::UnknownIssuer), F::UnknownCa),
            (cert(C::Expired), F::Expired),
            (cert(C::NotValidYet), F::NotYetValid),
            (cert(C::NotValidForName), F::NameMismatch),
            (alert(A::CertificateRequired), F::ClientCertRefused),
            (alert(A::UnknownCA), F::ClientCertRefused),
            (alert(A::HandshakeFailure), F::Handshake),
            (cert(C::BadSignature), F::Handshake),
        ];
        for (error, reason) in cases {
            let wrapped = io_wrapped(error.clone());
            let cause = rustls_cause(&wrapped).expect("found through lapin and io");
            assert_eq!(cause, &error);
            assert_eq!(TlsFailure::of(cause), reason, "{error:?}");
        }
        let refused =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(rustls_cause(&refused).is_none(), "not a TLS failure");
    }

    #[test]
    fn labels_are_distinct() {
        let labels: std::collections::BTreeSet<&str> =
            TlsFailure::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), TlsFailure::ALL.len());
    }

    #[test]
    fn messages_name_the_setting_to_check() {
        let message = |reason, detail: &str| {
            TlsError {
                reason,
                server_name: "broker.example".into(),
                detail: detail.into(),
                with_client_cert: !detail.contains("CertificateRequired"),
            }
            .to_string()
        };
        assert!(message(TlsFailure::UnknownCa, "x").starts_with(
            "server certificate of broker.example not signed by a trusted CA (tls_ca_file"
        ));
        assert!(message(TlsFailure::NameMismatch, "x").contains("tls_server_name"));
        assert!(
            message(
                TlsFailure::ClientCertRefused,
                "received fatal alert: CertificateRequired"
            )
            .contains("requires a client certificate")
        );
        assert!(
            message(
                TlsFailure::ClientCertRefused,
                "received fatal alert: UnknownCA"
            )
            .contains("refused the client certificate")
        );
        assert_eq!(
            message(TlsFailure::Handshake, "peer is incompatible"),
            "TLS handshake with broker.example failed: peer is incompatible"
        );
    }

    /// A self-signed certificate for `name` and its key, both PEM.
    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("self-signed");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_ca_file_and_a_matching_identity_make_a_config() {
        let (ca, _) = self_signed("ca.example");
        let (cert, key) = self_signed("edge-gateway");
        let tls = UpstreamTls {
            ca_pem: Some(ca),
            identity: Some((cert.clone().into_bytes(), key.into_bytes())),
            ..UpstreamTls::default()
        };
        let cert_and_key = Arc::new(client_cert(&tls).expect("they match"));
        let config = client_config(&tls, cert_and_key).expect("builds");
        assert!(config.client_auth_cert_resolver.has_certs());

        // Someone else's key with this certificate: refused at setup, not
        // at every handshake.
        let (_, other_key) = self_signed("other");
        let mismatched = UpstreamTls {
            identity: Some((cert.into_bytes(), other_key.into_bytes())),
            ..tls
        };
        let err = client_cert(&mismatched).expect_err("key does not match");
        assert_eq!(
            err,
            "tls_cert_file and tls_key_file: the key is not the certificate's"
        );
    }

    #[test]
    fn a_drop_after_a_certificate_request_is_a_refused_client_certificate() {
        let (ca, _) = self_signed("ca.example");
        let client = TlsClient::new(
            "central",
            &UpstreamTls {
                ca_pem: Some(ca),
                ..UpstreamTls::default()
            },
        );
        let reset = || lapin::Error::from(io::Error::from(io::ErrorKind::ConnectionReset));

        // A reset before the handshake finished is no TLS verdict.
        let attempt = client.attempt("10.0.0.2").expect("configured");
        assert!(client.failure(&reset(), &attempt).is_none());
        // Nor after a handshake in which no certificate was asked for.
        attempt.handshake_done();
        assert!(client.failure(&reset(), &attempt).is_none());

        // The broker asked, got none, and dropped the connection.
        let attempt = client.attempt("10.0.0.2").expect("configured");
        assert!(
            client.client_cert.resolve(&[], &[]).is_none(),
            "no certificate"
        );
        attempt.handshake_done();
        let err = client.failure(&reset(), &attempt).expect("TLS is to blame");
        assert_eq!(err.reason, TlsFailure::ClientCertRefused);
        assert!(
            err.to_string().contains("requires a client certificate"),
            "{err}"
        );
        // A refused connection is not.
        let refused = lapin::Error::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(client.failure(&refused, &attempt).is_none());
    }

    #[test]
    fn a_config_without_trust_is_refused_and_the_override_wins() {
        let nothing = UpstreamTls::default();
        let no_cert = Arc::new(ClientCert::default());
        assert!(client_config(&nothing, no_cert).is_err(), "nothing trusted");
        let client = TlsClient::new("central", &nothing);
        let err = client.attempt("10.0.0.2").expect_err("no connector");
        assert_eq!(err.reason, TlsFailure::Setup);
        assert_eq!(err.server_name, "10.0.0.2");

        let named = TlsClient::new(
            "central",
            &UpstreamTls {
                server_name: Some("broker.example".into()),
                ..UpstreamTls::default()
            },
        );
        assert_eq!(named.server_name("10.0.0.2"), "broker.example");
    }
}
