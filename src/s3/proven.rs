//! What the module proves of an S3 store before it uploads into it, remembered per store.
//!
//! A store is everything that decides where a PUT lands and how it is handled: the endpoint, region,
//! addressing style, bucket, prefix, credentials, trusted CA, checksum mode, encryption and storage
//! class ([`identity`]). The settings are rebuilt at every config change and a change of any of these
//! gives another identity, so a changed store is proven again; timeouts, retries, the rate cap and the
//! `verify` mode itself leave the store as it was. Two things are proven:
//!
//! - **The bucket exists**, before the first upload into it. Some stores (SeaweedFS) create a missing
//!   bucket on PUT, so a mistyped bucket would otherwise receive archives that reads then refuse. `200`
//!   or `403` (the bucket exists, listing it is not allowed) prove it; `404` refuses every upload.
//! - **The store validates checksums** (`verify auto` under `checksum sha256`). A PUT's echo of
//!   `x-amz-checksum-sha256` proves an upload only when the store computed the checksum of the bytes it
//!   received and compared it with ours; a store that records the client's value unchecked (moto does
//!   when the SDK's checksum-algorithm header comes with the PUT) echoes it for any bytes. The probe
//!   is a PUT of a scratch object with an upload's own headers, a correct `Content-MD5` and a wrong
//!   sha256 checksum, sent only once the bucket is proven (it would create a missing one). Refused as
//!   a checksum mismatch (400 `BadDigest` from AWS S3 and SeaweedFS, `XAmzContentChecksumMismatch`
//!   from MinIO), it proves the store validates: the PUT's echo is then proof and the HEAD is saved.
//!   Stored, it proves the store does not: the scratch object is removed and every upload is proven by
//!   a HEAD. Any other refusal (403 for a key the policy does not allow...) proves nothing, so HEAD too.
//!   An answer that decides nothing (no connection, 5xx after the retries) is not remembered: that
//!   upload is proven by a HEAD and the next one probes again. A verdict stands for an hour, then the
//!   store is probed again: the store behind an endpoint can change without any config changing.
//!
//! Each verdict that differs from the store's last one is said once in the log, at notice.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rusty_s3::S3Action;

use super::errors::{error_code, request_error, status_error, success};
use super::{
    fail, retry, Checksum, Digests, FailureKind, S3Settings, Store, StoreError, VerifyMode,
};
use crate::digest::{hex, md5, sha256};
use crate::sync::lock;

/// How long a checksum verdict stands before the store is probed again.
const VERDICT_TTL: Duration = Duration::from_secs(3600);
/// Stores remembered at most; past it the list starts anew (and each store is proven again).
const MAX_STORES: usize = 64;
/// The scratch object's folder under the configured prefix. Flow objects live under `flows/` or
/// `db<n>/flows/` of the prefix (`layout::object_key`), so no flow's key starts with it.
const PROBE_FOLDER: &str = "_flowarchive/";
/// The scratch object's body; its checksum is signed as the sha256 of other bytes.
const PROBE_BODY: &[u8] = b"flowarchive checksum probe: x-amz-checksum-sha256 names other bytes\n";
/// The error codes with which stores refuse a body whose `x-amz-checksum-*` does not match it.
const CHECKSUM_MISMATCH: [&str; 2] = ["BadDigest", "XAmzContentChecksumMismatch"];

/// A store's identity: the sha256 of every setting that decides where its PUTs land and how they are
/// handled (the secret among them, so it is never kept in clear here).
pub(super) type Identity = [u8; 32];

/// The identity of the store `s` describes, with its `endpoint` as used and `bucket`.
pub(super) fn identity(s: &S3Settings, endpoint: &url::Url, bucket: &str) -> Identity {
    let c = &s.credentials;
    let checksum = match s.checksum {
        Checksum::Sha256 => "sha256",
        Checksum::Md5 => "md5",
    };
    let parts = [
        endpoint.as_str(),
        &s.region,
        if s.path_style { "path" } else { "virtual-host" },
        bucket,
        &s.prefix,
        c.pin.map_or("auto", |p| p.name()),
        &c.access_key,
        &c.secret_key.0,
        &c.tls_ca_file,
        checksum,
        s.sse.header().unwrap_or("none"),
        &s.sse_kms_key_id,
        &s.storage_class,
    ];
    // Each part length-prefixed, so no two lists of parts give the same bytes.
    let mut bytes = Vec::new();
    for part in parts {
        bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
        bytes.extend_from_slice(part.as_bytes());
    }
    sha256(&bytes)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// The store refused a body whose checksum did not match it.
    Validates,
    /// The store stored it, or refused it for another reason.
    NotProven,
}

