//! The archive's counters for `INFO flowarchive` (main-thread stretches, buffered bytes, archived and
//! failed flows), and the per-flow log lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::kinds::Tally;
use crate::ops::errors::{show_id, FlowError};
use crate::ops::info::named;

pub static FLOWS_ARCHIVED: AtomicU64 = AtomicU64::new(0);
pub static BYTES_RAW: AtomicU64 = AtomicU64::new(0);
pub static BYTES_STORED: AtomicU64 = AtomicU64::new(0);
pub static UPLOADS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
/// Longest single stretch the module held the main thread (capture chunk or commit), microseconds.
pub static MAIN_THREAD_MAX_US: AtomicU64 = AtomicU64::new(0);
/// The same stretch in the main thread's own CPU time. The wall-clock figure above also counts time the
/// thread waited to be scheduled on a busy host; this one is what the module's work itself took.
pub static MAIN_THREAD_MAX_CPU_US: AtomicU64 = AtomicU64::new(0);
/// Steps handed to the event loop by worker threads (each a wake-up of the loop and of the worker).
pub static MAIN_THREAD_STEPS: AtomicU64 = AtomicU64::new(0);
/// The longest turn of steps the event loop ran back to back, without serving its clients between
/// (`runtime::mainthread`), in microseconds.
pub static MAIN_THREAD_MAX_TURN_US: AtomicU64 = AtomicU64::new(0);

/// Failed archives by kind.
static FAILURES: Tally = Tally::new();

/// What a stretch on the main thread was spent on.
#[derive(Clone, Copy)]
pub enum Stage {
    /// Finding candidates (and DRYRUN's eligibility checks).
    Select = 0,
    /// Reading a flow: its checks and the chunks of its event log.
    Capture = 1,
    /// Proving a flow unchanged, indexing and deleting it.
    Commit = 2,
}

static STAGE_MAX_US: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Runs `f` (a stretch on the main thread), records its length in the global and the
/// stage's maximum, and raises `held` (the maximum of one flow) to it.
pub fn timed<T>(stage: Stage, held: &mut u64, f: impl FnOnce() -> T) -> T {
    // The CPU interval lies inside the wall-clock one, so it never reads longer.
    let start = Instant::now();
    let cpu = thread_cpu_ns();
    let out = f();
    let cpu = thread_cpu_ns().saturating_sub(cpu);
    let us = start.elapsed().as_micros() as u64;
    MAIN_THREAD_MAX_CPU_US.fetch_max(cpu / 1_000, Ordering::Relaxed);
    MAIN_THREAD_MAX_US.fetch_max(us, Ordering::Relaxed);
    STAGE_MAX_US[stage as usize].fetch_max(us, Ordering::Relaxed);
    *held = (*held).max(us);
    out
}

/// The calling thread's CPU time in nanoseconds (0 if the clock is unavailable).
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    match unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } {
        0 => now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64,
        _ => 0,
    }
}

/// Folds of the engine's state (archives and live reads), and the worker CPU time they took.
static FOLDS: AtomicU64 = AtomicU64::new(0);
static FOLD_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// Runs `fold` (the engine's state of one flow, on a worker thread), counting it and its CPU time.
pub fn folding<T>(fold: impl FnOnce() -> T) -> T {
    let cpu = thread_cpu_ns();
    let out = fold();
    FOLD_CPU_NS.fetch_add(thread_cpu_ns().saturating_sub(cpu), Ordering::Relaxed);
    FOLDS.fetch_add(1, Ordering::Relaxed);
    out
}

/// Bytes the module holds for flows in flight (captured events and live reads' copies, encoded objects,
/// and the event logs kept for the commit to compare), bounded by `buffer-max-bytes`.
pub static BUFFERED_BYTES: AtomicU64 = AtomicU64::new(0);
pub static BUFFERED_BYTES_PEAK: AtomicU64 = AtomicU64::new(0);

/// Counts `bytes` as buffered until dropped.
#[derive(Debug)]
pub struct Buffered(u64);

impl Buffered {
    pub fn hold(bytes: u64) -> Self {
        let mut held = Buffered(0);
        held.grow(bytes);
        held
    }

    /// Counts `bytes` more.
    pub fn grow(&mut self, bytes: u64) {
        let now = BUFFERED_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
        BUFFERED_BYTES_PEAK.fetch_max(now, Ordering::Relaxed);
        self.0 += bytes;
    }

    /// The bytes this counts.
    pub fn bytes(&self) -> u64 {
        self.0
    }

    /// Counts nothing any more (what it counted was freed).
    pub fn release(&mut self) {
        BUFFERED_BYTES.fetch_sub(std::mem::take(&mut self.0), Ordering::Relaxed);
    }
}

/// The bytes the module holds for flows in flight now, over all of them.
pub fn buffered_now() -> u64 {
    BUFFERED_BYTES.load(Ordering::Relaxed)
}

impl Drop for Buffered {
    fn drop(&mut self) {
        BUFFERED_BYTES.fetch_sub(self.0, Ordering::Relaxed);
    }
}

pub fn archived(id: &str, location: &str, raw: u64, stored: u64) {
    FLOWS_ARCHIVED.fetch_add(1, Ordering::Relaxed);
    BYTES_RAW.fetch_add(raw, Ordering::Relaxed);
    BYTES_STORED.fetch_add(stored, Ordering::Relaxed);
    crate::ops::log::verbose(&format!(
        "flowarchive: archived flow {} to {location} ({raw} bytes raw, {stored} stored)",
        show_id(id)
    ));
}

pub fn failed(id: &str, err: &FlowError) {
    FAILURES.add(err.kind());
    // Expected refusals (not eligible, unknown flow) are not worth a warning.
    let line = format!("flowarchive: {} [{}]", err.message(id), err.kind());
    match err {
        FlowError::NotFound | FlowError::NotTerminal(_) | FlowError::TooRecent { .. } => {
            crate::ops::log::verbose(&line)
        }
        _ => crate::ops::log::warning(&line),
    }
}

#[linkme::distributed_slice(crate::ops::info::INFO_FIELDS)]
static ARCHIVE_FIELDS: crate::ops::info::Fields = fields;

/// The archive fields of INFO.
fn fields() -> Vec<(String, i64)> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as i64;
    let mut out = named([
        ("flows_archived", get(&FLOWS_ARCHIVED)),
        ("bytes_raw", get(&BYTES_RAW)),
        ("bytes_stored", get(&BYTES_STORED)),
        ("uploads_in_flight", get(&UPLOADS_IN_FLIGHT)),
        ("main_thread_max_us", get(&MAIN_THREAD_MAX_US)),
        ("main_thread_max_cpu_us", get(&MAIN_THREAD_MAX_CPU_US)),
        ("main_thread_steps", get(&MAIN_THREAD_STEPS)),
        ("main_thread_max_turn_us", get(&MAIN_THREAD_MAX_TURN_US)),
        (
            "main_thread_max_us_select",
            get(&STAGE_MAX_US[Stage::Select as usize]),
        ),
        (
            "main_thread_max_us_capture",
            get(&STAGE_MAX_US[Stage::Capture as usize]),
        ),
        (
            "main_thread_max_us_commit",
            get(&STAGE_MAX_US[Stage::Commit as usize]),
        ),
        ("buffered_bytes", get(&BUFFERED_BYTES)),
        ("buffered_bytes_peak", get(&BUFFERED_BYTES_PEAK)),
        ("folds", get(&FOLDS)),
        ("fold_cpu_us_total", get(&FOLD_CPU_NS) / 1_000),
    ]);
    out.extend(FAILURES.fields("failures_", FlowError::kind_names()));
    out
}
