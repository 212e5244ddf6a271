//! Command handlers: argument parsing and context checks; the work lives in capture/archive.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use redis_module::{
    BlockedClient, Context, ContextFlags, KeyType, NextArg, RedisError, RedisResult, RedisString,
    RedisValue, ThreadSafeContext,
};

use crate::acl::{self, Access, Caller};
use crate::archive::{self, map};
use crate::capture::{self, Start};
use crate::clock;
use crate::configs::Settings;
use crate::errors::{self, show_id, FlowError};
use crate::fetch::{self, Waiter};
use crate::live;
use crate::metrics;
use crate::pool::Pool;
use crate::server::selected_db;
use crate::store::Store;
use crate::sweep;

fn err(msg: impl Into<String>) -> RedisError {
    RedisError::String(msg.into())
}

/// Keeps a panic from crossing the FFI boundary: it becomes an error reply and a log line.
fn guarded(name: &str, f: impl FnOnce() -> RedisResult) -> RedisResult {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        crate::log::warning(&format!("flowarchive: {name} panicked"));
        Err(RedisError::Str(errors::PANIC))
    })
}

/// Parses `<flow_id> [FLAG]`: the id, and whether the optional flag was given.
fn id_and_flag(args: Vec<RedisString>, flag: &str) -> Result<(String, bool), RedisError> {
    if args.len() < 2 || args.len() > 3 {
        return Err(RedisError::WrongArity);
    }
    let mut args = args.into_iter().skip(1);
    let arg = args.next_arg()?;
    let id = arg.try_as_str().map_err(|_| err(errors::ID_NOT_UTF8))?;
    if id.is_empty() {
        return Err(err(errors::EMPTY_ID));
    }
    let set = match args.next() {
        None => false,
        Some(a) if a.to_string_lossy().eq_ignore_ascii_case(flag) => true,
        Some(_) => return Err(err(format!("ERR syntax error: expected {flag}"))),
    };
    Ok((id.to_string(), set))
}

/// Workers for FLOWARCHIVE.FLOW calls: each waits on S3 most of the time, so a few threads serve many
/// calls; calls beyond the queue get a busy error instead of a thread each.
pub static FLOW_POOL: Pool = Pool::new("flowarchive-flow", 8, 256);

/// FLOWARCHIVE.FLOW <flow_id> [FORCE]
pub fn flow(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("FLOWARCHIVE.FLOW", || flow_inner(ctx, args))
}

fn flow_inner(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let (id, force) = id_and_flag(args, "FORCE")?;
    let flags = ctx.get_flags();
    if flags.intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING) {
        return Err(err(errors::DENY_BLOCKING));
    }
    if flags.contains(ContextFlags::SLAVE) {
        return Err(err(errors::ON_REPLICA));
    }
    let settings = Settings::current();
    let store = Store::new(&settings.s3).map_err(|e| err(format!("ERR {e}")))?;
    let db = selected_db(ctx);
    let mut held = 0;
    let started = metrics::timed(metrics::Stage::Capture, &mut held, || {
        capture::start(
            ctx,
            &Caller::of(ctx),
            db,
            &id,
            &settings,
            force,
            clock::now_ms(),
        )
    });
    let capture = match started {
        Ok(Start::Capture(c)) => capture::Capture {
            held_us: held,
            ..*c
        },
        Ok(Start::AlreadyArchived(location)) => {
            return Ok(map([
                ("location", RedisValue::BulkString(location)),
                ("already_archived", RedisValue::Integer(1)),
            ]));
        }
        Err(e) => {
            metrics::failed(&id, &e);
            return Err(err(e.message(&id)));
        }
    };
    // The job is queued first and receives the blocked client: a client is never blocked without a
    // thread that will answer it.
    let (hand_over, client) = mpsc::channel::<ThreadSafeContext<BlockedClient>>();
    let job = Box::new(move || {
        let Ok(tsc) = client.recv() else { return };
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            archive::run(capture, &settings, &store)
        }))
        .unwrap_or_else(|_| Err(FlowError::Internal("archive worker panicked".into())));
        let reply = match outcome {
            Ok(done) => Ok(done.reply()),
            Err(e) => {
                metrics::failed(&id, &e);
                Err(err(e.message(&id)))
            }
        };
        tsc.reply(reply);
    });
    if FLOW_POOL.submit(job).is_err() {
        return Err(err(errors::FLOW_BUSY));
    }
    let _ = hand_over.send(ThreadSafeContext::with_blocked_client(ctx.block_client()));
    Ok(RedisValue::NoReply)
}

