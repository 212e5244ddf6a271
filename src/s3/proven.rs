//! What the module proves of an S3 store before it uploads into it, remembered per store.
//!
//! A store is everything that decides where a PUT lands and how it is handled: the endpoint, region,
//! addressing style, bucket, prefix, credentials, trusted CA, checksum mode, encryption and storage
//! class ([`identity`]). The settings are rebuilt at every config change and a change of any of these
//! gives another identity, so a changed store is proven again; timeouts, retries, the rate cap and the
//! `verify` mode itself leave the store as it was. Three things are proven, in this order:
//!
//! - **The bucket exists**, before the first upload into it. Some stores (SeaweedFS) create a missing
//!   bucket on PUT, so a mistyped bucket would otherwise receive archives that reads then refuse. `200`
//!   or `403` (the bucket exists, listing it is not allowed) prove it; `404` refuses every upload.
//! - **The store writes once**, before every upload under any `verify` mode. Every upload carries
//!   `If-None-Match: *`, and a store that ignores it lets one archive replace another at its key: one
//!   another server sharing the bucket has indexed, or one written before a failover lost its commit.
//!   The probe PUTs a scratch object twice with an upload's own headers. The second PUT refused as a
//!   precondition failure (412, or 409 `ConditionalRequestConflict`) proves the store writes once.
//!   Taken, it proves the store does not, and nothing is uploaded into it: every upload fails
//!   `s3_not_write_once` and its flow stays live. A store that forbids the probe (403 for a key its
//!   policy does not allow) is not proven either way, and uploads go on relying on the header, as
//!   they did before the probe; but a store once found to overwrite stays refused until a probe finds
//!   it writing once. While one worker probes, the others wait for its verdict (and fail with the
//!   probe when it decides nothing), as long as the probe's requests may take by the settings it was
//!   sent with. Verdicts are kept in memory: a restart or a reload probes every store again.
//! - **The store validates checksums** (`verify auto` under `checksum sha256`). A PUT's echo of
//!   `x-amz-checksum-sha256` proves an upload only when the store computed the checksum of the bytes it
//!   received and compared it with ours; a store that records the client's value unchecked (moto does
//!   when the SDK's checksum-algorithm header comes with the PUT) echoes it for any bytes. The probe
//!   is a PUT of a scratch object with an upload's own headers, a correct `Content-MD5` and a wrong
//!   sha256 checksum. Refused as a checksum mismatch (400 `BadDigest` from AWS S3 and SeaweedFS,
//!   `XAmzContentChecksumMismatch` from MinIO), it proves the store validates: the PUT's echo is then
//!   proof and the HEAD is saved. Stored, it proves the store does not: the scratch object is removed
//!   and every upload is proven by a HEAD. Any other refusal (403 for a key the policy does not
//!   allow...) proves nothing, so HEAD too. While one worker probes, the others' uploads take the HEAD.
//!
//! Every probe runs only once the bucket is proven (a PUT would create a missing one), its scratch
//! object is removed once its verdict is recorded (a removal that fails is said in the log), and its
//! few bytes are not held to the upload rate cap. A probe PUT attempt that got no answer (a timeout,
//! a lost connection) may still be stored after the removal, until its URL expires: its key is
//! removed again at the store's first upload after that. A probe whose answer decides nothing (no
//! connection, 5xx after the retries) is
//! not remembered: that upload fails (write-once) or takes the HEAD (checksums), and the next one
//! probes again. A verdict stands for an hour, then the store is probed again: the store behind an
//! endpoint can change without any config changing. Each verdict that differs from the store's last
//! one is said once in the log, at notice.

use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rusty_s3::S3Action;

use super::errors::{error_code, request_error, status_error, success};
use super::{
    fail, retry, Checksum, Digests, FailureKind, S3Settings, Store, StoreError, VerifyMode,
};
use crate::digest::{sha256, sha256_of_parts};
use crate::sync::lock;

