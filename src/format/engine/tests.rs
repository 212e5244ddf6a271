use super::*;

/// Flows written in the engine's shape, each with the answer the engine's own appliers and
/// encoder gave for it (Argyll d69b4ca folding the same snapshot and events): 200 with its body,
/// 404, or 500.
const CASES: &str = include_str!("../testdata/engine_folds.json");

#[test]
fn folds_every_case_as_the_engine_answers_it() {
    let cases: Vec<serde_json::Value> = serde_json::from_str(CASES).unwrap();
    assert!(cases.len() >= 30);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let events: Vec<&str> = case["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        let snapshot = case["snapshot"].as_str().map(str::as_bytes);
        let skip = case["seq"].as_u64().unwrap() as usize;
        let got = fold(snapshot, skip, &events);
        match case["answer"]["status"].as_u64().unwrap() {
            200 => {
                let body = case["answer"]["body"].as_str().unwrap();
                let got = got.unwrap_or_else(|e| panic!("{name}: {e}")).expect(name);
                assert_eq!(String::from_utf8(got).unwrap(), body, "{name}");
            }
            404 => assert_eq!(got, Ok(None), "{name}"),
            _ => assert!(got.is_err(), "{name}: {got:?}"),
        }
    }
}

fn event(kind: &str, data: &str) -> String {
    format!(r#"{{"timestamp":"2026-03-18T09:14:03Z","type":"{kind}","data":{data}}}"#)
}

#[test]
fn errors_say_why_the_engine_cannot_answer() {
    let started = event("flow_started", r#"{"flow_id":"f","plan":{"steps":{}}}"#);
    let unknown = event("step_completed", r#"{"flow_id":"f","step_id":"zz"}"#);
    let e = fold(None, 0, [&started, &unknown]).unwrap_err();
    assert!(
        e.0.contains("event 1 (step_completed)") && e.0.contains("\"zz\""),
        "{e}"
    );
    let e = fold(None, 0, [&started, "{\"timestamp\":"]).unwrap_err();
    assert!(e.0.starts_with("event 1 is not JSON"), "{e}");
    let e = fold(Some(b"[]"), 0, [&started]).unwrap_err();
    assert!(e.0.contains("snapshot is unreadable"), "{e}");
}

#[test]
fn a_value_nested_as_deep_as_go_allows_folds_on_a_small_stack() {
    let deep = 9_990;
    let value = "[".repeat(deep) + &"]".repeat(deep);
    let started = event(
        "flow_started",
        &format!(r#"{{"flow_id":"f","plan":{{}},"init":{{"deep":{value}}}}}"#),
    );
    let folded = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || fold(None, 0, &[started]).map(|s| s.map(|s| s.len())))
        .unwrap()
        .join()
        .unwrap();
    assert!(matches!(folded, Ok(Some(n)) if n > 2 * deep), "{folded:?}");
}

#[test]
fn event_facts_read_the_time_and_the_status_set() {
    let f =
        event_facts(event("flow_deactivated", r#"{"flow_id":"f","status":"failed"}"#).as_bytes())
            .unwrap();
    assert_eq!(f.unix_ms, 1_773_825_243_000);
    assert_eq!(f.sets_status.as_deref(), Some("failed"));
    let f = event_facts(event("flow_started", r#"{"flow_id":"f"}"#).as_bytes()).unwrap();
    assert_eq!(f.sets_status.as_deref(), Some("active"));
    let f = event_facts(event("flow_deactivated", r#""x""#).as_bytes()).unwrap();
    assert_eq!(f.sets_status, None);
    let f =
        event_facts(br#"{"timestamp":"2026-03-18T10:14:03+01:00","type":"work_failed"}"#).unwrap();
    assert_eq!((f.unix_ms, f.sets_status), (1_773_825_243_000, None));
    assert!(event_facts(b"{").is_err());
    assert!(event_facts(br#"{"timestamp":"yesterday"}"#).is_err());
    // A `flow_started` whose data does not decode sets no status, as the indexer skips it.
    for data in [
        r#"{"flow_id":"f","plan":{"steps":{"s":{"http":{"timeout":1.5}}}}}"#,
        r#"{"flow_id":"f","init":{"a":[1e400]}}"#,
        r#"{"flow_id":"f","labels":{"a":1}}"#,
        "[]",
    ] {
        let f = event_facts(event("flow_started", data).as_bytes()).unwrap();
        assert_eq!(f.sets_status, None, "{data}");
    }
}

/// `Decode::accepts` (what `event_facts` asks of a `flow_started`) answers as decoding does, for
/// the data of every event of every case, read as every event type.
#[test]
fn accepting_data_agrees_with_decoding_it() {
    fn agree<T: Decode + Default>(event: &Envelope) {
        let Some(data) = event.data else { return };
        let accepted = T::accepts(&mut data.reader()).is_ok();
        let decoded = T::default().decode(&mut data.reader()).is_ok();
        assert_eq!(accepted, decoded, "{}", std::any::type_name::<T>());
    }
    let cases: Vec<serde_json::Value> = serde_json::from_str(CASES).unwrap();
    let mut read = 0;
    for element in cases.iter().flat_map(|c| c["events"].as_array().unwrap()) {
        let element = element.as_str().unwrap().as_bytes();
        let Ok(Ok(event)) = gojson::check(element).map(Envelope::read) else {
            continue;
        };
        agree::<FlowStarted>(&event);
        agree::<FlowCompleted>(&event);
        agree::<FlowFailed>(&event);
        agree::<FlowDeactivated>(&event);
        agree::<StepStarted>(&event);
        agree::<StepCompleted>(&event);
        agree::<StepFailed>(&event);
        agree::<StepSkipped>(&event);
        agree::<AttributeSet>(&event);
        agree::<WorkStarted>(&event);
        agree::<WorkSucceeded>(&event);
        agree::<WorkFailed>(&event);
        agree::<WorkNotCompleted>(&event);
        agree::<RetryScheduled>(&event);
        agree::<FlowState>(&event);
        read += 1;
    }
    assert!(read > 100, "{read}");
}

#[test]
fn sequences_are_plain_counts() {
    assert_eq!(parse_seq(b"0"), Ok(0));
    assert_eq!(parse_seq(b" 41\n"), Ok(41));
    for bad in [
        &b""[..],
        b"-1",
        b"+1",
        b"4.0",
        b"1.0",
        b"0x10",
        b"1e3",
        b"four",
        b"\xff",
    ] {
        assert!(parse_seq(bad).is_err(), "{bad:?}");
    }
}
