//! Capture: reads one flow's keys natively inside the server, on the main thread.
//!
//! `inspect` checks eligibility and reads everything but the event log; `read_more` reads the log in
//! bounded chunks, each in its own short main-thread step, so a flow of 100,000 events never stalls the
//! server in one go. A log longer than one chunk is followed by the flow's watch from its first chunk
//! on, so a write between two chunks is seen (`runtime::watch`).
//!
//! A flow is its event log: it is live while its log exists, whether or not it has a snapshot (most of
//! the engine's flows have none). A snapshot without a log is no flow. A live flow that is also in the
//! archive index is a new incarnation of an archived id (the engine started the id again): it is
//! archived as such, and its archive records the earlier one (`Captured::previous`, `Capture::previous`).

use std::ops::ControlFlow;

use redis_module::{Context, KeyType};

use crate::archive::eligible::{self, SnapshotFacts, Window};
use crate::archive::guard;
use crate::format::captured::Captured;
use crate::format::engine;
use crate::index::{self, Entry};
use crate::layout::{FlowKeys, Layout, StateSource};
use crate::ops::errors::FlowError;
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::cluster;
use crate::runtime::mainthread::{read_log, ByteCap, LogRead, EVENTS_PER_STEP};
use crate::runtime::server::{
    bytes, call, expect_type, hash_get, hash_pairs, list_len, list_range_each, read_string,
    type_of, with_string,
};
use crate::runtime::watch::Watch;

/// A capture in progress: the flow, how long its event log is, and the watch that claims it.
pub struct Capture {
    pub flow: Captured,
    /// The index entry of the flow's earlier incarnation (`Captured::previous` is its location): the
    /// commit requires the index to name exactly it still, and replaces it.
    pub previous: Option<Entry>,
    /// On whose behalf: the commit checks this user's ACL again.
    pub caller: Caller,
    pub events_total: usize,
    pub watch: Watch,
    /// The longest single main-thread stretch spent on this flow so far, in microseconds.
    pub held_us: u64,
    /// Bytes read so far, and the most a capture may hold (`read-max-bytes`: an object larger than
    /// reads accept could never be read back, so it is never archived, and memory stays bounded).
    pub cap: ByteCap,
    /// On a cluster, the migration generation of the flow's slot when it was read (see `cluster`).
    pub motion: u32,
}

impl Capture {
    pub fn complete(&self) -> bool {
        self.flow.events.len() >= self.events_total
    }

    /// Whether the event log was read in one step, so the commit can read it again whole.
    pub fn whole_log(&self) -> bool {
        !self.watch.follows()
    }
}

/// What `inspect` found.
pub enum Inspected {
    /// Eligible now: everything but the event log is read (`events_total` events to read), the
    /// index entry of its earlier incarnation, if any, and on a cluster the slot of every key the
    /// archive touches.
    Eligible {
        flow: Box<Captured>,
        events_total: usize,
        previous: Option<Entry>,
        slot: Option<u16>,
    },
    /// Not live and already in the index: its location.
    AlreadyArchived(String),
}

pub enum Start {
    Capture(Box<Capture>),
    /// Not live and already in the index: its location.
    AlreadyArchived(String),
}

impl Start {
    /// A capture that held the main thread for `us`: the stretch of the step that began it.
    pub fn held_for(self, us: u64) -> Start {
        match self {
            Start::Capture(mut c) => {
                c.held_us = us;
                Start::Capture(c)
            }
            other => other,
        }
    }
}

fn utf8(b: Vec<u8>, what: &str) -> Result<String, FlowError> {
    String::from_utf8(b).map_err(|_| FlowError::Unreadable(format!("{what} is not UTF-8")))
}

/// How far back from the end of a log the status is looked for when no status index names it: the
/// engine's terminal batch ends the log, and only a few late events can follow it.
const STATUS_LOOKBACK: usize = 64;

