//! Thin helpers over the module API: DB selection, in-server command calls and key types.

use redis_module::{raw, CallOptionsBuilder, CallReply, CallResult, Context, KeyType, RedisString};

/// The DB the calling client has selected.
pub fn selected_db(ctx: &Context) -> i32 {
    // SAFETY: ctx is the live context of the current command or lock.
    unsafe { raw::RedisModule_GetSelectedDb.map_or(0, |f| f(ctx.ctx)) }
}

/// A main-thread step's context starts in DB 0: move it to the job's DB.
pub fn select_db(ctx: &Context, db: i32) -> Result<(), String> {
    // SAFETY: ctx is a live main-thread context.
    let ok = unsafe { raw::RedisModule_SelectDb.map(|f| f(ctx.ctx, db)) };
    match ok {
        Some(rc) if rc == raw::REDISMODULE_OK as i32 => Ok(()),
        _ => Err(format!("cannot select DB {db}")),
    }
}

/// Runs a command inside the server, without replication. Errors become their text.
pub fn call(ctx: &Context, cmd: &str, args: &[&[u8]]) -> Result<CallReply<'static>, String> {
    let opts = CallOptionsBuilder::new().build();
    let res: CallResult<'static> = ctx.call_ext(cmd, &opts, args);
    res.map_err(|e| {
        e.to_utf8_string()
            .unwrap_or_else(|| format!("{cmd} failed"))
    })
}

/// Runs a write inside the server and propagates it to replicas and the AOF (`!`).
pub fn call_replicated(
    ctx: &Context,
    cmd: &str,
    args: &[&[u8]],
) -> Result<CallReply<'static>, String> {
    let opts = CallOptionsBuilder::new().replicate().build();
    let res: CallResult<'static> = ctx.call_ext(cmd, &opts, args);
    res.map_err(|e| {
        e.to_utf8_string()
            .unwrap_or_else(|| format!("{cmd} failed"))
    })
}

/// A bulk-string reply's bytes, `None` for nil.
pub fn bytes(reply: &CallReply) -> Option<Vec<u8>> {
    match reply {
        CallReply::String(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// The byte strings of an array reply (nil and non-string elements skipped); empty for other replies.
pub fn strings(reply: &CallReply) -> Vec<Vec<u8>> {
    match reply {
        CallReply::Array(a) => a
            .iter()
            .filter_map(|r| r.ok().as_ref().and_then(bytes))
            .collect(),
        _ => Vec::new(),
    }
}

pub fn integer(reply: &CallReply) -> Option<i64> {
    match reply {
        CallReply::I64(i) => Some(i.to_i64()),
        _ => None,
    }
}

/// A server string of any bytes (`Context::create_string` panics on a NUL byte, which ids may hold).
pub fn string(ctx: &Context, bytes: &[u8]) -> RedisString {
    RedisString::create_from_slice(ctx.ctx, bytes)
}

pub fn type_of(ctx: &Context, key: &str) -> KeyType {
    ctx.open_key(&string(ctx, key.as_bytes())).key_type()
}

pub fn type_name(t: &KeyType) -> &'static str {
    match t {
        KeyType::Empty => "nothing",
        KeyType::String => "string",
        KeyType::List => "list",
        KeyType::Hash => "hash",
        KeyType::Set => "set",
        KeyType::ZSet => "sorted set",
        KeyType::Module => "module value",
        KeyType::Stream => "stream",
    }
}
