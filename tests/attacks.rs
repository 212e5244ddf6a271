//! Hostile review of the fold, eligibility, leases and reused ids (format v2). Each test is an attack
//! the code must withstand; where the attack once succeeded, its doc says what it did.

mod common;

use std::time::Duration;

use common::proxy::{Fault, Proxy, Rule};
use common::*;

const PLAN0: &str = r#"{"goals":[],"required":[],"steps":{},"attributes":{},"excluded":{}}"#;
const OLD: &str = "2023-11-14T22:13:20Z";

/// One event as the engine stores it, `data` spliced in as given (it may be anything).
fn ev(ts: &str, kind: &str, data: &str) -> Vec<u8> {
    format!(r#"{{"timestamp":"{ts}","type":"{kind}","data":{data}}}"#).into_bytes()
}

/// A completed flow `id` started with `init` (raw JSON), ended long ago.
fn ended(id: &str, init: &str) -> Vec<Vec<u8>> {
    let id = serde_json::json!(id);
    [
        (
            "flow_started",
            format!(r#"{{"plan":{PLAN0},"init":{init},"flow_id":{id}}}"#),
        ),
        (
            "flow_completed",
            format!(r#"{{"result":{{}},"flow_id":{id}}}"#),
        ),
        (
            "flow_deactivated",
            format!(r#"{{"flow_id":{id},"status":"completed"}}"#),
        ),
    ]
    .iter()
    .map(|(kind, data)| ev(OLD, kind, data))
    .collect()
}

/// A command given as one line of space-separated words.
fn run(c: &mut redis::Connection, line: &str) {
    cmd::<redis::Value>(c, &line.split(' ').collect::<Vec<_>>()).unwrap();
}

/// Writes `events` as flow `id`'s log with its status entry and score.
fn write_log(c: &mut redis::Connection, id: &str, status: &str, score: &str, events: &[Vec<u8>]) {
    let mut rpush = redis::cmd("RPUSH");
    rpush.arg(format!("argyll:flow:{id}:events"));
    for e in events {
        rpush.arg(e.as_slice());
    }
    rpush.query::<()>(c).unwrap();
    let member = format!("flow:{id}");
    cmd::<()>(c, &["HSET", "argyll:idx:status", &member, status]).unwrap();
    let set = format!("argyll:idx:status:{status}");
    cmd::<()>(c, &["ZADD", &set, score, &member]).unwrap();
}

fn live(c: &mut redis::Connection, id: &str) -> bool {
    cmd::<i64>(c, &["EXISTS", &format!("argyll:flow:{id}:events")]).unwrap() == 1
}

fn previous(c: &mut redis::Connection, id: &str, n: &str) -> redis::RedisResult<Option<String>> {
    cmd(c, &["FLOWARCHIVE.GET", id, "PREVIOUS", n])
}

/// Holds: a flow holding a value nested deeper than 127 levels (Go's decoder, the engine's, takes
/// 10,000; the fold answers it live) is archived and answered alike. It once never was: the read-back
/// gate parsed the folded state into a serde_json map, whose recursion limit is 128, so every attempt
/// was refused as unreadable.
#[test]
fn a_deeply_nested_value_answered_live_is_archived() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let deep = "[".repeat(200) + &"]".repeat(200);
    write_log(
        &mut c,
        "deep",
        "completed",
        "1700000000000",
        &ended("deep", &format!(r#"{{"deep":{deep}}}"#)),
    );
    let state = get(&mut c, "deep")
        .unwrap()
        .expect("the engine's state, live");
    assert!(state.contains(&deep), "{}", &state[..200]);
    let r = archive(&mut c, "deep");
    assert!(
        r.is_ok(),
        "a flow the engine loads (and GET answers live) is refused as unreadable: {:?}",
        r.err()
    );
    assert_eq!(get(&mut c, "deep").unwrap(), Some(archived_state(&state)));
}

/// Holds: one late event with a large payload cannot hold the server. `capture::tail` (on the main
/// thread, for a capture and for the SCAN selection's look at every log of a page) measures each
/// element before it reads it and refuses the flow as too large once they pass `read-max-bytes`, so an
/// 8 MB event over a 1 MB cap costs the server the copy of the element, never a parse. What it does
/// read, `engine::event_facts` takes in a bounded amount of work per byte, building nothing: it
/// checks the element as JSON and reads only `timestamp`, `type` and the data of the two types that
/// set a status.
#[test]
fn a_huge_last_event_does_not_hold_the_main_thread() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["read-max-bytes", "1048576"]);
    let mut c = srv.conn();
    let mut events = ended("big", "{}");
    let payload = vec!["0"; 4 << 20].join(",");
    let late = format!(r#"{{"flow_id":"big","step_id":"s","key":"k","value":[{payload}]}}"#);
    events.push(ev("2023-11-14T22:13:21Z", "attribute_set", &late));
    write_log(&mut c, "big", "completed", "1700000000000", &events);
    let e = err_text(archive(&mut c, "big"));
    assert!(e.contains("read-max-bytes"), "{e}");
    let held = info_field(&mut c, "main_thread_max_us_capture");
    assert!(
        held < 100_000,
        "DEFECT: refusing an 8 MB flow over a 1 MB cap held the main thread {held} us (budget: 250 us)"
    );
}

/// Holds: a live GET is capped by `read-max-bytes` in bytes read, and the fold holds about that much: it
/// builds no JSON tree (a tree of small numbers cost some 50 times their bytes), reads each event
/// in place, passes over the data of events no applier reads, and keeps `any` values as the text Go
/// writes for them. An 8 MB event of small numbers raises the server's peak memory by about the
/// flow's size (the events read), not hundreds of MB.
#[test]
fn a_live_read_holds_about_what_the_cap_allows() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let payload = vec!["0"; 4 << 20].join(",");
    let mut events = ended("wide", "{}");
    events.insert(1, ev(OLD, "webhook_noise", &format!("[{payload}]")));
    let bytes: usize = events.iter().map(Vec::len).sum();
    write_log(&mut c, "wide", "completed", "1700000000000", &events);
    let before = srv.peak_rss();
    assert!(get(&mut c, "wide").unwrap().is_some());
    let grown = srv.peak_rss().saturating_sub(before);
    assert!(
        grown < 4 * bytes as u64,
        "DEFECT: folding a {bytes}-byte flow raised the server's peak memory by {} MB ({}x)",
        grown >> 20,
        grown / bytes as u64
    );
}

/// Holds: a live GET of a long log (over 1024 events) decides "live" in the command and reads the log
/// later, in steps driven by a read worker; a flow archived in between (its keys removed by the commit)
/// is answered with a retryable error, and the retry finds it archived. It once answered nil: a false
/// "not found" (HTTP 404) for a flow that exists. The gap is as long as the read pool's queue (here:
/// four slow folds ahead of it).
#[test]
fn a_long_flow_archived_during_its_live_read_is_not_answered_nil() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let payload = vec!["0"; 2 << 20].join(",");
    let busy: Vec<_> = (0..4)
        .map(|i| {
            let id = format!("wide{i}");
            let mut events = ended(&id, "{}");
            events.insert(1, ev(OLD, "webhook_noise", &format!("[{payload}]")));
            write_log(&mut c, &id, "active", "1700000000000", &events);
            let mut conn = srv.conn();
            std::thread::spawn(move || get(&mut conn, &id).map(|s| s.is_some()))
        })
        .collect();
    let spec = FlowSpec {
        events: 3000,
        ..FlowSpec::done("long")
    };
    write_flow(&mut c, &spec);
    std::thread::sleep(Duration::from_millis(300));
    let mut reader = srv.conn();
    let read = std::thread::spawn(move || get(&mut reader, "long"));
    std::thread::sleep(Duration::from_millis(100));
    archive(&mut c, "long").unwrap();
    for b in busy {
        assert!(b.join().unwrap().unwrap());
    }
    let answer = read.join().unwrap();
    assert!(
        !matches!(answer, Ok(None)),
        "GET answered nil for a flow archived while its live read waited"
    );
    assert_eq!(
        get(&mut c, "long").unwrap(),
        Some(archived_state(&state_json(&spec)))
    );
}

/// Holds: a new incarnation is stored after its predecessor's generation, so it never takes its
/// predecessor's key, even once that object is gone (a bucket lifecycle rule, an operator). It once
/// was written to that very key: its header's `previous` named itself, `GET … PREVIOUS 1` answered it
/// as its own predecessor, and the read cache, keyed by location, kept answering the earlier one. An
/// id long enough that its object takes the `_sha256` name (past `object-name-max`) once still did.
#[test]
fn a_new_incarnation_never_takes_its_predecessors_key() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let long = "r".repeat(250);
    for id in ["reborn", long.as_str()] {
        let first = FlowSpec::done(id);
        write_flow(&mut c, &first);
        let loc1 = text(&archive(&mut c, id).unwrap()["location"]);
        assert_eq!(
            get(&mut c, id).unwrap(),
            Some(archived_state(&state_json(&first)))
        );
        let rel1 = loc1.strip_prefix(&s3.location("")).unwrap();
        assert_eq!(rel1.contains("_sha256"), id == long, "{rel1}");
        s3.delete(rel1);
        let second = FlowSpec {
            events: 8,
            ..FlowSpec::done(id)
        };
        write_flow(&mut c, &second);
        let loc2 = text(&archive(&mut c, id).unwrap()["location"]);
        let now = get(&mut c, id).unwrap();
        assert!(
            now == Some(archived_state(&state_json(&second))),
            "GET answers the earlier incarnation (cached at {loc1}) after the new one was archived at {loc2}"
        );
        assert_ne!(loc2, loc1, "the new incarnation took its predecessor's key");
        // The earlier incarnation, from the read cache: never the new one as its own predecessor.
        let before = previous(&mut c, id, "1").unwrap();
        assert_eq!(before, Some(archived_state(&state_json(&first))));
    }
}

/// Holds: generations only grow along a chain of incarnations, even as it moves between folders: an
/// incarnation archived in DB 1 after SWAPDB brought DB 0's entry there, then one in DB 0 after the
/// swap back, never takes the first one's key once its object is gone, which the middle one names as
/// its `previous`. When the count started again at 0 in a folder the predecessor did not lie in, the
/// third incarnation took that key and `PREVIOUS 2` answered the newest state.
#[test]
fn generations_only_grow_along_a_chain_that_moves_between_folders() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.cache-bytes", "0"]).unwrap();
    let spec = |events| FlowSpec {
        events,
        ..FlowSpec::done("swing")
    };
    write_flow(&mut c, &spec(3));
    let loc1 = text(&archive(&mut c, "swing").unwrap()["location"]);
    assert_eq!(loc1, s3.location("flows/swing.jsonl.gz"));
    run(&mut c, "SWAPDB 0 1");
    run(&mut c, "SELECT 1");
    write_flow(&mut c, &spec(5));
    let loc2 = text(&archive(&mut c, "swing").unwrap()["location"]);
    assert_eq!(loc2, s3.location("db1/flows/swing.g1.jsonl.gz"));
    run(&mut c, "SWAPDB 0 1");
    run(&mut c, "SELECT 0");
    s3.delete("flows/swing.jsonl.gz");
    write_flow(&mut c, &spec(7));
    let loc3 = text(&archive(&mut c, "swing").unwrap()["location"]);
    assert_eq!(loc3, s3.location("flows/swing.g2.jsonl.gz"));
    assert_eq!(
        previous(&mut c, "swing", "1").unwrap(),
        Some(archived_state(&state_json(&spec(5))))
    );
    // The first incarnation's object is gone: an error, never the newest state.
    let e = err_text(previous(&mut c, "swing", "2"));
    assert!(
        e.contains("NoSuchKey") || e.contains("404") || e.contains("not found"),
        "{e}"
    );
}