/// Every check an archive begins with (`archive::begin`), reading no events but the last and watching
/// nothing (also DRYRUN's test).
pub fn inspect(
    ctx: &Context,
    caller: &Caller,
    db: i32,
    id: &str,
    layout: &Layout,
    window: &Window,
    max_bytes: u64,
) -> Result<Inspected, FlowError> {
    let keys = layout.flow_keys(id);
    // On a cluster: the flow's keys all in its id's slot, and that slot archivable here now.
    cluster::archivable(ctx, cluster::placement(id, keys.named())?)?;
    // Nothing is read before the caller is known to have the rights an archive needs on these keys,
    // every key of the archive allowed together with the others, as the keys of one command.
    let caller = caller.one_command();
    let caller: &Caller = &caller;
    rights(ctx, caller, &keys, id)?;
    let previous = match presence(ctx, caller, &keys, id, layout.state)? {
        Presence::Archived(location) => return Ok(Inspected::AlreadyArchived(location)),
        Presence::Live(previous) => previous,
    };
    unleased(ctx, caller, &keys)?;
    let events_total = list_len(ctx, &keys.events)?;
    // Measured where the server holds it: a snapshot no read could take back is never copied.
    let snapshot = Snapshot {
        key: &keys.snapshot,
        len: with_string(ctx, &keys.snapshot, |v| v.map_or(0, <[u8]>::len)) as u64,
        max_bytes,
    };
    let indexed = indexed_status(ctx, &keys)?;
    // Folded flows are judged by their log's end, the others by their snapshot.
    let tail = match layout.state {
        StateSource::Fold => Some(tail(
            ctx,
            &keys.events,
            events_total,
            indexed.is_none(),
            max_bytes,
        )?),
        StateSource::Snapshot => None,
    };
    let mut facts: Option<SnapshotFacts> = None;
    let status = status_of(ctx, indexed, tail.as_ref(), &mut facts, &snapshot)?;
    let status_score = status_score(ctx, caller, layout, id, &status, &keys.member)?;
    let score_ms = status_score.as_deref().and_then(eligible::score_ms);
    // Idle since the later of the status change and the last event: a late event restarts the clock.
    let last_update_ms = match (&tail, score_ms) {
        (Some(tail), score) => score.map_or(tail.last_ms, |s| s.max(tail.last_ms)),
        (None, Some(score)) => score,
        (None, None) => parsed(&mut facts, ctx, &snapshot)?.last_update_ms()?,
    };
    eligible::check(layout, &status, last_update_ms, window)?;
    snapshot.fits()?;
    let flow = Captured {
        id: id.to_string(),
        db,
        seq: read_seq(ctx, &keys)?,
        // Labels no read could take back (they are part of the object) are not read whole either.
        labels: read_labels(ctx, &keys, max_bytes)?.ok_or_else(|| too_large(max_bytes))?,
        snapshot: read_string(ctx, &keys.snapshot),
        keys,
        events: Vec::with_capacity(events_total.min(EVENTS_PER_STEP)),
        status,
        status_score,
        previous: previous.as_ref().map(|e| e.location.clone()),
    };
    let slot = guard::check(ctx, caller, &flow, previous.as_ref(), layout)?;
    Ok(Inspected::Eligible {
        flow: Box::new(flow),
        events_total,
        previous,
        slot,
    })
}

/// The caller may remove the flow's own keys and its status entry and add its index entry.
/// All in one check where the index keys are known without reading (the hash format), else the own
/// keys before the compact index's meta hash is read to find its keys.
fn rights(ctx: &Context, caller: &Caller, keys: &FlowKeys, id: &str) -> Result<(), FlowError> {
    let own = keys.own().map(|k| (k, Access::Remove));
    let status = keys.status_hash.as_deref().map(|k| (k, Access::Remove));
    let index_keys = match index::written_keys_unread(keys) {
        Some(index_keys) => {
            let index = index_keys.iter().map(|k| (k.as_str(), Access::Add));
            return acl::check_keys(ctx, caller, own.chain(index).chain(status));
        }
        None => {
            acl::check_keys(ctx, caller, own)?;
            index::written_keys(ctx, caller, keys, id)?
        }
    };
    let index = index_keys.iter().map(|k| (k.as_str(), Access::Add));
    acl::check_keys(ctx, caller, index.chain(status))
}

/// The flow's status: its status index entry, else the status its log's end records (folded flows)
/// or its snapshot's.
fn status_of(
    ctx: &Context,
    indexed: Option<String>,
    tail: Option<&Tail>,
    facts: &mut Option<SnapshotFacts>,
    snapshot: &Snapshot,
) -> Result<String, FlowError> {
    match (indexed, tail) {
        (Some(status), _) => Ok(status),
        (None, Some(tail)) => tail.status.clone().ok_or_else(|| {
            FlowError::NotTerminal("none: no status index entry and no status event".into())
        }),
        (None, None) => parsed(facts, ctx, snapshot)?
            .status()
            .map(str::to_string)
            .ok_or_else(|| FlowError::Unreadable("no status in the index or the snapshot".into())),
    }
}

