//! Reply shapes shared by the commands.

use std::os::raw::c_long;

use redis_module::redisvalue::RedisValueKey;
use redis_module::{raw, Context, RedisValue};

/// A map reply: a RESP3 map, or a flat field/value array on RESP2.
pub fn map<const N: usize>(fields: [(&str, RedisValue); N]) -> RedisValue {
    RedisValue::OrderedMap(
        fields
            .into_iter()
            .map(|(k, v)| (RedisValueKey::String(k.to_string()), v))
            .collect(),
    )
}

/// A flow's state, or with `events` `[state, [event, ...]]`, written straight from the caller's
/// buffers, each a bulk string as `RedisValue::StringBuffer` writes it: a long log is not copied into
/// reply values first, so a read never holds it twice. The events' count is set once they are written.
pub fn state_and_events<'a>(
    ctx: &Context,
    state: &[u8],
    events: Option<impl Iterator<Item = &'a [u8]>>,
) {
    let Some(events) = events else {
        bulk(ctx, state);
        return;
    };
    raw::reply_with_array(ctx.ctx, 2);
    bulk(ctx, state);
    raw::reply_with_array(ctx.ctx, c_long::from(raw::REDISMODULE_POSTPONED_LEN));
    let mut count: c_long = 0;
    for event in events {
        bulk(ctx, event);
        count += 1;
    }
    // SAFETY: ends the postponed array opened above, on the same context.
    unsafe {
        if let Some(set) = raw::RedisModule_ReplySetArrayLength {
            set(ctx.ctx, count);
        }
    }
}

fn bulk(ctx: &Context, bytes: &[u8]) {
    raw::reply_with_string_buffer(ctx.ctx, bytes.as_ptr().cast(), bytes.len());
}