/// Holds: a live GET under `state fold` needs read access to exactly the keys the fold reads (event
/// log, snapshot, sequence); it once also demanded the labels hash, which it never reads.
#[test]
fn get_needs_only_the_keys_it_reads() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut admin = srv.conn();
    let spec = FlowSpec::done("acl");
    write_flow(&mut admin, &spec);
    run(
        &mut admin,
        "ACL SETUSER fold on >pw +@all %R~argyll:flow:*:events %R~argyll:flow:*:snapshot:*",
    );
    let mut reader = srv.conn();
    run(&mut reader, "AUTH fold pw");
    let r = get(&mut reader, "acl");
    assert!(
        matches!(&r, Ok(Some(s)) if *s == state_json(&spec)),
        "refused although it may read every key the fold reads: {r:?}"
    );
}

/// Holds: a reader without read access to a key the fold does read (the sequence) is refused with
/// NOPERM, never answered a fold that skipped it; a full read-only reader gets the engine's state.
#[test]
fn get_refuses_a_reader_who_may_not_read_the_sequence() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut admin = srv.conn();
    let spec = FlowSpec {
        snapshot: Snapshot::Stale(2),
        ..FlowSpec::done("acl2")
    };
    write_flow(&mut admin, &spec);
    let rules = "%R~argyll:flow:*:events %R~argyll:flow:*:snapshot:val %R~argyll:flow:*:idx:labels";
    run(
        &mut admin,
        &format!("ACL SETUSER noseq on >pw +@all {rules}"),
    );
    run(&mut admin, "ACL SETUSER ro on >pw +@all %R~argyll:flow:*");
    let mut noseq = srv.conn();
    run(&mut noseq, "AUTH noseq pw");
    let e = err_text(get(&mut noseq, "acl2"));
    assert!(e.contains("NOPERM") && e.contains("snapshot:seq"), "{e}");
    let mut ro = srv.conn();
    run(&mut ro, "AUTH ro pw");
    assert_eq!(get(&mut ro, "acl2").unwrap(), Some(state_json(&spec)));
    let e = err_text(archive(&mut ro, "acl2"));
    assert!(e.contains("NOPERM"), "{e}");
    assert!(live(&mut admin, "acl2"));
}

