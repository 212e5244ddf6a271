//! FLOWARCHIVE.FLOW against a real Valkey 9 with the module and a real SeaweedFS.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy};
use common::*;
use serde_json::Value;

fn bed() -> (S3, Server) {
    let s3 = S3::new_bucket();
    let server = Server::start(ServerOpts::new(&s3));
    (s3, server)
}

fn object_lines(s3: &S3, key: &str) -> Vec<String> {
    let body = s3.get(key).expect("object stored");
    gunzip(&body).lines().map(str::to_string).collect()
}

#[test]
fn happy_path_archives_exactly_one_flow() {
    let (s3, srv) = bed();
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("abc"));
    // A neighbour sharing the label value, one with its own label, an active flow, engine and foreign keys.
    write_flow(&mut c, &FlowSpec::done("neighbour"));
    write_flow(
        &mut c,
        &FlowSpec {
            labels: &[("tenant", "acme"), ("region", "eu")],
            ..FlowSpec::done("abc2")
        },
    );
    write_flow(
        &mut c,
        &FlowSpec {
            status: "active",
            ..FlowSpec::done("running")
        },
    );
    cmd::<()>(&mut c, &["SET", "argyll:catalog:wf:ship", "{\"steps\":[]}"]).unwrap();
    cmd::<()>(&mut c, &["HSET", "argyll:partition:0", "owner", "node-1"]).unwrap();
    cmd::<()>(&mut c, &["SET", "unrelated", "x"]).unwrap();
    let events_before: Vec<String> =
        cmd(&mut c, &["LRANGE", "argyll:flow:abc:events", "0", "-1"]).unwrap();
    let before = dump_all(&mut c);

    let r = archive(&mut c, "abc").unwrap();
    let location = s3.location("flows/abc.jsonl.gz");
    assert_eq!(text(&r["location"]), location);
    assert_eq!(int(&r["events"]), 5);
    assert_eq!(int(&r["already_archived"]), 0);

    // The object: header, events verbatim and in order, trailer; checksums right.
    let body = s3.get("flows/abc.jsonl.gz").unwrap();
    assert_eq!(int(&r["stored_bytes"]) as usize, body.len());
    use sha2::Digest;
    assert_eq!(text(&r["sha256"]), hex(&sha2::Sha256::digest(&body)));
    let raw = gunzip(&body);
    assert_eq!(int(&r["raw_bytes"]) as usize, raw.len());
    let lines: Vec<&str> = raw.lines().collect();
    assert_eq!(lines.len(), 1 + 5 + 1);
    let header: Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(header["format"], "flowarchive");
    assert_eq!(header["version"], 2);
    assert_eq!(header["flow_id"], "abc");
    assert_eq!(header["events"], 5);
    assert_eq!(header["previous"], Value::Null);
    assert_eq!(header["keys"]["events"], "argyll:flow:abc:events");
    assert_eq!(header["db"], 0);
    let rest = &raw[lines[0].len() + 1..];
    assert_eq!(header["raw_bytes"], rest.len());
    assert_eq!(
        header["sha256"],
        hex(&sha2::Sha256::digest(rest.as_bytes()))
    );
    assert_eq!(
        lines[1..6],
        events_before.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    // The trailer: the engine's state spliced in as the engine writes it, no snapshot (the flow had
    // none), then the engine's index entries.
    let state = state_json(&FlowSpec::done("abc"));
    assert!(
        lines[6].starts_with(&format!(r#"{{"state":{state},"snapshot":null,"#)),
        "{}",
        lines[6]
    );
    let trailer: Value = serde_json::from_str(lines[6]).unwrap();
    assert_eq!(trailer["seq"], Value::Null);
    assert_eq!(trailer["labels"], serde_json::json!({"tenant": "acme"}));
    assert_eq!(trailer["status"], "completed");

    // Valkey: flow keys gone, index written, engine-wide entries of this flow only removed.
    for k in flow_keys("abc") {
        assert_eq!(cmd::<i64>(&mut c, &["EXISTS", &k]).unwrap(), 0, "{k}");
    }
    assert_eq!(
        cmd::<String>(&mut c, &["HGET", "archived:flows", "abc"]).unwrap(),
        location
    );
    assert_eq!(
        cmd::<Option<String>>(&mut c, &["HGET", "argyll:idx:status", "flow:abc"]).unwrap(),
        None
    );
    assert_eq!(
        cmd::<Option<f64>>(
            &mut c,
            &["ZSCORE", "argyll:idx:status:completed", "flow:abc"]
        )
        .unwrap(),
        None
    );
    assert_eq!(
        cmd::<i64>(
            &mut c,
            &["SISMEMBER", "argyll:idx:label:tenant:acme", "flow:abc"]
        )
        .unwrap(),
        0
    );
    // Other flows still carry tenant=acme: the value stays listed.
    assert_eq!(
        cmd::<i64>(&mut c, &["SISMEMBER", "argyll:idx:label:tenant", "acme"]).unwrap(),
        1
    );

    let after = dump_all(&mut c);
    let touched = |k: &[u8]| {
        let k = String::from_utf8_lossy(k);
        k.starts_with("argyll:flow:abc:")
            || [
                "argyll:idx:status",
                "argyll:idx:status:completed",
                "argyll:idx:label:tenant:acme",
                "archived:flows",
            ]
            .contains(&k.as_ref())
    };
    for (k, v) in &before.0 {
        if !touched(k) {
            assert_eq!(
                after.0.get(k),
                Some(v),
                "{} changed",
                String::from_utf8_lossy(k)
            );
        }
    }
    assert_eq!(
        after.len(),
        before.len() - 2 + 1,
        "the flow's event log and labels gone (it had no snapshot), the index added"
    );

    // The last flow with region=eu takes the emptied value set and the value with it.
    archive(&mut c, "abc2").unwrap();
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:idx:label:region:eu"]).unwrap(),
        0
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["SISMEMBER", "argyll:idx:label:region", "eu"]).unwrap(),
        0
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["SISMEMBER", "argyll:idx:label:tenant", "acme"]).unwrap(),
        1
    );
    assert!(srv.log().contains("archived flow \"abc\""));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn compact_events_empty_labels_and_ten_thousand_events() {
    let (s3, srv) = bed();
    let mut c = srv.conn();
    write_flow(
        &mut c,
        &FlowSpec {
            compact_events: true,
            labels: &[],
            ..FlowSpec::done("old-engine")
        },
    );
    write_flow(
        &mut c,
        &FlowSpec {
            events: 10_000,
            status: "failed",
            ..FlowSpec::done("big")
        },
    );
    let big_events: Vec<String> =
        cmd(&mut c, &["LRANGE", "argyll:flow:big:events", "0", "-1"]).unwrap();

    let r = archive(&mut c, "old-engine").unwrap();
    assert_eq!(int(&r["events"]), 5);
    let lines = object_lines(&s3, "flows/old-engine.jsonl.gz");
    assert!(!lines[1].contains("aggregate_id") && lines[1].contains("\"type\":\"flow_started\""));
    let trailer: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(trailer["labels"], serde_json::json!({}));

    let r = archive(&mut c, "big").unwrap();
    assert_eq!(int(&r["events"]), 10_000);
    // The module reports its longest main-thread stretch for the flow and frees what it buffered.
    let held = int(&r["main_thread_us"]);
    assert!(
        held > 0 && held <= info_field(&mut c, "main_thread_max_us"),
        "{held}"
    );
    // Its CPU time is measured too, inside the stretch's wall-clock time (the slack is for the two
    // clocks' sources and rounding).
    let (cpu, wall) = (
        info_field(&mut c, "main_thread_max_cpu_us"),
        info_field(&mut c, "main_thread_max_us"),
    );
    assert!(cpu > 0 && cpu <= wall + wall / 20 + 2, "{cpu} {wall}");
    for stage in ["capture", "commit"] {
        assert!(
            info_field(&mut c, &format!("main_thread_max_us_{stage}")) > 0,
            "{stage}"
        );
    }
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0);
    assert!(info_field(&mut c, "buffered_bytes_peak") > 1_000_000);
    let lines = object_lines(&s3, "flows/big.jsonl.gz");
    assert_eq!(lines.len(), 10_002);
    assert_eq!(lines[1..10_001], big_events[..]);
    assert_eq!(
        serde_json::from_str::<Value>(&lines[10_001]).unwrap()["status"],
        "failed"
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:big:events"]).unwrap(),
        0
    );
}

