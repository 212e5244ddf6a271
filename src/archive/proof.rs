//! The commit's proof that the flow in Valkey is still the flow in the archive.
//!
//! What the archive holds of the flow's own keys (snapshot, sequence, labels, event log) is kept once
//! the object is encoded, off the main thread: the small keys framed as one run of bytes, and the
//! event log as it was read, each up to `KEEP_BYTES` (a larger one hashed). The commit reads the same
//! keys again in its own main-thread step and deletes only on equality: each compared byte for byte
//! with what was kept (or hashed the same way), stopping at its first difference. A late
//! event, an edited or trimmed log, a new snapshot or label, a rename over a key, an expiry, an
//! eviction, a flush or a swap each change what the keys hold, so each stops the delete; a rewrite to
//! the very same content does not, and loses nothing: what is deleted is exactly what the archive
//! holds. No hook on the server's writes is needed, so the server's own writes pay nothing for it (see
//! `runtime::watch`).
//!
//! An event log read over several steps is too long to read again in one, and so is one read in one
//! step past `KEEP_BYTES` (`comparable`): it is compared by its length only, and its watch follows
//! every write to it from the capture's first step to the commit.
//! So is a snapshot larger than one step reads (`mainthread::WHOLE_BYTES`), whose watch also follows
//! string writes: it is measured at commit, and framed with the small keys as if absent. And a labels
//! hash larger than one step reads, whose watch also follows hash writes: its fields are counted at
//! commit, and framed as none.

use std::ops::ControlFlow;

use redis_module::{Context, KeyType};
use sha2::{Digest, Sha256};

use crate::archive::capture::{found_labels, read_seq};
use crate::archive::judge::{self, Found};
use crate::format::captured::Captured;
use crate::format::event_log::EventLog;
use crate::ops::errors::FlowError;
use crate::ops::metrics::Buffered;
use crate::runtime::key::Key;
use crate::runtime::server::with_string;

/// A whole log, or the small keys' framed bytes, of at most this many bytes is kept for the commit to
/// compare byte for byte (cheaper on the main thread than hashing it again). Larger small keys are
/// hashed, so that an upload does not hold two copies of a large flow; a larger log is followed
/// instead (`comparable`).
const KEEP_BYTES: u64 = 1 << 20;

/// Whether the commit compares a log of `bytes` read whole in one step byte for byte. A larger one
/// (one step reads on past its last MiB to the end of the event it is in, which may be far larger)
/// is followed by the watch from the step that read it, as a log read in steps is, and measured at
/// commit: reading and hashing it again would hold the commit's one step for as long as the capture.
pub fn comparable(bytes: usize) -> bool {
    bytes as u64 <= KEEP_BYTES
}

/// What the archive holds of a flow's own keys, for the commit to compare with what Valkey holds.
pub struct Fingerprint {
    /// The small keys (snapshot, sequence, labels), as `Parts::small` frames them.
    small: Small,
    /// The snapshot's length, if the flow has one: compared before its bytes (the upload frees the
    /// captured snapshot once this is taken).
    snapshot: Option<usize>,
    /// Whether the snapshot is followed by the watch: compared by its length only, its bytes not framed.
    snapshot_followed: bool,
    /// Whether the labels hash is followed by the watch: compared by its field count only, its labels
    /// not framed.
    labels_followed: bool,
    log: Log,
}

/// The bytes of `snapshot` the small keys frame: none of a followed one (its watch and length prove it).
fn framed(snapshot: Option<&[u8]>, followed: bool) -> Option<&[u8]> {
    snapshot.filter(|_| !followed)
}

/// The labels the small keys frame: none of a followed hash (its watch and field count prove it).
fn framed_labels(labels: &[(String, String)], followed: bool) -> &[(String, String)] {
    if followed {
        &[]
    } else {
        labels
    }
}

/// What the archive holds of the small keys.
enum Small {
    /// Their framed bytes, counted as buffered while kept.
    Kept { bytes: Vec<u8>, _held: Buffered },
    /// Their framed bytes' hash, when there are more than `KEEP_BYTES`.
    Hash([u8; 32]),
}

