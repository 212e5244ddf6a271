//! Checking: a document accepted exactly as Go's scanner accepts it, allocating nothing.

use super::*;

/// The containers open at a point of a document, one bit each (set: an object), so that checking the
/// deepest document Go accepts needs no heap.
pub(super) struct Nesting {
    pub(super) bits: [u64; MAX_DEPTH.div_ceil(64)],
    pub(super) depth: usize,
}

impl Nesting {
    /// Opens a container; `false` when that would pass Go's limit.
    pub(super) fn push(&mut self, object: bool) -> bool {
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
    pub(super) fn top(&self) -> Option<bool> {
        let at = self.depth.checked_sub(1)?;
        Some(self.bits.get(at / 64)? & (1u64 << (at % 64)) != 0)
    }

    pub(super) fn pop(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }
}

pub(super) struct Checker<'a> {
    pub(super) b: &'a [u8],
    pub(super) i: usize,
}

impl Checker<'_> {
    pub(super) fn error(&self, what: &'static str) -> SyntaxError {
        SyntaxError { at: self.i, what }
    }

    pub(super) fn skip_space(&mut self) {
        while self.b.get(self.i).copied().is_some_and(is_space) {
            self.i += 1;
        }
    }

    pub(super) fn literal(&mut self, word: &'static [u8]) -> Result<(), SyntaxError> {
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

    pub(super) fn number(&mut self) -> Result<(), SyntaxError> {
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
    pub(super) fn string(&mut self) -> Result<(), SyntaxError> {
        self.i += 1;
        loop {
            let rest = &self.b[self.i..];
            self.i += find_marked(rest, &STRING_STOP).unwrap_or(rest.len());
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
    pub(super) fn key(&mut self) -> Result<(), SyntaxError> {
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
    pub(super) fn document(&mut self) -> Result<(), SyntaxError> {
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
pub(super) fn hex4(b: &[u8], at: usize) -> Option<u32> {
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
