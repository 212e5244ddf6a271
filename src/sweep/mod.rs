//! FLOWARCHIVE.SWEEP: finds eligible flows in bounded steps (select), archives them through the same
//! begin → capture → encode → store → commit path as FLOWARCHIVE.FLOW with up to `concurrency` flows in
//! flight (uploaders), and answers a summary (progress). One sweep at a time; one coordinator thread
//! hands every step that touches the dataset to the event loop: several flows per step (begins for
//! every free uploader, commits for every returned upload) within the step budget.
//!
//! The parts: `coordinator` the state machine that drives one sweep (selecting, draining, done);
//! `flow` the state of each flow the sweep has seen and the moves it may make; `ledger` the one code
//! that moves a flow and changes the counts, and the check at the end of every sweep that every
//! candidate has exactly one outcome and the summary adds up (a violation is logged and counted in
//! INFO as `sweep_count_errors`); `progress` the counters, the summary and their INFO fields;
//! `select` the candidates; `uploaders` the idle-class upload workers. This file: the command, the
//! internal timer, starting a sweep and publishing its outcome.

mod coordinator;
mod flow;
mod ledger;
pub mod progress;
pub mod select;
pub mod uploaders;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use redis_module::{Context, ContextFlags, RedisError, RedisResult, RedisValue};

use crate::clock;
use crate::ops::configs::{self, Settings};
use crate::ops::errors::{self, ServerError};
use crate::ops::info::named;
use crate::ops::log;
use crate::runtime::acl::Caller;
use crate::runtime::blocking::{answer_later, refuse_where_it_cannot_run, this_client, Client};
use crate::runtime::pool::Pool;
use crate::runtime::server::{eviction_risk, selected_db};
use crate::s3::{Store, StoreError};
use crate::sweep::coordinator::Coordinator;
use crate::sweep::ledger::Ledger;
use crate::sweep::progress::Progress;
use crate::sync::lock;

/// FLOWARCHIVE.SWEEP's arguments.
#[derive(Default)]
pub struct Request {
    pub limit: Option<usize>,
    pub dry_run: bool,
    pub asynchronous: bool,
}

/// Why a sweep stopped before its end. Its flows are as the sweep left them: each live, or archived
/// whole (those at the uploaders end `InFlight`).
#[derive(Debug)]
pub enum Stopped {
    /// The server failed a selection step, or the node stopped taking writes.
    Server(ServerError),
    /// The S3 settings name no usable store.
    Store(StoreError),
    /// No upload worker could be started.
    NoWorker,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stopped::Server(e) => e.fmt(f),
            Stopped::Store(e) => e.fmt(f),
            Stopped::NoWorker => f.write_str("no upload worker could be started"),
        }
    }
}

impl From<ServerError> for Stopped {
    fn from(e: ServerError) -> Self {
        Stopped::Server(e)
    }
}

impl From<StoreError> for Stopped {
    fn from(e: StoreError) -> Self {
        Stopped::Store(e)
    }
}

static RUNNING: AtomicBool = AtomicBool::new(false);
static SWEEPS_RUN: AtomicU64 = AtomicU64::new(0);
/// Sweeps whose counts failed the end-of-sweep check (`Ledger::check`).
static COUNT_ERRORS: AtomicU64 = AtomicU64::new(0);
static CURRENT: Mutex<Option<Arc<Progress>>> = Mutex::new(None);
static LAST: Mutex<Option<Arc<Progress>>> = Mutex::new(None);

/// The sweep coordinator: one sweep at a time.
static SWEEP_POOL: Pool = Pool::new("flowarchive-sweep", 1, 1);

pub fn running() -> bool {
    RUNNING.load(Ordering::SeqCst)
}

#[linkme::distributed_slice(crate::ops::info::INFO_FIELDS)]
static SWEEP_FIELDS: crate::ops::info::Fields = fields;

/// The sweep fields of INFO: the running sweep's and the last one's.
fn fields() -> Vec<(String, i64)> {
    let mut out = named([
        ("sweeps_run", SWEEPS_RUN.load(Ordering::Relaxed) as i64),
        ("sweep_running", running() as i64),
        (
            "sweep_count_errors",
            COUNT_ERRORS.load(Ordering::Relaxed) as i64,
        ),
    ]);
    for (name, progress) in [("sweep_current", &CURRENT), ("last_sweep", &LAST)] {
        let progress = lock(progress).clone().unwrap_or_default();
        let fields = progress.fields().into_iter();
        out.extend(fields.map(|(k, v)| (format!("{name}_{k}"), v)));
    }
    out
}

