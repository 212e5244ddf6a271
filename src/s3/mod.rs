//! S3 through presigned requests (rusty-s3 signs, ureq sends). Runs on worker threads only.
//!
//! Each request is signed with the credentials of the chain ([`credentials`]), sent through the one
//! shared connection pool ([`http`], TLS by [`tls`]) and retried when the failure is transient
//! ([`retry`]); every attempt is signed anew.
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
pub mod http;
mod proven;
pub mod retry;
pub mod tls;

use std::io::Read;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rusty_s3::{Bucket, S3Action, UrlStyle};

use crate::digest::{hex, sha256};
use crate::format::Encoded;
use crate::kinds::kinds;
use crate::sync::lock;

/// Largest archive object the read path fetches (a flow of millions of events compresses far below).
#[cfg(test)]
pub const MAX_OBJECT: u64 = 4 << 30;
/// Longest a credential service may take to answer.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest S3 error body we read, to extract its `<Code>`.
const MAX_ERROR_BODY: u64 = 64 * 1024;
/// How long a throttled upload sleeps before it looks at the rate cap again.
const THROTTLE_SLICE: Duration = Duration::from_millis(50);

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

pub(crate) fn fail(kind: FailureKind, message: String) -> StoreError {
    StoreError { kind, message }
}

/// The digests a PUT signs: `Content-MD5`, `x-amz-checksum-sha256` (under `checksum sha256`), and the
/// hex sha256 recorded in the object's metadata.
struct Digests {
    md5_b64: String,
    sha_b64: String,
    sha_hex: String,
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

/// Server-side encryption of uploads (`sse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sse {
    None,
    Aes256,
    Kms,
}

impl Sse {
    pub fn parse(v: &str) -> Result<Sse, String> {
        match v {
            "" | "none" => Ok(Sse::None),
            "AES256" => Ok(Sse::Aes256),
            "aws:kms" => Ok(Sse::Kms),
            _ => Err("sse must be none, AES256 or aws:kms".into()),
        }
    }

    /// The `x-amz-server-side-encryption` value, if any.
    fn header(self) -> Option<&'static str> {
        match self {
            Sse::None => None,
            Sse::Aes256 => Some("AES256"),
            Sse::Kms => Some("aws:kms"),
        }
    }
}

/// How uploads are checksummed (`checksum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksum {
    /// `Content-MD5` and `x-amz-checksum-sha256`.
    Sha256,
    /// `Content-MD5` only, for stores that reject `x-amz-checksum-*` headers; the sha256 is kept in
    /// the object's metadata and verified on read.
    Md5,
}

impl Checksum {
    pub fn parse(v: &str) -> Result<Checksum, String> {
        match v {
            "sha256" => Ok(Checksum::Sha256),
            "md5" => Ok(Checksum::Md5),
            _ => Err("checksum must be sha256 or md5".into()),
        }
    }
}

/// How an upload is proven stored before anything is deleted (`verify`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyMode {
    /// A HEAD after every PUT must show the uploaded size and prove the content.
    Head,
    /// The PUT's answer proves the upload when it echoes the object's sha256, from any store: one
    /// request fewer, and a store that records checksums unchecked is believed.
    PutResponse,
    /// The PUT's echo proves the upload only from a store proven to validate checksums (a probe with
    /// a wrong checksum was refused, [`proven`]); otherwise, and under `checksum md5`, the HEAD.
    Auto,
}

/// The token bucket behind `flowarchive.upload-bytes-per-sec`, shared by every upload of the server.
///
/// It holds at most one second of the rate. An upload waits until the bucket holds its size (or is full,
/// for an upload larger than one second's worth), then takes its size, possibly leaving a debt that later
/// uploads repay: the long-run rate holds for any object size. Nothing is reserved ahead at a rate:
/// every call is given the rate of that moment, so a changed cap applies at once to the debt and to
/// uploads already waiting.
#[derive(Debug)]
struct TokenBucket {
    /// Bytes that may be sent now; negative while a large upload's debt is repaid.
    tokens: f64,
    /// When `tokens` was last brought up to date; `None` while uncapped (a new cap starts full).
    updated: Option<Instant>,
}

impl TokenBucket {
    const fn new() -> Self {
        TokenBucket {
            tokens: 0.0,
            updated: None,
        }
    }

