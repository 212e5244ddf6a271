//! Handing a command's work to a pool thread, and answering its client when the work ends.
//!
//! A command that waits for S3 or for many main-thread steps blocks only its own client: the work is
//! queued on a bounded pool first and receives the blocked client after, so a client is never blocked
//! without a thread that will answer it, and a full pool answers a busy error at once. A panic in the
//! work still answers the client.

use std::sync::mpsc::channel;

use redis_module::{
    BlockedClient, Context, ContextFlags, RedisError, RedisResult, ThreadSafeContext,
};

use crate::ops::{errors, log};
use crate::runtime::pool::Pool;

type Client = ThreadSafeContext<BlockedClient>;

/// Whether the calling context may block its client (not inside MULTI, a script or the like).
pub fn can_block(ctx: &Context) -> bool {
    !ctx.get_flags()
        .intersects(ContextFlags::MULTI | ContextFlags::LUA | ContextFlags::DENY_BLOCKING)
}

/// Refuses `command` where it cannot wait for its work (MULTI, scripts) and, when it `writes`, on a
/// replica.
pub fn refuse_where_it_cannot_run(
    ctx: &Context,
    command: &str,
    writes: bool,
) -> Result<(), RedisError> {
    if !can_block(ctx) {
        return Err(RedisError::String(format!(
            "ERR {command} cannot run inside MULTI, a script or another blocking context"
        )));
    }
    if writes && ctx.get_flags().contains(ContextFlags::SLAVE) {
        return Err(RedisError::String(format!(
            "ERR {command} writes and must run on the primary, not a replica"
        )));
    }
    Ok(())
}

/// The calling command's client, blocked until the work answers it.
pub fn this_client(ctx: &Context) -> Option<Client> {
    Some(ThreadSafeContext::with_blocked_client(ctx.block_client()))
}

/// Runs `work` on `pool` and answers the client that `block` blocks (if it blocks one) with its result;
/// `busy` (an error text) when the pool is full.
pub fn answer_later(
    pool: &'static Pool,
    busy: &'static str,
    block: impl FnOnce() -> Option<Client>,
    work: impl FnOnce() -> RedisResult + Send + 'static,
) -> Result<(), RedisError> {
    let (hand_over, client) = channel::<Option<Client>>();
    let job = Box::new(move || {
        let client = client.recv().ok().flatten();
        let answer =
            log::contained("a command's work", work).unwrap_or(Err(RedisError::Str(errors::PANIC)));
        if let Some(client) = client {
            client.reply(errors::ascii_errors(answer));
        }
    });
    pool.submit(job).map_err(|_| RedisError::Str(busy))?;
    let _ = hand_over.send(block());
    Ok(())
}
