//! Thin helpers over the module API: DB selection, in-server command calls and key types.

use crate::ops::configs;
use crate::ops::errors::{FlowError, ServerError};
use crate::runtime::key::Key;

use std::cell::RefCell;
use std::ops::ControlFlow;

use redis_module::{raw, CallOptionsBuilder, CallReply, CallResult, Context, KeyType, RedisString};

/// The DB the calling client has selected.
pub fn selected_db(ctx: &Context) -> i32 {
    // SAFETY: ctx is the live context of the current command or lock.
    unsafe { raw::RedisModule_GetSelectedDb.map_or(0, |f| f(ctx.ctx)) }
}

/// A main-thread step's context starts in DB 0: move it to the job's DB.
pub fn select_db(ctx: &Context, db: i32) -> Result<(), ServerError> {
    // SAFETY: ctx is a live main-thread context.
    let ok = unsafe { raw::RedisModule_SelectDb.map(|f| f(ctx.ctx, db)) };
    match ok {
        Some(rc) if rc == raw::REDISMODULE_OK as i32 => Ok(()),
        _ => Err(ServerError::NoDb(db)),
    }
}

/// Runs a command inside the server, without replication. An error reply is `Refused` with its text.
pub fn call(ctx: &Context, cmd: &str, args: &[&[u8]]) -> Result<CallReply<'static>, ServerError> {
    call_with(ctx, cmd, args, CallOptionsBuilder::new())
}

/// Runs a write inside the server and propagates it to replicas and the AOF (`!`).
pub fn call_replicated(
    ctx: &Context,
    cmd: &str,
    args: &[&[u8]],
) -> Result<CallReply<'static>, ServerError> {
    call_with(ctx, cmd, args, CallOptionsBuilder::new().replicate())
}

fn call_with(
    ctx: &Context,
    cmd: &str,
    args: &[&[u8]],
    opts: CallOptionsBuilder,
) -> Result<CallReply<'static>, ServerError> {
    // Errors as replies: a call the server refuses before running it (e.g. a key another cluster node
    // serves) is then an error here, never an empty success.
    let res: CallResult<'static> = ctx.call_ext(cmd, &opts.errors_as_replies().build(), args);
    res.map_err(|e| {
        ServerError::Refused(
            e.to_utf8_string()
                .unwrap_or_else(|| format!("{cmd} failed")),
        )
    })
}

/// The length of the list at `key` (0 when absent), read where the server holds it (as `LLEN`: an
/// error for a key of another type).
pub fn list_len(ctx: &Context, key: &str) -> Result<usize, ServerError> {
    Key::open(ctx, key).len(KeyType::List)
}

/// The value of `field` in the hash at `key` (`Key::hash_get`).
pub fn hash_get(ctx: &Context, key: &str, field: &[u8]) -> Result<Option<Vec<u8>>, ServerError> {
    Key::open(ctx, key).hash_get(field)
}

/// The score of `member` in the sorted set at `key` (`Key::zset_score`).
pub fn zset_score(ctx: &Context, key: &str, member: &[u8]) -> Result<Option<f64>, ServerError> {
    Key::open(ctx, key).zset_score(member)
}

/// Whether `key` exists with a TTL (`Key::has_ttl`).
pub fn has_ttl(ctx: &Context, key: &str) -> bool {
    Key::open(ctx, key).has_ttl()
}

/// The elements `from..to` of the list at `key`, one at a time (`Key::list_each`).
pub fn list_range_each(
    ctx: &Context,
    key: &str,
    from: usize,
    to: usize,
    f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<(), ServerError> {
    if from >= to {
        return Ok(());
    }
    Key::open(ctx, key).list_each(from, to, f)
}

/// Every (field, value) of the hash at `key` up to `budget` bytes (`Key::hash_pairs`).
pub fn hash_pairs(ctx: &Context, key: &str, budget: u64) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    Key::open(ctx, key).hash_pairs(budget)
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
    Key::open(ctx, key).kind()
}

