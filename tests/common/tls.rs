//! A throwaway certificate authority for HTTPS tests: a CA made in the test, server certificates it
//! signs (good, expired, or for another name), the CA's PEM file for `tls-ca-file`, and the rustls
//! server configuration that [`super::http::HttpServer`] terminates TLS with.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// What a server certificate is wrong about, for the "TLS failures name the cause" tests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CertKind {
    /// Valid now, for 127.0.0.1 and localhost.
    Good,
    /// Valid for 127.0.0.1 and localhost, but expired yesterday.
    Expired,
    /// Valid now, but only for `wrong.example`.
    WrongName,
}

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as a PEM file (what `tls-ca-file` names).
    pub pem_file: PathBuf,
}

impl Ca {
    /// A new CA, its PEM written under target/ (one file per CA).
    pub fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "flowarchive test CA");
        let cert = params.self_signed(&key).unwrap();
        let dir = super::root().join("target/test-tls");
        std::fs::create_dir_all(&dir).unwrap();
        let pem_file = dir.join(format!("{}.pem", super::unique("ca")));
        std::fs::write(&pem_file, cert.pem()).unwrap();
        Ca {
            cert,
            key,
            pem_file,
        }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A server certificate of `kind` signed by this CA, and its key.
    pub fn server_cert(&self, kind: CertKind) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let names: Vec<String> = match kind {
            CertKind::WrongName => vec!["wrong.example".into()],
            _ => vec!["127.0.0.1".into(), "localhost".into()],
        };
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "flowarchive test server");
        let now = time::OffsetDateTime::now_utc();
        if kind == CertKind::Expired {
            params.not_before = now - time::Duration::days(30);
            params.not_after = now - time::Duration::days(1);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(30);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A rustls server configuration presenting a certificate of `kind` (with the CA in its chain).
    pub fn server_config(&self, kind: CertKind) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.server_cert(kind);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert, self.cert.der().clone()], key)
        .unwrap();
        Arc::new(config)
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pem_file);
    }
}