/// How long a verdict stands before the store is probed again.
const VERDICT_TTL: Duration = Duration::from_secs(3600);
/// Stores remembered at most; past it the list starts anew (and each store is proven again).
const MAX_STORES: usize = 64;
/// Scratch keys a store keeps to remove again at most (probes are hourly; more is a store that
/// loses answers all day, whose leftovers the log names).
const MAX_LINGERING: usize = 8;
/// The scratch objects' folder under the configured prefix. Flow objects live under `flows/` or
/// `db<n>/flows/` of the prefix (`layout::object_key`), so no flow's key starts with it.
const PROBE_FOLDER: &str = "_flowarchive/";
/// The checksum probe's body; its checksum is signed as the sha256 of other bytes.
const CHECKSUM_BODY: &[u8] =
    b"flowarchive checksum probe: x-amz-checksum-sha256 names other bytes\n";
/// The write-once probe's body, sent twice to one key.
const WRITE_ONCE_BODY: &[u8] = b"flowarchive write-once probe: a second PUT must be refused\n";
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
    sha256_of_parts(parts)
}

/// Whether a store validates checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Checksums {
    /// The store refused a body whose checksum did not match it.
    Validated,
    /// The store stored it, or refused it for another reason.
    NotProven,
}

/// Whether a store writes once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteOnce {
    /// The store refused to replace the scratch object under `If-None-Match: *`.
    Honoured,
    /// The store replaced it: nothing is uploaded into this store.
    Ignored,
    /// The store refused the probe itself: uploads rely on the header, unproven.
    Unproven,
}

/// One thing proven of a store: its verdict and when it was reached, and while a worker is probing
/// for it, when every request of that probe will have ended (under the prober's own settings, which
/// a waiter's may not share: a timeout changed since is the same store).
struct Fact<V> {
    verdict: Option<(V, Instant)>,
    probing: Option<Instant>,
}

impl<V: Copy> Fact<V> {
    const UNKNOWN: Fact<V> = Fact {
        verdict: None,
        probing: None,
    };

    /// The verdict while it stands (reached less than [`VERDICT_TTL`] ago).
    fn standing(&self) -> Option<V> {
        self.verdict
            .filter(|(_, at)| at.elapsed() < VERDICT_TTL)
            .map(|(v, _)| v)
    }
}

/// What is known of one store whose bucket is proven.
struct Known {
    store: Identity,
    checksums: Fact<Checksums>,
    write_once: Fact<WriteOnce>,
    /// Scratch keys removed while an attempt of their PUT that was given up on could still reach the
    /// store, each with when its URL expires: removed again at the first upload after that.
    lingering: Vec<(String, Instant)>,
}

/// A verdict kept per store: where [`Known`] keeps it, and its INFO gauge.
trait Verdict: Copy + PartialEq + 'static {
    /// The probe's name, in its scratch key and the log.
    const PROBE: &'static str;
    fn fact(k: &mut Known) -> &mut Fact<Self>;
    /// The gauge of the store of the latest upload.
    fn gauge() -> &'static AtomicI64;
    /// The gauge's value for a verdict, or for none standing.
    fn value(verdict: Option<Self>) -> i64;
    /// The verdict to record when a probe finds `self` after `before`.
    fn after(self, _before: Option<Self>) -> Self {
        self
    }
}

impl Verdict for Checksums {
    const PROBE: &'static str = "checksum";
    fn fact(k: &mut Known) -> &mut Fact<Self> {
        &mut k.checksums
    }
    fn gauge() -> &'static AtomicI64 {
        &VALIDATES
    }
    fn value(verdict: Option<Self>) -> i64 {
        match verdict {
            Some(Checksums::Validated) => 1,
            Some(Checksums::NotProven) => 0,
            None => -1,
        }
    }
}

impl Verdict for WriteOnce {
    const PROBE: &'static str = "write-once";
    fn fact(k: &mut Known) -> &mut Fact<Self> {
        &mut k.write_once
    }
    fn gauge() -> &'static AtomicI64 {
        &WRITES_ONCE
    }
    fn value(verdict: Option<Self>) -> i64 {
        match verdict {
            Some(WriteOnce::Honoured) => 1,
            Some(WriteOnce::Ignored) => 0,
            Some(WriteOnce::Unproven) | None => -1,
        }
    }
    /// A store found to overwrite is refused until a probe finds it writing once: a probe it
    /// forbids proves nothing either way.
    fn after(self, before: Option<Self>) -> Self {
        match (self, before) {
            (WriteOnce::Unproven, Some(WriteOnce::Ignored)) => WriteOnce::Ignored,
            _ => self,
        }
    }
}

