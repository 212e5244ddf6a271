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

/// A table of the bytes below `below` and those in `marked`, for loops that look at every byte.
const fn byte_table(below: u8, marked: &[u8]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut n = 0;
    while n < below as usize {
        table[n] = true;
        n += 1;
    }
    n = 0;
    while n < marked.len() {
        table[marked[n] as usize] = true;
        n += 1;
    }
    table
}

/// The bytes that end a run of a string's text: its closing quote, an escape, a control character.
static STRING_STOP: [bool; 256] = byte_table(0x20, b"\"\\");

/// The bytes that matter when a container is passed over: quotes and brackets.
static STRUCTURAL: [bool; 256] = byte_table(0, b"\"{[}]");

// ---------------------------------------------------------------- checking

/// The containers open at a point of a document, one bit each (set: an object), so that checking the
/// deepest document Go accepts needs no heap.
struct Nesting {
    bits: [u64; MAX_DEPTH.div_ceil(64)],
    depth: usize,
}

impl Nesting {
    /// Opens a container; `false` when that would pass Go's limit.
    fn push(&mut self, object: bool) -> bool {
        let word = match self.bits.get_mut(self.depth / 64) {
            Some(word) if self.depth < MAX_DEPTH => word,
            _ => return false,
        };
        let bit = 1u64 << (self.depth % 64);
        if object {
            *word |= bit;
        } else {
            *word &= !bit;
        }
        self.depth += 1;
        true
    }

    /// Whether the innermost open container is an object; `None` at the top level.
    fn top(&self) -> Option<bool> {
        let at = self.depth.checked_sub(1)?;
        Some(self.bits.get(at / 64)? & (1u64 << (at % 64)) != 0)
    }

    fn pop(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }
}

struct Checker<'a> {
    b: &'a [u8],
    i: usize,
}

impl Checker<'_> {
    fn error(&self, what: &'static str) -> SyntaxError {
        SyntaxError { at: self.i, what }
    }

    fn skip_space(&mut self) {
        while self.b.get(self.i).copied().is_some_and(is_space) {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), SyntaxError> {
        if self
            .b
            .get(self.i..)
            .is_some_and(|rest| rest.starts_with(word))
        {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.error("invalid literal"))
        }
    }

    fn number(&mut self) -> Result<(), SyntaxError> {
        let digits = |p: &mut Self| {
            let n = p.b[p.i..].iter().take_while(|c| c.is_ascii_digit()).count();
            p.i += n;
            n
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.error("invalid number")),
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(self.error("invalid number"));
            }
        }
        if matches!(self.b.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(self.error("invalid number"));
            }
        }
        Ok(())
    }

    /// A string literal, the cursor on its opening quote.
    fn string(&mut self) -> Result<(), SyntaxError> {
        self.i += 1;
        loop {
            let rest = &self.b[self.i..];
            self.i += rest
                .iter()
                .position(|&c| STRING_STOP[c as usize])
                .unwrap_or(rest.len());
            match self.b.get(self.i) {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    let Some(&e) = self.b.get(self.i + 1) else {
                        return Err(self.error("unterminated string"));
                    };
                    self.i += 2;
                    match e {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            if hex4(self.b, self.i).is_none() {
                                return Err(self.error("invalid \\u escape"));
                            }
                            self.i += 4;
                        }
                        _ => return Err(self.error("invalid escape")),
                    }
                }
                Some(_) => return Err(self.error("control character in string")),
            }
        }
    }

    /// An object key and its colon.
    fn key(&mut self) -> Result<(), SyntaxError> {
        if self.b.get(self.i) != Some(&b'"') {
            return Err(self.error("expected string for object key"));
        }
        self.string()?;
        self.skip_space();
        if self.b.get(self.i) != Some(&b':') {
            return Err(self.error("expected : after object key"));
        }
        self.i += 1;
        Ok(())
    }

    /// One document, iteratively.
    fn document(&mut self) -> Result<(), SyntaxError> {
        let mut open = Nesting {
            bits: [0; MAX_DEPTH.div_ceil(64)],
            depth: 0,
        };
        loop {
            self.skip_space();
            let Some(&c) = self.b.get(self.i) else {
                return Err(self.error("unexpected end of JSON input"));
            };
            match c {
                b'{' | b'[' => {
                    if !open.push(c == b'{') {
                        return Err(self.error("exceeded max depth"));
                    }
                    self.i += 1;
                    self.skip_space();
                    let close = if c == b'{' { b'}' } else { b']' };
                    if self.b.get(self.i) == Some(&close) {
                        self.i += 1;
                        open.pop();
                    } else {
                        if c == b'{' {
                            self.key()?;
                        }
                        continue;
                    }
                }
                b'"' => self.string()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return Err(self.error("invalid character looking for beginning of value")),
            }
            // After a value: the next one in its container, or the end of containers that close here.
            loop {
                self.skip_space();
                let Some(object) = open.top() else {
                    if self.i != self.b.len() {
                        return Err(self.error("invalid character after top-level value"));
                    }
                    return Ok(());
                };
                match (self.b.get(self.i), object) {
                    (Some(b','), _) => {
                        self.i += 1;
                        if object {
                            self.skip_space();
                            self.key()?;
                        }
                        break;
                    }
                    (Some(b']'), false) | (Some(b'}'), true) => {
                        self.i += 1;
                        open.pop();
                    }
                    (_, false) => return Err(self.error("expected , or ] in array")),
                    (_, true) => return Err(self.error("expected , or } in object")),
                }
            }
        }
    }
}

/// The four hex digits at `b[at..]`, if they are.
fn hex4(b: &[u8], at: usize) -> Option<u32> {
    let h = b.get(at..at + 4)?;
    h.iter().try_fold(0u32, |n, &c| {
        let d = (c as char).to_digit(16)?;
        Some(n << 4 | d)
    })
}

/// Checks that `bytes` is one JSON document as Go's scanner accepts it, and reads it.
pub fn check(bytes: &[u8]) -> Result<Reader<'_>, SyntaxError> {
    Checker { b: bytes, i: 0 }.document()?;
    Ok(Reader { b: bytes, i: 0 })
}