/// Holds: hostile event logs (nesting past Go's limit, lone surrogates, NUL escapes, 100,000 duplicate
/// keys, numbers out of float64's range, a 4 MB string, a zone offset Go cannot write, elements that
/// are no event, a `null` event, a start without a plan) never crash the server, and live and archived
/// answers agree: a flow GET answers live is archived and then answered with exactly those bytes
/// (plus the flag); one it cannot answer is refused by FLOW and stays live.
#[test]
fn hostile_logs_answer_alike_live_and_archived_or_stay_live() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let too_deep = "[".repeat(10_001) + &"]".repeat(10_001);
    let dupes = vec![r#""k":1"#; 100_000].join(",") + r#","k":"last""#;
    let long = "x".repeat(4 << 20);
    let init = |v: &str| format!(r#"{{"v":{v}}}"#);
    let mut cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("toodeep", ended("toodeep", &init(&too_deep))),
        (
            "surrogates",
            ended("surrogates", r#"{"\ud800k":"\udc00\ud800x\ud83d\ude00"}"#),
        ),
        (
            "nul",
            ended("nul", r#"{"n\u0000":"a\u0000b","html":"<&>\u2028"}"#),
        ),
        ("dupes", ended("dupes", &format!("{{{dupes}}}"))),
        ("huge", ended("huge", &init("1e400"))),
        ("big-int", ended("big-int", &init(&"9".repeat(300)))),
        ("long", ended("long", &init(&format!("\"{long}\"")))),
        (
            "nullevent",
            [vec![b"null".to_vec()], ended("nullevent", "{}")].concat(),
        ),
    ];
    let mut zone = ended("zone", "{}");
    zone[1] = ev(
        "2023-11-14T22:13:20+24:00",
        "flow_completed",
        r#"{"result":{},"flow_id":"zone"}"#,
    );
    cases.push(("zone", zone));
    for (name, bad) in [
        ("notevent", "[1]"),
        ("strevent", "\"x\""),
        ("badseq", r#"{"sequence":"1"}"#),
    ] {
        let mut events = ended(name, "{}");
        events.push(bad.as_bytes().to_vec());
        cases.push((name, events));
    }
    cases.push((
        "noplan",
        vec![ev(OLD, "flow_started", r#"{"flow_id":"noplan"}"#)],
    ));
    for (id, events) in &cases {
        write_log(&mut c, id, "completed", "1700000000000", events);
        let answer = get(&mut c, id);
        let archived = archive(&mut c, id);
        match answer {
            Ok(Some(state)) => {
                assert!(
                    archived.is_ok(),
                    "{id}: answered live, not archived: {archived:?}"
                );
                assert_eq!(
                    get(&mut c, id).unwrap(),
                    Some(archived_state(&state)),
                    "{id}"
                );
            }
            _ => {
                assert!(
                    archived.is_err(),
                    "{id}: archived although GET could not answer it"
                );
                assert!(live(&mut c, id), "{id}");
            }
        }
    }
    assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
}

/// Holds: `snapshot:seq` texts the engine's Lua `tonumber` reads differently (negative, hex, exponent,
/// beyond int64) are refused by GET and FLOW with the flow left live; a sequence of `i64::MAX` (past
/// the log's end) answers the snapshot alone, as the engine's `LRANGE` does, without a panic.
#[test]
fn odd_snapshot_sequences_are_refused_or_read_as_the_engine_reads_them() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    for (i, seq) in ["-1", "0x10", "1e3", "99999999999999999999", "", "4 4"]
        .iter()
        .enumerate()
    {
        let id = format!("seq{i}");
        write_flow(
            &mut c,
            &FlowSpec {
                snapshot: Snapshot::Stale(2),
                ..FlowSpec::done(&id)
            },
        );
        cmd::<()>(
            &mut c,
            &["SET", &format!("argyll:flow:{id}:snapshot:seq"), seq],
        )
        .unwrap();
        let e = err_text(get(&mut c, &id));
        assert!(e.contains("snapshot sequence"), "{seq:?}: {e}");
        let e = err_text(archive(&mut c, &id));
        assert!(e.contains("snapshot sequence"), "{seq:?}: {e}");
        assert!(live(&mut c, &id), "{seq:?}");
    }
    let spec = FlowSpec {
        snapshot: Snapshot::Stale(3),
        ..FlowSpec::done("seqmax")
    };
    write_flow(&mut c, &spec);
    run(
        &mut c,
        &format!("SET argyll:flow:seqmax:snapshot:seq {}", i64::MAX),
    );
    let (snapshot, _) = snapshot_of(&spec).unwrap();
    assert_eq!(get(&mut c, "seqmax").unwrap(), Some(snapshot.clone()));
    archive(&mut c, "seqmax").unwrap();
    assert_eq!(
        get(&mut c, "seqmax").unwrap(),
        Some(archived_state(&snapshot))
    );
}

/// Holds: status scores of `-inf` and `+inf` (any double is a valid ZSET score): `-inf` defers to the
/// last event's time (archived), `+inf` is never idle (left by the sweep), FORCE still archives it.
#[test]
fn infinite_status_scores_are_read_as_times() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    write_log(&mut c, "neg", "completed", "-inf", &ended("neg", "{}"));
    write_log(&mut c, "pos", "completed", "+inf", &ended("pos", "{}"));
    let mut fresh = ended("fresh", "{}");
    fresh.push(ev(
        &event_time(now_ms()),
        "attribute_set",
        r#"{"key":"late","value":1}"#,
    ));
    write_log(&mut c, "fresh", "completed", "-inf", &fresh);
    let s = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&s["archived"]), 1, "{s:?}");
    assert!(!live(&mut c, "neg") && live(&mut c, "pos") && live(&mut c, "fresh"));
    let e = err_text(archive(&mut c, "pos"));
    assert!(e.contains("idle"), "{e}");
    run(&mut c, "FLOWARCHIVE.FLOW pos FORCE");
    assert!(!live(&mut c, "pos"));
}

/// Holds: a live flow's state is folded off the main thread, so GET refuses it inside MULTI and
/// scripts (an error, not a hang or a wrong answer); the archived, cached state still answers there.
#[test]
fn get_of_a_live_flow_in_multi_or_a_script_is_refused() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let spec = FlowSpec::done("inside");
    write_flow(&mut c, &spec);
    let script = [
        "EVAL",
        "return redis.call('FLOWARCHIVE.GET', KEYS[1])",
        "1",
        "inside",
    ];
    let e = err_text(cmd::<Option<String>>(&mut c, &script));
    assert!(e.contains("is live"), "{e}");
    let tx: redis::RedisResult<(Option<String>,)> = redis::pipe()
        .atomic()
        .cmd("FLOWARCHIVE.GET")
        .arg("inside")
        .query(&mut c);
    assert!(err_text(tx).contains("is live"));
    archive(&mut c, "inside").unwrap();
    let archived = Some(archived_state(&state_json(&spec)));
    assert_eq!(get(&mut c, "inside").unwrap(), archived);
    assert_eq!(cmd::<Option<String>>(&mut c, &script).unwrap(), archived);
}

