//! The capture's judgement: what a flow's facts, read in one go (`capture::inspect`), say of it,
//! decided without the server. Is it live, archived or unknown; left to the engine's own archiver;
//! what is its status, and since when is it idle (`eligible`); does it fit the read cap; are its
//! small keys readable.
//!
//! Reading and judging are apart so that each fact is read once, in one place, and every rule can be
//! tested without a server. A read records what it found (a key's type, what it holds, or why a
//! lookup failed) and refuses nothing: the judge ranks the refusals, one order for every flow. A key of
//! the wrong type is refused where the rule that needs it comes: presence (event log, snapshot),
//! the index's answer, the lease, the status (status hash, the log's end, the snapshot), its score,
//! the idle time, then the sizes and the small keys the archive copies (sequence, labels).

use std::cell::OnceCell;
use std::ops::ControlFlow;

use redis_module::KeyType;

use crate::archive::eligible::{self, SnapshotFacts, Window};
use crate::format::engine;
use crate::index::Entry;
use crate::layout::{FlowKeys, Layout, StateSource};
use crate::ops::errors::{holds, show_key, FlowError};
use crate::runtime::key::HashScan;
use crate::runtime::mainthread::{ByteCap, Counted};

/// Everything the capture read of one flow.
pub struct Facts {
    /// The event log's type: the flow is live while it holds a list.
    pub events: KeyType,
    pub snapshot: KeyType,
    /// The archive index's entry for the id (an archived flow's, or an earlier incarnation's), or
    /// why the lookup failed.
    pub entry: Result<Option<Entry>, FlowError>,
    /// The rest, read only while the event log is a list.
    pub live: Option<Live>,
}

/// What the capture read of a live flow.
pub struct Live {
    /// The lease key exists: the engine's own archiver holds the flow.
    pub leased: bool,
    /// The event log's length.
    pub len: usize,
    pub snapshot: Snapshot,
    /// The status hash and the flow's entry in it.
    pub indexed: Found<Vec<u8>>,
    /// On layouts folded from the log: what its end says, or why it could not be read.
    pub tail: Option<Result<Tail, FlowError>>,
    /// The status ZSET of the flow's status (`status`), where the layout has one and the facts
    /// name a status: its type and the flow's score as the server formats it, or why it was not read.
    pub score: Option<Result<Scored, FlowError>>,
    /// The sequence key and its bytes.
    pub seq: Found<Vec<u8>>,
    /// The labels hash and its fields: all of them, or the first `WHOLE_BYTES` or so of a larger one.
    pub labels: Found<Pairs>,
    /// Where the read of a labels hash larger than one step reads goes on (`capture::read_more`).
    pub labels_left: Option<HashScan>,
    /// What counts the labels read past `WHOLE_BYTES`, from before they were copied, or why they
    /// were measured and not copied.
    pub labels_cap: Counted,
}

/// A hash's fields and values as read.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A key as found: its type, and what was read of it where it holds the type the flow needs (for the
/// labels, `None` once they passed the cap).
pub struct Found<T> {
    pub kind: KeyType,
    pub value: Option<T>,
}

impl<T> From<(KeyType, Option<T>)> for Found<T> {
    fn from((kind, value): (KeyType, Option<T>)) -> Self {
        Found { kind, value }
    }
}

/// The snapshot: its length where the server holds it (0 when absent) and, if that fits the cap and
/// the capture reads it at once, its bytes, with its own status and last update parsed from them once,
/// where a rule needs them (a folded layout's rules never do: its capture reads a large snapshot in
/// steps, after the judgement).
pub struct Snapshot {
    pub len: u64,
    pub bytes: Option<Vec<u8>>,
    /// A large snapshot copied whole for its own facts (`Snapshot::counted`): the read's cap that
    /// counts it from before it was copied, or why it was measured and not copied.
    pub cap: Counted,
    parsed: OnceCell<Result<SnapshotFacts, FlowError>>,
}

impl Snapshot {
    pub fn new(len: u64, bytes: Option<Vec<u8>>) -> Snapshot {
        Snapshot {
            len,
            bytes,
            cap: None,
            parsed: OnceCell::new(),
        }
    }