    /// Admits an upload of `bytes` at `rate` bytes per second (0: unlimited) at `now`, or tells how
    /// long it would have to wait at this rate.
    fn admit(&mut self, bytes: u64, rate: u64, now: Instant) -> Result<(), Duration> {
        if rate == 0 {
            *self = TokenBucket::new();
            return Ok(());
        }
        let rate = rate as f64;
        self.tokens = match self.updated {
            None => rate,
            Some(t) => {
                (self.tokens + now.saturating_duration_since(t).as_secs_f64() * rate).min(rate)
            }
        };
        self.updated = Some(now);
        let needed = (bytes as f64).min(rate);
        if self.tokens >= needed {
            self.tokens -= bytes as f64;
            return Ok(());
        }
        Err(Duration::try_from_secs_f64((needed - self.tokens) / rate).unwrap_or(THROTTLE_SLICE))
    }
}

/// S3 destination and credentials of one job.
#[derive(Clone)]
pub struct S3Settings {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub path_style: bool,
    pub credentials: credentials::CredentialConfig,
    pub timeout_ms: u64,
    pub verify: VerifyMode,
    /// Where what is learnt of a store is said: the server log at notice (`s3` does not import `ops`).
    pub notice: fn(&str),
    pub retry: retry::Policy,
    pub sse: Sse,
    pub sse_kms_key_id: String,
    pub storage_class: String,
    pub checksum: Checksum,
    /// The longest object name (the key's last segment) the store takes (`object-name-max`).
    pub object_name_max: usize,
    /// The upload rate cap shared by all uploads, bytes per second (0: unlimited), read live at every
    /// wait, so a CONFIG SET applies to uploads already waiting.
    pub upload_bytes_per_sec: &'static AtomicI64,
}

static UPLOAD_LINK: Mutex<TokenBucket> = Mutex::new(TokenBucket::new());