/// What is known of one store.
struct Known {
    store: Identity,
    /// Its checksum verdict and when it was reached.
    verdict: Option<(Verdict, Instant)>,
    /// A worker is probing it now; uploads meanwhile are proven by a HEAD.
    probing: bool,
}

/// Every store whose bucket is proven.
static KNOWN: Mutex<Vec<Known>> = Mutex::new(Vec::new());
/// Checksum probes sent.
static PROBES: AtomicU64 = AtomicU64::new(0);
/// Uploads proven by the PUT's own answer, without a HEAD.
static HEADS_SAVED: AtomicU64 = AtomicU64::new(0);
/// Whether the store of the latest upload validates checksums: 1, 0 (not proven), -1 (no verdict
/// stands: not probed yet, or the probe decided nothing).
static VALIDATES: AtomicI64 = AtomicI64::new(-1);

/// The INFO counters of this file: `s3_store_validates_checksums` (1, 0, -1), `s3_checksum_probes`
/// and `s3_heads_saved`.
pub(super) fn counts() -> (i64, u64, u64) {
    (
        VALIDATES.load(Ordering::Relaxed),
        PROBES.load(Ordering::Relaxed),
        HEADS_SAVED.load(Ordering::Relaxed),
    )
}

/// Counts an upload proven by its PUT's answer.
pub(super) fn head_saved() {
    HEADS_SAVED.fetch_add(1, Ordering::Relaxed);
}

/// What to do about a store's checksums, decided under the lock.
enum Next {
    /// A verdict that stands.
    Known(Verdict),
    /// Another worker is probing: this upload takes the HEAD.
    Busy,
    /// This worker probes.
    Probe,
}

/// Clears the store's `probing` flag however the probe ends.
struct Probing(Identity);

impl Drop for Probing {
    fn drop(&mut self) {
        if let Some(k) = lock(&KNOWN).iter_mut().find(|k| k.store == self.0) {
            k.probing = false;
        }
    }
}

/// The entry of `store`, added (bucket not proven) when missing.
fn entry(known: &mut Vec<Known>, store: Identity) -> &mut Known {
    let at = match known.iter().position(|k| k.store == store) {
        Some(at) => at,
        None => {
            if known.len() >= MAX_STORES {
                known.clear();
            }
            known.push(Known {
                store,
                verdict: None,
                probing: false,
            });
            known.len() - 1
        }
    };
    &mut known[at]
}

/// The store's verdict while it stands (reached less than [`VERDICT_TTL`] ago).
fn standing_verdict(k: &Known) -> Option<Verdict> {
    k.verdict
        .filter(|(_, at)| at.elapsed() < VERDICT_TTL)
        .map(|(v, _)| v)
}

/// The gauge value of a verdict.
fn gauge(verdict: Option<Verdict>) -> i64 {
    match verdict {
        Some(Verdict::Validates) => 1,
        Some(Verdict::NotProven) => 0,
        None => -1,
    }
}

/// What a probe's PUT got.
enum Answer {
    /// Refused as a checksum mismatch.
    Refused,
    /// Stored.
    Stored,
}

impl Store {
    /// Proves what an upload into this store needs before its PUT (the bucket exists; under
    /// `verify auto`, whether the store validates checksums), and says whether the PUT's checksum
    /// echo may prove the upload; otherwise a HEAD must.
    pub(super) fn prove(&self) -> Result<bool, StoreError> {
        let bucket_known = lock(&KNOWN).iter().any(|k| k.store == self.identity);
        if !bucket_known {
            self.prove_bucket()?;
        }
        Ok(match (self.verify, self.checksum) {
            (VerifyMode::Auto, Checksum::Sha256) => self.validates_checksums(),
            (mode, _) => {
                let known = lock(&KNOWN);
                let standing = known.iter().find(|k| k.store == self.identity);
                VALIDATES.store(
                    gauge(standing.and_then(standing_verdict)),
                    Ordering::Relaxed,
                );
                mode == VerifyMode::PutResponse
            }
        })
    }

