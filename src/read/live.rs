//! Live reads of `FLOWARCHIVE.GET <id> EVENTS`.
//!
//! A short event log is read in the command itself. A long one is read like a capture: in chunks
//! (`mainthread::read_log`), each a main-thread step handed over by a read worker that stops at the
//! step budget, so a log of 300,000 events never holds the server in one stretch. A watch follows the
//! log from the first step on, so the chunks and the snapshot read with the first form one state; a
//! change restarts the read. The bytes read, short log or long, are capped like an archived read: each
//! event is measured before it is copied.

use redis_module::{Context, KeyType, RedisError, RedisResult, RedisValue};

use crate::layout::FlowKeys;
use crate::ops::errors::{self, show_id, FlowError};
use crate::ops::metrics::Stage;
use crate::runtime::blocking::{answer_later, can_block, this_client};
use crate::runtime::mainthread::{self, read_log, ByteCap, LogRead, EVENTS_PER_STEP};
use crate::runtime::pool::Pool;
use crate::runtime::server::{bytes, call, expect_type, list_len, read_string};
use crate::runtime::watch::Watch;

/// Workers for long live reads; reads beyond the queue get a busy error.
pub static READ_POOL: Pool = Pool::new("flowarchive-read", 4, 1024);

/// Reads restarted by a concurrent change before the client gets an error.
const ATTEMPTS: usize = 3;

fn reply(snapshot: Vec<u8>, events: Vec<Vec<u8>>) -> RedisValue {
    let events = events.into_iter().map(RedisValue::StringBuffer).collect();
    RedisValue::Array(vec![
        RedisValue::StringBuffer(snapshot),
        RedisValue::Array(events),
    ])
}

/// A live read over the cap (`read-max-bytes`), like an archived one.
fn too_large(max_bytes: u64) -> String {
    format!("the flow is larger than read-max-bytes ({max_bytes} bytes)")
}

/// A live flow's stored snapshot, as stored; `None` when the flow is not live.
pub fn snapshot(ctx: &Context, keys: &FlowKeys) -> Result<Option<Vec<u8>>, FlowError> {
    if !expect_type(ctx, &keys.snapshot, &KeyType::String)? {
        return Ok(None);
    }
    Ok(read_string(ctx, &keys.snapshot))
}

/// Answers `[snapshot, events]` of a live flow whose snapshot the command has just read: at once for a
/// short log, else through a read worker (the client is blocked until it answers).
pub fn events(
    ctx: &Context,
    db: i32,
    id: String,
    keys: FlowKeys,
    snapshot: Vec<u8>,
    max_bytes: u64,
) -> RedisResult {
    let fail = |e: String| RedisError::String(FlowError::from(e).message(&id));
    let total = list_len(ctx, &keys.events).map_err(fail)?;
    if total <= EVENTS_PER_STEP {
        let mut log = Vec::with_capacity(total);
        let mut cap = ByteCap {
            used: snapshot.len() as u64,
            max: max_bytes,
        };
        // One step reads a short log whole: it cannot shrink meanwhile.
        return match read_log(ctx, &keys.events, total, &mut log, &mut cap).map_err(fail)? {
            LogRead::OverCap => Err(RedisError::String(
                FlowError::Unreadable(too_large(max_bytes)).message(&id),
            )),
            _ => Ok(reply(snapshot, log)),
        };
    }
    if !can_block(ctx) {
        return Err(RedisError::String(format!(
            "ERR flow {} has {total} events, too many to read inside MULTI or a script; call FLOWARCHIVE.GET outside",
            show_id(&id)
        )));
    }
    let read = move || match read_consistent(db, &keys, max_bytes) {
        Ok((snapshot, log)) => Ok(reply(snapshot, log)),
        Err(FlowError::Changed) => Err(RedisError::String(format!(
            "ERR flow {} changed during every read attempt; retry",
            show_id(&id)
        ))),
        Err(e) => Err(RedisError::String(e.message(&id))),
    };
    answer_later(&READ_POOL, errors::READ_BUSY, || this_client(ctx), read)?;
    Ok(RedisValue::NoReply)
}

/// The snapshot and the whole log as one state, in chunks; retried when the flow changes meanwhile.
fn read_consistent(
    db: i32,
    keys: &FlowKeys,
    max_bytes: u64,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), FlowError> {
    let mut outcome = Err(FlowError::Changed);
    for _ in 0..ATTEMPTS {
        outcome = read_once(db, keys, max_bytes);
        if !matches!(outcome, Err(FlowError::Changed)) {
            break;
        }
    }
    outcome
}

fn read_once(
    db: i32,
    keys: &FlowKeys,
    max_bytes: u64,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), FlowError> {
    let mut held = 0;
    let (watch, snapshot, total) = mainthread::step(db, Stage::Capture, &mut held, |ctx| {
        let watch = Watch::observe(ctx, db, &[&keys.snapshot, &keys.events])?;
        let snapshot = call(ctx, "GET", &[keys.snapshot.as_bytes()])?;
        let snapshot = bytes(&snapshot).ok_or(FlowError::Changed)?;
        Ok::<_, FlowError>((watch, snapshot, list_len(ctx, &keys.events)?))
    })?;
    let mut log = Vec::with_capacity(total.min(EVENTS_PER_STEP));
    let mut cap = ByteCap {
        used: snapshot.len() as u64,
        max: max_bytes,
    };
    while log.len() < total {
        let read = mainthread::step(db, Stage::Capture, &mut held, |ctx| {
            if watch.changed() {
                return Err(FlowError::Changed);
            }
            Ok(read_log(ctx, &keys.events, total, &mut log, &mut cap)?)
        })?;
        match read {
            LogRead::Read => {}
            LogRead::OverCap => return Err(FlowError::Unreadable(too_large(max_bytes))),
            LogRead::Shrunk => return Err(FlowError::Changed),
        }
    }
    if watch.changed() {
        return Err(FlowError::Changed);
    }
    Ok((snapshot, log))
}
