//! The archive object: one gzipped JSONL file per flow (see docs/FORMAT.md).
//!
//! Line 1 is a header, then one line per event in log order, then a trailer holding the final snapshot.
//! The header carries the sha256 of every byte after it, so a reader can prove the lines are complete.

use std::borrow::Cow;
use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;
use md5::Md5;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::capture::Captured;
use crate::clock;
use crate::layout::hex;

pub const FORMAT_NAME: &str = "flowarchive";
pub const FORMAT_VERSION: u64 = 1;
/// Level 1 keeps compression off the critical path; event JSON still shrinks about 8x.
const GZIP_LEVEL: u32 = 1;

/// The encoded object, ready for upload.
pub struct Encoded {
    pub body: Vec<u8>,
    /// Uncompressed JSONL size, header included.
    pub raw_bytes: u64,
    pub object_sha256: [u8; 32],
    pub object_md5: [u8; 16],
}

#[derive(Debug)]
pub enum EncodeError {
    Event { index: usize, reason: String },
    Snapshot(String),
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncodeError::Event { index, reason } => {
                write!(f, "event {index} is not JSON: {reason}")
            }
            EncodeError::Snapshot(reason) => write!(f, "snapshot is not a JSON object: {reason}"),
        }
    }
}

/// Removes whitespace outside strings. Only used when a stored value spans several lines, which JSONL
/// cannot hold; tokens stay byte-identical.
fn single_line(json: &[u8]) -> Cow<'_, [u8]> {
    if !json.iter().any(|&b| b == b'\n' || b == b'\r') {
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
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_str = b == b'"';
            out.push(b);
        }
    }
    Cow::Owned(out)
}

