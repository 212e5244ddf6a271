//! Live reads of `FLOWARCHIVE.GET <id> [EVENTS]`.
//!
//! A folded layout (the engine's) answers the state the engine would: the flow's snapshot, sequence and
//! event log are read on the main thread, and folded (`format::engine`) on a read worker while only the
//! calling client waits. A short event log of small events is read in the command itself; a long one,
//! or one of large events, is read like a capture, in chunks (`mainthread::read_log`), each a
//! main-thread step handed over by the read worker that stops at the step budget, so neither a log of
//! 300,000 events nor one of 1,000 events of 60 KB holds the server in one stretch. A
//! watch follows the flow's keys from the first step on, so the chunks and the keys read with the first
//! form one state; a change restarts the read. The bytes read, short log or long, are capped like an
//! archived read: each event is measured before it is copied.
//!
//! A layout served from its snapshot answers the stored snapshot as it is.
//!
//! The command checks the caller's rights on the keys it reads; a read worker's steps check them again
//! each time they read the keys (`Rights`), as the command's own step does, so rights taken away while
//! a read is under way refuse it: no byte is read for the client past them.

use redis_module::{Context, KeyType, RedisError, RedisResult, RedisValue};

use crate::format::engine;
use crate::format::event_log::EventLog;
use crate::layout::FlowKeys;
use crate::ops::errors::{self, show_id, FlowError};
use crate::ops::metrics::{self, Stage};
use crate::read::rights::Rights;
use crate::runtime::blocking::{answer_later, can_block, this_client, Answer};
use crate::runtime::key::Key;
use crate::runtime::mainthread::{
    self, read_log, read_string_step, ByteCap, LogRead, EVENTS_PER_STEP, WHOLE_BYTES,
};
use crate::runtime::pool::Pool;
use crate::runtime::reply;
use crate::runtime::server::{expect_type, list_len, read_string};
use crate::runtime::watch::{Watch, Writes};

/// Workers for folds and long live reads; reads beyond the queue get a busy error.
pub static READ_POOL: Pool = Pool::new("flowarchive-read", 4, 1024);

/// Reads restarted by a concurrent change before the client gets an error.
const ATTEMPTS: usize = 3;

/// What a live read took from Valkey: the flow's keys as one state, counted against the caps until
/// it is answered.
struct Read {
    snapshot: Option<Vec<u8>>,
    seq: Option<i64>,
    log: EventLog,
    _cap: ByteCap,
}

/// The reply: the state alone, or with `events` written from the read itself, whose log stays
/// counted against the caps until the client's reply holds it.
fn reply(state: Vec<u8>, read: Read, events: bool) -> Answer {
    if !events {
        return Ok(RedisValue::StringBuffer(state)).into();
    }
    Answer::Write(Box::new(move |ctx: &Context| {
        reply::state_and_events(ctx, &state, Some(read.log.iter()));
    }))
}

/// A live read over the cap (`read-max-bytes`), like an archived one.
fn too_large(max_bytes: u64) -> String {
    format!("the flow is larger than read-max-bytes ({max_bytes} bytes)")
}

/// Why a chunk's read stops the live read, if it does (`LogRead::stopped`).
fn stopped(read: LogRead, max_bytes: u64) -> Result<(), FlowError> {
    read.stopped(|| FlowError::Unreadable(too_large(max_bytes)))
}

/// Answers the stored snapshot of a live flow of a layout served from its snapshot, opened by the
/// command, written to the client from where the server holds it (one copy, the reply's); one over
/// the cap (`read-max-bytes`) is refused, measured and not copied, like any live read.
pub fn answer_snapshot(ctx: &Context, snapshot: &Key, max_bytes: u64) -> Result<(), FlowError> {
    let v = snapshot.string().unwrap_or_default();
    if v.len() as u64 > max_bytes {
        return Err(FlowError::Unreadable(too_large(max_bytes)));
    }
    reply::state_and_events(ctx, v, None::<std::iter::Empty<&[u8]>>);
    Ok(())
}

/// What a live read of a folded flow finds of its snapshot: its bytes, read in this step, or the
/// length of one larger than a step reads (`WHOLE_BYTES`), to copy in steps under a watch.
enum Stored {
    Bytes(Option<Vec<u8>>),
    Large(usize),
}

