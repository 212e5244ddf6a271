use super::*;

/// The inverse of `escape_id`.
fn unescape_id(escaped: &str) -> Option<String> {
    let b = escaped.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = escaped.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[test]
fn keys_of_different_kinds_can_meet_or_not() {
    let meet = |a: &str, b: &str| can_meet(&pattern(a, "p"), &pattern(b, "p"));
    assert!(meet("$prefix:flow:$id", "$prefix:flow:$id:snap"));
    assert!(meet("a:$id", "$id:b"));
    assert!(meet("$id", "anything"));
    assert!(!meet(
        "$prefix:flow:$id:events",
        "$prefix:flow:$id:snapshot:val"
    ));
    assert!(!meet(
        "$prefix:flow:$id:events",
        "$prefix:idx:status:$status"
    ));
    assert!(!meet("x$id", "y$id"));
    assert!(!meet("archived:flows", "p:flow:$id:events"));
    let index = |i: &str, other: &str| {
        index_patterns(i, "p")
            .iter()
            .any(|ip| can_meet(ip, &pattern(other, "p")))
    };
    assert!(index("archived", "archived:u17"));
    assert!(index("archived", "archived:{x}:meta"));
    assert!(!index("archived", "archived:ux"));
    assert!(!index("eng:{$id}:archived", "eng:{$id}:log"));
    assert!(index("eng:{$id}:archived", "eng:{$id}:archived:s$id"));
}

#[test]
fn the_default_layout_is_sound_and_collisions_are_refused() {
    assert_eq!(Layout::argyll().check_keys(), Ok(()));
    for (index, clash) in [
        ("argyll:flow:$id:idx:labels", "labels-key"),
        ("argyll:idx:status", "status-key"),
        ("$prefix:idx:label:tenant", "label-values-key"),
        ("$prefix:flow:x:events", "events-key"),
    ] {
        let l = Layout {
            index: index.into(),
            ..Layout::argyll()
        };
        let e = l.check_keys().unwrap_err();
        assert!(e.contains(clash) && e.contains("index-key"), "{index}: {e}");
    }
    let l = Layout {
        earlier_indexes: vec!["argyll:idx:status".into()],
        ..Layout::argyll()
    };
    assert!(l.check_keys().unwrap_err().contains("index-read-keys"));
    let l = Layout {
        events: "$prefix:idx:status:$id".into(),
        ..Layout::argyll()
    };
    assert!(l.check_keys().unwrap_err().contains("status-set-key"));
    let l = Layout {
        events: "$prefix:flow:$id".into(),
        snapshot: "$prefix:flow:$id:snapshot".into(),
        ..Layout::argyll()
    };
    assert!(l.check_keys().unwrap_err().contains("snapshot-key"));
}

#[test]
fn renders_the_default_layout() {
    let l = Layout::argyll();
    let k = l.flow_keys("abc:step-1:tok");
    assert_eq!(k.events, "argyll:flow:abc:step-1:tok:events");
    assert_eq!(k.snapshot, "argyll:flow:abc:step-1:tok:snapshot:val");
    assert_eq!(
        k.seq.as_deref(),
        Some("argyll:flow:abc:step-1:tok:snapshot:seq")
    );
    assert_eq!(
        k.labels.as_deref(),
        Some("argyll:flow:abc:step-1:tok:idx:labels")
    );
    assert_eq!(k.status_hash.as_deref(), Some("argyll:idx:status"));
    assert_eq!(k.member, "flow:abc:step-1:tok");
    assert_eq!(
        k.lease.as_deref(),
        Some("argyll:archive:lease:abc:step-1:tok")
    );
    assert_eq!(k.index, "archived:flows");
    assert_eq!(
        l.status_set_key("abc", "failed").as_deref(),
        Some("argyll:idx:status:failed")
    );
    assert_eq!(
        l.label_set_key("abc", "tenant", "acme").as_deref(),
        Some("argyll:idx:label:tenant:acme")
    );
    assert_eq!(
        l.label_values_key("abc", "tenant").as_deref(),
        Some("argyll:idx:label:tenant")
    );
    assert!(l.is_terminal("failed") && !l.is_terminal("active"));
}

#[test]
fn inverts_member_and_snapshot_templates() {
    let mut l = Layout::argyll();
    assert_eq!(
        l.id_of_member("flow:abc:step:tok").as_deref(),
        Some("abc:step:tok")
    );
    assert_eq!(l.id_of_member("job:abc"), None);
    assert_eq!(l.id_of_member("flow:"), None);
    assert_eq!(
        l.id_of_scanned_key("argyll:flow:a:b:events").as_deref(),
        Some("a:b")
    );
    assert_eq!(l.id_of_scanned_key("argyll:flow:a:snapshot:val"), None);
    assert_eq!(l.scan_pattern().as_deref(), Some("argyll:flow:*:events"));
    l.state = StateSource::Snapshot;
    assert_eq!(
        l.id_of_scanned_key("argyll:flow:a:b:snapshot:val")
            .as_deref(),
        Some("a:b")
    );
    assert_eq!(l.id_of_scanned_key("argyll:flow:a:events"), None);
    assert_eq!(
        l.scan_pattern().as_deref(),
        Some("argyll:flow:*:snapshot:val")
    );
    l.prefix = "we[ir]d*".into();
    l.snapshot = "$prefix:{$id}:state".into();
    assert_eq!(
        l.scan_pattern().as_deref(),
        Some("we\\[ir\\]d\\*:{*}:state")
    );
    assert_eq!(
        l.id_of_scanned_key("we[ir]d*:{j1}:state").as_deref(),
        Some("j1")
    );
}

#[test]
fn keeps_hash_tags_and_dollars() {
    let v = Vars {
        prefix: "p",
        id: "x",
        ..Vars::default()
    };
    assert_eq!(render("$prefix:{flow:$id}:events", &v), "p:{flow:x}:events");
    assert_eq!(render("a$$b:$id", &v), "a$b:x");
    assert_eq!(render("$id$$$$:$prefix", &v), "x$$:p");
    assert_eq!(render("$id:$", &v), "$id:$", "a lone $ names nothing");
    // A template `validate` refuses renders as written.
    assert_eq!(render("$id:$nope:x", &v), "$id:$nope:x");
    assert_eq!(render("", &v), "");
}

#[test]
fn validates_placeholders() {
    assert!(validate("$prefix:flow:$id:events", &["prefix", "id"], &["id"]).is_ok());
    assert!(validate("$prefix:flow:events", &["prefix", "id"], &["id"])
        .unwrap_err()
        .contains("$id"));
    assert!(validate("$prefix:$idx", &["prefix", "id"], &[])
        .unwrap_err()
        .contains("unknown placeholder"));
    assert!(validate("$status", &["prefix", "id"], &[])
        .unwrap_err()
        .contains("not allowed"));
}

#[test]
fn escapes_ids_reversibly() {
    let ids = [
        "abc",
        "abc:step:tok",
        "a/b/../c",
        "..",
        ".hidden",
        "with space\nand newline",
        "ünï€ode-✓",
        "100%",
    ];
    for id in ids {
        let e = escape_id(id);
        assert!(e
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_-%".contains(&c)));
        assert_eq!(unescape_id(&e).as_deref(), Some(id));
    }
    assert_eq!(escape_id("a:b/c"), "a%3Ab%2Fc");
    assert_eq!(escape_id(".."), "%2E%2E");
}

#[test]
fn object_keys_stay_within_s3_limits() {
    assert_eq!(object_key("", 0, "abc", 0), "flows/abc.jsonl.gz");
    assert_eq!(
        object_key("archive/v1", 0, "a:b", 0),
        "archive/v1/flows/a%3Ab.jsonl.gz"
    );
    let long = "é".repeat(512);
    let key = object_key("p", 0, &long, 0);
    assert!(
        key.starts_with("p/flows/_sha256/") && key.len() <= 1024,
        "{key}"
    );
    assert_ne!(key, object_key("p", 0, &"é".repeat(513), 0));
}

#[test]
fn stored_names_keep_within_the_stores_limit() {
    // 83 escaped bytes and the suffix: within 255, over 80.
    let id = "x".repeat(83);
    assert_eq!(
        stored_key("p", 0, &id, 0, OBJECT_NAME_MAX),
        object_key("p", 0, &id, 0)
    );
    let short = stored_key("p", 3, &id, 2, SHA_NAME_LEN);
    assert!(short.starts_with("p/db3/flows/_sha256/") && short.ends_with(".g2.jsonl.gz"));
    // 86 ids bytes escape to 258: a name MinIO and SeaweedFS refuse.
    let escaped = ":".repeat(86);
    let key = stored_key("", 0, &escaped, 0, OBJECT_NAME_MAX);
    assert!(key.starts_with("flows/_sha256/"), "{key}");
    assert!(key.rsplit('/').next().unwrap().len() <= SHA_NAME_LEN);
    for max in [SHA_NAME_LEN, OBJECT_NAME_MAX, MAX_OBJECT_KEY] {
        for g in [0, 15] {
            let k = stored_key("q", 1, &escaped, g, max);
            assert!(
                readable_keys("q", 1, &escaped).any(|r| r == (g, k.clone())),
                "{k}"
            );
        }
    }
}

#[test]
fn object_keys_of_other_dbs_live_in_their_own_folder() {
    assert_eq!(object_key("", 3, "abc", 0), "db3/flows/abc.jsonl.gz");
    assert_eq!(
        object_key("p/q", 15, "a/b", 0),
        "p/q/db15/flows/a%2Fb.jsonl.gz"
    );
    assert_ne!(object_key("p", 1, "x", 0), object_key("p", 0, "x", 0));
    let long = "é".repeat(512);
    let key = object_key("p", 7, &long, 0);
    assert!(
        key.starts_with("p/db7/flows/_sha256/") && key.len() <= 1024,
        "{key}"
    );
    assert_eq!(
        key.rsplit('/').next(),
        object_key("p", 0, &long, 0).rsplit('/').next()
    );
}

#[test]
fn later_generations_never_meet_another_key() {
    assert_eq!(object_key("p", 0, "abc", 2), "p/flows/abc.g2.jsonl.gz");
    assert_eq!(object_key("", 4, "a.b", 1), "db4/flows/a%2Eb.g1.jsonl.gz");
    let keys: std::collections::HashSet<String> =
        stored_keys_from("p", 0, "abc", 0, OBJECT_NAME_MAX)
            .map(|(_, k)| k)
            .collect();
    assert_eq!(keys.len(), GENERATIONS as usize);
    // An id that looks like a generation suffix escapes its dots.
    assert!(!keys.contains(&object_key("p", 0, "abc.g2", 0)));
    let long = "é".repeat(512);
    let key = object_key("p", 0, &long, 15);
    assert!(key.starts_with("p/flows/_sha256/") && key.ends_with(".g15.jsonl.gz"));
    assert!(key.len() <= 1024);
}

/// A location in either form a name may take gives its generation; the compact index's split takes
/// only the form it can rebuild.
#[test]
fn locations_give_their_generation_whichever_form_their_name_took() {
    let long = "r".repeat(250);
    for (id, g) in [
        ("abc", 0),
        ("abc", 7),
        (long.as_str(), 0),
        (long.as_str(), 15),
    ] {
        let key = stored_key("p", 2, id, g, OBJECT_NAME_MAX);
        let location = format!("s3://b/{key}");
        assert_eq!(
            location_generation(&location, id),
            Some(("s3://b/p/db2/", g)),
            "{location}"
        );
        assert_eq!(
            split_location(&location, id).is_some(),
            id == "abc",
            "{location}"
        );
        assert_eq!(location_generation(&location, "other"), None);
    }
}
