//! The judgement on facts made by hand: which flows are archived, and which refusal wins where
//! several apply, with no server.

use super::*;

const DAY: i64 = 86_400_000;

fn window(force: bool) -> Window {
    Window {
        now_ms: 10 * DAY,
        retention_ms: DAY,
        force,
    }
}

fn keys() -> FlowKeys {
    Layout::argyll().flow_keys("f")
}

fn found<T>(kind: KeyType, value: Option<T>) -> Found<T> {
    Found { kind, value }
}

/// A folded flow that completed long ago, with a label, as the capture reads it.
fn done() -> Facts {
    Facts {
        events: KeyType::List,
        snapshot: KeyType::Empty,
        entry: Ok(None),
        live: Some(Live {
            leased: false,
            len: 3,
            snapshot: Snapshot::new(0, None),
            indexed: found(KeyType::Hash, Some(b"completed".to_vec())),
            tail: Some(Ok(Tail {
                last_ms: DAY,
                status: Some("completed".into()),
            })),
            score: Some(Ok(Scored {
                key: "argyll:idx:status:completed".into(),
                kind: KeyType::ZSet,
                score: Some(DAY as f64),
            })),
            seq: found(KeyType::Empty, None),
            labels: found(
                KeyType::Hash,
                Some(vec![(b"tenant".to_vec(), b"acme".to_vec())]),
            ),
            labels_left: None,
            labels_cap: None,
        }),
    }
}

fn live(f: impl FnOnce(&mut Live)) -> Facts {
    let mut facts = done();
    f(facts.live.as_mut().unwrap());
    facts
}

fn judged(facts: Facts) -> Result<Verdict, FlowError> {
    judge(facts, &keys(), &Layout::argyll(), &window(false), 1 << 20)
}

fn refusal(facts: Facts) -> String {
    match judged(facts) {
        Err(e) => e.message("f"),
        Ok(Verdict::Archived(location)) => format!("archived at {location}"),
        Ok(Verdict::Eligible(_)) => "eligible".into(),
    }
}

fn wrong(key: &str) -> FlowError {
    FlowError::NoPerm(format!("the {key} key"))
}

#[test]
fn a_terminal_idle_flow_is_eligible_with_what_the_capture_keeps() {
    let Ok(Verdict::Eligible(j)) = judged(done()) else {
        panic!("{}", refusal(done()));
    };
    assert_eq!(j.status, "completed");
    assert_eq!(j.status_score, Some(86_400_000.0));
    assert_eq!(j.labels, [("tenant".to_string(), "acme".to_string())]);
    assert_eq!((j.events_total, j.seq, j.snapshot), (3, None, None));
    assert!(j.previous.is_none());
}

#[test]
fn a_flow_without_its_log_is_archived_or_unknown() {
    let gone = |entry| Facts {
        events: KeyType::Empty,
        snapshot: KeyType::String,
        entry,
        live: None,
    };
    let at = "s3://b/f.jsonl.gz";
    assert_eq!(
        refusal(gone(Ok(Some(Entry::at(at))))),
        format!("archived at {at}")
    );
    assert!(refusal(gone(Ok(None))).contains("not found"));
    // A live flow the index names is a new incarnation of an archived one.
    let mut again = done();
    again.entry = Ok(Some(Entry::at(at)));
    let Ok(Verdict::Eligible(j)) = judged(again) else {
        panic!("a new incarnation is archived");
    };
    assert_eq!(j.previous.map(|e| e.location).as_deref(), Some(at));
}

#[test]
fn presence_ranks_the_logs_type_then_the_snapshots_then_the_lookup() {
    let mut facts = done();
    facts.events = KeyType::String;
    facts.snapshot = KeyType::Hash;
    facts.entry = Err(wrong("index"));
    facts.live = None;
    assert!(refusal(facts).contains("holds a string, expected a list"));
    let mut facts = done();
    facts.snapshot = KeyType::Hash;
    facts.entry = Err(wrong("index"));
    assert!(refusal(facts).contains("holds a hash, expected a string"));
    let mut facts = live(|l| l.leased = true);
    facts.entry = Err(wrong("index"));
    assert!(refusal(facts).starts_with("NOPERM"));
}

#[test]
fn a_snapshot_layout_needs_the_snapshot() {
    let layout = Layout {
        state: StateSource::Snapshot,
        ..Layout::argyll()
    };
    let e = judge(done(), &keys(), &layout, &window(false), 1 << 20).err();
    assert!(e.unwrap().message("f").contains("is missing"));
}

