//! JSON as the engine's Go runtime reads and writes it (`encoding/json`), so that a state folded here is
//! byte for byte what the engine answers.
//!
//! Reading: `parse` accepts exactly what Go's scanner accepts (nesting up to 10,000 levels; bytes that
//! are not UTF-8 inside strings are taken, and become U+FFFD one byte at a time, as do unpaired UTF-16
//! surrogate escapes). `Decode` fills a value in place with Go's `Unmarshal` rules: unknown fields are
//! ignored, field names match exactly or case-insensitively (Unicode simple folding), `null` leaves a
//! string, number, bool, time or struct as it was and sets a pointer, map, slice or interface to nil,
//! objects decoded into an existing struct or map merge into it, and any type mismatch is an error.
//!
//! Writing: `Encode` writes Go's `Marshal` output: struct fields in declaration order with `omitempty`,
//! map keys sorted by their bytes, `<`, `>`, `&`, U+2028 and U+2029 escaped, numbers held by an
//! interface as float64 in Go's shortest form (`1e+21`, `1e-7`, `100`), nil as `null`.

use std::collections::BTreeMap;

use crate::format::gotime::GoTime;

/// Go's scanner refuses deeper nesting.
pub const MAX_DEPTH: usize = 10_000;

/// A parsed JSON value, objects with their keys in order (duplicates kept: Go applies them in turn).
#[derive(Debug, PartialEq, Default)]
pub enum Json {
    #[default]
    Null,
    Bool(bool),
    /// The number's text as written.
    Number(Box<str>),
    Str(JsonStr),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

#[derive(Debug, PartialEq)]
pub struct JsonStr {
    pub text: String,
    /// The literal held no escape and only UTF-8: `text` is its exact bytes (what Go's time parser
    /// reads, since `Time.UnmarshalJSON` does not unescape).
    pub verbatim: bool,
}

impl Json {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "bool",
            Json::Number(_) => "number",
            Json::Str(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }
}

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

enum Open {
    Array(Vec<Json>),
    Object(Vec<(String, Json)>, Option<String>),
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn error(&self, what: &'static str) -> SyntaxError {
        SyntaxError { at: self.i, what }
    }

    fn skip_space(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &'static [u8], value: Json) -> Result<Json, SyntaxError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(value)
        } else {
            Err(self.error("invalid literal"))
        }
    }

    fn number(&mut self) -> Result<Json, SyntaxError> {
        let start = self.i;
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
        // Only ASCII was consumed.
        let text = std::str::from_utf8(&self.b[start..self.i]).unwrap_or("0");
        Ok(Json::Number(text.into()))
    }

    fn hex4(&self, at: usize) -> Option<u32> {
        let h = self.b.get(at..at + 4)?;
        let s = std::str::from_utf8(h).ok()?;
        if !h.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    }

