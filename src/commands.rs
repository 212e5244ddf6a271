//! Command handlers: each parses its arguments and calls one function. A panic never crosses into the
//! server: it becomes an error reply and a log line.

use redis_module::{Context, NextArg, RedisError, RedisResult, RedisString};

use crate::archive;
use crate::ops::errors;
use crate::ops::log;
use crate::read;
use crate::runtime::acl;
use crate::sweep;

fn err(msg: impl Into<String>) -> RedisError {
    RedisError::String(msg.into())
}

fn guarded(name: &str, f: impl FnOnce() -> RedisResult) -> RedisResult {
    errors::ascii_errors(log::contained(name, f).unwrap_or(Err(RedisError::Str(errors::PANIC))))
}

/// The flow id argument: UTF-8, not empty.
fn flow_id(arg: RedisString) -> Result<String, RedisError> {
    let id = arg.try_as_str().map_err(|_| err(errors::ID_NOT_UTF8))?;
    if id.is_empty() {
        return Err(err(errors::EMPTY_ID));
    }
    Ok(id.to_string())
}

/// Parses `<flow_id> [FLAG]`: the id, and whether the optional flag was given.
fn id_and_flag(args: Vec<RedisString>, flag: &str) -> Result<(String, bool), RedisError> {
    if args.len() < 2 || args.len() > 3 {
        return Err(RedisError::WrongArity);
    }
    let mut args = args.into_iter().skip(1);
    let id = flow_id(args.next_arg()?)?;
    let set = match args.next() {
        None => false,
        Some(a) if a.to_string_lossy().eq_ignore_ascii_case(flag) => true,
        Some(_) => return Err(err(format!("ERR syntax error: expected {flag}"))),
    };
    Ok((id, set))
}

/// FLOWARCHIVE.ACLCHECK: the stand-in `runtime::acl` hands the server's ACL check; a client's call
/// touches nothing.
pub fn aclcheck(_ctx: &Context, _args: Vec<RedisString>) -> RedisResult {
    Err(RedisError::Str(acl::STANDIN_CALLED))
}

/// FLOWARCHIVE.FLOW <flow_id> [FORCE]
pub fn flow(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("FLOWARCHIVE.FLOW", || {
        let (id, force) = id_and_flag(args, "FORCE")?;
        archive::archive_now(ctx, id, force)
    })
}

/// FLOWARCHIVE.GET <flow_id> [EVENTS] [PREVIOUS n]
pub fn get(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("FLOWARCHIVE.GET", || {
        if args.len() < 2 {
            return Err(RedisError::WrongArity);
        }
        let mut args = args.into_iter().skip(1);
        let mut request = read::Request {
            id: flow_id(args.next_arg()?)?,
            events: false,
            previous: 0,
        };
        while let Some(arg) = args.next() {
            match arg.to_string_lossy().to_ascii_uppercase().as_str() {
                "EVENTS" if !request.events => request.events = true,
                "PREVIOUS" if request.previous == 0 => {
                    let n = args
                        .next_u64()
                        .ok()
                        .filter(|n| (1..=read::MAX_PREVIOUS).contains(n));
                    let n = n.ok_or_else(|| {
                        err(format!(
                            "ERR PREVIOUS needs an integer from 1 to {}",
                            read::MAX_PREVIOUS
                        ))
                    })?;
                    request.previous = n as usize;
                }
                _ => return Err(err("ERR syntax error: expected EVENTS or PREVIOUS n")),
            }
        }
        read::get(ctx, request)
    })
}

/// FLOWARCHIVE.SWEEP [LIMIT n] [DRYRUN] [ASYNC]
pub fn sweep(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("FLOWARCHIVE.SWEEP", || {
        let mut request = sweep::Request::default();
        let mut args = args.into_iter().skip(1);
        while let Some(arg) = args.next() {
            match arg.to_string_lossy().to_ascii_uppercase().as_str() {
                "LIMIT" => {
                    let n = args.next_u64().ok().filter(|n| *n > 0);
                    let n = n.ok_or_else(|| err("ERR LIMIT needs a positive integer"))?;
                    request.limit = Some(n as usize);
                }
                "DRYRUN" => request.dry_run = true,
                "ASYNC" => request.asynchronous = true,
                _ => return Err(err("ERR syntax error: expected LIMIT n, DRYRUN or ASYNC")),
            }
        }
        sweep::command(ctx, request)
    })
}
