//! Counters behind `INFO flowarchive`, and the per-flow log lines.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis_module::{InfoContext, RedisResult};

use crate::errors::{show_id, FlowError};

pub static FLOWS_ARCHIVED: AtomicU64 = AtomicU64::new(0);
pub static BYTES_RAW: AtomicU64 = AtomicU64::new(0);
pub static BYTES_STORED: AtomicU64 = AtomicU64::new(0);
pub static UPLOADS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
/// Longest single stretch the module held the main thread (capture chunk or commit), microseconds.
pub static MAIN_THREAD_MAX_US: AtomicU64 = AtomicU64::new(0);

pub static GET_LIVE: AtomicU64 = AtomicU64::new(0);
pub static GET_CACHE_HITS: AtomicU64 = AtomicU64::new(0);
pub static GET_NOT_FOUND: AtomicU64 = AtomicU64::new(0);
static GET_FETCHES: AtomicU64 = AtomicU64::new(0);
static GET_FETCH_US_TOTAL: AtomicU64 = AtomicU64::new(0);
static GET_FETCH_US_MAX: AtomicU64 = AtomicU64::new(0);
static GET_FETCH_ERRORS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// One S3 fetch of FLOWARCHIVE.GET finished, in `took`, failing with `error` if any.
pub fn fetched(took: Duration, error: Option<&'static str>) {
    let us = took.as_micros() as u64;
    GET_FETCHES.fetch_add(1, Ordering::Relaxed);
    GET_FETCH_US_TOTAL.fetch_add(us, Ordering::Relaxed);
    GET_FETCH_US_MAX.fetch_max(us, Ordering::Relaxed);
    if let Some(kind) = error {
        *GET_FETCH_ERRORS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
        crate::log::warning(&format!("flowarchive: GET fetch failed [{kind}]"));
    }
}

const FAILURE_KINDS: [&str; 20] = [
    "not_found",
    "not_terminal",
    "too_recent",
    "wrong_type",
    "unreadable",
    "conflict",
    "busy",
    "changed",
    "noperm",
    "not_writable",
    "cluster",
    "s3_config",
    "s3_unreachable",
    "s3_timeout",
    "s3_rejected",
    "s3_server_error",
    "s3_verify",
    "s3_exists",
    "s3_too_large",
    "internal",
];
static FAILURES: [AtomicU64; 20] = [const { AtomicU64::new(0) }; 20];

/// Every way an archived read can fail, listed in INFO even at zero so dashboards see them.
const FETCH_ERROR_KINDS: [&str; 17] = [
    "s3_config",
    "s3_unreachable",
    "s3_timeout",
    "s3_rejected",
    "s3_server_error",
    "s3_missing",
    "s3_truncated",
    "s3_too_large",
    "checksum",
    "corrupt",
    "other_flow",
    "other_keyspace",
    "unknown_version",
    "too_large",
    "bad_location",
    "busy",
    "internal",
];

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
    let start = Instant::now();
    let out = f();
    let us = start.elapsed().as_micros() as u64;
    MAIN_THREAD_MAX_US.fetch_max(us, Ordering::Relaxed);
    STAGE_MAX_US[stage as usize].fetch_max(us, Ordering::Relaxed);
    *held = (*held).max(us);
    out
}

/// Bytes the module holds for flows in flight (captured events and encoded objects).
pub static BUFFERED_BYTES: AtomicU64 = AtomicU64::new(0);
pub static BUFFERED_BYTES_PEAK: AtomicU64 = AtomicU64::new(0);

/// Counts `bytes` as buffered until dropped.
pub struct Buffered(u64);

impl Buffered {
    pub fn hold(bytes: u64) -> Self {
        let now = BUFFERED_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes;
        BUFFERED_BYTES_PEAK.fetch_max(now, Ordering::Relaxed);
        Buffered(bytes)
    }
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
    crate::log::verbose(&format!(
        "flowarchive: archived flow {} to {location} ({raw} bytes raw, {stored} stored)",
        show_id(id)
    ));
}