/// HTTP requests sent to S3 since load, every attempt of every request (INFO `s3_requests`).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Waits until `bytes` fit under the upload rate cap, re-reading the cap every slice.
fn throttle(bytes: usize, cap: &AtomicI64) {
    loop {
        let rate = cap.load(Ordering::Relaxed).max(0) as u64;
        let admitted = lock(&UPLOAD_LINK).admit(bytes as u64, rate, Instant::now());
        match admitted {
            Ok(()) => return,
            Err(wait) => std::thread::sleep(wait.min(THROTTLE_SLICE)),
        }
    }
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
                true if echo_proves && echoed.sha.is_some() => {
                    proven::head_saved();
                    Ok(())
                }
                _ => self.verify_stored(key, &proof),
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

    /// Whether the object already at `key` (a PUT found it there) is exactly `obj`: an idempotent
    /// retry, taken only when its bytes are read back and hash to the upload's sha256 (a HEAD's claims
    /// are not enough: they may be of bytes a store corrupted), its recorded sha256 agrees, and its
    /// size too. A `Verify` failure for other content.
    pub fn verify_existing(&self, key: &str, obj: &Encoded) -> Result<(), StoreError> {
        // Keys are cut in messages, so a long one cannot push the reason past the bound.
        let shown = shown_key(key);
        let (body, recorded) = self
            .get(key, obj.body.len() as u64)
            .map_err(|e| match e.kind {
                FailureKind::TooLarge => fail(
                    FailureKind::Verify,
                    format!("{shown}: the object there is larger than this upload"),
                ),
                _ => e,
            })?;
        let sha = hex(&sha256(&body));
        let ours = hex(&obj.object_sha256);
        if body.len() != obj.body.len() || sha != ours || recorded.as_deref() != Some(&ours) {
            return Err(fail(
                FailureKind::Verify,
                format!("{shown}: the object there holds other content (sha256 {sha})"),
            ));
        }
        Ok(())
    }

    /// What proves an object stored is `obj`.
    fn proof<'a>(&self, obj: &Encoded, sha_b64: &'a str) -> Proof<'a> {
        Proof {
            size: obj.body.len() as u64,
            md5_hex: hex(&obj.object_md5),
            sha_b64,
            sha_hex: hex(&obj.object_sha256),
            // Under SSE-KMS without flexible checksums only our metadata names the content; the
            // signed Content-MD5 made the store check the body on PUT.
            metadata_proves: self.kms && self.checksum != Checksum::Sha256,
            kms: self.kms,
        }
    }

    /// A presigned HEAD must show the uploaded size and prove the content, every proof agreeing.
    fn verify_stored(&self, key: &str, proof: &Proof) -> Result<(), StoreError> {
        // Keys are cut in messages, so a long one cannot push the reason past the bound.
        let shown = shown_key(key);
        let checksum_mode = self.checksum == Checksum::Sha256;
        let stored = self.request(|agent, creds| {
            let mut head = self.bucket.head_object(Some(creds), key);
            if checksum_mode {
                head.headers_mut().insert("x-amz-checksum-mode", "ENABLED");
            }
            let url = head.sign(self.expires);
            let mut request = agent.head(url.as_str()).timeout(self.timeout);
            if checksum_mode {
                request = request.set("x-amz-checksum-mode", "ENABLED");
            }
            let response = request.call().map_err(|e| match e {
                ureq::Error::Status(404, _) => fail(
                    FailureKind::Verify,
                    format!("HEAD {shown}: the object is not stored after its upload (HTTP 404)"),
                ),
                e => request_error("HEAD", key, e),
            })?;
            success("HEAD", key, response).map(|r| Answer::of(&r))
        })?;
        match proof.check("HEAD", key, &stored)? {
            true => Ok(()),
            false => Err(fail(
                FailureKind::Verify,
                format!(
                    "HEAD {shown}: nothing proves the stored object is the upload (etag {}, sha256 {})",
                    stored.etag.as_deref().unwrap_or("missing"),
                    stored.sha.as_deref().unwrap_or("missing")
                ),
            )),
        }
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
        // The announced length is trusted for the first allocation only up to the cap.
        let first = announced.map_or(64 << 10, |len| len.saturating_add(1) as usize);
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

/// A 2xx answer, else an error: a redirect (3xx; ureq follows none) names its code and target, so a
/// wrong endpoint or region is said as such rather than read as success or a missing object.
fn success(op: &str, key: &str, r: ureq::Response) -> Result<ureq::Response, StoreError> {
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

/// What a store says of an object it holds: its size, ETag, checksum, our recorded sha256 and its
/// encryption.
struct Answer {
    size: Option<u64>,
    etag: Option<String>,
    sha: Option<String>,
    recorded: Option<String>,
    encrypted_by_key: bool,
}

impl Answer {
    fn of(r: &ureq::Response) -> Answer {
        let header = |name: &str| r.header(name).map(|v| v.trim().to_string());
        Answer {
            size: header("content-length").and_then(|v| v.parse().ok()),
            etag: header("etag").map(|e| e.trim_matches('"').to_string()),
            sha: header("x-amz-checksum-sha256"),
            recorded: header("x-amz-meta-flowarchive-sha256"),
            // SSE-KMS and SSE-C objects have ETags that are no MD5 of their bytes.
            encrypted_by_key: header("x-amz-server-side-encryption")
                .is_some_and(|v| v.starts_with("aws:kms"))
                || header("x-amz-server-side-encryption-customer-algorithm").is_some(),
        }
    }
}

/// What proves a stored object is the one uploaded.
struct Proof<'a> {
    size: u64,
    md5_hex: String,
    sha_b64: &'a str,
    sha_hex: String,
    /// Our sha256 in the object's metadata counts as proof (SSE-KMS with `checksum md5`).
    metadata_proves: bool,
    /// Uploads are SSE-KMS encrypted: their ETag is no MD5.
    kms: bool,
}

impl Proof<'_> {
    /// Every proof `a` gives must agree with the upload: its size (when it states one for the object),
    /// an ETag that is an MD5 (32 hex digits, the object not encrypted with a KMS or customer key),
    /// its sha256 checksum, our recorded sha256. Any contradiction is a failed verification, whatever
    /// else agrees (a store can record a client's checksum without checking the bytes). `Ok(true)`
    /// when something positively proves the content, `Ok(false)` when nothing contradicts it but
    /// nothing proves it either.
    fn check(&self, op: &str, key: &str, a: &Answer) -> Result<bool, StoreError> {
        // Keys are cut in messages, so a long one cannot push the reason past the bound.
        let shown = shown_key(key);
        let contradiction = |what: String| {
            Err(fail(
                FailureKind::Verify,
                format!("{op} {shown}: the store's answer contradicts the upload: {what}"),
            ))
        };
        if op == "HEAD" && a.size != Some(self.size) {
            return contradiction(format!(
                "stored size {} differs from uploaded {}",
                a.size.map_or("unknown".into(), |s| s.to_string()),
                self.size
            ));
        }
        let md5_etag = a.etag.as_deref().filter(|e| {
            e.len() == 32
                && e.bytes().all(|b| b.is_ascii_hexdigit())
                && !self.kms
                && !a.encrypted_by_key
        });
        if let Some(etag) = md5_etag.filter(|e| !e.eq_ignore_ascii_case(&self.md5_hex)) {
            return contradiction(format!(
                "ETag {etag} is the MD5 of other bytes than {}",
                self.md5_hex
            ));
        }
        if let Some(sha) = a.sha.as_deref().filter(|s| *s != self.sha_b64) {
            return contradiction(format!("checksum sha256 {sha}, uploaded {}", self.sha_b64));
        }
        if let Some(recorded) = a.recorded.as_deref().filter(|r| *r != self.sha_hex) {
            return contradiction(format!(
                "recorded sha256 {recorded}, uploaded {}",
                self.sha_hex
            ));
        }
        Ok(md5_etag.is_some() || a.sha.is_some() || (self.metadata_proves && a.recorded.is_some()))
    }
}

