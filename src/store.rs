//! S3 through presigned requests (rusty-s3 signs, ureq sends). Runs on worker threads only.
//!
//! Error texts name the operation, the object and S3's error code; never a URL (it carries the
//! credential scope and signature) and never a key.

use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use crate::configs::S3Settings;
use crate::encode::Encoded;
use crate::layout::hex;

/// Largest archive object GET reads (a flow of millions of events compresses far below this).
const MAX_OBJECT: u64 = 4 << 30;
/// Largest S3 error body we read, to extract its `<Code>`.
const MAX_ERROR_BODY: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Config,
    Unreachable,
    Timeout,
    Rejected,
    ServerError,
    Verify,
    Missing,
    Truncated,
}

impl FailureKind {
    /// The metric name of this failure.
    pub fn name(self) -> &'static str {
        match self {
            FailureKind::Config => "s3_config",
            FailureKind::Unreachable => "s3_unreachable",
            FailureKind::Timeout => "s3_timeout",
            FailureKind::Rejected => "s3_rejected",
            FailureKind::ServerError => "s3_server_error",
            FailureKind::Verify => "s3_verify",
            FailureKind::Missing => "s3_missing",
            FailureKind::Truncated => "s3_truncated",
        }
    }
}

#[derive(Debug)]
pub struct StoreError {
    pub kind: FailureKind,
    pub message: String,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn fail(kind: FailureKind, message: String) -> StoreError {
    StoreError { kind, message }
}

pub struct Store {
    bucket: Bucket,
    credentials: Option<Credentials>,
    agent: ureq::Agent,
    /// How long a presigned URL stays valid: long enough for one request with its timeout.
    expires: Duration,
    verify_with_head: bool,
    upload_bytes_per_sec: u64,
}

/// When the shared upload link is next free, for `flowarchive.upload-bytes-per-sec`.
static LINK_FREE_AT: Mutex<Option<Instant>> = Mutex::new(None);

/// Waits until `bytes` fit under the rate cap; every upload of the server shares one budget.
fn throttle(bytes: usize, per_sec: u64) {
    if per_sec == 0 {
        return;
    }
    let wait = {
        let mut free_at = LINK_FREE_AT.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let start = free_at.map_or(now, |t| t.max(now));
        *free_at = Some(start + Duration::from_secs_f64(bytes as f64 / per_sec as f64));
        start - now
    };
    std::thread::sleep(wait);
}

impl Store {
    pub fn new(s: &S3Settings) -> Result<Store, StoreError> {
        Self::for_bucket(s, &s.bucket)
    }

    /// A store for another bucket of the same endpoint (an index entry may name an older bucket).
    pub fn for_bucket(s: &S3Settings, bucket: &str) -> Result<Store, StoreError> {
        if bucket.is_empty() {
            return Err(fail(
                FailureKind::Config,
                "flowarchive.bucket is not set".into(),
            ));
        }
        let endpoint = if s.endpoint.is_empty() {
            format!("https://s3.{}.amazonaws.com", s.region)
        } else {
            s.endpoint.clone()
        };
        let endpoint = endpoint
            .parse()
            .map_err(|e| fail(FailureKind::Config, format!("bad S3 endpoint: {e}")))?;
        let style = if s.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, bucket.to_string(), s.region.clone())
            .map_err(|e| fail(FailureKind::Config, format!("bad S3 bucket settings: {e}")))?;
        let credentials = match (&s.access_key, &s.session_token) {
            (key, _) if key.is_empty() => None,
            (key, Some(token)) => Some(Credentials::new_with_token(
                key.clone(),
                s.secret_key.clone(),
                token.clone(),
            )),
            (key, None) => Some(Credentials::new(key.clone(), s.secret_key.clone())),
        };
        let timeout = Duration::from_millis(s.timeout_ms);
        let agent = ureq::AgentBuilder::new()
            .timeout(timeout)
            .redirects(0)
            .build();
        Ok(Store {
            bucket,
            credentials,
            agent,
            expires: Duration::from_secs(60 + 2 * s.timeout_ms.div_ceil(1000)),
            verify_with_head: s.verify_with_head,
            upload_bytes_per_sec: s.upload_bytes_per_sec,
        })
    }