/// A version-1 object written independently of the module's encoder (docs/FORMAT.md), with the
/// snapshot and sequence its flow had.
fn v1_object(id: &str, events: &[String], snapshot: &str, seq: usize) -> Vec<u8> {
    let trailer = format!(
        "{{\"snapshot\":{snapshot},\"seq\":{seq},\"labels\":{{}},\"status\":\"completed\"}}"
    );
    crafted_object(id, 0, 1, events, &trailer)
}

/// Holds: a version-1 object holding a stale snapshot is folded on read (snapshot, then the events
/// after its sequence), never answered as its stale snapshot; `PREVIOUS` of it is nil.
#[test]
fn a_version_1_object_with_a_stale_snapshot_is_folded() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let spec = FlowSpec {
        snapshot: Snapshot::Stale(2),
        ..FlowSpec::done("old1")
    };
    let (stale, seq) = snapshot_of(&spec).unwrap();
    s3.put_as_archive(
        "flows/old1.jsonl.gz",
        &v1_object("old1", &events_of(&spec), &stale, seq),
    );
    let loc = s3.location("flows/old1.jsonl.gz");
    run(&mut c, &format!("HSET archived:flows old1 {loc}"));
    assert_eq!(
        get(&mut c, "old1").unwrap(),
        Some(archived_state(&state_json(&spec)))
    );
    assert_eq!(previous(&mut c, "old1", "1").unwrap(), None);
}