/// Runs FLOW through a proxy fault and checks that nothing was deleted.
fn assert_fails_safely(fault: Fault, timeout_ms: &str, expect: &[&str]) {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["request-timeout-ms", timeout_ms]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("f1"));
    let before = dump_all(&mut c);
    proxy.all(fault.clone());

    let mut other = srv.conn();
    let started = Instant::now();
    let handle = std::thread::spawn(move || {
        let r = archive(&mut c, "f1");
        (r, c)
    });
    // The server keeps serving while the upload is in flight (or hanging).
    std::thread::sleep(Duration::from_millis(100));
    let pong: String = cmd(&mut other, &["PING"]).unwrap();
    assert_eq!(pong, "PONG");
    let (r, _c) = handle.join().unwrap();
    let msg = err_text(r);
    for e in expect {
        assert!(msg.contains(e), "{fault:?}: {msg}");
    }
    assert!(msg.contains("nothing was deleted"), "{msg}");
    assert!(
        !msg.contains(S3_SECRET) && !msg.contains("X-Amz-Signature"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_same(
        &before,
        &dump_all(&mut other),
        &format!("{fault:?}: nothing may change"),
    );
    assert!(s3.list().is_empty() || fault == Fault::Truncate);
    assert!(!srv.log().contains(S3_SECRET));
}

#[test]
fn s3_500_deletes_nothing() {
    // Every request fails, the bucket's proof first.
    assert_fails_safely(Fault::Status(500), "5000", &["HEAD bucket", "HTTP 500"]);
}

#[test]
fn s3_hanging_past_the_timeout_deletes_nothing() {
    assert_fails_safely(Fault::Hang, "700", &["timed out"]);
}

#[test]
fn s3_connection_reset_deletes_nothing() {
    assert_fails_safely(Fault::Reset, "5000", &["failed"]);
}

#[test]
fn s3_unreachable_deletes_nothing() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&format!("http://127.0.0.1:{}", free_port()));
    let srv = Server::start(opts);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("f1"));
    let before = dump_all(&mut c);
    let msg = err_text(archive(&mut c, "f1"));
    assert!(
        msg.contains("connection failed") && msg.contains("nothing was deleted"),
        "{msg}"
    );
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
    let info: String = cmd(&mut c, &["INFO", "flowarchive"]).unwrap();
    assert!(info.contains("failures_s3_unreachable:1"), "{info}");
}

