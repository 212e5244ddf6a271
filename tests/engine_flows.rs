//! Flows as the Argyll engine really writes them (docs/ENGINE.md): child flows, escaped labels, zone
//! offsets, late events, a failed flow whose work still runs, the engine archiver's lease, stray
//! snapshots, flows the engine itself could not load, and a layout without a status index. Each is
//! archived or left exactly as the engine's own view of it asks.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::*;

/// Writes `events` (JSON strings) as the log of flow `id`, with its status entry and score.
fn write_log(c: &mut redis::Connection, id: &str, status: &str, score: i64, events: &[String]) {
    let mut rpush = redis::cmd("RPUSH");
    rpush.arg(format!("argyll:flow:{id}:events")).arg(events);
    rpush.query::<()>(c).unwrap();
    let member = format!("flow:{id}");
    cmd::<()>(c, &["HSET", "argyll:idx:status", &member, status]).unwrap();
    let set = format!("argyll:idx:status:{status}");
    cmd::<()>(c, &["ZADD", &set, &score.to_string(), &member]).unwrap();
}

fn event(ts: &str, kind: &str, data: serde_json::Value) -> String {
    serde_json::json!({"timestamp": ts, "type": kind, "data": data}).to_string()
}

/// A child flow (`<parent>:<step>:<token>`, metadata naming its parent) is archived under its whole
/// id, the engine's status member `flow:<id>` removed, and answered with its metadata, live and
/// archived alike.
#[test]
fn a_child_flow_is_archived_under_its_whole_id() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let id = "order-7:ship:3c1f0a2e-1111-4c1d-9a55-7d0d4b1f5e21";
    let started = serde_json::json!({
        "plan": {"goals": ["work"], "required": [], "steps": {"work": {"id": "work", "name": "Work", "type": "script", "attributes": {}, "script": {"language": "ale", "script": "1"}}}, "attributes": {}, "excluded": {}},
        "init": {},
        "metadata": {"parent_flow_id": "order-7", "parent_step_id": "ship", "parent_work_item_token": "3c1f0a2e"},
        "flow_id": id,
    });
    let events = [
        event("2023-11-14T22:13:19.9Z", "flow_started", started),
        event(
            "2023-11-14T22:13:20Z",
            "flow_completed",
            serde_json::json!({"result": {}, "flow_id": id}),
        ),
        event(
            "2023-11-14T22:13:20Z",
            "flow_deactivated",
            serde_json::json!({"flow_id": id, "status": "completed"}),
        ),
    ];
    write_log(&mut c, id, "completed", LONG_AGO, &events);
    let live = get(&mut c, id).unwrap().unwrap();
    assert!(
        live.contains(r#""metadata":{"parent_flow_id":"order-7","parent_step_id":"ship","parent_work_item_token":"3c1f0a2e"}"#),
        "{live}"
    );
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    assert!(s3
        .get("flows/order-7%3Aship%3A3c1f0a2e-1111-4c1d-9a55-7d0d4b1f5e21.jsonl.gz")
        .is_some());
    assert_eq!(get(&mut c, id).unwrap(), Some(archived_state(&live)));
    let member = format!("flow:{id}");
    assert_eq!(
        cmd::<Option<String>>(&mut c, &["HGET", "argyll:idx:status", &member]).unwrap(),
        None
    );
}

