//! Hands short pieces of work to the server's event loop and waits for their result.
//!
//! A worker thread that takes the server lock itself can be descheduled while holding it, and then
//! every client waits for milliseconds on a few microseconds of work. Work run by the event loop holds
//! the server only for its own CPU time.

use std::ops::ControlFlow;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use redis_module::{raw, Context};

use crate::format::event_log::EventLog;
use crate::ops::errors::{FlowError, ServerError};
use crate::ops::metrics::{self, Buffered, Stage};
use crate::ops::{configs, log};
use crate::runtime::server::{list_range_each, select_db, with_string};

/// The module's detached context, used only on the main thread to start timers.
static CONTEXT: AtomicPtr<raw::RedisModuleCtx> = AtomicPtr::new(std::ptr::null_mut());

type Job = Box<dyn FnOnce(&Context) + Send>;

/// The server's main thread (the one that loaded the module).
static MAIN: std::sync::OnceLock<std::thread::ThreadId> = std::sync::OnceLock::new();

/// Whether the calling thread is the server's main thread.
pub fn is_main() -> bool {
    MAIN.get() == Some(&std::thread::current().id())
}

/// Creates the context the event loop runs jobs with. Called once from OnLoad.
pub fn init(ctx: &Context) {
    let _ = MAIN.set(std::thread::current().id());
    // SAFETY: OnLoad passes the module's live context.
    let detached = unsafe {
        raw::RedisModule_GetDetachedThreadSafeContext.map_or(std::ptr::null_mut(), |f| f(ctx.ctx))
    };
    CONTEXT.store(detached, Ordering::Release);
}

/// Frees the context at MODULE UNLOAD (nothing is in flight then).
pub fn deinit() {
    let ctx = CONTEXT.swap(std::ptr::null_mut(), Ordering::AcqRel);
    // SAFETY: created by `init`; no job can use it any more (the unload found every pool idle).
    unsafe {
        if let (false, Some(free)) = (ctx.is_null(), raw::RedisModule_FreeThreadSafeContext) {
            free(ctx);
        }
    }
}

/// A log of at most this many events and `WHOLE_BYTES` is read in one main-thread step (capture, live
/// reads), so its commit can read it again whole and nothing needs to follow its writes. A longer one
/// is read in chunks of at most this many events, each stopped at the step budget (`read_log`).
pub const EVENTS_PER_STEP: usize = 1024;

/// A log of few events is read whole up to this many bytes, whatever the time it takes (so whether
/// it is read whole depends on its bytes, not on the machine's speed); past them it goes on in chunks
/// like a long log (1,000 events of 60 KB took 115 ms of the main thread when read whole). A snapshot
/// of more bytes is copied in chunks too (`read_string_step`), and followed instead of compared.
pub const WHOLE_BYTES: u64 = 1 << 20;

/// What a chunk (past a short log's first) reads before the step budget can stop it, so every step
/// moves on: this many events, or this many bytes of large ones, whichever comes first.
const MIN_CHUNK: usize = 64;
const MIN_CHUNK_BYTES: u64 = 256 << 10;

/// What counts a copy from before it was made, or why it was measured and not made; `None` if none
/// was counted.
pub type Counted = Option<Result<ByteCap, FlowError>>;

/// What one read (a capture, a live read) has copied out of the server: its bytes against its own cap
/// (`read-max-bytes`), and the memory holding them, with every other read's, against
/// `buffer-max-bytes`, counted in INFO `buffered_bytes` until released or dropped.
#[derive(Debug)]
pub struct ByteCap {
    /// The bytes copied, each event with one byte for its line end.
    copied: u64,
    /// The memory they take.
    held: Buffered,
    pub max: u64,
}

impl ByteCap {
    /// A read capped at `max` bytes that copies `first` bytes first (a snapshot), refused as any copy
    /// is (`take`): past `max` (`over_cap`), or past `buffer-max-bytes` while other reads hold bytes.
    pub fn new(
        first: u64,
        max: u64,
        over_cap: impl FnOnce() -> FlowError,
    ) -> Result<ByteCap, FlowError> {
        let mut cap = ByteCap {
            copied: 0,
            held: Buffered::hold(0),
            max,
        };
        match first {
            0 => Ok(cap),
            _ => cap.take_bytes(first, over_cap).map(|()| cap),
        }
    }

    /// Counts `bytes` more copied, taking as much memory (a string's, or a hash's fields and values),
    /// refused as any copy is (`take`): past `max` (`over_cap`), or past `buffer-max-bytes` while other
    /// reads hold bytes.
    pub fn take_bytes(
        &mut self,
        bytes: u64,
        over_cap: impl FnOnce() -> FlowError,
    ) -> Result<(), FlowError> {
        self.take(bytes, bytes).or_else(|why| why.stopped(over_cap))
    }

    pub fn used(&self) -> u64 {
        self.copied
    }