/// A wrong secret: the upload is refused and nothing is deleted; a flow read and cached with the
/// right one is not answered from the cache under it.
#[test]
fn wrong_secret_gets_403_and_deletes_nothing() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("read"));
    archive(&mut c, "read").unwrap();
    assert!(get(&mut c, "read").unwrap().is_some());
    assert_eq!(info_field(&mut c, "get_cache_flows"), 1);
    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "flowarchive.secret-key", "not-the-secret"],
    )
    .unwrap();
    write_flow(&mut c, &FlowSpec::done("f1"));
    let before = dump_all(&mut c);
    let msg = err_text(archive(&mut c, "f1"));
    assert!(
        msg.contains("HTTP 403") && msg.contains("nothing was deleted"),
        "{msg}"
    );
    assert!(!msg.contains("not-the-secret"));
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
    assert_eq!(s3.list(), ["flows/read.jsonl.gz"]);
    let msg = err_text(get(&mut c, "read"));
    assert!(
        msg.contains("HTTP 403"),
        "read again, not from the cache: {msg}"
    );
    assert!(!srv.log().contains("not-the-secret"));
}

#[test]
fn tampered_presigned_url_is_refused_by_the_test_s3() {
    use rusty_s3::S3Action;
    let s3 = S3::new_bucket();
    let url = s3
        .bucket
        .put_object(Some(&s3.creds), &s3.key("flows/x.jsonl.gz"))
        .sign(Duration::from_secs(60));
    assert!(
        s3.agent.put(url.as_str()).send_bytes(b"ok").is_ok(),
        "a correct signature passes"
    );
    let tampered = url.as_str().replace("flows/x.jsonl.gz", "flows/y.jsonl.gz");
    match s3.agent.put(&tampered).send_bytes(b"evil") {
        Err(ureq::Error::Status(403, _)) => {}
        other => panic!("tampered URL must get 403, got {other:?}"),
    }
    // A body that does not match its signed Content-MD5 is refused too.
    let z_key = s3.key("flows/z.jsonl.gz");
    let mut action = s3.bucket.put_object(Some(&s3.creds), &z_key);
    action
        .headers_mut()
        .insert("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==");
    let url = action.sign(Duration::from_secs(60));
    let r = s3
        .agent
        .put(url.as_str())
        .set("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==")
        .send_bytes(b"not empty");
    assert!(matches!(r, Err(ureq::Error::Status(400..=499, _))), "{r:?}");
    assert_eq!(s3.get("flows/y.jsonl.gz"), None);
    assert_eq!(s3.get("flows/z.jsonl.gz"), None);
}