/// Labels are stored escaped (`\` → `\\`, `%` → `\%`, `:` → `%`) in the flow's hash, the value sets
/// and the member-set key names; an empty value is in the state only. The commit removes exactly the
/// escaped entries, and a value from the value set only once no flow carries it.
#[test]
fn escaped_labels_are_removed_as_the_engine_stores_them() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let labels: &[(&str, &str)] = &[
        ("region", "eu:west"),
        ("pct", "50%"),
        ("path", "a\\b"),
        ("colon:name", "v"),
        ("empty", ""),
    ];
    let spec = FlowSpec {
        labels,
        ..FlowSpec::done("labelled")
    };
    write_flow(&mut c, &spec);
    // A neighbour keeps `region=eu:west` listed.
    write_flow(
        &mut c,
        &FlowSpec {
            labels: &[("region", "eu:west")],
            status: "active",
            ..FlowSpec::done("neighbour")
        },
    );
    let hash: Vec<(String, String)> =
        cmd(&mut c, &["HGETALL", "argyll:flow:labelled:idx:labels"]).unwrap();
    assert!(
        hash.contains(&("region".into(), "eu%west".into())),
        "{hash:?}"
    );
    assert!(
        hash.contains(&("colon%name".into(), "v".into())),
        "{hash:?}"
    );
    assert!(!hash.iter().any(|(k, _)| k == "empty"), "{hash:?}");
    let state = get(&mut c, "labelled").unwrap().unwrap();
    assert_eq!(state, state_json(&spec));
    assert!(
        state.contains(
            r#""labels":{"colon:name":"v","empty":"","path":"a\\b","pct":"50%","region":"eu:west"}"#
        ),
        "{state}"
    );
    let sets = [
        "argyll:idx:label:region:eu%west",
        "argyll:idx:label:pct:50\\%",
        "argyll:idx:label:path:a\\\\b",
        "argyll:idx:label:colon%name:v",
    ];
    let carries = |c: &mut redis::Connection, set: &str| -> i64 {
        cmd(c, &["SISMEMBER", set, "flow:labelled"]).unwrap()
    };
    for set in sets {
        assert_eq!(carries(&mut c, set), 1, "{set} before");
    }
    archive(&mut c, "labelled").unwrap();
    for set in sets {
        assert_eq!(carries(&mut c, set), 0, "{set} after");
    }
    let values = |c: &mut redis::Connection, l: &str| -> Vec<String> {
        cmd(c, &["SMEMBERS", &format!("argyll:idx:label:{l}")]).unwrap()
    };
    assert_eq!(
        values(&mut c, "region"),
        ["eu%west"],
        "the neighbour's value stays"
    );
    assert!(values(&mut c, "pct").is_empty());
    assert!(values(&mut c, "colon%name").is_empty());
    assert_eq!(
        get(&mut c, "labelled").unwrap(),
        Some(archived_state(&state))
    );
}

/// Idle time runs from the later of the status score and the last event, in any zone offset: a
/// webhook after `flow_deactivated` restarts the clock; times written with an offset count as the
/// same instants in UTC.
#[test]
fn late_events_and_zone_offsets_set_the_idle_time() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["retention", "1h"]);
    let mut c = srv.conn();
    let spec = |id| FlowSpec {
        last_ms: LONG_AGO,
        ..FlowSpec::done(id)
    };
    write_flow(&mut c, &spec("old"));
    write_flow(&mut c, &spec("webhook"));
    // A late `work_not_completed` 10 minutes ago, written by an engine in UTC+02:00.
    let recent = now_ms() - 10 * 60_000;
    let offset = event_time(recent + 2 * 3_600_000).replace('Z', "+02:00");
    let late = event(
        &offset,
        "work_not_completed",
        serde_json::json!({"flow_id": "webhook", "step_id": "work", "token": "t1", "error": "late"}),
    );
    cmd::<()>(&mut c, &["RPUSH", "argyll:flow:webhook:events", &late]).unwrap();
    // The same instant two hours off is two hours ago: idle long enough.
    write_flow(&mut c, &spec("east"));
    let two_hours_ago = event_time(now_ms() - 2 * 3_600_000 + 2 * 3_600_000).replace('Z', "+02:00");
    let late = event(
        &two_hours_ago,
        "work_not_completed",
        serde_json::json!({"flow_id": "east", "step_id": "work", "token": "t9", "error": "late"}),
    );
    cmd::<()>(&mut c, &["RPUSH", "argyll:flow:east:events", &late]).unwrap();
    let e = err_text(archive(&mut c, "webhook"));
    assert!(
        e.contains("not idle long enough") && e.contains("retention 1h"),
        "{e}"
    );
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 2, "{summary:?}");
    assert_eq!(int(&summary["skipped_ineligible"]), 1, "{summary:?}");
    assert_eq!(
        cmd::<i64>(&mut c, &["LLEN", "argyll:flow:webhook:events"]).unwrap(),
        6
    );
    // The late event changes no state (its step knows no item t9): archived as it was.
    assert_eq!(
        get(&mut c, "east").unwrap(),
        Some(archived_state(&state_json(&spec("east"))))
    );
    archive_forced(&mut c, "webhook");
    assert_eq!(get_events(&mut c, "webhook").unwrap().1.len(), 6);
}