// ---------------------------------------------------------------- reading a checked document

/// A document `check` accepted (or a value of one), read front to back: each value is taken by the
/// `Decode` of its type, or skipped. Its syntax is not checked again; should it not be what `check`
/// accepts, reading stops with an error (never a panic, never a loop).
pub struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

/// A value of a checked document kept as its text, to be read later (`reader`).
#[derive(Clone, Copy)]
pub struct Raw<'a>(&'a [u8]);

impl<'a> Raw<'a> {
    /// A reader of the value.
    pub fn reader(self) -> Reader<'a> {
        Reader { b: self.0, i: 0 }
    }
}

/// A string literal of a checked document: its bytes between the quotes, escapes and all.
#[derive(Clone, Copy)]
pub struct Str<'a>(&'a [u8]);

impl<'a> Str<'a> {
    /// The literal's bytes, where they are its text (no escape, only UTF-8): what Go's time parser
    /// reads, since `Time.UnmarshalJSON` does not unquote.
    fn verbatim(self) -> Option<&'a str> {
        if self.0.contains(&b'\\') {
            return None;
        }
        std::str::from_utf8(self.0).ok()
    }

    /// The text, unquoted as Go's `unquote` does.
    pub fn text(self) -> Cow<'a, str> {
        match self.verbatim() {
            Some(text) => Cow::Borrowed(text),
            None => {
                let mut out = String::with_capacity(self.0.len());
                self.unquote_into(&mut out);
                Cow::Owned(out)
            }
        }
    }

    fn unquote_into(self, out: &mut String) {
        let b = self.0;
        let mut i = 0;
        while i < b.len() {
            let run = b[i..]
                .iter()
                .position(|&c| c == b'\\')
                .unwrap_or(b.len() - i);
            push_utf8(out, &b[i..i + run]);
            i += run;
            if i < b.len() {
                i = unescape(b, i, out);
            }
        }
    }
}

/// Appends bytes as Go reads them into a string: UTF-8 as it is, any other byte as U+FFFD (one each, as
/// Go's `utf8.DecodeRune` takes them).
fn push_utf8(out: &mut String, mut b: &[u8]) {
    loop {
        match std::str::from_utf8(b) {
            Ok(text) => {
                out.push_str(text);
                return;
            }
            Err(e) => {
                let (good, rest) = b.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).unwrap_or_default());
                out.push('\u{FFFD}');
                b = rest.get(1..).unwrap_or_default();
            }
        }
    }
}

/// Appends the character of the escape at `b[i]` (a backslash); answers where the text after it begins.
fn unescape(b: &[u8], i: usize, out: &mut String) -> usize {
    let simple = match b.get(i + 1) {
        Some(b'u') => None,
        Some(b'"') => Some('"'),
        Some(b'\\') => Some('\\'),
        Some(b'/') => Some('/'),
        Some(b'b') => Some('\u{8}'),
        Some(b'f') => Some('\u{c}'),
        Some(b'n') => Some('\n'),
        Some(b'r') => Some('\r'),
        Some(b't') => Some('\t'),
        _ => Some('\u{FFFD}'),
    };
    if let Some(c) = simple {
        out.push(c);
        return i + 2;
    }
    let Some(r) = hex4(b, i + 2) else {
        out.push('\u{FFFD}');
        return i + 2;
    };
    if !(0xD800..0xE000).contains(&r) {
        out.push(char::from_u32(r).unwrap_or('\u{FFFD}'));
        return i + 6;
    }
    // A high surrogate followed by a low one is one character; anything else is U+FFFD, and the escape
    // after it is read on its own.
    let low = (b.get(i + 6..i + 8) == Some(b"\\u"))
        .then(|| hex4(b, i + 8))
        .flatten()
        .filter(|lo| r < 0xDC00 && (0xDC00..0xE000).contains(lo));
    match low {
        Some(lo) => {
            let c = char::from_u32(0x10000 + ((r - 0xD800) << 10) + (lo - 0xDC00));
            out.push(c.unwrap_or('\u{FFFD}'));
            i + 12
        }
        None => {
            out.push('\u{FFFD}');
            i + 6
        }
    }
}

/// A value that does not fit its Go type: `Unmarshal` reports an error (and the engine drops the event,
/// or fails the load).
#[derive(Debug, PartialEq)]
pub struct TypeError(pub String);

impl std::fmt::Display for TypeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A reader found what `check` would not have accepted.
fn malformed() -> TypeError {
    TypeError("malformed JSON".into())
}

/// A JSON number as the float64 Go reads it into; `None` where Go reports it out of range.
fn float(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// An integer of at most 15 digits is exactly a float64, written back as it is.
fn small_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    digits.len() <= 15 && digits.bytes().all(|c| c.is_ascii_digit())
}

fn out_of_float_range(text: &str) -> TypeError {
    TypeError(format!(
        "cannot unmarshal number {} into float64",
        bounded(text)
    ))
}

/// What `Reader::any` has open: an array, or an object begun at `out[start]` whose keys are
/// `pairs[from..]`, `sorted` while each came after the one before it.
enum Open {
    Array,
    Object {
        start: usize,
        from: usize,
        sorted: bool,
    },
}

/// Where `Reader::any` wrote an object's key: its opening quote, and its colon.
#[derive(Clone, Copy)]
struct Pair {
    key: usize,
    colon: usize,
}

/// An object `Reader::any` wrote out of order, at `out[start..end]`: its pairs as Go writes them are
/// `order[from..to]` (ranges of `out`).
struct Reorder {
    start: usize,
    end: usize,
    from: usize,
    to: usize,
}

