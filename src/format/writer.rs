//! The archive object: one gzipped JSONL file per flow (see docs/FORMAT.md).
//!
//! Line 1 is a header, then one line per event in log order, then a trailer holding the flow's state
//! (the engine's state folded from the events, or the snapshot itself for layouts served from it) and
//! its other keys. The header carries the sha256 of every byte after it, so a reader can prove the
//! lines are complete.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Read;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use serde::{Serialize, Serializer};

use crate::digest::{hex, md5, sha256};
use crate::format::captured::Captured;
use crate::format::reader::{self, Whose};
use crate::format::{find_marked, Encoded, Marks, FORMAT_NAME, FORMAT_VERSION};
use crate::layout::StateSource;

/// Level 1 keeps compression off the critical path; event JSON still shrinks about 8x.
const GZIP_LEVEL: u32 = 1;

#[derive(Debug)]
pub enum EncodeError {
    Event {
        index: usize,
        reason: String,
    },
    Snapshot(String),
    /// The object could not be written: the compressor or a record's serializer failed (neither is
    /// expected with in-memory buffers; the flow stays live).
    Write(String),
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::Event { index, reason } => {
                write!(f, "event {index} is not JSON: {reason}")
            }
            EncodeError::Snapshot(reason) => write!(f, "snapshot is not a JSON object: {reason}"),
            EncodeError::Write(reason) => write!(f, "{reason}"),
        }
    }
}

/// Removes whitespace outside strings. Only used when a stored value spans several lines, which JSONL
/// cannot hold; tokens stay byte-identical. This is the one normalisation of an event line.
pub fn single_line(json: &[u8]) -> Cow<'_, [u8]> {
    if !has_line_break(json) {
        return Cow::Borrowed(json);
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_str, mut escaped) = (false, false);
    for &b in json {
        if in_str {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else if !is_json_space(b) {
            in_str = b == b'"';
            out.push(b);
        }
    }
    Cow::Owned(out)
}

/// Whether `json` holds a CR or LF. Every event is scanned, so this is one pass in blocks of 16 bytes
/// (`find_marked`; two `memchr` passes took a few percent of a worker's CPU).
fn has_line_break(json: &[u8]) -> bool {
    find_marked(json, &LINE_BREAK).is_some()
}

/// The line breaks `has_line_break` looks for.
const LINE_BREAK: Marks<2> = Marks {
    bytes: *b"\n\r",
    below: 0,
};

fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The snapshot as the trailer holds it: `single_line`, and no whitespace around the object (it is a
/// value inside the trailer, whose parser does not keep surrounding whitespace).
pub fn snapshot_form(json: &[u8]) -> Cow<'_, [u8]> {
    let start = json
        .iter()
        .position(|&b| !is_json_space(b))
        .unwrap_or(json.len());
    let end = json
        .iter()
        .rposition(|&b| !is_json_space(b))
        .map_or(start, |i| i + 1);
    match single_line(&json[start..end]) {
        Cow::Borrowed(_) if start == 0 && end == json.len() => Cow::Borrowed(json),
        Cow::Borrowed(b) => Cow::Owned(b.to_vec()),
        owned => owned,
    }
}