/// Every store whose bucket is proven.
static KNOWN: Mutex<Vec<Known>> = Mutex::new(Vec::new());
/// Told whenever a probe ends, however: workers waiting for another's verdict look again.
static PROBED: Condvar = Condvar::new();
/// Checksum probes sent.
static CHECKSUM_PROBES: AtomicU64 = AtomicU64::new(0);
/// Write-once probes sent.
static WRITE_ONCE_PROBES: AtomicU64 = AtomicU64::new(0);
/// Uploads proven by the PUT's own answer, without a HEAD.
static HEADS_SAVED: AtomicU64 = AtomicU64::new(0);
/// Whether the store of the latest upload validates checksums: 1, 0 (not proven), -1 (no verdict
/// stands: not probed yet, or the probe decided nothing).
static VALIDATES: AtomicI64 = AtomicI64::new(-1);
/// Whether the store of the latest upload writes once: 1, 0 (it does not: uploads are refused), -1
/// (no verdict stands, or the store refused the probe).
static WRITES_ONCE: AtomicI64 = AtomicI64::new(-1);

/// The INFO fields of this file: `s3_store_validates_checksums` (1, 0, -1), `s3_checksum_probes`,
/// `s3_store_writes_once` (1, 0, -1), `s3_write_once_probes` and `s3_heads_saved`.
pub(super) fn info_fields() -> [(&'static str, i64); 5] {
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed) as i64;
    [
        (
            "s3_store_validates_checksums",
            VALIDATES.load(Ordering::Relaxed),
        ),
        ("s3_checksum_probes", count(&CHECKSUM_PROBES)),
        ("s3_store_writes_once", WRITES_ONCE.load(Ordering::Relaxed)),
        ("s3_write_once_probes", count(&WRITE_ONCE_PROBES)),
        ("s3_heads_saved", count(&HEADS_SAVED)),
    ]
}

/// Counts an upload proven by its PUT's answer.
pub(super) fn head_saved() {
    HEADS_SAVED.fetch_add(1, Ordering::Relaxed);
}

/// What to do about one fact of a store, decided under the lock.
enum Next<V: Verdict> {
    /// A verdict that stands.
    Known(V),
    /// Another worker is probing.
    Busy,
    /// This worker probes.
    Probe(Probing<V>),
}

/// This worker probes a store for `V`: clears the `probing` flag and wakes the workers waiting for
/// the verdict however the probe ends.
struct Probing<V: Verdict>(Identity, std::marker::PhantomData<V>);

impl<V: Verdict> Drop for Probing<V> {
    fn drop(&mut self) {
        if let Some(k) = lock(&KNOWN).iter_mut().find(|k| k.store == self.0) {
            V::fact(k).probing = None;
        }
        PROBED.notify_all();
    }
}

/// The entry of `store`, added (nothing known of it yet) when missing. Past [`MAX_STORES`] the
/// oldest store no worker is probing is forgotten (and proven again at its next upload), the stores
/// found to overwrite last: forgotten, one would be probed again, and a probe it forbids proves
/// nothing.
fn entry(known: &mut Vec<Known>, store: Identity) -> &mut Known {
    let at = match known.iter().position(|k| k.store == store) {
        Some(at) => at,
        None => {
            let idle = |k: &&Known| k.checksums.probing.is_none() && k.write_once.probing.is_none();
            let overwrites =
                |k: &&Known| k.write_once.verdict.map(|v| v.0) == Some(WriteOnce::Ignored);
            if known.len() >= MAX_STORES {
                let mut idle = known.iter().enumerate().filter(|(_, k)| idle(k));
                let forgotten = idle
                    .clone()
                    .find(|(_, k)| !overwrites(k))
                    .or_else(|| idle.next())
                    .map(|(at, _)| at);
                if let Some(at) = forgotten {
                    known.remove(at);
                }
            }
            known.push(Known {
                store,
                checksums: Fact::UNKNOWN,
                write_once: Fact::UNKNOWN,
                lingering: Vec::new(),
            });
            known.len() - 1
        }
    };
    &mut known[at]
}

/// Notes in `unanswered` a probe PUT attempt that got no answer: it may still reach the store after
/// the probe ends ([`Scratch`]).
fn note_unanswered(sent: &Result<ureq::Response, ureq::Error>, unanswered: &Cell<bool>) {
    if matches!(sent, Err(ureq::Error::Transport(_))) {
        unanswered.set(true);
    }
}