impl<'a> Reader<'a> {
    /// The first byte of the next value, whitespace passed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !is_space(c) {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// What the next value is, as Go's type errors name it.
    pub fn kind(&mut self) -> &'static str {
        match self.peek() {
            Some(b'{') => "object",
            Some(b'[') => "array",
            Some(b'"') => "string",
            Some(b't' | b'f') => "bool",
            Some(b'n') => "null",
            _ => "number",
        }
    }

    /// The error for the next value, which does not fit `go_type`.
    fn mismatch(&mut self, go_type: &str) -> TypeError {
        TypeError(format!("cannot unmarshal {} into {go_type}", self.kind()))
    }

    /// Takes a `null`, if that is what comes next.
    pub fn null(&mut self) -> bool {
        let is_null = self.peek() == Some(b'n') && self.b[self.i..].starts_with(b"null");
        if is_null {
            self.i += 4;
        }
        is_null
    }

    /// Takes a string, if that is what comes next.
    fn string(&mut self) -> Option<Str<'a>> {
        if self.peek() != Some(b'"') {
            return None;
        }
        let start = self.i + 1;
        self.skip_string();
        let end = self.i.saturating_sub(1).max(start);
        self.b.get(start..end).map(Str)
    }

    /// Takes a number (its text), if that is what comes next.
    fn number(&mut self) -> Option<&'a str> {
        if !matches!(self.peek(), Some(b'-' | b'0'..=b'9')) {
            return None;
        }
        let start = self.i;
        self.skip_scalar();
        std::str::from_utf8(&self.b[start..self.i]).ok()
    }

    /// Takes `true` or `false`, if that is what comes next.
    fn boolean(&mut self) -> Option<bool> {
        let value = match self.peek() {
            Some(b't') if self.b[self.i..].starts_with(b"true") => true,
            Some(b'f') if self.b[self.i..].starts_with(b"false") => false,
            _ => return None,
        };
        self.i += if value { 4 } else { 5 };
        Some(value)
    }

    /// Enters an object, if that is what comes next; its keys are then taken with `key`.
    pub fn object(&mut self) -> bool {
        let is_object = self.peek() == Some(b'{');
        if is_object {
            self.i += 1;
        }
        is_object
    }

    /// The next key of the object being read, its value next; `None` once the object ends.
    pub fn key(&mut self) -> Result<Option<Str<'a>>, TypeError> {
        if self.peek() == Some(b',') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'}') => {
                self.i += 1;
                Ok(None)
            }
            Some(b'"') => {
                let key = self.string().ok_or_else(malformed)?;
                if self.peek() != Some(b':') {
                    return Err(malformed());
                }
                self.i += 1;
                Ok(Some(key))
            }
            _ => Err(malformed()),
        }
    }

    /// Enters an array, if that is what comes next; its items are then found with `item`.
    fn array(&mut self) -> bool {
        let is_array = self.peek() == Some(b'[');
        if is_array {
            self.i += 1;
        }
        is_array
    }

    /// Whether the array being read has another item, which comes next; `false` once it ends.
    fn item(&mut self) -> bool {
        if self.peek() == Some(b',') {
            self.i += 1;
        }
        match self.peek() {
            Some(b']') => {
                self.i += 1;
                false
            }
            other => other.is_some(),
        }
    }

    /// Passes the string literal at the cursor (its opening quote).
    fn skip_string(&mut self) {
        let mut i = self.i + 1;
        while let Some(rest) = self.b.get(i..) {
            let Some(n) = rest.iter().position(|&c| STRING_STOP[c as usize]) else {
                break;
            };
            i += n;
            match rest[n] {
                b'"' => {
                    self.i = i + 1;
                    return;
                }
                b'\\' => i += 2,
                _ => i += 1,
            }
        }
        self.i = self.b.len();
    }

    /// Passes the number or literal at the cursor.
    fn skip_scalar(&mut self) {
        let run = self.b[self.i..]
            .iter()
            .take_while(|&&c| is_scalar(c))
            .count();
        self.i += run;
    }

    /// Passes the next value, whatever it is, and answers its text.
    pub fn skip(&mut self) -> Result<Raw<'a>, TypeError> {
        let start = match self.peek() {
            Some(_) => self.i,
            None => return Err(malformed()),
        };
        match self.b[start] {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    let rest = self.b.get(self.i..).unwrap_or_default();
                    let Some(n) = rest.iter().position(|&c| STRUCTURAL[c as usize]) else {
                        return Err(malformed());
                    };
                    self.i += n;
                    match rest[n] {
                        b'"' => {
                            self.skip_string();
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        _ => {
                            depth = depth.checked_sub(1).ok_or_else(malformed)?;
                            if depth == 0 {
                                self.i += 1;
                                break;
                            }
                        }
                    }
                    self.i += 1;
                }
            }
            _ => {
                self.skip_scalar();
                if self.i == start {
                    return Err(malformed());
                }
            }
        }
        Ok(Raw(&self.b[start..self.i]))
    }

    /// Takes the next value as Go's `any` and answers the text Go writes for it (see the module's
    /// notes); an error for a number out of float64's range, as Go's.
    ///
    /// Values are written as they come; an object whose keys do not (out of order, or repeated) is
    /// noted where it was written, with the order Go writes its pairs in, and the text is put in that
    /// order once, at the end (`reordered`), so that however deep such objects nest, each byte is
    /// moved at most twice.
    fn any(&mut self, capacity: usize) -> Result<Vec<u8>, TypeError> {
        let mut out = Vec::with_capacity(capacity);
        let mut open: Vec<Open> = Vec::new();
        let mut pairs: Vec<Pair> = Vec::new();
        let mut reorders: Vec<Reorder> = Vec::new();
        let mut order: Vec<(usize, usize)> = Vec::new();
        let mut scratch = String::new();
        loop {
            match self.peek() {
                Some(b'{') => {
                    self.i += 1;
                    open.push(Open::Object {
                        start: out.len(),
                        from: pairs.len(),
                        sorted: true,
                    });
                    out.push(b'{');
                }
                Some(b'[') => {
                    self.i += 1;
                    open.push(Open::Array);
                    out.push(b'[');
                }
                Some(b'"') => {
                    let s = self.string().ok_or_else(malformed)?;
                    write_text(&mut out, s, &mut scratch);
                }
                Some(b't' | b'f') => {
                    let b = self.boolean().ok_or_else(malformed)?;
                    out.extend_from_slice(if b { b"true" } else { b"false" });
                }
                Some(b'n') if self.null() => out.extend_from_slice(b"null"),
                _ => {
                    let n = self.number().ok_or_else(malformed)?;
                    if small_integer(n) {
                        out.extend_from_slice(n.as_bytes());
                    } else {
                        write_f64(&mut out, float(n).ok_or_else(|| out_of_float_range(n))?);
                    }
                }
            }
            // On to the next value to write, closing the containers that end here. A container's
            // first value follows its opening bracket, the others a comma.
            loop {
                match open.last_mut() {
                    None if reorders.is_empty() => return Ok(out),
                    None => return Ok(reordered(&out, &mut reorders, &order)),
                    Some(Open::Array) => {
                        if self.item() {
                            if out.last() != Some(&b'[') {
                                out.push(b',');
                            }
                            break;
                        }
                        out.push(b']');
                    }
                    Some(Open::Object {
                        start,
                        from,
                        sorted,
                    }) => {
                        if let Some(key) = self.key()? {
                            if out.last() != Some(&b'{') {
                                out.push(b',');
                            }
                            let at = out.len();
                            write_text(&mut out, key, &mut scratch);
                            let pair = Pair {
                                key: at,
                                colon: out.len(),
                            };
                            out.push(b':');
                            if let Some(&before) =
                                pairs.last().filter(|_| *sorted && pairs.len() > *from)
                            {
                                *sorted = written_key(&out, before) < written_key(&out, pair);
                            }
                            pairs.push(pair);
                            break;
                        }
                        out.push(b'}');
                        if !*sorted {
                            let from_order = order.len();
                            go_order(&out, &pairs[*from..], &mut order);
                            reorders.push(Reorder {
                                start: *start,
                                end: out.len(),
                                from: from_order,
                                to: order.len(),
                            });
                        }
                        pairs.truncate(*from);
                    }
                }
                open.pop();
            }
        }
    }

    /// Whether the next value is one Go takes as `any` (every number in it fits a float64); passes it.
    fn any_fits(&mut self) -> Result<(), TypeError> {
        let value = self.skip()?.0;
        let mut i = 0;
        while let Some(&c) = value.get(i) {
            match c {
                b'"' => {
                    let mut inner = Reader { b: value, i };
                    inner.skip_string();
                    i = inner.i;
                }
                b'-' | b'0'..=b'9' => {
                    let run = value[i..].iter().take_while(|&&c| is_scalar(c)).count();
                    let n = std::str::from_utf8(&value[i..i + run]).unwrap_or_default();
                    if !small_integer(n) && float(n).is_none() {
                        return Err(out_of_float_range(n));
                    }
                    i += run;
                }
                _ => i += 1,
            }
        }
        Ok(())
    }
}