/// Whether `key` holds a value: `false` when empty, an error naming the key when it holds another type.
pub fn expect_type(ctx: &Context, key: &str, expected: &KeyType) -> Result<bool, FlowError> {
    Key::open(ctx, key).holds(expected)
}

/// The type of `key` (`Empty` where there is none), and what `value_of` reads of it where it holds
/// `expected`, from the one opening.
pub fn read_typed<T>(
    ctx: &Context,
    key: Option<&str>,
    expected: KeyType,
    value_of: impl FnOnce(&Key) -> Option<T>,
) -> (KeyType, Option<T>) {
    match key {
        Some(key) => Key::open(ctx, key).read_as(expected, value_of),
        None => (KeyType::Empty, None),
    }
}

/// A string value's bytes, if the key holds a string.
pub fn read_string(ctx: &Context, key: &str) -> Option<Vec<u8>> {
    with_string(ctx, key, |v| v.map(<[u8]>::to_vec))
}

/// Hands a string value's bytes (if the key holds a string) to `f` where the server holds them.
pub fn with_string<T>(ctx: &Context, key: &str, f: impl FnOnce(Option<&[u8]>) -> T) -> T {
    f(Key::open(ctx, key).string())
}

/// Refuses while the server could drop an archive index key: an eviction policy that takes keys
/// without a TTL (`allkeys-*`, whatever `maxmemory` is now: it can be raised at any time), or a TTL on
/// one of `index_keys`. Either would lose the entries, and every flow they name would read as never
/// archived.
pub fn index_kept<'k>(
    ctx: &Context,
    index_keys: impl IntoIterator<Item = &'k str>,
) -> Result<(), FlowError> {
    if let Some(why) = eviction_risk(ctx) {
        return Err(FlowError::Unsafe(why));
    }
    for key in index_keys {
        if has_ttl(ctx, key) {
            return Err(FlowError::Unsafe(format!(
                "the archive index key {} has a TTL and would expire, and every flow it names with it; PERSIST it",
                crate::ops::errors::show_key(key)
            )));
        }
    }
    Ok(())
}

thread_local! {
    /// The last verdict of `eviction_risk` (the main thread's, in practice), with the config
    /// generation it was read at.
    static EVICTION_RISK: RefCell<Option<(u64, Option<String>)>> = const { RefCell::new(None) };
}

/// Why the eviction policy may take the archive index (it evicts keys without a TTL), if it may. Read
/// again after every CONFIG SET (`configs::followed_generation`), else at every call.
pub fn eviction_risk(ctx: &Context) -> Option<String> {
    let generation = configs::followed_generation();
    let cached = EVICTION_RISK.with(|cell| match (cell.borrow().as_ref(), generation) {
        (Some((seen, risk)), Some(now)) if *seen == now => Some(risk.clone()),
        _ => None,
    });
    if let Some(risk) = cached {
        return risk;
    }
    let risk = policy_risk(ctx);
    if let Some(now) = generation {
        EVICTION_RISK.with(|cell| *cell.borrow_mut() = Some((now, risk.clone())));
    }
    risk
}

/// `eviction_risk`, asking the server.
fn policy_risk(ctx: &Context) -> Option<String> {
    let reply = call(ctx, "CONFIG", &[b"GET", b"maxmemory-policy"]).ok()?;
    let policy = String::from_utf8(strings(&reply).into_iter().nth(1)?).ok()?;
    policy.starts_with("allkeys-").then(|| format!(
        "maxmemory-policy {policy} may evict the archive index, and every archived flow it names with it; use noeviction or a volatile-* policy"
    ))
}

/// Whether the server is near its memory limit (`maxmemory` set, at least 90 % used). The module's
/// own memory is outside the server's accounting, but shares the machine: its read cache is what
/// yields first.
pub fn memory_pressed() -> bool {
    // SAFETY: a plain read of the server's memory state, no context needed; called on the main thread.
    let used = unsafe { raw::RedisModule_GetUsedMemoryRatio.map_or(0.0, |f| f()) };
    used >= 0.9
}
