//! Archiving one flow: `begin` (eligibility and the first chunk, on the main thread) → capture (the rest
//! of a long log, in short main-thread steps) → encode (and read back) → store (write-once, verified) →
//! commit (on the main thread). FLOWARCHIVE.FLOW and the sweep both enter through `begin` and run the
//! same stages; any failure before the commit leaves Valkey untouched.

pub mod capture;
pub mod commit;
pub mod eligible;
pub mod guard;
pub mod judge;
pub mod proof;
pub mod store;

use std::sync::atomic::Ordering;

use redis_module::{Context, RedisError, RedisResult, RedisValue};

use crate::archive::capture::{Capture, Inspected, Start};
use crate::archive::eligible::Window;
use crate::archive::proof::Fingerprint;
use crate::digest::hex;
use crate::format::captured::Captured;
use crate::format::{engine, writer};
use crate::layout::{Layout, StateSource};
use crate::ops::configs::Settings;
use crate::ops::errors::{self, FlowError};
use crate::ops::metrics::{self, Buffered, Stage, UPLOADS_IN_FLIGHT};
use crate::runtime::acl::Caller;
use crate::runtime::blocking::{answer_later, refuse_where_it_cannot_run, this_client};
use crate::runtime::cluster;
use crate::runtime::mainthread::{self, ByteCap};
use crate::runtime::pool::Pool;
use crate::runtime::reply::map;
use crate::runtime::server::selected_db;
use crate::runtime::watch::{Watch, Writes};
use crate::s3::Store;

/// What an archive answers: FLOWARCHIVE.FLOW's reply, the sweep's counters.
pub struct Archived {
    /// Longest single main-thread stretch spent on this flow (capture chunk or commit).
    pub main_thread_us: u64,
    pub location: String,
    pub events: usize,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub sha256: String,
}

impl Archived {
    pub fn reply(self) -> RedisValue {
        let int = |n: u64| RedisValue::Integer(n as i64);
        map([
            ("location", RedisValue::BulkString(self.location)),
            ("events", int(self.events as u64)),
            ("raw_bytes", int(self.raw_bytes)),
            ("stored_bytes", int(self.stored_bytes)),
            ("sha256", RedisValue::BulkString(self.sha256)),
            ("already_archived", int(0)),
            ("main_thread_us", int(self.main_thread_us)),
        ])
    }
}

/// The reply for a flow that is archived already (in the index, no live keys).
pub fn already_archived(location: String) -> RedisValue {
    map([
        ("location", RedisValue::BulkString(location)),
        ("already_archived", RedisValue::Integer(1)),
    ])
}

/// Workers for FLOWARCHIVE.FLOW calls: each waits on S3 most of the time, so a few threads serve many
/// calls; calls beyond the queue get a busy error instead of a thread each.
pub static FLOW_POOL: Pool = Pool::new("flowarchive-flow", 8, 256);

/// FLOWARCHIVE.FLOW: begins the archive in the command, then hands the rest to a worker; only the
/// calling client waits for it.
pub fn archive_now(ctx: &Context, id: String, force: bool) -> RedisResult {
    refuse_where_it_cannot_run(ctx, "FLOWARCHIVE.FLOW", true)?;
    let settings = Settings::current();
    settings
        .usable()
        .map_err(|why| refused(&id, &FlowError::Unsafe(why)))?;
    let s3 = Store::new(&settings.s3).map_err(|e| RedisError::String(format!("ERR {e}")))?;
    let window = Window::now(settings.retention_ms, force);
    let caller = Caller::of(ctx);
    let capture = match begin(ctx, &caller, selected_db(ctx), &id, &settings, &window) {
        Ok(Start::Capture(c)) => *c,
        Ok(Start::AlreadyArchived(location)) => return Ok(already_archived(location)),
        Err(e) => return Err(refused(&id, &e)),
    };
    let work = move || {
        run(capture, &settings, &s3)
            .map(Archived::reply)
            .map_err(|e| refused(&id, &e))
    };
    answer_later(&FLOW_POOL, errors::FLOW_BUSY, || this_client(ctx), work)?;
    Ok(RedisValue::NoReply)
}

/// Counts and logs a failed archive; its error reply.
fn refused(id: &str, e: &FlowError) -> RedisError {
    metrics::failed(id, e);
    RedisError::String(e.message(id))
}

/// Begins archiving `id` in `db` for `caller`, on the main thread (FLOWARCHIVE.FLOW, in its command):
/// `begin_untimed`, its stretch timed into the capture stage and the flow's `held_us`.
pub fn begin(
    ctx: &Context,
    caller: &Caller,
    db: i32,
    id: &str,
    settings: &Settings,
    window: &Window,
) -> Result<Start, FlowError> {
    let mut held = 0;
    metrics::timed(Stage::Capture, &mut held, || {
        begin_untimed(ctx, caller, db, id, settings, window)
    })
    .map(|started| started.held_for(held))
}