/// Appends a string as Go writes it.
fn write_text(out: &mut Vec<u8>, s: Str<'_>, scratch: &mut String) {
    match s.verbatim() {
        Some(text) => write_str(out, text),
        None => {
            scratch.clear();
            s.unquote_into(scratch);
            write_str(out, scratch);
        }
    }
}

/// The text of a key `Reader::any` wrote (what Go sorts map keys by).
fn written_key(out: &[u8], pair: Pair) -> Cow<'_, str> {
    let quoted = out
        .get(pair.key + 1..pair.colon.saturating_sub(1))
        .unwrap_or_default();
    Str(quoted).text()
}

/// Appends to `order` the pairs of an object written at `pairs` (its last pair ends before its
/// closing brace at the end of `out`) in the order Go writes a map: by their keys' bytes, the last of
/// duplicate keys kept.
fn go_order(out: &[u8], pairs: &[Pair], order: &mut Vec<(usize, usize)>) {
    let close = out.len().saturating_sub(1);
    let mut entries: Vec<(Cow<'_, str>, usize, usize)> = pairs
        .iter()
        .enumerate()
        .map(|(n, &pair)| {
            // A pair runs to the comma before the next key.
            let stop = pairs
                .get(n + 1)
                .map_or(close, |next| next.key.saturating_sub(1));
            (written_key(out, pair), pair.key, stop)
        })
        .collect();
    // Stable: of equal keys, the last written stays last.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (n, (key, start, stop)) in entries.iter().enumerate() {
        if entries.get(n + 1).is_none_or(|(next, ..)| next != key) {
            order.push((*start, *stop));
        }
    }
}

/// What `Reader::any` wrote (`out`), with the objects in `reorders` put in their order, in one pass
/// (a stack of its own, however deep they nest).
fn reordered(out: &[u8], reorders: &mut [Reorder], order: &[(usize, usize)]) -> Vec<u8> {
    /// What is left to write: the text `out[pos..end]` (the objects in it from `reorders[next]` on
    /// in their order), or the pairs of `reorders[object]` from its `n`th on.
    enum Task {
        Text { pos: usize, end: usize, next: usize },
        Pairs { object: usize, n: usize },
    }
    // Noted as they closed, inner first; by where they begin, an object's nested ones follow it.
    reorders.sort_unstable_by_key(|r| r.start);
    let first_in = |pos: usize| reorders.partition_point(|r| r.start < pos);
    let mut text = Vec::with_capacity(out.len());
    let mut tasks = vec![Task::Text {
        pos: 0,
        end: out.len(),
        next: 0,
    }];
    while let Some(task) = tasks.last_mut() {
        match task {
            Task::Text { pos, end, next } => match reorders.get(*next).filter(|r| r.start < *end) {
                Some(r) => {
                    text.extend_from_slice(out.get(*pos..r.start).unwrap_or_default());
                    text.push(b'{');
                    let object = *next;
                    *pos = r.end;
                    *next = first_in(r.end);
                    tasks.push(Task::Pairs { object, n: 0 });
                }
                None => {
                    text.extend_from_slice(out.get(*pos..*end).unwrap_or_default());
                    tasks.pop();
                }
            },
            Task::Pairs { object, n } => {
                let pairs = reorders
                    .get(*object)
                    .and_then(|r| order.get(r.from..r.to))
                    .unwrap_or_default();
                match pairs.get(*n) {
                    Some(&(pos, end)) => {
                        if *n > 0 {
                            text.push(b',');
                        }
                        *n += 1;
                        tasks.push(Task::Text {
                            pos,
                            end,
                            next: first_in(pos),
                        });
                    }
                    None => {
                        text.push(b'}');
                        tasks.pop();
                    }
                }
            }
        }
    }
    text
}

