//! The user name a verified client certificate carries, for
//! certificate-based authentication.

use x509_parser::extensions::GeneralName;

/// Which part of a verified client certificate names the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertIdentity {
    /// Certificates name no one; [`peer_identity`] always returns `None`.
    None,
    /// The subject's first common name (CN).
    CommonName,
    /// The first DNS name of the subject alternative names, else the first
    /// email (rfc822) name, else the first URI.
    SubjectAltName,
}

/// The user name the peer's verified certificate carries, if any.
///
/// `None` when the client sent no certificate, when `which` is
/// [`CertIdentity::None`], or when the certificate lacks that part. A
/// certificate is only present here if the server's verifier accepted it.
pub fn peer_identity<S>(
    stream: &tokio_rustls::server::TlsStream<S>,
    which: CertIdentity,
) -> Option<String> {
    let (_, connection) = stream.get_ref();
    let leaf = connection.peer_certificates()?.first()?;
    identity_of(leaf, which)
}

/// The `which` part of the DER certificate `der`.
fn identity_of(der: &[u8], which: CertIdentity) -> Option<String> {
    if which == CertIdentity::None {
        return None;
    }
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    match which {
        CertIdentity::None => None,
        CertIdentity::CommonName => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        CertIdentity::SubjectAltName => {
            let san = cert.subject_alternative_name().ok()??;
            let names = &san.value.general_names;
            let dns = names.iter().find_map(|n| match n {
                GeneralName::DNSName(s) => Some(*s),
                _ => None,
            });
            let email = || {
                names.iter().find_map(|n| match n {
                    GeneralName::RFC822Name(s) => Some(*s),
                    _ => None,
                })
            };
            let uri = || {
                names.iter().find_map(|n| match n {
                    GeneralName::URI(s) => Some(*s),
                    _ => None,
                })
            };
            dns.or_else(email).or_else(uri).map(str::to_owned)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        dn.push(DnType::OrganizationName, "edge");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        let key = KeyPair::generate().expect("key generation");
        params
            .self_signed(&key)
            .expect("self-signed cert")
            .der()
            .to_vec()
    }

    fn ia5(s: &str) -> rcgen::string::Ia5String {
        s.try_into().expect("ASCII test string")
    }

    #[test]
    fn san_prefers_dns_then_email_then_uri() {
        let all = cert(
            Some("cn"),
            vec![
                SanType::URI(ia5("urn:dev:1")),
                SanType::Rfc822Name(ia5("dev@example.com")),
                SanType::DnsName(ia5("dev.example")),
                SanType::DnsName(ia5("second.example")),
            ],
        );
        assert_eq!(
            identity_of(&all, CertIdentity::SubjectAltName).as_deref(),
            Some("dev.example")
        );

        let email_uri = cert(
            None,
            vec![
                SanType::URI(ia5("urn:dev:1")),
                SanType::Rfc822Name(ia5("dev@example.com")),
            ],
        );
        assert_eq!(
            identity_of(&email_uri, CertIdentity::SubjectAltName).as_deref(),
            Some("dev@example.com")
        );

        let uri = cert(None, vec![SanType::URI(ia5("urn:dev:1"))]);
        assert_eq!(
            identity_of(&uri, CertIdentity::SubjectAltName).as_deref(),
            Some("urn:dev:1")
        );
    }

    #[test]
    fn absent_parts_give_none() {
        let bare = cert(None, vec![]);
        assert_eq!(identity_of(&bare, CertIdentity::CommonName), None);
        assert_eq!(identity_of(&bare, CertIdentity::SubjectAltName), None);

        let named = cert(Some("alice"), vec![SanType::DnsName(ia5("alice.example"))]);
        assert_eq!(
            identity_of(&named, CertIdentity::CommonName).as_deref(),
            Some("alice")
        );
        assert_eq!(identity_of(&named, CertIdentity::None), None);
        assert_eq!(
            identity_of(b"not a certificate", CertIdentity::CommonName),
            None
        );
    }
}