/// Cap on a live event log read by GET EVENTS (placeholder until read-max-bytes lands).
const LIVE_READ_MAX_BYTES: u64 = 256 << 20;

/// FLOWARCHIVE.GET <flow_id> [EVENTS]
pub fn get(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("FLOWARCHIVE.GET", || get_inner(ctx, args))
}

fn get_inner(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let (id, events) = id_and_flag(args, "EVENTS")?;
    let settings = Settings::current();
    let keys = settings.layout.flow_keys(&id);
    let caller = Caller::of(ctx);
    let fail = |e: FlowError| err(e.message(&id));
    acl::check(ctx, &caller, &keys.snapshot, Access::Read).map_err(fail)?;
    if let Some(snapshot) = capture::read_live(ctx, &keys).map_err(fail)? {
        metrics::GET_LIVE.fetch_add(1, Ordering::Relaxed);
        if !events {
            return Ok(RedisValue::StringBuffer(snapshot));
        }
        acl::check(ctx, &caller, &keys.events, Access::Read).map_err(fail)?;
        capture::expect_type(ctx, &keys.events, &KeyType::List).map_err(fail)?;
        let db = selected_db(ctx);
        return live::events(ctx, db, id, keys, snapshot, LIVE_READ_MAX_BYTES);
    }
    acl::check(ctx, &caller, &keys.index, Access::Read).map_err(fail)?;
    let Some(location) = capture::indexed_location(ctx, &keys, &id).map_err(fail)? else {
        metrics::GET_NOT_FOUND.fetch_add(1, Ordering::Relaxed);
        return Ok(RedisValue::Null);
    };
    let key = (selected_db(ctx), id, location);
    if let Some(flow) = fetch::cached(&key) {
        metrics::GET_CACHE_HITS.fetch_add(1, Ordering::Relaxed);
        return Ok(fetch::reply(&flow, events));
    }
    if ctx
        .get_flags()
        .intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING)
    {
        return Err(err(format!(
            "ERR flow {} is archived and not cached; FLOWARCHIVE.GET cannot fetch it inside MULTI or a script",
            show_id(&key.1)
        )));
    }
    let waiter = Waiter {
        client: ThreadSafeContext::with_blocked_client(ctx.block_client()),
        events,
    };
    fetch::request(key, waiter, settings);
    Ok(RedisValue::NoReply)
}

/// FLOWARCHIVE.SWEEP [LIMIT n] [DRYRUN] [ASYNC]
pub fn sweep(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("FLOWARCHIVE.SWEEP", || sweep_inner(ctx, args))
}

fn sweep_inner(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    let mut opts = sweep::Options {
        limit: None,
        dry_run: false,
        caller: Caller::of(ctx),
    };
    let mut asynchronous = false;
    let mut args = args.into_iter().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_string_lossy().to_ascii_uppercase().as_str() {
            "LIMIT" => {
                let n = args
                    .next_u64()
                    .map_err(|_| err("ERR LIMIT needs a positive integer"))?;
                if n == 0 {
                    return Err(err("ERR LIMIT needs a positive integer"));
                }
                opts.limit = Some(n as usize);
            }
            "DRYRUN" => opts.dry_run = true,
            "ASYNC" => asynchronous = true,
            _ => return Err(err("ERR syntax error: expected LIMIT n, DRYRUN or ASYNC")),
        }
    }
    let flags = ctx.get_flags();
    if flags.intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING) {
        return Err(err(errors::SWEEP_DENY_BLOCKING));
    }
    if flags.contains(ContextFlags::SLAVE) {
        return Err(err(errors::SWEEP_ON_REPLICA));
    }
    let db = selected_db(ctx);
    if asynchronous {
        sweep::start(ctx, db, opts, || None)?;
        return Ok(RedisValue::SimpleStringStatic("STARTED"));
    }
    sweep::start(ctx, db, opts, || {
        Some(ThreadSafeContext::with_blocked_client(ctx.block_client()))
    })?;
    Ok(RedisValue::NoReply)
}
