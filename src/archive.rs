//! One flow end to end, driven from a worker thread: finish the capture (short steps on the main
//! thread), encode, upload and verify, then commit on the main thread. Any failure before the commit
//! leaves Valkey untouched.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis_module::RedisValue;

use crate::capture::{self, Capture, Captured};
use crate::commit;
use crate::configs::Settings;
use crate::encode::{self, Encoded};
use crate::errors::{self, FlowError};
use crate::layout::{self, hex};
use crate::mainthread;
use crate::metrics::{self, Buffered, Stage, UPLOADS_IN_FLIGHT};
use crate::server::select_db;
use crate::store::{FailureKind, Store, StoreError};

/// How long a commit waits for paused writes to resume, and how often it looks.
const COMMIT_PAUSE_WAIT: Duration = Duration::from_secs(10);
const COMMIT_RETRY: Duration = Duration::from_millis(50);

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

/// Puts the calling upload worker in the idle scheduling class (SCHED_IDLE): any other runnable thread,
/// the server's event loop above all, preempts it at once, so compression, hashing and uploads only use
/// CPU nobody else wants. Linux applies this per thread; no privilege is needed to lower one's own class.
pub fn enter_idle_class() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on the calling thread (pid 0); failure only leaves the class unchanged.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

/// Runs `f` on the event loop in `db`, timing the main-thread stretch into `held`.
pub fn on_main_thread<T: Send, E: From<String> + Send>(
    db: i32,
    stage: Stage,
    held: &mut u64,
    f: impl FnOnce(&redis_module::Context) -> Result<T, E> + Send,
) -> Result<T, E> {
    mainthread::run(|ctx| {
        metrics::timed(stage, held, || {
            select_db(ctx, db)?;
            f(ctx)
        })
    })?
}

/// Reads the rest of a long event log, one chunk per main-thread step.
pub fn finish_capture(capture: &mut Capture) -> Result<(), FlowError> {
    let db = capture.flow.db;
    let mut held = capture.held_us;
    while !capture.complete() {
        on_main_thread(db, Stage::Capture, &mut held, |ctx| {
            capture::read_more(ctx, capture)
        })?;
    }
    capture.held_us = held;
    Ok(())
}

/// A flow whose object is stored and verified, waiting for its commit.
pub struct Uploaded {
    capture: Capture,
    location: String,
    raw_bytes: u64,
    stored_bytes: u64,
    sha256: String,
}

/// Encodes and uploads a captured flow, then verifies the stored object. Any thread but the main one.
pub fn upload(
    mut capture: Capture,
    settings: &Settings,
    store: &Store,
) -> Result<Uploaded, FlowError> {
    let encoded = {
        let events: usize = capture.flow.events.iter().map(Vec::len).sum();
        let _captured = Buffered::hold((events + capture.flow.snapshot.len()) as u64);
        let encoded =
            encode::encode(&capture.flow).map_err(|e| FlowError::Unreadable(e.to_string()))?;
        encode::read_back(&encoded.body, &capture.flow, settings.read_max_bytes)
            .map_err(FlowError::Unreadable)?;
        encoded
    };
    // The commit needs only the count: free the log now, not after the upload.
    capture.events_total = capture.flow.events.len();
    capture.flow.events = Vec::new();
    let _encoded = Buffered::hold(encoded.body.len() as u64);
    UPLOADS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
    let stored = store_once(store, &settings.s3.prefix, &capture.flow, &encoded);
    UPLOADS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    let key = stored?;
    Ok(Uploaded {
        location: store.location(&key),
        raw_bytes: encoded.raw_bytes,
        stored_bytes: encoded.body.len() as u64,
        sha256: hex(&encoded.object_sha256),
        capture,
    })
}

/// Stores the object write-once and returns its key. A key already holding exactly these bytes is an
/// idempotent retry (an earlier attempt stored it and did not commit); a key holding other content is
/// never replaced (it may be indexed by another server sharing the bucket): the next generation is tried.
fn store_once(
    store: &Store,
    prefix: &str,
    flow: &Captured,
    encoded: &Encoded,
) -> Result<String, FlowError> {
    for key in layout::object_keys(prefix, flow.db, &flow.id) {
        let existing = match store.put_verified(&key, encoded) {
            Err(e) if e.kind == FailureKind::Exists => store.verify_existing(&key, encoded),
            stored => return stored.map(|()| key).map_err(FlowError::Upload),
        };
        match existing {
            Ok(()) => return Ok(key),
            Err(e) if e.kind == FailureKind::Verify => continue,
            Err(e) => return Err(FlowError::Upload(e)),
        }
    }
    Err(FlowError::Upload(StoreError {
        kind: FailureKind::Exists,
        message: format!(
            "every one of the flow's {} object keys holds other content; nothing was replaced",
            layout::GENERATIONS
        ),
    }))
}

/// Proves the flow unchanged, indexes it and deletes it, on the main thread.
pub fn commit(up: Uploaded, settings: &Settings) -> Result<Archived, FlowError> {
    let Uploaded {
        capture,
        location,
        raw_bytes,
        stored_bytes,
        sha256,
    } = up;
    let Capture {
        flow,
        caller,
        watch,
        events_total,
        mut held_us,
        ..
    } = capture;
    // Writes paused (a failover, CLIENT PAUSE WRITE) usually end within seconds: wait that long, with
    // the watch still guarding the flow, then give up with the flow live.
    let paused_until = Instant::now() + COMMIT_PAUSE_WAIT;
    loop {
        let committed = on_main_thread(flow.db, Stage::Commit, &mut held_us, |ctx| {
            commit::commit(ctx, &caller, &flow, &watch, &settings.layout, &location)
        });
        match committed {
            Err(FlowError::NotWritable(errors::WRITES_PAUSED)) if Instant::now() < paused_until => {
                std::thread::sleep(COMMIT_RETRY);
            }
            other => break other?,
        }
    }
    drop(watch);
    metrics::archived(&flow.id, &location, raw_bytes, stored_bytes);
    Ok(Archived {
        main_thread_us: held_us,
        location,
        events: events_total,
        raw_bytes,
        stored_bytes,
        sha256,
    })
}

/// One flow end to end on the calling thread.
pub fn run(
    mut capture: Capture,
    settings: &Settings,
    store: &Store,
) -> Result<Archived, FlowError> {
    finish_capture(&mut capture)?;
    let uploaded = upload(capture, settings, store)?;
    commit(uploaded, settings)
}