// ---------------------------------------------------------------- decoding into Go's types

/// Go's `Unmarshal` of the next value of a checked document into an existing value of this type.
pub trait Decode {
    /// Decodes into `self`. After an error the value is partly decoded and the reader is anywhere:
    /// both are dropped.
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError>;
    /// Whether the next value would decode into this type (the same answer as `decode`), keeping
    /// nothing of it.
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError>;
}

/// Go's `Marshal` of this type; an error only where Go refuses to write (a time it cannot show).
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String>;
    /// Go's `omitempty` test.
    fn is_empty(&self) -> bool;
}

impl Decode for String {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if !r.null() {
            let s = r.string().ok_or_else(|| r.mismatch("string"))?;
            *self = s.text().into_owned();
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if !r.null() {
            r.string().ok_or_else(|| r.mismatch("string"))?;
        }
        Ok(())
    }
}

impl Encode for String {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        write_str(out, self);
        Ok(())
    }
    fn is_empty(&self) -> bool {
        str::is_empty(self)
    }
}

/// An int64 from the next value: `None` for `null`.
fn read_i64(r: &mut Reader<'_>) -> Result<Option<i64>, TypeError> {
    if r.null() {
        return Ok(None);
    }
    let n = r.number().ok_or_else(|| r.mismatch("int64"))?;
    n.parse()
        .map(Some)
        .map_err(|_| TypeError(format!("cannot unmarshal number {} into int64", bounded(n))))
}

impl Decode for i64 {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if let Some(n) = read_i64(r)? {
            *self = n;
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        read_i64(r).map(drop)
    }
}

impl Encode for i64 {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(self.to_string().as_bytes());
        Ok(())
    }
    fn is_empty(&self) -> bool {
        *self == 0
    }
}

/// A bool from the next value: `None` for `null`.
fn read_bool(r: &mut Reader<'_>) -> Result<Option<bool>, TypeError> {
    if r.null() {
        return Ok(None);
    }
    r.boolean().map(Some).ok_or_else(|| r.mismatch("bool"))
}

impl Decode for bool {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if let Some(b) = read_bool(r)? {
            *self = b;
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        read_bool(r).map(drop)
    }
}

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(if *self { b"true" } else { b"false" });
        Ok(())
    }
    fn is_empty(&self) -> bool {
        !*self
    }
}

/// A time from the next value: `None` for `null`.
fn read_time(r: &mut Reader<'_>) -> Result<Option<GoTime>, TypeError> {
    if r.null() {
        return Ok(None);
    }
    let Some(s) = r.string() else {
        return Err(TypeError(
            "Time.UnmarshalJSON: input is not a JSON string".into(),
        ));
    };
    // Go parses the literal's raw bytes: an escaped or non-UTF-8 literal is no time.
    let text = s
        .verbatim()
        .ok_or_else(|| TypeError("parsing time: escaped text".into()))?;
    GoTime::parse(text)
        .map(Some)
        .ok_or_else(|| TypeError(format!("parsing time {:?}", bounded(text))))
}

impl Decode for GoTime {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if let Some(t) = read_time(r)? {
            *self = t;
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        read_time(r).map(drop)
    }
}

impl Encode for GoTime {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        self.write_json(out)
    }
    fn is_empty(&self) -> bool {
        false
    }
}

/// A value of Go type `any` (`interface{}`): the text Go writes for it (see the module's notes), `None`
/// for nil.
#[derive(Debug, PartialEq, Default)]
pub struct Any(Option<Box<[u8]>>);

impl Decode for Any {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            self.0 = None;
            return Ok(());
        }
        let text = if matches!(r.peek(), Some(b'{' | b'[')) {
            // Sized by the input, which Go's text rarely passes: a large value is not copied as it
            // grows.
            let raw = r.skip()?;
            raw.reader().any(raw.0.len())?
        } else {
            r.any(0)?
        };
        self.0 = Some(text.into_boxed_slice());
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        r.any_fits()
    }
}

impl Encode for Any {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        out.extend_from_slice(self.0.as_deref().unwrap_or(b"null"));
        Ok(())
    }
    fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// A Go pointer `*T`: `None` is nil.
pub type Ptr<T> = Option<Box<T>>;

impl<T: Decode + Default> Decode for Option<Box<T>> {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            *self = None;
            return Ok(());
        }
        self.get_or_insert_with(Box::default).decode(r)
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            return Ok(());
        }
        T::accepts(r)
    }
}

impl<T: Encode> Encode for Option<Box<T>> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Some(v) => v.encode(out),
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
        }
    }
    fn is_empty(&self) -> bool {
        self.is_none()
    }
}

/// A Go `map[string]V`: `None` is a nil map (`null`), `Some` of an empty one is `{}`.
#[derive(Debug, PartialEq, Default)]
pub struct GoMap<V>(pub Option<BTreeMap<String, V>>);

impl<V> GoMap<V> {
    /// An empty, non-nil map.
    pub fn empty() -> Self {
        GoMap(Some(BTreeMap::new()))
    }
}

impl<V: Decode + Default> Decode for GoMap<V> {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            self.0 = None;
            return Ok(());
        }
        if !r.object() {
            return Err(r.mismatch("map"));
        }
        let map = self.0.get_or_insert_with(BTreeMap::new);
        while let Some(key) = r.key()? {
            // Each entry starts from a zero value: entries are replaced, never merged.
            let mut elem = V::default();
            elem.decode(r)?;
            map.insert(key.text().into_owned(), elem);
        }
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            return Ok(());
        }
        if !r.object() {
            return Err(r.mismatch("map"));
        }
        while r.key()?.is_some() {
            V::accepts(r)?;
        }
        Ok(())
    }
}

impl<V: Encode> Encode for GoMap<V> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let Some(map) = &self.0 else {
            out.extend_from_slice(b"null");
            return Ok(());
        };
        out.push(b'{');
        for (i, (k, v)) in map.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_str(out, k);
            out.push(b':');
            v.encode(out)?;
        }
        out.push(b'}');
        Ok(())
    }
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(BTreeMap::is_empty)
    }
}