impl Small {
    /// Frames the small keys with `frame`, keeping the bytes if there are at most `keep_bytes`.
    fn of(frame: impl Fn(&mut Parts), keep_bytes: Option<u64>) -> Small {
        let mut count = Parts(Sink::Count(0));
        frame(&mut count);
        let bytes = count.counted();
        if keep_bytes.is_some_and(|keep| bytes <= keep) {
            let mut kept = Parts(Sink::Keep(Vec::with_capacity(bytes as usize)));
            frame(&mut kept);
            let bytes = kept.kept();
            let _held = Buffered::hold(bytes.capacity() as u64);
            return Small::Kept { bytes, _held };
        }
        let mut hashed = Parts(Sink::Hash(Sha256::new()));
        frame(&mut hashed);
        Small::Hash(hashed.finish())
    }

    /// Whether `frame` frames exactly what this holds.
    fn matches(&self, frame: impl FnOnce(&mut Parts)) -> bool {
        match self {
            Small::Kept { bytes, .. } => {
                let mut compared = Parts(Sink::Compare {
                    kept: bytes,
                    at: 0,
                    same: true,
                });
                frame(&mut compared);
                matches!(compared.0, Sink::Compare { at, same: true, .. } if at == bytes.len())
            }
            Small::Hash(digest) => {
                let mut hashed = Parts(Sink::Hash(Sha256::new()));
                frame(&mut hashed);
                hashed.finish() == *digest
            }
        }
    }
}

/// What the archive holds of the event log.
enum Log {
    /// A log followed by its watch: its length.
    Length(usize),
    /// A whole log as read, counted as buffered while kept.
    Events { events: EventLog, _held: Buffered },
    /// A whole log too large to keep: its length and hash (`Parts::events`). The capture follows a
    /// log read whole past `KEEP_BYTES` instead (`comparable`), so only a smaller limit (the tests'
    /// `archived_keeping`) gives this form; it stays the sound answer should one ever come unfollowed.
    Hash(usize, [u8; 32]),
}

/// A fingerprint being framed: every part length-prefixed and every optional part tagged, so no two
/// contents frame alike.
struct Parts<'k>(Sink<'k>);

/// Where `Parts` puts the framed bytes.
enum Sink<'k> {
    /// Counts them.
    Count(u64),
    /// Keeps them.
    Keep(Vec<u8>),
    /// Compares them with bytes kept before: `same` while every byte so far equals the one at its place.
    Compare {
        kept: &'k [u8],
        at: usize,
        same: bool,
    },
    Hash(Sha256),
}

impl Parts<'_> {
    /// The flow's small keys.
    fn small(&mut self, snapshot: Option<&[u8]>, seq: Option<i64>, labels: &[(String, String)]) {
        self.part(snapshot.map_or(b"-", |_| b"+"));
        self.part(snapshot.unwrap_or_default());
        self.part(
            seq.map_or_else(|| "-".to_string(), |s| s.to_string())
                .as_bytes(),
        );
        // Compared as a set, whatever order they were read in.
        let mut labels: Vec<&(String, String)> = labels.iter().collect();
        labels.sort();
        self.part(&(labels.len() as u64).to_le_bytes());
        for (name, value) in labels {
            self.part(name.as_bytes());
            self.part(value.as_bytes());
        }
    }

    /// A log hashed: its length, then `n` calls to `part`.
    fn events(n: usize) -> Parts<'static> {
        let mut p = Parts(Sink::Hash(Sha256::new()));
        p.part(b"events");
        p.part(&(n as u64).to_le_bytes());
        p
    }

    fn part(&mut self, b: &[u8]) {
        self.put(&(b.len() as u64).to_le_bytes());
        self.put(b);
    }

    fn put(&mut self, b: &[u8]) {
        match &mut self.0 {
            Sink::Count(n) => *n += b.len() as u64,
            Sink::Keep(bytes) => bytes.extend_from_slice(b),
            Sink::Compare { kept, at, same } => {
                *same = *same && kept.get(*at..*at + b.len()) == Some(b);
                *at += b.len();
            }
            Sink::Hash(h) => h.update(b),
        }
    }

    /// The bytes a counting sink counted (none for the others).
    fn counted(&self) -> u64 {
        match self.0 {
            Sink::Count(n) => n,
            _ => 0,
        }
    }

    /// The bytes a keeping sink kept (none for the others).
    fn kept(self) -> Vec<u8> {
        match self.0 {
            Sink::Keep(bytes) => bytes,
            _ => Vec::new(),
        }
    }

    /// The hash of what was framed into a hashing sink (none for the others).
    fn finish(self) -> [u8; 32] {
        match self.0 {
            Sink::Hash(h) => h.finalize().into(),
            _ => [0; 32],
        }
    }
}

