//! Thin helpers over the module API: DB selection, in-server command calls and key types.

use crate::ops::configs;
use crate::ops::errors::{holds, FlowError, ServerError};

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::os::raw::{c_int, c_long, c_void};

use redis_module::{
    raw, CallOptionsBuilder, CallReply, CallResult, Context, KeyType, RedisString, ScanKeyCursor,
};

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
    value_len(ctx, key, KeyType::List)
}

/// The number of fields of the hash at `key` (0 when absent; as `HLEN`).
pub fn hash_len(ctx: &Context, key: &str) -> Result<usize, ServerError> {
    value_len(ctx, key, KeyType::Hash)
}

/// The length of the value of type `expected` at `key`, 0 when absent, `WRONGTYPE` for another type.
fn value_len(ctx: &Context, key: &str, expected: KeyType) -> Result<usize, ServerError> {
    let (opened, present) = open_typed(ctx, key.as_bytes(), expected)?;
    if !present {
        return Ok(0);
    }
    // SAFETY: `opened.0` is a key this context opened, holding a value.
    Ok(unsafe { raw::RedisModule_ValueLength.map_or(0, |f| f(opened.0)) })
}

/// Opens `key` for reading: its handle and whether it holds a value, which must be of type
/// `expected` (else the server's `WRONGTYPE` error, as a command on it would answer).
fn open_typed(
    ctx: &Context,
    key: &[u8],
    expected: KeyType,
) -> Result<(ReadKey, bool), ServerError> {
    let name = string(ctx, key);
    let opened = ReadKey(raw::open_key(ctx.ctx, name.inner, raw::KeyMode::READ));
    // SAFETY: `opened.0` is a key this context opened (NULL for a missing key, which KeyType accepts).
    match KeyType::from(unsafe { raw::RedisModule_KeyType.map_or(0, |t| t(opened.0)) }) {
        KeyType::Empty => Ok((opened, false)),
        t if t == expected => Ok((opened, true)),
        _ => Err(ServerError::WrongType),
    }
}

/// The value of `field` in the hash at `key` (as `HGET`, read where the server holds it: no reply is
/// built for it).
pub fn hash_get(ctx: &Context, key: &str, field: &[u8]) -> Result<Option<Vec<u8>>, ServerError> {
    let (opened, present) = open_typed(ctx, key.as_bytes(), KeyType::Hash)?;
    if !present {
        return Ok(None);
    }
    let field = string(ctx, field);
    let mut value: *mut raw::RedisModuleString = std::ptr::null_mut();
    // SAFETY: a hash key opened for reading; one field (a server string) with its out-pointer, then
    // the NULL that ends the list. A value found is a new string this code owns.
    let rc = unsafe {
        let get = raw::RedisModule_HashGet.ok_or(ServerError::NoApi("RedisModule_HashGet"))?;
        get(
            opened.0,
            raw::REDISMODULE_HASH_NONE as c_int,
            field.inner,
            std::ptr::addr_of_mut!(value),
            std::ptr::null_mut::<c_void>(),
        )
    };
    if rc != raw::REDISMODULE_OK as c_int || value.is_null() {
        return Ok(None);
    }
    let value = RedisString::from_redis_module_string(ctx.ctx, value);
    Ok(Some(value.as_slice().to_vec()))
}

/// The score of `member` in the sorted set at `key` (as `ZSCORE`, without formatting it).
pub fn zset_score(ctx: &Context, key: &str, member: &[u8]) -> Result<Option<f64>, ServerError> {
    let (opened, present) = open_typed(ctx, key.as_bytes(), KeyType::ZSet)?;
    if !present {
        return Ok(None);
    }
    let member = string(ctx, member);
    let mut score = 0f64;
    // SAFETY: a sorted-set key opened for reading; the member a server string; `score` is written
    // only when the member is found.
    let rc = unsafe {
        raw::RedisModule_ZsetScore.map_or(raw::REDISMODULE_ERR as c_int, |f| {
            f(opened.0, member.inner, std::ptr::addr_of_mut!(score))
        })
    };
    Ok((rc == raw::REDISMODULE_OK as c_int).then_some(score))
}

/// Whether `key` exists with a TTL (as `PTTL` answering 0 or more).
pub fn has_ttl(ctx: &Context, key: &str) -> bool {
    let name = string(ctx, key.as_bytes());
    let opened = ReadKey(raw::open_key(ctx.ctx, name.inner, raw::KeyMode::READ));
    if opened.0.is_null() {
        return false;
    }
    // SAFETY: a key this context opened, holding a value.
    let ttl = unsafe {
        raw::RedisModule_GetExpire.map_or(raw::REDISMODULE_NO_EXPIRE as i64, |f| f(opened.0))
    };
    ttl != raw::REDISMODULE_NO_EXPIRE as i64
}

