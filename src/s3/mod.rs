//! S3 through presigned requests (rusty-s3 signs, ureq sends). Runs on worker threads only.
//!
//! Each request is signed with the credentials of the chain ([`credentials`]), sent through the one
//! shared connection pool ([`http`], TLS by [`tls`]) and retried when the failure is transient
//! ([`retry`]); every attempt is signed anew. The settings a job gives are in `settings`, the upload
//! rate cap in `throttle`, what proves an upload stored in `verify`, how a request fails in `errors`.
//!
//! Uploads are write-once (`If-None-Match: *`): an object already at the key is never replaced, and the
//! caller learns it as [`FailureKind::Exists`] so it can compare the stored object with its own. An
//! upload is proven stored by a HEAD, or by the object's sha256 echoed in the PUT's answer where
//! `verify` lets that echo prove it ([`VerifyMode`]; under `auto` only from a store [`proven`] to
//! validate checksums).
//!
//! Error texts name the operation, the object and S3's error code; never a URL (it carries the
//! credential scope and signature) and never a key.

pub mod credentials;
mod errors;
pub mod http;
mod proven;
pub mod retry;
mod settings;
mod throttle;
pub mod tls;
mod verify;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rusty_s3::{Bucket, S3Action, UrlStyle};

use crate::digest::{hex, md5, sha256};
use crate::format::Encoded;

pub(crate) use errors::fail;
pub use errors::{s3_error_code, FailureKind, StoreError};
pub use settings::{Checksum, S3Settings, Sse, VerifyMode};

use errors::{request_error, shown_key, success};
use throttle::throttle;
use verify::{Answer, Proven};

/// HTTP requests sent to S3 since load, every attempt of every request (INFO `s3_requests`).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Largest archive object the read path fetches (a flow of millions of events compresses far below).
#[cfg(test)]
pub const MAX_OBJECT: u64 = 4 << 30;
/// Longest a credential service may take to answer.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a GET's first buffer takes on the word of its announced length; a larger body grows it by
/// doubling as its bytes arrive (`capped::read`).
const FIRST_READ_BYTES: u64 = 1 << 20;

/// The digests a PUT signs: `Content-MD5`, `x-amz-checksum-sha256` (under `checksum sha256`), and the
/// hex sha256 recorded in the object's metadata.
struct Digests {
    md5_b64: String,
    sha_b64: String,
    sha_hex: String,
}

impl Digests {
    /// The digests of `body`.
    fn of(body: &[u8]) -> Digests {
        Digests {
            md5_b64: B64.encode(md5(body)),
            sha_b64: B64.encode(sha256(body)),
            sha_hex: hex(&sha256(body)),
        }
    }
}

