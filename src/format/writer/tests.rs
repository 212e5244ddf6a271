use super::*;
use crate::format::event_log::EventLog;
use crate::layout::{FlowKeys, Layout};
use flate2::read::GzDecoder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::Read;

/// These tests encode a layout served from its snapshot (no folded state); the fold's are below.
fn encode(f: &Captured) -> Result<Encoded, EncodeError> {
    super::encode(f, None, 0)
}

fn read_back(body: &[u8], f: &Captured, max_bytes: u64) -> Result<(), String> {
    super::read_back(body, f, None, 0, max_bytes)
}

fn gunzip_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(b).read_to_end(&mut out).unwrap();
    out
}

fn flow(events: Vec<&str>, snapshot: &str) -> Captured {
    Captured {
        id: "abc".into(),
        db: 0,
        keys: FlowKeys {
            lease: None,
            ..Layout::argyll().flow_keys("abc")
        },
        events: events.into_iter().map(|e| e.as_bytes().to_vec()).collect(),
        snapshot: Some(snapshot.as_bytes().to_vec()),
        seq: Some(1),
        labels: vec![("tenant".into(), "acme".into())],
        status: "completed".into(),
        status_score: None,
        previous: None,
    }
}

/// `log` with its event `at` replaced by `with`.
fn replaced(log: &EventLog, at: usize, with: &[u8]) -> EventLog {
    let pick = |(i, e)| if i == at { with } else { e };
    log.iter().enumerate().map(pick).collect()
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
    assert_eq!(header["version"], 2);
    assert_eq!(header["flow_id"], "abc");
    assert_eq!(header["db"], 0);
    assert_eq!(header["events"], 2);
    assert_eq!(header["keys"]["events"], "argyll:flow:abc:events");
    assert!(header.get("archived_at").is_none());
    let after_header = &text[lines[0].len() + 1..];
    assert_eq!(header["raw_bytes"], after_header.len());
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
fn a_line_break_is_found_at_any_position() {
    for len in 0..100 {
        let plain = vec![b'x'; len];
        assert!(!has_line_break(&plain), "{len}");
        for at in 0..len {
            for brk in [b'\n', b'\r'] {
                let mut json = plain.clone();
                json[at] = brk;
                assert!(has_line_break(&json), "{len} {at}");
            }
        }
    }
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
fn only_a_whole_json_object_is_a_snapshot() {
    for bad in [
        "{}garbage",
        "{} {}",
        "{}}",
        "{",
        "\u{feff}{}",
        "\"{}\"",
        "",
        " \n\t",
        "{\"a\":\"line\nbreak\"}",
        "{\"a\":\"cr\ronly\"}",
    ] {
        let err = encode(&flow(vec![], bad)).err();
        assert!(
            matches!(err, Some(EncodeError::Snapshot(_))),
            "{bad:?}: {err:?}"
        );
    }
    let mut f = flow(vec![], "{}");
    f.snapshot = Some(b"{\"a\":\"\xff\"}".to_vec());
    let err = encode(&f).err().unwrap();
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    for good in ["{}", "\r\n{}\r\n", "{\r\"a\"\r:\r1\r}", " {\"a\":[1,{}]} "] {
        let f = flow(vec![], good);
        let enc = encode(&f).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        read_back(&enc.body, &f, 1 << 20).unwrap();
    }
}

#[test]
fn line_breaks_anywhere_in_an_event_read_back() {
    // CR, LF or CRLF as whitespace at and around the scan's 32-byte block edges, and a lone CR.
    for at in [0usize, 1, 30, 31, 32, 33, 63, 64, 65, 95, 96] {
        for brk in ["\n", "\r", "\r\n"] {
            let event = format!("{{\"k\":{}{brk}\"{}\"}}", " ".repeat(at), "v".repeat(40));
            let f = flow(vec![&event, r#"{"b":2}"#], "{}");
            let enc = encode(&f).unwrap_or_else(|e| panic!("{at} {brk:?}: {e}"));
            let text = gunzip(&enc.body);
            let line = text.lines().nth(1).unwrap();
            assert!(!line.contains('\r'), "{at} {brk:?}: {line:?}");
            assert_eq!(line, format!("{{\"k\":\"{}\"}}", "v".repeat(40)));
            read_back(&enc.body, &f, 1 << 20).unwrap();
            // The flow's event replaced by its one-line form (what the object holds) reads back
            // too; one with another value does not.
            let mut other = flow(vec![&event, r#"{"b":2}"#], "{}");
            other.events = replaced(&other.events, 0, line.replace('v', "w").as_bytes());
            assert!(read_back(&enc.body, &other, 1 << 20).is_err());
        }
    }
    // A raw line break or CR inside a string is not JSON: refused, never joined.
    for bad in ["{\"a\":\"x\ny\"}", "{\"a\":\"x\ry\"}"] {
        let err = encode(&flow(vec![bad], "{}")).err().unwrap();
        assert!(err.to_string().starts_with("event 0 is not JSON"), "{err}");
    }
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

#[test]
fn encoding_is_deterministic() {
    let f = flow(vec![r#"{"a":1}"#], r#"{"id":"abc"}"#);
    let a = encode(&f).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let b = encode(&f).unwrap();
    assert_eq!(a.body, b.body);
    assert_eq!(a.object_sha256, b.object_sha256);
}

#[test]
fn gzip_is_one_standard_member_whatever_the_ratio() {
    // Empty, compressible, and incompressible enough to outgrow the first output buffer.
    let mut state = 7u64;
    let noise: Vec<u8> = (0..400_000)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect();
    let text = r#"{"a":1}"#.repeat(10_000);
    for parts in [
        vec![],
        vec![text.as_bytes(), b"\n"],
        vec![&noise[..1], &noise[1..]],
    ] {
        let body = gzip(&parts).unwrap();
        assert_eq!(body[..10], GZIP_HEADER);
        assert_eq!(gunzip_bytes(&body), parts.concat());
        assert_eq!(gzip(&parts).unwrap(), body, "deterministic");
    }
    // A fresh compressor gives the same bytes as the thread's reused one.
    let fresh = std::thread::spawn(move || gzip(&[text.as_bytes()]).unwrap());
    let _ = gzip(&[&noise]).unwrap();
    let text = r#"{"a":1}"#.repeat(10_000);
    assert_eq!(fresh.join().unwrap(), gzip(&[text.as_bytes()]).unwrap());
}

#[test]
fn refuses_events_that_are_not_utf8() {
    let mut f = flow(vec![], "{}");
    f.events = [b"\"\xff\"".as_slice()].into_iter().collect();
    let err = encode(&f).err().unwrap();
    assert!(err.to_string().contains("not UTF-8"), "{err}");
}

#[test]
fn snapshot_whitespace_around_the_object_is_not_kept() {
    let f = flow(vec![], " \t{\"id\": \"abc\"}  ");
    let enc = encode(&f).unwrap();
    assert!(gunzip(&enc.body).contains(r#"{"snapshot":{"id": "abc"},"seq""#));
    read_back(&enc.body, &f, 1 << 20).unwrap();
    assert_eq!(&*snapshot_form(b"{}"), b"{}");
    assert_eq!(&*snapshot_form(b"\n{\n \"a\" : 1\n}\n"), b"{\"a\":1}");
}

#[test]
fn read_back_accepts_the_encoding_and_nothing_else() {
    let mut f = flow(
        vec!["{\n \"type\": \"x\"\n}", r#"{"type":"y"}"#],
        r#"{"id":"abc","seq":"s"}"#,
    );
    f.labels.push(("seq".into(), "2".into()));
    let body = encode(&f).unwrap().body;
    read_back(&body, &f, 1 << 20).unwrap();

    type Change = fn(&mut Captured);
    let changes: [(&str, Change); 9] = [
        ("another flow", |f| f.id = "abd".into()),
        ("another DB", |f| f.db = 1),
        ("an event", |f| {
            f.events = replaced(&f.events, 1, br#"{"type":"z"}"#)
        }),
        ("a missing event", |f| {
            f.events = f.events.iter().take(f.events.len() - 1).collect()
        }),
        ("the snapshot", |f| {
            f.snapshot = Some(br#"{"id":"abd","seq":"s"}"#.to_vec())
        }),
        ("seq", |f| f.seq = None),
        ("the status", |f| f.status = "failed".into()),
        ("a label", |f| f.labels[0].1 = "other".into()),
        ("an extra label", |f| {
            f.labels.push(("x".into(), "y".into()))
        }),
    ];
    for (what, change) in changes {
        let mut other = flow(vec![], "{}");
        other.events = f.events.clone();
        other.snapshot = f.snapshot.clone();
        other.labels = f.labels.clone();
        change(&mut other);
        assert!(read_back(&body, &other, 1 << 20).is_err(), "{what}");
    }
    let e = read_back(&body, &f, 100).unwrap_err();
    assert!(e.contains("read-max-bytes"), "{e}");
}

mod props {
    use super::*;
    use crate::format::reader::{self, tests::proptest_config, DecodeError};
    use proptest::prelude::*;

    /// Names that collide with the format's own fields.
    const TRICKY: &[&str] = &[
        "seq",
        "snapshot",
        "events",
        "version",
        "labels",
        "status",
        "archived",
        "format",
        "flow_id",
        "db",
        "sha256",
        "raw_bytes",
    ];

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "(?s).{0,12}",
            Just("line\nbreak \"quoted\" \\ ,\"seq\":".to_string()),
            "[\"\\\\\n\r\t ,:{}é✓\u{1F600}]{0,8}",
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(TRICKY).prop_map(str::to_string),
            text()
        ]
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            text().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// Compact or pretty-printed (multi-line), as the engine may have stored it.
    fn stored(v: &Value, pretty: bool) -> Vec<u8> {
        if pretty {
            serde_json::to_vec_pretty(v).unwrap()
        } else {
            serde_json::to_vec(v).unwrap()
        }
    }

    /// A generated flow (`Captured` has no Debug, which proptest needs to report a failing case).
    #[derive(Debug, Clone)]
    struct Spec {
        id: String,
        db: i32,
        events: Vec<Vec<u8>>,
        snapshot: Vec<u8>,
        labels: Vec<(String, String)>,
        seq: Option<i64>,
        status: String,
    }

    impl Spec {
        fn captured(&self) -> Captured {
            let mut f = flow(vec![], "{}");
            f.id = self.id.clone();
            f.db = self.db;
            f.events = self.events.iter().collect();
            f.snapshot = Some(self.snapshot.clone());
            f.labels = self.labels.clone();
            f.seq = self.seq;
            f.status = self.status.clone();
            f
        }
    }

    prop_compose! {
        fn spec()(
            id in prop_oneof!["[a-z0-9:/.%é✓-]{1,24}", "(?s).{1,16}"],
            db in 0i32..16,
            events in prop::collection::vec((json(), any::<bool>()), 0..6),
            snapshot in prop::collection::vec((key(), json()), 0..5),
            pretty in any::<bool>(),
            labels in prop::collection::btree_map(key(), text(), 0..4),
            seq in any::<Option<i64>>(),
            status in text(),
        ) -> Spec {
            Spec {
                id,
                db,
                events: events.iter().map(|(v, p)| stored(v, *p)).collect(),
                snapshot: stored(&Value::Object(snapshot.into_iter().collect()), pretty),
                labels: labels.into_iter().collect(),
                seq,
                status,
            }
        }
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn encode_then_decode_round_trips(spec in spec()) {
            let f = spec.captured();
            let body = encode(&f).unwrap().body;
            prop_assert_eq!(read_back(&body, &f, 1 << 24), Ok(()));
            let whose = |db, generation| Whose { id: &f.id, db, generation };
            let open = |body: &[u8], db, generation| {
                reader::decode(body, &whose(db, generation), 1 << 24, StateSource::Snapshot)
            };
            let d = open(&body, f.db, 0).unwrap();
            let events: Vec<Vec<u8>> = f.events.iter().map(|e| single_line(e).into_owned()).collect();
            let read: Vec<Vec<u8>> = d.events().map(|e| e.as_bytes().to_vec()).collect();
            prop_assert_eq!(read, events);
            let mut state: Value = serde_json::from_str(&d.flow_state).unwrap();
            let mut expected: Value = serde_json::from_slice(f.snapshot.as_deref().unwrap_or_default()).unwrap();
            expected["archived"] = Value::Bool(true);
            state["archived"] = Value::Bool(true);
            prop_assert_eq!(state, expected);
            prop_assert_eq!(
                open(&body, f.db + 1, 0).err(),
                Some(DecodeError::OtherKeyspace(f.db.into()))
            );
            prop_assert_eq!(open(&body, f.db, 1).err(), Some(DecodeError::OtherGeneration(0)));
            prop_assert_eq!(encode(&f).unwrap().body, body, "deterministic");
            // Written again for another generation, it is byte for byte the object encoded for it,
            // and read only from that generation's key.
            let mut written = encode(&f).unwrap();
            for (from, to) in [(0, 12), (12, 3)] {
                written = regenerate(&written, from, &whose(f.db, to), 1 << 24).unwrap();
                let direct = crate::format::writer::encode(&f, None, to).unwrap();
                prop_assert_eq!(&written.body, &direct.body);
                prop_assert_eq!(written.raw_bytes, direct.raw_bytes);
                prop_assert_eq!(written.object_sha256, direct.object_sha256);
                prop_assert_eq!(written.object_md5, direct.object_md5);
                prop_assert!(open(&written.body, f.db, to).is_ok());
                prop_assert_eq!(open(&written.body, f.db, from).err(), Some(DecodeError::OtherGeneration(to.into())));
            }
        }
    }
}

/// The block scan finds every line break a byte-by-byte scan finds.
#[test]
fn the_line_break_scan_finds_every_break() {
    crate::format::assert_scan_agrees(&LINE_BREAK);
}
