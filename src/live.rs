//! Live reads of `FLOWARCHIVE.GET <id> EVENTS`.
//!
//! A short event log is read in the command itself. A long one is read like a capture: in chunks of
//! `EVENTS_PER_CHUNK`, each a short main-thread step handed over by a read worker, so a log of 300,000
//! events never holds the server in one stretch. A watch on the snapshot and the log proves the chunks
//! form one state; a change restarts the read. The bytes read are capped like an archived read.

use redis_module::{
    BlockedClient, Context, ContextFlags, RedisError, RedisResult, RedisValue, ThreadSafeContext,
};

use crate::archive::on_main_thread;
use crate::capture::EVENTS_PER_CHUNK;
use crate::errors::{self, show_id, FlowError};
use crate::layout::FlowKeys;
use crate::metrics::Stage;
use crate::pool::Pool;
use crate::server::{bytes, call, integer, strings};
use crate::watch::Watch;

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

fn event_count(ctx: &Context, keys: &FlowKeys) -> Result<usize, FlowError> {
    let reply = call(ctx, "LLEN", &[keys.events.as_bytes()])?;
    Ok(integer(&reply).unwrap_or(0).max(0) as usize)
}

fn range(
    ctx: &Context,
    keys: &FlowKeys,
    from: usize,
    to: usize,
) -> Result<Vec<Vec<u8>>, FlowError> {
    let (start, stop) = (from.to_string(), (to - 1).to_string());
    let reply = call(
        ctx,
        "LRANGE",
        &[keys.events.as_bytes(), start.as_bytes(), stop.as_bytes()],
    )?;
    Ok(strings(&reply))
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
    let total = event_count(ctx, &keys).map_err(|e| RedisError::String(e.message(&id)))?;
    if total <= EVENTS_PER_CHUNK {
        let log =
            range(ctx, &keys, 0, total.max(1)).map_err(|e| RedisError::String(e.message(&id)))?;
        return Ok(reply(snapshot, log));
    }
    if ctx
        .get_flags()
        .intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING)
    {
        return Err(RedisError::String(format!(
            "ERR flow {} has {total} events, too many to read inside MULTI or a script; call FLOWARCHIVE.GET outside",
            show_id(&id)
        )));
    }
    let (hand_over, client) = std::sync::mpsc::channel::<ThreadSafeContext<BlockedClient>>();
    let job = Box::new(move || {
        let Ok(client) = client.recv() else { return };
        let answer = match read_consistent(db, &keys, max_bytes) {
            Ok((snapshot, log)) => Ok(reply(snapshot, log)),
            Err(FlowError::Changed) => Err(RedisError::String(format!(
                "ERR flow {} changed during every read attempt; retry",
                show_id(&id)
            ))),
            Err(e) => Err(RedisError::String(e.message(&id))),
        };
        client.reply(answer);
    });
    if READ_POOL.submit(job).is_err() {
        return Err(RedisError::Str(errors::READ_BUSY));
    }
    let _ = hand_over.send(ThreadSafeContext::with_blocked_client(ctx.block_client()));
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
    let (watch, snapshot, total) = on_main_thread(db, Stage::Capture, &mut held, |ctx| {
        let watch = Watch::observe(db, &[&keys.snapshot, &keys.events]);
        let snapshot = call(ctx, "GET", &[keys.snapshot.as_bytes()])?;
        let snapshot = bytes(&snapshot).ok_or(FlowError::Changed)?;
        Ok::<_, FlowError>((watch, snapshot, event_count(ctx, keys)?))
    })?;
    let mut log = Vec::with_capacity(total);
    let mut size = snapshot.len() as u64;
    while log.len() < total {
        let (from, to) = (log.len(), (log.len() + EVENTS_PER_CHUNK).min(total));
        let chunk = on_main_thread(db, Stage::Capture, &mut held, |ctx| {
            if watch.changed() {
                return Err(FlowError::Changed);
            }
            range(ctx, keys, from, to)
        })?;
        if chunk.len() != to - from {
            return Err(FlowError::Changed);
        }
        size += chunk.iter().map(|e| e.len() as u64).sum::<u64>();
        if size > max_bytes {
            return Err(FlowError::Unreadable(format!(
                "the event log is larger than read-max-bytes ({max_bytes} bytes)"
            )));
        }
        log.extend(chunk);
    }
    if watch.changed() {
        return Err(FlowError::Changed);
    }
    Ok((snapshot, log))
}