    /// A snapshot of `len` bytes copied by `copy` once `cap` counts them, else measured only: its
    /// facts are then refused as `cap` was.
    pub fn counted(
        len: u64,
        cap: Result<ByteCap, FlowError>,
        copy: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Snapshot {
        Snapshot {
            bytes: cap.as_ref().ok().and_then(|_| copy()),
            cap: Some(cap),
            ..Snapshot::new(len, None)
        }
    }

    /// Its status and last update: a snapshot no read could take back is refused before it is parsed,
    /// and one whose copy was refused is not parsed either.
    fn facts(&self, max_bytes: u64) -> Result<&SnapshotFacts, FlowError> {
        fits(self.len, max_bytes)?;
        if let Some(Err(refused)) = &self.cap {
            return Err(refused.clone());
        }
        self.parsed
            .get_or_init(|| SnapshotFacts::parse(self.bytes.as_deref().unwrap_or_default()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// What the end of an event log says: when its last event happened, and the status the engine's
/// indexer last set (looked for only where the status hash names none).
pub struct Tail {
    pub last_ms: i64,
    pub status: Option<String>,
}

/// How far back from the end of a log the status is looked for when no status index names it: the
/// engine's terminal batch ends the log, and only a few late events can follow it.
const STATUS_LOOKBACK: usize = 64;

/// The end of an event log, judged element by element as the server hands them over (oldest first):
/// its last event and, for the status, up to `STATUS_LOOKBACK` before it. An element the engine could
/// not read as an event makes the flow unreadable.
///
/// Each element is measured before it is parsed, and once those measured pass `max_bytes`
/// (`read-max-bytes`, each with its line end, as a capture counts them) the flow is too large to
/// archive and nothing more is taken: a huge late event costs the server a copy, not a parse. The
/// others take `event_facts` a bounded amount of work per byte.
pub struct LogEnd {
    from: usize,
    facts: Vec<engine::EventFacts>,
    used: u64,
    max_bytes: u64,
    failed: Option<FlowError>,
}

impl LogEnd {
    /// The end of a log of `len` events, with the status looked for if `want_status`.
    pub fn new(len: usize, want_status: bool, max_bytes: u64) -> LogEnd {
        let from = len.saturating_sub(if want_status { STATUS_LOOKBACK } else { 1 });
        LogEnd {
            from,
            facts: Vec::with_capacity(len - from),
            used: 0,
            max_bytes,
            failed: None,
        }
    }

    /// The index of the first element to hand over.
    pub fn from(&self) -> usize {
        self.from
    }

    /// Takes the next element; breaks once the flow is refused.
    pub fn take(&mut self, element: &[u8]) -> ControlFlow<()> {
        self.used += element.len() as u64 + 1;
        if self.used > self.max_bytes {
            self.failed = Some(too_large(self.max_bytes));
            return ControlFlow::Break(());
        }
        match engine::event_facts(element) {
            Ok(f) => self.facts.push(f),
            Err(e) => {
                let at = self.from + self.facts.len();
                self.failed = Some(FlowError::Unreadable(format!("event {at}: {e}")));
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// What the elements taken say.
    pub fn finish(self) -> Result<Tail, FlowError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        let last = self
            .facts
            .last()
            .ok_or_else(|| FlowError::Unreadable("the event log is empty".into()))?;
        let status = self.facts.iter().rev().find_map(|f| f.sets_status.clone());
        Ok(Tail {
            last_ms: last.unix_ms,
            status,
        })
    }
}

/// A status ZSET as read: its key and type, and the flow's score in it.
pub struct Scored {
    pub key: String,
    pub kind: KeyType,
    pub score: Option<f64>,
}

/// The judgement.
pub enum Verdict {
    /// Not live and in the index: its location.
    Archived(String),
    Eligible(Box<Judged>),
}

/// An eligible flow: what the capture keeps of its facts.
pub struct Judged {
    /// The index entry of its earlier incarnation, if any.
    pub previous: Option<Entry>,
    pub events_total: usize,
    pub status: String,
    pub status_score: Option<f64>,
    pub seq: Option<i64>,
    /// Its labels: all of them, or the first read of a labels hash the capture reads on in steps
    /// from `labels_left`.
    pub labels: Vec<(String, String)>,
    pub labels_left: Option<HashScan>,
    /// What counts the labels read past `WHOLE_BYTES`, until the capture counts them.
    pub labels_cap: Option<ByteCap>,
    /// The snapshot's bytes, if the capture has read them (see `Snapshot`).
    pub snapshot: Option<Vec<u8>>,
    /// What counts them, where they were copied whole for the snapshot's own facts.
    pub snapshot_cap: Option<ByteCap>,
    /// Its length where the server holds it, 0 when absent.
    pub snapshot_len: u64,
}

/// Judges a flow by its facts: archived, eligible now (with what the capture keeps), or why not.
pub fn judge(
    facts: Facts,
    keys: &FlowKeys,
    layout: &Layout,
    window: &Window,
    max_bytes: u64,
) -> Result<Verdict, FlowError> {
    let (live, previous) = match presence(facts, keys, layout.state)? {
        Presence::Live(live, previous) => (*live, previous),
        Presence::Archived(location) => return Ok(Verdict::Archived(location)),
    };
    if let (true, Some(lease)) = (live.leased, &keys.lease) {
        return Err(FlowError::Leased(lease.clone()));
    }
    let status = status(&live, keys, max_bytes)?;
    let status_score = score(&live)?;
    let last_update_ms = last_update(&live, status_score, max_bytes)?;
    eligible::check(layout, &status, last_update_ms, window)?;
    fits(live.snapshot.len, max_bytes)?;
    let seq = seq(&live.seq, keys)?;
    let labels_cap = live.labels_cap.transpose()?;
    let labels = labels(live.labels, keys)?.ok_or_else(|| too_large(max_bytes))?;
    Ok(Verdict::Eligible(Box::new(Judged {
        previous,
        events_total: live.len,
        status,
        status_score,
        seq,
        labels,
        labels_left: live.labels_left,
        labels_cap,
        snapshot_len: live.snapshot.len,
        snapshot: live.snapshot.bytes,
        snapshot_cap: live.snapshot.cap.and_then(Result::ok),
    })))
}

/// Whether a flow is live (with the index entry of an earlier incarnation, if any) or archived.
enum Presence {
    Live(Box<Live>, Option<Entry>),
    Archived(String),
}

/// A flow is live while its event log exists; without one it is archived if the index names it, else
/// unknown (a snapshot alone is no flow). A layout whose state is its snapshot needs that too.
fn presence(facts: Facts, keys: &FlowKeys, state: StateSource) -> Result<Presence, FlowError> {
    holds(&keys.events, &facts.events, &KeyType::List)?;
    let has_snapshot = holds(&keys.snapshot, &facts.snapshot, &KeyType::String)?;
    let entry = facts.entry?;
    match facts.live {
        Some(live) => {
            if state == StateSource::Snapshot && !has_snapshot {
                return Err(FlowError::Unreadable(format!(
                    "snapshot {} is missing",
                    show_key(&keys.snapshot)
                )));
            }
            Ok(Presence::Live(Box::new(live), entry))
        }
        None => entry
            .map(|e| Presence::Archived(e.location))
            .ok_or(FlowError::NotFound),
    }
}

/// The flow's status: its status hash entry, else the status its log's end records (folded flows) or
/// its snapshot's. The capture reads the status ZSET this names.
pub fn status(live: &Live, keys: &FlowKeys, max_bytes: u64) -> Result<String, FlowError> {
    if let Some(hash) = &keys.status_hash {
        holds(hash, &live.indexed.kind, &KeyType::Hash)?;
    }
    let indexed = live.indexed.value.as_deref().map(|s| utf8(s, "status"));
    let tail = live.tail.as_ref().map(|t| t.as_ref().map_err(Clone::clone));
    match (indexed.transpose()?, tail.transpose()?) {
        (Some(status), _) => Ok(status),
        (None, Some(tail)) => tail.status.clone().ok_or_else(|| {
            FlowError::NotTerminal("none: no status index entry and no status event".into())
        }),
        (None, None) => live
            .snapshot
            .facts(max_bytes)?
            .status()
            .map(str::to_string)
            .ok_or_else(|| FlowError::Unreadable("no status in the index or the snapshot".into())),
    }
}

/// The flow's score in its status ZSET, if the layout has one.
fn score(live: &Live) -> Result<Option<f64>, FlowError> {
    match &live.score {
        None => Ok(None),
        Some(Err(e)) => Err(e.clone()),
        Some(Ok(set)) => {
            holds(&set.key, &set.kind, &KeyType::ZSet)?;
            Ok(set.score)
        }
    }
}

/// When the flow was last updated: the later of its status change (its score) and its last event (a
/// late event restarts the clock), else the snapshot's own `last_updated`.
fn last_update(live: &Live, score: Option<f64>, max_bytes: u64) -> Result<i64, FlowError> {
    let tail = live.tail.as_ref().and_then(|t| t.as_ref().ok());
    Ok(match (tail, score.and_then(eligible::score_ms)) {
        (Some(tail), score) => score.map_or(tail.last_ms, |s| s.max(tail.last_ms)),
        (None, Some(score)) => score,
        (None, None) => live.snapshot.facts(max_bytes)?.last_update_ms()?,
    })
}

/// `snapshot:seq` if the key exists (`engine::parse_seq`).
pub fn seq(found: &Found<Vec<u8>>, keys: &FlowKeys) -> Result<Option<i64>, FlowError> {
    let Some(key) = &keys.seq else {
        return Ok(None);
    };
    if !holds(key, &found.kind, &KeyType::String)? {
        return Ok(None);
    }
    engine::parse_seq(found.value.as_deref().unwrap_or_default())
        .map(Some)
        .map_err(FlowError::Unreadable)
}

/// The flow's labels; `None` when they passed the cap they were read under.
pub fn labels(
    found: Found<Pairs>,
    keys: &FlowKeys,
) -> Result<Option<Vec<(String, String)>>, FlowError> {
    let Some(key) = &keys.labels else {
        return Ok(Some(Vec::new()));
    };
    if !holds(key, &found.kind, &KeyType::Hash)? {
        return Ok(Some(Vec::new()));
    }
    let Some(pairs) = found.value else {
        return Ok(None);
    };
    label_texts(pairs).map(Some)
}

/// Labels as read (name, value) as text, taken over without a copy; refused if one is not UTF-8.
pub fn label_texts(
    pairs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> Result<Vec<(String, String)>, FlowError> {
    let text = |b: Vec<u8>, what: &str| String::from_utf8(b).map_err(|_| not_utf8(what));
    pairs
        .into_iter()
        .map(|(name, value)| Ok((text(name, "a label name")?, text(value, "a label value")?)))
        .collect()
}

fn utf8(b: &[u8], what: &str) -> Result<String, FlowError> {
    text(b, what).map(str::to_string)
}

/// `b` as text, or why `what` is unreadable.
pub fn text<'b>(b: &'b [u8], what: &str) -> Result<&'b str, FlowError> {
    std::str::from_utf8(b).map_err(|_| not_utf8(what))
}

fn not_utf8(what: &str) -> FlowError {
    FlowError::Unreadable(format!("{what} is not UTF-8"))
}

/// A snapshot over the cap could never be read back: the flow is refused before it is copied.
fn fits(len: u64, max_bytes: u64) -> Result<(), FlowError> {
    if len > max_bytes {
        return Err(too_large(max_bytes));
    }
    Ok(())
}

/// A flow larger than reads accept (`read-max-bytes`) could never be read back, so it is not archived.
pub fn too_large(max_bytes: u64) -> FlowError {
    FlowError::Unreadable(format!(
        "the flow is larger than flowarchive.read-max-bytes ({max_bytes} bytes), so it could not be read back; raise it to archive this flow"
    ))
}

/// The selection's test of a flow a sweep found by SCAN (no status ZSET to read): terminal by the
/// status hash or its log's end, and idle long enough since its last event. Facts that cannot be
/// judged (a key of another type, a log's end that cannot be read or passes the cap) make it a
/// candidate, so its capture reports why.
pub fn looks_eligible(
    indexed: &Found<Vec<u8>>,
    tail: Result<Tail, FlowError>,
    keys: &FlowKeys,
    layout: &Layout,
    window: &Window,
) -> bool {
    if let Some(hash) = &keys.status_hash {
        if holds(hash, &indexed.kind, &KeyType::Hash).is_err() {
            return true;
        }
    }
    let (Ok(indexed), Ok(tail)) = (
        indexed
            .value
            .as_deref()
            .map(|s| utf8(s, "status"))
            .transpose(),
        tail,
    ) else {
        return true;
    };
    indexed
        .or(tail.status)
        .is_some_and(|status| eligible::check(layout, &status, tail.last_ms, window).is_ok())
}

#[cfg(test)]
mod tests;
