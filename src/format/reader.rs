//! Reading an archive object back (docs/FORMAT.md), all or nothing: any defect is an error, never a
//! partially decoded flow.
//!
//! The object is parsed, never searched: the header and trailer are JSON documents read with serde, and
//! the trailer's `snapshot` is taken as the exact bytes the encoder spliced in (a `RawValue`), so no key
//! or value inside the flow (a label named `seq`, a snapshot field named `snapshot`) can confuse it.
//!
//! Memory is bounded: the header line is read with its own small cap, the rest is decompressed as a
//! stream, hashed as it arrives, and refused as soon as it passes the declared `raw_bytes` or the
//! caller's cap. A gzip bomb costs at most the cap, never what it would expand to.

use std::io::{BufRead, BufReader, Read};

use flate2::bufread::GzDecoder;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer as _};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::capped;
use crate::digest::hex;
use crate::format::engine;
use crate::format::{FORMAT_NAME, FORMAT_VERSION};
use crate::layout::StateSource;
use crate::text;

/// The header line is small (ids, key names, a hash); a longer one is not ours.
pub const MAX_HEADER_LINE: u64 = 64 * 1024;

/// What one line costs once answered (the reply element and its allocation), charged against the cap
/// so that an object of millions of tiny lines cannot expand into a reply far larger than the cap.
pub const LINE_COST: u64 = 64;

/// The buffer the header line is read through (a longer line takes several fills).
const HEADER_BUFFER: usize = 4096;

/// Content is reserved this much at a time before it is proven to exist.
const CHUNK: usize = 64 * 1024;

/// An archived flow, ready to answer: the FlowState with `"archived":true`, and the events.
pub struct Decoded {
    pub flow_state: String,
    /// The event lines, each ending in `\n`, exactly as stored.
    events: String,
    event_count: usize,
    /// The location of the incarnation of this id archived before this one, if any.
    pub previous: Option<String>,
}

impl Decoded {
    /// Approximate memory held, for the cache budget.
    pub fn size(&self) -> usize {
        self.flow_state.len() + self.events.len() + self.event_count * 24 + 64
    }

    pub fn events(&self) -> impl Iterator<Item = &str> {
        self.events.split_terminator('\n')
    }

    #[cfg(test)]
    pub fn for_test(flow_state: String, events: &[&str]) -> Decoded {
        Decoded {
            flow_state,
            events: events.iter().map(|e| format!("{e}\n")).collect(),
            event_count: events.len(),
            previous: None,
        }
    }
}

/// Everything an object holds, parsed and verified; `into_decoded` makes the reply form.
#[derive(Debug)]
pub struct Object {
    /// The event lines, each ending in `\n`, exactly as stored.
    events: String,
    event_count: usize,
    /// The engine's state the encoder folded (version 2 of a folded layout), exactly as spliced in.
    pub state: Option<String>,
    /// The snapshot's bytes exactly as the encoder spliced them into the trailer; `None` for a flow
    /// that had none.
    pub snapshot: Option<String>,
    pub seq: Option<i64>,
    pub labels: Vec<(String, String)>,
    pub status: String,
    /// The location of the incarnation archived before this one.
    pub previous: Option<String>,
}

impl Object {
    pub fn events(&self) -> impl Iterator<Item = &str> {
        self.events.split_terminator('\n')
    }

    pub fn event_count(&self) -> usize {
        self.event_count
    }

    /// The reply form: the flow's state marked `"archived":true`, and the event lines. Which state
    /// is `source`'s, whatever the object was written under: a folding layout answers the state the
    /// object holds, or (an object of version 1, or one written while the layout served snapshots)
    /// the fold of its own snapshot, sequence and events now, as the engine would load them; a layout
    /// served from its snapshot answers the snapshot, or the state where the flow had none.
    pub fn into_decoded(self, source: StateSource) -> Result<Decoded, DecodeError> {
        let state = match (source, self.state, self.snapshot) {
            (StateSource::Fold, Some(state), _) => state,
            (StateSource::Fold, None, snapshot) => {
                let events: Vec<&str> = self.events.split_terminator('\n').collect();
                let skip = self.seq.unwrap_or(0).max(0) as usize;
                let folded = engine::fold(snapshot.as_deref().map(str::as_bytes), skip, &events)
                    .map_err(|e| corrupt(format!("its events cannot be folded: {e}")))?
                    .ok_or_else(|| corrupt("its events hold no flow the engine knows"))?;
                String::from_utf8(folded).map_err(|_| corrupt("its state is not UTF-8"))?
            }
            (StateSource::Snapshot, _, Some(snapshot))
            | (StateSource::Snapshot, Some(snapshot), None) => snapshot,
            (StateSource::Snapshot, None, None) => {
                return Err(corrupt("the trailer holds no state and no snapshot"))
            }
        };
        Ok(Decoded {
            flow_state: mark_archived(&state)?,
            events: self.events,
            event_count: self.event_count,
            previous: self.previous,
        })
    }
}