fn check_json(bytes: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Builds header, event lines and trailer, gzips them and hashes the object. Runs on a worker thread.
pub fn encode(flow: &Captured) -> Result<Encoded, EncodeError> {
    let mut lines: Vec<Cow<[u8]>> = Vec::with_capacity(flow.events.len() + 1);
    for (index, event) in flow.events.iter().enumerate() {
        check_json(event).map_err(|reason| EncodeError::Event { index, reason })?;
        lines.push(single_line(event));
    }
    let snapshot = single_line(&flow.snapshot);
    match serde_json::from_slice::<Value>(&snapshot) {
        Ok(Value::Object(_)) => {}
        Ok(_) => return Err(EncodeError::Snapshot("not an object".into())),
        Err(e) => return Err(EncodeError::Snapshot(e.to_string())),
    }
    let labels: Map<String, Value> = flow
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    // The snapshot is spliced in verbatim rather than re-serialized, so numbers and key order survive.
    let mut trailer = br#"{"snapshot":"#.to_vec();
    trailer.extend_from_slice(&snapshot);
    let rest = json!({"seq": flow.seq, "labels": labels, "status": flow.status});
    let rest = rest.to_string();
    trailer.push(b',');
    trailer.extend_from_slice(&rest.as_bytes()[1..]);
    lines.push(Cow::Owned(trailer));

    let mut content = Sha256::new();
    let mut raw_bytes = 0u64;
    for line in &lines {
        content.update(line);
        content.update(b"\n");
        raw_bytes += line.len() as u64 + 1;
    }
    let header = json!({
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "flow_id": flow.id,
        "events": flow.events.len(),
        "sha256": hex(&content.finalize()),
        "archived_at": clock::format_rfc3339_ms(clock::now_ms()),
        "keys": {
            "events": flow.keys.events,
            "snapshot": flow.keys.snapshot,
            "seq": flow.keys.seq,
            "labels": flow.keys.labels,
        },
    })
    .to_string();
    raw_bytes += header.len() as u64 + 1;

    let mut gz = GzEncoder::new(
        Vec::with_capacity((raw_bytes / 6) as usize + 64),
        Compression::new(GZIP_LEVEL),
    );
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(header.as_bytes());
    let _ = gz.write_all(b"\n");
    for line in &lines {
        let _ = gz.write_all(line);
        let _ = gz.write_all(b"\n");
    }
    let body = gz.finish().unwrap_or_default();
    Ok(Encoded {
        object_sha256: Sha256::digest(&body).into(),
        object_md5: Md5::digest(&body).into(),
        body,
        raw_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::FlowKeys;
    use flate2::read::GzDecoder;
    use std::io::Read;

    fn flow(events: Vec<&str>, snapshot: &str) -> Captured {
        Captured {
            id: "abc".into(),
            db: 0,
            keys: FlowKeys {
                events: "argyll:flow:abc:events".into(),
                snapshot: "argyll:flow:abc:snapshot:val".into(),
                seq: Some("argyll:flow:abc:snapshot:seq".into()),
                labels: Some("argyll:flow:abc:idx:labels".into()),
                status_hash: Some("argyll:idx:status".into()),
                member: "flow:abc".into(),
                index: "archived:flows".into(),
            },
            events: events.into_iter().map(|e| e.as_bytes().to_vec()).collect(),
            snapshot: snapshot.as_bytes().to_vec(),
            seq: Some(1),
            labels: vec![("tenant".into(), "acme".into())],
            status: "completed".into(),
            status_score: None,
        }
    }

    fn gunzip(b: &[u8]) -> String {
        let mut s = String::new();
        GzDecoder::new(b).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn writes_header_events_trailer() {
        let events = vec![
            r#"{"type":"flow_started","data":{"flow_id":"abc"}}"#,
            r#"{"timestamp":"2026-03-18T09:14:03Z","type":"flow_completed","data":{}}"#,
        ];
        let snap = r#"{"id":"abc","status":"completed","n":1.50}"#;
        let enc = encode(&flow(events.clone(), snap)).unwrap();
        let text = gunzip(&enc.body);
        assert_eq!(enc.raw_bytes as usize, text.len());
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 4);
        let header: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(header["format"], "flowarchive");
        assert_eq!(header["version"], 1);
        assert_eq!(header["flow_id"], "abc");
        assert_eq!(header["events"], 2);
        assert_eq!(header["keys"]["events"], "argyll:flow:abc:events");
        let after_header = &text[lines[0].len() + 1..];
        assert_eq!(
            header["sha256"],
            hex(&Sha256::digest(after_header.as_bytes()))
        );
        assert_eq!(lines[1], events[0]);
        assert_eq!(lines[2], events[1]);
        assert!(lines[3].starts_with(r#"{"snapshot":{"id":"abc","status":"completed","n":1.50},"#));
        let trailer: Value = serde_json::from_str(lines[3]).unwrap();
        assert_eq!(trailer["seq"], 1);
        assert_eq!(trailer["labels"]["tenant"], "acme");
        assert_eq!(trailer["status"], "completed");
        assert_eq!(
            enc.object_sha256,
            <[u8; 32]>::from(Sha256::digest(&enc.body))
        );
    }

    #[test]
    fn multi_line_values_become_one_line() {
        let enc = encode(&flow(
            vec!["{\n  \"type\": \"a b\\n\\\"c\",\r\n  \"x\": 1\n}"],
            "{\n \"id\": \"abc\"\n}",
        ))
        .unwrap();
        let text = gunzip(&enc.body);
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], r#"{"type":"a b\n\"c","x":1}"#);
        assert!(lines[2].starts_with(r#"{"snapshot":{"id":"abc"},"#));
    }

    #[test]
    fn refuses_non_json() {
        let err = encode(&flow(vec!["{}", "not json"], "{}")).err().unwrap();
        assert!(err.to_string().starts_with("event 1 is not JSON"), "{err}");
        let err = encode(&flow(vec![], "[1]")).err().unwrap();
        assert!(err.to_string().contains("snapshot is not a JSON object"));
        let err = encode(&flow(vec![], "{\"a\":")).err().unwrap();
        assert!(err.to_string().contains("snapshot is not a JSON object"));
    }

    #[test]
    fn empty_log_and_labels() {
        let mut f = flow(vec![], r#"{"id":"abc"}"#);
        f.labels.clear();
        f.seq = None;
        let text = gunzip(&encode(&f).unwrap().body);
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 2);
        let trailer: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(trailer["labels"], json!({}));
        assert_eq!(trailer["seq"], Value::Null);
    }
}