/// Hands the elements `from..to` of the list at `key` to `f` one at a time (fewer if the list is
/// shorter), until `f` breaks. Each element is copied alone (`RM_ListGet`, sequential in O(1) per
/// element like `LRANGE`), never a whole range at once: an `LRANGE` reply holds every element of the
/// range before the first is looked at, so a caller refusing at a byte cap would have the server build
/// the whole range (1024 elements of up to 512 MB) in memory first.
pub fn list_range_each(
    ctx: &Context,
    key: &str,
    from: usize,
    to: usize,
    mut f: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<(), ServerError> {
    if from >= to {
        return Ok(());
    }
    let (list, present) = open_typed(ctx, key.as_bytes(), KeyType::List)?;
    if !present {
        return Ok(());
    }
    // SAFETY: reading a function pointer the module API filled in at load, before any command ran,
    // and never writes again: no write races this read.
    let Some(list_get) = (unsafe { raw::RedisModule_ListGet }) else {
        return Err(ServerError::NoApi("RedisModule_ListGet"));
    };
    for index in from..to {
        let Ok(index) = c_long::try_from(index) else {
            break;
        };
        // SAFETY: `list.0` is a list key opened for reading, open until `list` drops; the element
        // returned is a new string this code owns (freed by `RedisString`'s drop), NULL past the end.
        let element = unsafe { list_get(list.0, index) };
        if element.is_null() {
            break;
        }
        let element = RedisString::from_redis_module_string(ctx.ctx, element);
        if f(element.as_slice()).is_break() {
            break;
        }
    }
    Ok(())
}

/// Every (field, value) of the hash at `key`, read where the server holds it (`RM_ScanKey`: no reply
/// is built for it, as `HGETALL` through `RM_Call` would), each field once, in field order. Empty for a
/// missing key or one of another type; `None` once the fields and values read pass `budget` bytes (the
/// scan stops there, so a hash far larger than the budget is never read whole).
pub fn hash_pairs(ctx: &Context, key: &str, budget: u64) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut pairs = BTreeMap::new();
    let mut bytes = 0u64;
    let cursor = ScanKeyCursor::new(ctx.open_key(&string(ctx, key.as_bytes())));
    let mut more = true;
    while more && bytes <= budget {
        more = cursor.scan(|_, field, value| {
            let (field, value) = (field.as_slice(), value.as_slice());
            bytes += (field.len() + value.len()) as u64;
            if bytes <= budget {
                // A scan may return a field twice (a table resized between its calls): the first counts.
                pairs
                    .entry(field.to_vec())
                    .or_insert_with(|| value.to_vec());
            }
        });
    }
    (bytes <= budget).then(|| pairs.into_iter().collect())
}

/// A key opened for reading through the raw module API, closed when dropped (`RedisKey::to_raw_parts`
/// of redis-module 2.0.8 closes the key it hands out, so the raw handle is kept here instead).
struct ReadKey(*mut raw::RedisModuleKey);

impl Drop for ReadKey {
    fn drop(&mut self) {
        if !self.0.is_null() {
            raw::close_key(self.0);
        }
    }
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

/// Whether `key` holds a value: `false` when empty, an error naming the key when it holds another type.
pub fn expect_type(ctx: &Context, key: &str, expected: &KeyType) -> Result<bool, FlowError> {
    holds(key, &type_of(ctx, key), expected)
}

/// The type of `key` (`Empty` where there is none), and what `value_of` reads of it where it holds
/// `expected`.
pub fn read_typed<T>(
    ctx: &Context,
    key: Option<&str>,
    expected: KeyType,
    value_of: impl FnOnce(&str) -> Option<T>,
) -> (KeyType, Option<T>) {
    let Some(key) = key else {
        return (KeyType::Empty, None);
    };
    let kind = type_of(ctx, key);
    let value = if kind == expected {
        value_of(key)
    } else {
        None
    };
    (kind, value)
}

/// A string value's bytes, if the key holds a string.
pub fn read_string(ctx: &Context, key: &str) -> Option<Vec<u8>> {
    with_string(ctx, key, |v| v.map(<[u8]>::to_vec))
}

/// Hands a string value's bytes (if the key holds a string) to `f` where the server holds them.
pub fn with_string<T>(ctx: &Context, key: &str, f: impl FnOnce(Option<&[u8]>) -> T) -> T {
    let k = ctx.open_key(&string(ctx, key.as_bytes()));
    f(k.read().ok().flatten())
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
