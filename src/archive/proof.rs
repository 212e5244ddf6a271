//! The commit's proof that the flow in Valkey is still the flow in the archive.
//!
//! What the archive holds of the flow's own keys (snapshot, sequence, labels, event log) is kept once
//! the object is encoded, off the main thread: the small keys hashed, and the event log as it was read
//! (up to `KEEP_BYTES`; a larger log hashed too). The commit reads the same keys again in its own
//! main-thread step and deletes only on equality: the small keys hashed the same way, the log compared
//! byte for byte with the one kept (or hashed the same way), stopping at its first difference. A late
//! event, an edited or trimmed log, a new snapshot or label, a rename over a key, an expiry, an
//! eviction, a flush or a swap each change what the keys hold, so each stops the delete; a rewrite to
//! the very same content does not, and loses nothing: what is deleted is exactly what the archive
//! holds. No hook on the server's writes is needed, so the server's own writes pay nothing for it (see
//! `runtime::watch`).
//!
//! An event log read over several steps is too long to read again in one: it is compared by its
//! length only, and its watch follows every write to it from the capture's first step to the commit.

use std::ops::ControlFlow;

use redis_module::{Context, KeyType};
use sha2::{Digest, Sha256};

use crate::archive::capture::{read_labels, read_seq};
use crate::format::captured::Captured;
use crate::ops::errors::FlowError;
use crate::ops::metrics::Buffered;
use crate::runtime::server::{expect_type, hash_len, list_len, list_range_each, with_string};

/// A whole log of at most this many bytes is kept for the commit to compare byte for byte (cheaper
/// on the main thread than hashing it again); a larger one is hashed, so that an upload does not hold
/// two copies of a large flow.
const KEEP_BYTES: u64 = 1 << 20;

/// What the archive holds of a flow's own keys, for the commit to compare with what Valkey holds.
pub struct Fingerprint {
    /// The small keys (snapshot, sequence, labels), hashed as `Parts::new` frames them.
    small: [u8; 32],
    log: Log,
}

/// What the archive holds of the event log.
enum Log {
    /// A log followed by its watch: its length.
    Length(usize),
    /// A whole log as read, counted as buffered while kept.
    Events {
        events: Vec<Vec<u8>>,
        _held: Buffered,
    },
    /// A whole log too large to keep: its length and hash (`Parts::events`).
    Hash(usize, [u8; 32]),
}

/// A fingerprint being computed: every part length-prefixed and every optional part tagged, so no two
/// contents hash alike by framing.
struct Parts(Sha256);

impl Parts {
    /// Starts with the flow's small keys.
    fn new(snapshot: Option<&[u8]>, seq: Option<i64>, labels: &[(String, String)]) -> Parts {
        let mut p = Parts(Sha256::new());
        p.part(snapshot.map_or(b"-", |_| b"+"));
        p.part(snapshot.unwrap_or_default());
        p.part(
            seq.map_or_else(|| "-".to_string(), |s| s.to_string())
                .as_bytes(),
        );
        // Compared as a set, whatever order they were read in.
        let mut labels: Vec<&(String, String)> = labels.iter().collect();
        labels.sort();
        p.part(&(labels.len() as u64).to_le_bytes());
        for (name, value) in labels {
            p.part(name.as_bytes());
            p.part(value.as_bytes());
        }
        p
    }

    /// A log: its length, then `n` calls to `part`.
    fn events(n: usize) -> Parts {
        let mut p = Parts(Sha256::new());
        p.part(b"events");
        p.part(&(n as u64).to_le_bytes());
        p
    }

    fn part(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }

    fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

/// What the archive holds of `flow`, whose log (`events`, taken from the capture once it is encoded)
/// was read whole (`whole_log`) or followed.
pub fn archived(flow: &Captured, events: Vec<Vec<u8>>, whole_log: bool) -> Fingerprint {
    let small = Parts::new(flow.snapshot.as_deref(), flow.seq, &flow.labels).finish();
    let bytes: u64 = events.iter().map(|e| e.len() as u64).sum();
    let log = match whole_log {
        false => Log::Length(events.len()),
        true if bytes <= KEEP_BYTES => Log::Events {
            _held: Buffered::hold(bytes),
            events,
        },
        true => {
            let mut parts = Parts::events(events.len());
            events.iter().for_each(|e| parts.part(e));
            Log::Hash(events.len(), parts.finish())
        }
    };
    Fingerprint { small, log }
}

/// Whether Valkey holds now what the archive holds of `flow` (`archived`). Main thread, in the flow's
/// DB. Nothing grown since the capture is read: a label hash or snapshot of another size, or a whole
/// log of another length, differs without being read (a flood of writes cannot make the commit step
/// long), and a log followed by a watch is measured. So the step reads at most what the capture read
/// in its one step, comparing it where the server holds it.
pub fn unchanged(
    ctx: &Context,
    flow: &Captured,
    archived: &Fingerprint,
) -> Result<bool, FlowError> {
    let keys = &flow.keys;
    if let Some(hash) = &keys.labels {
        let fields = match expect_type(ctx, hash, &KeyType::Hash)? {
            true => hash_len(ctx, hash)?,
            false => 0,
        };
        if fields != flow.labels.len() {
            return Ok(false);
        }
    }
    // Labels grown past the captured ones' bytes differ, and are not read further.
    let captured: usize = flow.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
    let Some(labels) = read_labels(ctx, keys, captured as u64)? else {
        return Ok(false);
    };
    let seq = read_seq(ctx, keys)?;
    let small = with_string(ctx, &keys.snapshot, |snapshot| {
        (snapshot.map(<[u8]>::len) == flow.snapshot.as_ref().map(Vec::len))
            .then(|| Parts::new(snapshot, seq, &labels).finish())
    });
    if small != Some(archived.small) {
        return Ok(false);
    }
    let length = list_len(ctx, &keys.events)?;
    match &archived.log {
        Log::Length(n) => Ok(length == *n),
        Log::Events { events: kept, .. } if length == kept.len() => {
            let mut kept = kept.iter();
            let mut same = true;
            list_range_each(ctx, &keys.events, 0, length, |e| {
                same = kept.next().is_some_and(|k| k.as_slice() == e);
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
            list_range_each(ctx, &keys.events, 0, length, |e| {
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
    use super::*;

    enum Log<'a> {
        Events(&'a [Vec<u8>]),
        Length(usize),
    }

    /// The small keys' hash, and the log's: its events hashed (as a log too large to keep), or its
    /// length alone.
    fn fingerprint(
        snapshot: Option<&[u8]>,
        seq: Option<i64>,
        labels: &[(String, String)],
        log: Log,
    ) -> ([u8; 32], Option<[u8; 32]>, usize) {
        let small = Parts::new(snapshot, seq, labels).finish();
        match log {
            Log::Events(events) => {
                let mut parts = Parts::events(events.len());
                events.iter().for_each(|e| parts.part(e));
                (small, Some(parts.finish()), events.len())
            }
            Log::Length(n) => (small, None, n),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn any_difference_in_content_is_a_different_fingerprint() {
        let events = vec![b"a".to_vec(), b"bc".to_vec()];
        let base = fingerprint(
            Some(b"s"),
            Some(3),
            &labels(&[("t", "x")]),
            Log::Events(&events),
        );
        let same = fingerprint(
            Some(b"s"),
            Some(3),
            &labels(&[("t", "x")]),
            Log::Events(&events),
        );
        assert!(base == same);
        let framing = vec![b"ab".to_vec(), b"c".to_vec()];
        let others = [
            fingerprint(None, Some(3), &labels(&[("t", "x")]), Log::Events(&events)),
            fingerprint(
                Some(b""),
                Some(3),
                &labels(&[("t", "x")]),
                Log::Events(&events),
            ),
            fingerprint(
                Some(b"s"),
                None,
                &labels(&[("t", "x")]),
                Log::Events(&events),
            ),
            fingerprint(
                Some(b"s"),
                Some(4),
                &labels(&[("t", "x")]),
                Log::Events(&events),
            ),
            fingerprint(Some(b"s"), Some(3), &labels(&[]), Log::Events(&events)),
            fingerprint(
                Some(b"s"),
                Some(3),
                &labels(&[("tx", "")]),
                Log::Events(&events),
            ),
            fingerprint(
                Some(b"s"),
                Some(3),
                &labels(&[("t", "x")]),
                Log::Events(&framing),
            ),
            fingerprint(
                Some(b"s"),
                Some(3),
                &labels(&[("t", "x")]),
                Log::Events(&events[..1]),
            ),
            fingerprint(Some(b"s"), Some(3), &labels(&[("t", "x")]), Log::Length(2)),
        ];
        for (i, other) in others.iter().enumerate() {
            assert!(base != *other, "variant {i} hashed like the original");
        }
    }

    #[test]
    fn label_order_does_not_matter() {
        let a = fingerprint(
            None,
            None,
            &labels(&[("a", "1"), ("b", "2")]),
            Log::Length(0),
        );
        let b = fingerprint(
            None,
            None,
            &labels(&[("b", "2"), ("a", "1")]),
            Log::Length(0),
        );
        assert!(a == b);
    }
}