#[derive(Debug, PartialEq)]
pub enum DecodeError {
    /// Not gzip, not UTF-8, cut short, or lines missing or malformed.
    Corrupt(String),
    /// The content does not match the sha256 recorded for it.
    Checksum(String),
    /// A well-formed object of another flow.
    OtherFlow(String),
    /// A well-formed object of this flow id, archived from another DB (keyspace).
    OtherKeyspace(i64),
    /// A well-formed object of this flow and DB, written for another generation's key than the one
    /// it was read from (another incarnation of the id).
    OtherGeneration(u64),
    UnknownVersion(String),
    /// Larger than the read cap, or than its own declared `raw_bytes`.
    TooLarge(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Corrupt(why) => write!(f, "archived object is corrupt: {why}"),
            DecodeError::Checksum(why) => write!(f, "archived object fails its checksum: {why}"),
            DecodeError::OtherFlow(other) => {
                let shown: String = other.chars().take(120).collect();
                write!(f, "archived object belongs to another flow ({shown:?})")
            }
            DecodeError::OtherKeyspace(db) => {
                write!(f, "archived object belongs to DB {db}, not this one")
            }
            DecodeError::OtherGeneration(g) => write!(
                f,
                "archived object was written for generation {g} of its flow, not for the key it was read from"
            ),
            DecodeError::UnknownVersion(v) => {
                write!(f, "archived object has an unknown format ({v})")
            }
            DecodeError::TooLarge(why) => write!(f, "archived object is too large: {why}"),
        }
    }
}

/// Texts from the object (serde's messages quote the offending value) stay short in replies.
const MAX_REASON: usize = 200;

fn bounded(why: String) -> String {
    text::cut(&why, MAX_REASON).into_owned()
}

fn corrupt(why: impl Into<String>) -> DecodeError {
    DecodeError::Corrupt(bounded(why.into()))
}

/// The header line after its format and version are checked. Unknown fields (`keys`, the older
/// `archived_at`) are ignored.
#[derive(Deserialize)]
struct Header {
    flow_id: String,
    /// Objects written before the field existed all came from DB 0.
    #[serde(default)]
    db: i64,
    /// The generation whose key the object was written for; objects written before the field
    /// existed carry none and are not held to one.
    #[serde(default)]
    generation: Option<u64>,
    events: u64,
    sha256: String,
    /// Bytes after the header line; unknown in older objects.
    raw_bytes: Option<u64>,
    /// The location of the incarnation of this id archived before this one (version 2).
    #[serde(default)]
    previous: Option<String>,
}

/// The last line. `state` and `snapshot` are borrowed verbatim; a duplicate field is an error (serde
/// refuses it).
#[derive(Deserialize)]
struct Trailer<'a> {
    #[serde(borrow, default)]
    state: Option<&'a RawValue>,
    #[serde(borrow)]
    snapshot: Option<&'a RawValue>,
    seq: Option<i64>,
    labels: Map<String, Value>,
    status: String,
}

/// Adds `"archived":true` to a FlowState object without re-serializing it. A state that names
/// `archived` at its top level already (no engine writes one) has that member left out and ours put
/// last, its other members copied as they are. Both passes read the members one at a time, holding
/// no tree and no list of names: about the state's own size, whatever its shape.
fn mark_archived(snapshot: &str) -> Result<String, DecodeError> {
    let inner = snapshot
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| corrupt("trailer snapshot is not an object"))?;
    let trailer = |e: serde_json::Error| corrupt(format!("trailer snapshot: {e}"));
    let members = || serde_json::Deserializer::from_str(snapshot);
    if members().deserialize_map(FindArchived).map_err(trailer)? {
        let mut out = members().deserialize_map(CopyUnarchived).map_err(trailer)?;
        out.push_str("\"archived\":true}");
        return Ok(out);
    }
    Ok(if inner.trim().is_empty() {
        r#"{"archived":true}"#.to_string()
    } else {
        format!("{{{inner},\"archived\":true}}")
    })
}

/// Whether an object has a member named `archived`, its members skipped one at a time.
struct FindArchived;

impl<'de> serde::de::Visitor<'de> for FindArchived {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut named = false;
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            named |= name == "archived";
            map.next_value::<IgnoredAny>()?;
        }
        Ok(named)
    }
}

