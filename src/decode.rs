//! Reading an archive object back (docs/FORMAT.md), all or nothing: any defect is an error, never a
//! partially decoded flow.

use std::io::Read;

use flate2::read::GzDecoder;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::encode::{FORMAT_NAME, FORMAT_VERSION};
use crate::layout::hex;

/// An archived flow, ready to answer: the FlowState with `"archived":true`, and the events.
pub struct Decoded {
    pub flow_state: String,
    pub events: Vec<String>,
}

impl Decoded {
    /// Approximate memory held, for the cache budget.
    pub fn size(&self) -> usize {
        self.flow_state.len() + self.events.iter().map(|e| e.len() + 24).sum::<usize>() + 64
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
    UnknownVersion(String),
}

impl DecodeError {
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Corrupt(_) => "corrupt",
            DecodeError::Checksum(_) => "checksum",
            DecodeError::OtherFlow(_) => "other_flow",
            DecodeError::UnknownVersion(_) => "unknown_version",
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Corrupt(why) => write!(f, "archived object is corrupt: {why}"),
            DecodeError::Checksum(why) => write!(f, "archived object fails its checksum: {why}"),
            DecodeError::OtherFlow(other) => {
                write!(f, "archived object belongs to another flow ({other:?})")
            }
            DecodeError::UnknownVersion(v) => {
                write!(f, "archived object has an unknown format ({v})")
            }
        }
    }
}

fn corrupt(why: impl Into<String>) -> DecodeError {
    DecodeError::Corrupt(why.into())
}

/// Adds `"archived":true` to a FlowState object without re-serializing it.
fn mark_archived(snapshot: &str) -> Result<String, DecodeError> {
    let body = snapshot.trim_end();
    let inner = body
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .ok_or_else(|| corrupt("trailer snapshot is not an object"))?;
    let parsed: Value =
        serde_json::from_str(body).map_err(|e| corrupt(format!("trailer snapshot: {e}")))?;
    if parsed.get("archived").is_some() {
        let mut obj = parsed;
        obj["archived"] = Value::Bool(true);
        return Ok(obj.to_string());
    }
    Ok(if inner.trim().is_empty() {
        r#"{"archived":true}"#.to_string()
    } else {
        format!("{{{inner},\"archived\":true}}")
    })
}

