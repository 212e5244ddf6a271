//! FLOWARCHIVE.SWEEP: finds eligible flows in bounded steps (select), archives them through the same
//! begin → capture → encode → store → commit path as FLOWARCHIVE.FLOW with up to `concurrency` flows in
//! flight (uploaders), and answers a summary (progress). One sweep at a time; one coordinator thread
//! hands every step that touches the dataset to the event loop: several flows per step (begins for
//! every free uploader, commits for every returned upload) within the step budget.

pub mod progress;
pub mod select;
pub mod uploaders;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use redis_module::{
    BlockedClient, Context, ContextFlags, RedisError, RedisResult, RedisValue, ThreadSafeContext,
};

use crate::archive::capture::{self, Capture, Inspected, Start};
use crate::archive::eligible::Window;
use crate::archive::{self, Archived};
use crate::clock;
use crate::ops::configs::{self, Settings};
use crate::ops::errors::{self, FlowError};
use crate::ops::info::named;
use crate::ops::log;
use crate::ops::metrics::{self, Stage};
use crate::runtime::acl::Caller;
use crate::runtime::blocking::{answer_later, refuse_where_it_cannot_run, this_client};
use crate::runtime::mainthread;
use crate::runtime::pool::Pool;
use crate::runtime::server::{eviction_risk, selected_db};
use crate::s3::Store;
use crate::sweep::progress::Progress;
use crate::sweep::select::{Recent, Selector};
use crate::sweep::uploaders::Done;
use crate::sync::lock;

/// FLOWARCHIVE.SWEEP's arguments.
#[derive(Default)]
pub struct Request {
    pub limit: Option<usize>,
    pub dry_run: bool,
    pub asynchronous: bool,
}

static RUNNING: AtomicBool = AtomicBool::new(false);
static SWEEPS_RUN: AtomicU64 = AtomicU64::new(0);
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
    block: impl FnOnce() -> Option<ThreadSafeContext<BlockedClient>>,
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

/// Runs one sweep to its end on the coordinator thread and publishes its outcome.
fn coordinate(job: &Job, settings: &Arc<Settings>, progress: &Arc<Progress>) -> RedisResult {
    let started = Instant::now();
    let outcome = log::contained("a sweep", || Sweep::new(job, settings, progress).run());
    Progress::add(&progress.duration_ms, started.elapsed().as_millis() as u64);
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

/// One sweep in progress, on its coordinator thread.
struct Sweep<'a> {
    job: &'a Job,
    settings: &'a Arc<Settings>,
    progress: &'a Progress,
    window: Window,
    /// Flows sent to upload (DRYRUN: found eligible), for LIMIT.
    started: usize,
    /// Flows sent to the uploaders whose upload has not returned yet (at most `concurrency`: only
    /// these hold their event logs).
    uploading: usize,
    /// Selected and not begun yet; whether selection has more.
    queue: VecDeque<String>,
    selecting: bool,
    seen: Recent,
    /// Longest selection step.
    select_us: u64,
}

impl<'a> Sweep<'a> {
    fn new(job: &'a Job, settings: &'a Arc<Settings>, progress: &'a Progress) -> Self {
        Sweep {
            job,
            settings,
            progress,
            window: Window::now(settings.retention_ms, false),
            started: 0,
            uploading: 0,
            queue: VecDeque::new(),
            selecting: true,
            seen: Recent::new(),
            select_us: 0,
        }
    }

    /// Selects in bounded steps and archives (or, DRYRUN, inspects) each candidate once. Each round
    /// begins as many flows as uploaders are free (one main-thread step for all of them, within the
    /// step budget), then commits every flow whose upload has returned (likewise), and waits for an
    /// upload only when it has nothing else to do.
    fn run(mut self) -> Result<(), String> {
        let mut selector = Selector::new(
            &self.settings.layout,
            self.window,
            self.settings.read_max_bytes,
            self.job.caller.clone(),
        );
        let (done_tx, done_rx) = channel::<Done>();
        // DRYRUN uploads nothing: its results channel closes at once.
        let uploads = if self.job.dry_run {
            drop(done_tx);
            None
        } else {
            Some(uploaders::start(self.settings, done_tx)?)
        };
        let mut returned: Vec<Done> = Vec::new();
        loop {
            returned.extend(done_rx.try_iter());
            self.uploading -= returned.len().min(self.uploading);
            let free = self.settings.concurrency.saturating_sub(self.uploading);
            let ids = self.next_ids(&mut selector, free)?;
            let began = !ids.is_empty();
            match &uploads {
                None => ids.into_iter().for_each(|id| self.dry_run(id)),
                Some(uploads) if !self.archive(ids, uploads) => break,
                Some(_) => {}
            }
            let committed = !returned.is_empty();
            self.commit(std::mem::take(&mut returned));
            if began || committed {
                continue;
            }
            // Nothing to begin or commit: every uploader is busy, or selection is done.
            if self.uploading == 0 {
                break;
            }
            match done_rx.recv() {
                Ok(done) => returned.push(done),
                Err(_) => break,
            }
        }
        // Closing the job channel ends the uploaders once the flows in flight are done; the results
        // channel closes when the last of them has returned, so no uploader outlives its sweep.
        drop(uploads);
        returned.extend(done_rx.iter());
        self.commit(returned);
        let max = &self.progress.main_thread_max_us;
        max.fetch_max(self.select_us, Ordering::Relaxed);
        Ok(())
    }