/// INFO fields of the S3 client: the credential source in use (one gauge per source, 1 for the one
/// in use), seconds to its expiry (-1: long-term keys or none yet), refresh failures, retries,
/// requests that failed after retrying, connection pools built; whether the store of the latest
/// upload validates checksums (1, 0: not proven, -1: no verdict), checksum probes sent, and uploads
/// proven by their PUT's answer without a HEAD ([`proven`]); HTTP requests sent, every attempt.
pub fn info_fields() -> Vec<(String, i64)> {
    let (source, expires_in, refresh_failures) = credentials::status();
    let (retries, exhausted) = retry::counts();
    let (validates, probes, heads_saved) = proven::counts();
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
        ("s3_store_validates_checksums".into(), validates),
        ("s3_checksum_probes".into(), probes as i64),
        ("s3_heads_saved".into(), heads_saved as i64),
    ]);
    fields
}

/// An object key as messages show it: as is up to 160 bytes, else its first 120 characters and `...`.
fn shown_key(key: &str) -> std::borrow::Cow<'_, str> {
    if key.len() <= 160 {
        return key.into();
    }
    let cut: String = key.chars().take(120).collect();
    format!("{cut}...").into()
}

/// The `<Code>` of an S3 error answer (empty when it names none).
fn error_code(response: ureq::Response) -> String {
    let mut body = String::new();
    let _ = response
        .into_reader()
        .take(MAX_ERROR_BODY)
        .read_to_string(&mut body);
    s3_error_code(&body).unwrap_or("").to_string()
}

