//! FLOWARCHIVE.SWEEP: finds eligible flows in bounded slices (one short main-thread step each), archives them
//! through the same capture/encode/store/commit path as FLOWARCHIVE.FLOW with up to `concurrency` flows
//! in flight, and answers a summary. One sweep at a time.

use std::collections::{BTreeMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use redis_module::{
    BlockedClient, Context, RedisError, RedisResult, RedisValue, ThreadSafeContext,
};

use crate::acl::{self, Access, Caller};
use crate::archive::{self, map, Uploaded};
use crate::capture::{self, Capture, Inspected, Start};
use crate::clock;
use crate::configs::{self, Settings};
use crate::errors::{self, FlowError};
use crate::metrics::{self, Stage};
use crate::pool::Pool;
use crate::select::Selector;
use crate::store::Store;

pub struct Options {
    pub limit: Option<usize>,
    pub dry_run: bool,
    /// Whose ACL the sweep acts under: flows this user may not archive are skipped and counted.
    pub caller: Caller,
}

/// Counters of one sweep; shared by its workers, shown in INFO while it runs and after.
#[derive(Default)]
pub struct Progress {
    pub candidates: AtomicU64,
    pub archived: AtomicU64,
    pub skipped_changed: AtomicU64,
    pub skipped_ineligible: AtomicU64,
    pub skipped_noperm: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub in_flight: AtomicU64,
    failed: Mutex<BTreeMap<&'static str, u64>>,
    would_archive: Mutex<Vec<String>>,
    pub dry_run: bool,
    pub duration_ms: AtomicU64,
    /// Longest single main-thread stretch of this sweep (selection, capture or commit), microseconds.
    pub main_thread_max_us: AtomicU64,
}

impl Progress {
    fn count(&self, err: &FlowError) {
        match err {
            FlowError::Changed => self.skipped_changed.fetch_add(1, Ordering::Relaxed),
            FlowError::NoPerm(_) => self.skipped_noperm.fetch_add(1, Ordering::Relaxed),
            FlowError::NotFound
            | FlowError::NotTerminal(_)
            | FlowError::TooRecent { .. }
            | FlowError::Conflict(_)
            | FlowError::Busy => self.skipped_ineligible.fetch_add(1, Ordering::Relaxed),
            _ => {
                *lock(&self.failed).entry(err.kind()).or_default() += 1;
                0
            }
        };
    }

    pub fn failed_total(&self) -> u64 {
        lock(&self.failed).values().sum()
    }

    pub fn failed_by_kind(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.failed).clone()
    }

    fn summary(&self) -> RedisValue {
        let get = |a: &AtomicU64| RedisValue::Integer(a.load(Ordering::Relaxed) as i64);
        let failed = self.failed_by_kind();
        let by_reason = RedisValue::OrderedMap(
            failed
                .iter()
                .map(|(k, v)| {
                    (
                        redis_module::redisvalue::RedisValueKey::String(k.to_string()),
                        RedisValue::Integer(*v as i64),
                    )
                })
                .collect(),
        );
        let flows = lock(&self.would_archive)
            .iter()
            .cloned()
            .map(RedisValue::BulkString)
            .collect();
        map([
            ("dry_run", RedisValue::Integer(self.dry_run as i64)),
            ("candidates", get(&self.candidates)),
            ("archived", get(&self.archived)),
            ("skipped_changed", get(&self.skipped_changed)),
            ("skipped_ineligible", get(&self.skipped_ineligible)),
            ("skipped_noperm", get(&self.skipped_noperm)),
            (
                "failed",
                RedisValue::Integer(failed.values().sum::<u64>() as i64),
            ),
            ("failed_by_reason", by_reason),
            ("raw_bytes", get(&self.raw_bytes)),
            ("stored_bytes", get(&self.stored_bytes)),
            ("duration_ms", get(&self.duration_ms)),
            ("flows", RedisValue::Array(flows)),
        ])
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static RUNNING: AtomicBool = AtomicBool::new(false);
pub static SWEEPS_RUN: AtomicU64 = AtomicU64::new(0);
pub static CURRENT: Mutex<Option<Arc<Progress>>> = Mutex::new(None);
pub static LAST: Mutex<Option<Arc<Progress>>> = Mutex::new(None);

/// The sweep coordinator: one sweep at a time.
pub static SWEEP_POOL: Pool = Pool::new("flowarchive-sweep", 1, 1);
/// Upload workers of sweeps: a sweep keeps at most `concurrency` flows in flight (the config's maximum
/// bounds the threads); they encode, upload and verify in the idle scheduling class.
pub static UPLOAD_POOL: Pool = Pool::new(
    "flowarchive-upload",
    configs::CONCURRENCY_MAX as usize,
    configs::CONCURRENCY_MAX as usize,
);

pub fn running() -> bool {
    RUNNING.load(Ordering::SeqCst)
}

/// Starts a sweep of `db`. Once it is sure to start, `block` may block the calling client, which then
/// gets the summary when the sweep ends (ASYNC and the timer block nobody).
pub fn start(
    ctx: &Context,
    db: i32,
    opts: Options,
    block: impl FnOnce() -> Option<ThreadSafeContext<BlockedClient>>,
) -> Result<(), RedisError> {
    let settings = Settings::current();
    // Selection reads the status indexes: the caller must be allowed to read them.
    for status in &settings.layout.terminal {
        if let Some(key) = settings.layout.status_set_key("", status) {
            if acl::check(ctx, &opts.caller, &key, Access::Read).is_err() {
                return Err(RedisError::String(errors::bounded(format!(
                    "NOPERM this user has no permissions to read the {} key a sweep selects from",
                    errors::show_key(&key)
                ))));
            }
        }
    }
    if RUNNING.swap(true, Ordering::SeqCst) {
        return Err(RedisError::Str(errors::SWEEP_RUNNING));
    }
    // Refuse a sweep that cannot upload before it selects anything.
    if let Err(e) = Store::new(&settings.s3) {
        RUNNING.store(false, Ordering::SeqCst);
        return Err(RedisError::String(format!("ERR {e}")));
    }
    let progress = Arc::new(Progress {
        dry_run: opts.dry_run,
        ..Progress::default()
    });
    *lock(&CURRENT) = Some(progress.clone());
    // The job is queued first and then receives the client to answer (if any): a client is never
    // blocked without a thread that will answer it.
    let (hand_over, client) = channel::<Option<ThreadSafeContext<BlockedClient>>>();
    let job = Box::new(move || {
        let client = client.recv().ok().flatten();
        let result = coordinate(db, &opts, &settings, &progress);
        if let Some(client) = client {
            client.reply(result);
        }
    });
    if SWEEP_POOL.submit(job).is_err() {
        *lock(&CURRENT) = None;
        RUNNING.store(false, Ordering::SeqCst);
        return Err(RedisError::Str(errors::NO_THREAD));
    }
    let _ = hand_over.send(block());
    Ok(())
}

/// Runs one sweep to its end on the coordinator thread and publishes its outcome.
fn coordinate(
    db: i32,
    opts: &Options,
    settings: &Settings,
    progress: &Arc<Progress>,
) -> RedisResult {
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| run(db, opts, settings, progress)));
    progress
        .duration_ms
        .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
    let result = match outcome {
        Ok(Ok(())) => Ok(progress.summary()),
        Ok(Err(e)) => Err(RedisError::String(format!("ERR sweep stopped: {e}"))),
        Err(_) => Err(RedisError::Str(
            "ERR sweep stopped: internal error (see the server log)",
        )),
    };
    crate::log::notice(&format!(
        "flowarchive: sweep {} in {} ms: {} candidates, {} archived, {} changed, {} ineligible, {} failed",
        if progress.dry_run { "(dry run) done" } else { "done" },
        progress.duration_ms.load(Ordering::Relaxed),
        progress.candidates.load(Ordering::Relaxed),
        progress.archived.load(Ordering::Relaxed),
        progress.skipped_changed.load(Ordering::Relaxed),
        progress.skipped_ineligible.load(Ordering::Relaxed),
        progress.failed_total(),
    ));
    SWEEPS_RUN.fetch_add(1, Ordering::Relaxed);
    *lock(&LAST) = Some(progress.clone());
    *lock(&CURRENT) = None;
    RUNNING.store(false, Ordering::SeqCst);
    result
}

