//! Capture: reads one flow's keys natively inside the server, on the main thread.
//!
//! `inspect` decides whether a flow is archived now, in three phases: the caller's rights on every key
//! known without reading (`rights`), so nothing is read before they are; every fact the decision needs
//! read in one go (`read_facts`: types, lengths, the index entry, the status entries, the log's end,
//! the small keys); then the judgement on those facts, without the server (`judge`). What the commit
//! will touch beyond what the capture checked is checked last (`guard::check_rest`), so an archive
//! that could not commit is refused before anything is uploaded.
//!
//! `read_more` reads the log in bounded chunks, each in its own short main-thread step, so a flow of
//! 100,000 events never stalls the server in one go. A log longer than one chunk is followed by the
//! flow's watch from its first chunk on, so a write between two chunks is seen (`runtime::watch`).
//! So are a snapshot and a labels hash larger than one step reads (`WHOLE_BYTES`), read on in steps
//! too. The label indexes a flow's labels name are checked (the caller's rights on them, then their
//! types) once the labels are whole: by `inspect` for labels read in its step, else in the step after
//! the last of them is read.
//!
//! A flow is its event log: it is live while its log exists, whether or not it has a snapshot (most of
//! the engine's flows have none). A snapshot without a log is no flow. A live flow that is also in the
//! archive index is a new incarnation of an archived id (the engine started the id again): it is
//! archived as such, and its archive records the earlier one (`Captured::previous`, `Capture::previous`).

use redis_module::{Context, KeyType};

use crate::archive::eligible::Window;
use crate::archive::guard;
use crate::archive::judge::{self, Facts, Found, Live, LogEnd, Pairs, Scored, Snapshot, Verdict};
use crate::format::captured::Captured;
use crate::format::event_log::EventLog;
use crate::index::{self, Entry, Object};
use crate::layout::{FlowKeys, Layout, StateSource};
use crate::ops::configs::Settings;
use crate::ops::errors::FlowError;
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::cluster;
use crate::runtime::key::{HashPairs, HashScan, Key};
use crate::runtime::mainthread::{
    pieces, read_log, read_string_step, ByteCap, Counted, EVENTS_PER_STEP, WHOLE_BYTES,
};
use crate::runtime::server::{read_typed, type_of};
use crate::runtime::watch::{Watch, Writes};

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
    /// The length of a snapshot larger than one step reads (`WHOLE_BYTES`): followed by the watch
    /// from the capture's first step and measured, not read again, at commit; copied into
    /// `flow.snapshot` in steps (`read_more`) unless the judgement read it at once.
    pub large_snapshot: Option<usize>,
    /// A labels hash larger than one step reads (`WHOLE_BYTES`), while it is read on in steps
    /// (`read_more`): `flow.labels` is empty until it is whole.
    pub labels_left: Option<LabelSteps>,
    /// Whether the labels hash is larger than one step reads: followed by the watch from the capture's
    /// first step and counted, not read again, at commit.
    pub labels_followed: bool,
}

/// A labels hash read on in steps: where its scan goes on, and the labels read so far.
pub struct LabelSteps {
    scan: HashScan,
    pairs: HashPairs,
}

impl LabelSteps {
    fn new(scan: HashScan, first: Vec<(String, String)>) -> LabelSteps {
        let first = first.into_iter();
        LabelSteps {
            scan,
            pairs: first
                .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                .collect(),
        }
    }

    /// The bytes of the labels read so far.
    pub fn bytes(&self) -> u64 {
        self.pairs.bytes()
    }
}

impl Capture {
    pub fn complete(&self) -> bool {
        self.flow.events.len() >= self.events_total
            && self.snapshot_left() == 0
            && self.labels_left.is_none()
    }

    /// From now on, any of `writes` to the flow's own keys marks it changed (`Watch::follow`).
    pub fn follow(&mut self, ctx: &Context, writes: Writes) -> Result<(), FlowError> {
        let own: Vec<&str> = self.flow.keys.own().collect();
        self.watch.follow(ctx, &own, writes)
    }

    /// The bytes of a large snapshot still to copy.
    fn snapshot_left(&self) -> usize {
        let copied = self.flow.snapshot.as_ref().map_or(0, Vec::len);
        self.large_snapshot.unwrap_or(0).saturating_sub(copied)
    }

