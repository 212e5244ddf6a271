//! The module's commands: each declared with the redis-module crate's `#[command]` (flags, key specs,
//! docs), and its handler, which parses the arguments and calls one function. A panic never crosses
//! into the server: it becomes an error reply and a log line. Their ACL category, `@flowarchive`, is
//! not declared here: `runtime::registration` puts every command of the module in it at load, so that
//! the module loads again after `MODULE UNLOAD`.
//!
//! Key specs: `FLOW` and `GET` declare the flow id as a routing-only key (`NotKey`: the server and
//! cluster clients route by it; ACL key patterns and `COMMAND GETKEYS` see no key; `runtime::cluster`).
//! The ACL stand-in's key specs are one keyword-led group per access (`runtime::acl`). The arity stays
//! -1: each handler answers a wrong argument count itself.

use redis_module::{Context, NextArg, RedisError, RedisResult, RedisString};
use redis_module_macros::command;

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
/// touches nothing. Its key specs are the keys of `READ <n> <key>...`, `REMOVE <n> <key>...` and
/// `ADD <n> <key>...`, each group found by its keyword (from the first argument on), with the flags
/// the server's ACL asks of that access (`acl::Access`: read; read and write, delete; read and write,
/// insert). `acl::init` proves at load that the server finds exactly the keys `acl` lays out.
#[command(
    {
        name: "flowarchive.aclcheck",
        flags: [NoMandatoryKeys],
        summary: "Not for clients: flowarchive checks an archive's keys against the caller's ACL as this one command's keys; a call answers an error.",
        arity: -1,
        key_spec: [
            {
                flags: [ReadOnly, Access],
                begin_search: Keyword({ keyword: "READ", startfrom: 1 }),
                find_keys: Keynum({ key_num_idx: 0, first_key: 1, key_step: 1 }),
            },
            {
                flags: [ReadWrite, Access, Delete],
                begin_search: Keyword({ keyword: "REMOVE", startfrom: 1 }),
                find_keys: Keynum({ key_num_idx: 0, first_key: 1, key_step: 1 }),
            },
            {
                flags: [ReadWrite, Access, Insert],
                begin_search: Keyword({ keyword: "ADD", startfrom: 1 }),
                find_keys: Keynum({ key_num_idx: 0, first_key: 1, key_step: 1 }),
            },
        ],
    }
)]
pub fn aclcheck(_ctx: &Context, _args: Vec<RedisString>) -> RedisResult {
    Err(RedisError::Str(acl::STANDIN_CALLED))
}

/// FLOWARCHIVE.FLOW <flow_id> [FORCE]
#[command(
    {
        name: "flowarchive.flow",
        flags: [Write, DenyScript],
        summary: "Archives one terminal flow to S3 now and removes its live keys; only the calling client waits.",
        arity: -1,
        key_spec: [
            {
                flags: [ReadOnly, NotKey],
                begin_search: Index({ index: 1 }),
                find_keys: Range({ last_key: 0, steps: 1, limit: 0 }),
            },
        ],
        args: [
            { name: "flow_id", arg_type: String },
            { name: "force", arg_type: PureToken, token: "FORCE", flags: [Optional] },
        ],
    }
)]
pub fn flow(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    guarded("FLOWARCHIVE.FLOW", || {
        let (id, force) = id_and_flag(args, "FORCE")?;
        archive::archive_now(ctx, id, force)
    })
}

/// FLOWARCHIVE.GET <flow_id> [EVENTS] [PREVIOUS n]
#[command(
    {
        name: "flowarchive.get",
        flags: [ReadOnly],
        summary: "Answers a flow's state: from its live keys, else from its verified archive.",
        arity: -1,
        key_spec: [
            {
                flags: [ReadOnly, NotKey],
                begin_search: Index({ index: 1 }),
                find_keys: Range({ last_key: 0, steps: 1, limit: 0 }),
            },
        ],
        args: [
            { name: "flow_id", arg_type: String },
            { name: "events", arg_type: PureToken, token: "EVENTS", flags: [Optional] },
            { name: "previous", arg_type: Integer, token: "PREVIOUS", display_text: "n", flags: [Optional] },
        ],
    }
)]
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
#[command(
    {
        name: "flowarchive.sweep",
        flags: [Write, DenyScript],
        summary: "Runs one retention sweep of the caller's DB: archives the terminal flows idle longer than the retention.",
        arity: -1,
        key_spec: [],
        args: [
            { name: "limit", arg_type: Integer, token: "LIMIT", display_text: "n", flags: [Optional] },
            { name: "dryrun", arg_type: PureToken, token: "DRYRUN", flags: [Optional] },
            { name: "async", arg_type: PureToken, token: "ASYNC", flags: [Optional] },
        ],
    }
)]
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