fn archive_forced(c: &mut redis::Connection, id: &str) {
    redis::cmd("FLOWARCHIVE.FLOW")
        .arg(id)
        .arg("FORCE")
        .query::<redis::Value>(c)
        .unwrap();
}

/// A flow that failed while other work still runs says `failed` in its state but `active` in the
/// engine's index until its `flow_deactivated`: it is not terminal, and stays live.
#[test]
fn a_failed_flow_with_work_still_running_is_not_archived() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let spec = FlowSpec {
        status: "failed",
        events: 4,
        ..FlowSpec::done("half-failed")
    };
    // The log ends in `flow_failed`; the index still says active.
    let events = events_of(&spec);
    write_log(&mut c, "half-failed", "active", LONG_AGO, &events);
    let state = get(&mut c, "half-failed").unwrap().unwrap();
    assert!(state.contains(r#""status":"failed""#), "{state}");
    let e = err_text(archive(&mut c, "half-failed"));
    assert!(e.contains("not terminal (status \"active\")"), "{e}");
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
}

/// While the engine's own archiver holds a flow (its lease key exists) the flow is left to it: not
/// archived, nothing touched, counted as ineligible; a lease taken while the upload runs stops the
/// commit. Without the lease the flow archives. The lease is only ever read.
#[test]
fn a_flow_leased_by_the_engines_archiver_is_left_to_it() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("leased"));
    write_flow(&mut c, &FlowSpec::done("taken-later"));
    let lease = "argyll:archive:lease:leased";
    cmd::<()>(&mut c, &["SET", lease, "engine-1", "EX", "900"]).unwrap();
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut c, "leased"));
    assert!(
        e.contains("engine's own archiver") && e.contains(lease),
        "{e}"
    );
    assert_same(&before, &dump_all(&mut c), "a leased flow is not touched");

    proxy.hold("PUT");
    let mut other = srv.conn();
    let flow = std::thread::spawn(move || archive(&mut other, "taken-later"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    cmd::<()>(
        &mut c,
        &[
            "SET",
            "argyll:archive:lease:taken-later",
            "engine-1",
            "EX",
            "900",
        ],
    )
    .unwrap();
    proxy.release();
    let e = err_text(flow.join().unwrap());
    assert!(e.contains("engine's own archiver"), "{e}");
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:taken-later:events"]).unwrap(),
        1
    );

    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    assert_eq!(int(&summary["skipped_ineligible"]), 2, "{summary:?}");
    cmd::<()>(&mut c, &["DEL", lease, "argyll:archive:lease:taken-later"]).unwrap();
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 2, "{summary:?}");
}

/// A snapshot written after its flow was removed (a write the engine queued before the delete) is no
/// flow: not selected, never counted as a failure, not found by FLOW or GET (unless the id is
/// archived, which GET then answers).
#[test]
fn a_snapshot_without_an_event_log_is_no_flow() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let spec = FlowSpec {
        snapshot: Snapshot::Current,
        ..FlowSpec::done("ghost")
    };
    let (snapshot, seq) = snapshot_of(&spec).unwrap();
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:ghost:snapshot:val", &snapshot],
    )
    .unwrap();
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:ghost:snapshot:seq", &seq.to_string()],
    )
    .unwrap();
    let e = err_text(archive(&mut c, "ghost"));
    assert!(e.contains("not found"), "{e}");
    assert_eq!(get(&mut c, "ghost").unwrap(), None);
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["candidates"]), 0, "{summary:?}");
    assert_eq!(int(&summary["failed"]), 0, "{summary:?}");
    // A stray snapshot beside an archived flow: GET answers the archive.
    write_flow(&mut c, &FlowSpec::done("left"));
    archive(&mut c, "left").unwrap();
    cmd::<()>(&mut c, &["SET", "argyll:flow:left:snapshot:val", &snapshot]).unwrap();
    assert_eq!(
        get(&mut c, "left").unwrap(),
        Some(archived_state(&state_json(&FlowSpec::done("left"))))
    );
    let again = archive(&mut c, "left").unwrap();
    assert_eq!(int(&again["already_archived"]), 1);
}