    /// Whether this store is proven to validate checksums, probing it first when no verdict stands.
    fn validates_checksums(&self) -> bool {
        let next = {
            let mut known = lock(&KNOWN);
            let k = entry(&mut known, self.identity);
            let standing = standing_verdict(k);
            VALIDATES.store(gauge(standing), Ordering::Relaxed);
            match (standing, k.probing) {
                (Some(v), _) => Next::Known(v),
                (None, true) => Next::Busy,
                (None, false) => {
                    k.probing = true;
                    Next::Probe
                }
            }
        };
        match next {
            Next::Known(v) => v == Verdict::Validates,
            Next::Busy => false,
            Next::Probe => {
                let _probing = Probing(self.identity);
                let Some((verdict, why)) = self.probe_checksums() else {
                    return false;
                };
                let mut known = lock(&KNOWN);
                let k = entry(&mut known, self.identity);
                let before = k.verdict.map(|v| v.0);
                k.verdict = Some((verdict, Instant::now()));
                VALIDATES.store(gauge(Some(verdict)), Ordering::Relaxed);
                drop(known);
                if before != Some(verdict) {
                    (self.notice)(&format!(
                        "flowarchive: S3 store {} bucket {}: {why}",
                        self.endpoint.origin().ascii_serialization(),
                        self.bucket.name()
                    ));
                }
                verdict == Verdict::Validates
            }
        }
    }

    /// Sends the checksum probe: its verdict and the reason said in the log, or `None` when its answer
    /// decides nothing.
    fn probe_checksums(&self) -> Option<(Verdict, String)> {
        PROBES.fetch_add(1, Ordering::Relaxed);
        let key = self.probe_key();
        let digests = Digests {
            md5_b64: B64.encode(md5(PROBE_BODY)),
            sha_b64: B64.encode(sha256(b"not the probe body")),
            sha_hex: hex(&sha256(PROBE_BODY)),
        };
        super::throttle(PROBE_BODY.len(), self.upload_bytes_per_sec);
        let answer = self.request(|agent, creds| {
            let put = self.put_request(agent, creds, &key, &digests);
            match put.send_bytes(PROBE_BODY) {
                Ok(r) => success("PUT", &key, r).map(|_| Answer::Stored),
                Err(ureq::Error::Status(400, r)) => {
                    let code = error_code(r);
                    match CHECKSUM_MISMATCH.contains(&code.as_str()) {
                        true => Ok(Answer::Refused),
                        false => Err(status_error("PUT", &key, 400, &code)),
                    }
                }
                Err(e) => Err(request_error("PUT", &key, e)),
            }
        });
        const HEAD: &str = "verify auto proves every upload with a HEAD";
        match answer {
            Ok(Answer::Refused) => Some((
                Verdict::Validates,
                "refused a PUT whose x-amz-checksum-sha256 did not match its body: it validates \
                 checksums, so verify auto takes the checksum a PUT's answer echoes as its proof"
                    .into(),
            )),
            Ok(Answer::Stored) => {
                let removed = match self.delete(&key) {
                    Ok(()) => "removed".to_string(),
                    Err(e) => format!("not removed: {e}"),
                };
                Some((
                    Verdict::NotProven,
                    format!(
                        "stored a PUT whose x-amz-checksum-sha256 did not match its body: it does \
                         not validate checksums, so {HEAD} (scratch object {key} {removed})"
                    ),
                ))
            }
            Err(e) if e.kind == FailureKind::Rejected => Some((
                Verdict::NotProven,
                format!("the checksum probe was refused ({e}): not proven to validate checksums, so {HEAD}"),
            )),
            Err(_) => None,
        }
    }

    /// A fresh scratch key under the configured prefix, never a flow's (see [`PROBE_FOLDER`]).
    fn probe_key(&self) -> String {
        let folder = match self.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        format!(
            "{folder}{PROBE_FOLDER}checksum-probe-{:016x}{:016x}",
            retry::random(),
            retry::random()
        )
    }