/// FLOWARCHIVE.SWEEP in the caller's DB, under the caller's ACL.
pub fn command(ctx: &Context, request: Request) -> RedisResult {
    refuse_where_it_cannot_run(ctx, "FLOWARCHIVE.SWEEP", true)?;
    let Request {
        limit,
        dry_run,
        asynchronous,
    } = request;
    let job = Job {
        db: selected_db(ctx),
        limit,
        dry_run,
        caller: Caller::of(ctx),
    };
    if asynchronous {
        start(ctx, job, || None)?;
        return Ok(RedisValue::SimpleStringStatic("STARTED"));
    }
    start(ctx, job, || this_client(ctx))?;
    Ok(RedisValue::NoReply)
}

/// The internal timer (`flowarchive.sweep-interval`, for users without cron): sweeps DB 0 on a primary,
/// with the server's own rights, once the interval has passed since the last timer sweep started.
#[redis_module_macros::cron_event_handler]
fn on_timer(ctx: &Context, _hz: u64) {
    static LAST_TIMER_SWEEP_MS: AtomicI64 = AtomicI64::new(0);
    let interval = configs::sweep_interval_ms();
    let now = clock::now_ms();
    if interval <= 0
        || running()
        || now - LAST_TIMER_SWEEP_MS.load(Ordering::Relaxed) < interval
        || ctx.get_flags().contains(ContextFlags::SLAVE)
    {
        return;
    }
    LAST_TIMER_SWEEP_MS.store(now, Ordering::Relaxed);
    let job = Job {
        db: 0,
        limit: None,
        dry_run: false,
        caller: Caller::Server,
    };
    if let Err(e) = start(ctx, job, || None) {
        log::warning(&format!("flowarchive: timer sweep not started: {e}"));
    }
}

/// One sweep to run.
struct Job {
    db: i32,
    limit: Option<usize>,
    dry_run: bool,
    /// Whose ACL the sweep acts under: flows this user may not archive are skipped and counted.
    caller: Caller,
}

/// Starts a sweep. Once it is sure to start, `block` may block the calling client, which then gets the
/// summary when the sweep ends (ASYNC and the timer block nobody).
fn start(
    ctx: &Context,
    job: Job,
    block: impl FnOnce() -> Option<Client>,
) -> Result<(), RedisError> {
    let settings = Settings::current();
    settings
        .usable()
        .map_err(|why| RedisError::String(format!("ERR {why}")))?;
    if let Some(why) = eviction_risk(ctx) {
        return Err(RedisError::String(format!("ERR {why}")));
    }
    select::check_readable(ctx, &job.caller, &settings.layout)?;
    if RUNNING.swap(true, Ordering::SeqCst) {
        return Err(RedisError::Str(errors::SWEEP_RUNNING));
    }
    let progress = Arc::new(Progress::new(job.dry_run));
    // Refuse a sweep that cannot upload before it selects anything.
    let started = Store::new(&settings.s3)
        .map_err(|e| RedisError::String(format!("ERR {e}")))
        .and_then(|_| {
            *lock(&CURRENT) = Some(progress.clone());
            let work = move || coordinate(&job, &settings, &progress);
            answer_later(&SWEEP_POOL, errors::NO_THREAD, block, work)
        });
    if started.is_err() {
        *lock(&CURRENT) = None;
        RUNNING.store(false, Ordering::SeqCst);
    }
    started
}

/// Runs one sweep to its end on the coordinator thread, checks its counts and publishes its outcome.
fn coordinate(job: &Job, settings: &Arc<Settings>, progress: &Arc<Progress>) -> RedisResult {
    let started = Instant::now();
    let mut ledger = Ledger::new(progress.clone());
    let outcome = log::contained("a sweep", || {
        Coordinator::new(job, settings, &mut ledger)?.run()
    });
    progress.add_duration_ms(started.elapsed().as_millis() as u64);
    check_counts(&ledger);
    let result = match outcome {
        Some(Ok(())) => Ok(progress.summary()),
        Some(Err(e)) => Err(RedisError::String(format!("ERR sweep stopped: {e}"))),
        None => Err(RedisError::Str(
            "ERR sweep stopped: internal error (see the server log)",
        )),
    };
    log::notice(&progress.log_line());
    SWEEPS_RUN.fetch_add(1, Ordering::Relaxed);
    *lock(&LAST) = Some(progress.clone());
    *lock(&CURRENT) = None;
    RUNNING.store(false, Ordering::SeqCst);
    result
}

/// The end-of-sweep check, in every build: a sweep whose counts do not add up is logged at warning
/// and counted in INFO (`sweep_count_errors`); its summary is answered as counted.
fn check_counts(ledger: &Ledger) {
    let wrong = ledger.check();
    if wrong.is_empty() {
        return;
    }
    COUNT_ERRORS.fetch_add(1, Ordering::Relaxed);
    log::warning(&format!(
        "flowarchive: sweep counts do not add up: {}",
        wrong.join("; ")
    ));
}
