//! How an S3 request fails: its kind (counted in INFO, decides retries) and a message that names the
//! operation, the object (cut, so a long key cannot push the reason past the bound) and S3's error
//! code; never a URL (it carries the credential scope and signature) and never a key.

use std::io::Read;

use crate::kinds::kinds;

use super::tls;

/// Largest S3 error body we read, to extract its `<Code>`.
const MAX_ERROR_BODY: u64 = 64 * 1024;

kinds! {
    /// How an S3 request failed.
    pub enum FailureKind {
        Config => "s3_config",
        Unreachable => "s3_unreachable",
        Timeout => "s3_timeout",
        Rejected => "s3_rejected",
        ServerError => "s3_server_error",
        Verify => "s3_verify",
        Missing => "s3_missing",
        Truncated => "s3_truncated",
        /// A write-once PUT found an object already at the key (HTTP 412, or 409 ConditionalRequestConflict).
        Exists => "s3_exists",
        /// The store was found to replace an object despite `If-None-Match: *`: nothing is uploaded
        /// into it.
        NotWriteOnce => "s3_not_write_once",
        /// A GET found an object larger than the caller's cap.
        TooLarge => "s3_too_large",
        /// 429, or 503 SlowDown: the store asks to slow down (retried).
        Throttled => "s3_throttled",
        /// The TLS handshake failed (certificate from an unknown issuer, for another name, expired...).
        Tls => "s3_tls",
        /// No credentials could be had from the chain.
        Credentials => "s3_credentials",
        /// The store answered a redirect (3xx): the endpoint, region or addressing style is wrong.
        Redirected => "s3_redirected",
    }
}

#[derive(Debug, Clone)]
pub struct StoreError {
    pub kind: FailureKind,
    pub message: String,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub(crate) fn fail(kind: FailureKind, message: String) -> StoreError {
    StoreError { kind, message }
}

/// A 2xx answer, else an error: a redirect (3xx; ureq follows none) names its code and target, so a
/// wrong endpoint or region is said as such rather than read as success or a missing object.
pub(super) fn success(
    op: &str,
    key: &str,
    r: ureq::Response,
) -> Result<ureq::Response, StoreError> {
    // Keys are cut in messages, so a long one cannot push the reason past the bound.
    let shown = shown_key(key);
    match r.status() {
        200..=299 => Ok(r),
        code @ 300..=399 => Err(fail(
            FailureKind::Redirected,
            format!(
                "S3 {op} {shown}: redirected (HTTP {code}{}); check flowarchive.endpoint, region and path-style",
                r.header("location")
                    .map(|l| format!(" to {:?}", crate::format::gojson::bounded(l)))
                    .unwrap_or_default()
            ),
        )),
        code => Err(fail(
            FailureKind::Rejected,
            format!("S3 {op} {shown}: unexpected answer HTTP {code}"),
        )),
    }
}

/// An object key as messages show it: as is up to 160 bytes, else its first 120 characters and `...`.
pub(super) fn shown_key(key: &str) -> std::borrow::Cow<'_, str> {
    if key.len() <= 160 {
        return key.into();
    }
    let cut: String = key.chars().take(120).collect();
    format!("{cut}...").into()
}

/// The `<Code>` of an S3 error answer (empty when it names none).
pub(super) fn error_code(response: ureq::Response) -> String {
    let mut body = String::new();
    let _ = response
        .into_reader()
        .take(MAX_ERROR_BODY)
        .read_to_string(&mut body);
    s3_error_code(&body).unwrap_or("").to_string()
}

/// The error of an HTTP `code` answer whose S3 error code is `code_name`.
pub(super) fn status_error(op: &str, key: &str, code: u16, code_name: &str) -> StoreError {
    // Keys are cut in messages, so a long one cannot push the reason past the bound.
    let shown = shown_key(key);
    let status = format!("HTTP {code} {code_name}");
    let status = status.trim_end();
    // Only a write-once PUT sends a precondition, so only it can get these answers.
    if code == 412 || (code == 409 && code_name == "ConditionalRequestConflict") {
        return fail(
            FailureKind::Exists,
            format!("S3 {op} {shown}: an object already exists at this key ({status})"),
        );
    }
    let kind = match code {
        429 | 503 => FailureKind::Throttled,
        500.. => FailureKind::ServerError,
        _ => FailureKind::Rejected,
    };
    fail(kind, format!("S3 {op} {shown} failed: {status}"))
}

/// Pulls `<Code>` out of an S3 XML error body.
pub fn s3_error_code(body: &str) -> Option<&str> {
    let start = body.find("<Code>")? + "<Code>".len();
    let end = body[start..].find("</Code>")? + start;
    Some(&body[start..end])
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric()))
}

pub(super) fn request_error(op: &str, key: &str, err: ureq::Error) -> StoreError {
    match err {
        ureq::Error::Status(code, response) => status_error(op, key, code, &error_code(response)),
        ureq::Error::Transport(t) => {
            // Keys are cut in messages, so a long one cannot push the reason past the bound.
            let shown = shown_key(key);
            if let Some(cause) = tls::describe(&t) {
                return fail(FailureKind::Tls, format!("S3 {op} {shown} failed: {cause}"));
            }
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
            fail(kind, format!("S3 {op} {shown} failed: {what}"))
        }
    }
}