    /// A string literal (the cursor on its opening quote), unquoted as Go's `unquote` does.
    fn string(&mut self) -> Result<JsonStr, SyntaxError> {
        self.i += 1;
        let start = self.i;
        // Fast path: no escape, no control byte, valid UTF-8 up to the closing quote.
        let end = self.b[start..]
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .map(|n| start + n);
        if let Some(end) = end {
            if self.b[end] == b'"' {
                if let Ok(text) = std::str::from_utf8(&self.b[start..end]) {
                    self.i = end + 1;
                    return Ok(JsonStr {
                        text: text.to_string(),
                        verbatim: true,
                    });
                }
            }
        }
        let mut out = String::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                return Err(self.error("unterminated string"));
            };
            match c {
                b'"' => {
                    self.i += 1;
                    return Ok(JsonStr {
                        text: out,
                        verbatim: false,
                    });
                }
                0..=0x1f => return Err(self.error("control character in string")),
                b'\\' => self.escape(&mut out)?,
                0x20..=0x7f => {
                    out.push(c as char);
                    self.i += 1;
                }
                _ => {
                    let (ch, n) = decode_rune(&self.b[self.i..]);
                    out.push(ch);
                    self.i += n;
                }
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), SyntaxError> {
        let Some(&e) = self.b.get(self.i + 1) else {
            return Err(self.error("unterminated string"));
        };
        self.i += 2;
        let c = match e {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let r = self
                    .hex4(self.i)
                    .ok_or_else(|| self.error("invalid \\u escape"))?;
                self.i += 4;
                if (0xD800..0xE000).contains(&r) {
                    // A high surrogate followed by a low one is one character; anything else is U+FFFD,
                    // and the escape after it is read on its own.
                    let low = (self.b.get(self.i..self.i + 2) == Some(b"\\u"))
                        .then(|| self.hex4(self.i + 2))
                        .flatten();
                    match low {
                        Some(lo) if r < 0xDC00 && (0xDC00..0xE000).contains(&lo) => {
                            self.i += 6;
                            char::from_u32(0x10000 + ((r - 0xD800) << 10) + (lo - 0xDC00))
                                .unwrap_or('\u{FFFD}')
                        }
                        _ => '\u{FFFD}',
                    }
                } else {
                    char::from_u32(r).unwrap_or('\u{FFFD}')
                }
            }
            _ => return Err(self.error("invalid escape")),
        };
        out.push(c);
        Ok(())
    }

    /// One value, iteratively (nesting costs heap, not stack).
    fn document(&mut self) -> Result<Json, SyntaxError> {
        let mut open: Vec<Open> = Vec::new();
        loop {
            self.skip_space();
            let Some(&c) = self.b.get(self.i) else {
                return Err(self.error("unexpected end of JSON input"));
            };
            let mut value = match c {
                b'{' | b'[' => {
                    if open.len() >= MAX_DEPTH {
                        return Err(self.error("exceeded max depth"));
                    }
                    self.i += 1;
                    self.skip_space();
                    let close = if c == b'{' { b'}' } else { b']' };
                    if self.b.get(self.i) == Some(&close) {
                        self.i += 1;
                        if c == b'{' {
                            Json::Object(Vec::new())
                        } else {
                            Json::Array(Vec::new())
                        }
                    } else if c == b'[' {
                        open.push(Open::Array(Vec::new()));
                        continue;
                    } else {
                        let key = self.key()?;
                        open.push(Open::Object(Vec::new(), Some(key)));
                        continue;
                    }
                }
                b'"' => Json::Str(self.string()?),
                b't' => self.literal(b"true", Json::Bool(true))?,
                b'f' => self.literal(b"false", Json::Bool(false))?,
                b'n' => self.literal(b"null", Json::Null)?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return Err(self.error("invalid character looking for beginning of value")),
            };
            // Attach the finished value to its container, closing containers as they end.
            loop {
                let Some(top) = open.last_mut() else {
                    self.skip_space();
                    if self.i != self.b.len() {
                        return Err(self.error("invalid character after top-level value"));
                    }
                    return Ok(value);
                };
                self.skip_space();
                let next = self.b.get(self.i).copied();
                match top {
                    Open::Array(items) => {
                        items.push(value);
                        match next {
                            Some(b',') => {
                                self.i += 1;
                                break;
                            }
                            Some(b']') => self.i += 1,
                            _ => return Err(self.error("expected , or ] in array")),
                        }
                    }
                    Open::Object(pairs, key) => {
                        pairs.push((key.take().unwrap_or_default(), value));
                        match next {
                            Some(b',') => {
                                self.i += 1;
                                self.skip_space();
                                *key = Some(self.key()?);
                                break;
                            }
                            Some(b'}') => self.i += 1,
                            _ => return Err(self.error("expected , or } in object")),
                        }
                    }
                }
                value = match open.pop() {
                    Some(Open::Array(items)) => Json::Array(items),
                    Some(Open::Object(pairs, _)) => Json::Object(pairs),
                    None => unreachable_value(),
                };
            }
        }
    }

    /// An object key and its colon.
    fn key(&mut self) -> Result<String, SyntaxError> {
        if self.b.get(self.i) != Some(&b'"') {
            return Err(self.error("expected string for object key"));
        }
        let key = self.string()?.text;
        self.skip_space();
        if self.b.get(self.i) != Some(&b':') {
            return Err(self.error("expected : after object key"));
        }
        self.i += 1;
        Ok(key)
    }
}

/// `open.pop()` after `open.last_mut()` returned a container cannot be `None`.
fn unreachable_value() -> Json {
    Json::Null
}

/// One UTF-8 character at the start of `b` (not empty), as Go's `utf8.DecodeRune`: an invalid or
/// truncated sequence is U+FFFD of one byte.
fn decode_rune(b: &[u8]) -> (char, usize) {
    let want = match b[0] {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return ('\u{FFFD}', 1),
    };
    match b.get(..want).map(std::str::from_utf8) {
        Some(Ok(s)) => (s.chars().next().unwrap_or('\u{FFFD}'), want),
        _ => ('\u{FFFD}', 1),
    }
}

/// Parses one JSON document as Go does.
pub fn parse(bytes: &[u8]) -> Result<Json, SyntaxError> {
    Parser { b: bytes, i: 0 }.document()
}

// ---------------------------------------------------------------- decoding into Go's types

/// Nested values are taken apart with a stack of their own, so dropping one 10,000 levels deep needs no
/// more thread stack than dropping a flat one.
impl Drop for Json {
    fn drop(&mut self) {
        let mut nested = Vec::new();
        detach(self, &mut nested);
        while let Some(mut value) = nested.pop() {
            detach(&mut value, &mut nested);
        }
    }
}

