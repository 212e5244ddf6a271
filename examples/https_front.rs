//! S3 fronts for SeaweedFS, for scripts/bench: the test bed's (tests/common/s3front.rs: each request's
//! signature is checked and re-signed for SeaweedFS), with a throwaway CA. Three of them: `plain`
//! (HTTP, keep-alive: the same hop without TLS, the baseline), `pooled` (HTTPS, keep-alive) and `fresh`
//! (HTTPS, every connection closed after its answer, so each request pays a new TCP and TLS handshake).
//!
//!   https_front <ca-pem-path>
//!
//! Prints one JSON line {"ca": ..., "plain": "http://...", "pooled": "https://...", "fresh": ...} and
//! serves until its standard input closes. SeaweedFS at FLOWARCHIVE_S3_ENDPOINT (default http://127.0.0.1:18333)
//! with the test bed's key.

// The test bed's modules reach their siblings and these items through `super::`.
#![allow(dead_code)]

#[path = "../tests/common/aws.rs"]
mod aws;
#[path = "../tests/common/http.rs"]
mod http;
#[path = "../tests/common/s3front.rs"]
mod s3front;
#[path = "../tests/common/sigv4.rs"]
mod sigv4;
#[path = "../tests/common/tls.rs"]
mod tls;

const S3_KEY: &str = "flowarchive-test-key";
const S3_SECRET: &str = "flowarchive-test-secret-9f3b";

fn s3_endpoint() -> String {
    std::env::var("FLOWARCHIVE_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:18333".into())
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", std::process::id())
}

use aws::Issued;
use s3front::S3Front;
use tls::{Ca, CertKind};

fn main() {
    let pem_path = std::env::args()
        .nth(1)
        .expect("usage: https_front <ca-pem-path>");
    let ca = Ca::new();
    std::fs::write(&pem_path, ca.pem()).expect("write the CA");
    let issued = Issued::new();
    let pooled = S3Front::start_with(issued.clone(), Some(ca.server_config(CertKind::Good)), true);
    let fresh = S3Front::start_with(
        issued.clone(),
        Some(ca.server_config(CertKind::Good)),
        false,
    );
    let plain = S3Front::start(issued, None);
    println!(
        "{}",
        serde_json::json!({
            "ca": pem_path,
            "plain": plain.endpoint(),
            "pooled": pooled.endpoint(),
            "fresh": fresh.endpoint(),
        })
    );
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    eprintln!(
        "https_front: connections: plain {}, pooled {}, fresh {}",
        plain.connections(),
        pooled.connections(),
        fresh.connections()
    );
}