pub struct Store {
    bucket: Bucket,
    endpoint: url::Url,
    credentials: credentials::CredentialConfig,
    /// Each request's timeout.
    timeout: Duration,
    /// How long a presigned URL stays valid: long enough for one request with its timeout.
    expires: Duration,
    verify: VerifyMode,
    /// Where what is learnt of the store is said (the server log, at notice).
    notice: fn(&str),
    /// The object key prefix (`prefix`), under which the store is probed.
    prefix: String,
    /// The store's identity: what is proven of it is remembered under it ([`proven`]).
    identity: proven::Identity,
    upload_bytes_per_sec: &'static AtomicI64,
    retry: retry::Policy,
    checksum: Checksum,
    /// Signed headers of every upload for encryption and storage class.
    placement: Vec<(&'static str, String)>,
    /// Uploads are SSE-KMS encrypted (their ETag is no MD5).
    kms: bool,
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
        let endpoint: url::Url = endpoint
            .parse()
            .map_err(|e| fail(FailureKind::Config, format!("bad S3 endpoint: {e}")))?;
        let style = if s.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            endpoint.clone(),
            style,
            bucket.to_string(),
            s.region.clone(),
        )
        .map_err(|e| fail(FailureKind::Config, format!("bad S3 bucket settings: {e}")))?;
        let mut placement = Vec::new();
        if let Some(sse) = s.sse.header() {
            placement.push(("x-amz-server-side-encryption", sse.to_string()));
            if s.sse == Sse::Kms && !s.sse_kms_key_id.is_empty() {
                placement.push((
                    "x-amz-server-side-encryption-aws-kms-key-id",
                    s.sse_kms_key_id.clone(),
                ));
            }
        }
        if !s.storage_class.is_empty() {
            placement.push(("x-amz-storage-class", s.storage_class.clone()));
        }
        Ok(Store {
            identity: proven::identity(s, &endpoint, bucket.name()),
            bucket,
            endpoint,
            credentials: s.credentials.clone(),
            timeout: Duration::from_millis(s.timeout_ms),
            expires: Duration::from_secs(60 + 2 * s.timeout_ms.div_ceil(1000)),
            verify: s.verify,
            notice: s.notice,
            prefix: s.prefix.clone(),
            upload_bytes_per_sec: s.upload_bytes_per_sec,
            retry: s.retry,
            checksum: s.checksum,
            kms: s.sse == Sse::Kms,
            placement,
        })
    }

    /// Runs one S3 request with retries. Every attempt gets the credentials of that moment, the
    /// shared agent and so a fresh signature; `attempt` sends it with the request timeout.
    fn request<T>(
        &self,
        mut attempt: impl FnMut(&ureq::Agent, &rusty_s3::Credentials) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.retry.run(|| {
            let timeout = self.timeout.min(CREDENTIALS_TIMEOUT);
            let creds = credentials::current(&self.credentials, timeout)?;
            let agent = http::agent(&self.endpoint, &self.credentials.tls_ca_file)?;
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            attempt(&agent, &creds.signing())
        })
    }

    /// `s3://bucket/key`, the form the index records.
    pub fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket.name(), key)
    }

    /// Uploads the object write-once, then proves it is stored.
    ///
    /// The presigned PUT signs `Content-MD5` and `x-amz-checksum-sha256` (a store that validates them
    /// rejects a body that does not match) and `If-None-Match: *` (the store refuses to replace an
    /// object: that answer is `Err` of kind [`FailureKind::Exists`], and the stored object is left as it
    /// was). The upload counts as stored when the PUT's answer echoes our sha256 checksum and `verify`
    /// lets the echo prove it (`put-response`; `auto` once the store is [`proven`] to validate
    /// checksums), or else when a HEAD shows the uploaded size and digest; an ETag in the PUT's answer
    /// alone proves nothing. Every proof a store gives must agree with the upload.
    pub fn put_verified(&self, key: &str, obj: &Encoded) -> Result<(), StoreError> {
        let digests = Digests {
            md5_b64: B64.encode(obj.object_md5),
            sha_b64: B64.encode(obj.object_sha256),
            sha_hex: hex(&obj.object_sha256),
        };
        let echo_proves = self.prove()?;
        throttle(obj.body.len(), self.upload_bytes_per_sec);
        let echoed = self.request(|agent, creds| {
            let response = self
                .put_request(agent, creds, key, &digests)
                .send_bytes(&obj.body)
                .map_err(|e| request_error("PUT", key, e))?;
            let response = success("PUT", key, response)?;
            Ok(Answer::of(&response))
        })?;
        let proof = self.proof(obj, &digests.sha_b64);
        // The PUT's own answer: it may prove the upload (the checksum echoed), and must not contradict
        // it (an MD5 ETag of other bytes, another checksum).
        let verified = proof
            .check("PUT", key, &echoed)
            .and_then(|proven| match proven {
                Proven::ByStore | Proven::ByEcho if echo_proves && echoed.sha.is_some() => {
                    proven::head_saved();
                    Ok(())
                }
                _ => self.verify_stored(key, &proof, obj, echo_proves),
            });
        if let Err(e) = &verified {
            if e.kind == FailureKind::Verify {
                // This PUT created the key (write-once): bytes the store holds there are not the
                // upload, and must not be taken for it by a later attempt. Removed, best effort.
                let _ = self.delete(key);
            }
        }
        verified
    }

    /// A write-once PUT of `key` with an upload's signed headers, ready for its body. The caller waits
    /// for the upload rate cap first (`throttle`), before the attempts and their credentials.
    fn put_request(
        &self,
        agent: &ureq::Agent,
        creds: &rusty_s3::Credentials,
        key: &str,
        digests: &Digests,
    ) -> ureq::Request {
        let mut signed: Vec<(&str, &str)> = vec![
            ("content-md5", &digests.md5_b64),
            ("content-type", "application/x-ndjson"),
            ("if-none-match", "*"),
            ("x-amz-meta-flowarchive-sha256", &digests.sha_hex),
        ];
        if self.checksum == Checksum::Sha256 {
            signed.push(("x-amz-checksum-sha256", &digests.sha_b64));
        }
        signed.extend(self.placement.iter().map(|(k, v)| (*k, v.as_str())));
        let mut action = self.bucket.put_object(Some(creds), key);
        for (name, value) in &signed {
            action.headers_mut().insert(*name, *value);
        }
        let url = action.sign(self.expires);
        let mut request = agent.put(url.as_str()).timeout(self.timeout);
        for (name, value) in &signed {
            request = request.set(name, value);
        }
        request
    }

    /// Deletes an object this module just wrote that must not stay: an upload whose verification
    /// failed, or a checksum probe the store took. The caller decides what an error means: an object
    /// left there stays unreferenced, and a later attempt compares its bytes before taking it.
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.request(|agent, creds| {
            let url = self
                .bucket
                .delete_object(Some(creds), key)
                .sign(self.expires);
            agent
                .delete(url.as_str())
                .timeout(self.timeout)
                .call()
                .map(|_| ())
                .map_err(|e| request_error("DELETE", key, e))
        })
    }

    /// Whether an object exists at `key` (a presigned HEAD: found, or 404).
    pub fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.request(|agent, creds| {
            let url = self.bucket.head_object(Some(creds), key).sign(self.expires);
            match agent.head(url.as_str()).timeout(self.timeout).call() {
                Ok(response) => success("HEAD", key, response).map(|_| true),
                Err(ureq::Error::Status(404, _)) => Ok(false),
                Err(e) => Err(request_error("HEAD", key, e)),
            }
        })
    }

    /// Fetches an object with a presigned GET: its bytes and the hex sha256 recorded at upload, if any.
    /// An object larger than `max_bytes` is refused ([`FailureKind::TooLarge`]) from its Content-Length
    /// before any byte is read, and never more than `max_bytes + 1` bytes are read.
    pub fn get(&self, key: &str, max_bytes: u64) -> Result<(Vec<u8>, Option<String>), StoreError> {
        self.request(|agent, creds| self.get_once(agent, creds, key, max_bytes))
    }

    fn get_once(
        &self,
        agent: &ureq::Agent,
        creds: &rusty_s3::Credentials,
        key: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, Option<String>), StoreError> {
        // Keys are cut in messages, so a long one cannot push the reason past the bound.
        let shown = shown_key(key);
        let url = self.bucket.get_object(Some(creds), key).sign(self.expires);
        let response = agent
            .get(url.as_str())
            .timeout(self.timeout)
            .call()
            .map_err(|e| match e {
                ureq::Error::Status(404, _) => fail(
                    FailureKind::Missing,
                    format!("archived object {shown} is missing (HTTP 404)"),
                ),
                e => request_error("GET", key, e),
            })?;
        let response = success("GET", key, response)?;
        let too_large = || {
            fail(
                FailureKind::TooLarge,
                format!("S3 GET {shown}: object is larger than {max_bytes} bytes"),
            )
        };
        let announced = response
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|len| len > max_bytes) {
            return Err(too_large());
        }
        let recorded = response
            .header("x-amz-meta-flowarchive-sha256")
            .map(|s| s.trim().to_string());
        // The announced length is trusted for the first allocation only up to `FIRST_READ_BYTES`:
        // a store may announce more than the machine holds, under a cap as large as it allows.
        let first = announced.map_or(64 << 10, |len| {
            len.saturating_add(1).min(FIRST_READ_BYTES) as usize
        });
        let body =
            crate::capped::read(&mut response.into_reader(), max_bytes, first).map_err(|e| {
                let kind = if e.kind() == std::io::ErrorKind::TimedOut {
                    FailureKind::Timeout
                } else {
                    FailureKind::Truncated
                };
                fail(
                    kind,
                    format!("S3 GET {shown}: body cut short ({})", e.kind()),
                )
            })?;
        if body.len() as u64 > max_bytes {
            return Err(too_large());
        }
        Ok((body, recorded))
    }
}