/// What the archive holds of `flow`, whose log (`events`, taken from the capture once it is encoded)
/// was read whole (`whole_log`) or followed, and whose snapshot (`snapshot_followed`) and labels hash
/// (`labels_followed`) are followed or compared.
pub fn archived(
    flow: &Captured,
    events: EventLog,
    whole_log: bool,
    snapshot_followed: bool,
    labels_followed: bool,
) -> Fingerprint {
    let followed = (snapshot_followed, labels_followed);
    archived_keeping(flow, events, whole_log, followed, Some(KEEP_BYTES))
}

/// `archived`, keeping a whole log of at most `keep_bytes` (`None`: hashing every log; the tests reach
/// both forms with it).
fn archived_keeping(
    flow: &Captured,
    events: EventLog,
    whole_log: bool,
    (snapshot_followed, labels_followed): (bool, bool),
    keep_bytes: Option<u64>,
) -> Fingerprint {
    let snapshot = framed(flow.snapshot.as_deref(), snapshot_followed);
    let labels = framed_labels(&flow.labels, labels_followed);
    let small = Small::of(|p| p.small(snapshot, flow.seq, labels), keep_bytes);
    let bytes = events.bytes() as u64;
    let log = match whole_log {
        false => Log::Length(events.len()),
        true if keep_bytes.is_some_and(|keep| bytes <= keep) => {
            let mut events = events;
            events.shrink_to_fit();
            Log::Events {
                _held: Buffered::hold(events.memory() as u64),
                events,
            }
        }
        true => {
            let mut parts = Parts::events(events.len());
            events.iter().for_each(|e| parts.part(e));
            Log::Hash(events.len(), parts.finish())
        }
    };
    Fingerprint {
        small,
        snapshot: flow.snapshot.as_ref().map(Vec::len),
        snapshot_followed,
        labels_followed,
        log,
    }
}