    /// Proves the bucket exists (see the module's notes) and remembers the store.
    fn prove_bucket(&self) -> Result<(), StoreError> {
        let name = self.bucket.name().to_string();
        self.request(|agent, creds| {
            let url = self.bucket.head_bucket(Some(creds)).sign(self.expires);
            match agent.head(url.as_str()).timeout(self.timeout).call() {
                Ok(r) => success("HEAD bucket", &name, r).map(|_| ()),
                Err(ureq::Error::Status(403, _)) => Ok(()),
                Err(ureq::Error::Status(404, _)) => Err(fail(
                    FailureKind::Missing,
                    format!(
                        "bucket {name:?} does not exist (HTTP 404); flowarchive never creates one, \
                         check flowarchive.bucket"
                    ),
                )),
                Err(e) => Err(request_error("HEAD bucket", &name, e)),
            }
        })?;
        entry(&mut lock(&KNOWN), self.identity);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout;

    #[test]
    fn probe_keys_are_fresh_and_never_a_flows_key() {
        let store = Store::new(&crate::s3::tests::settings()).unwrap();
        let (a, b) = (store.probe_key(), store.probe_key());
        assert_ne!(a, b);
        assert!(a.starts_with("_flowarchive/checksum-probe-"), "{a}");
        for prefix in ["", "p", "p/q"] {
            let store = Store {
                prefix: prefix.into(),
                ..Store::new(&crate::s3::tests::settings()).unwrap()
            };
            let key = store.probe_key();
            for db in 0..16 {
                let flows = layout::object_folder(prefix, db) + "flows/";
                assert!(!key.starts_with(&flows), "{key} under {flows}");
            }
            let location = format!("s3://b/{key}");
            assert!(layout::split_location(&location, "x").is_none(), "{key}");
        }
    }

    #[test]
    fn every_setting_that_changes_the_store_changes_its_identity() {
        // A host name, so virtual-host addressing can be built too.
        let settings = || S3Settings {
            endpoint: "http://store.test:9".into(),
            ..crate::s3::tests::settings()
        };
        let base = settings();
        let id = |s: &S3Settings| Store::new(s).unwrap().identity;
        type Change = fn(&mut S3Settings);
        let changes: [(&str, Change); 13] = [
            ("endpoint", |s| s.endpoint = "http://store.test:10".into()),
            ("region", |s| s.region = "eu-west-1".into()),
            ("path-style", |s| s.path_style = false),
            ("bucket", |s| s.bucket = "other".into()),
            ("prefix", |s| s.prefix = "p".into()),
            ("credentials", |s| {
                s.credentials.pin = Some(crate::s3::credentials::Source::Imds)
            }),
            ("access-key", |s| {
                s.credentials.access_key = "AKIDOTHER".into()
            }),
            ("secret", |s| s.credentials.secret_key.0.push('x')),
            ("tls-ca-file", |s| {
                s.credentials.tls_ca_file = "/ca.pem".into()
            }),
            ("checksum", |s| s.checksum = Checksum::Md5),
            ("sse", |s| s.sse = crate::s3::Sse::Aes256),
            ("sse-kms-key-id", |s| s.sse_kms_key_id = "k".into()),
            ("storage-class", |s| s.storage_class = "STANDARD_IA".into()),
        ];
        for (what, change) in changes {
            let mut s = settings();
            change(&mut s);
            assert_ne!(id(&s), id(&base), "{what}");
        }
        // The same store whatever the way to it is tuned, and whatever the verify mode.
        let mut same = settings();
        same.timeout_ms = 5;
        same.verify = VerifyMode::Head;
        same.object_name_max = 300;
        same.retry.attempts = 3;
        assert_eq!(id(&same), id(&base));
    }

    /// SeaweedFS validates checksums: the probe is refused and stores nothing, `auto` then trusts the
    /// PUT's echo, and `head`, `checksum md5` and `put-response` do as they say without a probe.
    #[test]
    #[ignore = "needs the test bed's SeaweedFS; scripts/test.sh runs it"]
    fn seaweedfs_refuses_the_probe_so_auto_trusts_its_echo() {
        let (mut s, prefix) = crate::s3::tests::seaweedfs_settings();
        s.prefix = prefix;
        let verdict = |s: &S3Settings| {
            let store = Store::new(s).unwrap();
            let known = lock(&KNOWN);
            let k = known.iter().find(|k| k.store == store.identity);
            k.and_then(|k| k.verdict).map(|(v, _)| v)
        };
        for (verify, checksum, echo_proves) in [
            (VerifyMode::Head, Checksum::Sha256, false),
            (VerifyMode::Auto, Checksum::Md5, false),
            (VerifyMode::PutResponse, Checksum::Sha256, true),
        ] {
            s.verify = verify;
            s.checksum = checksum;
            assert_eq!(Store::new(&s).unwrap().prove().unwrap(), echo_proves);
            assert_eq!(verdict(&s), None, "{verify:?} {checksum:?}: no probe");
        }
        s.verify = VerifyMode::Auto;
        s.checksum = Checksum::Sha256;
        let store = Store::new(&s).unwrap();
        let (verdict_found, why) = store.probe_checksums().expect("a verdict");
        assert_eq!(verdict_found, Verdict::Validates, "{why}");
        assert!(store.prove().unwrap());
        assert_eq!(verdict(&s), Some(Verdict::Validates));
        // Nothing was stored: the probe's folder is empty.
        let url = {
            let creds = crate::s3::credentials::current(&store.credentials, Duration::from_secs(1))
                .unwrap()
                .signing();
            let mut list = store.bucket.list_objects_v2(Some(&creds));
            list.with_prefix(format!("{}/{PROBE_FOLDER}", s.prefix));
            list.sign(Duration::from_secs(60))
        };
        let agent = crate::s3::http::agent(&store.endpoint, "").unwrap();
        let listing = agent
            .get(url.as_str())
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert!(!listing.contains("<Key>"), "{listing}");
    }
}
