//! The commit's proof that the flow in Valkey is still the flow in the archive.
//!
//! What the archive holds of the flow's own keys (snapshot, sequence, labels, event log) is hashed
//! once the object is encoded, off the main thread. The commit reads the same keys again in its own
//! main-thread step, hashes them the same way and deletes only on equality. A late event, an edited or
//! trimmed log, a new snapshot or label, a rename over a key, an expiry, an eviction, a flush or a swap
//! each change what the keys hold, so each stops the delete; a rewrite to the very same content does
//! not, and loses nothing: what is deleted is exactly what the archive holds. No hook on the server's
//! writes is needed, so the server's own writes pay nothing for it (see `runtime::watch`).
//!
//! An event log read over several steps is too long to read again in one: it is hashed by its length
//! only, and its watch follows every write to it from the capture's first step to the commit.

use std::ops::ControlFlow;

use redis_module::{Context, KeyType};
use sha2::{Digest, Sha256};

use crate::archive::capture::{read_labels, read_seq};
use crate::format::captured::Captured;
use crate::ops::errors::FlowError;
use crate::runtime::server::{expect_type, hash_len, list_len, list_range_each, with_string};

/// A hash of a flow's own keys as the archive holds them, or as Valkey holds them now.
#[derive(PartialEq, Eq, Clone, Copy)]
pub struct Fingerprint([u8; 32]);

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

    fn part(&mut self, b: &[u8]) {
        self.0.update((b.len() as u64).to_le_bytes());
        self.0.update(b);
    }

    /// The log is covered event by event: its length, then `n` calls to `part`.
    fn events(mut self, n: usize) -> Parts {
        self.part(b"events");
        self.part(&(n as u64).to_le_bytes());
        self
    }

    /// The log is covered by its length only.
    fn length(mut self, n: usize) -> Fingerprint {
        self.part(b"length");
        self.part(&(n as u64).to_le_bytes());
        self.finish()
    }

    fn finish(self) -> Fingerprint {
        Fingerprint(self.0.finalize().into())
    }
}

/// What the archive holds of `flow`, whose log was read whole (`whole_log`) or followed.
pub fn archived(flow: &Captured, events_total: usize, whole_log: bool) -> Fingerprint {
    let parts = Parts::new(flow.snapshot.as_deref(), flow.seq, &flow.labels);
    if !whole_log {
        return parts.length(events_total);
    }
    let mut parts = parts.events(flow.events.len());
    flow.events.iter().for_each(|e| parts.part(e));
    parts.finish()
}

/// What Valkey holds of `flow`, archived with `events_total` events, now; `None` when a part differs
/// in size already. Main thread, in the flow's DB. Nothing grown since the capture is read: a label
/// hash or snapshot of another size, or a whole log of another length, differs without being read (a
/// flood of writes cannot make the commit step long), and a log followed by a watch is measured. So the
/// step reads at most what the capture read in its one step, hashing it where the server holds it.
pub fn current(
    ctx: &Context,
    flow: &Captured,
    events_total: usize,
    whole_log: bool,
) -> Result<Option<Fingerprint>, FlowError> {
    let keys = &flow.keys;
    if let Some(hash) = &keys.labels {
        let fields = match expect_type(ctx, hash, &KeyType::Hash)? {
            true => hash_len(ctx, hash)?,
            false => 0,
        };
        if fields != flow.labels.len() {
            return Ok(None);
        }
    }
    // Labels grown past the captured ones' bytes differ, and are not read further.
    let captured: usize = flow.labels.iter().map(|(k, v)| k.len() + v.len()).sum();
    let Some(labels) = read_labels(ctx, keys, captured as u64)? else {
        return Ok(None);
    };
    let seq = read_seq(ctx, keys)?;
    let parts = with_string(ctx, &keys.snapshot, |snapshot| {
        (snapshot.map(<[u8]>::len) == flow.snapshot.as_ref().map(Vec::len))
            .then(|| Parts::new(snapshot, seq, &labels))
    });
    let Some(parts) = parts else {
        return Ok(None);
    };
    let length = list_len(ctx, &keys.events)?;
    if !whole_log {
        return Ok(Some(parts.length(length)));
    }
    if length != events_total {
        return Ok(None);
    }
    let mut parts = parts.events(length);
    list_range_each(ctx, &keys.events, 0, length, |e| {
        parts.part(e);
        ControlFlow::Continue(())
    })?;
    Ok(Some(parts.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    enum Log<'a> {
        Events(&'a [Vec<u8>]),
        Length(usize),
    }

    fn fingerprint(
        snapshot: Option<&[u8]>,
        seq: Option<i64>,
        labels: &[(String, String)],
        log: Log,
    ) -> Fingerprint {
        let parts = Parts::new(snapshot, seq, labels);
        match log {
            Log::Events(events) => {
                let mut parts = parts.events(events.len());
                events.iter().for_each(|e| parts.part(e));
                parts.finish()
            }
            Log::Length(n) => parts.length(n),
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