/// How a probe's PUT was answered.
enum Answer {
    /// Stored.
    Stored,
    /// Refused as a checksum mismatch (the checksum probe), or as a precondition failure (the
    /// write-once probe's second PUT).
    Refused,
    /// Forbidden (403): the write-once probe proves nothing either way.
    Forbidden(StoreError),
}

/// A probe's scratch object, removed (best effort) when dropped, however the probe ends; a removal
/// that fails is said in the log. Its key is cleared where the store stored nothing. When an attempt
/// of its PUT got no answer (`unanswered`: a timeout, a connection lost), that attempt may still
/// reach the store after the removal (a proxy that sends a request on once its client has gone),
/// until its URL expires: the key is removed again at the first upload after that.
struct Scratch<'s> {
    store: &'s Store,
    key: String,
    unanswered: Cell<bool>,
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if self.key.is_empty() {
            return;
        }
        self.store.remove_scratch(&self.key);
        if !self.unanswered.get() {
            return;
        }
        let due = Instant::now() + self.store.expires;
        let mut known = lock(&KNOWN);
        let Some(k) = known.iter_mut().find(|k| k.store == self.store.identity) else {
            return;
        };
        if k.lingering.len() < MAX_LINGERING {
            k.lingering.push((std::mem::take(&mut self.key), due));
            return;
        }
        drop(known);
        self.store.say(&format!(
            "a probe's scratch object {} may be stored again by a PUT that got no answer, and is not removed again (too many such objects)",
            self.key
        ));
    }
}

impl Store {
    /// Proves what an upload into this store needs before its PUT (the bucket exists; the store
    /// writes once; under `verify auto`, whether the store validates checksums), and says whether the
    /// PUT's checksum echo may prove the upload; otherwise a HEAD must.
    pub(super) fn prove(&self) -> Result<bool, StoreError> {
        let (bucket_known, due) = {
            let mut known = lock(&KNOWN);
            match known.iter_mut().find(|k| k.store == self.identity) {
                Some(k) => {
                    let now = Instant::now();
                    let (due, later) = k.lingering.drain(..).partition(|(_, at)| *at <= now);
                    k.lingering = later;
                    (true, due)
                }
                None => (false, Vec::new()),
            }
        };
        for (key, _) in due {
            self.remove_scratch(&key);
        }
        if !bucket_known {
            self.prove_bucket()?;
        }
        self.writes_once()?;
        Ok(match (self.verify, self.checksum) {
            (VerifyMode::Auto, Checksum::Sha256) => self.validates_checksums(),
            (mode, _) => {
                let standing = lock(&KNOWN)
                    .iter_mut()
                    .find(|k| k.store == self.identity)
                    .and_then(|k| k.checksums.standing());
                VALIDATES.store(Checksums::value(standing), Ordering::Relaxed);
                mode == VerifyMode::PutResponse
            }
        })
    }

    /// Proves the store writes once, probing it first when no verdict stands (or waiting for the
    /// worker probing it); an error when it does not, or when no verdict could be had.
    fn writes_once(&self) -> Result<(), StoreError> {
        let verdict = match self.next::<WriteOnce>() {
            Next::Known(v) => v,
            Next::Busy => self.awaited::<WriteOnce>()?,
            Next::Probe(probing) => {
                let (found, why, scratch) = self.probe_write_once()?;
                let v = self.settle(found, &why);
                // The waiting uploads go on with the verdict; the scratch object is removed after.
                drop(probing);
                drop(scratch);
                v
            }
        };
        match verdict {
            WriteOnce::Ignored => Err(fail(
                FailureKind::NotWriteOnce,
                "the S3 store replaced an object a PUT with If-None-Match: * must not replace, so \
                 an archive there could be replaced by another: nothing is uploaded into it (the \
                 server log says when this was found)"
                    .into(),
            )),
            WriteOnce::Honoured | WriteOnce::Unproven => Ok(()),
        }
    }