#[test]
fn late_event_during_upload_deletes_nothing() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("late"));
    proxy.hold("PUT");
    let handle = std::thread::spawn(move || archive(&mut c, "late"));
    let mut other = srv.conn();
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    cmd::<()>(
        &mut other,
        &[
            "RPUSH",
            "argyll:flow:late:events",
            "{\"type\":\"attribute_set\"}",
        ],
    )
    .unwrap();
    proxy.release();
    let msg = err_text(handle.join().unwrap());
    assert!(
        msg.contains("changed while it was being archived") && msg.contains("nothing was deleted"),
        "{msg}"
    );
    assert_eq!(
        cmd::<i64>(&mut other, &["LLEN", "argyll:flow:late:events"]).unwrap(),
        6
    );
    assert_eq!(
        cmd::<i64>(&mut other, &["HEXISTS", "archived:flows", "late"]).unwrap(),
        0
    );
    assert_eq!(
        cmd::<String>(&mut other, &["HGET", "argyll:idx:status", "flow:late"]).unwrap(),
        "completed"
    );
    // Once the flow is quiet again, a new attempt archives all six events.
    let r = archive(&mut other, "late").unwrap();
    assert_eq!(int(&r["events"]), 6);
}

#[test]
fn status_change_during_upload_deletes_nothing() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("revived"));
    proxy.hold("PUT");
    let handle = std::thread::spawn(move || archive(&mut c, "revived"));
    let mut other = srv.conn();
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    cmd::<()>(
        &mut other,
        &[
            "ZADD",
            "argyll:idx:status:completed",
            "1800000000000",
            "flow:revived",
        ],
    )
    .unwrap();
    proxy.release();
    let msg = err_text(handle.join().unwrap());
    assert!(msg.contains("changed while it was being archived"), "{msg}");
    assert_eq!(
        cmd::<i64>(&mut other, &["EXISTS", "argyll:flow:revived:events"]).unwrap(),
        1
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let (_s3, srv) = bed();
    let mut c = srv.conn();
    write_flow(
        &mut c,
        &FlowSpec {
            status: "active",
            ..FlowSpec::done("busy")
        },
    );
    let msg = err_text(archive(&mut c, "busy"));
    assert!(
        msg.contains("\"busy\" is not terminal (status \"active\")"),
        "{msg}"
    );

    let msg = err_text(archive(&mut c, "ghost"));
    assert!(msg.contains("flow \"ghost\" not found"), "{msg}");

    write_flow(&mut c, &FlowSpec::done("typo"));
    cmd::<()>(&mut c, &["DEL", "argyll:flow:typo:events"]).unwrap();
    cmd::<()>(&mut c, &["SET", "argyll:flow:typo:events", "oops"]).unwrap();
    let msg = err_text(archive(&mut c, "typo"));
    assert!(msg.contains("holds a string, expected a list"), "{msg}");

    write_flow(&mut c, &FlowSpec::done("garbled"));
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:garbled:snapshot:val", "{not json"],
    )
    .unwrap();
    let msg = err_text(archive(&mut c, "garbled"));
    assert!(msg.contains("the snapshot is not JSON"), "{msg}");
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:garbled:events"]).unwrap(),
        1
    );

    write_flow(&mut c, &FlowSpec::done("badseq"));
    cmd::<()>(&mut c, &["SET", "argyll:flow:badseq:snapshot:seq", "four"]).unwrap();
    let msg = err_text(archive(&mut c, "badseq"));
    assert!(
        msg.contains("snapshot sequence \"four\" is not a count of events"),
        "{msg}"
    );

    write_flow(&mut c, &FlowSpec::done("badevent"));
    cmd::<()>(&mut c, &["RPUSH", "argyll:flow:badevent:events", "<xml/>"]).unwrap();
    let msg = err_text(archive(&mut c, "badevent"));
    assert!(msg.contains("event 5: not JSON"), "{msg}");

    write_flow(
        &mut c,
        &FlowSpec {
            last_ms: now_ms() - 1000,
            ..FlowSpec::done("fresh")
        },
    );
    let msg = err_text(archive(&mut c, "fresh"));
    assert!(
        msg.contains("is not idle long enough") && msg.contains("retention 30d"),
        "{msg}"
    );
    let r: redis::Value = redis::cmd("FLOWARCHIVE.FLOW")
        .arg("fresh")
        .arg("FORCE")
        .query(&mut c)
        .unwrap();
    assert_eq!(int(&reply_map(r)["events"]), 5);

    let e = redis::cmd("FLOWARCHIVE.FLOW")
        .arg("x")
        .arg("NOW")
        .query::<redis::Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("syntax error"), "{e}");
    let e = redis::cmd("FLOWARCHIVE.FLOW")
        .query::<redis::Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("wrong number of arguments"), "{e}");
    let e = redis::cmd("FLOWARCHIVE.FLOW")
        .arg("")
        .query::<redis::Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("must not be empty"), "{e}");
    let e = redis::cmd("FLOWARCHIVE.FLOW")
        .arg(&b"\xff\xfe"[..])
        .query::<redis::Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("UTF-8"), "{e}");
    let pong: String = cmd(&mut c, &["PING"]).unwrap();
    assert_eq!(pong, "PONG");
}

