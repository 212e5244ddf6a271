//! Hands short pieces of work to the server's event loop and waits for their result.
//!
//! A worker thread that takes the server lock itself can be descheduled while holding it, and then
//! every client waits for milliseconds on a few microseconds of work. Work run by the event loop holds
//! the server only for its own CPU time.
//!
//! Steps handed over by many workers at once wait together, and the event loop runs them in turns of
//! at most `step-budget-us` (the last step of a turn may run past it): between two turns it serves
//! its clients. The server runs every module timer that is due in one go, so a timer per step would
//! let sixteen workers' steps hold the loop back to back, sixteen budgets long. A turn is asked for
//! when a step is handed over, yet a turn already running may take and run that step before its
//! worker marks a turn due: the worker then asks for a turn nobody needs, and may end (its pool idle)
//! before that turn runs. MODULE UNLOAD is refused while a turn is due (`turn_due`), so no one-shot or
//! timer pointing into the module outlives it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
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

/// A step handed over, in the list of those the event loop has not taken yet.
struct Handed {
    job: Job,
    next: *mut Handed,
}

/// The steps handed over and not yet taken, newest first. A worker adds one with a compare-and-swap
/// and the event loop takes them all with one swap, so neither ever waits for the other: a worker (in
/// the idle scheduling class) descheduled inside a locked push, or halfway through a channel's send,
/// would hold every client waiting on the loop.
static HANDED: AtomicPtr<Handed> = AtomicPtr::new(std::ptr::null_mut());

thread_local! {
    /// On the event loop: steps taken and not yet run, oldest first (a turn stops at the budget).
    static TAKEN: RefCell<VecDeque<Job>> = const { RefCell::new(VecDeque::new()) };
}

/// Whether a turn is due for the steps handed over (asked for and not yet ended): only then is none
/// asked for. Swapped, never just stored, so that whoever turns it off sees every step handed over
/// before the last turn on (`turn`).
static TURN_DUE: AtomicBool = AtomicBool::new(false);

/// Whether a turn has been asked for and has not ended (a one-shot or its timer may be pending). On the
/// main thread outside a turn, with every pool idle, false means none is pending: a turn is asked for
/// only when this turns true, or by a turn while it stays true, and only a turn's end (or `no_turn`)
/// turns it false.
pub fn turn_due() -> bool {
    TURN_DUE.load(Ordering::SeqCst)
}

/// Adds a step to those handed over.
fn hand_over(job: Job) {
    let node = Box::into_raw(Box::new(Handed {
        job,
        next: std::ptr::null_mut(),
    }));
    let mut head = HANDED.load(Ordering::Relaxed);
    loop {
        // SAFETY: `node` is this thread's alone until the exchange below publishes it.
        unsafe { (*node).next = head };
        match HANDED.compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return,
            Err(now) => head = now,
        }
    }
}

/// The next step to run on the event loop: one taken before, else the oldest of those handed over
/// since (all taken at once).
fn next_step() -> Option<Job> {
    TAKEN.with_borrow_mut(|taken| {
        if taken.is_empty() {
            let mut node = HANDED.swap(std::ptr::null_mut(), Ordering::Acquire);
            let mut newest_first = Vec::new();
            while !node.is_null() {
                // SAFETY: the swap took the whole list, each node boxed by `hand_over` and reached
                // once, here.
                let handed = unsafe { Box::from_raw(node) };
                node = handed.next;
                newest_first.push(handed.job);
            }
            taken.extend(newest_first.into_iter().rev());
        }
        taken.pop_front()
    })
}

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
    hand_over(job);
    let refused = !TURN_DUE.swap(true, Ordering::SeqCst) && !ask_for_turn();
    // A refusal dropped every step waiting, this one too: the wait then ends at once.
    match result.recv() {
        Ok(out) => Ok(out),
        Err(_) if refused => Err(ServerError::NoEventLoop),
        Err(_) => Err(ServerError::MainThreadPanic),
    }
}

/// Asks the event loop for a turn of the waiting steps (`turn`), through a one-shot that starts a
/// timer for it. False if the server refused: no turn can come, so every step waiting is dropped,
/// which ends each one's wait.
fn ask_for_turn() -> bool {
    // SAFETY: the API is thread-safe; `start_turn` takes no data.
    let asked = unsafe {
        raw::RedisModule_EventLoopAddOneShot.map_or(raw::REDISMODULE_ERR as i32, |f| {
            f(Some(start_turn), std::ptr::null_mut())
        })
    };
    let asked = asked == raw::REDISMODULE_OK as i32;
    if !asked {
        no_turn();
    }
    asked
}

/// No turn is due and none can come: every step waiting is dropped, which ends each one's wait.
fn no_turn() {
    TURN_DUE.swap(false, Ordering::SeqCst);
    while next_step().is_some() {}
}

/// On the event loop: starts a timer for a turn. A timer's context is one execution unit, so the
/// turn's replicated writes reach replicas and the AOF as one MULTI/EXEC (a detached context would
/// send each write on its own). Started from here, not from a turn, where the server would run it
/// only a millisecond later.
extern "C" fn start_turn(_: *mut c_void) {
    // SAFETY: on the main thread, with the module's context; the timer takes no data.
    let started = unsafe {
        raw::RedisModule_CreateTimer.map(|create_timer| {
            create_timer(
                CONTEXT.load(Ordering::Acquire),
                0,
                Some(turn),
                std::ptr::null_mut(),
            )
        })
    };
    if started.is_none() {
        no_turn();
    }
}

/// One turn of the event loop's: the waiting steps in order, until the step budget is spent (at least
/// one step). Steps left ask for the next turn, after the loop has served its clients.
extern "C" fn turn(ctx: *mut raw::RedisModuleCtx, _: *mut c_void) {
    let ctx = Context::new(ctx);
    let (started, budget) = (Instant::now(), step_budget());
    let mut ran = Duration::ZERO;
    let mut spent = false;
    while let Some(job) = next_step() {
        // A panic is logged; the waiting worker sees its result channel close, and the flow stays
        // live.
        let _ = log::contained("a main-thread step", || job(&ctx));
        ran = started.elapsed();
        if ran >= budget {
            spent = true;
            break;
        }
    }
    metrics::MAIN_THREAD_MAX_TURN_US.fetch_max(ran.as_micros() as u64, Ordering::Relaxed);
    if spent && TAKEN.with_borrow(|taken| !taken.is_empty()) {
        // Still due: the next turn takes the rest.
        ask_for_turn();
        return;
    }
    // None due now. A step sent before this swap by a worker that found a turn due (and asked for
    // none) would wait for nobody: the swap reads that worker's, so its step is seen here.
    TURN_DUE.swap(false, Ordering::SeqCst);
    if !HANDED.load(Ordering::Acquire).is_null() && !TURN_DUE.swap(true, Ordering::SeqCst) {
        ask_for_turn();
    }
}