/// Holds: a planted object whose header names another flow's object as its predecessor is followed
/// only to a location this module writes for this id (refused as bad_location, no request made).
#[test]
fn a_planted_predecessor_of_another_flow_is_refused() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let victim = FlowSpec::done("victim");
    write_flow(&mut c, &victim);
    archive(&mut c, "victim").unwrap();
    let mine = FlowSpec::done("mine");
    write_flow(&mut c, &mine);
    archive(&mut c, "mine").unwrap();
    let body = gunzip(&s3.get("flows/mine.jsonl.gz").unwrap());
    let (header, rest) = body.split_once('\n').unwrap();
    let mut h: serde_json::Value = serde_json::from_str(header).unwrap();
    h["previous"] = s3.location("flows/victim.jsonl.gz").into();
    h["generation"] = 1.into();
    s3.put_as_archive("flows/mine.g1.jsonl.gz", &gzip(&format!("{h}\n{rest}")));
    let loc = s3.location("flows/mine.g1.jsonl.gz");
    run(&mut c, &format!("HSET archived:flows mine {loc}"));
    assert_eq!(
        get(&mut c, "mine").unwrap(),
        Some(archived_state(&state_json(&mine)))
    );
    let e = err_text(previous(&mut c, "mine", "1"));
    assert!(e.contains("not where flowarchive writes this flow"), "{e}");
}