/// The flow's snapshot as `Stored`, and the read's cap holding it: measured before it is copied, and
/// refused without a copy past the read cap or the module's buffers (`ByteCap::new`).
fn stored(ctx: &Context, keys: &FlowKeys, max_bytes: u64) -> Result<(Stored, ByteCap), FlowError> {
    let over_cap = || FlowError::Unreadable(too_large(max_bytes));
    // Opened once for its type and its bytes.
    let snapshot = Key::open(ctx, &keys.snapshot);
    if !snapshot.holds(&KeyType::String)? {
        return Ok((Stored::Bytes(None), ByteCap::new(0, max_bytes, over_cap)?));
    }
    let v = snapshot.string().unwrap_or_default();
    let cap = ByteCap::new(v.len() as u64, max_bytes, over_cap)?;
    let stored = match v.len() as u64 > WHOLE_BYTES {
        true => Stored::Large(v.len()),
        false => Stored::Bytes(Some(v.to_vec())),
    };
    Ok((stored, cap))
}

/// `snapshot:seq` of a live flow, if the key exists.
fn seq(ctx: &Context, keys: &FlowKeys) -> Result<Option<i64>, FlowError> {
    let Some(key) = &keys.seq else {
        return Ok(None);
    };
    if !expect_type(ctx, key, &KeyType::String)? {
        return Ok(None);
    }
    let raw = read_string(ctx, key).unwrap_or_default();
    engine::parse_seq(&raw)
        .map(Some)
        .map_err(FlowError::Unreadable)
}

/// Answers the engine's state of a live flow (and, with `events`, its log): the keys are read now (a
/// short log) or by a read worker in steps (a long one, checking the caller's `rights` in each), and
/// folded on the read worker. Inside MULTI or a script, where the client cannot wait, it is refused.
pub fn fold(
    ctx: &Context,
    db: i32,
    id: String,
    keys: FlowKeys,
    events: bool,
    max_bytes: u64,
    rights: Rights,
) -> RedisResult {
    let fail = |e: FlowError| RedisError::String(e.read_message(&id));
    if !can_block(ctx) {
        return Err(RedisError::String(format!(
            "ERR flow {} is live; its state is folded off the main thread, which FLOWARCHIVE.GET cannot wait for inside MULTI or a script",
            show_id(&id)
        )));
    }
    let total = list_len(ctx, &keys.events).map_err(|e| fail(e.into()))?;
    // One step reads a short log of small events whole: nothing can change it meanwhile. One of large
    // events is read again in steps.
    let short = match total <= EVENTS_PER_STEP {
        true => read_short(ctx, &keys, total, max_bytes).map_err(fail)?,
        false => None,
    };
    let work = move || {
        let read = match short {
            Some(read) => Ok(read),
            None => read_consistent(db, &keys, max_bytes, &rights),
        };
        match read {
            // The log the command saw is gone: archived (or removed) before its turn to be read.
            // Nil would say the flow never existed; the retry finds it wherever it is now.
            Ok(read) if total > 0 && read.log.is_empty() => Err(RedisError::String(format!(
                "ERR flow {} was archived or removed while it was read; retry",
                show_id(&id)
            )))
            .into(),
            Ok(read) => answer(&id, read, events),
            Err(e) => Err(RedisError::String(e.read_message(&id))).into(),
        }
    };
    answer_later(&READ_POOL, errors::READ_BUSY, || this_client(ctx), work)?;
    Ok(RedisValue::NoReply)
}

/// The engine's answer for what was read: its state (nil where the engine knows no such flow).
fn answer(id: &str, read: Read, events: bool) -> Answer {
    let skip = read.seq.unwrap_or(0).max(0) as usize;
    match metrics::folding(|| engine::fold(read.snapshot.as_deref(), skip, read.log.iter())) {
        Ok(Some(state)) => reply(state, read, events),
        Ok(None) => Ok(RedisValue::Null).into(),
        Err(e) => Err(RedisError::String(errors::bounded(format!(
            "ERR flow {} cannot be answered: {e}",
            show_id(id)
        ))))
        .into(),
    }
}

/// A short log and the flow's other keys, in the command's own step; `None` when its snapshot or its
/// events are too large to read in one (`WHOLE_BYTES`).
fn read_short(
    ctx: &Context,
    keys: &FlowKeys,
    total: usize,
    max_bytes: u64,
) -> Result<Option<Read>, FlowError> {
    let (Stored::Bytes(snapshot), mut cap) = stored(ctx, keys, max_bytes)? else {
        return Ok(None);
    };
    let seq = seq(ctx, keys)?;
    let mut log = EventLog::new(total, max_bytes as usize);
    stopped(
        read_log(ctx, &keys.events, total, &mut log, &mut cap)?,
        max_bytes,
    )?;
    Ok((log.len() == total).then_some(Read {
        snapshot,
        seq,
        log,
        _cap: cap,
    }))
}