/// A Go slice `[]T`: `None` is nil (`null`), `Some` of an empty one is `[]`.
#[derive(Debug, PartialEq, Default)]
pub struct GoSlice<T>(pub Option<Vec<T>>);

impl<T: Decode + Default> Decode for GoSlice<T> {
    fn decode(&mut self, r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            self.0 = None;
            return Ok(());
        }
        if !r.array() {
            return Err(r.mismatch("slice"));
        }
        // Go decodes into the elements already there (a `null` element keeps one) and cuts the slice
        // to the array's length.
        let vec = self.0.get_or_insert_with(Vec::new);
        let mut len = 0;
        while r.item() {
            match vec.get_mut(len) {
                Some(elem) => elem.decode(r)?,
                None => {
                    let mut elem = T::default();
                    elem.decode(r)?;
                    vec.push(elem);
                }
            }
            len += 1;
        }
        vec.truncate(len);
        Ok(())
    }
    fn accepts(r: &mut Reader<'_>) -> Result<(), TypeError> {
        if r.null() {
            return Ok(());
        }
        if !r.array() {
            return Err(r.mismatch("slice"));
        }
        while r.item() {
            T::accepts(r)?;
        }
        Ok(())
    }
}

impl<T: Encode> Encode for GoSlice<T> {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let Some(items) = &self.0 else {
            out.extend_from_slice(b"null");
            return Ok(());
        };
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            item.encode(out)?;
        }
        out.push(b']');
        Ok(())
    }
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(Vec::is_empty)
    }
}

/// Whether an object key names a struct field tagged `tag` (ASCII, lowercase): exactly, or as Go
/// matches case-insensitively (Unicode simple folding: `K` KELVIN SIGN is `k`, `ſ` LONG S is `s`).
pub fn names_field(key: &str, tag: &str) -> bool {
    if key == tag {
        return true;
    }
    let mut tag = tag.bytes();
    for c in key.chars() {
        let folded = match c {
            '\u{212A}' => b'k',
            '\u{17F}' => b's',
            c if c.is_ascii() => (c as u8).to_ascii_lowercase(),
            _ => return false,
        };
        if tag.next() != Some(folded) {
            return false;
        }
    }
    tag.next().is_none()
}

/// The error for a struct given anything but an object or `null`.
pub fn not_an_object(go_type: &str) -> TypeError {
    TypeError(format!("cannot unmarshal a non-object into {go_type}"))
}

/// Declares a Go struct: its fields with their JSON names (`omitempty` where Go's tag says so), and
/// `Decode`/`Encode` with Go's rules for structs (each key applied in turn to the field it names, an
/// exact match first, then by `names_field`; other keys skipped; `null` leaves the struct as it is;
/// anything but an object is a type error).
macro_rules! go_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $field:ident : $ty:ty = $tag:literal $($omit:ident)? ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, PartialEq, Default)]
        pub struct $name {
            $( pub $field: $ty, )*
        }

        impl $crate::format::gojson::Decode for $name {
            fn decode(
                &mut self,
                r: &mut $crate::format::gojson::Reader<'_>,
            ) -> Result<(), $crate::format::gojson::TypeError> {
                use $crate::format::gojson::{names_field, not_an_object, Decode};
                if r.null() {
                    return Ok(());
                }
                if !r.object() {
                    return Err(not_an_object(stringify!($name)));
                }
                while let Some(key) = r.key()? {
                    let key = key.text();
                    $(
                        if key == $tag {
                            Decode::decode(&mut self.$field, r)?;
                            continue;
                        }
                    )*
                    $(
                        if names_field(&key, $tag) {
                            Decode::decode(&mut self.$field, r)?;
                            continue;
                        }
                    )*
                    r.skip()?;
                }
                Ok(())
            }

            fn accepts(
                r: &mut $crate::format::gojson::Reader<'_>,
            ) -> Result<(), $crate::format::gojson::TypeError> {
                use $crate::format::gojson::{names_field, not_an_object, Decode};
                if r.null() {
                    return Ok(());
                }
                if !r.object() {
                    return Err(not_an_object(stringify!($name)));
                }
                while let Some(key) = r.key()? {
                    let key = key.text();
                    $(
                        if key == $tag {
                            <$ty as Decode>::accepts(r)?;
                            continue;
                        }
                    )*
                    $(
                        if names_field(&key, $tag) {
                            <$ty as Decode>::accepts(r)?;
                            continue;
                        }
                    )*
                    r.skip()?;
                }
                Ok(())
            }
        }

        impl $crate::format::gojson::Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
                out.push(b'{');
                let mut first = true;
                $(
                    let omitted = go_struct!(@omit $($omit)?)
                        && $crate::format::gojson::Encode::is_empty(&self.$field);
                    if !omitted {
                        if !first {
                            out.push(b',');
                        }
                        first = false;
                        out.extend_from_slice(concat!("\"", $tag, "\":").as_bytes());
                        $crate::format::gojson::Encode::encode(&self.$field, out)?;
                    }
                )*
                let _ = first;
                out.push(b'}');
                Ok(())
            }
            fn is_empty(&self) -> bool {
                false
            }
        }
    };
    (@omit omitempty) => { true };
    (@omit) => { false };
}
pub(crate) use go_struct;

// ---------------------------------------------------------------- writing

