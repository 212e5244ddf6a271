//! Server log lines.
//!
//! `RedisModule_Log` formats its third argument printf-style. The usual wrappers pass the message as
//! that format, so a flow id holding `%s` would make the server read arguments that are not there, and
//! a NUL byte would abort the message. Every line here goes out as the argument of a fixed `"%s"`, with
//! NUL bytes shown as `\0`, and is bounded like every error text.

use std::ffi::{c_char, CStr, CString};

use redis_module::raw;

use crate::ops::errors::bounded;

#[derive(Clone, Copy)]
pub enum Level {
    Verbose,
    Notice,
    Warning,
}

impl Level {
    fn name(self) -> &'static CStr {
        match self {
            Level::Verbose => c"verbose",
            Level::Notice => c"notice",
            Level::Warning => c"warning",
        }
    }
}

/// Logs `msg` at `level` from any thread.
pub fn log(level: Level, msg: &str) {
    let text = CString::new(bounded(msg.replace('\0', "\\0"))).unwrap_or_default();
    // SAFETY: NULL context is allowed (any thread); the level is a static C string, and the format
    // consumes exactly one C string, `text`, which outlives the call.
    unsafe {
        if let Some(log) = raw::RedisModule_Log {
            log(
                std::ptr::null_mut(),
                level.name().as_ptr(),
                c"%s".as_ptr(),
                text.as_ptr() as *const c_char,
            );
        }
    }
}

pub fn warning(msg: &str) {
    log(Level::Warning, msg)
}

pub fn notice(msg: &str) {
    log(Level::Notice, msg)
}

pub fn verbose(msg: &str) {
    log(Level::Verbose, msg)
}

/// Runs `f`, containing a panic: it is logged as `what` and becomes `None`, so it never crosses the FFI
/// boundary or leaves a client unanswered.
pub fn contained<T>(what: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            warning(&format!("flowarchive: {what} panicked"));
            None
        }
    }
}
