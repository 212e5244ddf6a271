//! One flow end to end, on a worker thread: finish the capture (short GIL holds), encode, upload and
//! verify, then commit under the GIL. Any failure before the commit leaves Valkey untouched.

use std::sync::atomic::Ordering;

use redis_module::{RedisValue, ThreadSafeContext};

use crate::capture::{self, Capture};
use crate::commit;
use crate::configs::Settings;
use crate::encode;
use crate::errors::FlowError;
use crate::layout::{self, hex};
use crate::metrics::{self, Buffered, UPLOADS_IN_FLIGHT};
use crate::server::select_db;
use crate::store::Store;

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
        map([
            ("location", RedisValue::BulkString(self.location)),
            ("events", RedisValue::Integer(self.events as i64)),
            ("raw_bytes", RedisValue::Integer(self.raw_bytes as i64)),
            (
                "stored_bytes",
                RedisValue::Integer(self.stored_bytes as i64),
            ),
            ("sha256", RedisValue::BulkString(self.sha256)),
            ("already_archived", RedisValue::Integer(0)),
            (
                "main_thread_us",
                RedisValue::Integer(self.main_thread_us as i64),
            ),
        ])
    }
}

/// A map reply: a RESP3 map, or a flat field/value array on RESP2.
pub fn map<const N: usize>(fields: [(&str, RedisValue); N]) -> RedisValue {
    RedisValue::OrderedMap(
        fields
            .into_iter()
            .map(|(k, v)| {
                (
                    redis_module::redisvalue::RedisValueKey::String(k.to_string()),
                    v,
                )
            })
            .collect(),
    )
}

/// Runs under a held GIL in the flow's DB, timing the stretch into `held`.
fn with_gil<B: Send, T>(
    tsc: &ThreadSafeContext<B>,
    db: i32,
    held: &mut u64,
    f: impl FnOnce(&redis_module::Context) -> Result<T, FlowError>,
) -> Result<T, FlowError> {
    let ctx = tsc.lock();
    metrics::timed(held, || {
        select_db(&ctx, db).map_err(FlowError::Internal)?;
        f(&ctx)
    })
}

fn captured_bytes(flow: &crate::capture::Captured) -> u64 {
    let events: usize = flow.events.iter().map(Vec::len).sum();
    (events + flow.snapshot.len()) as u64
}

pub fn run<B: Send>(
    tsc: &ThreadSafeContext<B>,
    mut capture: Capture,
    settings: &Settings,
    store: &Store,
) -> Result<Archived, FlowError> {
    let db = capture.flow.db;
    let mut held = capture.held_us;
    while !capture.complete() {
        with_gil(tsc, db, &mut held, |ctx| {
            capture::read_more(ctx, &mut capture)
        })?;
    }
    let _captured = Buffered::hold(captured_bytes(&capture.flow));
    let encoded =
        encode::encode(&capture.flow).map_err(|e| FlowError::Unreadable(e.to_string()))?;
    let _encoded = Buffered::hold(encoded.body.len() as u64);
    let key = layout::object_key(&settings.s3.prefix, &capture.flow.id);
    UPLOADS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    let uploaded = store.put_verified(&key, &encoded);
    UPLOADS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    uploaded.map_err(FlowError::Upload)?;
    let location = store.location(&key);
    let Capture { flow, watch, .. } = capture;
    with_gil(tsc, db, &mut held, |ctx| {
        commit::commit(ctx, &flow, watch, &settings.layout, &location)
    })?;
    metrics::archived(
        &flow.id,
        &location,
        encoded.raw_bytes,
        encoded.body.len() as u64,
    );
    Ok(Archived {
        main_thread_us: held,
        location,
        events: flow.events.len(),
        raw_bytes: encoded.raw_bytes,
        stored_bytes: encoded.body.len() as u64,
        sha256: hex(&encoded.object_sha256),
    })
}