/// Appends `s` as Go writes a string: `"`, `\` and control characters escaped (`\b \f \n \r \t`, the
/// rest `\u00XX`), and `<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let escaped: Option<&[u8]> = match c {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '\u{8}' => Some(b"\\b"),
            '\u{c}' => Some(b"\\f"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' | '\u{2028}' | '\u{2029}' => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match escaped {
            Some(e) => out.extend_from_slice(e),
            None => {
                let n = c as u32;
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[((n >> shift) & 0xF) as usize]);
                }
            }
        }
        start = i + c.len_utf8();
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends a float64 as Go's encoding/json writes it: the shortest digits that read back as the same
/// number, without an exponent from 1e-6 up to 1e21, else with one (`1e+21`, `1.5e-7`).
pub fn write_f64(out: &mut Vec<u8>, f: f64) {
    // Rust's `{:e}` gives the same shortest digits: `d[.ddd]e<exp>`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let abs = f.abs();
    let mut text = String::from(sign);
    if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
        text.push_str(&digits[..1]);
        if digits.len() > 1 {
            text.push('.');
            text.push_str(&digits[1..]);
        }
        text.push('e');
        text.push(if exp < 0 { '-' } else { '+' });
        let e = exp.unsigned_abs();
        // Go writes at least two exponent digits, then drops the zero of `e-0N`.
        if e < 10 && exp > 0 {
            text.push('0');
        }
        text.push_str(&e.to_string());
    } else if exp < 0 {
        text.push_str("0.");
        text.push_str(&"0".repeat((-exp - 1) as usize));
        text.push_str(&digits);
    } else {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            text.push_str(&digits);
            text.push_str(&"0".repeat(int_len - digits.len()));
        } else {
            text.push_str(&digits[..int_len]);
            text.push('.');
            text.push_str(&digits[int_len..]);
        }
    }
    out.extend_from_slice(text.as_bytes());
}