/// Every eligibility check, the change watch and the first chunk of the event log: how FLOW and the
/// sweep both begin. Main thread, in a stretch its caller times (`begin`, or the sweep's step).
fn begin_untimed(
    ctx: &Context,
    caller: &Caller,
    db: i32,
    id: &str,
    settings: &Settings,
    window: &Window,
) -> Result<Start, FlowError> {
    let (flow, events_total, large_snapshot, labels_left, previous, slot) =
        match capture::inspect(ctx, caller, db, id, settings, window)? {
            Inspected::AlreadyArchived(location) => return Ok(Start::AlreadyArchived(location)),
            Inspected::Eligible {
                flow,
                events_total,
                large_snapshot,
                labels_left,
                previous,
                slot,
            } => (
                *flow,
                events_total,
                large_snapshot,
                labels_left,
                previous,
                slot,
            ),
        };
    // On a cluster, the slot's migration generation now: the commit refuses if it changed.
    let motion = cluster::motion(slot);
    let watch = Watch::claim(db, id).ok_or(FlowError::Busy)?;
    let snapshot = large_snapshot.or(flow.snapshot.as_ref().map(Vec::len));
    // What a large labels hash's first step read counts with the snapshot, and its later steps on.
    let labels = labels_left.as_ref().map_or(0, capture::LabelSteps::bytes);
    let mut capture = Capture {
        cap: ByteCap::new(
            snapshot.unwrap_or(0) as u64 + labels,
            settings.read_max_bytes,
            || judge::too_large(settings.read_max_bytes),
        )?,
        flow,
        previous,
        caller: caller.clone(),
        events_total,
        watch,
        held_us: 0,
        motion,
        large_snapshot,
        labels_followed: labels_left.is_some(),
        labels_left,
    };
    // A snapshot or labels hash too large to compare at commit: followed from the step that measured
    // it, or read its first part, on.
    if large_snapshot.is_some() {
        capture.follow(ctx, Writes::ListsAndStrings)?;
    }
    if capture.labels_followed {
        capture.follow(ctx, Writes::ListsAndHashes)?;
    }
    capture::read_more(ctx, &mut capture, settings)?;
    if !capture.complete() || !proof::comparable(capture.flow.events.bytes()) {
        // Read over several steps, or too large for the commit to compare in its one step: follow
        // the log's writes from this step on.
        capture.follow(ctx, Writes::Lists)?;
    }
    Ok(Start::Capture(Box::new(capture)))
}

/// Begins archiving several flows of `db` (the sweep), as many per main-thread step as
/// the step budget (`step-budget-us`) allows, each exactly as `begin`: the outcome of each, in order. The rest of
/// a long event log is then read by `finish_capture`, in its own steps.
pub fn begin_many(
    caller: &Caller,
    db: i32,
    ids: &[String],
    settings: &Settings,
    window: &Window,
) -> Vec<Result<Start, FlowError>> {
    let mut out = Vec::with_capacity(ids.len());
    while out.len() < ids.len() {
        let rest = &ids[out.len()..];
        let mut held = 0;
        let ran = mainthread::step_batch(db, Stage::Capture, &mut held, rest, |ctx, id| {
            begin_untimed(ctx, caller, db, id, settings, window)
        });
        match ran {
            // Each flow held the main thread for the whole step it shared.
            Ok(started) => out.extend(
                started
                    .into_iter()
                    .map(|started| started.map(|start| start.held_for(held))),
            ),
            Err(e) => out.extend(rest.iter().map(|_| Err(FlowError::from(e.clone())))),
        }
    }
    out
}

/// Reads the rest of a large snapshot, a large labels hash and a long event log, one chunk per
/// main-thread step.
pub fn finish_capture(capture: &mut Capture, settings: &Settings) -> Result<(), FlowError> {
    let db = capture.flow.db;
    let mut held = capture.held_us;
    while !capture.complete() {
        mainthread::step(db, Stage::Capture, &mut held, |ctx| {
            capture::read_more(ctx, capture, settings)
        })?;
    }
    capture.held_us = held;
    Ok(())
}

/// A flow whose object is stored and verified, waiting for its commit.
pub struct Uploaded {
    capture: Capture,
    /// What the object holds of the flow's keys, for the commit to compare.
    archived: Fingerprint,
    stored: Stored,
}

/// What an upload stored, for the commit's index entry and the archive's answer.
struct Stored {
    id: String,
    events: usize,
    location: String,
    raw_bytes: u64,
    stored_bytes: u64,
    sha256: String,
}