    /// Whether this store is proven to validate checksums, probing it first when no verdict stands.
    /// While another worker probes, not proven.
    fn validates_checksums(&self) -> bool {
        let verdict = match self.next::<Checksums>() {
            Next::Known(v) => v,
            Next::Busy => return false,
            Next::Probe(_probing) => {
                let Some((v, why)) = self.probe_checksums() else {
                    return false;
                };
                self.settle(v, &why)
            }
        };
        verdict == Checksums::Validated
    }

    /// The standing `V` of this store, or whether another worker is probing for it, or else the
    /// probe this worker is to send. Sets the gauge to what stands.
    fn next<V: Verdict>(&self) -> Next<V> {
        let mut known = lock(&KNOWN);
        let fact = V::fact(entry(&mut known, self.identity));
        let standing = fact.standing();
        V::gauge().store(V::value(standing), Ordering::Relaxed);
        match (standing, fact.probing) {
            (Some(v), _) => Next::Known(v),
            (None, Some(_)) => Next::Busy,
            (None, None) => {
                // Two PUTs and a DELETE, each with its retries; an attempt may wait on the
                // credentials as long as on the store.
                let longest = 3 * (self.retry.total + 2 * self.timeout);
                fact.probing = Some(Instant::now() + longest);
                Next::Probe(Probing(self.identity, std::marker::PhantomData))
            }
        }
    }