/// Text from a document, cut short for an error message.
pub fn bounded(s: &str) -> String {
    crate::text::cut(s, 80).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_round_trip(input: &str) -> Result<String, String> {
        let mut r = check(input.as_bytes()).map_err(|e| e.to_string())?;
        let mut v = Any::default();
        v.decode(&mut r).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        v.encode(&mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// Each input read into `any` and written back by Go 1.26's encoding/json (measured with a Go
    /// program).
    #[test]
    fn numbers_read_and_write_as_go_does() {
        let cases = [
            ("1e21", "1e+21"),
            ("1e20", "100000000000000000000"),
            ("1e-7", "1e-7"),
            ("1e-6", "0.000001"),
            ("0.1", "0.1"),
            ("12345678901234567890", "12345678901234567000"),
            ("-0", "-0"),
            ("123.456", "123.456"),
            ("1.5e-10", "1.5e-10"),
            ("1e300", "1e+300"),
            ("5e-324", "5e-324"),
            ("0.000001234", "0.000001234"),
            ("100", "100"),
            ("1.0", "1"),
            ("9007199254740993", "9007199254740992"),
            ("1e-400", "0"),
            ("-1.25e+25", "-1.25e+25"),
            ("2.5E-8", "2.5e-8"),
        ];
        for (input, go) in cases {
            assert_eq!(any_round_trip(input).as_deref(), Ok(go), "{input}");
        }
        assert!(any_round_trip("1e400").unwrap_err().contains("float64"));
    }

    #[test]
    fn strings_read_and_write_as_go_does() {
        let input = "\"a\\b\\f\\u0001\\u007f<>&\\u2028\\u2029é\\n\\t\\r\\\"\\\\\"";
        assert_eq!(
            any_round_trip(input).unwrap(),
            "\"a\\b\\f\\u0001\u{7f}\\u003c\\u003e\\u0026\\u2028\\u2029é\\n\\t\\r\\\"\\\\\""
        );
        // Bytes that are not UTF-8 become U+FFFD one byte at a time, unpaired surrogates too; keys
        // alike.
        let raw = b"{\"a\xff\":\"\xe2\x82\",\"b\":\"\\ud800\\u0041\",\"c\":\"\\udc00\",\"d\":\"\\ud83d\\ude00\"}";
        let mut v = Any::default();
        v.decode(&mut check(raw).unwrap()).unwrap();
        let mut out = Vec::new();
        v.encode(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"a\u{FFFD}\":\"\u{FFFD}\u{FFFD}\",\"b\":\"\u{FFFD}A\",\"c\":\"\u{FFFD}\",\"d\":\"😀\"}"
        );
    }

    #[test]
    fn objects_keep_the_last_duplicate_and_sort_keys() {
        assert_eq!(
            any_round_trip(r#"{"b":1,"a":[true,null,{}],"b":2}"#).unwrap(),
            r#"{"a":[true,null,{}],"b":2}"#
        );
        // Nested objects out of order inside objects out of order, and in a duplicate that is dropped;
        // keys sort by their bytes, not by how they are escaped.
        assert_eq!(
            any_round_trip(
                r#"{"z":{"y":1,"x":{"q":[{"d":0,"c":0}],"p":2}},"a":{"k":{"j":1,"i":2}},"z":{"n":{"m":1,"l":2},"b":1},"\u003c":1,"\"":2,"a\u00e9":3,"ab":4,"\u00e9":5}"#
            )
            .unwrap(),
            r#"{"\"":2,"\u003c":1,"a":{"k":{"i":2,"j":1}},"ab":4,"aé":3,"z":{"b":1,"n":{"l":2,"m":1}},"é":5}"#
        );
        assert_eq!(
            any_round_trip(
                r#"[{"b":[{"d":1,"c":2}],"a":0},{"a":1},{"b":{},"b":[],"a":{"c":1,"c":2}}]"#
            )
            .unwrap(),
            r#"[{"a":0,"b":[{"c":2,"d":1}]},{"a":1},{"a":{"c":2},"b":[]}]"#
        );
    }

    /// Objects out of order nested as deep as Go allows are written in one pass, on a small stack.
    #[test]
    fn any_nested_as_deep_as_go_allows_is_written_on_a_small_stack() {
        let depth = MAX_DEPTH - 1;
        let input = r#"{"b":0,"a":"#.repeat(depth) + "[]" + &"}".repeat(depth);
        let expected = r#"{"a":"#.repeat(depth) + "[]" + &r#","b":0}"#.repeat(depth);
        let written = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || any_round_trip(&input))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(written.unwrap(), expected);
    }

    /// A value kept aside (`skip`) is the value's exact text, whatever it holds.
    #[test]
    fn skipped_values_are_their_text() {
        let doc = br#"{"a" : [1, "]}\"", {"b":[]}] , "c":-1.5e3,"d":"x\\","e":true}"#;
        let mut r = check(doc).unwrap();
        assert!(r.object());
        let mut seen = Vec::new();
        while let Some(key) = r.key().unwrap() {
            seen.push((key.text().into_owned(), r.skip().unwrap().0.to_vec()));
        }
        let text = |s: &str| s.as_bytes().to_vec();
        assert_eq!(
            seen,
            [
                ("a".into(), text(r#"[1, "]}\"", {"b":[]}]"#)),
                ("c".into(), text("-1.5e3")),
                ("d".into(), text(r#""x\\""#)),
                ("e".into(), text("true")),
            ]
        );
    }

    /// `accepts` answers as `decode` does, for every type and every kind of value.
    #[test]
    fn accepting_agrees_with_decoding() {
        fn agree<T: Decode + Default>(input: &str) {
            let accepted = T::accepts(&mut check(input.as_bytes()).unwrap());
            let decoded = T::default().decode(&mut check(input.as_bytes()).unwrap());
            assert_eq!(accepted.is_ok(), decoded.is_ok(), "{input}: {decoded:?}");
        }
        for input in [
            "null",
            "true",
            "0",
            "-1",
            "1.5",
            "1e400",
            "\"x\"",
            "\"2026-03-18T09:14:03Z\"",
            "\"2026-03-18T09:14:03\\u005a\"",
            "[]",
            "[null]",
            "[1e400]",
            "[\"a\",1]",
            "{}",
            r#"{"a":1e400}"#,
            r#"{"a":"b"}"#,
            r#"{"a":null}"#,
            r#"{"id":1}"#,
            r#"{"ID":"x","l":[1]}"#,
            r#"{"p":{"n":1.5}}"#,
            r#"{"p":null,"m":{"a":"1e400"}}"#,
            r#"["1e999",{"k":-0}]"#,
        ] {
            agree::<String>(input);
            agree::<i64>(input);
            agree::<bool>(input);
            agree::<GoTime>(input);
            agree::<Any>(input);
            agree::<GoMap<String>>(input);
            agree::<GoSlice<Any>>(input);
            agree::<Ptr<Probe>>(input);
        }
    }

    #[test]
    fn only_go_json_is_accepted() {
        for bad in [
            "",
            " ",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            ".5",
            "+1",
            "-",
            "1e",
            "tru",
            "nul",
            "\"\\x\"",
            "\"\\u12\"",
            "\"a\nb\"",
            "{a:1}",
            "[1] 2",
            "\u{feff}{}",
            "NaN",
        ] {
            assert!(check(bad.as_bytes()).is_err(), "{bad:?}");
        }
        for good in [
            " {} ",
            "[]",
            "0",
            "-0.5e-3",
            "\"\"",
            "\"\\/\"",
            "[[[]]]",
            "\"\u{7f}\"",
        ] {
            assert!(check(good.as_bytes()).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn nesting_is_bounded_as_go_bounds_it() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(check(deep(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            check(deep(MAX_DEPTH + 1).as_bytes()).err().map(|e| e.what),
            Some("exceeded max depth")
        );
        let objects = |n: usize| "{\"a\":".repeat(n) + "null" + &"}".repeat(n);
        assert!(check(objects(MAX_DEPTH).as_bytes()).is_ok());
        assert!(check(objects(MAX_DEPTH + 1).as_bytes()).is_err());
    }

    #[test]
    fn field_names_fold_as_go_folds_them() {
        assert!(names_field("id", "id"));
        assert!(names_field("ID", "id"));
        assert!(names_field("Id", "id"));
        assert!(names_field("\u{212A}ind", "kind"));
        assert!(names_field("\u{17F}tatus", "status"));
        assert!(!names_field("\u{131}d", "id"));
        assert!(!names_field("i", "id"));
        assert!(!names_field("idd", "id"));
        assert!(!names_field("i_d", "id"));
    }

    go_struct! {
        pub struct Probe {
            id: String = "id",
            kind: String = "kind",
            m: GoMap<String> = "m",
            l: GoSlice<String> = "l",
            p: Ptr<Probe> = "p" omitempty,
            n: i64 = "n" omitempty,
        }
    }

    fn probe(input: &str) -> Result<String, String> {
        let mut p = Probe::default();
        let mut r = check(input.as_bytes()).map_err(|e| e.to_string())?;
        let accepted = Probe::accepts(&mut check(input.as_bytes()).unwrap());
        let decoded = p.decode(&mut r);
        assert_eq!(accepted.is_ok(), decoded.is_ok(), "{input}");
        decoded.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        p.encode(&mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// Go 1.26's answers for the same struct (measured with a Go program).
    #[test]
    fn structs_decode_and_encode_as_go_does() {
        let empty = r#"{"id":"","kind":"","m":null,"l":null}"#;
        assert_eq!(probe(r#"{"ıd":"x"}"#).unwrap(), empty);
        assert_eq!(
            probe(r#"{"KIND":"K"}"#).unwrap(),
            r#"{"id":"","kind":"K","m":null,"l":null}"#
        );
        assert_eq!(
            probe(r#"{"m":{"a":null},"l":[null,"b"]}"#).unwrap(),
            r#"{"id":"","kind":"","m":{"a":""},"l":["","b"]}"#
        );
        assert_eq!(
            probe(r#"{"l":["a","b"],"l":[null]}"#).unwrap(),
            r#"{"id":"","kind":"","m":null,"l":["a"]}"#
        );
        assert_eq!(probe(r#"{"m":null,"l":null}"#).unwrap(), empty);
        assert_eq!(
            probe(r#"{"m":{},"l":[]}"#).unwrap(),
            r#"{"id":"","kind":"","m":{},"l":[]}"#
        );
        assert_eq!(
            probe(r#"{"p":{"id":"a"},"p":{"kind":"b"}}"#).unwrap(),
            r#"{"id":"","kind":"","m":null,"l":null,"p":{"id":"a","kind":"b","m":null,"l":null}}"#
        );
        assert_eq!(probe(r#"{"n":-0}"#).unwrap(), empty);
        assert_eq!(probe("null").unwrap(), empty);
        for refused in [
            r#"{"n":1.0}"#,
            r#"{"n":"1"}"#,
            r#"{"n":1e2}"#,
            r#"{"id":1}"#,
            "[]",
        ] {
            assert!(probe(refused).is_err(), "{refused}");
        }
    }
}