/// An object's members but one named `archived`, written out one at a time as `{"name":value,`
/// pieces (values as they are), open for one more member.
struct CopyUnarchived;

impl<'de> serde::de::Visitor<'de> for CopyUnarchived {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let mut out = String::from("{");
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value: &'de RawValue = map.next_value()?;
            if name != "archived" {
                out.push_str(&serde_json::to_string(&name).map_err(serde::de::Error::custom)?);
                out.push(':');
                out.push_str(value.get());
                out.push(',');
            }
        }
        Ok(out)
    }
}

/// Feeds every byte read through sha256.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

fn gzip_error(e: std::io::Error) -> DecodeError {
    corrupt(format!("gzip: {e}"))
}

/// Reads the header line: at most `MAX_HEADER_LINE` bytes, ending in `\n`.
fn read_header(gz: &mut impl BufRead) -> Result<Header, DecodeError> {
    let mut line = Vec::new();
    gz.take(MAX_HEADER_LINE + 1)
        .read_until(b'\n', &mut line)
        .map_err(gzip_error)?;
    if line.pop() != Some(b'\n') {
        return Err(if line.len() as u64 >= MAX_HEADER_LINE {
            corrupt(format!("header line longer than {MAX_HEADER_LINE} bytes"))
        } else {
            corrupt("no header line")
        });
    }
    let any: Value = serde_json::from_slice(&line).map_err(|e| corrupt(format!("header: {e}")))?;
    let known = any
        .get("version")
        .and_then(Value::as_u64)
        .is_some_and(|v| (1..=FORMAT_VERSION).contains(&v));
    if any.get("format") != Some(&Value::from(FORMAT_NAME)) || !known {
        return Err(DecodeError::UnknownVersion(bounded(format!(
            "format {} version {}",
            any.get("format").unwrap_or(&Value::Null),
            any.get("version").unwrap_or(&Value::Null)
        ))));
    }
    serde_json::from_value(any).map_err(|e| corrupt(format!("header: {e}")))
}

/// Decompresses everything after the header, hashing as it goes; more than `limit` bytes is `None`.
fn read_content(
    gz: &mut impl Read,
    limit: u64,
    declared: bool,
) -> Result<Option<(Vec<u8>, String)>, DecodeError> {
    let mut reader = Hashing {
        inner: gz,
        sha: Sha256::new(),
    };
    // A declared size is read into one buffer; the first `CHUNK`s are reserved before anything is
    // proven, so a lying header costs no more than a short read.
    let first = if declared {
        limit.min(16 * CHUNK as u64) as usize + 1
    } else {
        CHUNK
    };
    let content = capped::read(&mut reader, limit, first).map_err(gzip_error)?;
    if content.len() as u64 > limit {
        return Ok(None);
    }
    Ok(Some((content, hex(&reader.sha.finalize()))))
}

/// The object a read expects at a key: the flow's id, its DB and the generation the key names
/// (`layout::object_key`). An object that names another is not the one the key was written with.
#[derive(Clone, Copy, Debug)]
pub struct Whose<'a> {
    pub id: &'a str,
    pub db: i32,
    pub generation: u32,
}

/// Decompresses and checks an object: format, version, the flow, DB and generation it was written for
/// (`whose`), sizes, line count and content sha256.
///
/// `max_bytes` (flowarchive.read-max-bytes) bounds the whole read: the object, its decompressed
/// content, `LINE_COST` per line and one copy of the trailer (the state answered) together stay
/// within it, so a read's peak is the cap plus a small constant, whatever the object claims.
pub fn parse(object: &[u8], whose: &Whose, max_bytes: u64) -> Result<Object, DecodeError> {
    // The object is decompressed straight from its bytes. The small buffer serves the header line;
    // the content passes it by, decompressed into its own buffer (`read_content`).
    let mut gz = BufReader::with_capacity(HEADER_BUFFER, GzDecoder::new(object));
    let header = read_header(&mut gz)?;
    if header.flow_id != whose.id {
        return Err(DecodeError::OtherFlow(header.flow_id));
    }
    if header.db != i64::from(whose.db) {
        return Err(DecodeError::OtherKeyspace(header.db));
    }
    // Objects written before the field existed are not held to a generation.
    if let Some(g) = (header.generation).filter(|&g| g != u64::from(whose.generation)) {
        return Err(DecodeError::OtherGeneration(g));
    }
    let room = max_bytes.saturating_sub(object.len() as u64);
    let over_cap = |what: String| {
        DecodeError::TooLarge(format!(
            "{what}; with the {} bytes of the object that passes the read cap of {max_bytes} bytes (flowarchive.read-max-bytes)",
            object.len()
        ))
    };
    let limit = match header.raw_bytes {
        Some(declared) if declared > room => {
            return Err(over_cap(format!("declares {declared} bytes")))
        }
        Some(declared) => declared,
        None => room,
    };
    let Some((content, actual)) = read_content(&mut gz, limit, header.raw_bytes.is_some())? else {
        return Err(match header.raw_bytes {
            Some(declared) => DecodeError::TooLarge(format!(
                "content runs past its declared size of {declared} bytes"
            )),
            None => over_cap(format!("content passes {limit} bytes")),
        });
    };
    // One gzip member, nothing after it: bytes appended to an object are not ours.
    let after = gz.into_inner().into_inner().len();
    if after > 0 {
        return Err(corrupt(format!("{after} bytes after the gzip member")));
    }
    if let Some(declared) = header.raw_bytes {
        if content.len() as u64 != declared {
            return Err(corrupt(format!(
                "{} bytes after the header, the header declares {declared}",
                content.len()
            )));
        }
    }
    if header.sha256 != actual {
        return Err(DecodeError::Checksum(bounded(format!(
            "lines hash to {actual}, header says {}",
            header.sha256
        ))));
    }
    split(content, &header, room)
}