/// Starts `concurrency` uploaders on the upload pool; each takes captured flows from the returned
/// channel until it closes, and sends every result to `done`.
fn start_uploaders(
    settings: &Settings,
    done: Sender<(String, Result<Uploaded, FlowError>)>,
) -> Result<SyncSender<Capture>, String> {
    let (job_tx, job_rx) = sync_channel::<Capture>(settings.concurrency);
    let job_rx = Arc::new(Mutex::new(job_rx));
    for _ in 0..settings.concurrency {
        let (job_rx, done, settings) = (job_rx.clone(), done.clone(), settings.clone());
        let store = Store::new(&settings.s3).map_err(|e| e.to_string())?;
        let uploader = Box::new(move || {
            archive::enter_idle_class();
            loop {
                // The lock is held only to take one flow, never during its upload.
                let next = lock(&job_rx).recv();
                let Ok(capture) = next else { break };
                let id = capture.flow.id.clone();
                let result = catch_unwind(AssertUnwindSafe(|| {
                    archive::upload(capture, &settings, &store)
                }))
                .unwrap_or_else(|_| Err(FlowError::Internal("upload worker panicked".into())));
                if done.send((id, result)).is_err() {
                    break;
                }
            }
        });
        if UPLOAD_POOL.submit(uploader).is_err() {
            return Err("no upload worker could be started".into());
        }
    }
    Ok(job_tx)
}

