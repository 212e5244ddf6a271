//! Capture: reads one flow's keys natively inside the server, on the main thread.
//!
//! `inspect` checks eligibility and reads everything but the event log; `read_more` reads the log in
//! bounded chunks, each in its own short main-thread step, so a flow of 100,000 events never stalls the
//! server in one go. A log longer than one chunk is followed by the flow's watch from its first chunk
//! on, so a write between two chunks is seen (`runtime::watch`).

use redis_module::{Context, KeyType};

use crate::archive::eligible::{self, SnapshotFacts, Window};
use crate::archive::flow::Captured;
use crate::archive::guard;
use crate::index;
use crate::layout::{FlowKeys, Layout};
use crate::ops::errors::{show_key, FlowError};
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::cluster;
use crate::runtime::mainthread::{read_log, ByteCap, LogRead, EVENTS_PER_STEP};
use crate::runtime::server::{
    bytes, call, expect_type, hash_pairs, list_len, read_string, with_string,
};
use crate::runtime::watch::Watch;

/// A capture in progress: the flow, how long its event log is, and the watch that claims it.
pub struct Capture {
    pub flow: Captured,
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
    /// Eligible now: everything but the event log is read.
    Eligible(Box<Captured>, usize),
    /// Not live and already in the index: its location.
    AlreadyArchived(String),
}

pub enum Start {
    Capture(Box<Capture>),
    /// Not live and already in the index: its location.
    AlreadyArchived(String),
}

fn utf8(b: Vec<u8>, what: &str) -> Result<String, FlowError> {
    String::from_utf8(b).map_err(|_| FlowError::Unreadable(format!("{what} is not UTF-8")))
}

/// Every check an archive begins with (`archive::begin`), reading no events and watching nothing
/// (also DRYRUN's test).
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
    // Nothing is read before the caller is known to have the rights an archive needs on these keys.
    acl::check_all(ctx, caller, keys.own(), Access::Remove)?;
    let index_keys = index::written_keys(ctx, caller, &keys, id)?;
    acl::check_all(
        ctx,
        caller,
        index_keys.iter().map(String::as_str),
        Access::Add,
    )?;
    if let Some(hash) = &keys.status_hash {
        acl::check(ctx, caller, hash, Access::Remove)?;
    }
    if let Some(location) = live_or_archived(ctx, caller, &keys, id)? {
        return Ok(Inspected::AlreadyArchived(location));
    }
    // Measured where the server holds it: a snapshot no read could take back is never copied.
    let snapshot = Snapshot {
        key: &keys.snapshot,
        len: with_string(ctx, &keys.snapshot, |v| v.map_or(0, <[u8]>::len)) as u64,
        max_bytes,
    };
    // Parsed lazily and in place: only layouts without a status index need the snapshot's own fields.
    let mut facts: Option<SnapshotFacts> = None;
    let status = match indexed_status(ctx, &keys)? {
        Some(status) => status,
        None => parsed(&mut facts, ctx, &snapshot)?
            .status()
            .map(str::to_string)
            .ok_or_else(|| {
                FlowError::Unreadable("no status in the index or the snapshot".into())
            })?,
    };
    let status_score = match layout.status_set_key(id, &status) {
        Some(set) => status_score(ctx, caller, &set, &keys.member)?,
        None => None,
    };
    let last_update_ms = match status_score.as_deref().and_then(|s| s.parse::<f64>().ok()) {
        Some(ms) => ms as i64,
        None => parsed(&mut facts, ctx, &snapshot)?.last_update_ms()?,
    };
    eligible::check(layout, &status, last_update_ms, window)?;
    snapshot.fits()?;
    let snapshot = read_string(ctx, &keys.snapshot).unwrap_or_default();
    let events_total = list_len(ctx, &keys.events)?;
    let flow = Captured {
        id: id.to_string(),
        db,
        seq: read_seq(ctx, &keys)?,
        // Labels no read could take back (they are part of the object) are not read whole either.
        labels: read_labels(ctx, &keys, max_bytes)?.ok_or_else(|| too_large(max_bytes))?,
        keys,
        events: Vec::with_capacity(events_total.min(EVENTS_PER_STEP)),
        snapshot,
        status,
        status_score,
    };
    guard::check(ctx, caller, &flow, layout)?;
    Ok(Inspected::Eligible(Box::new(flow), events_total))
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

/// `None` for a live flow with no index entry; the location of one archived already; an error for a
/// flow that is gone, half there, or live and indexed at once.
fn live_or_archived(
    ctx: &Context,
    caller: &Caller,
    keys: &FlowKeys,
    id: &str,
) -> Result<Option<String>, FlowError> {
    let has_events = expect_type(ctx, &keys.events, &KeyType::List)?;
    let has_snapshot = expect_type(ctx, &keys.snapshot, &KeyType::String)?;
    match (
        has_events,
        has_snapshot,
        index::location(ctx, caller, keys, id)?,
    ) {
        (false, false, Some(location)) => Ok(Some(location)),
        (false, false, None) => Err(FlowError::NotFound),
        (_, _, Some(location)) => Err(FlowError::Conflict(location)),
        (true, true, None) => Ok(None),
        (_, has_snapshot, None) => Err(FlowError::Unreadable(format!(
            "{} {} is missing",
            if has_snapshot {
                "event log"
            } else {
                "snapshot"
            },
            show_key(if has_snapshot {
                &keys.events
            } else {
                &keys.snapshot
            })
        ))),
    }
}

/// The status the engine-wide status hash records for the flow, if the layout has one and it does.
fn indexed_status(ctx: &Context, keys: &FlowKeys) -> Result<Option<String>, FlowError> {
    let Some(hash) = &keys.status_hash else {
        return Ok(None);
    };
    expect_type(ctx, hash, &KeyType::Hash)?;
    let reply = call(ctx, "HGET", &[hash.as_bytes(), keys.member.as_bytes()])?;
    bytes(&reply).map(|s| utf8(s, "status")).transpose()
}

/// The flow's score in its status ZSET, as stored.
fn status_score(
    ctx: &Context,
    caller: &Caller,
    set: &str,
    member: &str,
) -> Result<Option<String>, FlowError> {
    acl::check(ctx, caller, set, Access::Remove)?;
    expect_type(ctx, set, &KeyType::ZSet)?;
    let reply = call(ctx, "ZSCORE", &[set.as_bytes(), member.as_bytes()])?;
    Ok(bytes(&reply).map(|b| String::from_utf8_lossy(&b).into_owned()))
}

pub(super) fn read_seq(ctx: &Context, keys: &FlowKeys) -> Result<Option<i64>, FlowError> {
    let Some(k) = &keys.seq else { return Ok(None) };
    if !expect_type(ctx, k, &KeyType::String)? {
        return Ok(None);
    }
    let raw = utf8(read_string(ctx, k).unwrap_or_default(), "snapshot sequence")?;
    raw.trim()
        .parse::<i64>()
        .map(Some)
        .map_err(|_| FlowError::Unreadable(format!("snapshot sequence {raw:?} is not an integer")))
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
