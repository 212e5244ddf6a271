//! Handing a command's work to a pool thread, and answering its client when the work ends.
//!
//! A command that waits for S3 or for many main-thread steps blocks only its own client: the work is
//! queued on a bounded pool first and receives the blocked client after, so a client is never blocked
//! without a thread that will answer it, and a full pool answers a busy error at once. A panic in the
//! work still answers the client.
//!
//! An answer is a reply value, or a reply written straight from buffers the work still holds (a long
//! event log): the client's reply takes its own copy, and the module never holds a second one.

use std::cell::Cell;
use std::ptr;
use std::sync::mpsc::channel;

use redis_module::{raw, Context, ContextFlags, RedisError, RedisResult};

use crate::ops::{errors, log};
use crate::runtime::pool::Pool;

/// A blocked client and the context its reply is written through, from any thread (the module API
/// asks no lock of reply calls on a blocked client's context). Dropping it answers the client: the
/// context is freed, then the client unblocked; a client dropped before anything was written to it (a
/// panic on the way) is answered the internal error, never left waiting for a reply that never comes.
pub struct Client {
    blocked: *mut raw::RedisModuleBlockedClient,
    ctx: *mut raw::RedisModuleCtx,
    answered: Cell<bool>,
}

// SAFETY: the server hands a blocked client and its thread-safe context to another thread by design;
// each `Client` is used by one thread at a time (it is moved, never shared).
unsafe impl Send for Client {}

impl Client {
    /// Replies with `answer`.
    pub fn reply(&self, answer: RedisResult) {
        self.write(|ctx| {
            ctx.reply(answer);
        });
    }

    /// Writes the reply through `write`.
    pub fn write(&self, write: impl FnOnce(&Context)) {
        self.answered.set(true);
        write(&Context::new(self.ctx));
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if !self.answered.get() {
            self.reply(Err(RedisError::Str(errors::PANIC)));
        }
        // SAFETY: both were made by `this_client` and are released once, context first.
        unsafe {
            if let Some(free) = raw::RedisModule_FreeThreadSafeContext {
                free(self.ctx);
            }
            if let Some(unblock) = raw::RedisModule_UnblockClient {
                unblock(self.blocked, ptr::null_mut());
            }
        }
    }
}

/// What a command's work answers the client.
pub enum Answer {
    Value(RedisResult),
    /// A reply written straight from what the closure holds, which is freed once it is written.
    Write(Box<dyn FnOnce(&Context) + Send>),
}

impl From<RedisResult> for Answer {
    fn from(value: RedisResult) -> Answer {
        Answer::Value(value)
    }
}

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

/// The calling command's client, blocked until the work answers it (`None` where the server does not
/// block it).
pub fn this_client(ctx: &Context) -> Option<Client> {
    // SAFETY: on the main thread, inside the command; both functions are found before the client is
    // blocked, and the pointers are released by `Client::drop`.
    unsafe {
        let (Some(block), Some(context)) = (
            raw::RedisModule_BlockClient,
            raw::RedisModule_GetThreadSafeContext,
        ) else {
            return None;
        };
        let blocked = block(ctx.ctx, None, None, None, 0);
        if blocked.is_null() {
            return None;
        }
        Some(Client {
            blocked,
            ctx: context(blocked),
            answered: Cell::new(false),
        })
    }
}

/// Runs `work` on `pool` and answers the client that `block` blocks (if it blocks one) with its result;
/// `busy` (an error text) when the pool is full.
pub fn answer_later<A>(
    pool: &'static Pool,
    busy: &'static str,
    block: impl FnOnce() -> Option<Client>,
    work: impl FnOnce() -> A + Send + 'static,
) -> Result<(), RedisError>
where
    A: Into<Answer>,
{
    let (hand_over, client) = channel::<Option<Client>>();
    let job = Box::new(move || {
        let client = client.recv().ok().flatten();
        let answer = log::contained("a command's work", || work().into())
            .unwrap_or(Answer::Value(Err(RedisError::Str(errors::PANIC))));
        match (client, answer) {
            (Some(client), Answer::Value(answer)) => client.reply(errors::ascii_errors(answer)),
            // A writer ends its reply itself even when its events panic (`reply::state_and_events`).
            (Some(client), Answer::Write(write)) => {
                log::contained("a command's reply", || client.write(write));
            }
            (None, _) => {}
        }
    });
    pool.submit(job).map_err(|_| RedisError::Str(busy))?;
    let _ = hand_over.send(block());
    Ok(())
}
