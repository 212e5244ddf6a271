//! JSON as the engine's Go runtime reads and writes it (`encoding/json`), so that a state folded here is
//! byte for byte what the engine answers.
//!
//! Checking: `check` accepts exactly what Go's scanner accepts (nesting up to 10,000 levels; any byte
//! but a control character inside strings) and hands back a `Reader`. Like Go's `Unmarshal`, which
//! checks a whole document before it decodes any of it, nothing is read from a document that is not
//! JSON. The check allocates nothing: the containers open at any point are bits on the stack.
//!
//! Reading builds no tree. A checked document is read once more, front to back, by the `Decode` of the
//! type it goes into: a struct takes the fields it knows and skips the rest, a value kept for later
//! (an event's `data` until an applier asks for it) is a span of the input (`Raw`), passed over when
//! it is met and read if it is asked for. Why: a tree of parsed values costs 50 to 60 bytes per value
//! (an enum and a heap string per number), so a flow of small numbers weighed 50 times its bytes while
//! it was folded, and the fold's inputs are capped in bytes (`read-max-bytes`), not in values. Read in
//! place, the fold holds the input and what it keeps (strings, maps, the state it answers), and the
//! data of an event no applier reads costs nothing but the passes over it. Decoding follows Go's
//! `Unmarshal`: unknown fields are ignored, field names match exactly or case-insensitively (Unicode
//! simple folding), `null` leaves a string, number, bool, time or struct as it was and sets a pointer,
//! map, slice or interface to nil, objects decoded into an existing struct or map merge into it (a
//! duplicate key is applied in turn), strings are unquoted with bytes that are not UTF-8 and unpaired
//! UTF-16 surrogate escapes becoming U+FFFD, one byte at a time, and any type mismatch is an error.
//! `Decode::accepts` answers whether a value would decode, keeping nothing of it (what a reader of one
//! event's facts needs on the server's main thread).
//!
//! A value of Go type `any` (`Any`) is held as the text Go writes for it, produced as it is read, which
//! is about the size of the input: Go would hold numbers as float64 and objects as maps, so numbers
//! are written in Go's shortest float64 form (`1e+21`, `1e-7`, `100`), an object's keys sorted by their
//! bytes with the last of duplicate keys kept, strings escaped as Go escapes them. Nesting is followed
//! with a stack of its own, never the thread's. An object whose keys come in order (most do) is written
//! as it comes; the others are noted and put in order once, at the end, so that objects out of order
//! nested 10,000 deep cost no more than flat ones (sorting each as it closed would move the bytes of
//! the innermost once per level).
//!
//! Writing: `Encode` writes Go's `Marshal` output: struct fields in declaration order with `omitempty`,
//! map keys sorted by their bytes, `<`, `>`, `&`, U+2028 and U+2029 escaped, nil as `null`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::format::gotime::GoTime;
use crate::format::{find_marked, Marks};

/// Go's scanner refuses deeper nesting.
pub const MAX_DEPTH: usize = 10_000;

/// Why a document is not JSON, at which byte.
#[derive(Debug, PartialEq)]
pub struct SyntaxError {
    pub at: usize,
    pub what: &'static str,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// Whether a byte can be part of a number or a literal (`true`, `false`, `null`).
fn is_scalar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.')
}

/// The bytes that end a run of a string's text: its closing quote, an escape, a control character.
const STRING_STOP: Marks<2> = Marks {
    bytes: *b"\"\\",
    below: 0x20,
};

/// The bytes that matter when a container is passed over: quotes and brackets.
const STRUCTURAL: Marks<5> = Marks {
    bytes: *b"\"{[}]",
    below: 0,
};

mod any;
mod check;
mod read;
#[cfg(test)]
mod tests;
mod types;
mod write;

use any::*;
pub use check::check;
use check::*;
use read::*;
pub use read::{Raw, Reader, Str, TypeError};
pub(crate) use types::go_struct;
pub use types::{names_field, not_an_object, Any, Decode, Encode, GoMap, GoSlice, Ptr};
pub use write::{write_f64, write_str};

/// Text from a document, cut short for an error message.
pub fn bounded(s: &str) -> String {
    crate::text::cut(s, 80).into_owned()
}