/// Valid UTF-8 and valid JSON (serde_json does not check UTF-8 inside strings it skips).
fn check_json(bytes: &[u8]) -> Result<(), String> {
    std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Builds header, event lines and trailer, gzips them and hashes the object. Runs on a worker thread.
/// The output depends only on the flow (no timestamp; gzip's mtime is 0), so a retry writes the same
/// bytes.
///
/// The lines after the header are built in one buffer (held only while encoding) and compressed in one
/// pass (`gzip`): three large slices rather than two small writes per line, since flate2's writer
/// zero-fills its 32 KiB output buffer on every write.
///
/// `state` is the engine's state folded from the flow (`format::engine`), which readers answer; `None`
/// for a layout whose state is its snapshot, which readers then answer as stored. `generation` is the
/// generation of the key the object is for (`layout::object_key`), which its header names.
pub fn encode(
    flow: &Captured,
    state: Option<&[u8]>,
    generation: u32,
) -> Result<Encoded, EncodeError> {
    let mut content = Vec::with_capacity(content_capacity(flow));
    for (index, event) in flow.events.iter().enumerate() {
        check_json(event).map_err(|reason| EncodeError::Event { index, reason })?;
        content.extend_from_slice(&single_line(event));
        content.push(b'\n');
    }
    content.extend_from_slice(&trailer(flow, state)?);
    content.push(b'\n');
    let header = json_line(&Header {
        format: FORMAT_NAME,
        version: FORMAT_VERSION,
        flow_id: &flow.id,
        db: flow.db,
        generation,
        events: flow.events.len(),
        raw_bytes: content.len(),
        sha256: hex(&sha256(&content)),
        keys: HeaderKeys {
            events: &flow.keys.events,
            snapshot: &flow.keys.snapshot,
            seq: flow.keys.seq.as_deref(),
            labels: flow.keys.labels.as_deref(),
        },
        previous: flow.previous.as_deref(),
    })?;
    let raw_bytes = (header.len() + 1 + content.len()) as u64;
    let body = gzip(&[header.as_bytes(), b"\n", &content]).map_err(EncodeError::Write)?;
    Ok(Encoded {
        object_sha256: sha256(&body),
        object_md5: md5(&body),
        body,
        raw_bytes,
    })
}

/// The header line, its fields in the order they are written. It and the trailer's last fields are
/// written straight from the flow (`json_line`), not through a tree of `serde_json::Value`s built to be
/// printed once.
#[derive(Serialize)]
struct Header<'a> {
    format: &'a str,
    version: u64,
    flow_id: &'a str,
    db: i32,
    generation: u32,
    events: usize,
    raw_bytes: usize,
    sha256: String,
    keys: HeaderKeys<'a>,
    previous: Option<&'a str>,
}

#[derive(Serialize)]
struct HeaderKeys<'a> {
    events: &'a str,
    snapshot: &'a str,
    seq: Option<&'a str>,
    labels: Option<&'a str>,
}

/// The trailer's fields after the state and the snapshot.
#[derive(Serialize)]
struct TrailerEnd<'a> {
    seq: Option<i64>,
    labels: Labels<'a>,
    status: &'a str,
}

/// The labels as a JSON object, in the flow's order.
struct Labels<'a>(&'a [(String, String)]);

impl Serialize for Labels<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// A header or trailer record as one line of JSON (records of strings, integers and options of them,
/// which serialize; an error is passed on all the same, and the flow stays live).
fn json_line(record: &impl Serialize) -> Result<String, EncodeError> {
    serde_json::to_string(record).map_err(|e| EncodeError::Write(format!("a record: {e}")))
}

/// The content's size: the events, their newlines and room for the trailer.
fn content_capacity(flow: &Captured) -> usize {
    let events = flow.events.bytes() + flow.events.len();
    events + flow.snapshot.as_ref().map_or(0, Vec::len) + 256
}

