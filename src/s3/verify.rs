//! What proves an upload stored: the answers a store gives of an object (a PUT's, a HEAD's), every
//! proof in them agreeing with the upload, and an object already at the key read back whole.

use rusty_s3::S3Action;

use crate::digest::{hex, sha256};
use crate::format::Encoded;

use super::errors::{fail, request_error, shown_key, success, FailureKind, StoreError};
use super::{Checksum, Store};

impl Store {
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
    pub(super) fn proof<'a>(&self, obj: &Encoded, sha_b64: &'a str) -> Proof<'a> {
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

    /// A presigned HEAD must show the uploaded size and prove the content, every proof agreeing. A
    /// HEAD that proves it only by what the upload sent (`Proven::ByEcho`: an encrypted object has no
    /// MD5 ETag) proves it where `echo_proves` (the store is proven to check what it is sent, or
    /// `verify put-response` trusts it); elsewhere the object is read back and hashed.
    pub(super) fn verify_stored(
        &self,
        key: &str,
        proof: &Proof,
        obj: &Encoded,
        echo_proves: bool,
    ) -> Result<(), StoreError> {
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
            Proven::ByStore => Ok(()),
            Proven::ByEcho if echo_proves => Ok(()),
            Proven::ByEcho => self.verify_existing(key, obj),
            Proven::Not => Err(fail(
                FailureKind::Verify,
                format!(
                    "HEAD {shown}: nothing proves the stored object is the upload (etag {}, sha256 {})",
                    stored.etag.as_deref().unwrap_or("missing"),
                    stored.sha.as_deref().unwrap_or("missing")
                ),
            )),
        }
    }
}

/// What a store says of an object it holds: its size, ETag, checksum, our recorded sha256 and its
/// encryption.
pub(super) struct Answer {
    pub(super) size: Option<u64>,
    pub(super) etag: Option<String>,
    pub(super) sha: Option<String>,
    pub(super) recorded: Option<String>,
    pub(super) encrypted_by_key: bool,
}

impl Answer {
    pub(super) fn of(r: &ureq::Response) -> Answer {
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

/// How a store's answer proves that an object it holds is the upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Proven {
    /// By what the store computed of the bytes it holds: an ETag that is their MD5.
    ByStore,
    /// Only by what the upload sent, which a store may echo without checking the bytes: the
    /// checksum, our recorded sha256.
    ByEcho,
    /// By nothing (nor does anything contradict it).
    Not,
}

/// What proves a stored object is the one uploaded.
pub(super) struct Proof<'a> {
    pub(super) size: u64,
    pub(super) md5_hex: String,
    pub(super) sha_b64: &'a str,
    pub(super) sha_hex: String,
    /// Our sha256 in the object's metadata counts as proof (SSE-KMS with `checksum md5`).
    pub(super) metadata_proves: bool,
    /// Uploads are SSE-KMS encrypted: their ETag is no MD5.
    pub(super) kms: bool,
}

impl Proof<'_> {
    /// Every proof `a` gives must agree with the upload: its size (when it states one for the object),
    /// an ETag that is an MD5 (32 hex digits, the object not encrypted with a KMS or customer key),
    /// its sha256 checksum, our recorded sha256. Any contradiction is a failed verification, whatever
    /// else agrees (a store can record a client's checksum without checking the bytes). What proves
    /// the content, if nothing contradicts it: `Proven`.
    pub(super) fn check(&self, op: &str, key: &str, a: &Answer) -> Result<Proven, StoreError> {
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
        Ok(if md5_etag.is_some() {
            Proven::ByStore
        } else if a.sha.is_some() || (self.metadata_proves && a.recorded.is_some()) {
            Proven::ByEcho
        } else {
            Proven::Not
        })
    }
}
