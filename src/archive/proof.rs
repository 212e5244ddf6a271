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

use redis_module::Context;
use sha2::{Digest, Sha256};

use crate::archive::capture::{read_labels, read_seq};
use crate::archive::flow::Captured;
use crate::ops::errors::FlowError;
use crate::runtime::server::{list_len, list_range_each, read_string};

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
        // HGETALL's order is the hash's, which a rehash may change: compare as a set.
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
    let parts = Parts::new(Some(&flow.snapshot), flow.seq, &flow.labels);
    if !whole_log {
        return parts.length(events_total);
    }
    let mut parts = parts.events(flow.events.len());
    flow.events.iter().for_each(|e| parts.part(e));
    parts.finish()
}

/// What Valkey holds of `flow`, archived with `events_total` events, now. Main thread, in the flow's
/// DB. Reads the log only when it was read whole and still has its length, so at most one step's worth
/// of events, hashing them where the server's reply holds them; a log grown since (perhaps far beyond
/// one step) or followed by a watch is measured, not read.
pub fn current(
    ctx: &Context,
    flow: &Captured,
    events_total: usize,
    whole_log: bool,
) -> Result<Fingerprint, FlowError> {
    let keys = &flow.keys;
    let snapshot = read_string(ctx, &keys.snapshot);
    let parts = Parts::new(
        snapshot.as_deref(),
        read_seq(ctx, keys)?,
        &read_labels(ctx, keys)?,
    );
    let length = list_len(ctx, &keys.events)?;
    if !whole_log || length != events_total {
        // A length fingerprint never equals an event-by-event one: a whole log of another length fails.
        return Ok(parts.length(length));
    }
    let mut parts = parts.events(length);
    list_range_each(ctx, &keys.events, 0, length, |e| parts.part(e))?;
    Ok(parts.finish())
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
