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
    crate::format::writer::encode(f, None, 0)
}

/// An object read from generation 0's key.
fn decode(object: &[u8], id: &str, db: i32, max: u64) -> Result<Decoded, DecodeError> {
    let whose = Whose {
        id,
        db,
        generation: 0,
    };
    super::decode(object, &whose, max, StateSource::Snapshot)
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
        events: [
            br#"{"type":"flow_started"}"#.as_slice(),
            br#"{"type":"flow_completed","n":2.50}"#,
        ]
        .into_iter()
        .collect(),
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
    // Its other members as they were, in their order, ours last.
    let state = r#"{"z":{"archived":1,"n":[1.50,"\u00e9"]},"archived":[{}],"a\"b":null}"#;
    let d = decode(&object("g", state), "g", 0, CAP).unwrap();
    assert_eq!(
        d.flow_state,
        r#"{"z":{"archived":1,"n":[1.50,"\u00e9"]},"a\"b":null,"archived":true}"#
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
    let whose = Whose {
        id: "abc",
        db: 0,
        generation: 0,
    };
    let o = parse(&encode(&f).unwrap().body, &whose, CAP).unwrap();
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
    f.events = std::iter::repeat_n(b"1", 10_000).collect();
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