/// The flow's snapshot key, its length where the server holds it, and the capture's cap.
struct Snapshot<'k> {
    key: &'k str,
    len: u64,
    max_bytes: u64,
}

impl Snapshot<'_> {
    /// A snapshot over the cap could never be read back: the flow is refused before it is copied.
    fn fits(&self) -> Result<(), FlowError> {
        if self.len > self.max_bytes {
            return Err(too_large(self.max_bytes));
        }
        Ok(())
    }
}

/// The snapshot's facts, parsed on first use where the server holds the snapshot.
fn parsed<'f>(
    facts: &'f mut Option<SnapshotFacts>,
    ctx: &Context,
    snapshot: &Snapshot,
) -> Result<&'f SnapshotFacts, FlowError> {
    match facts {
        Some(f) => Ok(f),
        None => {
            snapshot.fits()?;
            let read = with_string(ctx, snapshot.key, |v| {
                SnapshotFacts::parse(v.unwrap_or_default())
            })?;
            Ok(facts.insert(read))
        }
    }
}

/// Whether a flow is live (with the index entry of an earlier incarnation, if any) or archived.
enum Presence {
    Live(Option<Entry>),
    Archived(String),
}

/// A flow is live while its event log exists; without one it is archived if the index names it, else
/// unknown (a snapshot alone is no flow). A layout whose state is its snapshot needs that too.
fn presence(
    ctx: &Context,
    caller: &Caller,
    keys: &FlowKeys,
    id: &str,
    state: StateSource,
) -> Result<Presence, FlowError> {
    let has_events = expect_type(ctx, &keys.events, &KeyType::List)?;
    let has_snapshot = expect_type(ctx, &keys.snapshot, &KeyType::String)?;
    let entry = index::find(ctx, caller, keys, id)?;
    match entry {
        _ if has_events => {
            if state == StateSource::Snapshot && !has_snapshot {
                return Err(FlowError::Unreadable(format!(
                    "snapshot {} is missing",
                    crate::ops::errors::show_key(&keys.snapshot)
                )));
            }
            Ok(Presence::Live(entry))
        }
        Some(entry) => Ok(Presence::Archived(entry.location)),
        None => Err(FlowError::NotFound),
    }
}

/// Refuses a flow the engine's own archiver holds (its lease key exists): it is left to that archiver.
pub fn unleased(ctx: &Context, caller: &Caller, keys: &FlowKeys) -> Result<(), FlowError> {
    let Some(lease) = &keys.lease else {
        return Ok(());
    };
    acl::check(ctx, caller, lease, Access::Read)?;
    if type_of(ctx, lease) != KeyType::Empty {
        return Err(FlowError::Leased(lease.clone()));
    }
    Ok(())
}

/// What the end of an event log says: when its last event happened, and the status the engine's
/// indexer last set (looked for only when `want_status`).
struct Tail {
    last_ms: i64,
    status: Option<String>,
}