    /// Up to `n` candidates to begin now, each once and within LIMIT, selecting (one step per batch)
    /// when none is queued. Empty when `n` is 0 or no candidate is left.
    fn next_ids(&mut self, selector: &mut Selector, n: usize) -> Result<Vec<String>, String> {
        let n = match self.job.limit {
            Some(limit) => n.min(limit.saturating_sub(self.started)),
            None => n,
        };
        let mut ids = Vec::new();
        while ids.len() < n {
            let Some(id) = self.queue.pop_front() else {
                // Select more only when there is nothing to begin yet.
                if !ids.is_empty() || !self.selecting {
                    break;
                }
                match self.select(selector)? {
                    Some(batch) => self.queue.extend(batch),
                    None => self.selecting = false,
                }
                continue;
            };
            if self.seen.insert(&id) {
                Progress::add(&self.progress.candidates, 1);
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn select(&mut self, selector: &mut Selector) -> Result<Option<Vec<String>>, String> {
        let (layout, batch) = (&self.settings.layout, self.settings.batch_size);
        mainthread::step(self.job.db, Stage::Select, &mut self.select_us, |ctx| {
            // A node demoted mid-sweep captures and uploads nothing more (it could not commit).
            if ctx.get_flags().contains(ContextFlags::SLAVE) {
                return Err(errors::NOT_PRIMARY.to_string());
            }
            selector.next(ctx, layout, batch)
        })
    }

    /// DRYRUN: the whole eligibility check, nothing watched or read beyond it.
    fn dry_run(&mut self, id: String) {
        let (job, settings, window) = (self.job, self.settings, &self.window);
        let inspected = mainthread::step(job.db, Stage::Select, &mut self.select_us, |ctx| {
            capture::inspect(
                ctx,
                &job.caller,
                job.db,
                &id,
                &settings.layout,
                window,
                settings.read_max_bytes,
            )
        });
        match inspected {
            Ok(Inspected::Eligible { .. }) => {
                self.started += 1;
                lock(&self.progress.would_archive).push(id);
            }
            Ok(Inspected::AlreadyArchived(_)) => {
                Progress::add(&self.progress.skipped_ineligible, 1)
            }
            Err(e) => self.progress.count(&e),
        }
    }

    /// Begins and captures `ids` (their first steps shared, within the step budget) and hands each to
    /// the uploaders: complete captures first, then long event logs read in their own chunk steps.
    /// `false` when the uploaders are gone.
    fn archive(&mut self, ids: Vec<String>, uploads: &SyncSender<Capture>) -> bool {
        let (job, settings, window) = (self.job, self.settings, &self.window);
        let began = archive::begin_many(&job.caller, job.db, &ids, settings, window);
        let mut long = Vec::new();
        for (id, started) in ids.iter().zip(began) {
            match started {
                Ok(Start::Capture(capture)) if capture.complete() => {
                    if !self.upload(*capture, uploads) {
                        return false;
                    }
                }
                Ok(Start::Capture(capture)) => long.push(capture),
                Ok(Start::AlreadyArchived(_)) => {
                    Progress::add(&self.progress.skipped_ineligible, 1)
                }
                Err(e) => self.not_archived(id, &e),
            }
        }
        for mut capture in long {
            if let Err(e) = archive::finish_capture(&mut capture) {
                self.not_archived(&capture.flow.id, &e);
            } else if !self.upload(*capture, uploads) {
                return false;
            }
        }
        true
    }

    /// Hands a whole capture to the uploaders. `false` when they are gone.
    fn upload(&mut self, capture: Capture, uploads: &SyncSender<Capture>) -> bool {
        if uploads.send(capture).is_err() {
            return false;
        }
        self.started += 1;
        self.uploading += 1;
        Progress::add(&self.progress.in_flight, 1);
        true
    }

    /// Commits the flows whose upload returned (several per main-thread step) and counts each outcome.
    fn commit(&mut self, returned: Vec<Done>) {
        let mut uploaded = Vec::with_capacity(returned.len());
        let mut outcomes = Vec::new();
        for (id, result) in returned {
            match result {
                Ok(up) => uploaded.push(up),
                Err(e) => outcomes.push((id, Err(e))),
            }
        }
        outcomes.extend(archive::commit_many(uploaded, self.settings));
        for (id, outcome) in outcomes {
            self.progress.in_flight.fetch_sub(1, Ordering::Relaxed);
            match outcome {
                Ok(done) => self.archived(&done),
                Err(e) => self.not_archived(&id, &e),
            }
        }
    }

    /// Counts and logs a flow that stays live.
    fn not_archived(&self, id: &str, e: &FlowError) {
        metrics::failed(id, e);
        self.progress.count(e);
    }

    fn archived(&self, done: &Archived) {
        let p = self.progress;
        Progress::add(&p.archived, 1);
        Progress::add(&p.raw_bytes, done.raw_bytes);
        Progress::add(&p.stored_bytes, done.stored_bytes);
        p.main_thread_max_us
            .fetch_max(done.main_thread_us, Ordering::Relaxed);
    }
}