/// Whether Valkey holds now what the archive holds of `flow` (`archived`). Main thread, in the flow's
/// DB. Nothing grown since the capture is read: a label hash or snapshot of another size, or a whole
/// log of another length, differs without being read (a flood of writes cannot make the commit step
/// long), and a log, snapshot or labels hash followed by a watch is measured. So the step reads at
/// most what the capture read in its one step, comparing it where the server holds it.
pub fn unchanged(
    ctx: &Context,
    flow: &Captured,
    archived: &Fingerprint,
) -> Result<bool, FlowError> {
    let keys = &flow.keys;
    let hash = keys.labels.as_deref().map(|k| Key::open(ctx, k));
    if let Some(hash) = &hash {
        let fields = match hash.holds(&KeyType::Hash)? {
            true => hash.len(KeyType::Hash)?,
            false => 0,
        };
        if fields != flow.labels.len() {
            return Ok(false);
        }
    }
    // Labels grown past the captured ones' bytes differ, and are not read further; followed ones are
    // not read at all.
    let labels = match archived.labels_followed {
        true => Vec::new(),
        false => {
            let captured: usize = flow.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
            let found = found_labels(hash.as_ref(), captured as u64);
            let Some(labels) = judge::labels(Found::from(found), keys)? else {
                return Ok(false);
            };
            labels
        }
    };
    drop(hash);
    let seq = read_seq(ctx, keys)?;
    let small = with_string(ctx, &keys.snapshot, |snapshot| {
        snapshot.map(<[u8]>::len) == archived.snapshot
            && (archived.small)
                .matches(|p| p.small(framed(snapshot, archived.snapshot_followed), seq, &labels))
    });
    if !small {
        return Ok(false);
    }
    let events = Key::open(ctx, &keys.events);
    let length = events.len(KeyType::List)?;
    match &archived.log {
        Log::Length(n) => Ok(length == *n),
        Log::Events { events: kept, .. } if length == kept.len() => {
            let mut kept = kept.iter();
            let mut same = true;
            events.list_each(0, length, |e| {
                same = kept.next().is_some_and(|k| k == e);
                if same {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            })?;
            Ok(same && kept.next().is_none())
        }
        Log::Hash(n, digest) if length == *n => {
            let mut parts = Parts::events(length);
            events.list_each(0, length, |e| {
                parts.part(e);
                ControlFlow::Continue(())
            })?;
            Ok(parts.finish() == *digest)
        }
        Log::Events { .. } | Log::Hash(..) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    //! What the commit relies on, stated of [`archived`] from the outside: equal content gives equal
    //! fingerprints, every change the commit must see gives another one, and no two contents hash
    //! alike by how their parts are framed, whether the log is kept or hashed. [`unchanged`] computes
    //! the same parts from the server's keys (it needs a server): tests/change_proof.rs holds the two
    //! against each other there.

    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    use crate::format::reader::tests::proptest_config;
    use crate::layout::{FlowKeys, Layout};

    /// What a flow's own keys hold; the rest of a `Captured` is fixed.
    #[derive(Clone, Debug, PartialEq)]
    struct Content {
        events: Vec<Vec<u8>>,
        snapshot: Option<Vec<u8>>,
        seq: Option<i64>,
        /// A hash's fields and values, as read (in any order).
        labels: Vec<(String, String)>,
    }

    fn captured(c: &Content) -> Captured {
        Captured {
            id: "abc".into(),
            db: 0,
            keys: FlowKeys {
                lease: None,
                ..Layout::argyll().flow_keys("abc")
            },
            events: c.events.iter().collect(),
            snapshot: c.snapshot.clone(),
            seq: c.seq,
            labels: c.labels.clone(),
            status: "completed".into(),
            status_score: None,
            previous: None,
        }
    }

    /// What the commit compares of two fingerprints: the small keys' hash and the log, kept or hashed.
    impl PartialEq for Fingerprint {
        fn eq(&self, other: &Fingerprint) -> bool {
            let log = match (&self.log, &other.log) {
                (Log::Length(a), Log::Length(b)) => a == b,
                (Log::Events { events: a, .. }, Log::Events { events: b, .. }) => a == b,
                (Log::Hash(n, a), Log::Hash(m, b)) => n == m && a == b,
                _ => false,
            };
            let small = match (&self.small, &other.small) {
                (Small::Kept { bytes: a, .. }, Small::Kept { bytes: b, .. }) => a == b,
                (Small::Hash(a), Small::Hash(b)) => a == b,
                _ => false,
            };
            small && log
        }
    }

    fn log(c: &Content) -> EventLog {
        c.events.iter().collect()
    }

    /// The fingerprint of `c` with its log read whole and everything hashed, as parts too large to
    /// keep are; parts kept whole compare their bytes themselves.
    fn whole(c: &Content) -> Fingerprint {
        let kept = archived_keeping(&captured(c), log(c), true, (false, false), Some(u64::MAX));
        let hashed = archived_keeping(&captured(c), log(c), true, (false, false), None);
        assert!(matches!(kept.log, Log::Events { .. }) && matches!(hashed.log, Log::Hash(..)));
        assert!(
            matches!(kept.small, Small::Kept { .. }) && matches!(hashed.small, Small::Hash(..))
        );
        hashed
    }

    /// What the commit answers for `now` against the fingerprint `then`: the snapshot's length, then
    /// `Small::matches`.
    fn small_matches(then: &Fingerprint, now: &Content) -> bool {
        let snapshot = now.snapshot.as_deref();
        snapshot.map(<[u8]>::len) == then.snapshot
            && then.small.matches(|p| {
                p.small(
                    super::framed(snapshot, then.snapshot_followed),
                    now.seq,
                    super::framed_labels(&now.labels, then.labels_followed),
                )
            })
    }

    /// The fingerprint of `c` with its log read whole and kept for the commit.
    fn kept(c: &Content) -> Fingerprint {
        archived(&captured(c), log(c), true, false, false)
    }

    /// The fingerprint of `c` with its log followed by a watch: `total` events archived.
    fn followed(c: &Content, total: usize) -> Fingerprint {
        archived(
            &captured(c),
            std::iter::repeat_n(b"", total).collect(),
            false,
            false,
            false,
        )
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn content(
        events: &[&str],
        snapshot: Option<&str>,
        seq: Option<i64>,
        labels: &[(&str, &str)],
    ) -> Content {
        Content {
            events: events.iter().map(|e| e.as_bytes().to_vec()).collect(),
            snapshot: snapshot.map(|s| s.as_bytes().to_vec()),
            seq,
            labels: pairs(labels),
        }
    }

    fn base() -> Content {
        content(
            &[
                r#"{"type":"flow_started"}"#,
                r#"{"type":"step_completed"}"#,
                r#"{"type":"flow_completed"}"#,
            ],
            Some(r#"{"status":"active"}"#),
            Some(2),
            &[("tenant", "acme"), ("team", "core")],
        )
    }

    #[test]
    fn equal_content_is_an_equal_fingerprint() {
        assert!(whole(&base()) == whole(&base()));
        assert!(followed(&base(), 1500) == followed(&base(), 1500));
        // Labels are a hash: the order they were read in is no content.
        let mut reordered = base();
        reordered.labels.reverse();
        assert!(whole(&reordered) == whole(&base()));
        // What is not in the flow's own keys is not in the fingerprint (the commit checks the status
        // entry itself).
        let mut elsewhere = captured(&base());
        elsewhere.status = "failed".into();
        elsewhere.status_score = Some(1.0);
        elsewhere.previous = Some("s3://b/flows/abc.jsonl.gz".into());
        assert!(
            archived_keeping(&elsewhere, log(&base()), true, (false, false), None)
                == whole(&base())
        );
        assert!(kept(&base()) == kept(&base()));
    }

    #[test]
    fn every_change_the_commit_must_see_is_another_fingerprint() {
        type Change = fn(&mut Content);
        let changes: [(&str, Change); 15] = [
            ("a late event", |c| c.events.push(b"{}".to_vec())),
            ("an event edited", |c| c.events[1] = b"{}".to_vec()),
            ("an event edited to the same size", |c| {
                c.events[1][2] = b'T'
            }),
            ("the log trimmed", |c| c.events.truncate(2)),
            ("the last event replaced", |c| {
                c.events.pop();
                c.events.push(br#"{"type":"flow_failed"}"#.to_vec());
            }),
            ("two events swapped", |c| c.events.swap(0, 1)),
            ("the log emptied", |c| c.events.clear()),
            ("a new snapshot", |c| c.snapshot = Some(b"{}".to_vec())),
            ("a snapshot of the same size", |c| {
                c.snapshot.as_mut().unwrap()[2] = b'S';
            }),
            ("the snapshot deleted", |c| c.snapshot = None),
            ("another sequence", |c| c.seq = Some(3)),
            ("the sequence deleted", |c| c.seq = None),
            ("a label added", |c| c.labels.push(("x".into(), "y".into()))),
            ("a label removed", |c| {
                c.labels.pop();
            }),
            ("a label's value changed", |c| {
                c.labels[0].1 = "other".into()
            }),
        ];
        let before = whole(&base());
        for (what, change) in changes {
            let mut after = base();
            change(&mut after);
            assert!(whole(&after) != before, "{what}: the same fingerprint");
            assert!(kept(&after) != kept(&base()), "{what}: the same kept log");
        }
        let mut renamed = base();
        renamed.labels[0].0 = "owner".into();
        assert!(whole(&renamed) != before, "a label renamed");
    }

    /// A followed log is compared by its length (its watch sees every write to it); the small keys
    /// are compared by content all the same.
    #[test]
    fn a_followed_log_is_compared_by_length_and_the_small_keys_by_content() {
        let before = followed(&base(), 1500);
        assert!(followed(&base(), 1501) != before, "a late event");
        assert!(followed(&base(), 1499) != before, "a trimmed log");
        let mut edited = base();
        edited.events[1] = b"{}".to_vec();
        assert!(followed(&edited, 1500) == before, "left to the watch");
        let mut resnapshot = base();
        resnapshot.snapshot = Some(b"{}".to_vec());
        assert!(followed(&resnapshot, 1500) != before);
        let mut relabelled = base();
        relabelled.labels[1].1 = "ops".into();
        assert!(followed(&relabelled, 1500) != before);
        // Never the fingerprint of a log read whole, whatever it holds.
        let empty = content(&[], None, None, &[]);
        assert!(followed(&empty, 0) != whole(&empty));
        assert!(followed(&empty, 0) != kept(&empty));
    }

    /// The bytes `Parts::small` frames for `c`'s small keys.
    fn framed(c: &Content) -> Vec<u8> {
        let mut p = Parts(Sink::Keep(Vec::new()));
        p.small(c.snapshot.as_deref(), c.seq, &c.labels);
        p.kept()
    }

    /// Kept small keys match only a framing of exactly the kept bytes: not one that stops short of
    /// them, nor one that runs on past their end (which reads nothing out of bounds), nor one that
    /// differs early and agrees after; the hashed form neither.
    #[test]
    fn small_keys_match_neither_a_prefix_nor_a_longer_framing() {
        let bytes = framed(&base());
        for then in [kept(&base()), whole(&base())] {
            assert!(then.small.matches(|p| p.put(&bytes)), "the very bytes");
            for cut in [0, 1, 8, bytes.len() / 2, bytes.len() - 1] {
                assert!(
                    !then.small.matches(|p| p.put(&bytes[..cut])),
                    "a prefix of {cut} bytes"
                );
            }
            assert!(!then.small.matches(|p| {
                p.put(&bytes);
                p.put(b"x");
            }));
            assert!(!then.small.matches(|p| {
                p.put(&bytes);
                p.part(b"");
            }));
            assert!(!then.small.matches(|p| {
                p.put(&bytes[..bytes.len() - 1]);
                p.put(b"ab");
            }));
            assert!(!then.small.matches(|p| p.put(&vec![0; bytes.len() * 3])));
            let mut early = bytes.clone();
            early[0] ^= 1;
            assert!(
                !then.small.matches(|p| {
                    p.put(&early[..1]);
                    p.put(&early[1..]);
                }),
                "the first byte"
            );
            let mut last = bytes.clone();
            *last.last_mut().unwrap() ^= 1;
            assert!(!then.small.matches(|p| p.put(&last)), "the last byte");
        }
    }

    /// Small keys framed into exactly `KEEP_BYTES` are kept, one byte more are hashed; either way the
    /// comparison holds for the same keys and fails for a snapshot edited at its last byte, or grown or
    /// shrunk by a byte across the boundary.
    #[test]
    fn small_keys_of_exactly_keep_bytes_are_kept_and_one_byte_more_hashed() {
        let sized = |size: usize| {
            let mut c = base();
            c.snapshot = Some(Vec::new());
            let framing = framed(&c).len();
            c.snapshot = Some(vec![b'a'; size - framing]);
            assert_eq!(framed(&c).len(), size);
            c
        };
        let keep = KEEP_BYTES as usize;
        let (under, at, over) = (sized(keep - 1), sized(keep), sized(keep + 1));
        assert!(matches!(kept(&under).small, Small::Kept { .. }));
        assert!(matches!(kept(&at).small, Small::Kept { .. }), "exactly");
        assert!(matches!(kept(&over).small, Small::Hash(..)), "one more");
        for c in [&under, &at, &over] {
            let then = kept(c);
            let size = framed(c).len();
            assert!(small_matches(&then, c), "{size}: the same");
            let mut edited = c.clone();
            *edited.snapshot.as_mut().unwrap().last_mut().unwrap() = b'b';
            assert!(!small_matches(&then, &edited), "{size}: edited");
            let mut grown = c.clone();
            grown.snapshot.as_mut().unwrap().push(b'a');
            assert!(!small_matches(&then, &grown), "{size}: grown");
            let mut shrunk = c.clone();
            shrunk.snapshot.as_mut().unwrap().pop();
            assert!(!small_matches(&then, &shrunk), "{size}: shrunk");
        }
    }

    #[test]
    fn framing_cannot_make_two_contents_alike() {
        let none: &[(&str, &str)] = &[];
        let alike = [
            (
                "events split elsewhere",
                content(&["ab", "c"], None, None, none),
                content(&["a", "bc"], None, None, none),
            ),
            (
                "an empty event",
                content(&[""], None, None, none),
                content(&[], None, None, none),
            ),
            (
                "two empty events",
                content(&["", ""], None, None, none),
                content(&[""], None, None, none),
            ),
            (
                "a label's name and value split elsewhere",
                content(&[], None, None, &[("tx", "")]),
                content(&[], None, None, &[("t", "x")]),
            ),
            (
                "labels split elsewhere",
                content(&[], None, None, &[("a", "bc"), ("d", "")]),
                content(&[], None, None, &[("a", "b"), ("cd", "")]),
            ),
            (
                "an empty snapshot",
                content(&[], Some(""), None, none),
                content(&[], None, None, none),
            ),
            (
                "a snapshot spelling the missing mark",
                content(&[], Some("-"), None, none),
                content(&[], None, None, none),
            ),
            (
                "a snapshot running into the sequence",
                content(&[], Some("1"), Some(2), none),
                content(&[], Some("12"), None, none),
            ),
            (
                "a label running into the log",
                content(&["b"], None, None, &[("a", "")]),
                content(&[], None, None, &[("a", "b")]),
            ),
            (
                "the snapshot running into the labels",
                content(&[], Some("ab"), None, none),
                content(&[], Some("a"), None, &[("b", "")]),
            ),
        ];
        for (what, a, b) in alike {
            assert!(whole(&a) != whole(&b), "{what}");
        }
    }

    /// Contents of one letter (and the missing mark `-`), so that parts which concatenate alike are
    /// common.
    fn contents() -> impl Strategy<Value = Content> {
        let bytes = || "[a-]{0,2}";
        (
            prop::collection::vec(bytes().prop_map(String::into_bytes), 0..4),
            prop::option::of(bytes().prop_map(String::into_bytes)),
            prop::option::of(0i64..3),
            prop::collection::btree_map(bytes(), bytes(), 0..3),
        )
            .prop_map(
                |(events, snapshot, seq, labels): (_, _, _, BTreeMap<String, String>)| Content {
                    events,
                    snapshot,
                    seq,
                    labels: labels.into_iter().collect(),
                },
            )
    }

    /// `c` with one byte moved across a boundary between its parts (`how` picks which), the very
    /// same bytes framed otherwise; `c` itself where it has no such boundary.
    fn reframed(c: &Content, how: u8) -> Content {
        let mut r = c.clone();
        match how % 5 {
            0 => {
                // From one event into the next.
                if let Some(i) = (1..r.events.len()).find(|&i| !r.events[i - 1].is_empty()) {
                    let b = r.events[i - 1].pop().unwrap();
                    r.events[i].insert(0, b);
                }
            }
            1 => {
                // From a label's name into its value.
                if let Some((name, value)) = r.labels.iter_mut().find(|(n, _)| !n.is_empty()) {
                    let ch = name.pop().unwrap();
                    value.insert(0, ch);
                }
            }
            2 => {
                // From the snapshot into the first event.
                if let (Some(snapshot), Some(event)) = (r.snapshot.as_mut(), r.events.first_mut()) {
                    if let Some(b) = snapshot.pop() {
                        event.insert(0, b);
                    }
                }
            }
            3 => {
                // From the last label's value into the first event.
                if let (Some((_, value)), Some(event)) = (r.labels.last_mut(), r.events.first_mut())
                {
                    if let Some(ch) = value.pop() {
                        event.insert(0, ch as u8);
                    }
                }
            }
            _ => {
                // Two events made one.
                if r.events.len() >= 2 {
                    let second = r.events.remove(1);
                    r.events[0].extend(second);
                }
            }
        }
        // A hash's fields are unique, and contents compare as sets.
        r.labels.sort();
        let names: std::collections::BTreeSet<&String> = r.labels.iter().map(|(n, _)| n).collect();
        match names.len() == r.labels.len() {
            true => r,
            false => c.clone(),
        }
    }

    /// A content and another: drawn on its own, or the first reframed.
    fn two_contents() -> impl Strategy<Value = (Content, Content)> {
        contents().prop_flat_map(|a| {
            let again = a.clone();
            let other = prop_oneof![
                contents(),
                any::<u8>().prop_map(move |how| reframed(&again, how)),
            ];
            (Just(a), other)
        })
    }

    proptest! {
        #![proptest_config(proptest_config())]

        /// Two contents have the same fingerprint exactly when they are the same content.
        #[test]
        fn fingerprints_are_equal_exactly_when_contents_are((a, b) in two_contents()) {
            prop_assert_eq!(a == b, whole(&a) == whole(&b), "{:?} / {:?}", a, b);
            prop_assert_eq!(a == b, kept(&a) == kept(&b), "{:?} / {:?}", a, b);
        }

        /// The commit's comparison of the small keys, kept or hashed, holds exactly when they are the
        /// same.
        #[test]
        fn the_small_keys_match_exactly_when_they_are_the_same((a, b) in two_contents()) {
            let same = a.snapshot == b.snapshot && a.seq == b.seq && {
                let (mut x, mut y) = (a.labels.clone(), b.labels.clone());
                x.sort();
                y.sort();
                x == y
            };
            prop_assert_eq!(same, small_matches(&kept(&a), &b), "{:?} / {:?}", a, b);
            prop_assert_eq!(same, small_matches(&whole(&a), &b), "{:?} / {:?}", a, b);
        }
    }

    /// A snapshot followed by the watch is measured, not framed: any bytes of its length match (the
    /// watch proves them), another length or no snapshot does not; compared, the same bytes differ.
    #[test]
    fn a_followed_snapshot_is_measured_not_framed() {
        let c = base();
        let followed = archived(&captured(&c), log(&c), true, true, false);
        let compared = kept(&c);
        let len = c.snapshot.as_ref().unwrap().len();
        let same_length = Content {
            snapshot: Some(vec![b'x'; len]),
            ..c.clone()
        };
        assert!(small_matches(&followed, &c) && small_matches(&followed, &same_length));
        assert!(small_matches(&compared, &c) && !small_matches(&compared, &same_length));
        for other in [Some(vec![b'x'; len + 1]), Some(Vec::new()), None] {
            let now = Content {
                snapshot: other,
                ..c.clone()
            };
            assert!(!small_matches(&followed, &now), "{:?}", now.snapshot);
        }
        let reseq = Content {
            seq: Some(3),
            ..c.clone()
        };
        assert!(
            !small_matches(&followed, &reseq),
            "the other small keys are still compared"
        );
    }

    /// A labels hash followed by the watch is not framed: any labels match (the watch and the commit's
    /// field count prove them); compared, other labels differ, and the other small keys still count.
    #[test]
    fn followed_labels_are_not_framed() {
        let c = base();
        let followed = archived(&captured(&c), log(&c), true, false, true);
        let other = Content {
            labels: pairs(&[("x", "y")]),
            ..c.clone()
        };
        assert!(small_matches(&followed, &c) && small_matches(&followed, &other));
        assert!(small_matches(&kept(&c), &c) && !small_matches(&kept(&c), &other));
        let reseq = Content {
            seq: Some(3),
            ..c.clone()
        };
        assert!(!small_matches(&followed, &reseq));
    }
}