    /// Counts `bytes` more copied, taking `memory` more, unless the bytes would pass this read's cap,
    /// or the memory take every read's together past `buffer-max-bytes` while other reads hold some.
    fn take(&mut self, bytes: u64, memory: u64) -> Result<(), LogRead> {
        if self.copied + bytes > self.max {
            return Err(LogRead::OverCap);
        }
        let now = metrics::buffered_now();
        let others = now.saturating_sub(self.held.bytes());
        let max = buffer_max();
        if others > 0 && now + memory > max {
            return Err(LogRead::Full(max));
        }
        self.copied += bytes;
        self.held.grow(memory);
        Ok(())
    }

    /// What this read copied is freed but `memory` of it, held on: it counts that only.
    pub fn keep_only(&mut self, memory: u64) {
        self.held.release();
        self.held.grow(memory);
    }
}

/// `buffer-max-bytes`.
fn buffer_max() -> u64 {
    configs::BUFFER_MAX_BYTES.get().max(0) as u64
}

/// Whether the module holds `buffer-max-bytes` or more for flows in flight: a sweep begins no flow
/// then.
pub fn buffers_full() -> bool {
    metrics::buffered_now() >= buffer_max()
}

/// How a `read_log` call ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LogRead {
    /// Read on: the log is complete when `out` holds `total` events, else call again in another step.
    Read,
    /// The next event would pass the cap; it was measured where the server holds it, not copied.
    OverCap,
    /// The next event would take the module past `buffer-max-bytes` (this many bytes) while other
    /// reads hold bytes; measured, not copied.
    Full(u64),
    /// The list ended before `total`: it shrank since it was measured.
    Shrunk,
}

impl LogRead {
    /// Why the read of a flow stops, if it does: `over_cap` for the flow past its read's cap, the
    /// module's buffers full, or a change (fewer elements than LLEN said).
    pub fn stopped(self, over_cap: impl FnOnce() -> FlowError) -> Result<(), FlowError> {
        match self {
            LogRead::Read => Ok(()),
            LogRead::OverCap => Err(over_cap()),
            LogRead::Full(max) => Err(FlowError::Full(max)),
            LogRead::Shrunk => Err(FlowError::Changed),
        }
    }
}