/// Holds: reused-id races. While a new incarnation's upload is in flight, a sweep does not archive it
/// a second time, and an index entry changed meanwhile stops the commit (the flow stays live, the
/// entry as it was set); the next attempt archives it beside the first incarnation, whose object is
/// untouched. With every one of the 16 object keys holding other content, nothing is replaced.
#[test]
fn reused_id_races_keep_every_incarnation() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let first = FlowSpec::done("again");
    write_flow(&mut c, &first);
    let loc1 = text(&archive(&mut c, "again").unwrap()["location"]);
    let object1 = s3.get("flows/again.jsonl.gz").unwrap();
    let second = FlowSpec {
        events: 7,
        ..FlowSpec::done("again")
    };
    write_flow(&mut c, &second);
    // This archive's own PUT is held; the sweep's requests are not.
    proxy.set(vec![Rule {
        method: "PUT",
        path: "flows/again".into(),
        fault: Fault::Gate,
    }]);
    let mut other = srv.conn();
    let flow = std::thread::spawn(move || archive(&mut other, "again"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    let s = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&s["archived"]), 0, "{s:?}");
    let planted = s3.location("flows/again.g9.jsonl.gz");
    cmd::<()>(&mut c, &["HSET", "archived:flows", "again", &planted]).unwrap();
    proxy.release();
    let e = err_text(flow.join().unwrap());
    assert!(e.contains("by another archive meanwhile"), "{e}");
    assert!(live(&mut c, "again"));
    assert_eq!(
        cmd::<String>(&mut c, &["HGET", "archived:flows", "again"]).unwrap(),
        planted
    );
    cmd::<()>(&mut c, &["HSET", "archived:flows", "again", &loc1]).unwrap();
    let loc2 = text(&archive(&mut c, "again").unwrap()["location"]);
    assert_ne!(loc1, loc2);
    assert_eq!(s3.get("flows/again.jsonl.gz").unwrap(), object1);
    assert_eq!(
        get(&mut c, "again").unwrap(),
        Some(archived_state(&state_json(&second)))
    );
    assert_eq!(
        previous(&mut c, "again", "1").unwrap(),
        Some(archived_state(&state_json(&first)))
    );

    write_flow(&mut c, &FlowSpec::done("full"));
    for g in 0..16 {
        let suffix = if g == 0 {
            String::new()
        } else {
            format!(".g{g}")
        };
        s3.put_as_archive(&format!("flows/full{suffix}.jsonl.gz"), b"someone else's");
    }
    let e = err_text(archive(&mut c, "full"));
    assert!(e.contains("16 object keys"), "{e}");
    assert!(live(&mut c, "full"));
}

/// Every object under the prefix with its bytes, each checked to be a flow object whose header names
/// the flow id, DB 0 and generation of its key.
fn bucket_objects(s3: &S3) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut objects = std::collections::BTreeMap::new();
    for rel in s3.list() {
        let name = rel
            .strip_prefix("flows/")
            .unwrap_or_else(|| panic!("{rel}"));
        let name = name.strip_suffix(".jsonl.gz").unwrap();
        let (id, generation) = match name.rsplit_once(".g") {
            Some((id, g)) => (id, g.parse::<u64>().unwrap()),
            None => (name, 0),
        };
        let body = s3.get(&rel).unwrap();
        let text = gunzip(&body);
        let header: serde_json::Value =
            serde_json::from_str(text.split_once('\n').unwrap().0).unwrap();
        assert_eq!(header["flow_id"], id, "{rel}: {header}");
        assert_eq!(header["db"], 0, "{rel}: {header}");
        assert_eq!(header["generation"], generation, "{rel}: {header}");
        objects.insert(rel, body);
    }
    objects
}