#[test]
fn awkward_ids_get_safe_object_keys() {
    let (s3, srv) = bed();
    let mut c = srv.conn();
    let long = "k".repeat(1024);
    let ids = [
        "a/b",
        "..",
        "with space",
        "new\nline",
        "ünïcødé-✓",
        "abc:step-id:token",
        long.as_str(),
    ];
    for id in ids {
        write_flow(&mut c, &FlowSpec::done(id));
        let r = archive(&mut c, id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
        let location = text(&r["location"]);
        let key = location.strip_prefix(&s3.location("")).unwrap();
        assert!(
            key.starts_with("flows/") && key.ends_with(".jsonl.gz") && key.len() <= 1024,
            "{key}"
        );
        let name = key["flows/".len()..].trim_start_matches("_sha256/");
        assert!(!name.contains('/') && !key.contains(".."), "{key}");
        assert_eq!(key.contains("_sha256/"), id.len() > 900, "{key}");
        let lines = object_lines(&s3, key);
        let header: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(header["flow_id"], id);
        let indexed: String = redis::cmd("HGET")
            .arg("archived:flows")
            .arg(id)
            .query(&mut c)
            .unwrap();
        assert_eq!(indexed, location);
    }
    // Every object sits at a safe key. (Under a loaded S3 an attempt may also leave an identical
    // object at a later generation key, and SeaweedFS may list folder markers: count, not equality.)
    let objects: Vec<String> = s3
        .list()
        .into_iter()
        .filter(|k| k.ends_with(".jsonl.gz"))
        .collect();
    assert!(objects.len() >= ids.len(), "{objects:?}");
    assert!(
        objects
            .iter()
            .all(|k| k.starts_with("flows/") && !k.contains("..")),
        "{objects:?}"
    );
}

#[test]
fn archiving_is_idempotent_and_never_overwrites() {
    let (s3, srv) = bed();
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("once"));
    let first = archive(&mut c, "once").unwrap();
    let again = archive(&mut c, "once").unwrap();
    assert_eq!(again["location"], first["location"]);
    assert_eq!(int(&again["already_archived"]), 1);
    let stored = s3.get("flows/once.jsonl.gz").unwrap();
    // The engine starts the id again once it has forgotten the flow: a new incarnation, archived
    // beside the first (whose object is never replaced), the index naming the newest.
    let second = FlowSpec {
        last_ms: LONG_AGO + 60_000,
        events: 7,
        ..FlowSpec::done("once")
    };
    write_flow(&mut c, &second);
    assert_eq!(
        get(&mut c, "once").unwrap(),
        Some(state_json(&second)),
        "the live incarnation is the newest"
    );
    let r = archive(&mut c, "once").unwrap();
    assert_eq!(text(&r["location"]), s3.location("flows/once.g1.jsonl.gz"));
    assert_eq!(s3.get("flows/once.jsonl.gz").unwrap(), stored);
    let header: Value = serde_json::from_str(
        gunzip(&s3.get("flows/once.g1.jsonl.gz").unwrap())
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["previous"], text(&first["location"]));
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:once:events"]).unwrap(),
        0
    );
    assert_eq!(
        get(&mut c, "once").unwrap(),
        Some(archived_state(&state_json(&second)))
    );
    let first_state = archived_state(&state_json(&FlowSpec::done("once")));
    let previous: Option<String> =
        cmd(&mut c, &["FLOWARCHIVE.GET", "once", "PREVIOUS", "1"]).unwrap();
    assert_eq!(previous, Some(first_state));
    let (_, events): (String, Vec<String>) = cmd(
        &mut c,
        &["FLOWARCHIVE.GET", "once", "EVENTS", "PREVIOUS", "1"],
    )
    .unwrap();
    assert_eq!(events, events_of(&FlowSpec::done("once")));
    let none: Option<String> = cmd(&mut c, &["FLOWARCHIVE.GET", "once", "PREVIOUS", "2"]).unwrap();
    assert_eq!(none, None);
    for bad in ["0", "17", "x"] {
        let e = err_text(cmd::<Option<String>>(
            &mut c,
            &["FLOWARCHIVE.GET", "once", "PREVIOUS", bad],
        ));
        assert!(e.contains("PREVIOUS needs an integer from 1 to 16"), "{e}");
    }
}