    /// `s3://bucket/key`, the form the index records.
    pub fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket.name(), key)
    }

    /// Uploads the object with signed Content-MD5 and x-amz-checksum-sha256 (the server rejects a body
    /// that does not match), then proves it is stored: by default a HEAD must show the same size and an
    /// ETag equal to the MD5 (or the same sha256 checksum); with `verify put-response`, the ETag the PUT
    /// answered is trusted instead, saving one request.
    pub fn put_verified(&self, key: &str, obj: &Encoded) -> Result<(), StoreError> {
        let md5_b64 = B64.encode(obj.object_md5);
        let sha_b64 = B64.encode(obj.object_sha256);
        let sha_hex = hex(&obj.object_sha256);
        let mut action = self.bucket.put_object(self.credentials.as_ref(), key);
        let signed = [
            ("content-md5", md5_b64.as_str()),
            ("content-type", "application/x-ndjson"),
            ("x-amz-checksum-sha256", sha_b64.as_str()),
            ("x-amz-meta-flowarchive-sha256", sha_hex.as_str()),
        ];
        for (name, value) in signed {
            action.headers_mut().insert(name, value);
        }
        throttle(obj.body.len(), self.upload_bytes_per_sec);
        let url = action.sign(self.expires);
        let mut request = self.agent.put(url.as_str());
        for (name, value) in signed {
            request = request.set(name, value);
        }
        let response = request
            .send_bytes(&obj.body)
            .map_err(|e| request_error("PUT", key, e))?;
        let expected_etag = hex(&obj.object_md5);
        if self.verify_with_head {
            let mut head = self.bucket.head_object(self.credentials.as_ref(), key);
            head.headers_mut().insert("x-amz-checksum-mode", "ENABLED");
            let url = head.sign(self.expires);
            let stored = self
                .agent
                .head(url.as_str())
                .set("x-amz-checksum-mode", "ENABLED")
                .call()
                .map_err(|e| request_error("HEAD", key, e))?;
            let size = stored
                .header("content-length")
                .and_then(|v| v.trim().parse::<u64>().ok());
            if size != Some(obj.body.len() as u64) {
                return Err(fail(
                    FailureKind::Verify,
                    format!(
                        "HEAD {key}: stored size {} differs from uploaded {}",
                        size.map_or("unknown".into(), |s| s.to_string()),
                        obj.body.len()
                    ),
                ));
            }
            check_digest("HEAD", key, &stored, &expected_etag, &sha_b64)
        } else {
            check_digest("PUT", key, &response, &expected_etag, &sha_b64)
        }
    }
}

impl Store {
    /// Fetches an object with a presigned GET: its bytes and the hex sha256 recorded at upload, if any.
    pub fn get(&self, key: &str) -> Result<(Vec<u8>, Option<String>), StoreError> {
        let url = self
            .bucket
            .get_object(self.credentials.as_ref(), key)
            .sign(self.expires);
        let response = self.agent.get(url.as_str()).call().map_err(|e| match e {
            ureq::Error::Status(404, _) => fail(
                FailureKind::Missing,
                format!("archived object {key} is missing (HTTP 404)"),
            ),
            e => request_error("GET", key, e),
        })?;
        let recorded = response
            .header("x-amz-meta-flowarchive-sha256")
            .map(|s| s.trim().to_string());
        let mut body = Vec::new();
        response
            .into_reader()
            .take(MAX_OBJECT)
            .read_to_end(&mut body)
            .map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::TimedOut {
                    FailureKind::Timeout
                } else {
                    FailureKind::Truncated
                };
                fail(kind, format!("S3 GET {key}: body cut short ({})", e.kind()))
            })?;
        Ok((body, recorded))
    }
}

/// Accepts the object when its ETag is the MD5 we sent or its sha256 checksum is ours.
fn check_digest(
    op: &str,
    key: &str,
    r: &ureq::Response,
    md5_hex: &str,
    sha_b64: &str,
) -> Result<(), StoreError> {
    let etag = r.header("etag").map(|e| e.trim().trim_matches('"'));
    let sha = r.header("x-amz-checksum-sha256").map(str::trim);
    if etag == Some(md5_hex) || sha == Some(sha_b64) {
        return Ok(());
    }
    Err(fail(
        FailureKind::Verify,
        format!(
            "{op} {key}: stored object does not match the upload (etag {}, sha256 {})",
            etag.unwrap_or("missing"),
            sha.unwrap_or("missing")
        ),
    ))
}