impl Uploaded {
    /// The flow as the commit takes it: what it stored, its capture, its fingerprint and location.
    fn pending(self) -> commit::Pending<Stored> {
        let location = self.stored.location.clone();
        (self.stored, self.capture, self.archived, location)
    }
}

impl Stored {
    /// A commit's outcome for the flow's id: counted and answered when it committed after holding the
    /// main thread for `held` µs at most.
    fn outcome(
        (stored, result): (Stored, Result<u64, FlowError>),
    ) -> (String, Result<Archived, FlowError>) {
        (stored.id.clone(), result.map(|held| stored.archived(held)))
    }

    /// Counts the committed flow; its answer.
    fn archived(self, main_thread_us: u64) -> Archived {
        metrics::archived(&self.id, &self.location, self.raw_bytes, self.stored_bytes);
        Archived {
            main_thread_us,
            location: self.location,
            events: self.events,
            raw_bytes: self.raw_bytes,
            stored_bytes: self.stored_bytes,
            sha256: self.sha256,
        }
    }
}

/// Encodes a captured flow, proves the object reads back as the flow, and stores it. Any thread but
/// the main one.
pub fn upload(
    mut capture: Capture,
    settings: &Settings,
    s3: &Store,
) -> Result<Uploaded, FlowError> {
    let generation = store::first_generation(&capture.flow);
    let encoded = {
        let state = served_state(&capture.flow, settings.layout.state)?;
        let encoded = writer::encode(&capture.flow, state.as_deref(), generation)
            .map_err(|e| FlowError::Unreadable(e.to_string()))?;
        writer::read_back(
            &encoded.body,
            &capture.flow,
            state.as_deref(),
            generation,
            settings.read_max_bytes,
        )
        .map_err(FlowError::Unreadable)?;
        encoded
    };
    // The commit needs only the count and the fingerprint, which keeps a short log to compare and
    // hashes a long one, freed now rather than after the upload.
    capture.events_total = capture.flow.events.len();
    let events = std::mem::take(&mut capture.flow.events);
    let archived = proof::archived(
        &capture.flow,
        events,
        capture.whole_log(),
        capture.large_snapshot.is_some(),
        capture.labels_followed,
    );
    // The copy is encoded and freed (what the commit compares is counted by the fingerprint), the
    // snapshot too: the fingerprint holds what the commit compares of it. The labels stay, counted
    // while they do (the commit removes the flow from their indexes).
    capture.flow.snapshot = None;
    let labels = capture.flow.labels.iter();
    let labels: usize = labels
        .map(|(name, value)| name.capacity() + value.capacity())
        .sum();
    capture.cap.keep_only(labels as u64);
    let _encoded = Buffered::hold(encoded.body.len() as u64);
    UPLOADS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    let stored = store::store_once(
        s3,
        &settings.s3,
        &capture.flow,
        (encoded, generation),
        settings.read_max_bytes,
    );
    UPLOADS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    let (key, encoded) = stored?;
    let stored = Stored {
        id: capture.flow.id.clone(),
        events: capture.events_total,
        location: s3.location(&key),
        raw_bytes: encoded.raw_bytes,
        stored_bytes: encoded.body.len() as u64,
        sha256: hex(&encoded.object_sha256),
    };
    Ok(Uploaded {
        capture,
        archived,
        stored,
    })
}

/// The state an archive serves for `flow`: the engine's state folded from it, or (`None`) its stored
/// snapshot for a layout served from that. A flow the engine could not answer is not archived.
fn served_state(flow: &Captured, source: StateSource) -> Result<Option<Vec<u8>>, FlowError> {
    if source == StateSource::Snapshot {
        return Ok(None);
    }
    let skip = flow.seq.unwrap_or(0).max(0) as usize;
    metrics::folding(|| engine::fold(flow.snapshot.as_deref(), skip, flow.events.iter()))
        .map_err(|e| FlowError::Unreadable(e.to_string()))?
        .map(Some)
        .ok_or_else(|| {
            FlowError::Unreadable(
                "the engine knows no flow in these events (no flow_started with an id)".into(),
            )
        })
}

/// Commits one uploaded flow (FLOWARCHIVE.FLOW: `commit_many` of that flow alone, waiting out paused
/// writes) and counts it.
pub fn commit(up: Uploaded, settings: &Settings) -> Result<Archived, FlowError> {
    match commit_many(vec![up], settings).pop() {
        Some((_, outcome)) => outcome,
        None => Err(FlowError::Internal("the commit gave no outcome".into())),
    }
}

