use super::*;

fn any_round_trip(input: &str) -> Result<String, String> {
    let mut r = check(input.as_bytes()).map_err(|e| e.to_string())?;
    let mut v = Any::default();
    v.decode(&mut r).map_err(|e| e.to_string())?;
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
    v.decode(&mut check(raw).unwrap()).unwrap();
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
    // Nested objects out of order inside objects out of order, and in a duplicate that is dropped;
    // keys sort by their bytes, not by how they are escaped.
    assert_eq!(
        any_round_trip(
            r#"{"z":{"y":1,"x":{"q":[{"d":0,"c":0}],"p":2}},"a":{"k":{"j":1,"i":2}},"z":{"n":{"m":1,"l":2},"b":1},"\u003c":1,"\"":2,"a\u00e9":3,"ab":4,"\u00e9":5}"#
        )
        .unwrap(),
        r#"{"\"":2,"\u003c":1,"a":{"k":{"i":2,"j":1}},"ab":4,"aé":3,"z":{"b":1,"n":{"l":2,"m":1}},"é":5}"#
    );
    assert_eq!(
        any_round_trip(
            r#"[{"b":[{"d":1,"c":2}],"a":0},{"a":1},{"b":{},"b":[],"a":{"c":1,"c":2}}]"#
        )
        .unwrap(),
        r#"[{"a":0,"b":[{"c":2,"d":1}]},{"a":1},{"a":{"c":2},"b":[]}]"#
    );
}

/// Objects out of order nested as deep as Go allows are written in one pass, on a small stack.
#[test]
fn any_nested_as_deep_as_go_allows_is_written_on_a_small_stack() {
    let depth = MAX_DEPTH - 1;
    let input = r#"{"b":0,"a":"#.repeat(depth) + "[]" + &"}".repeat(depth);
    let expected = r#"{"a":"#.repeat(depth) + "[]" + &r#","b":0}"#.repeat(depth);
    let written = std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(move || any_round_trip(&input))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(written.unwrap(), expected);
}