#[test]
fn refused_in_multi_scripts_and_on_replicas() {
    let (s3, srv) = bed();
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("m"));
    cmd::<()>(&mut c, &["MULTI"]).unwrap();
    let queued: String = cmd(&mut c, &["FLOWARCHIVE.FLOW", "m"]).unwrap();
    assert_eq!(queued, "QUEUED");
    let exec = cmd::<redis::Value>(&mut c, &["EXEC"]);
    assert!(
        format!("{exec:?}").contains("cannot run inside MULTI"),
        "{exec:?}"
    );
    let e = redis::cmd("EVAL")
        .arg("return redis.call('FLOWARCHIVE.FLOW', 'm')")
        .arg(0)
        .query::<redis::Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("script"), "{e}");
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:m:events"]).unwrap(),
        1
    );

    let replica = Server::start(ServerOpts::new(&s3));
    let mut r = replica.conn();
    replicate(&mut r, srv.port, "argyll:flow:m:events");
    let msg = err_text(archive(&mut r, "m"));
    assert!(msg.contains("READONLY") || msg.contains("replica"), "{msg}");
}

#[test]
fn replica_and_aof_receive_the_commit_as_one_transaction() {
    commit_is_one_transaction(Flavor::Valkey9);
}

#[test]
fn replica_and_aof_receive_the_commit_as_one_transaction_on_valkey_8_0() {
    commit_is_one_transaction(Flavor::Valkey8);
}

#[test]
fn replica_and_aof_receive_the_commit_as_one_transaction_on_redis_7_0() {
    commit_is_one_transaction(Flavor::Redis7);
}

