//! Reading a checked document once, front to back, into the types it goes into: no tree.

use super::*;

/// A document `check` accepted (or a value of one), read front to back: each value is taken by the
/// `Decode` of its type, or skipped. Its syntax is not checked again; should it not be what `check`
/// accepts, reading stops with an error (never a panic, never a loop).
pub struct Reader<'a> {
    pub(super) b: &'a [u8],
    pub(super) i: usize,
}

/// A value of a checked document kept as its text, to be read later (`reader`).
#[derive(Clone, Copy)]
pub struct Raw<'a>(pub(super) &'a [u8]);

impl<'a> Raw<'a> {
    /// A reader of the value.
    pub fn reader(self) -> Reader<'a> {
        Reader { b: self.0, i: 0 }
    }
}

/// A string literal of a checked document: its bytes between the quotes, escapes and all.
#[derive(Clone, Copy)]
pub struct Str<'a>(pub(super) &'a [u8]);

impl<'a> Str<'a> {
    /// The literal's bytes, where they are its text (no escape, only UTF-8): what Go's time parser
    /// reads, since `Time.UnmarshalJSON` does not unquote.
    pub(super) fn verbatim(self) -> Option<&'a str> {
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

    pub(super) fn unquote_into(self, out: &mut String) {
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
pub(super) fn push_utf8(out: &mut String, mut b: &[u8]) {
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
pub(super) fn unescape(b: &[u8], i: usize, out: &mut String) -> usize {
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
pub(super) fn malformed() -> TypeError {
    TypeError("malformed JSON".into())
}

/// A JSON number as the float64 Go reads it into; `None` where Go reports it out of range.
pub(super) fn float(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// An integer of at most 15 digits is exactly a float64, written back as it is.
pub(super) fn small_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    digits.len() <= 15 && digits.bytes().all(|c| c.is_ascii_digit())
}

pub(super) fn out_of_float_range(text: &str) -> TypeError {
    TypeError(format!(
        "cannot unmarshal number {} into float64",
        bounded(text)
    ))
}

/// What `Reader::any` has open: an array, or an object begun at `out[start]` whose keys are
/// `pairs[from..]`, `sorted` while each came after the one before it.
pub(super) enum Open {
    Array,
    Object {
        start: usize,
        from: usize,
        sorted: bool,
    },
}

/// Where `Reader::any` wrote an object's key: its opening quote, and its colon.
#[derive(Clone, Copy)]
pub(super) struct Pair {
    pub(super) key: usize,
    pub(super) colon: usize,
}

/// An object `Reader::any` wrote out of order, at `out[start..end]`: its pairs as Go writes them are
/// `order[from..to]` (ranges of `out`).
pub(super) struct Reorder {
    pub(super) start: usize,
    pub(super) end: usize,
    pub(super) from: usize,
    pub(super) to: usize,
}

impl<'a> Reader<'a> {
    /// The first byte of the next value, whitespace passed.
    pub(super) fn peek(&mut self) -> Option<u8> {
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
    pub(super) fn mismatch(&mut self, go_type: &str) -> TypeError {
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
    pub(super) fn string(&mut self) -> Option<Str<'a>> {
        if self.peek() != Some(b'"') {
            return None;
        }
        let start = self.i + 1;
        self.skip_string();
        let end = self.i.saturating_sub(1).max(start);
        self.b.get(start..end).map(Str)
    }

    /// Takes a number (its text), if that is what comes next.
    pub(super) fn number(&mut self) -> Option<&'a str> {
        if !matches!(self.peek(), Some(b'-' | b'0'..=b'9')) {
            return None;
        }
        let start = self.i;
        self.skip_scalar();
        std::str::from_utf8(&self.b[start..self.i]).ok()
    }

    /// Takes `true` or `false`, if that is what comes next.
    pub(super) fn boolean(&mut self) -> Option<bool> {
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
    pub(super) fn array(&mut self) -> bool {
        let is_array = self.peek() == Some(b'[');
        if is_array {
            self.i += 1;
        }
        is_array
    }

    /// Whether the array being read has another item, which comes next; `false` once it ends.
    pub(super) fn item(&mut self) -> bool {
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
    pub(super) fn skip_string(&mut self) {
        let mut i = self.i + 1;
        while let Some(rest) = self.b.get(i..) {
            let Some(n) = find_marked(rest, &STRING_STOP) else {
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
    pub(super) fn skip_scalar(&mut self) {
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
                    let Some(n) = find_marked(rest, &STRUCTURAL) else {
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
    pub(super) fn any(&mut self, capacity: usize) -> Result<Vec<u8>, TypeError> {
        let mut out = Vec::with_capacity(capacity);
        let mut open: Vec<Open> = Vec::new();
        let mut pairs: Vec<Pair> = Vec::new();
        let mut reorders: Vec<Reorder> = Vec::new();
        let mut order: Vec<(usize, usize)> = Vec::new();
        let mut scratch = String::new();
        loop {
            if let Some(opened) = self.any_value(&mut out, pairs.len(), &mut scratch)? {
                open.push(opened);
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

    /// Writes the next value of an `any` as Go writes it if it is a scalar; opens it (and answers
    /// what was opened) if it is an array or object, whose pairs start at `pairs`.
    fn any_value(
        &mut self,
        out: &mut Vec<u8>,
        pairs: usize,
        scratch: &mut String,
    ) -> Result<Option<Open>, TypeError> {
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let opened = Open::Object {
                    start: out.len(),
                    from: pairs,
                    sorted: true,
                };
                out.push(b'{');
                return Ok(Some(opened));
            }
            Some(b'[') => {
                self.i += 1;
                out.push(b'[');
                return Ok(Some(Open::Array));
            }
            Some(b'"') => {
                let s = self.string().ok_or_else(malformed)?;
                write_text(out, s, scratch);
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
                    write_f64(out, float(n).ok_or_else(|| out_of_float_range(n))?);
                }
            }
        }
        Ok(None)
    }

    /// Whether the next value is one Go takes as `any` (every number in it fits a float64); passes it.
    pub(super) fn any_fits(&mut self) -> Result<(), TypeError> {
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