/// A value kept aside (`skip`) is the value's exact text, whatever it holds.
#[test]
fn skipped_values_are_their_text() {
    let doc = br#"{"a" : [1, "]}\"", {"b":[]}] , "c":-1.5e3,"d":"x\\","e":true}"#;
    let mut r = check(doc).unwrap();
    assert!(r.object());
    let mut seen = Vec::new();
    while let Some(key) = r.key().unwrap() {
        seen.push((key.text().into_owned(), r.skip().unwrap().0.to_vec()));
    }
    let text = |s: &str| s.as_bytes().to_vec();
    assert_eq!(
        seen,
        [
            ("a".into(), text(r#"[1, "]}\"", {"b":[]}]"#)),
            ("c".into(), text("-1.5e3")),
            ("d".into(), text(r#""x\\""#)),
            ("e".into(), text("true")),
        ]
    );
}

/// `accepts` answers as `decode` does, for every type and every kind of value.
#[test]
fn accepting_agrees_with_decoding() {
    fn agree<T: Decode + Default>(input: &str) {
        let accepted = T::accepts(&mut check(input.as_bytes()).unwrap());
        let decoded = T::default().decode(&mut check(input.as_bytes()).unwrap());
        assert_eq!(accepted.is_ok(), decoded.is_ok(), "{input}: {decoded:?}");
    }
    for input in [
        "null",
        "true",
        "0",
        "-1",
        "1.5",
        "1e400",
        "\"x\"",
        "\"2026-03-18T09:14:03Z\"",
        "\"2026-03-18T09:14:03\\u005a\"",
        "[]",
        "[null]",
        "[1e400]",
        "[\"a\",1]",
        "{}",
        r#"{"a":1e400}"#,
        r#"{"a":"b"}"#,
        r#"{"a":null}"#,
        r#"{"id":1}"#,
        r#"{"ID":"x","l":[1]}"#,
        r#"{"p":{"n":1.5}}"#,
        r#"{"p":null,"m":{"a":"1e400"}}"#,
        r#"["1e999",{"k":-0}]"#,
    ] {
        agree::<String>(input);
        agree::<i64>(input);
        agree::<bool>(input);
        agree::<GoTime>(input);
        agree::<Any>(input);
        agree::<GoMap<String>>(input);
        agree::<GoSlice<Any>>(input);
        agree::<Ptr<Probe>>(input);
    }
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
        assert!(check(bad.as_bytes()).is_err(), "{bad:?}");
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
        assert!(check(good.as_bytes()).is_ok(), "{good:?}");
    }
}

#[test]
fn nesting_is_bounded_as_go_bounds_it() {
    let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
    assert!(check(deep(MAX_DEPTH).as_bytes()).is_ok());
    assert_eq!(
        check(deep(MAX_DEPTH + 1).as_bytes()).err().map(|e| e.what),
        Some("exceeded max depth")
    );
    let objects = |n: usize| "{\"a\":".repeat(n) + "null" + &"}".repeat(n);
    assert!(check(objects(MAX_DEPTH).as_bytes()).is_ok());
    assert!(check(objects(MAX_DEPTH + 1).as_bytes()).is_err());
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
    let mut r = check(input.as_bytes()).map_err(|e| e.to_string())?;
    let accepted = Probe::accepts(&mut check(input.as_bytes()).unwrap());
    let decoded = p.decode(&mut r);
    assert_eq!(accepted.is_ok(), decoded.is_ok(), "{input}");
    decoded.map_err(|e| e.to_string())?;
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

/// `s` as Go's string writer writes it.
fn written(s: &str) -> String {
    let mut out = Vec::new();
    super::write::write_str(&mut out, s);
    String::from_utf8(out).unwrap()
}

#[test]
fn strings_escape_only_what_go_escapes_around_multibyte_characters() {
    // U+2027, U+2068 and U+20AC share bytes with U+2028/2029 and are written as they are; U+2028 and
    // U+2029 are escaped wherever they stand, next to other multibyte characters too.
    assert_eq!(written("\u{2027}\u{2068}€"), "\"\u{2027}\u{2068}€\"");
    assert_eq!(written("\u{2028}"), "\"\\u2028\"");
    assert_eq!(written("é\u{2029}😀\u{2028}x"), "\"é\\u2029😀\\u2028x\"");
    assert_eq!(
        written("a<b>&\u{1}\u{1f}\u{7f}"),
        "\"a\\u003cb\\u003e\\u0026\\u0001\\u001f\u{7f}\""
    );
    assert_eq!(written(""), "\"\"");
    assert_eq!(
        written("plain text, no escape"),
        "\"plain text, no escape\""
    );
}

#[test]
fn long_strings_escape_as_their_characters_do_one_by_one() {
    // Each character alone takes the byte-by-byte path; in a long text most of it is passed in
    // blocks, wherever the escapes fall relative to them.
    let one_by_one = |s: &str| {
        let inner: String = s
            .chars()
            .map(|c| {
                let w = written(&c.to_string());
                w[1..w.len() - 1].to_string()
            })
            .collect();
        format!("\"{inner}\"")
    };
    for special in [
        "\"", "\\", "\n", "\u{1}", "<", "&", "\u{2028}", "\u{2029}", "\u{2027}", "é",
    ] {
        for at in 0..80 {
            let s = format!(
                "{}{special}{}{special}x",
                "a".repeat(at),
                "b".repeat(90 - at)
            );
            assert_eq!(written(&s), one_by_one(&s), "{special:?} at {at}");
        }
    }
}

/// Long texts are passed in blocks (`find_marked`): wherever a quote, an escape, a bracket or a
/// control character falls in a block, checking and skipping see it.
#[test]
fn long_texts_are_checked_and_skipped_wherever_their_marks_fall() {
    for at in 0..80 {
        let (before, after) = ("a".repeat(at), "b".repeat(90 - at));
        let value = format!(r#"["{before}\"{after}", {{"k":"{before}"}}, "{after}\\"]"#);
        let doc = format!(r#"{{"a":{value},"b":1}}"#);
        let mut r = check(doc.as_bytes()).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert!(r.object());
        assert_eq!(r.key().unwrap().unwrap().text(), "a");
        assert_eq!(r.skip().unwrap().0, value.as_bytes(), "{at}");
        assert_eq!(r.key().unwrap().unwrap().text(), "b");
        let control = format!("[\"{before}\u{1}{after}\"]");
        let refused = check(control.as_bytes()).err().map(|e| (e.at, e.what));
        assert_eq!(refused, Some((2 + at, "control character in string")));
    }
}

/// Go's checker against serde_json's, on JSON texts with long strings and runs of text (which the
/// checker passes in blocks) and on the same texts cut, spliced or with one byte changed: where the
/// bytes are UTF-8 (the checker, as Go, does not look at UTF-8 inside strings) the two agree on every
/// text, valid or not.
mod against_serde {
    use proptest::prelude::*;

    use super::check;
    use crate::format::reader::tests::proptest_config;

    fn value() -> impl Strategy<Value = serde_json::Value> {
        let text = "[ -~\u{e9}\u{2713}\n\t\"\\\\]{0,80}";
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            text.prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                prop::collection::btree_map(text, inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// One change to `json`: a byte replaced, removed or inserted, the text cut, or a piece of it
    /// repeated.
    fn changed(json: Vec<u8>, how: u8, at: usize, with: u8) -> Vec<u8> {
        let at = at % (json.len() + 1);
        let mut out = json.clone();
        match how % 5 {
            0 if at < json.len() => out[at] = with,
            1 if at < json.len() => {
                out.remove(at);
            }
            2 => out.insert(at, with),
            3 => out.truncate(at),
            _ => out.extend_from_slice(&json[at..]),
        }
        out
    }

    fn agree(bytes: &[u8]) -> Result<(), TestCaseError> {
        if std::str::from_utf8(bytes).is_err() {
            return Ok(());
        }
        let serde = serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok();
        let go = check(bytes).is_ok();
        prop_assert_eq!(go, serde, "{:?}", String::from_utf8_lossy(bytes));
        Ok(())
    }

    proptest! {
        #![proptest_config(proptest_config())]

        #[test]
        fn the_checker_agrees_with_serde_json(
            v in value(),
            pretty in any::<bool>(),
            how in any::<u8>(),
            at in any::<usize>(),
            with in prop_oneof![
                Just(b'"'), Just(b'\\'), Just(b'{'), Just(b'}'), Just(b'['), Just(b']'),
                Just(b','), Just(b':'), Just(b' '), Just(0x01), Just(b'x'), Just(b'0'),
            ],
        ) {
            let json = match pretty {
                true => serde_json::to_vec_pretty(&v).unwrap(),
                false => serde_json::to_vec(&v).unwrap(),
            };
            agree(&json)?;
            prop_assert!(check(&json).is_ok());
            agree(&changed(json, how, at, with))?;
        }
    }
}

/// The block scan finds what a byte-by-byte scan finds, for every set Go's JSON code scans for.
#[test]
fn the_scans_find_every_mark_a_byte_by_byte_scan_finds() {
    crate::format::assert_scan_agrees(&STRING_STOP);
    crate::format::assert_scan_agrees(&STRUCTURAL);
    crate::format::assert_scan_agrees(&write::MAY_ESCAPE);
}

/// Go's encoding/json (1.26) writing 2,014 float64 values, each with its bits: random bit patterns,
/// integers past 2^53, and quarter, eighth and half fractions near 2^50 to 2^53, where the shortest
/// text takes 17 digits and the exact value can lie halfway between two such texts (Go takes the one
/// ending in an even digit). Generated by a Go program marshalling each value.
const GO_FLOATS: &str = include_str!("../testdata/go_floats.json");

#[test]
fn floats_are_written_as_go_writes_them() {
    let cases: Vec<(String, String)> = serde_json::from_str(GO_FLOATS).unwrap();
    assert!(cases.len() > 2000);
    let mut wrong = Vec::new();
    for (bits, go) in &cases {
        let f = f64::from_bits(u64::from_str_radix(bits, 16).unwrap());
        let mut out = Vec::new();
        write_f64(&mut out, f);
        if out != go.as_bytes() {
            wrong.push(format!(
                "{f:e}: {} against Go's {go}",
                String::from_utf8_lossy(&out)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}: {wrong:#?}",
        wrong.len(),
        cases.len()
    );
}
