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
use crate::runtime::server::{list_len, list_range, read_string};

/// A hash of a flow's own keys as the archive holds them, or as Valkey holds them now.
#[derive(PartialEq, Eq, Clone, Copy)]
pub struct Fingerprint([u8; 32]);

/// How much of the event log a fingerprint covers.
enum Log<'a> {
    /// Every event, in order (a log read in one step).
    Events(&'a [Vec<u8>]),
    /// Its length (a longer log, followed by its watch).
    Length(usize),
}

/// Every part length-prefixed, every optional part tagged, so no two contents hash alike by framing.
fn fingerprint(
    snapshot: Option<&[u8]>,
    seq: Option<i64>,
    labels: &[(String, String)],
    log: Log,
) -> Fingerprint {
    let mut h = Sha256::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    part(snapshot.map_or(b"-", |_| b"+"));
    part(snapshot.unwrap_or_default());
    part(
        seq.map_or_else(|| "-".to_string(), |s| s.to_string())
            .as_bytes(),
    );
    // HGETALL's order is the hash's, which a rehash may change: compare as a set.
    let mut labels: Vec<&(String, String)> = labels.iter().collect();
    labels.sort();
    part(&(labels.len() as u64).to_le_bytes());
    for (name, value) in labels {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    match log {
        Log::Events(events) => {
            part(b"events");
            part(&(events.len() as u64).to_le_bytes());
            events.iter().for_each(|e| part(e));
        }
        Log::Length(n) => {
            part(b"length");
            part(&(n as u64).to_le_bytes());
        }
    }
    Fingerprint(h.finalize().into())
}

/// What the archive holds of `flow`, whose log was read whole (`whole_log`) or followed.
pub fn archived(flow: &Captured, events_total: usize, whole_log: bool) -> Fingerprint {
    let log = if whole_log {
        Log::Events(&flow.events)
    } else {
        Log::Length(events_total)
    };
    fingerprint(Some(&flow.snapshot), flow.seq, &flow.labels, log)
}

/// What Valkey holds of `flow` now. Main thread, in the flow's DB; reads at most one step's worth of
/// events (a longer log is measured, not read).
pub fn current(ctx: &Context, flow: &Captured, whole_log: bool) -> Result<Fingerprint, FlowError> {
    let keys = &flow.keys;
    let snapshot = read_string(ctx, &keys.snapshot);
    let seq = read_seq(ctx, keys)?;
    let labels = read_labels(ctx, keys)?;
    let length = list_len(ctx, &keys.events)?;
    let events;
    let log = if whole_log {
        events = list_range(ctx, &keys.events, 0, length)?;
        Log::Events(&events)
    } else {
        Log::Length(length)
    };
    Ok(fingerprint(snapshot.as_deref(), seq, &labels, log))
}

#[cfg(test)]
mod tests {
    use super::*;

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