/// INFO fields of the S3 client: the credential source in use (one gauge per source, 1 for the one
/// in use), seconds to its expiry (-1: long-term keys or none yet), refresh failures, retries,
/// requests that failed after retrying, connection pools built; HTTP requests sent, every attempt;
/// and what is proven of the store of the latest upload ([`proven`]).
pub fn info_fields() -> Vec<(String, i64)> {
    let (source, expires_in, refresh_failures) = credentials::status();
    let (retries, exhausted) = retry::counts();
    let mut fields: Vec<(String, i64)> = credentials::Source::ALL
        .iter()
        .map(|s| {
            let name = format!("credentials_source_{}", s.name().replace('-', "_"));
            (name, (source == Some(*s)) as i64)
        })
        .collect();
    fields.extend([
        ("credentials_expires_in_s".to_string(), expires_in),
        (
            "credentials_refresh_failures".into(),
            refresh_failures as i64,
        ),
        (
            "s3_requests".into(),
            REQUESTS.load(Ordering::Relaxed) as i64,
        ),
        ("s3_retries".into(), retries as i64),
        ("s3_retries_exhausted".into(), exhausted as i64),
        ("s3_pools_built".into(), http::pools_built() as i64),
    ]);
    fields.extend(proven::info_fields().map(|(k, v)| (k.to_string(), v)));
    fields
}

#[cfg(test)]
mod tests;