fn commit_is_one_transaction(flavor: Flavor) {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    opts.extra = vec![
        "--appendonly".into(),
        "yes".into(),
        "--appendfsync".into(),
        "always".into(),
    ];
    let master = Server::start(opts);
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    let replica = Server::start(opts);
    let mut m = master.conn();
    let mut r = replica.conn();
    write_flow(&mut m, &FlowSpec::done("rep"));
    write_flow(&mut m, &FlowSpec::done("stay"));
    replicate(&mut r, master.port, "argyll:flow:stay:events");
    archive(&mut m, "rep").unwrap();
    wait_for(
        "replica applies the commit",
        Duration::from_secs(10),
        || cmd::<i64>(&mut r, &["HEXISTS", "archived:flows", "rep"]).unwrap_or(0) == 1,
    );
    // Everything the primary wrote is applied on the replica, not only the commits.
    let acked: i64 = cmd(&mut m, &["WAIT", "1", "10000"]).unwrap();
    assert_eq!(acked, 1, "the replica acknowledges the primary's writes");
    assert_same(
        &dump_all(&mut m),
        &dump_all(&mut r),
        "replica ends with the master's keys",
    );

    // The AOF holds the commit's writes inside one MULTI/EXEC.
    let mut aof = Vec::new();
    for entry in walk(&master.dir) {
        if entry.to_string_lossy().contains(".aof")
            && !entry.to_string_lossy().ends_with(".manifest")
        {
            aof.extend(std::fs::read(&entry).unwrap());
        }
    }
    let aof = String::from_utf8_lossy(&aof).to_string();
    let hset = aof.find("archived:flows").expect("index write in the AOF");
    let multi = aof[..hset].rfind("MULTI").expect("MULTI before the commit");
    let exec = hset + aof[hset..].find("EXEC").expect("EXEC after the commit");
    let tx = &aof[multi..exec];
    for part in ["ZREM", "HDEL", "SREM", "UNLINK", "argyll:flow:rep:events"] {
        assert!(
            tx.contains(part),
            "{part} missing from the transaction:\n{tx}"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_client_in_db_3_archives_db_3_only() {
    let (_s3, srv) = bed();
    let mut c0 = srv.conn();
    write_flow(&mut c0, &FlowSpec::done("same"));
    let mut c3 = srv.conn();
    cmd::<()>(&mut c3, &["SELECT", "3"]).unwrap();
    write_flow(&mut c3, &FlowSpec::done("same"));
    write_flow(
        &mut c3,
        &FlowSpec {
            events: 3000,
            ..FlowSpec::done("long3")
        },
    );
    let db0 = dump_all(&mut c0);
    archive(&mut c3, "same").unwrap();
    archive(&mut c3, "long3").unwrap();
    assert_eq!(
        cmd::<i64>(&mut c3, &["EXISTS", "argyll:flow:same:events"]).unwrap(),
        0
    );
    assert_eq!(
        cmd::<i64>(&mut c3, &["HEXISTS", "archived:flows", "same"]).unwrap(),
        1
    );
    assert_eq!(
        cmd::<i64>(&mut c3, &["EXISTS", "argyll:flow:long3:events"]).unwrap(),
        0
    );
    assert_same(&db0, &dump_all(&mut c0), "DB 0 untouched");
}

#[test]
fn resp3_clients_get_a_map() {
    let (_s3, srv) = bed();
    let mut c = srv.conn_resp3();
    write_flow(&mut c, &FlowSpec::done("r3"));
    let v: redis::Value = redis::cmd("FLOWARCHIVE.FLOW")
        .arg("r3")
        .query(&mut c)
        .unwrap();
    assert!(matches!(v, redis::Value::Map(_)), "{v:?}");
    assert_eq!(int(&reply_map(v)["events"]), 5);
}

/// A label hash large enough for the server's hashtable encoding (read by a scan of several calls) is
/// archived with every label: the trailer holds each one, and the flow leaves every label set.
#[test]
fn a_flow_with_hundreds_of_labels_is_archived_with_every_label() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &[]);
    let mut c = srv.conn();
    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "hash-max-listpack-entries", "16"],
    )
    .unwrap();
    let owned: Vec<(String, String)> = (0..300)
        .map(|i| (format!("label{i:03}"), format!("v{i}")))
        .collect();
    let labels: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    write_flow(
        &mut c,
        &FlowSpec {
            labels: &labels,
            ..FlowSpec::done("many-labels")
        },
    );
    let encoding: String = cmd(
        &mut c,
        &["OBJECT", "ENCODING", "argyll:flow:many-labels:idx:labels"],
    )
    .unwrap();
    assert_eq!(encoding, "hashtable");
    archive(&mut c, "many-labels").unwrap();
    let left: Vec<String> = cmd(&mut c, &["KEYS", "argyll:*"]).unwrap();
    assert!(left.is_empty(), "{left:?}");
    let text = gunzip(&s3.get("flows/many-labels.jsonl.gz").unwrap());
    let trailer: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let stored: Vec<(String, String)> = trailer["labels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    assert_eq!(stored, owned);
}