/// Appends the next events of the list at `key` to `out` (from `out.len()` on, towards `total`), each
/// measured into `cap` (with one byte for its line end) before it is copied. A log of at most
/// `EVENTS_PER_STEP` events is read whole up to `WHOLE_BYTES`; any other read takes at most
/// `EVENTS_PER_STEP` events per call and, past `MIN_CHUNK_BYTES` (or, of a longer log, past
/// `MIN_CHUNK` events), only until the step budget is spent, so a chunk of large events holds the
/// server about as long as a batched step. A read may need more calls (`LogRead::Read` with `out`
/// short of `total`). Main thread.
pub fn read_log(
    ctx: &Context,
    key: &str,
    total: usize,
    out: &mut EventLog,
    cap: &mut ByteCap,
) -> Result<LogRead, ServerError> {
    let from = out.len();
    let to = (from + EVENTS_PER_STEP).min(total);
    let deadline = Instant::now() + step_budget();
    let long = total > EVENTS_PER_STEP;
    let first_of_short = !long && from == 0;
    let (mut refused, mut paused, chunk_start) = (None, false, cap.used());
    list_range_each(ctx, key, from, to, |event| {
        if let Err(why) = cap.take(event.len() as u64 + 1, out.growth(event.len()) as u64) {
            refused = Some(why);
            return ControlFlow::Break(());
        }
        out.push(event);
        let bytes = cap.used() - chunk_start;
        paused = match first_of_short {
            true => bytes >= WHOLE_BYTES,
            false => {
                let moved_on = (long && out.len() - from >= MIN_CHUNK) || bytes >= MIN_CHUNK_BYTES;
                moved_on && Instant::now() >= deadline
            }
        };
        if paused {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    Ok(match (refused, paused) {
        (Some(why), _) => why,
        (None, false) if out.len() != to => LogRead::Shrunk,
        _ => LogRead::Read,
    })
}

/// Copies the next bytes of the string at `key` into `out`, which holds its first `out.len()`
/// bytes: `MIN_CHUNK_BYTES`, then on in pieces as long as the step budget lasts, up to `total`, the
/// length it had when its read began. `LogRead::Shrunk` when the key no longer holds a string of
/// `total` bytes (a write its watch also saw). The bytes were counted when the read began. Main
/// thread.
pub fn read_string_step(ctx: &Context, key: &str, total: usize, out: &mut Vec<u8>) -> LogRead {
    let go_on = pieces();
    with_string(ctx, key, |value| {
        let Some(value) = value.filter(|v| v.len() == total && out.len() <= total) else {
            return LogRead::Shrunk;
        };
        // Room for all of it at once: no later piece moves what is copied already.
        out.reserve_exact(total - out.len());
        let (piece, from) = (MIN_CHUNK_BYTES as usize, out.len());
        let mut end = (out.len() + piece).min(total);
        loop {
            out.extend_from_slice(&value[out.len()..end]);
            if end == total || !go_on((out.len() - from) as u64) {
                return LogRead::Read;
            }
            end = (end + piece).min(total);
        }
    })
}

/// How far a step that copies a large value in pieces goes, from now: on while it has copied less than
/// `MIN_CHUNK_BYTES` (so every step moves on), then while the step budget lasts. It stops between two
/// pieces, never inside one.
pub fn pieces() -> impl Fn(u64) -> bool {
    let deadline = Instant::now() + step_budget();
    move |copied| copied < MIN_CHUNK_BYTES || Instant::now() < deadline
}

/// Runs `f` on the event loop in `db` and returns its result, timing the main-thread stretch into the
/// stage's maximum and into `held`. From worker threads only.
pub fn step<T: Send, E: From<ServerError> + Send>(
    db: i32,
    stage: Stage,
    held: &mut u64,
    f: impl FnOnce(&Context) -> Result<T, E> + Send,
) -> Result<T, E> {
    metrics::MAIN_THREAD_STEPS.fetch_add(1, Ordering::Relaxed);
    run(|ctx| {
        metrics::timed(stage, held, || {
            select_db(ctx, db)?;
            f(ctx)
        })
    })?
}

/// Time a batched step may spend before it takes no further item (`step-budget-us`, 0.25 ms by
/// default): each hand-off to the event loop costs a wake-up of the loop and of the waiting worker (on
/// busy cores, a scheduler slice each), so one step does several short pieces of work, yet stays short
/// enough for clients' tail latency.
fn step_budget() -> Duration {
    Duration::from_micros(configs::STEP_BUDGET_US.get().max(0) as u64)
}

/// Runs `f` on `items` in order, in one step on the event loop in `db`, until the step budget is spent
/// (always at least one item; none is cut short). Returns the results of the items it reached, in
/// order: the caller hands the rest to the next step. From worker threads only.
pub fn step_batch<I: Sync, T: Send>(
    db: i32,
    stage: Stage,
    held: &mut u64,
    items: &[I],
    mut f: impl FnMut(&Context, &I) -> T + Send,
) -> Result<Vec<T>, ServerError> {
    step(db, stage, held, |ctx| {
        let (started, budget) = (Instant::now(), step_budget());
        let mut out = Vec::new();
        for item in items {
            if !out.is_empty() && started.elapsed() >= budget {
                break;
            }
            out.push(f(ctx, item));
        }
        Ok(out)
    })
}

/// Runs `work` on the event loop and returns its result. Never call it from the main thread.
fn run<T: Send>(work: impl FnOnce(&Context) -> T + Send) -> Result<T, ServerError> {
    if CONTEXT.load(Ordering::Acquire).is_null() {
        return Err(ServerError::NoEventLoop);
    }
    let (done, result) = sync_channel(1);
    let job: Box<dyn FnOnce(&Context) + Send + '_> = Box::new(move |ctx| {
        let _ = done.send(work(ctx));
    });
    // SAFETY: only the lifetime is erased. This thread waits below until the job has run or has been
    // dropped (which drops `done` and ends the wait), so nothing it borrows outlives its use.
    let job: Job = unsafe { std::mem::transmute(job) };
    let data = Box::into_raw(Box::new(job)) as *mut c_void;
    // SAFETY: the API is thread-safe; on success the server passes `data` to `schedule_job` once.
    let queued = unsafe {
        raw::RedisModule_EventLoopAddOneShot
            .map_or(raw::REDISMODULE_ERR as i32, |f| f(Some(schedule_job), data))
    };
    if queued != raw::REDISMODULE_OK as i32 {
        // SAFETY: the server refused `data`, so it is still ours.
        drop(unsafe { Box::from_raw(data as *mut Job) });
        return Err(ServerError::NoEventLoop);
    }
    result.recv().map_err(|_| ServerError::MainThreadPanic)
}

/// On the event loop: starts a timer for the job. A timer's context is one execution unit, so the job's
/// replicated writes reach replicas and the AOF as one MULTI/EXEC (a detached context would send each
/// write on its own).
extern "C" fn schedule_job(data: *mut c_void) {
    // SAFETY: on the main thread, with the module's context; the timer owns `data` from here on.
    unsafe {
        if let Some(create_timer) = raw::RedisModule_CreateTimer {
            create_timer(CONTEXT.load(Ordering::Acquire), 0, Some(run_job), data);
        } else {
            drop(Box::from_raw(data as *mut Job));
        }
    }
}

extern "C" fn run_job(ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    // SAFETY: `data` is the box `run` leaked for this one call.
    let job = unsafe { Box::from_raw(data as *mut Job) };
    let ctx = Context::new(ctx);
    // A panic is logged; the waiting worker sees its result channel close, and the flow stays live.
    let _ = log::contained("a main-thread step", || job(&ctx));
}