/// The trailer line: the state and the snapshot spliced in verbatim rather than re-serialized (so
/// numbers and key order survive), then sequence, labels and status.
fn trailer(flow: &Captured, state: Option<&[u8]>) -> Result<Vec<u8>, EncodeError> {
    let mut trailer = b"{".to_vec();
    if let Some(state) = state {
        trailer.extend_from_slice(br#""state":"#);
        trailer.extend_from_slice(state);
        trailer.push(b',');
    }
    trailer.extend_from_slice(br#""snapshot":"#);
    match &flow.snapshot {
        Some(snapshot) => {
            let snapshot = snapshot_form(snapshot);
            check_json(&snapshot).map_err(EncodeError::Snapshot)?;
            // `snapshot_form` trims whitespace, so a JSON value starting with `{` is an object.
            if snapshot.first() != Some(&b'{') {
                return Err(EncodeError::Snapshot("not an object".into()));
            }
            trailer.extend_from_slice(&snapshot);
        }
        None if state.is_some() => trailer.extend_from_slice(b"null"),
        None => return Err(EncodeError::Snapshot("there is none".into())),
    }
    let rest = json_line(&TrailerEnd {
        seq: flow.seq,
        labels: Labels(&flow.labels),
        status: &flow.status,
    })?;
    trailer.push(b',');
    trailer.extend_from_slice(&rest.as_bytes()[1..]);
    Ok(trailer)
}

/// The gzip member header flate2's `GzEncoder` writes at level 1: no name or comment, mtime 0, XFL 4
/// (fastest), OS 255 (unknown). The deflate bits differ from what earlier releases wrote (they fed
/// miniz_oxide line by line; now zlib-rs takes one pass), so a retry by this release of a flow an
/// earlier one stored but did not commit finds other bytes and takes the next generation key
/// (archive::store); nothing is replaced or lost.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

thread_local! {
    /// One raw-deflate compressor per worker thread (about 300 KiB, held for the thread's life),
    /// reset for each object. Building a fresh one per object cost more than the compression of a
    /// typical flow saved by the one-pass feed (docs/BENCHMARKS.md, "The encoder").
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(GZIP_LEVEL), false));
}

/// `parts`, concatenated, as one gzip member: header, raw deflate, CRC-32 and length.
fn gzip(parts: &[&[u8]]) -> Result<Vec<u8>, String> {
    let raw: usize = parts.iter().map(|p| p.len()).sum();
    // Level 1 shrinks event JSON several times; the buffer grows if not. The compressor writes into
    // its spare capacity, so it is never zero-filled.
    let mut out = Vec::with_capacity(GZIP_HEADER.len() + raw / 2 + 1024);
    out.extend_from_slice(&GZIP_HEADER);
    let deflated = DEFLATE
        .try_with(|d| deflate(&mut d.borrow_mut(), parts, &mut out))
        .unwrap_or_else(|_| {
            // The thread is exiting: a compressor of its own.
            let mut d = Compress::new(Compression::new(GZIP_LEVEL), false);
            deflate(&mut d, parts, &mut out)
        });
    deflated?;
    let mut crc = Crc::new();
    for part in parts {
        crc.update(part);
    }
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&crc.amount().to_le_bytes());
    out.shrink_to_fit();
    Ok(out)
}

/// Compresses `parts` onto the end of `out`, growing it as needed, and ends the stream.
fn deflate(d: &mut Compress, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), String> {
    d.reset();
    // The stream ends with the last part's call, so there is always one.
    let parts = if parts.is_empty() {
        &[&[][..]][..]
    } else {
        parts
    };
    let last = parts.len() - 1;
    for (i, part) in parts.iter().enumerate() {
        let flush = if i == last {
            FlushCompress::Finish
        } else {
            FlushCompress::None
        };
        let mut input = *part;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity());
            }
            let (before_in, before_out) = (d.total_in(), out.len());
            let status = d
                .compress_vec(input, out, flush)
                .map_err(|e| format!("gzip failed: {e}"))?;
            let consumed = (d.total_in() - before_in) as usize;
            input = &input[consumed..];
            let done = match flush {
                FlushCompress::Finish => status == Status::StreamEnd,
                _ => input.is_empty(),
            };
            if done {
                break;
            }
            if consumed == 0 && out.len() == before_out && out.len() < out.capacity() {
                return Err(format!("gzip made no progress ({status:?})"));
            }
        }
    }
    Ok(())
}