/// Moves the children of `value` (if any) onto `out`, leaving it flat.
fn detach(value: &mut Json, out: &mut Vec<Json>) {
    match value {
        Json::Array(items) => out.append(items),
        Json::Object(pairs) => out.extend(std::mem::take(pairs).into_iter().map(|(_, v)| v)),
        _ => {}
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

fn mismatch(v: &Json, go_type: &str) -> TypeError {
    TypeError(format!("cannot unmarshal {} into {go_type}", v.kind()))
}

/// Go's `Unmarshal` into an existing value of this type, taking the parsed value apart.
pub trait Decode {
    fn decode(&mut self, v: Json) -> Result<(), TypeError>;
}

/// Go's `Marshal` of this type; an error only where Go refuses to write (a time it cannot show).
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String>;
    /// Go's `omitempty` test.
    fn is_empty(&self) -> bool;
}

impl Decode for String {
    fn decode(&mut self, mut v: Json) -> Result<(), TypeError> {
        match &mut v {
            Json::Null => Ok(()),
            Json::Str(s) => {
                *self = std::mem::take(&mut s.text);
                Ok(())
            }
            _ => Err(mismatch(&v, "string")),
        }
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

impl Decode for i64 {
    fn decode(&mut self, v: Json) -> Result<(), TypeError> {
        match &v {
            Json::Null => Ok(()),
            Json::Number(n) => {
                *self = n.parse().map_err(|_| {
                    TypeError(format!("cannot unmarshal number {} into int64", bounded(n)))
                })?;
                Ok(())
            }
            _ => Err(mismatch(&v, "int64")),
        }
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

impl Decode for bool {
    fn decode(&mut self, v: Json) -> Result<(), TypeError> {
        match &v {
            Json::Null => Ok(()),
            Json::Bool(b) => {
                *self = *b;
                Ok(())
            }
            _ => Err(mismatch(&v, "bool")),
        }
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

impl Decode for GoTime {
    fn decode(&mut self, v: Json) -> Result<(), TypeError> {
        match &v {
            Json::Null => Ok(()),
            // Go parses the literal's raw bytes: an escaped or non-UTF-8 literal is no time.
            Json::Str(s) if s.verbatim => {
                *self = GoTime::parse(&s.text)
                    .ok_or_else(|| TypeError(format!("parsing time {:?}", bounded(&s.text))))?;
                Ok(())
            }
            Json::Str(_) => Err(TypeError("parsing time: escaped text".into())),
            _ => Err(TypeError(
                "Time.UnmarshalJSON: input is not a JSON string".into(),
            )),
        }
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

/// A value of Go type `any` (`interface{}`): the parsed value, proven to be one `Unmarshal` accepts
/// (every number fits a float64). Go would hold numbers as float64 and objects as maps; that shows
/// when it is written (`Encode`): numbers in Go's float64 form, an object's keys sorted, the last of
/// duplicate keys kept.
#[derive(Debug, PartialEq, Default)]
pub struct Any(pub Json);

/// A JSON number as the float64 Go reads it into; `None` where Go reports it out of range.
fn float(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|f| f.is_finite())
}

impl Decode for Any {
    fn decode(&mut self, v: Json) -> Result<(), TypeError> {
        let mut pending = vec![&v];
        while let Some(value) = pending.pop() {
            match value {
                Json::Number(n) if float(n).is_none() => {
                    return Err(TypeError(format!(
                        "cannot unmarshal number {} into float64",
                        bounded(n)
                    )))
                }
                Json::Array(items) => pending.extend(items),
                Json::Object(pairs) => pending.extend(pairs.iter().map(|(_, v)| v)),
                _ => {}
            }
        }
        self.0 = v;
        Ok(())
    }
}

/// What is left to write of a value being written by `Any::encode`.
enum Writing<'a> {
    Items(std::slice::Iter<'a, Json>),
    Pairs(std::vec::IntoIter<(&'a str, &'a Json)>),
}

impl Encode for Any {
    /// Writes iteratively (a stack of open arrays and objects), however deep the value.
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        let mut open: Vec<(Writing, bool)> = Vec::new();
        let mut next = Some(&self.0);
        loop {
            if let Some(value) = next.take() {
                match value {
                    Json::Null => out.extend_from_slice(b"null"),
                    Json::Bool(b) => b.encode(out)?,
                    Json::Number(n) => write_f64(out, float(n).unwrap_or(0.0)),
                    Json::Str(s) => write_str(out, &s.text),
                    Json::Array(items) => {
                        out.push(b'[');
                        open.push((Writing::Items(items.iter()), true));
                    }
                    Json::Object(pairs) => {
                        // A Go map: the last of duplicate keys, in byte order.
                        let map: BTreeMap<&str, &Json> =
                            pairs.iter().map(|(k, v)| (k.as_str(), v)).collect();
                        out.push(b'{');
                        let sorted: Vec<(&str, &Json)> = map.into_iter().collect();
                        open.push((Writing::Pairs(sorted.into_iter()), true));
                    }
                }
            }
            let Some((container, first)) = open.last_mut() else {
                return Ok(());
            };
            let separator = !*first;
            *first = false;
            match container {
                Writing::Items(items) => match items.next() {
                    Some(item) => {
                        if separator {
                            out.push(b',');
                        }
                        next = Some(item);
                    }
                    None => {
                        out.push(b']');
                        open.pop();
                    }
                },
                Writing::Pairs(pairs) => match pairs.next() {
                    Some((key, value)) => {
                        if separator {
                            out.push(b',');
                        }
                        write_str(out, key);
                        out.push(b':');
                        next = Some(value);
                    }
                    None => {
                        out.push(b'}');
                        open.pop();
                    }
                },
            }
        }
    }
    fn is_empty(&self) -> bool {
        matches!(self.0, Json::Null)
    }
}

/// A Go pointer `*T`: `None` is nil.
pub type Ptr<T> = Option<Box<T>>;

impl<T: Decode + Default> Decode for Option<Box<T>> {
    fn decode(&mut self, v: Json) -> Result<(), TypeError> {
        if v == Json::Null {
            *self = None;
            return Ok(());
        }
        self.get_or_insert_with(Box::default).decode(v)
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
    fn decode(&mut self, mut v: Json) -> Result<(), TypeError> {
        match &mut v {
            Json::Null => {
                self.0 = None;
                Ok(())
            }
            Json::Object(pairs) => {
                let map = self.0.get_or_insert_with(BTreeMap::new);
                for (k, v) in std::mem::take(pairs) {
                    // Each entry starts from a zero value: entries are replaced, never merged.
                    let mut elem = V::default();
                    elem.decode(v)?;
                    map.insert(k, elem);
                }
                Ok(())
            }
            _ => Err(mismatch(&v, "map")),
        }
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
    fn decode(&mut self, mut v: Json) -> Result<(), TypeError> {
        match &mut v {
            Json::Null => {
                self.0 = None;
                Ok(())
            }
            Json::Array(items) => {
                // Go decodes into the elements already there (a `null` element keeps one) and cuts
                // the slice to the array's length.
                let items = std::mem::take(items);
                let len = items.len();
                let vec = self.0.get_or_insert_with(Vec::new);
                for (i, item) in items.into_iter().enumerate() {
                    if i < vec.len() {
                        vec[i].decode(item)?;
                    } else {
                        let mut elem = T::default();
                        elem.decode(item)?;
                        vec.push(elem);
                    }
                }
                vec.truncate(len);
                Ok(())
            }
            _ => Err(mismatch(&v, "slice")),
        }
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

/// Declares a Go struct: its fields with their JSON names (`omitempty` where Go's tag says so), and
/// `Decode`/`Encode` with Go's rules for structs (fields matched by `names_field`, an exact match
/// first; `null` leaves the struct as it is; anything but an object is a type error).
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
                mut v: $crate::format::gojson::Json,
            ) -> Result<(), $crate::format::gojson::TypeError> {
                use $crate::format::gojson::{names_field, Json, TypeError};
                let pairs = match &mut v {
                    Json::Null => return Ok(()),
                    Json::Object(pairs) => std::mem::take(pairs),
                    _ => {
                        return Err(TypeError(format!(
                            "cannot unmarshal a non-object into {}",
                            stringify!($name)
                        )))
                    }
                };
                for (key, value) in pairs {
                    $(
                        if key == $tag {
                            $crate::format::gojson::Decode::decode(&mut self.$field, value)?;
                            continue;
                        }
                    )*
                    $(
                        if names_field(&key, $tag) {
                            $crate::format::gojson::Decode::decode(&mut self.$field, value)?;
                            continue;
                        }
                    )*
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
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(MAX).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any_round_trip(input: &str) -> Result<String, String> {
        let json = parse(input.as_bytes()).map_err(|e| e.to_string())?;
        let mut v = Any::default();
        v.decode(json).map_err(|e| e.to_string())?;
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
        v.decode(parse(raw).unwrap()).unwrap();
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
            assert!(parse(bad.as_bytes()).is_err(), "{bad:?}");
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
            assert!(parse(good.as_bytes()).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn nesting_is_bounded_as_go_bounds_it() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        assert!(parse(deep(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            parse(deep(MAX_DEPTH + 1).as_bytes()).unwrap_err().what,
            "exceeded max depth"
        );
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
        p.decode(parse(input.as_bytes()).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
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
