//! Counters behind `INFO flowarchive`, and the per-flow log lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use redis_module::{InfoContext, RedisResult};

use crate::errors::{show_id, FlowError};

pub static FLOWS_ARCHIVED: AtomicU64 = AtomicU64::new(0);
pub static BYTES_RAW: AtomicU64 = AtomicU64::new(0);
pub static BYTES_STORED: AtomicU64 = AtomicU64::new(0);
pub static UPLOADS_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
/// Longest single stretch the module held the main thread (capture chunk or commit), microseconds.
pub static MAIN_THREAD_MAX_US: AtomicU64 = AtomicU64::new(0);

const FAILURE_KINDS: [&str; 15] = [
    "not_found",
    "not_terminal",
    "too_recent",
    "wrong_type",
    "unreadable",
    "conflict",
    "busy",
    "changed",
    "s3_config",
    "s3_unreachable",
    "s3_timeout",
    "s3_rejected",
    "s3_server_error",
    "s3_verify",
    "internal",
];
static FAILURES: [AtomicU64; 15] = [const { AtomicU64::new(0) }; 15];

/// Times a stretch on the main thread; records it when dropped.
pub struct MainThreadTimer(Instant);

impl MainThreadTimer {
    pub fn start() -> Self {
        MainThreadTimer(Instant::now())
    }
}

impl Drop for MainThreadTimer {
    fn drop(&mut self) {
        let us = self.0.elapsed().as_micros() as u64;
        MAIN_THREAD_MAX_US.fetch_max(us, Ordering::Relaxed);
    }
}

pub fn archived(id: &str, location: &str, raw: u64, stored: u64) {
    FLOWS_ARCHIVED.fetch_add(1, Ordering::Relaxed);
    BYTES_RAW.fetch_add(raw, Ordering::Relaxed);
    BYTES_STORED.fetch_add(stored, Ordering::Relaxed);
    redis_module::logging::log_verbose(format!(
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
            redis_module::logging::log_verbose(line)
        }
        _ => redis_module::logging::log_warning(line),
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
        .field("main_thread_max_us", get(&MAIN_THREAD_MAX_US))?;
    for (kind, count) in FAILURE_KINDS.iter().zip(FAILURES.iter()) {
        section = section.field(&format!("failures_{kind}"), get(count))?;
    }
    section.build_section()?.build_info()?;
    Ok(())
}