    /// The `V` another worker's probe reached, once it ends: an error when it decided nothing, or
    /// when it outlasts every request it may send (by its prober's settings). A probe another worker
    /// begins once that one ended is waited for only within that time.
    fn awaited<V: Verdict>(&self) -> Result<V, StoreError> {
        fn mine<V: Verdict>(known: &mut [Known], store: Identity) -> Option<&mut Fact<V>> {
            known.iter_mut().find(|k| k.store == store).map(V::fact)
        }
        let mut known = lock(&KNOWN);
        if let Some(until) = mine::<V>(&mut known, self.identity).and_then(|f| f.probing) {
            while mine::<V>(&mut known, self.identity).is_some_and(|f| f.probing.is_some()) {
                let Some(left) = until.checked_duration_since(Instant::now()) else {
                    break;
                };
                known = PROBED
                    .wait_timeout(known, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        let standing = mine::<V>(&mut known, self.identity).and_then(|fact| fact.standing());
        V::gauge().store(V::value(standing), Ordering::Relaxed);
        standing.ok_or_else(|| {
            fail(
                FailureKind::Unreachable,
                format!(
                    "the S3 store's {} probe (another upload's) reached no verdict",
                    V::PROBE
                ),
            )
        })
    }

    /// Records the verdict a probe of this worker's leads to (`Verdict::after`), says the probe's
    /// finding in the log when it differs from the store's last verdict, and returns the verdict.
    fn settle<V: Verdict>(&self, found: V, why: &str) -> V {
        let mut known = lock(&KNOWN);
        let fact = V::fact(entry(&mut known, self.identity));
        let before = fact.verdict.map(|(v, _)| v);
        let verdict = found.after(before);
        fact.verdict = Some((verdict, Instant::now()));
        V::gauge().store(V::value(Some(verdict)), Ordering::Relaxed);
        drop(known);
        if before != Some(verdict) {
            self.say(why);
        }
        verdict
    }

    /// Says `what` of this store in the server log, at notice.
    fn say(&self, what: &str) {
        (self.notice)(&format!(
            "flowarchive: S3 store {} bucket {}: {what}",
            self.endpoint.origin().ascii_serialization(),
            self.bucket.name()
        ));
    }

    /// Removes a probe's scratch object (best effort; a removal that fails is said in the log).
    fn remove_scratch(&self, key: &str) {
        if let Err(e) = self.delete(key) {
            self.say(&format!(
                "a probe's scratch object {key} was not removed: {e}"
            ));
        }
    }

    /// Sends the write-once probe: its finding, the reason said in the log, and its scratch object,
    /// removed when dropped (after the verdict is recorded); or the error of an answer that decides
    /// nothing.
    fn probe_write_once(&self) -> Result<(WriteOnce, String, Scratch<'_>), StoreError> {
        WRITE_ONCE_PROBES.fetch_add(1, Ordering::Relaxed);
        let mut scratch = Scratch {
            store: self,
            key: self.probe_key(WriteOnce::PROBE),
            unanswered: Cell::new(false),
        };
        let key = scratch.key.clone();
        let digests = Digests::of(WRITE_ONCE_BODY);
        let unanswered = &scratch.unanswered;
        let put = || {
            self.request(|agent, creds| {
                let put = self.put_request(agent, creds, &key, &digests);
                let sent = put.send_bytes(WRITE_ONCE_BODY);
                note_unanswered(&sent, unanswered);
                match sent {
                    Ok(r) => success("PUT", &key, r).map(|_| Answer::Stored),
                    Err(ureq::Error::Status(403, r)) => Ok(Answer::Forbidden(status_error(
                        "PUT",
                        &key,
                        403,
                        &error_code(r),
                    ))),
                    Err(e) => match request_error("PUT", &key, e) {
                        e if e.kind == FailureKind::Exists => Ok(Answer::Refused),
                        e => Err(e),
                    },
                }
            })
        };
        let unproven = |e: StoreError| {
            format!(
                "the write-once probe was forbidden ({e}): not proven to honour If-None-Match, so \
                 uploads rely on it unproven"
            )
        };
        // The first PUT refused as a precondition failure: an attempt of it whose answer was lost
        // stored it (the key is fresh), and the retry was refused as the second PUT must be.
        match put()? {
            Answer::Stored | Answer::Refused => {}
            Answer::Forbidden(e) => {
                scratch.key.clear();
                return Ok((WriteOnce::Unproven, unproven(e), scratch));
            }
        }
        let (found, why) = match put()? {
            Answer::Refused => (
                WriteOnce::Honoured,
                "refused a second PUT of an object under If-None-Match: *: it writes once".into(),
            ),
            Answer::Stored => (
                WriteOnce::Ignored,
                "replaced an object under If-None-Match: *: it does not write once, so an archive \
                 there could be replaced by another, and nothing is uploaded into it"
                    .into(),
            ),
            Answer::Forbidden(e) => (WriteOnce::Unproven, unproven(e)),
        };
        Ok((found, why, scratch))
    }

    /// Sends the checksum probe: its verdict and the reason said in the log, or `None` when its answer
    /// decides nothing.
    fn probe_checksums(&self) -> Option<(Checksums, String)> {
        CHECKSUM_PROBES.fetch_add(1, Ordering::Relaxed);
        let mut scratch = Scratch {
            store: self,
            key: self.probe_key(Checksums::PROBE),
            unanswered: Cell::new(false),
        };
        let key = scratch.key.clone();
        let digests = Digests {
            sha_b64: B64.encode(sha256(b"not the probe body")),
            ..Digests::of(CHECKSUM_BODY)
        };
        let unanswered = &scratch.unanswered;
        let answer = self.request(|agent, creds| {
            let put = self.put_request(agent, creds, &key, &digests);
            let sent = put.send_bytes(CHECKSUM_BODY);
            note_unanswered(&sent, unanswered);
            match sent {
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
            Ok(Answer::Refused) => {
                // Refused as a mismatch: nothing was stored.
                scratch.key.clear();
                Some((
                    Checksums::Validated,
                    "refused a PUT whose x-amz-checksum-sha256 did not match its body: it \
                     validates checksums, so verify auto takes the checksum a PUT's answer echoes \
                     as its proof"
                        .into(),
                ))
            }
            Ok(Answer::Stored) => Some((
                Checksums::NotProven,
                format!(
                    "stored a PUT whose x-amz-checksum-sha256 did not match its body: it does \
                     not validate checksums, so {HEAD}"
                ),
            )),
            Err(e) if e.kind == FailureKind::Rejected => {
                scratch.key.clear();
                Some((
                    Checksums::NotProven,
                    format!(
                        "the checksum probe was refused ({e}): not proven to validate checksums, \
                         so {HEAD}"
                    ),
                ))
            }
            Ok(Answer::Forbidden(_)) | Err(_) => None,
        }
    }

    /// A fresh scratch key for the `what` probe under the configured prefix, never a flow's (see
    /// [`PROBE_FOLDER`]).
    fn probe_key(&self, what: &str) -> String {
        let folder = match self.prefix.as_str() {
            "" => String::new(),
            p => format!("{p}/"),
        };
        format!(
            "{folder}{PROBE_FOLDER}{what}-probe-{:016x}{:016x}",
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
        let (a, b) = (store.probe_key("checksum"), store.probe_key("checksum"));
        assert_ne!(a, b);
        assert!(a.starts_with("_flowarchive/checksum-probe-"), "{a}");
        let c = store.probe_key(WriteOnce::PROBE);
        assert!(c.starts_with("_flowarchive/write-once-probe-"), "{c}");
        for prefix in ["", "p", "p/q"] {
            let store = Store {
                prefix: prefix.into(),
                ..Store::new(&crate::s3::tests::settings()).unwrap()
            };
            let key = store.probe_key(WriteOnce::PROBE);
            for db in 0..16 {
                let flows = layout::object_folder(prefix, db) + "flows/";
                assert!(!key.starts_with(&flows), "{key} under {flows}");
            }
            let location = format!("s3://b/{key}");
            assert!(layout::split_location(&location, "x").is_none(), "{key}");
        }
    }

    /// Past the stores remembered, the oldest idle one is forgotten: never one being probed (its
    /// waiters look for it), and one found to overwrite only when every other idle one is.
    #[test]
    fn stores_being_probed_or_found_to_overwrite_are_forgotten_last() {
        let id = |n: u8| [n; 32];
        let mut known = Vec::new();
        for n in 0..MAX_STORES as u8 {
            entry(&mut known, id(n));
        }
        entry(&mut known, id(0)).write_once.probing = Some(Instant::now());
        entry(&mut known, id(1)).write_once.verdict = Some((WriteOnce::Ignored, Instant::now()));
        entry(&mut known, id(200));
        let kept = |known: &Vec<Known>, n| known.iter().any(|k| k.store == id(n));
        assert!(kept(&known, 0) && kept(&known, 1) && !kept(&known, 2));
        assert_eq!(known.len(), MAX_STORES);
        for n in 201..=255 {
            entry(&mut known, id(n));
        }
        entry(&mut known, id(100));
        assert!(kept(&known, 0) && kept(&known, 1));
        // Every other store being probed, the overwriting one is the only idle one: it goes.
        for k in known
            .iter_mut()
            .filter(|k| k.store != id(0) && k.store != id(1))
        {
            k.checksums.probing = Some(Instant::now());
        }
        entry(&mut known, id(101));
        assert!(
            kept(&known, 0) && !kept(&known, 1),
            "the overwriting one goes last"
        );
    }

    /// A store found to overwrite stays refused when a later probe is forbidden; only a probe that
    /// finds it writing once lifts it.
    #[test]
    fn only_a_store_found_writing_once_is_no_longer_refused() {
        use WriteOnce::*;
        assert_eq!(Unproven.after(Some(Ignored)), Ignored);
        assert_eq!(Honoured.after(Some(Ignored)), Honoured);
        assert_eq!(Unproven.after(Some(Honoured)), Unproven);
        assert_eq!(Unproven.after(None), Unproven);
        assert_eq!(Ignored.after(Some(Honoured)), Ignored);
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
    /// PUT's echo, and `head`, `checksum md5` and `put-response` do as they say without a probe. It
    /// writes once, which the first upload's proof finds under every mode; both probes leave nothing.
    #[test]
    #[ignore = "needs the test bed's SeaweedFS; scripts/test.sh runs it"]
    fn seaweedfs_refuses_the_probes_so_auto_trusts_its_echo() {
        let (mut s, prefix) = crate::s3::tests::seaweedfs_settings();
        s.prefix = prefix;
        let verdict = |s: &S3Settings| {
            let store = Store::new(s).unwrap();
            let known = lock(&KNOWN);
            let k = known.iter().find(|k| k.store == store.identity);
            k.and_then(|k| k.checksums.verdict).map(|(v, _)| v)
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
            let store = Store::new(&s).unwrap();
            let known = lock(&KNOWN);
            let k = known.iter().find(|k| k.store == store.identity).unwrap();
            assert_eq!(k.write_once.standing(), Some(WriteOnce::Honoured));
        }
        s.verify = VerifyMode::Auto;
        s.checksum = Checksum::Sha256;
        let store = Store::new(&s).unwrap();
        let (verdict_found, why) = store.probe_checksums().expect("a verdict");
        assert_eq!(verdict_found, Checksums::Validated, "{why}");
        assert!(store.prove().unwrap());
        assert_eq!(verdict(&s), Some(Checksums::Validated));
        // Nothing stays: the probes' folder is empty.
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