/// Every object of `before` is still in `after` with the same bytes, but for `gone`.
fn none_replaced(
    before: &std::collections::BTreeMap<String, Vec<u8>>,
    after: &std::collections::BTreeMap<String, Vec<u8>>,
    gone: &[String],
) {
    for (rel, body) in before {
        if gone.contains(rel) {
            assert!(!after.contains_key(rel), "{rel} came back");
            continue;
        }
        assert!(
            after.get(rel) == Some(body),
            "{rel} was replaced or removed"
        );
    }
}

/// `spec`'s flow as `c`'s server answers it: archived (its index entry names an object) with exactly
/// its state and every one of its events, never live; its location.
fn answers_archived(c: &mut redis::Connection, spec: &FlowSpec, server: &str) -> String {
    let id = spec.id;
    assert!(!live(c, id), "{server}: {id} is still live");
    let (state, events) = get_events(c, id).unwrap();
    assert_eq!(
        state,
        archived_state(&state_json(spec)),
        "{server} answers another state for {id}"
    );
    assert_eq!(
        events,
        events_of(spec),
        "{server} answers other events for {id}"
    );
    assert_eq!(
        get(c, id).unwrap(),
        Some(archived_state(&state_json(spec))),
        "{server}: {id}"
    );
    cmd::<String>(c, &["HGET", "archived:flows", id]).unwrap()
}