#[test]
fn a_leased_flow_is_left_to_the_engine_before_its_status_is_looked_at() {
    let facts = live(|l| {
        l.leased = true;
        l.indexed.kind = KeyType::Set;
        l.score = Some(Err(wrong("status set")));
    });
    assert!(refusal(facts).contains("engine's own archiver"));
}

#[test]
fn the_status_comes_from_the_hash_else_the_logs_end() {
    let active = live(|l| l.indexed.value = Some(b"active".to_vec()));
    assert!(refusal(active).contains("not terminal (status \"active\")"));
    let unindexed = live(|l| l.indexed.value = None);
    assert_eq!(refusal(unindexed), "eligible");
    let silent = live(|l| {
        l.indexed.value = None;
        l.tail = Some(Ok(Tail {
            last_ms: DAY,
            status: None,
        }));
    });
    assert!(refusal(silent).contains("no status index entry and no status event"));
    let garbled = live(|l| l.indexed.value = Some(vec![0xff]));
    assert!(refusal(garbled).contains("status is not UTF-8"));
}

#[test]
fn the_status_hash_ranks_before_the_logs_end_and_the_score() {
    let unreadable = || Some(Err(FlowError::Unreadable("event 2: broken".into())));
    let facts = live(|l| {
        l.indexed.kind = KeyType::String;
        l.tail = unreadable();
    });
    assert!(refusal(facts).contains("holds a string, expected a hash"));
    let facts = live(|l| {
        l.tail = unreadable();
        l.score = Some(Err(wrong("status set")));
    });
    assert!(refusal(facts).contains("event 2: broken"));
    let facts = live(|l| l.score = Some(Err(wrong("status set"))));
    assert!(refusal(facts).starts_with("NOPERM"));
    let facts = live(|l| {
        if let Some(Ok(set)) = &mut l.score {
            set.kind = KeyType::Set;
        }
    });
    assert!(refusal(facts).contains("holds a set, expected a sorted set"));
}

#[test]
fn the_idle_time_runs_from_the_later_of_the_score_and_the_last_event() {
    let late_event = || {
        live(|l| {
            l.tail = Some(Ok(Tail {
                last_ms: 9 * DAY + 1,
                status: None,
            }))
        })
    };
    assert!(refusal(late_event()).contains("not idle long enough"));
    let late_score = live(|l| {
        if let Some(Ok(set)) = &mut l.score {
            set.score = Some((9 * DAY + 1) as f64);
        }
    });
    assert!(refusal(late_score).contains("not idle long enough"));
    let forced = judge(
        late_event(),
        &keys(),
        &Layout::argyll(),
        &window(true),
        1 << 20,
    );
    assert!(matches!(forced, Ok(Verdict::Eligible(_))));
}

#[test]
fn eligibility_ranks_before_sizes_and_the_small_keys() {
    let facts = live(|l| {
        l.indexed.value = Some(b"active".to_vec());
        l.snapshot = Snapshot::new(2 << 20, None);
        l.seq = found(KeyType::Hash, None);
        l.labels = found(KeyType::Hash, None);
    });
    assert!(refusal(facts).contains("not terminal"));
    let facts = live(|l| {
        l.snapshot = Snapshot::new(2 << 20, None);
        l.seq = found(KeyType::Hash, None);
    });
    assert!(refusal(facts).contains("larger than flowarchive.read-max-bytes"));
    let facts = live(|l| {
        l.seq = found(KeyType::Hash, None);
        l.labels = found(KeyType::List, None);
    });
    assert!(refusal(facts).contains("holds a hash, expected a string"));
    let facts = live(|l| l.seq = found(KeyType::String, Some(b"x".to_vec())));
    assert!(refusal(facts).contains("is not a count of events"));
    let facts = live(|l| l.labels = found(KeyType::List, None));
    assert!(refusal(facts).contains("holds a list, expected a hash"));
    let facts = live(|l| l.labels.value = None);
    assert!(refusal(facts).contains("larger than flowarchive.read-max-bytes"));
    let facts = live(|l| l.labels.value = Some(vec![(b"k".to_vec(), vec![0xc3])]));
    assert!(refusal(facts).contains("a label value is not UTF-8"));
}

