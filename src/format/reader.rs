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

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};

use flate2::bufread::GzDecoder;

use serde::de::IgnoredAny;
use serde::Deserialize;
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
    /// The state source the answer was made for (`flowarchive.state` when it was read).
    pub source: StateSource,
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
            source: StateSource::Fold,
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
            source,
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

/// Adds `"archived":true` to a FlowState object without re-serializing it.
fn mark_archived(snapshot: &str) -> Result<String, DecodeError> {
    let inner = snapshot
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| corrupt("trailer snapshot is not an object"))?;
    // Only the top-level names are collected: a tree of the whole state would cost several times
    // its size.
    let names: HashMap<String, IgnoredAny> =
        serde_json::from_str(snapshot).map_err(|e| corrupt(format!("trailer snapshot: {e}")))?;
    if names.contains_key("archived") {
        let mut obj: Map<String, Value> = serde_json::from_str(snapshot)
            .map_err(|e| corrupt(format!("trailer snapshot: {e}")))?;
        obj.insert("archived".into(), Value::Bool(true));
        return Ok(Value::Object(obj).to_string());
    }
    Ok(if inner.trim().is_empty() {
        r#"{"archived":true}"#.to_string()
    } else {
        format!("{{{inner},\"archived\":true}}")
    })
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

/// Decompresses and checks an object: format, version, flow id and DB, sizes, line count and content
/// sha256.
///
/// `max_bytes` (flowarchive.read-max-bytes) bounds the whole read: the object, its decompressed
/// content, `LINE_COST` per line and one copy of the trailer (the state answered) together stay
/// within it, so a read's peak is the cap plus a small constant, whatever the object claims.
pub fn parse(
    object: &[u8],
    expected_id: &str,
    expected_db: i32,
    max_bytes: u64,
) -> Result<Object, DecodeError> {
    // The object is decompressed straight from its bytes. The small buffer serves the header line;
    // the content passes it by, decompressed into its own buffer (`read_content`).
    let mut gz = BufReader::with_capacity(HEADER_BUFFER, GzDecoder::new(object));
    let header = read_header(&mut gz)?;
    if header.flow_id != expected_id {
        return Err(DecodeError::OtherFlow(header.flow_id));
    }
    if header.db != i64::from(expected_db) {
        return Err(DecodeError::OtherKeyspace(header.db));
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
    let lines = text.bytes().filter(|&b| b == b'\n').count() as u64;
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

/// What FLOWARCHIVE.GET answers from an object: `parse`, then the reply form.
pub fn decode(
    object: &[u8],
    expected_id: &str,
    expected_db: i32,
    max_bytes: u64,
    source: StateSource,
) -> Result<Decoded, DecodeError> {
    parse(object, expected_id, expected_db, max_bytes)?.into_decoded(source)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::captured::Captured;
    use crate::format::Encoded;
    use crate::layout::FlowKeys;
    use proptest::prelude::*;
    use serde_json::json;
    use std::io::Write;

    const CAP: u64 = 1 << 20;

    /// Most tests here read objects of a layout served from its snapshot; the fold's have their own.
    fn encode(f: &Captured) -> Result<Encoded, crate::format::writer::EncodeError> {
        crate::format::writer::encode(f, None)
    }

    fn decode(object: &[u8], id: &str, db: i32, max: u64) -> Result<Decoded, DecodeError> {
        super::decode(object, id, db, max, StateSource::Snapshot)
    }

    fn flow(id: &str, db: i32, snapshot: &str, labels: &[(&str, &str)]) -> Captured {
        Captured {
            id: id.into(),
            db,
            keys: FlowKeys {
                events: "e".into(),
                snapshot: "s".into(),
                seq: None,
                labels: None,
                status_hash: None,
                member: "flow:x".into(),
                lease: None,
                index: "archived:flows".into(),
                earlier_indexes: Vec::new(),
            },
            events: vec![
                br#"{"type":"flow_started"}"#.to_vec(),
                br#"{"type":"flow_completed","n":2.50}"#.to_vec(),
            ],
            snapshot: Some(snapshot.as_bytes().to_vec()),
            seq: Some(1),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status: "completed".into(),
            status_score: None,
            previous: None,
        }
    }

    fn object(id: &str, snapshot: &str) -> Vec<u8> {
        encode(&flow(id, 0, snapshot, &[])).unwrap().body
    }

    fn gzip(text: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text).unwrap();
        gz.finish().unwrap()
    }

    fn gunzip(b: &[u8]) -> String {
        let mut s = String::new();
        GzDecoder::new(b).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn round_trips_with_the_archived_flag() {
        let d = decode(
            &object("abc", r#"{"id":"abc","n":1.50,"seq":"x"}"#),
            "abc",
            0,
            CAP,
        )
        .unwrap();
        assert_eq!(
            d.flow_state,
            r#"{"id":"abc","n":1.50,"seq":"x","archived":true}"#
        );
        assert_eq!(
            d.events().collect::<Vec<_>>(),
            [
                r#"{"type":"flow_started"}"#,
                r#"{"type":"flow_completed","n":2.50}"#
            ]
        );
        let d = decode(&object("e", "{}"), "e", 0, CAP).unwrap();
        assert_eq!(d.flow_state, r#"{"archived":true}"#);
        let d = decode(&object("f", r#"{"archived":false,"id":"f"}"#), "f", 0, CAP).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&d.flow_state).unwrap()["archived"],
            true
        );
    }

    /// A label named `seq` once made every read of the flow fail.
    #[test]
    fn labels_and_snapshot_keys_named_like_trailer_fields_are_data() {
        let snap = r#"{"seq":{"seq":1},"snapshot":",\"seq\":","labels":[],"status":"x"}"#;
        let f = flow(
            "abc",
            0,
            snap,
            &[("seq", "7"), ("snapshot", "{"), ("status", ",\"seq\":")],
        );
        let o = parse(&encode(&f).unwrap().body, "abc", 0, CAP).unwrap();
        assert_eq!(o.snapshot.as_deref(), Some(snap));
        assert_eq!(o.labels.len(), 3);
        assert_eq!(o.labels[0], ("seq".into(), "7".into()));
        assert_eq!(o.seq, Some(1));
        assert_eq!(o.status, "completed");
        assert_eq!(o.event_count(), 2);
    }

    #[test]
    fn checks_the_keyspace() {
        let body = encode(&flow("abc", 3, "{}", &[])).unwrap().body;
        assert!(decode(&body, "abc", 3, CAP).is_ok());
        assert_eq!(
            decode(&body, "abc", 0, CAP).err().unwrap(),
            DecodeError::OtherKeyspace(3)
        );
        // Objects written before `db` existed came from DB 0.
        let text = gunzip(&body).replacen(",\"db\":3", "", 1);
        assert!(!text.contains("\"db\""));
        assert!(decode(&gzip(text.as_bytes()), "abc", 0, CAP).is_ok());
        assert_eq!(
            decode(&gzip(text.as_bytes()), "abc", 3, CAP).err().unwrap(),
            DecodeError::OtherKeyspace(0)
        );
    }

    #[test]
    fn reads_objects_written_before_db_and_raw_bytes() {
        // As the earlier encoder wrote them, including a label named `seq` that the earlier reader
        // mistook for the trailer's own field.
        let f = flow(
            "abc",
            0,
            r#"{"id":"abc"}"#,
            &[("tenant", "a"), ("seq", "9")],
        );
        let text = gunzip(&encode(&f).unwrap().body);
        let (header, rest) = text.split_once('\n').unwrap();
        let mut h: Map<String, Value> = serde_json::from_str(header).unwrap();
        h.remove("raw_bytes");
        h.remove("db");
        h.insert("archived_at".into(), "2026-11-29T15:44:21.120Z".into());
        let old = format!("{}\n{rest}", Value::Object(h));
        let d = decode(&gzip(old.as_bytes()), "abc", 0, CAP).unwrap();
        assert_eq!(d.flow_state, r#"{"id":"abc","archived":true}"#);
    }

    #[test]
    fn refuses_every_defect() {
        let good = object("abc", r#"{"id":"abc"}"#);
        assert_eq!(
            decode(&good, "abd", 0, CAP).err().unwrap(),
            DecodeError::OtherFlow("abc".into())
        );
        assert!(matches!(
            decode(b"plain text", "abc", 0, CAP),
            Err(DecodeError::Corrupt(_))
        ));
        assert!(matches!(
            decode(&good[..good.len() / 2], "abc", 0, CAP),
            Err(DecodeError::Corrupt(_))
        ));

        // Anything after the one gzip member: a byte, or a whole second member.
        for tail in [&b"\0"[..], &good[..]] {
            let appended = [&good[..], tail].concat();
            assert_eq!(
                decode(&appended, "abc", 0, CAP).err().unwrap(),
                corrupt(format!("{} bytes after the gzip member", tail.len()))
            );
        }

        let text = gunzip(&good);
        let tampered = text.replace("flow_completed", "flow_completeD");
        assert!(matches!(
            decode(&gzip(tampered.as_bytes()), "abc", 0, CAP),
            Err(DecodeError::Checksum(_))
        ));
        let future = text.replacen("\"version\":2", "\"version\":3", 1);
        assert!(matches!(
            decode(&gzip(future.as_bytes()), "abc", 0, CAP),
            Err(DecodeError::UnknownVersion(_))
        ));
        let (header, rest) = text.split_once('\n').unwrap();
        let dropped: Vec<&str> = rest.lines().skip(1).collect();
        let short = format!("{header}\n{}\n", dropped.join("\n"));
        assert!(decode(&gzip(short.as_bytes()), "abc", 0, CAP).is_err());
        let no_newline = text.trim_end();
        assert!(decode(&gzip(no_newline.as_bytes()), "abc", 0, CAP).is_err());
        let long_header = format!("{}\n", "x".repeat(MAX_HEADER_LINE as usize + 10));
        assert_eq!(
            decode(&gzip(long_header.as_bytes()), "abc", 0, CAP)
                .err()
                .unwrap(),
            corrupt(format!("header line longer than {MAX_HEADER_LINE} bytes"))
        );
    }

    #[test]
    fn reasons_quoting_the_object_stay_short() {
        let long = "x".repeat(50_000);
        for header in [
            json!({"format": "flowarchive", "version": 1, "flow_id": "abc", "events": long, "sha256": ""}),
            json!({"format": long, "version": 1}),
            json!({"format": "flowarchive", "version": 1, "flow_id": "abc", "events": 0, "sha256": long}),
        ] {
            let e = decode(&gzip(format!("{header}\n{{}}\n").as_bytes()), "abc", 0, CAP)
                .err()
                .unwrap();
            assert!(e.to_string().len() < 300, "{e:?}");
        }
        let e = decode(
            &gzip(format!("{{}}\n{{\"x\":\"{long}\"}}").as_bytes()),
            "abc",
            0,
            CAP,
        );
        assert!(e.err().unwrap().to_string().len() < 300);
    }

    /// A header for `content` (everything after the header line), declaring `raw` bytes if given.
    fn bomb(content_len: usize, raw: Option<u64>) -> Vec<u8> {
        let mut h = json!({
            "format": "flowarchive", "version": 1, "flow_id": "abc", "events": 0,
            "sha256": "0".repeat(64),
        });
        if let Some(raw) = raw {
            h["raw_bytes"] = raw.into();
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(format!("{h}\n").as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut left = content_len;
        while left > 0 {
            let n = left.min(zeros.len());
            gz.write_all(&zeros[..n]).unwrap();
            left -= n;
        }
        gz.finish().unwrap()
    }

    #[test]
    fn gzip_bombs_stop_at_the_declared_size_or_the_cap() {
        let body = bomb(200 << 20, Some(1024));
        assert!(body.len() < 1 << 20, "{}", body.len());
        let started = std::time::Instant::now();
        let e = decode(&body, "abc", 0, 256 << 20).err().unwrap();
        assert!(matches!(e, DecodeError::TooLarge(_)), "{e}");
        assert!(e.to_string().contains("declared size of 1024"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));

        let body = bomb(8 << 20, None);
        let e = decode(&body, "abc", 0, 4 << 20).err().unwrap();
        assert!(e.to_string().contains("read cap of 4194304"), "{e}");

        let e = decode(&bomb(10, Some(1 << 30)), "abc", 0, 4 << 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("declares 1073741824 bytes"), "{e}");
    }

    #[test]
    fn many_tiny_lines_are_charged_against_the_cap() {
        let mut f = flow("abc", 0, "{}", &[]);
        f.events = vec![b"1".to_vec(); 10_000];
        let body = encode(&f).unwrap().body;
        assert!(decode(&body, "abc", 0, 1 << 20).is_ok());
        let e = decode(&body, "abc", 0, 100_000).err().unwrap();
        assert!(matches!(e, DecodeError::TooLarge(_)), "{e}");
    }

    /// Modest by default so the suite stays fast; `PROPTEST_CASES=5000 cargo test` for a long run.
    pub(crate) fn proptest_config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128);
        ProptestConfig::with_cases(cases)
    }

    fn sample() -> (Vec<u8>, Decoded) {
        let f = flow("abc", 2, r#"{"id":"abc","n":[1,2]}"#, &[("seq", "x")]);
        let body = encode(&f).unwrap().body;
        let d = decode(&body, "abc", 2, CAP).unwrap();
        (body, d)
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes, "abc", 0, CAP);
            let mut gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
            gz.extend_from_slice(&bytes);
            let _ = decode(&gz, "abc", 0, CAP);
            let _ = decode(&gzip(&bytes), "abc", 0, CAP);
        }

        #[test]
        fn truncations_are_refused(cut in any::<prop::sample::Index>()) {
            let (body, _) = sample();
            let at = cut.index(body.len());
            prop_assert!(decode(&body[..at], "abc", 2, CAP).is_err());
            let text = gunzip(&body);
            let at = cut.index(text.len());
            prop_assert!(decode(&gzip(&text.as_bytes()[..at]), "abc", 2, CAP).is_err());
        }

        #[test]
        fn bit_flips_are_refused_or_harmless(at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (body, good) = sample();
            let mut bad = body.clone();
            let i = at.index(bad.len());
            bad[i] ^= 1 << bit;
            // A flip in gzip's unchecked header fields (mtime, OS) changes nothing that is read.
            if let Ok(d) = decode(&bad, "abc", 2, CAP) {
                prop_assert!(d.events().eq(good.events()));
                prop_assert_eq!(d.flow_state, good.flow_state.clone());
            }
            // In the content, a flip may hit what no reader uses (the header's `keys`, the name of the
            // optional `raw_bytes`), never what is answered.
            let mut flipped = gunzip(&body).into_bytes();
            let i = at.index(flipped.len());
            flipped[i] ^= 1 << bit;
            if let Ok(d) = decode(&gzip(&flipped), "abc", 2, CAP) {
                prop_assert!(d.events().eq(good.events()));
                prop_assert_eq!(d.flow_state, good.flow_state.clone());
            }
        }

        #[test]
        fn bombs_stop_at_the_smaller_of_cap_and_declared(
            content in 0usize..(1 << 20),
            cap in (64u64 << 10)..(768 << 10),
            declared in prop::option::of(0u64..(1 << 20)),
        ) {
            // The object's own bytes count against the cap too.
            let body = bomb(content, declared);
            let room = cap - body.len() as u64;
            let limit = declared.map_or(room, |d| d.min(room));
            match decode(&body, "abc", 0, cap) {
                Err(DecodeError::TooLarge(_)) => prop_assert!(content as u64 > limit || declared.is_some_and(|d| d > room)),
                Err(e) => prop_assert!(content as u64 <= limit, "{e}"),
                Ok(_) => prop_assert!(false, "a bomb decoded"),
            }
        }
    }

    /// `text` (a whole object's content) with its header line padded by an unread field to exactly
    /// `len` bytes before its `\n`.
    fn padded_header(text: &str, len: usize) -> Vec<u8> {
        let (header, rest) = text.split_once('\n').unwrap();
        let mut h: Value = serde_json::from_str(header).unwrap();
        h["pad"] = "".into();
        let bare = h.to_string().len();
        h["pad"] = "p".repeat(len - bare).into();
        let line = h.to_string();
        assert_eq!(line.len(), len);
        format!("{line}\n{rest}").into_bytes()
    }

    #[test]
    fn header_lines_up_to_the_limit_read_across_buffer_fills() {
        let good = object("abc", r#"{"id":"abc"}"#);
        let want = decode(&good, "abc", 0, CAP).unwrap();
        let text = gunzip(&good);
        let max = MAX_HEADER_LINE as usize;
        let buf = HEADER_BUFFER;
        for len in [
            buf - 1,
            buf,
            buf + 1,
            2 * buf - 1,
            2 * buf,
            15 * buf + 7,
            max - 1,
            max,
        ] {
            let d = decode(&gzip(&padded_header(&text, len)), "abc", 0, CAP)
                .unwrap_or_else(|e| panic!("{len}: {e}"));
            assert!(d.events().eq(want.events()), "{len}");
            assert_eq!(d.flow_state, want.flow_state, "{len}");
        }
        for len in [max + 1, max + 2, max + buf] {
            assert_eq!(
                decode(&gzip(&padded_header(&text, len)), "abc", 0, CAP)
                    .err()
                    .unwrap(),
                corrupt(format!("header line longer than {MAX_HEADER_LINE} bytes")),
                "{len}"
            );
        }
    }

    #[test]
    fn standard_gzip_header_fields_are_skipped() {
        let good = object("abc", r#"{"id":"abc"}"#);
        let want = decode(&good, "abc", 0, CAP).unwrap();
        let text = gunzip(&good);
        let mut gz = flate2::GzBuilder::new()
            .filename("flow.jsonl")
            .comment("made elsewhere")
            .extra(vec![7u8; 300])
            .mtime(1)
            .write(Vec::new(), flate2::Compression::best());
        gz.write_all(text.as_bytes()).unwrap();
        let body = gz.finish().unwrap();
        let d = decode(&body, "abc", 0, CAP).unwrap();
        assert!(d.events().eq(want.events()));
        assert_eq!(d.flow_state, want.flow_state);
    }

    #[test]
    fn every_cut_padding_and_trailer_flip_is_refused() {
        let good = object("abc", r#"{"id":"abc"}"#);
        for at in 0..good.len() {
            assert!(decode(&good[..at], "abc", 0, CAP).is_err(), "cut at {at}");
        }
        // Zero padding of any length, an empty member, a stray gzip magic.
        let empty_member = gzip(b"");
        for tail in [
            vec![0u8; 1],
            vec![0u8; 7],
            vec![0u8; 8],
            vec![0u8; 4096],
            empty_member,
            vec![0x1f, 0x8b],
        ] {
            let body = [&good[..], &tail].concat();
            assert_eq!(
                decode(&body, "abc", 0, CAP).err().unwrap(),
                corrupt(format!("{} bytes after the gzip member", tail.len()))
            );
        }
        // The member's CRC-32 and length are checked.
        for i in good.len() - 8..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[i] ^= 1 << bit;
                assert!(decode(&bad, "abc", 0, CAP).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn a_declared_size_is_exact_either_way() {
        let good = object("abc", r#"{"id":"abc"}"#);
        let text = gunzip(&good);
        let (header, rest) = text.split_once('\n').unwrap();
        let h: Value = serde_json::from_str(header).unwrap();
        let raw = h["raw_bytes"].as_u64().unwrap();
        assert_eq!(raw, rest.len() as u64);
        for (declared, ok) in [(raw, true), (raw - 1, false), (raw + 1, false), (0, false)] {
            let mut h = h.clone();
            h["raw_bytes"] = declared.into();
            let body = gzip(format!("{h}\n{rest}").as_bytes());
            assert_eq!(decode(&body, "abc", 0, CAP).is_ok(), ok, "{declared}");
        }
        // Declared at what the cap leaves beside the object, content far shorter: refused at once,
        // with no large buffer.
        let mut h = h.clone();
        h["raw_bytes"] = ((256u64 << 20) - 4096).into();
        let body = gzip(format!("{h}\n{rest}").as_bytes());
        assert!(matches!(
            decode(&body, "abc", 0, 256 << 20),
            Err(DecodeError::Corrupt(_))
        ));
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn any_header_length_reads_or_is_refused_by_length(len in 400usize..(70 << 10)) {
            let good = object("abc", r#"{"id":"abc"}"#);
            let text = gunzip(&good);
            let body = gzip(&padded_header(&text, len));
            match decode(&body, "abc", 0, CAP) {
                Ok(_) => prop_assert!(len as u64 <= MAX_HEADER_LINE),
                Err(e) => prop_assert!(
                    len as u64 > MAX_HEADER_LINE
                        && e == corrupt(format!("header line longer than {MAX_HEADER_LINE} bytes")),
                    "{len}: {e}"
                ),
            }
        }
    }
}