/// Reads the last event of a log of `len` events (and, for the status, up to `STATUS_LOOKBACK` before
/// it, newest first). An element the engine could not read as an event makes the flow unreadable.
///
/// Main thread: each element is measured before it is read, and once those measured pass `max_bytes`
/// (`read-max-bytes`, each with its line end, as a capture counts them) the flow is too large to
/// archive and nothing more is read: a huge late event costs the server a copy, not a parse. The
/// others take `event_facts` a bounded amount of work per byte.
fn tail(
    ctx: &Context,
    key: &str,
    len: usize,
    want_status: bool,
    max_bytes: u64,
) -> Result<Tail, FlowError> {
    let from = len.saturating_sub(if want_status { STATUS_LOOKBACK } else { 1 });
    let mut facts = Vec::with_capacity(len - from);
    let mut failed = None;
    let mut used = 0u64;
    list_range_each(ctx, key, from, len, |element| {
        used += element.len() as u64 + 1;
        if used > max_bytes {
            failed = Some(too_large(max_bytes));
            return ControlFlow::Break(());
        }
        match engine::event_facts(element) {
            Ok(f) => facts.push(f),
            Err(e) => {
                let at = from + facts.len();
                failed = Some(FlowError::Unreadable(format!("event {at}: {e}")));
            }
        }
        if failed.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    if let Some(error) = failed {
        return Err(error);
    }
    let last = facts
        .last()
        .ok_or_else(|| FlowError::Unreadable("the event log is empty".into()))?;
    let status = facts.iter().rev().find_map(|f| f.sets_status.clone());
    Ok(Tail {
        last_ms: last.unix_ms,
        status,
    })
}

/// The selection's test of a flow a sweep found by SCAN (no status ZSET to read): terminal by the
/// status index or its log's end, and idle long enough since its last event. A log whose end cannot be
/// read, or passes `max_bytes` (`read-max-bytes`), is a candidate, so its capture reports why.
pub fn looks_eligible(
    ctx: &Context,
    layout: &Layout,
    id: &str,
    window: &Window,
    max_bytes: u64,
) -> bool {
    let keys = layout.flow_keys(id);
    let (Ok(len), Ok(indexed)) = (list_len(ctx, &keys.events), indexed_status(ctx, &keys)) else {
        return true;
    };
    let Ok(tail) = tail(ctx, &keys.events, len, indexed.is_none(), max_bytes) else {
        return true;
    };
    indexed
        .or(tail.status)
        .is_some_and(|status| eligible::check(layout, &status, tail.last_ms, window).is_ok())
}

/// The status the engine-wide status hash records for the flow, if the layout has one and it does.
fn indexed_status(ctx: &Context, keys: &FlowKeys) -> Result<Option<String>, FlowError> {
    let Some(hash) = &keys.status_hash else {
        return Ok(None);
    };
    expect_type(ctx, hash, &KeyType::Hash)?;
    hash_get(ctx, hash, keys.member.as_bytes())?
        .map(|s| utf8(s, "status"))
        .transpose()
}

/// The flow's score in the status ZSET of `status`, as stored, if the layout has one.
fn status_score(
    ctx: &Context,
    caller: &Caller,
    layout: &Layout,
    id: &str,
    status: &str,
    member: &str,
) -> Result<Option<String>, FlowError> {
    let Some(set) = layout.status_set_key(id, status) else {
        return Ok(None);
    };
    acl::check(ctx, caller, &set, Access::Remove)?;
    expect_type(ctx, &set, &KeyType::ZSet)?;
    let reply = call(ctx, "ZSCORE", &[set.as_bytes(), member.as_bytes()])?;
    Ok(bytes(&reply).map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// `snapshot:seq` if the key exists (`engine::parse_seq`).
pub(super) fn read_seq(ctx: &Context, keys: &FlowKeys) -> Result<Option<i64>, FlowError> {
    let Some(k) = &keys.seq else { return Ok(None) };
    if !expect_type(ctx, k, &KeyType::String)? {
        return Ok(None);
    }
    let raw = read_string(ctx, k).unwrap_or_default();
    engine::parse_seq(&raw)
        .map(Some)
        .map_err(FlowError::Unreadable)
}

/// The flow's labels; `None` when their names and values pass `budget` bytes (read no further).
pub(super) fn read_labels(
    ctx: &Context,
    keys: &FlowKeys,
    budget: u64,
) -> Result<Option<Vec<(String, String)>>, FlowError> {
    let Some(k) = &keys.labels else {
        return Ok(Some(Vec::new()));
    };
    if !expect_type(ctx, k, &KeyType::Hash)? {
        return Ok(Some(Vec::new()));
    }
    let Some(pairs) = hash_pairs(ctx, k, budget) else {
        return Ok(None);
    };
    pairs
        .into_iter()
        .map(|(name, value)| Ok((utf8(name, "a label name")?, utf8(value, "a label value")?)))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Reads the next chunk of the event log (`mainthread::read_log`). Call on the main thread with the
/// flow's DB selected.
pub fn read_more(ctx: &Context, capture: &mut Capture) -> Result<(), FlowError> {
    if capture.watch.changed() {
        return Err(FlowError::Changed);
    }
    // Each event is measured before it is copied: a capture never holds more than the cap.
    let read = read_log(
        ctx,
        &capture.flow.keys.events,
        capture.events_total,
        &mut capture.flow.events,
        &mut capture.cap,
    )?;
    match read {
        LogRead::Read => Ok(()),
        LogRead::OverCap => Err(too_large(capture.cap.max)),
        LogRead::Full(max) => Err(FlowError::Full(max)),
        // Fewer elements than LLEN said: the list shrank since.
        LogRead::Shrunk => Err(FlowError::Changed),
    }
}

/// A flow larger than reads accept (`read-max-bytes`) could never be read back, so it is not archived.
fn too_large(max_bytes: u64) -> FlowError {
    FlowError::Unreadable(format!(
        "the flow is larger than flowarchive.read-max-bytes ({max_bytes} bytes), so it could not be read back; raise it to archive this flow"
    ))
}