/// The sweep itself. This thread hands the server work (selection, capture, commit) to the main thread,
/// one short step at a time; `concurrency` worker threads in the idle scheduling class encode, upload and
/// verify; waking one never delays the event loop.
fn run(
    db: i32,
    opts: &Options,
    settings: &Settings,
    progress: &Arc<Progress>,
) -> Result<(), String> {
    let cutoff_ms = clock::now_ms() - settings.retention_ms;
    let mut selector = Selector::new(&settings.layout, cutoff_ms, opts.caller.clone());
    let limit = opts.limit.map(|l| l as u64);
    let (done_tx, done_rx) = channel::<(String, Result<Uploaded, FlowError>)>();
    let job_tx = if opts.dry_run {
        drop(done_tx);
        None
    } else {
        Some(start_uploaders(settings, done_tx)?)
    };
    let mut started = 0u64;
    let mut in_flight = 0usize;
    let mut seen = HashSet::new();
    let mut selection_held = 0;
    let finish = |(id, result): (String, Result<Uploaded, FlowError>), in_flight: &mut usize| {
        *in_flight -= 1;
        progress.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result.and_then(|up| archive::commit(up, settings)) {
            Ok(done) => {
                progress.archived.fetch_add(1, Ordering::Relaxed);
                progress
                    .raw_bytes
                    .fetch_add(done.raw_bytes, Ordering::Relaxed);
                progress
                    .stored_bytes
                    .fetch_add(done.stored_bytes, Ordering::Relaxed);
                progress
                    .main_thread_max_us
                    .fetch_max(done.main_thread_us, Ordering::Relaxed);
            }
            Err(e) => {
                metrics::failed(&id, &e);
                progress.count(&e);
            }
        }
    };
    'select: loop {
        let batch = archive::on_main_thread(db, Stage::Select, &mut selection_held, |ctx| {
            selector.next(ctx, &settings.layout, settings.batch_size)
        })?;
        let Some(batch) = batch else { break };
        for id in batch {
            if limit.is_some_and(|l| started >= l) {
                break 'select;
            }
            if !seen.insert(id.clone()) {
                continue;
            }
            progress.candidates.fetch_add(1, Ordering::Relaxed);
            if opts.dry_run {
                let mut held = 0;
                let inspected = archive::on_main_thread(db, Stage::Select, &mut held, |ctx| {
                    capture::inspect(ctx, &opts.caller, db, &id, settings, false, clock::now_ms())
                });
                selection_held = selection_held.max(held);
                match inspected {
                    Ok(Inspected::Eligible(..)) => {
                        started += 1;
                        lock(&progress.would_archive).push(id);
                    }
                    Ok(Inspected::AlreadyArchived(_)) => {
                        progress.skipped_ineligible.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => progress.count(&e),
                }
                continue;
            }
            // Commit what is done; wait while every worker is busy.
            while let Ok(done) = done_rx.try_recv() {
                finish(done, &mut in_flight);
            }
            while in_flight >= settings.concurrency {
                match done_rx.recv() {
                    Ok(done) => finish(done, &mut in_flight),
                    Err(_) => break 'select,
                }
            }
            let mut held = 0;
            let begun = archive::on_main_thread(db, Stage::Capture, &mut held, |ctx| {
                capture::start(ctx, &opts.caller, db, &id, settings, false, clock::now_ms())
            });
            let mut capture = match begun {
                Ok(Start::Capture(c)) => *c,
                Ok(Start::AlreadyArchived(_)) => {
                    progress.skipped_ineligible.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(e) => {
                    metrics::failed(&id, &e);
                    progress.count(&e);
                    continue;
                }
            };
            capture.held_us = held;
            if let Err(e) = archive::finish_capture(&mut capture) {
                metrics::failed(&id, &e);
                progress.count(&e);
                continue;
            }
            let Some(job_tx) = &job_tx else { break 'select };
            if job_tx.send(capture).is_err() {
                break 'select;
            }
            started += 1;
            in_flight += 1;
            progress.in_flight.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Closing the job channel ends the uploaders once the flows in flight are done; the results
    // channel closes when the last of them has returned, so no uploader outlives its sweep.
    drop(job_tx);
    while let Ok(done) = done_rx.recv() {
        finish(done, &mut in_flight);
    }
    progress
        .main_thread_max_us
        .fetch_max(selection_held, Ordering::Relaxed);
    Ok(())
}