/// Splits verified content into event lines and the trailer, and parses the trailer. `room` is what
/// the read cap leaves beside the object.
fn split(content: Vec<u8>, header: &Header, room: u64) -> Result<Object, DecodeError> {
    let mut text = String::from_utf8(content).map_err(|_| corrupt("not UTF-8"))?;
    if !text.ends_with('\n') {
        return Err(corrupt("last line is cut short"));
    }
    let lines = count_lines(text.as_bytes());
    if lines != header.events.saturating_add(1) {
        return Err(corrupt(format!(
            "{lines} lines for {} events and a trailer",
            header.events
        )));
    }
    let body_end = text.len() - 1;
    let trailer_start = text[..body_end].rfind('\n').map_or(0, |i| i + 1);
    let cost = (text.len() as u64)
        .saturating_add(lines.saturating_mul(LINE_COST))
        .saturating_add((text.len() - trailer_start) as u64);
    if cost > room {
        return Err(DecodeError::TooLarge(format!(
            "{lines} lines of {} bytes exceed the read cap (flowarchive.read-max-bytes) with the object",
            text.len()
        )));
    }
    if text.starts_with('\n') || text.contains("\n\n") {
        return Err(corrupt("an empty line"));
    }
    let trailer: Trailer = serde_json::from_str(&text[trailer_start..body_end])
        .map_err(|e| corrupt(format!("trailer: {e}")))?;
    let object = |raw: Option<&RawValue>, what: &str| match raw.map(RawValue::get) {
        None | Some("null") => Ok(None),
        Some(json) if json.starts_with('{') => Ok(Some(json.to_string())),
        Some(_) => Err(corrupt(format!("trailer {what} is not an object"))),
    };
    let state = object(trailer.state, "state")?;
    let snapshot = object(trailer.snapshot, "snapshot")?;
    let labels = trailer
        .labels
        .into_iter()
        .map(|(name, value)| match value {
            Value::String(v) => Ok((name, v)),
            _ => Err(corrupt("a label value is not a string")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (seq, status) = (trailer.seq, trailer.status);
    text.truncate(trailer_start);
    Ok(Object {
        events: text,
        event_count: lines as usize - 1,
        state,
        snapshot,
        seq,
        labels,
        status,
        previous: header.previous.clone(),
    })
}

/// The `\n`s in `text`, counted in blocks of 32 bytes with a byte-wide count per block, which the
/// compiler turns into vector compares and adds (a count kept in a `usize` took 4 bytes at a time).
fn count_lines(text: &[u8]) -> u64 {
    let newline = |n: u8, c: &u8| n + u8::from(*c == b'\n');
    let (blocks, rest) = text.as_chunks::<32>();
    let in_blocks: u64 = blocks
        .iter()
        .map(|block| u64::from(block.iter().fold(0, newline)))
        .sum();
    in_blocks + u64::from(rest.iter().fold(0, newline))
}

/// What FLOWARCHIVE.GET answers from an object: `parse`, then the reply form.
pub fn decode(
    object: &[u8],
    whose: &Whose,
    max_bytes: u64,
    source: StateSource,
) -> Result<Decoded, DecodeError> {
    parse(object, whose, max_bytes)?.into_decoded(source)
}

#[cfg(test)]
pub(crate) mod tests;