/// The error of an HTTP `code` answer whose S3 error code is `code_name`.
fn status_error(op: &str, key: &str, code: u16, code_name: &str) -> StoreError {
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

fn request_error(op: &str, key: &str, err: ureq::Error) -> StoreError {
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn settings() -> S3Settings {
        S3Settings {
            endpoint: "http://127.0.0.1:9".into(),
            region: "us-east-1".into(),
            bucket: "flows".into(),
            prefix: String::new(),
            path_style: true,
            credentials: credentials::CredentialConfig {
                pin: None,
                access_key: "AKIDEXAMPLE".into(),
                secret_key: credentials::Hidden("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
                region: "us-east-1".into(),
                tls_ca_file: String::new(),
                warn: |_| {},
            },
            timeout_ms: 1000,
            verify: VerifyMode::Head,
            notice: |_| {},
            object_name_max: crate::layout::OBJECT_NAME_MAX,
            upload_bytes_per_sec: &NO_CAP,
            retry: retry::Policy {
                attempts: 1,
                total: Duration::from_secs(10),
            },
            sse: Sse::None,
            sse_kms_key_id: String::new(),
            storage_class: String::new(),
            checksum: Checksum::Sha256,
        }
    }

    /// What the store signs with (static keys: no request).
    fn signing(store: &Store) -> rusty_s3::Credentials {
        credentials::current(&store.credentials, Duration::from_secs(1))
            .unwrap()
            .signing()
    }

    static NO_CAP: AtomicI64 = AtomicI64::new(0);

    #[test]
    fn token_bucket_follows_the_current_rate() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let waits = |r: Result<(), Duration>, ms: u64| {
            let w = r.expect_err("should wait").as_secs_f64() * 1000.0;
            assert!((w - ms as f64).abs() < 1.0, "waits {w} ms, not {ms}");
        };
        let mut b = TokenBucket::new();
        // A new cap starts with a full bucket (one second of the rate): 500 bytes at 10 B/s pass and
        // leave a debt of 490 bytes.
        assert_eq!(b.admit(500, 10, at(0)), Ok(()));
        waits(b.admit(1, 10, at(0)), 49_100);
        // Two seconds later, 20 bytes of the debt are repaid.
        waits(b.admit(1, 10, at(2000)), 47_100);
        // Raising the cap applies to the debt at once: 100 ms at 100 MB/s repays it.
        assert_eq!(b.admit(1, 100 << 20, at(2100)), Ok(()));
        // Lowering it applies at once too: the bucket holds at most one second of the new rate.
        assert_eq!(b.admit(30, 10, at(2200)), Ok(()));
        waits(b.admit(5, 10, at(2200)), 2500);
        // 0 is unlimited and forgets the debt.
        assert_eq!(b.admit(1 << 30, 0, at(2200)), Ok(()));
        assert_eq!(b.admit(10, 10, at(2200)), Ok(()));
    }

    #[test]
    fn token_bucket_keeps_the_long_run_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new();
        let mut now = t0;
        let mut sent = 0u64;
        for i in 0..200u64 {
            let bytes = 1 + (i * 7919) % 3000;
            while let Err(wait) = b.admit(bytes, 1000, now) {
                now += wait.min(THROTTLE_SLICE);
            }
            sent += bytes;
        }
        // Everything sent but the first full bucket took `sent / rate` seconds, give or take one slice.
        let took = (now - t0).as_secs_f64();
        let ideal = (sent - 1000) as f64 / 1000.0;
        assert!(
            took >= ideal - 3.0 && took <= ideal + 0.1,
            "{took} vs {ideal}"
        );
    }

    #[test]
    fn throttle_without_a_cap_passes_at_once() {
        let start = Instant::now();
        throttle(1 << 30, &NO_CAP);
        assert!(start.elapsed() < Duration::from_secs(1));
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
        let creds = signing(&store);
        let mut action = store
            .bucket
            .put_object(Some(&creds), "flows/a%3Ab.jsonl.gz");
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

    fn answer(etag: Option<&str>, sha: Option<&str>, recorded: Option<&str>) -> Answer {
        Answer {
            size: Some(3),
            etag: etag.map(String::from),
            sha: sha.map(String::from),
            recorded: recorded.map(String::from),
            encrypted_by_key: false,
        }
    }

    /// Every proof a store gives must agree: one contradiction fails the verification, whatever else
    /// agrees (a store that records a client's checksum unchecked, as moto does, echoes ours for
    /// corrupted bytes while its ETag is their MD5).
    #[test]
    fn every_proof_must_agree_and_one_contradiction_fails() {
        let md5 = "0cc175b9c0f1b6a831c399e269772661";
        let other = "92eb5ffee6ae2fec3ad71c777531578f";
        let proof = Proof {
            size: 3,
            md5_hex: md5.into(),
            sha_b64: "c2hh",
            sha_hex: "ab12".into(),
            metadata_proves: false,
            kms: false,
        };
        let ok = |a: &Answer| proof.check("HEAD", "k", a).unwrap();
        assert!(ok(&answer(Some(md5), None, None)));
        assert!(ok(&answer(Some(md5), Some("c2hh"), Some("ab12"))));
        assert!(ok(&answer(Some("opaque-etag"), Some("c2hh"), None)));
        assert!(
            !ok(&answer(Some("opaque-etag"), None, Some("ab12"))),
            "metadata alone proves nothing"
        );
        for (what, a) in [
            (
                "an MD5 ETag of other bytes",
                answer(Some(other), Some("c2hh"), None),
            ),
            (
                "another checksum",
                answer(Some(md5), Some("b3RoZXI="), None),
            ),
            (
                "another recorded sha256",
                answer(Some(md5), Some("c2hh"), Some("ffff")),
            ),
        ] {
            let e = proof.check("HEAD", "k", &a).unwrap_err();
            assert_eq!(e.kind, FailureKind::Verify, "{what}");
            assert!(e.message.contains("contradicts"), "{what}: {e}");
        }
        let mut short = answer(Some(md5), None, None);
        short.size = Some(2);
        assert!(proof.check("HEAD", "k", &short).is_err(), "size");
        short.size = None;
        assert!(
            proof.check("PUT", "k", &short).unwrap(),
            "a PUT's answer states no object size"
        );
        // An object encrypted with a KMS or customer key has an ETag that is no MD5: not counted.
        let mut kms = answer(Some(other), Some("c2hh"), None);
        kms.encrypted_by_key = true;
        assert!(ok(&kms));
        kms.sha = None;
        assert!(!ok(&kms));
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

    /// The settings of the shared SeaweedFS of the test bed (scripts/s3.sh; credentials as in
    /// tests/common/mod.rs), its bucket created, and a prefix of this test run.
    pub(super) fn seaweedfs_settings() -> (S3Settings, String) {
        let endpoint = std::env::var("FLOWARCHIVE_S3_ENDPOINT")
            .unwrap_or_else(|_| "http://127.0.0.1:18333".into());
        let mut s = S3Settings {
            endpoint,
            bucket: "flowarchive-tests".into(),
            timeout_ms: 10_000,
            ..settings()
        };
        s.credentials.access_key = "flowarchive-test-key".into();
        s.credentials.secret_key = credentials::Hidden("flowarchive-test-secret-9f3b".into());
        let store = Store::new(&s).unwrap();
        let url = store
            .bucket
            .create_bucket(&signing(&store))
            .sign(Duration::from_secs(60));
        let agent = http::agent(&store.endpoint, "").unwrap();
        match agent.put(url.as_str()).call() {
            Ok(_) | Err(ureq::Error::Status(409, _)) => {}
            Err(e) => panic!("SeaweedFS not usable (scripts/s3.sh start): {e}"),
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        (s, format!("unit-{}-{nanos}", std::process::id()))
    }

    /// A store of the shared SeaweedFS, and a prefix of this test run.
    fn seaweedfs() -> (Store, String) {
        let (s, prefix) = seaweedfs_settings();
        (Store::new(&s).unwrap(), prefix)
    }

    fn encoded(body: &[u8]) -> Encoded {
        use md5::Md5;
        use sha2::{Digest, Sha256};
        Encoded {
            body: body.to_vec(),
            raw_bytes: body.len() as u64,
            object_sha256: Sha256::digest(body).into(),
            object_md5: Md5::digest(body).into(),
        }
    }

    #[test]
    #[ignore = "needs the test bed's SeaweedFS; scripts/test.sh runs it"]
    fn seaweedfs_second_put_of_a_key_is_exists_and_keeps_the_first_object() {
        let (store, prefix) = seaweedfs();
        let key = format!("{prefix}/flows/twice.jsonl.gz");
        let first = encoded(b"first history");
        store.put_verified(&key, &first).unwrap();
        for verify in [VerifyMode::Head, VerifyMode::PutResponse, VerifyMode::Auto] {
            let store = Store {
                verify,
                ..seaweedfs().0
            };
            let err = store
                .put_verified(&key, &encoded(b"another history"))
                .unwrap_err();
            assert_eq!(err.kind, FailureKind::Exists, "{err}");
            assert!(err.message.contains("already exists"), "{err}");
            // Even the same bytes are not rewritten: the caller compares and decides.
            let err = store.put_verified(&key, &first).unwrap_err();
            assert_eq!(err.kind, FailureKind::Exists, "{err}");
        }
        let (body, recorded) = store.get(&key, MAX_OBJECT).unwrap();
        assert_eq!(body, b"first history");
        assert_eq!(recorded, Some(hex(&first.object_sha256)));
    }

    #[test]
    #[ignore = "needs the test bed's SeaweedFS; scripts/test.sh runs it"]
    fn seaweedfs_get_refuses_objects_over_the_cap() {
        let (store, prefix) = seaweedfs();
        let key = format!("{prefix}/flows/big.jsonl.gz");
        let obj = encoded(&[7u8; 1000]);
        store.put_verified(&key, &obj).unwrap();
        assert_eq!(store.get(&key, 1000).unwrap().0, obj.body);
        let err = store.get(&key, 999).unwrap_err();
        assert_eq!(err.kind, FailureKind::TooLarge, "{err}");
        assert!(err.message.contains("larger than 999 bytes"), "{err}");
        let err = store.get(&format!("{prefix}/flows/none"), 10).unwrap_err();
        assert_eq!(err.kind, FailureKind::Missing, "{err}");
    }
}