/// A long event log is read in chunks that stop at the step budget (`step-budget-us`), not in fixed
/// chunks of 1024 events, so reading it holds the server no longer than any other step; every event
/// is archived.
#[test]
fn a_long_log_is_read_in_steps_that_keep_to_the_budget() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, "flowarchive.step-budget-us", "50").unwrap();
    write_flow(
        &mut c,
        &FlowSpec {
            events: 3000,
            ..FlowSpec::done("long")
        },
    );
    let log: Vec<String> = cmd(&mut c, &["LRANGE", "argyll:flow:long:events", "0", "-1"]).unwrap();
    let (archived, steps) = stepped(&mut c, |c| archive(c, "long"));
    archived.unwrap();
    // Chunks of 1024 would be 3 reads and a commit; at 50 µs (and at least 64 events) a chunk, dozens.
    assert!(steps >= 10, "{steps} steps");
    assert_eq!(get_events(&mut c, "long").unwrap().1, log);
}

/// Steps that many workers hand over at once run in turns of the step budget, and the event loop
/// serves its clients between turns: the longest run of steps it holds back to back (INFO
/// `main_thread_max_turn_us`) stays within the budget and one step. Sixteen uploads of flows of 1,000
/// events, each commit step longer than a 50 µs budget, are held at the store and let go at once, so
/// their sixteen commit steps are handed over together; every event is archived. With every step
/// waiting run in one turn, as the server runs every module timer that is due, one turn held several.
#[test]
fn steps_handed_over_together_run_in_turns_of_the_budget() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    config_set(&mut c, "flowarchive.step-budget-us", "50").unwrap();
    config_set(&mut c, "flowarchive.concurrency", "16").unwrap();
    let ids: Vec<String> = (0..16).map(|i| format!("heavy-{i}")).collect();
    let mut logs = Vec::new();
    for id in &ids {
        write_flow(
            &mut c,
            &FlowSpec {
                events: 1000,
                ..FlowSpec::done(id)
            },
        );
        let key = format!("argyll:flow:{id}:events");
        logs.push(cmd::<Vec<String>>(&mut c, &["LRANGE", &key, "0", "-1"]).unwrap());
    }
    proxy.hold("PUT");
    let mut sweeper = srv.conn();
    let sweeping = std::thread::spawn(move || sweep(&mut sweeper, &[]));
    wait_for("every upload held", Duration::from_secs(120), || {
        proxy.gated() == ids.len()
    });
    proxy.release();
    let swept = sweeping.join().unwrap().unwrap();
    assert_eq!(int(&swept["archived"]), 16, "{swept:?}");
    let turn = info_field(&mut c, "main_thread_max_turn_us");
    let step = info_field(&mut c, "main_thread_max_us");
    assert!(turn >= step, "a turn of {turn} µs, a step of {step} µs");
    // The steps begun within the budget and the one that passed it, with 200 µs for taking each.
    assert!(
        turn <= 50 + step + 200,
        "a turn of {turn} µs, where the longest step took {step} µs"
    );
    for (id, log) in ids.iter().zip(&logs) {
        assert_eq!(&get_events(&mut c, id).unwrap().1, log, "{id}");
    }
}