pub fn failed(id: &str, err: &FlowError) {
    if let Some(i) = FAILURE_KINDS.iter().position(|k| *k == err.kind()) {
        FAILURES[i].fetch_add(1, Ordering::Relaxed);
    }
    // Expected refusals (not eligible, unknown flow) are not worth a warning.
    let line = format!("flowarchive: {} [{}]", err.message(id), err.kind());
    match err {
        FlowError::NotFound | FlowError::NotTerminal(_) | FlowError::TooRecent { .. } => {
            crate::log::verbose(&line)
        }
        _ => crate::log::warning(&line),
    }
}

#[redis_module_macros::info_command_handler]
pub fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as i64;
    let mut section = ctx
        .builder()
        .add_section("stats")
        .field("flows_archived", get(&FLOWS_ARCHIVED))?
        .field("bytes_raw", get(&BYTES_RAW))?
        .field("bytes_stored", get(&BYTES_STORED))?
        .field("uploads_in_flight", get(&UPLOADS_IN_FLIGHT))?
        .field("main_thread_max_us", get(&MAIN_THREAD_MAX_US))?
        .field("main_thread_max_us_select", get(&STAGE_MAX_US[0]))?
        .field("main_thread_max_us_capture", get(&STAGE_MAX_US[1]))?
        .field("main_thread_max_us_commit", get(&STAGE_MAX_US[2]))?
        .field("buffered_bytes", get(&BUFFERED_BYTES))?
        .field("buffered_bytes_peak", get(&BUFFERED_BYTES_PEAK))?;
    for (kind, count) in FAILURE_KINDS.iter().zip(FAILURES.iter()) {
        section = section.field(&format!("failures_{kind}"), get(count))?;
    }
    let (cached_flows, cached_bytes) = crate::fetch::cache_stats();
    section = section
        .field("get_live", get(&GET_LIVE))?
        .field("get_not_found", get(&GET_NOT_FOUND))?
        .field("get_cache_hits", get(&GET_CACHE_HITS))?
        .field("get_archive_fetches", get(&GET_FETCHES))?
        .field("get_fetch_us_total", get(&GET_FETCH_US_TOTAL))?
        .field("get_fetch_us_max", get(&GET_FETCH_US_MAX))?
        .field("get_cache_flows", cached_flows as i64)?
        .field("get_cache_bytes", cached_bytes as i64)?;
    section = section
        .field("sweeps_run", get(&crate::sweep::SWEEPS_RUN))?
        .field("sweep_running", crate::sweep::running() as i64)?;
    let current = crate::sweep::CURRENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let last = crate::sweep::LAST
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (name, progress) in [("sweep_current", current), ("last_sweep", last)] {
        let p = progress.unwrap_or_default();
        let failed = p.failed_by_kind();
        section = section
            .field(&format!("{name}_candidates"), get(&p.candidates))?
            .field(&format!("{name}_archived"), get(&p.archived))?
            .field(&format!("{name}_skipped_changed"), get(&p.skipped_changed))?
            .field(
                &format!("{name}_skipped_ineligible"),
                get(&p.skipped_ineligible),
            )?
            .field(&format!("{name}_skipped_noperm"), get(&p.skipped_noperm))?
            .field(
                &format!("{name}_failed"),
                failed.values().sum::<u64>() as i64,
            )?
            .field(&format!("{name}_in_flight"), get(&p.in_flight))?
            .field(&format!("{name}_raw_bytes"), get(&p.raw_bytes))?
            .field(&format!("{name}_stored_bytes"), get(&p.stored_bytes))?
            .field(&format!("{name}_duration_ms"), get(&p.duration_ms))?
            .field(
                &format!("{name}_main_thread_max_us"),
                get(&p.main_thread_max_us),
            )?
            .field(&format!("{name}_dry_run"), p.dry_run as i64)?;
    }
    let errors = GET_FETCH_ERRORS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for kind in FETCH_ERROR_KINDS {
        let n = errors.get(kind).copied().unwrap_or(0);
        section = section.field(&format!("get_fetch_errors_{kind}"), n as i64)?;
    }
    section.build_section()?.build_info()?;
    Ok(())
}