/// Pulls `<Code>` out of an S3 XML error body.
pub fn s3_error_code(body: &str) -> Option<&str> {
    let start = body.find("<Code>")? + "<Code>".len();
    let end = body[start..].find("</Code>")? + start;
    Some(&body[start..end])
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn request_error(op: &str, key: &str, err: ureq::Error) -> StoreError {
    match err {
        ureq::Error::Status(code, response) => {
            let mut body = String::new();
            let _ = response
                .into_reader()
                .take(MAX_ERROR_BODY)
                .read_to_string(&mut body);
            let code_name = s3_error_code(&body).unwrap_or("");
            let kind = if code >= 500 {
                FailureKind::ServerError
            } else {
                FailureKind::Rejected
            };
            fail(
                kind,
                format!("S3 {op} {key} failed: HTTP {code} {code_name}")
                    .trim_end()
                    .to_string(),
            )
        }
        ureq::Error::Transport(t) => {
            let timed_out = std::error::Error::source(&t)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some_and(|io| {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    )
                })
                || t.message().is_some_and(|m| m.contains("timed out"));
            let (kind, what) = match t.kind() {
                _ if timed_out => (FailureKind::Timeout, "timed out"),
                ureq::ErrorKind::Dns => (FailureKind::Unreachable, "host not found"),
                ureq::ErrorKind::ConnectionFailed => {
                    (FailureKind::Unreachable, "connection failed")
                }
                ureq::ErrorKind::Io => (FailureKind::Unreachable, "connection lost"),
                ureq::ErrorKind::BadStatus | ureq::ErrorKind::BadHeader => {
                    (FailureKind::ServerError, "malformed response")
                }
                _ => (FailureKind::Unreachable, "request failed"),
            };
            fail(kind, format!("S3 {op} {key} failed: {what}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> S3Settings {
        S3Settings {
            endpoint: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
            bucket: "flows".into(),
            prefix: String::new(),
            path_style: true,
            access_key: "AKIDEXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
            timeout_ms: 1000,
            verify_with_head: true,
            upload_bytes_per_sec: 0,
        }
    }

    #[test]
    fn throttle_spaces_uploads_by_the_rate() {
        throttle(1, 0);
        let start = Instant::now();
        throttle(1000, 10_000);
        throttle(1000, 10_000);
        throttle(1000, 10_000);
        // Three 100 ms slots: the third starts after two have passed.
        assert!(
            start.elapsed() >= Duration::from_millis(190),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn extracts_s3_error_codes() {
        let xml = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
        assert_eq!(s3_error_code(xml), Some("SignatureDoesNotMatch"));
        assert_eq!(s3_error_code("<Code><script></Code>"), None);
        assert_eq!(s3_error_code("plain"), None);
    }

    #[test]
    fn presigned_put_signs_the_checksum_headers() {
        let store = Store::new(&settings()).unwrap();
        let mut action = store
            .bucket
            .put_object(store.credentials.as_ref(), "flows/a%3Ab.jsonl.gz");
        action
            .headers_mut()
            .insert("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==");
        action.headers_mut().insert(
            "x-amz-checksum-sha256",
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        );
        let url = action.sign(Duration::from_secs(60)).to_string();
        assert!(
            url.starts_with("http://127.0.0.1:9/flows/flows/a%253Ab.jsonl.gz?"),
            "{url}"
        );
        assert!(
            url.contains("X-Amz-SignedHeaders=content-md5%3Bhost%3Bx-amz-checksum-sha256"),
            "{url}"
        );
        assert!(
            !url.contains("wJalrXUtnFEMI"),
            "the secret never appears in a URL"
        );
        assert_eq!(
            store.location("flows/x.jsonl.gz"),
            "s3://flows/flows/x.jsonl.gz"
        );
    }

    #[test]
    fn refuses_missing_bucket() {
        let mut s = settings();
        s.bucket.clear();
        let err = Store::new(&s).err().unwrap();
        assert_eq!(err.kind, FailureKind::Config);
        assert!(err.message.contains("flowarchive.bucket"));
    }

    #[test]
    fn unreachable_server_is_a_clear_error() {
        let store = Store::new(&settings()).unwrap();
        let obj = Encoded {
            body: b"x".to_vec(),
            raw_bytes: 1,
            object_sha256: [0; 32],
            object_md5: [0; 16],
        };
        let err = store.put_verified("flows/x.jsonl.gz", &obj).err().unwrap();
        assert_eq!(err.kind, FailureKind::Unreachable, "{err}");
        assert!(!err.message.contains("X-Amz"), "{err}");
    }
}