#[test]
fn a_snapshot_layout_judges_by_the_snapshot_where_the_index_is_silent() {
    let layout = Layout {
        state: StateSource::Snapshot,
        ..Layout::argyll()
    };
    let snapshot = |json: &str| {
        let mut facts = live(|l| {
            l.tail = None;
            l.indexed.value = None;
            l.score = None;
            l.snapshot = Snapshot::new(json.len() as u64, Some(json.as_bytes().to_vec()));
        });
        facts.snapshot = KeyType::String;
        judge(facts, &keys(), &layout, &window(false), 64)
    };
    let old = r#"{"status":"completed","last_updated":"1970-01-02T00:00:00Z"}"#;
    let Ok(Verdict::Eligible(j)) = snapshot(old) else {
        panic!("an old completed snapshot is eligible");
    };
    assert_eq!(
        (j.status.as_str(), j.snapshot.as_deref()),
        ("completed", Some(old.as_bytes()))
    );
    let recent = r#"{"status":"completed","last_updated":"1970-01-10T12:00:00Z"}"#;
    assert!(matches!(snapshot(recent), Err(FlowError::TooRecent { .. })));
    let e = snapshot("{not json").err().unwrap().message("f");
    assert!(e.contains("snapshot is not JSON"), "{e}");
    let huge = format!(r#"{{"status":"completed","pad":"{}"}}"#, "x".repeat(64));
    let e = snapshot(&huge).err().unwrap().message("f");
    assert!(e.contains("larger than flowarchive.read-max-bytes"), "{e}");
}

#[test]
fn the_scan_selection_leaves_what_it_cannot_judge_to_the_capture() {
    let layout = Layout::argyll();
    let judge = |indexed: Found<Vec<u8>>, tail| {
        looks_eligible(&indexed, tail, &keys(), &layout, &window(false))
    };
    let tail = |status: Option<&str>, last_ms| {
        Ok(Tail {
            last_ms,
            status: status.map(str::to_string),
        })
    };
    let none = || found(KeyType::Empty, None);
    assert!(judge(none(), tail(Some("completed"), DAY)));
    assert!(!judge(none(), tail(Some("completed"), 10 * DAY)));
    assert!(!judge(none(), tail(None, DAY)));
    assert!(!judge(
        found(KeyType::Hash, Some(b"active".to_vec())),
        tail(Some("completed"), DAY)
    ));
    assert!(judge(found(KeyType::String, None), tail(None, DAY)));
    assert!(judge(
        found(KeyType::Hash, Some(vec![0xff])),
        tail(None, DAY)
    ));
    assert!(judge(none(), Err(too_large(1))));
}

/// Hands `log` to a `LogEnd` as the server would, from its first element taken.
fn log_end(log: &[String], want_status: bool, max_bytes: u64) -> Result<Tail, FlowError> {
    let mut end = LogEnd::new(log.len(), want_status, max_bytes);
    for element in &log[end.from()..] {
        if end.take(element.as_bytes()).is_break() {
            break;
        }
    }
    end.finish()
}

fn event(at: &str, kind: &str, data: &str) -> String {
    format!(r#"{{"timestamp":"{at}","type":"{kind}","data":{data}}}"#)
}

#[test]
fn a_logs_end_says_its_last_event_and_the_latest_status_set() {
    let done = event(
        "1970-01-02T00:00:00Z",
        "flow_deactivated",
        r#"{"flow_id":"f","status":"completed"}"#,
    );
    let late = event("1970-01-03T00:00:00Z", "work_failed", "{}");
    let mut log = vec![event(
        "1970-01-01T00:00:00Z",
        "flow_started",
        r#"{"flow_id":"f"}"#,
    )];
    log.extend([done, late]);
    let tail = log_end(&log, true, 1 << 20).unwrap();
    assert_eq!(
        (tail.last_ms, tail.status.as_deref()),
        (2 * DAY, Some("completed"))
    );
    // Where the status hash names the status, the last event alone is read.
    let tail = log_end(&log, false, 1 << 20).unwrap();
    assert_eq!((tail.last_ms, tail.status), (2 * DAY, None));
    // The status is looked for in the last events only.
    let mut long = log.clone();
    long.extend(std::iter::repeat_n(log[2].clone(), STATUS_LOOKBACK));
    assert_eq!(log_end(&long, true, 1 << 20).unwrap().status, None);
}

#[test]
fn a_logs_end_refuses_an_unreadable_event_an_empty_log_and_the_cap() {
    let good = event("1970-01-01T00:00:00Z", "work_failed", "{}");
    let e = log_end(&[good.clone(), "{".into()], true, 1 << 20)
        .err()
        .unwrap();
    assert!(e.message("f").contains("event 1: "), "{}", e.message("f"));
    let e = log_end(&[], true, 1 << 20).err().unwrap();
    assert!(e.message("f").contains("the event log is empty"));
    // Each element counts with its line end; the one that passes the cap is not parsed.
    let fits = good.len() as u64 + 1;
    assert!(log_end(std::slice::from_ref(&good), true, fits).is_ok());
    let e = log_end(&[good.clone(), "{".into()], true, fits)
        .err()
        .unwrap();
    assert!(e
        .message("f")
        .contains("larger than flowarchive.read-max-bytes"));
}