/// Answers `[snapshot, events]` of a live flow of a layout served from its snapshot, whose snapshot the
/// command has just read: at once for a short log, else through a read worker checking the caller's
/// `rights` in each step (the client is blocked until it answers).
pub fn events(
    ctx: &Context,
    db: i32,
    id: String,
    mut keys: FlowKeys,
    max_bytes: u64,
    rights: Rights,
) -> RedisResult {
    // The answer is the snapshot and the log: the sequence, which `rights` does not name, is neither
    // read nor followed (it would refuse the read, and show what it holds, to one who may not read it).
    keys.seq = None;
    let refused = |e: FlowError| RedisError::String(e.read_message(&id));
    let total = list_len(ctx, &keys.events).map_err(|e| refused(e.into()))?;
    // One step reads a snapshot of up to `WHOLE_BYTES` and a short log of small events whole: they
    // cannot change meanwhile. Larger ones are read again in steps.
    if total <= EVENTS_PER_STEP {
        if let Some(read) = read_short(ctx, &keys, total, max_bytes).map_err(refused)? {
            let snapshot = read.snapshot.unwrap_or_default();
            reply::state_and_events(ctx, &snapshot, Some(read.log.iter()));
            return Ok(RedisValue::NoReply);
        }
    }
    if !can_block(ctx) {
        return Err(RedisError::String(format!(
            "ERR flow {} has {total} events and a snapshot, too many or too large together to read in one step inside MULTI or a script; call FLOWARCHIVE.GET outside",
            show_id(&id)
        )));
    }
    let read = move || match read_consistent(db, &keys, max_bytes, &rights) {
        Ok(mut read) => match read.snapshot.take() {
            Some(snapshot) => reply(snapshot, read, true),
            None => Err(RedisError::String(FlowError::Changed.read_message(&id))).into(),
        },
        Err(e) => Err(RedisError::String(e.read_message(&id))).into(),
    };
    answer_later(&READ_POOL, errors::READ_BUSY, || this_client(ctx), read)?;
    Ok(RedisValue::NoReply)
}

/// The flow's keys and whole log as one state, in chunks, each step allowed by `rights`; retried when
/// the flow changes meanwhile.
fn read_consistent(
    db: i32,
    keys: &FlowKeys,
    max_bytes: u64,
    rights: &Rights,
) -> Result<Read, FlowError> {
    let mut outcome = Err(FlowError::Changed);
    for _ in 0..ATTEMPTS {
        outcome = read_once(db, keys, max_bytes, rights);
        if !matches!(outcome, Err(FlowError::Changed)) {
            break;
        }
    }
    outcome
}

fn read_once(db: i32, keys: &FlowKeys, max_bytes: u64, rights: &Rights) -> Result<Read, FlowError> {
    let mut held = 0;
    let (watch, (stored, mut cap), seq, total) =
        mainthread::step(db, Stage::Capture, &mut held, |ctx| {
            rights.check(ctx)?;
            let stored = stored(ctx, keys, max_bytes)?;
            let writes = match stored.0 {
                Stored::Large(_) => Writes::ListsAndStrings,
                Stored::Bytes(_) => Writes::Lists,
            };
            let watched: Vec<&str> = keys.state().collect();
            let watch = Watch::observe(ctx, db, &watched, writes)?;
            let total = list_len(ctx, &keys.events)?;
            Ok::<_, FlowError>((watch, stored, seq(ctx, keys)?, total))
        })?;
    let (mut snapshot, large) = match stored {
        Stored::Bytes(bytes) => (bytes, 0),
        Stored::Large(len) => (Some(Vec::new()), len),
    };
    // Each later step reads on only while the flow is unchanged and the caller still allowed.
    let mut step = |read: &mut (dyn FnMut(&Context) -> Result<LogRead, FlowError> + Send)| {
        let read = mainthread::step(db, Stage::Capture, &mut held, |ctx| {
            if watch.changed() {
                return Err(FlowError::Changed);
            }
            rights.check(ctx)?;
            read(ctx)
        })?;
        stopped(read, max_bytes)
    };
    while let Some(copied) = snapshot.as_mut().filter(|s| s.len() < large) {
        step(&mut |ctx| Ok(read_string_step(ctx, &keys.snapshot, large, copied)))?;
    }
    let mut log = EventLog::new(total.min(EVENTS_PER_STEP), max_bytes as usize);
    while log.len() < total {
        step(&mut |ctx| Ok(read_log(ctx, &keys.events, total, &mut log, &mut cap)?))?;
    }
    if watch.changed() {
        return Err(FlowError::Changed);
    }
    Ok(Read {
        snapshot,
        seq,
        log,
        _cap: cap,
    })
}
