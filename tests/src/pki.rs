//! A throw-away public key infrastructure for the TLS tests (rcgen): a test
//! CA, server certificates (for `127.0.0.1` and `localhost`, or chosen
//! names), client certificates with a chosen common name and
//! subjectAltName, expired ones, and a second, unrelated CA. Everything is
//! PEM and can be written to a directory for the gateway's `[tls]` files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};

/// A certificate authority made for one test.
#[derive(Debug)]
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A leaf certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct CertKey {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its PKCS#8 private key (PEM).
    pub key_pem: String,
}

/// A certificate and key written to disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// `<name>.pem`.
    pub cert: PathBuf,
    /// `<name>.key`.
    pub key: PathBuf,
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Ca {
    /// A self-signed CA whose subject is `common_name`.
    pub fn new(common_name: &str) -> Result<Ca> {
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().context("generating the CA key")?;
        let pem = params
            .self_signed(&key)
            .context("self-signing the CA")?
            .pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// The CA certificate (PEM), what clients and servers trust.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    fn leaf(
        &self,
        common_name: &str,
        alt_names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<CertKey> {
        let names: Vec<String> = alt_names.iter().map(|n| (*n).to_string()).collect();
        let mut params = CertificateParams::new(names).context("subjectAltName")?;
        params.distinguished_name = subject(common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        tweak(&mut params);
        let key = KeyPair::generate().context("generating a leaf key")?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of {common_name}"))?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate with common name `common_name`, valid for
    /// `127.0.0.1` and `localhost`.
    pub fn server(&self, common_name: &str) -> Result<CertKey> {
        self.leaf(
            common_name,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            |_| {},
        )
    }

    /// A server certificate with common name `common_name`, valid for
    /// `names` only (DNS names or IP addresses).
    pub fn server_for(&self, common_name: &str, names: &[&str]) -> Result<CertKey> {
        self.leaf(
            common_name,
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            |_| {},
        )
    }

    /// A server certificate for `names` that expired years ago (valid 2001
    /// to 2002).
    pub fn expired_server(&self, common_name: &str, names: &[&str]) -> Result<CertKey> {
        self.server_with(common_name, names, expired)
    }

    /// A server certificate for `names` with `tweak` applied to its
    /// parameters (validity dates, ...) before it is signed.
    pub fn server_with(
        &self,
        common_name: &str,
        names: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Result<CertKey> {
        self.leaf(
            common_name,
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
            tweak,
        )
    }

    /// A client certificate with common name `common_name` and these
    /// subjectAltNames (DNS names, or IP addresses).
    pub fn client(&self, common_name: &str, alt_names: &[&str]) -> Result<CertKey> {
        self.leaf(
            common_name,
            alt_names,
            ExtendedKeyUsagePurpose::ClientAuth,
            |_| {},
        )
    }

    /// A client certificate that expired years ago (valid 2001 to 2002).
    pub fn expired_client(&self, common_name: &str) -> Result<CertKey> {
        self.leaf(
            common_name,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            expired,
        )
    }

    /// Writes the CA certificate to `dir/<name>.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        write(dir, &format!("{name}.pem"), &self.pem)
    }
}

impl CertKey {
    /// Writes `dir/<name>.pem` and `dir/<name>.key`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<CertFiles> {
        Ok(CertFiles {
            cert: write(dir, &format!("{name}.pem"), &self.cert_pem)?,
            key: write(dir, &format!("{name}.key"), &self.key_pem)?,
        })
    }
}

/// Valid from 2001 to 2002 only.
fn expired(params: &mut CertificateParams) {
    params.not_before = date_time_ymd(2001, 1, 1);
    params.not_after = date_time_ymd(2002, 1, 1);
}

fn write(dir: &Path, file: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(file);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The usual set for a TLS test, written to a temporary directory:
/// `ca.pem` (the test CA), `server.pem`/`server.key` (CN `edge-gateway`,
/// for 127.0.0.1 and localhost), `other-ca.pem` (a CA that signed nothing
/// here).
#[derive(Debug)]
pub struct Pki {
    /// Holds every file; removed on drop.
    pub dir: tempfile::TempDir,
    /// The test CA, signer of the server and client certificates.
    pub ca: Ca,
    /// An unrelated CA.
    pub other_ca: Ca,
    /// `ca.pem`.
    pub ca_file: PathBuf,
    /// `other-ca.pem`.
    pub other_ca_file: PathBuf,
    /// The server certificate and key.
    pub server: CertKey,
    /// `server.pem` and `server.key`.
    pub server_files: CertFiles,
}

impl Pki {
    /// Makes both CAs and the server certificate and writes them.
    pub fn new() -> Result<Pki> {
        let dir = tempfile::Builder::new()
            .prefix("edgetest-pki-")
            .tempdir()
            .context("creating the PKI directory")?;
        let ca = Ca::new(&crate::unique("edge test CA"))?;
        let other_ca = Ca::new(&crate::unique("other test CA"))?;
        let server = ca.server("edge-gateway")?;
        let ca_file = ca.write(dir.path(), "ca")?;
        let other_ca_file = other_ca.write(dir.path(), "other-ca")?;
        let server_files = server.write(dir.path(), "server")?;
        Ok(Pki {
            dir,
            ca,
            other_ca,
            ca_file,
            other_ca_file,
            server,
            server_files,
        })
    }

    /// A client certificate from the test CA, written as `<name>.pem`/`.key`.
    pub fn client(&self, name: &str, common_name: &str) -> Result<(CertKey, CertFiles)> {
        let ck = self.ca.client(common_name, &[common_name])?;
        let files = ck.write(self.dir.path(), name)?;
        Ok((ck, files))
    }

    /// The directory holding the files.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