/// Holds: two servers sharing one bucket and one prefix archive flows of the same ids with other
/// content, by sweeps running at once and by `FLOW … FORCE` raced id by id, each archive landing at
/// its own generation: each server answers exactly its own flow (state and every event), never the
/// other's, deletes nothing live without its own object, and no object is replaced. A second
/// incarnation archived on one server answers beside its first (`PREVIOUS 1`), the other server's
/// answers unchanged; with the gen-0 object of one server's flow removed (a lifecycle rule), that
/// server's next incarnation takes a key of its own, never the removed one nor the other server's.
/// What a shared prefix does not keep apart is in docs/SAFETY.md's limits (one prefix per
/// deployment).
#[test]
fn two_servers_sharing_a_prefix_answer_only_their_own_flows() {
    let s3 = S3::new_bucket();
    let servers = [
        Server::start(ServerOpts::new(&s3)),
        Server::start(ServerOpts::new(&s3)),
    ];
    let mut conns: Vec<redis::Connection> = servers.iter().map(Server::conn).collect();
    for c in conns.iter_mut() {
        // Every archived read goes to the bucket.
        config_set(c, "flowarchive.cache-bytes", "0").unwrap();
    }
    let labels: [&[(&str, &str)]; 3] =
        [&[("tenant", "a")], &[("tenant", "b")], &[("tenant", "a2")]];
    let spec = |id: &'static str, who: usize| FlowSpec {
        events: [5, 7, 9][who],
        labels: labels[who],
        ..FlowSpec::done(id)
    };
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let swept: Vec<&'static str> = (0..120).map(|i| leak(format!("s{i}"))).collect();
    let forced: Vec<&'static str> = (0..64).map(|i| leak(format!("f{i}"))).collect();
    let now = now_ms();
    let recent = |id: &'static str, who: usize| FlowSpec {
        last_ms: now,
        ..spec(id, who)
    };

    // The generations of the two servers' locations of one id, in order.
    let gens = |loc: &[String]| {
        let mut g: Vec<u64> = loc
            .iter()
            .map(
                |l| match l.strip_suffix(".jsonl.gz").unwrap().rsplit_once(".g") {
                    Some((_, g)) => g.parse().unwrap(),
                    None => 0,
                },
            )
            .collect();
        g.sort();
        g
    };
    let mut won = [0; 4];

    // Both sweeps at once, each taking the ids in the other's order (by age), so that they meet.
    let swept_spec = |id: &'static str, who: usize| {
        let i: i64 = id[1..].parse().unwrap();
        FlowSpec {
            last_ms: LONG_AGO + 1000 * [i, swept.len() as i64 - i][who],
            ..spec(id, who)
        }
    };
    for (who, c) in conns.iter_mut().enumerate() {
        for id in &swept {
            write_flow(c, &swept_spec(id, who));
        }
    }
    let start = std::sync::Arc::new(std::sync::Barrier::new(2));
    let sweeps: Vec<_> = servers
        .iter()
        .map(|srv| {
            let (mut c, start) = (srv.conn(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                sweep(&mut c, &[]).unwrap()
            })
        })
        .collect();
    for s in sweeps {
        let s = s.join().unwrap();
        assert_eq!(int(&s["archived"]), swept.len() as i64, "{s:?}");
    }
    for id in &swept {
        let loc: Vec<String> = (0..2)
            .map(|who| answers_archived(&mut conns[who], &swept_spec(id, who), "server"))
            .collect();
        won[usize::from(gens(&loc[1..])[0] == 0)] += 1;
        assert_eq!(gens(&loc), [0, 1], "{id}: {loc:?}");
    }
    assert!(won[0] > 0 && won[1] > 0, "the sweeps never met: {won:?}");
    let after_sweeps = bucket_objects(&s3);
    assert_eq!(after_sweeps.len(), 2 * swept.len());

    // FLOW … FORCE raced id by id (the flows are too recent for a sweep).
    for (who, c) in conns.iter_mut().enumerate() {
        for id in &forced {
            write_flow(c, &recent(id, who));
        }
    }
    let racers: Vec<_> = servers
        .iter()
        .map(|srv| {
            let (mut c, start, ids) = (srv.conn(), start.clone(), forced.clone());
            std::thread::spawn(move || {
                ids.iter()
                    .map(|id| {
                        start.wait();
                        redis::cmd("FLOWARCHIVE.FLOW")
                            .arg(*id)
                            .arg("FORCE")
                            .query::<redis::Value>(&mut c)
                            .map(reply_map)
                            .map(|r| text(&r["location"]))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<Vec<_>> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, id) in forced.iter().enumerate() {
        let loc: Vec<String> = (0..2)
            .map(|who| {
                let said = answers[who][i]
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
                let loc = answers_archived(&mut conns[who], &recent(id, who), "server");
                assert_eq!(*said, loc, "{id}");
                loc
            })
            .collect();
        won[2 + usize::from(gens(&loc[1..])[0] == 0)] += 1;
        assert_eq!(gens(&loc), [0, 1], "{id}: {loc:?}");
    }
    assert!(
        won[2] > 0 && won[3] > 0,
        "one server won every race: {won:?}"
    );
    eprintln!("generation 0 taken by server 0 and 1 (sweeps, then FLOW): {won:?}");
    let after_force = bucket_objects(&s3);
    assert_eq!(after_force.len(), 2 * (swept.len() + forced.len()));
    none_replaced(&after_sweeps, &after_force, &[]);

    // A second incarnation of some ids on server 0; server 1's answers stay its own.
    let again = &swept[..8];
    for id in again {
        write_flow(&mut conns[0], &spec(id, 2));
        let loc = text(&archive(&mut conns[0], id).unwrap()["location"]);
        // After its own predecessor's and the other server's generations.
        assert_eq!(loc, s3.location(&format!("flows/{id}.g2.jsonl.gz")));
        assert_eq!(
            answers_archived(&mut conns[0], &spec(id, 2), "server 0"),
            loc
        );
        assert_eq!(
            previous(&mut conns[0], id, "1").unwrap(),
            Some(archived_state(&state_json(&swept_spec(id, 0)))),
            "{id}"
        );
        answers_archived(&mut conns[1], &swept_spec(id, 1), "server 1");
        assert_eq!(previous(&mut conns[1], id, "1").unwrap(), None, "{id}");
    }
    let after_again = bucket_objects(&s3);
    none_replaced(&after_force, &after_again, &[]);

    // The gen-0 object of one server's flow removed; that server archives a new incarnation.
    let mut gone = Vec::new();
    for id in swept[8..16].iter().chain(&forced[..8]) {
        let rel = format!("flows/{id}.jsonl.gz");
        let at = s3.location(&rel);
        let owner = (0..2)
            .find(|&who| {
                cmd::<String>(&mut conns[who], &["HGET", "archived:flows", id]).unwrap() == at
            })
            .unwrap_or_else(|| panic!("no server indexes {at}"));
        s3.delete(&rel);
        gone.push(rel);
        let next = spec(id, 2);
        write_flow(&mut conns[owner], &next);
        let loc = text(&archive(&mut conns[owner], id).unwrap()["location"]);
        // Neither the removed key nor the other server's (generation 1).
        assert_eq!(loc, s3.location(&format!("flows/{id}.g2.jsonl.gz")));
        assert_eq!(answers_archived(&mut conns[owner], &next, "owner"), loc);
        let e = err_text(previous(&mut conns[owner], id, "1"));
        assert!(
            e.contains("NoSuchKey") || e.contains("404") || e.contains("not found"),
            "{e}"
        );
        let other = 1 - owner;
        let first_other = if id.starts_with('f') {
            recent(id, other)
        } else {
            swept_spec(id, other)
        };
        let theirs = answers_archived(&mut conns[other], &first_other, "the other server");
        assert_ne!(theirs, loc, "{id}");
    }
    none_replaced(&after_again, &bucket_objects(&s3), &gone);
    for (who, c) in conns.iter_mut().enumerate() {
        for id in &swept[16..] {
            answers_archived(c, &swept_spec(id, who), "at the end, server");
        }
        for id in &forced[8..] {
            answers_archived(c, &recent(id, who), "at the end, server");
        }
    }
}