/// Events the engine itself could not load (a step its plan does not have, a `null` snapshot, an
/// element that is no event): GET answers an error naming why, as the engine answers 500, and a sweep
/// counts the flow as unreadable and leaves it whole.
#[test]
fn a_flow_the_engine_cannot_load_stays_live() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("unknown-step"));
    let bad = event(
        &event_time(LONG_AGO),
        "step_completed",
        serde_json::json!({"outputs": {}, "flow_id": "unknown-step", "step_id": "nope", "duration": 1}),
    );
    cmd::<()>(
        &mut c,
        &["LSET", "argyll:flow:unknown-step:events", "2", &bad],
    )
    .unwrap();
    write_flow(&mut c, &FlowSpec::done("null-snapshot"));
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:null-snapshot:snapshot:val", "null"],
    )
    .unwrap();
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:null-snapshot:snapshot:seq", "5"],
    )
    .unwrap();
    for (id, why) in [
        ("unknown-step", "names step \"nope\" the flow does not have"),
        ("null-snapshot", "the snapshot is null"),
    ] {
        let e = err_text(get(&mut c, id));
        assert!(
            e.contains("cannot be answered") && e.contains(why),
            "{id}: {e}"
        );
    }
    let before = dump_all(&mut c);
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["failed"]), 2, "{summary:?}");
    assert_eq!(
        redis::from_redis_value::<std::collections::HashMap<String, i64>>(
            &summary["failed_by_reason"]
        )
        .unwrap()["unreadable"],
        2
    );
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
}

/// Without a status index (`status-key ""` and the rest) a flow's status is what the engine's indexer
/// set last in its log (`flow_deactivated`'s status, `active` at `flow_started`) and its idle time runs
/// from its last event: the sweep walks the event logs (never snapshots) and archives only the ended
/// flows idle long enough.
#[test]
fn without_a_status_index_the_log_says_status_and_idle_time() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args
        .extend(NO_STATUS_INDEX.iter().map(|s| s.to_string()));
    opts.module_args
        .extend(["retention", "1h"].map(String::from));
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let specs = [
        FlowSpec::done("ended"),
        FlowSpec {
            status: "failed",
            ..FlowSpec::done("failed")
        },
        FlowSpec {
            status: "active",
            ..FlowSpec::done("running")
        },
        FlowSpec {
            last_ms: now_ms() - 60_000,
            ..FlowSpec::done("recent")
        },
        FlowSpec {
            events: 9,
            ..FlowSpec::done("late-ended")
        },
    ];
    for spec in &specs {
        write_flow(&mut c, spec);
    }
    // A snapshot alone is no flow.
    let (snapshot, _) = snapshot_of(&FlowSpec {
        snapshot: Snapshot::Current,
        ..FlowSpec::done("ghost")
    })
    .unwrap();
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:ghost:snapshot:val", &snapshot],
    )
    .unwrap();
    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    let listed: std::collections::BTreeSet<String> =
        redis::from_redis_value(&dry["flows"]).unwrap();
    assert_eq!(
        listed,
        ["ended", "failed", "late-ended"].map(String::from).into()
    );
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 3, "{summary:?}");
    assert_eq!(int(&summary["failed"]), 0, "{summary:?}");
    for spec in &specs[..2] {
        assert_eq!(
            get(&mut c, spec.id).unwrap(),
            Some(archived_state(&state_json(spec)))
        );
    }
}
