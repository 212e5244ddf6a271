//! Reply shapes shared by the commands.

use std::ffi::CStr;
use std::os::raw::c_long;

use redis_module::redisvalue::RedisValueKey;
use redis_module::{raw, Context, RedisValue};

use crate::ops::log;

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
///
/// The reply is always whole: a panic while the events are written (their iterator's) ends the list
/// with an error element, and its count is set all the same. A reply left open would never end for the
/// client (every later reply on its connection taken as part of this one), and the server would send
/// the placeholder of the unset count as a reply block, which it cannot.
pub fn state_and_events<'a>(
    ctx: &Context,
    state: &[u8],
    events: Option<impl Iterator<Item = &'a [u8]>>,
) {
    write_state_and_events(&mut Server(ctx), state, events);
}

/// The reply calls `write_state_and_events` makes.
trait Sink {
    fn array(&mut self, len: c_long);
    /// An array whose length is set later (`set_len`).
    fn open_array(&mut self);
    fn set_len(&mut self, len: c_long);
    fn bulk(&mut self, bytes: &[u8]);
    fn error(&mut self, text: &CStr);
}

/// The reply calls on a server context.
struct Server<'c>(&'c Context);

impl Sink for Server<'_> {
    fn array(&mut self, len: c_long) {
        raw::reply_with_array(self.0.ctx, len);
    }

    fn open_array(&mut self) {
        raw::reply_with_array(self.0.ctx, c_long::from(raw::REDISMODULE_POSTPONED_LEN));
    }

    fn set_len(&mut self, len: c_long) {
        // SAFETY: ends the postponed array opened last on the same context.
        unsafe {
            if let Some(set) = raw::RedisModule_ReplySetArrayLength {
                set(self.0.ctx, len);
            }
        }
    }

    fn bulk(&mut self, bytes: &[u8]) {
        raw::reply_with_string_buffer(self.0.ctx, bytes.as_ptr().cast(), bytes.len());
    }

    fn error(&mut self, text: &CStr) {
        raw::reply_with_error(self.0.ctx, text.as_ptr());
    }
}

/// The element that ends an event list cut short by a panic.
const CUT_SHORT: &CStr =
    c"ERR flowarchive internal error: the events end here, not all were answered (see the server log)";

fn write_state_and_events<'a>(
    sink: &mut impl Sink,
    state: &[u8],
    events: Option<impl Iterator<Item = &'a [u8]>>,
) {
    let Some(events) = events else {
        sink.bulk(state);
        return;
    };
    sink.array(2);
    sink.bulk(state);
    sink.open_array();
    let mut count: c_long = 0;
    let written = log::contained("a reply's events", || {
        for event in events {
            sink.bulk(event);
            count += 1;
        }
    });
    if written.is_none() {
        sink.error(CUT_SHORT);
        count += 1;
    }
    sink.set_len(count);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply as RESP would frame it, the postponed count written where it was opened.
    #[derive(Default)]
    struct Record {
        parts: Vec<String>,
        open: Vec<usize>,
    }

    impl Sink for Record {
        fn array(&mut self, len: c_long) {
            self.parts.push(format!("*{len}"));
        }
        fn open_array(&mut self) {
            self.open.push(self.parts.len());
            self.parts.push("*?".into());
        }
        fn set_len(&mut self, len: c_long) {
            let at = self.open.pop().expect("an open array");
            self.parts[at] = format!("*{len}");
        }
        fn bulk(&mut self, bytes: &[u8]) {
            self.parts.push(String::from_utf8_lossy(bytes).into_owned());
        }
        fn error(&mut self, text: &CStr) {
            self.parts.push(format!("-{}", text.to_str().unwrap()));
        }
    }

    fn written<'a>(events: Option<impl Iterator<Item = &'a [u8]>>) -> Vec<String> {
        let mut record = Record::default();
        write_state_and_events(&mut record, b"S", events);
        assert!(record.open.is_empty(), "an array left open");
        record.parts
    }

    #[test]
    fn the_state_and_every_event_are_written_and_counted() {
        let none: Option<std::iter::Empty<&[u8]>> = None;
        assert_eq!(written(none), ["S"]);
        assert_eq!(written(Some(std::iter::empty())), ["*2", "S", "*0"]);
        let events: [&[u8]; 3] = [b"a", b"", b"c"];
        assert_eq!(
            written(Some(events.into_iter())),
            ["*2", "S", "*3", "a", "", "c"]
        );
    }

    /// An iterator that panics after two events: the list holds them and an error, counted, and the
    /// reply ends.
    #[test]
    fn a_panic_while_the_events_are_written_still_ends_the_reply() {
        let events: [&[u8]; 3] = [b"a", b"b", b"c"];
        let failing = events.into_iter().enumerate().map(|(i, e)| {
            assert!(i < 2, "the third event");
            e
        });
        let cut = format!("-{}", CUT_SHORT.to_str().unwrap());
        assert_eq!(
            written(Some(failing)),
            ["*2", "S", "*3", "a", "b", cut.as_str()]
        );
    }
}
