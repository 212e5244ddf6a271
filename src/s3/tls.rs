//! TLS for S3 and the credential services: the system trust store (`SSL_CERT_FILE` / `SSL_CERT_DIR`
//! and the distribution bundle, through rustls-native-certs), falling back to the compiled-in web roots
//! on a system without one, plus an optional PEM bundle (`tls-ca-file`) for private CAs. Failures name
//! their cause (unknown issuer, name mismatch, expired) instead of "connection failed".

use std::io::Read;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, RootCertStore};

use crate::sync::lock;

/// Largest `tls-ca-file` read (a full public bundle is about 250 KB).
const MAX_CA_FILE: u64 = 4 << 20;

/// The certificates of a PEM bundle; an error naming the file when it holds none or cannot be read.
pub fn read_ca_file(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE + 1).read_to_end(&mut pem))
        .map_err(|e| format!("tls-ca-file {path} cannot be read ({})", e.kind()))?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(format!(
            "tls-ca-file {path} is larger than {MAX_CA_FILE} bytes"
        ));
    }
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("tls-ca-file {path} is not a PEM certificate bundle"))?;
    if certs.is_empty() {
        return Err(format!("tls-ca-file {path} holds no PEM certificate"));
    }
    Ok(certs)
}

/// The system roots, loaded once per process (reading them takes milliseconds).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: Mutex<Option<Arc<RootCertStore>>> = Mutex::new(None);
    let mut roots = lock(&ROOTS);
    roots
        .get_or_insert_with(|| {
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if store.is_empty() {
                store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            Arc::new(store)
        })
        .clone()
}

/// A client configuration trusting the system roots and the certificates of `ca_file` (if set).
pub fn client_config(ca_file: &str) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = (*system_roots()).clone();
    if !ca_file.is_empty() {
        for cert in read_ca_file(ca_file)? {
            roots
                .add(cert)
                .map_err(|e| format!("tls-ca-file {ca_file}: a certificate is unusable ({e})"))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup failed: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The cause of a TLS failure inside a ureq transport error, in words; `None` when it is no TLS error.
pub fn describe(t: &ureq::Transport) -> Option<String> {
    let mut source = std::error::Error::source(t);
    while let Some(e) = source {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return Some(cause(tls));
        }
        source = e.source();
    }
    None
}

fn cause(e: &rustls::Error) -> String {
    let what = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "the server certificate is from an unknown issuer (not in the system trust store \
                 nor flowarchive.tls-ca-file)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the server certificate is not valid for the endpoint's host name"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server certificate is not valid yet"
            }
            CertificateError::Revoked => "the server certificate is revoked",
            CertificateError::BadSignature => "the server certificate has a bad signature",
            _ => "the server certificate is invalid",
        },
        rustls::Error::AlertReceived(_) => "the server refused the TLS handshake",
        rustls::Error::NoCertificatesPresented => "the server presented no certificate",
        _ => "TLS handshake failed",
    };
    format!("TLS: {what}")
}