/// `encoded`, an object of `whose` flow and DB written for generation `from` and proven to read back
/// as its flow, written for generation `whose.generation` instead: its header names that generation
/// and every byte after the header is the same. For an upload whose key holds other content
/// (`archive::store`), once the flow's copy is freed. Proven to read back under the read cap
/// `max_bytes` as an object of `whose`.
pub fn regenerate(
    encoded: &Encoded,
    from: u32,
    whose: &Whose,
    max_bytes: u64,
) -> Result<Encoded, String> {
    let mut raw = Vec::with_capacity(encoded.raw_bytes as usize);
    let mut gz = flate2::read::GzDecoder::new(encoded.body.as_slice()).take(encoded.raw_bytes);
    gz.read_to_end(&mut raw)
        .map_err(|e| format!("the object could not be read again: {e}"))?;
    let split = raw.iter().position(|&b| b == b'\n');
    let split = split.ok_or("the object has no header line")?;
    let (header, content) = (&raw[..split], &raw[split + 1..]);
    // The generation follows the DB, outside any string (the id before it is a JSON string, in which
    // a quote is escaped), so the first match is the field.
    let (old, new) = (
        format!(",\"generation\":{from},"),
        format!(",\"generation\":{},", whose.generation),
    );
    let header = std::str::from_utf8(header).map_err(|e| format!("header: {e}"))?;
    let at = header.find(&old).ok_or("the header names no generation")?;
    let header = format!("{}{new}{}", &header[..at], &header[at + old.len()..]);
    // Fed in the parts `encode` feeds, so the deflate bits are the same as well.
    let body = gzip(&[header.as_bytes(), b"\n", content])?;
    reader::parse(&body, whose, max_bytes)
        .map_err(|e| format!("the object does not read back: {e}"))?;
    Ok(Encoded {
        object_sha256: sha256(&body),
        object_md5: md5(&body),
        raw_bytes: (header.len() + 1 + content.len()) as u64,
        body,
    })
}

/// The gate before any delete, "never delete what you cannot read back": decodes `body` with exactly
/// the code FLOWARCHIVE.GET uses, under the read cap `max_bytes` (flowarchive.read-max-bytes), and
/// checks that it reproduces `flow`: id, DB and the key's `generation`, every event (as `single_line` of the stored one), the
/// snapshot (as `snapshot_form`), the same label pairs, seq, status and predecessor, and the `state`
/// it was encoded with. The state was folded from exactly these events (compared one by one here), so
/// an object that reads back holds the fold of its own events. Call it before `flow.events` is freed.
pub fn read_back(
    body: &[u8],
    flow: &Captured,
    state: Option<&[u8]>,
    generation: u32,
    max_bytes: u64,
) -> Result<(), String> {
    if body.len() as u64 > max_bytes {
        return Err(format!(
            "the object is {} bytes, over flowarchive.read-max-bytes ({max_bytes}); it could not be read back",
            body.len()
        ));
    }
    let fail = |what: &str| Err(format!("the object does not read back: {what} differs"));
    let whose = Whose {
        id: &flow.id,
        db: flow.db,
        generation,
    };
    let object = reader::parse(body, &whose, max_bytes)
        .map_err(|e| format!("the object does not read back: {e}"))?;
    if object.event_count() != flow.events.len() {
        return fail("the event count");
    }
    for (i, (line, event)) in object.events().zip(flow.events.iter()).enumerate() {
        // An event stored as one line (nearly all) is compared without scanning it again.
        if line.as_bytes() != event && line.as_bytes() != &*single_line(event) {
            return fail(&format!("event {i}"));
        }
    }
    let snapshot = flow.snapshot.as_deref().map(snapshot_form);
    if object.snapshot.as_deref().map(str::as_bytes) != snapshot.as_deref() {
        return fail("the snapshot");
    }
    if object.state.as_deref().map(str::as_bytes) != state {
        return fail("the state");
    }
    if object.previous != flow.previous {
        return fail("the predecessor");
    }
    if object.seq != flow.seq {
        return fail("seq");
    }
    if object.status != flow.status {
        return fail("the status");
    }
    let mut labels = flow.labels.clone();
    labels.sort();
    let mut read = object.labels.clone();
    read.sort();
    if read != labels {
        return fail("the labels");
    }
    // The reply form as the layout the object was written for builds it.
    let source = match state {
        Some(_) => StateSource::Fold,
        None => StateSource::Snapshot,
    };
    object
        .into_decoded(source)
        .map(|_| ())
        .map_err(|e| format!("the object does not read back: {e}"))
}

#[cfg(test)]
mod tests;