/// Commits several uploaded flows of one DB (the sweep), several per main-thread step
/// (`commit::commit_many`), and counts each: every flow's id with its outcome.
pub fn commit_many(
    ups: Vec<Uploaded>,
    settings: &Settings,
) -> Vec<(String, Result<Archived, FlowError>)> {
    let committed = commit::commit_many(
        ups.into_iter().map(Uploaded::pending).collect(),
        &settings.layout,
    );
    committed.into_iter().map(Stored::outcome).collect()
}

/// What one round of the sweep did: each committed flow's id with its outcome, and each begun flow's
/// outcome in the order of its id.
pub struct Round {
    pub committed: Vec<(String, Result<Archived, FlowError>)>,
    pub begun: Vec<Result<Start, FlowError>>,
}

/// One round of the sweep in `db`: commits `ups` and begins `ids` in one main-thread step, each flow
/// exactly as `commit_many` and `begin_many` do it, so a round costs the event loop one wake-up rather
/// than two. The step stops taking flows once the step budget is spent (at least one is taken); what it
/// did not reach, and commits that met paused writes, go on through `commit_many` and `begin_many`.
pub fn commit_then_begin(
    ups: Vec<Uploaded>,
    caller: &Caller,
    db: i32,
    ids: &[String],
    settings: &Settings,
    window: &Window,
) -> Round {
    let mut pending: Vec<commit::Pending<Stored>> =
        ups.into_iter().map(Uploaded::pending).collect();
    let stage = if pending.is_empty() {
        Stage::Capture
    } else {
        Stage::Commit
    };
    let mut held = 0;
    let layout = &settings.layout;
    // The commits first, then the begins: one batch, cut where the step's budget is spent.
    let work: Vec<Work> = (pending.iter().map(Work::Commit))
        .chain(ids.iter().map(|id| Work::Begin(id)))
        .collect();
    let ran = mainthread::step_batch(db, stage, &mut held, &work, |ctx, work| match work {
        Work::Commit(flow) => Done::Committed(commit::commit_pending(ctx, flow, layout)),
        Work::Begin(id) => Done::Begun(begin_untimed(ctx, caller, db, id, settings, window)),
    });
    let (mut committed, mut begun) = (Vec::new(), Vec::new());
    match ran {
        Ok(done) => done.into_iter().for_each(|done| match done {
            Done::Committed(result) => committed.push(result),
            Done::Begun(result) => begun.push(result),
        }),
        // A step that could not run (no event loop) or panicked fails every flow of the round.
        Err(e) => {
            let failed = || FlowError::from(e.clone());
            let committed = pending.drain(..).map(|flow| (flow.0, Err(failed())));
            let begun = ids.iter().map(|_| Err(failed()));
            return Round {
                committed: committed.map(Stored::outcome).collect(),
                begun: begun.collect(),
            };
        }
    }
    let reached = begun.len();
    let begun = begun
        .into_iter()
        .map(|started| started.map(|s| s.held_for(held)));
    Round {
        committed: settle(pending, committed, held, layout),
        begun: begun
            .chain(begin_many(caller, db, &ids[reached..], settings, window))
            .collect(),
    }
}

/// A round's work for its one step, in order.
enum Work<'a> {
    Commit(&'a commit::Pending<Stored>),
    Begin(&'a str),
}

/// What the step did of a piece of `Work`.
enum Done {
    Committed(Result<(), FlowError>),
    Begun(Result<Start, FlowError>),
}

/// The outcomes of `pending`, whose first ones a step committed (`committed`, in order, in a step of
/// `held` µs): a commit that met paused writes, and every flow the step did not reach, go on through
/// `commit::commit_many`.
fn settle(
    mut pending: Vec<commit::Pending<Stored>>,
    committed: Vec<Result<(), FlowError>>,
    held: u64,
    layout: &Layout,
) -> Vec<(String, Result<Archived, FlowError>)> {
    let mut out = Vec::with_capacity(pending.len());
    let mut again = Vec::new();
    let mut rest = pending.drain(..);
    for result in committed {
        let Some(flow) = rest.next() else { break };
        match result {
            Err(FlowError::NotWritable(errors::WRITES_PAUSED)) => again.push(flow),
            other => {
                let held = flow.1.held_us.max(held);
                out.push(Stored::outcome((flow.0, other.map(|()| held))));
            }
        }
    }
    again.extend(rest);
    out.extend(
        commit::commit_many(again, layout)
            .into_iter()
            .map(Stored::outcome),
    );
    out
}

/// One flow after `begin`, end to end on the calling thread.
pub fn run(mut capture: Capture, settings: &Settings, s3: &Store) -> Result<Archived, FlowError> {
    finish_capture(&mut capture, settings)?;
    let uploaded = upload(capture, settings, s3)?;
    commit(uploaded, settings)
}