/// Decompresses and checks an object: format, version, flow id, line count and content sha256.
pub fn decode(object: &[u8], expected_id: &str) -> Result<Decoded, DecodeError> {
    let mut text = String::new();
    GzDecoder::new(object)
        .read_to_string(&mut text)
        .map_err(|e| corrupt(format!("gzip: {e}")))?;
    let (header_line, rest) = text
        .split_once('\n')
        .ok_or_else(|| corrupt("no header line"))?;
    let header: Value =
        serde_json::from_str(header_line).map_err(|e| corrupt(format!("header: {e}")))?;
    if header["format"] != FORMAT_NAME || header["version"] != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(format!(
            "format {} version {}",
            header["format"], header["version"]
        )));
    }
    let id = header["flow_id"]
        .as_str()
        .ok_or_else(|| corrupt("header has no flow_id"))?;
    if id != expected_id {
        return Err(DecodeError::OtherFlow(id.to_string()));
    }
    let recorded = header["sha256"]
        .as_str()
        .ok_or_else(|| corrupt("header has no sha256"))?;
    let actual = hex(&Sha256::digest(rest.as_bytes()));
    if recorded != actual {
        return Err(DecodeError::Checksum(format!(
            "lines hash to {actual}, header says {recorded}"
        )));
    }
    let count = header["events"]
        .as_u64()
        .ok_or_else(|| corrupt("header has no event count"))? as usize;
    let body = rest
        .strip_suffix('\n')
        .ok_or_else(|| corrupt("last line is cut short"))?;
    let mut lines: Vec<&str> = body.split('\n').collect();
    if lines.len() != count + 1 {
        return Err(corrupt(format!(
            "{} lines for {count} events and a trailer",
            lines.len()
        )));
    }
    let trailer_line = lines.pop().unwrap_or_default();
    let trailer: Value =
        serde_json::from_str(trailer_line).map_err(|e| corrupt(format!("trailer: {e}")))?;
    if !trailer["snapshot"].is_object() {
        return Err(corrupt("trailer has no snapshot object"));
    }
    // The snapshot's own bytes, as spliced in by the encoder: between `{"snapshot":` and `,"seq":`.
    let snapshot = trailer_line
        .strip_prefix(r#"{"snapshot":"#)
        .and_then(|s| s.rfind(r#","seq":"#).map(|end| &s[..end]))
        .ok_or_else(|| corrupt("trailer layout"))?;
    Ok(Decoded {
        flow_state: mark_archived(snapshot)?,
        events: lines.into_iter().map(str::to_string).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Captured;
    use crate::encode::encode;
    use crate::layout::FlowKeys;
    use std::io::Write;

    fn object(id: &str, snapshot: &str) -> Vec<u8> {
        let flow = Captured {
            id: id.into(),
            db: 0,
            keys: FlowKeys {
                events: "e".into(),
                snapshot: "s".into(),
                seq: None,
                labels: None,
                status_hash: None,
                member: "flow:x".into(),
                index: "archived:flows".into(),
            },
            events: vec![
                br#"{"type":"flow_started"}"#.to_vec(),
                br#"{"type":"flow_completed","n":2.50}"#.to_vec(),
            ],
            snapshot: snapshot.as_bytes().to_vec(),
            seq: Some(1),
            labels: vec![],
            status: "completed".into(),
            status_score: None,
        };
        encode(&flow).unwrap().body
    }

    fn gzip(text: &str) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn round_trips_with_the_archived_flag() {
        let d = decode(&object("abc", r#"{"id":"abc","n":1.50,"seq":"x"}"#), "abc").unwrap();
        assert_eq!(
            d.flow_state,
            r#"{"id":"abc","n":1.50,"seq":"x","archived":true}"#
        );
        assert_eq!(
            d.events,
            [
                r#"{"type":"flow_started"}"#,
                r#"{"type":"flow_completed","n":2.50}"#
            ]
        );
        let d = decode(&object("e", "{}"), "e").unwrap();
        assert_eq!(d.flow_state, r#"{"archived":true}"#);
        let d = decode(&object("f", r#"{"archived":false,"id":"f"}"#), "f").unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&d.flow_state).unwrap()["archived"],
            true
        );
    }

    #[test]
    fn refuses_every_defect() {
        let good = object("abc", r#"{"id":"abc"}"#);
        assert_eq!(
            decode(&good, "abd").err().unwrap(),
            DecodeError::OtherFlow("abc".into())
        );
        assert!(matches!(
            decode(b"plain text", "abc"),
            Err(DecodeError::Corrupt(_))
        ));
        assert!(matches!(
            decode(&good[..good.len() / 2], "abc"),
            Err(DecodeError::Corrupt(_))
        ));

        let text = {
            let mut s = String::new();
            GzDecoder::new(&good[..]).read_to_string(&mut s).unwrap();
            s
        };
        let tampered = text.replace("flow_completed", "flow_completeD");
        assert!(matches!(
            decode(&gzip(&tampered), "abc"),
            Err(DecodeError::Checksum(_))
        ));
        let future = text.replacen("\"version\":1", "\"version\":2", 1);
        assert!(matches!(
            decode(&gzip(&future), "abc"),
            Err(DecodeError::UnknownVersion(_))
        ));
        let (header, rest) = text.split_once('\n').unwrap();
        let dropped: Vec<&str> = rest.lines().skip(1).collect();
        let short = format!("{header}\n{}\n", dropped.join("\n"));
        assert!(decode(&gzip(&short), "abc").is_err());
        let no_newline = text.trim_end();
        assert!(decode(&gzip(no_newline), "abc").is_err());
    }
}