    /// Whether the event log was read in one step, so the commit can read it again whole.
    pub fn whole_log(&self) -> bool {
        !self.watch.follows()
    }
}

/// What `inspect` found.
pub enum Inspected {
    /// Eligible now: everything but the event log is read (`events_total` events to read), a
    /// large snapshot measured (`large_snapshot`) and a large labels hash begun (`labels_left`), the
    /// index entry of its earlier incarnation, if any, and on a cluster the slot of every key the
    /// archive touches.
    Eligible {
        flow: Box<Captured>,
        events_total: usize,
        large_snapshot: Option<usize>,
        labels_left: Option<LabelSteps>,
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

/// Every check an archive begins with (`archive::begin`), reading no events but the last and watching
/// nothing (also DRYRUN's test): rights, facts, judgement, then the commit's preconditions the
/// capture has not checked itself.
pub fn inspect(
    ctx: &Context,
    caller: &Caller,
    db: i32,
    id: &str,
    settings: &Settings,
    window: &Window,
) -> Result<Inspected, FlowError> {
    let (layout, max_bytes) = (&settings.layout, settings.read_max_bytes);
    let keys = layout.flow_keys(id);
    // On a cluster: the flow's keys all in its id's slot, and that slot archivable here now.
    let slot = cluster::placement(id, keys.named())?;
    cluster::archivable(ctx, slot)?;
    // Nothing is read before the caller is known to have the rights an archive needs on these keys,
    // every key of the archive allowed together with the others, as the keys of one command.
    let caller = caller.one_command();
    let caller: &Caller = &caller;
    let index_keys = rights(ctx, caller, &keys, id, predicted(settings))?;
    let facts = read_facts(ctx, caller, &keys, id, layout, max_bytes)?;
    let judged = match judge::judge(facts, &keys, layout, window, max_bytes)? {
        Verdict::Archived(location) => return Ok(Inspected::AlreadyArchived(location)),
        Verdict::Eligible(judged) => *judged,
    };
    // Labels read on in steps are empty until whole, and their label indexes unchecked till then.
    let (labels, labels_left) = match judged.labels_left {
        Some(scan) => (Vec::new(), Some(LabelSteps::new(scan, judged.labels))),
        None => (judged.labels, None),
    };
    let flow = Captured {
        id: id.to_string(),
        db,
        seq: judged.seq,
        labels,
        snapshot: judged.snapshot,
        keys,
        events: EventLog::new(judged.events_total.min(EVENTS_PER_STEP), max_bytes as usize),
        status: judged.status,
        status_score: judged.status_score,
        previous: judged.previous.as_ref().map(|e| e.location.clone()),
    };
    let previous = judged.previous;
    // A large snapshot copied whole for its own facts stays counted until the capture counts it
    // (`archive::begin`), or DRYRUN's test is done with it.
    let _counted = (judged.snapshot_cap, judged.labels_cap);
    guard::check_rest(ctx, caller, &flow, previous.as_ref(), layout, &index_keys)?;
    Ok(Inspected::Eligible {
        flow: Box::new(flow),
        events_total: judged.events_total,
        large_snapshot: (judged.snapshot_len > WHOLE_BYTES).then_some(judged.snapshot_len as usize),
        labels_left,
        previous,
        slot,
    })
}

/// Where the capture predicts the flow's object is recorded in the index: under the name limit of the
/// settings its upload uses, never the live config (the commit checks where it was stored).
fn predicted(settings: &Settings) -> Object<'_> {
    Object::Named(settings.s3.object_name_max)
}

/// The caller may remove the flow's own keys and its status entry, add its index entry and read the
/// lease: all in one check where the index keys are known without reading (the hash format), else the
/// own keys before the compact index's meta hash is read to find its keys. The keys the index entry
/// is written to.
fn rights(
    ctx: &Context,
    caller: &Caller,
    keys: &FlowKeys,
    id: &str,
    object: Object,
) -> Result<Vec<String>, FlowError> {
    let own = keys.own().map(|k| (k, Access::Remove));
    let status = keys.status_hash.as_deref().map(|k| (k, Access::Remove));
    let lease = keys.lease.as_deref().map(|k| (k, Access::Read));
    match index::written_keys_unread(keys) {
        Some(index_keys) => {
            let index = index_keys.iter().map(|k| (k.as_str(), Access::Add));
            acl::check_keys(ctx, caller, own.chain(index).chain(status).chain(lease))?;
            Ok(index_keys)
        }
        None => {
            acl::check_keys(ctx, caller, own)?;
            let index_keys = index::written_keys(ctx, caller, keys, id, object)?;
            let index = index_keys.iter().map(|k| (k.as_str(), Access::Add));
            acl::check_keys(ctx, caller, index.chain(status).chain(lease))?;
            Ok(index_keys)
        }
    }
}

/// Every fact the judgement needs, read in one go once the caller's rights are checked. Nothing here
/// refuses the flow: each key is read as far as its type allows, and a lookup that fails is recorded
/// as such, for the judge to rank. A key holding no event log ends the read (no flow, or an archived
/// one). The one key named by what is read, the status ZSET of the flow's status, is read last, once
/// the caller may remove from it.
fn read_facts(
    ctx: &Context,
    caller: &Caller,
    keys: &FlowKeys,
    id: &str,
    layout: &Layout,
    max_bytes: u64,
) -> Result<Facts, FlowError> {
    let entry = index::find(ctx, caller, keys, id);
    // Each key opened once for its type and its value.
    let (events, snapshot) = (Key::open(ctx, &keys.events), Key::open(ctx, &keys.snapshot));
    let mut facts = Facts {
        entry,
        events: events.kind(),
        snapshot: snapshot.kind(),
        live: None,
    };
    if facts.events != KeyType::List {
        return Ok(facts);
    }
    let len = events.len(KeyType::List)?;
    let leased = (keys.lease.as_deref()).is_some_and(|k| type_of(ctx, k) != KeyType::Empty);
    // Measured where the server holds it: a snapshot no read could take back is never copied, and a
    // large one is copied in steps once the flow is judged, unless its own status or last update
    // judges it (below).
    let snapshot_len = snapshot.string().map_or(0, <[u8]>::len) as u64;
    let whole = |at_most: u64| {
        let value = snapshot.string().filter(|v| v.len() as u64 <= at_most);
        value.map(<[u8]>::to_vec)
    };
    let snapshot_bytes = whole(WHOLE_BYTES.min(max_bytes));
    let member = keys.member.as_bytes();
    let (indexed_kind, indexed) =
        read_typed(ctx, keys.status_hash.as_deref(), KeyType::Hash, |k| {
            k.hash_get(member).transpose()
        });
    let indexed = indexed.transpose()?;
    let seq = found_seq(ctx, keys);
    // Labels no read could take back (they are part of the object) are not read whole either, nor
    // in this step more than `WHOLE_BYTES` of them: a larger hash is read on in steps.
    let labels = keys.labels.as_deref().map(|k| Key::open(ctx, k));
    let (labels, labels_left, labels_cap) = first_labels(labels.as_ref(), max_bytes);
    // Folded flows are judged by their log's end, the others by their snapshot.
    let mut end = LogEnd::new(len, indexed.is_none(), max_bytes);
    let tail = (layout.state == StateSource::Fold).then(|| {
        events.list_each(end.from(), len, |e| end.take(e))?;
        end.finish()
    });
    let mut live = Live {
        leased,
        len,
        snapshot: Snapshot::new(snapshot_len, snapshot_bytes),
        indexed: Found::from((indexed_kind, indexed)),
        tail,
        score: None,
        seq: Found::from(seq),
        labels: Found::from(labels),
        labels_left,
        labels_cap,
    };
    // A snapshot served as the state gives its own status where the index has none, and its own last
    // update where the status ZSET has no score: then it is read whole now (the folded layout's rules
    // never read it), counted before it is copied as the capture's cap counts any copy, until the
    // capture counts it. A copy that cap refuses (past `max_bytes`, or past `buffer-max-bytes` while
    // other reads hold bytes) is measured, not made, and refuses the flow.
    let own_facts = layout.state == StateSource::Snapshot && snapshot_len > WHOLE_BYTES;
    let copied_whole = || {
        let cap = ByteCap::new(snapshot_len, max_bytes, || judge::too_large(max_bytes));
        Snapshot::counted(snapshot_len, cap, || whole(max_bytes))
    };
    if own_facts && live.indexed.value.is_none() {
        live.snapshot = copied_whole();
    }
    let status = judge::status(&live, keys, max_bytes).ok();
    if let Some(set) = status.and_then(|status| layout.status_set_key(id, &status)) {
        live.score = Some(scored(ctx, caller, set, member));
    }
    let scored = matches!(&live.score, Some(Ok(Scored { score: Some(_), .. })));
    if own_facts && !scored && live.snapshot.cap.is_none() {
        live.snapshot = copied_whole();
    }
    facts.live = Some(live);
    Ok(facts)
}

/// The status ZSET `set` as read once the caller may remove from it: its type, and the flow's score in
/// it (read where the server holds it; on a cluster the guard places the key in the flow's slot).
fn scored(ctx: &Context, caller: &Caller, set: String, member: &[u8]) -> Result<Scored, FlowError> {
    acl::check(ctx, caller, &set, Access::Remove)?;
    let opened = Key::open(ctx, &set);
    let kind = opened.kind();
    let score = match kind {
        KeyType::ZSet => opened.zset_score(member)?,
        _ => None,
    };
    drop(opened);
    Ok(Scored {
        key: set,
        kind,
        score,
    })
}

/// The selection's test of a flow a sweep found by SCAN (`judge::looks_eligible`), reading the status
/// hash and the log's end only. A status hash the caller may not read is not read: the flow is a
/// candidate, which its capture refuses (`skipped_noperm`), so whether a flow is counted does not
/// tell the caller what that hash holds.
pub fn looks_eligible(
    ctx: &Context,
    caller: &Caller,
    layout: &Layout,
    id: &str,
    window: &Window,
    max_bytes: u64,
) -> bool {
    let keys = layout.flow_keys(id);
    let status = keys.status_hash.as_deref();
    if status.is_some_and(|k| acl::check(ctx, caller, k, Access::Read).is_err()) {
        return true;
    }
    let events = Key::open(ctx, &keys.events);
    if events.kind() != KeyType::List {
        return true;
    }
    let member = keys.member.as_bytes();
    let (kind, indexed) = read_typed(ctx, keys.status_hash.as_deref(), KeyType::Hash, |k| {
        k.hash_get(member).transpose()
    });
    let (Ok(len), Ok(indexed)) = (events.len(KeyType::List), indexed.transpose()) else {
        return true;
    };
    let mut end = LogEnd::new(len, indexed.is_none(), max_bytes);
    let read = events.list_each(end.from(), len, |e| end.take(e));
    let tail = read.map_err(FlowError::from).and_then(|()| end.finish());
    judge::looks_eligible(&Found::from((kind, indexed)), tail, &keys, layout, window)
}

/// The sequence key's type and value, for the judge (`judge::seq`).
fn found_seq(ctx: &Context, keys: &FlowKeys) -> (KeyType, Option<Vec<u8>>) {
    read_typed(ctx, keys.seq.as_deref(), KeyType::String, |k| {
        k.string().map(<[u8]>::to_vec)
    })
}

/// The labels hash's first pairs for the judge (`judge::labels`), read from it opened (`labels`): up to
/// `WHOLE_BYTES` (and the rest of the scan call that passes them), never past `max_bytes`; with the
/// scan to go on from where they are more (or, as one bucket can be, more than `WHOLE_BYTES` already).
/// Pairs past `WHOLE_BYTES` (one label can be as large as `max_bytes`) are each counted before they
/// are copied, as any copy is, with all read before them: the cap that counts them until the capture
/// does, or why they were measured and not copied (the pairs are then `None`).
fn first_labels(
    labels: Option<&Key>,
    max_bytes: u64,
) -> ((KeyType, Option<Pairs>), Option<HashScan>, Counted) {
    let Some(hash) = labels.filter(|k| k.kind() == KeyType::Hash) else {
        return (found_labels(labels, max_bytes), None, None);
    };
    let (mut scan, mut pairs) = (HashScan::new(), HashPairs::default());
    let mut counted: Counted = None;
    let over_cap = || judge::too_large(max_bytes);
    let within = hash.hash_pairs_on(
        &mut scan,
        &mut pairs,
        |bytes| bytes <= WHOLE_BYTES,
        |after, pair| {
            if after <= WHOLE_BYTES.min(max_bytes) {
                return true;
            }
            let taken = match counted.as_mut() {
                Some(Ok(cap)) => cap.take_bytes(pair, over_cap),
                Some(Err(_)) => return false,
                None => ByteCap::new(after, max_bytes, over_cap).map(|cap| {
                    counted = Some(Ok(cap));
                }),
            };
            taken
                .map_err(|refused| counted = Some(Err(refused)))
                .is_ok()
        },
    );
    if !within {
        return ((KeyType::Hash, None), None, counted);
    }
    let large = !scan.done() || pairs.bytes() > WHOLE_BYTES;
    (
        (KeyType::Hash, Some(pairs.into_vec())),
        large.then_some(scan),
        counted,
    )
}

/// The labels hash's type and pairs up to `budget` bytes, read from it opened (`labels`), for the
/// judge (`judge::labels`).
pub(super) fn found_labels(labels: Option<&Key>, budget: u64) -> (KeyType, Option<Pairs>) {
    labels.map_or((KeyType::Empty, None), |k| {
        k.read_as(KeyType::Hash, |k| k.hash_pairs(budget))
    })
}

/// `snapshot:seq` if the key exists (the commit's proof reads it again).
pub(super) fn read_seq(ctx: &Context, keys: &FlowKeys) -> Result<Option<i64>, FlowError> {
    judge::seq(&Found::from(found_seq(ctx, keys)), keys)
}

/// Reads the next chunk of a large snapshot (`mainthread::read_string_step`), else of a large labels
/// hash (`read_labels`), else of the event log (`mainthread::read_log`). Call on the main thread with
/// the flow's DB selected.
pub fn read_more(
    ctx: &Context,
    capture: &mut Capture,
    settings: &Settings,
) -> Result<(), FlowError> {
    if capture.watch.changed() {
        return Err(FlowError::Changed);
    }
    if let (Some(total), true) = (capture.large_snapshot, capture.snapshot_left() > 0) {
        let copied = capture.flow.snapshot.get_or_insert_with(Vec::new);
        let read = read_string_step(ctx, &capture.flow.keys.snapshot, total, copied);
        return read.stopped(|| judge::too_large(capture.cap.max));
    }
    if let Some(steps) = capture.labels_left.take_if(|steps| steps.scan.done()) {
        // The labels are whole: in a step of its own, the commit's checks, which `inspect` made of
        // every key but the label indexes they name (rights before any of them is looked at).
        capture.flow.labels = judge::label_texts(steps.pairs.into_vec())?;
        let previous = capture.previous.as_ref();
        let (layout, object) = (&settings.layout, predicted(settings));
        return guard::check(
            ctx,
            &capture.caller,
            &capture.flow,
            previous,
            layout,
            object,
        )
        .map(drop);
    }
    if let Some(steps) = &mut capture.labels_left {
        // Only a layout with a labels key has labels to read on (no key reads as a change).
        let key = capture.flow.keys.labels.as_deref().unwrap_or_default();
        return read_labels(ctx, key, steps, &mut capture.cap);
    }
    // Each event is measured before it is copied: a capture never holds more than the cap.
    let read = read_log(
        ctx,
        &capture.flow.keys.events,
        capture.events_total,
        &mut capture.flow.events,
        &mut capture.cap,
    )?;
    read.stopped(|| judge::too_large(capture.cap.max))
}

/// Reads on a large labels hash (`key`) into `steps`, each label measured into `cap` before it is
/// copied: whole scan calls, for as long as `mainthread::pieces` allows. A key that no longer holds a
/// hash is a change (its watch saw it too). Main thread.
fn read_labels(
    ctx: &Context,
    key: &str,
    steps: &mut LabelSteps,
    cap: &mut ByteCap,
) -> Result<(), FlowError> {
    let hash = Key::open(ctx, key);
    if hash.kind() != KeyType::Hash {
        return Err(FlowError::Changed);
    }
    let (go_on, from) = (pieces(), steps.pairs.bytes());
    let (mut refused, max) = (Ok(()), cap.max);
    hash.hash_pairs_on(
        &mut steps.scan,
        &mut steps.pairs,
        |bytes| go_on(bytes - from),
        |_, pair| {
            refused = cap.take_bytes(pair, || judge::too_large(max));
            refused.is_ok()
        },
    );
    refused
}
