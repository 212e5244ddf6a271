//! FLOWARCHIVE.GET: live reads, verified archive fallback, cache and shared fetches.

mod common;

use std::time::{Duration, Instant};

use common::checker;
use common::proxy::{Fault, Proxy, Rule};
use common::resp;
use common::*;

/// A server behind a proxy, with flow `id` written and archived.
fn archived_bed(id: &str, extra: &[&str]) -> (S3, Proxy, Server, String, Vec<String>) {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), extra);
    let mut c = srv.conn();
    let spec = FlowSpec::done(id);
    write_flow(&mut c, &spec);
    let state = state_json(&spec);
    let events: Vec<String> = cmd(
        &mut c,
        &["LRANGE", &format!("argyll:flow:{id}:events"), "0", "-1"],
    )
    .unwrap();
    archive(&mut c, id).unwrap();
    (s3, proxy, srv, state, events)
}

#[test]
fn live_archived_and_absent_flows() {
    let (_s3, _proxy, srv, state, events) = archived_bed("gone", &[]);
    let mut c = srv.conn();
    let here = FlowSpec {
        status: "active",
        ..FlowSpec::done("here")
    };
    write_flow(&mut c, &here);
    let live_events: Vec<String> =
        cmd(&mut c, &["LRANGE", "argyll:flow:here:events", "0", "-1"]).unwrap();

    assert_eq!(
        get(&mut c, "here").unwrap().unwrap(),
        state_json(&here),
        "live: the engine's state of its events"
    );
    assert_eq!(
        get_events(&mut c, "here").unwrap(),
        (state_json(&here), live_events)
    );

    let expected = archived_state(&state);
    assert_eq!(get(&mut c, "gone").unwrap().unwrap(), expected);
    let (archived, archived_events) = get_events(&mut c, "gone").unwrap();
    assert_eq!(archived, expected);
    assert_eq!(archived_events, events);

    assert_eq!(get(&mut c, "never-was").unwrap(), None);
    assert_eq!(info_field(&mut c, "get_live"), 2);
    assert_eq!(info_field(&mut c, "get_not_found"), 1);
    let e = redis::cmd("FLOWARCHIVE.GET")
        .arg("x")
        .arg("ALL")
        .query::<redis::Value>(&mut c)
        .unwrap_err();
    assert!(e.to_string().contains("syntax error"), "{e}");
}

#[test]
fn repeat_reads_come_from_the_cache() {
    let (_s3, proxy, srv, _, events) = archived_bed("hot", &[]);
    let mut c = srv.conn();
    let first = get(&mut c, "hot").unwrap().unwrap();
    let gets_before = proxy
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET"))
        .count();
    assert_eq!(get(&mut c, "hot").unwrap().unwrap(), first);
    assert_eq!(get_events(&mut c, "hot").unwrap().1, events);
    assert_eq!(info_field(&mut c, "get_archive_fetches"), 1);
    assert_eq!(info_field(&mut c, "get_cache_hits"), 2);
    assert_eq!(
        proxy
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET"))
            .count(),
        gets_before,
        "no S3 request"
    );
    assert_eq!(info_field(&mut c, "get_cache_flows"), 1);

    // A budget smaller than one flow: still correct answers, each one fetched.
    cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.cache-bytes", "100"]).unwrap();
    assert_eq!(
        info_field(&mut c, "get_cache_flows"),
        0,
        "shrinking the budget evicts at once"
    );
    assert_eq!(get(&mut c, "hot").unwrap().unwrap(), first);
    assert_eq!(get(&mut c, "hot").unwrap().unwrap(), first);
    assert_eq!(info_field(&mut c, "get_archive_fetches"), 3);
    assert_eq!(info_field(&mut c, "get_cache_flows"), 0);

    // Inside MULTI a cached flow answers; an uncached one cannot block.
    cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.cache-bytes", "1mb"]).unwrap();
    get(&mut c, "hot").unwrap();
    let tx: (Option<String>,) = redis::pipe()
        .atomic()
        .cmd("FLOWARCHIVE.GET")
        .arg("hot")
        .query(&mut c)
        .unwrap();
    assert_eq!(tx.0.unwrap(), first);
    cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.cache-bytes", "0"]).unwrap();
    cmd::<()>(&mut c, &["MULTI"]).unwrap();
    cmd::<String>(&mut c, &["FLOWARCHIVE.GET", "hot"]).unwrap();
    let exec = cmd::<redis::Value>(&mut c, &["EXEC"]);
    assert!(
        format!("{exec:?}").contains("cannot fetch it inside MULTI"),
        "{exec:?}"
    );
}

#[test]
fn fifty_concurrent_reads_share_one_fetch() {
    let (_s3, proxy, srv, state, _) = archived_bed("popular", &[]);
    // The fetch is held until all fifty reads wait on it.
    proxy.hold("GET");
    let before = proxy.requests().len();
    let port = srv.port;
    let handles: Vec<_> = (0..50)
        .map(|_| {
            std::thread::spawn(move || {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                let mut c = client.get_connection().unwrap();
                get(&mut c, "popular").unwrap().unwrap()
            })
        })
        .collect();
    let mut c = srv.conn();
    wait_for(
        "fifty reads waiting on the held fetch",
        Duration::from_secs(60),
        || proxy.gated() == 1 && blocked_clients(&mut c) == 50,
    );
    proxy.release();
    let expected = archived_state(&state);
    for h in handles {
        assert_eq!(h.join().unwrap(), expected);
    }
    assert_eq!(info_field(&mut c, "get_archive_fetches"), 1);
    assert_eq!(
        proxy.requests()[before..]
            .iter()
            .filter(|r| r.starts_with("GET"))
            .count(),
        1
    );
}

fn assert_read_fails(c: &mut redis::Connection, id: &str, expect: &str) {
    let e = get(c, id).unwrap_err().to_string();
    assert!(
        e.contains(&format!("flow \"{id}\" archived at s3://")) && e.contains(expect),
        "{e}"
    );
    assert_eq!(info_field(c, "get_cache_flows"), 0, "nothing cached");
}

#[test]
fn damaged_objects_are_clear_errors_and_never_cached() {
    let (s3, proxy, srv, _, _) = archived_bed("victim", &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("other"));
    archive(&mut c, "other").unwrap();
    let good = s3.get("flows/victim.jsonl.gz").unwrap();

    proxy.set(vec![Rule {
        method: "GET",
        path: String::new(),
        fault: Fault::Truncate,
    }]);
    assert_read_fails(&mut c, "victim", "cut short");
    proxy.clear();

    s3.put("flows/victim.jsonl.gz", b"some other bytes");
    assert_read_fails(&mut c, "victim", "no flowarchive checksum");

    s3.put_as_archive("flows/victim.jsonl.gz", b"some other bytes");
    assert_read_fails(&mut c, "victim", "corrupt");

    let text = gunzip(&good).replacen("\"version\":2", "\"version\":7", 1);
    s3.put_as_archive("flows/victim.jsonl.gz", &gzip(&text));
    assert_read_fails(&mut c, "victim", "unknown format");

    let text = gunzip(&good).replace("step_completed", "step_completeD");
    s3.put_as_archive("flows/victim.jsonl.gz", &gzip(&text));
    assert_read_fails(&mut c, "victim", "fails its checksum");

    s3.delete("flows/victim.jsonl.gz");
    assert_read_fails(&mut c, "victim", "is missing (HTTP 404)");

    // Another flow's object under this flow's key (the index entry itself is right).
    s3.put_as_archive(
        "flows/victim.jsonl.gz",
        &s3.get("flows/other.jsonl.gz").unwrap(),
    );
    assert_read_fails(&mut c, "victim", "belongs to another flow (\"other\")");

    s3.put_as_archive("flows/victim.jsonl.gz", &good);
    cmd::<()>(
        &mut c,
        &[
            "HSET",
            "archived:flows",
            "victim",
            &s3.location("flows/victim.jsonl.gz"),
        ],
    )
    .unwrap();
    assert!(
        get(&mut c, "victim").unwrap().is_some(),
        "restored object reads again"
    );
    for kind in [
        "s3_truncated",
        "checksum",
        "corrupt",
        "unknown_version",
        "s3_missing",
        "other_flow",
    ] {
        assert!(
            info_field(&mut c, &format!("get_fetch_errors_{kind}")) >= 1,
            "{kind}"
        );
    }
}

#[test]
fn s3_down_fails_archived_reads_fast_and_live_reads_work() {
    let (_s3, proxy, srv, _, _) = archived_bed("cold", &["request-timeout-ms", "500"]);
    let mut c = srv.conn();
    write_flow(
        &mut c,
        &FlowSpec {
            status: "active",
            ..FlowSpec::done("warm")
        },
    );
    proxy.all(Fault::Hang);
    let port = srv.port;
    let started = Instant::now();
    let slow = std::thread::spawn(move || {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        let mut c = client.get_connection().unwrap();
        get(&mut c, "cold").unwrap_err().to_string()
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        get(&mut c, "warm").unwrap().is_some(),
        "live read while S3 hangs"
    );
    let e = slow.join().unwrap();
    assert!(e.contains("timed out"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(info_field(&mut c, "get_fetch_errors_s3_timeout"), 1);
}

#[test]
fn replicas_serve_archived_reads_in_resp2_and_resp3() {
    let (s3, _proxy, master, state, events) = archived_bed("far", &[]);
    let replica = Server::start(ServerOpts::new(&s3));
    let mut r = replica.conn();
    cmd::<()>(
        &mut r,
        &["REPLICAOF", "127.0.0.1", &master.port.to_string()],
    )
    .unwrap();
    wait_for("replica sync", Duration::from_secs(20), || {
        cmd::<i64>(&mut r, &["HEXISTS", "archived:flows", "far"]).unwrap_or(0) == 1
    });
    let expected = archived_state(&state);
    assert_eq!(get(&mut r, "far").unwrap().unwrap(), expected);
    let mut r3 = replica.conn_resp3();
    let v: redis::Value = redis::cmd("FLOWARCHIVE.GET")
        .arg("far")
        .arg("EVENTS")
        .query(&mut r3)
        .unwrap();
    let (state, evs): (String, Vec<String>) = redis::from_redis_value(&v).unwrap();
    assert_eq!(state, expected);
    assert_eq!(evs, events);
    let nil: redis::Value = redis::cmd("FLOWARCHIVE.GET")
        .arg("nope")
        .query(&mut r3)
        .unwrap();
    assert_eq!(nil, redis::Value::Nil);
}

/// A live read is capped like an archived one (`read-max-bytes`), a short log (read in the command)
/// as well as a long one (read in steps by a worker), with its events or not (the state is folded from
/// them all): refused with a clear error and the flow left as it is; under the cap every event is
/// answered.
#[test]
fn a_live_read_over_the_cap_is_refused_short_or_long() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let ids = [("short", 600), ("long", 1500)];
    for (id, events) in ids {
        write_flow(
            &mut c,
            &FlowSpec {
                events,
                status: "active",
                ..FlowSpec::done(id)
            },
        );
    }
    let logs: Vec<Vec<String>> = ids
        .iter()
        .map(|(id, _)| {
            let key = format!("argyll:flow:{id}:events");
            cmd(&mut c, &["LRANGE", &key, "0", "-1"]).unwrap()
        })
        .collect();
    let before = dump_all(&mut c);
    config_set(&mut c, "flowarchive.read-max-bytes", "64kb").unwrap();
    for ((id, _), log) in ids.iter().zip(&logs) {
        assert!(log.iter().map(String::len).sum::<usize>() > 64 << 10);
        let e = err_text(get_events(&mut c, id));
        assert!(
            e.contains(&format!("flow \"{id}\" cannot be read"))
                && e.contains("larger than read-max-bytes (65536 bytes)"),
            "{e}"
        );
        let e = err_text(get(&mut c, id));
        assert!(e.contains("larger than read-max-bytes"), "{e}");
    }
    assert_same(&before, &dump_all(&mut c), "nothing changed");
    config_set(&mut c, "flowarchive.read-max-bytes", "1mb").unwrap();
    for ((id, _), log) in ids.iter().zip(&logs) {
        assert_eq!(&get_events(&mut c, id).unwrap().1, log);
    }
}

/// Under `state snapshot` a live read is capped too (`read-max-bytes`): a stored snapshot over the cap
/// is refused with or without its events, copying nothing into the reply, and the flow is left as it
/// is; under the cap it is answered as stored.
#[test]
fn a_live_read_of_a_snapshot_over_the_cap_is_refused() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["state", "snapshot"]);
    let mut c = srv.conn();
    let spec = FlowSpec {
        snapshot: Snapshot::Current,
        ..FlowSpec::done("big")
    };
    write_flow(&mut c, &spec);
    let big = format!(
        "{{\"status\":\"done\",\"pad\":\"{}\"}}",
        "x".repeat(100 << 10)
    );
    cmd::<()>(&mut c, &["SET", "argyll:flow:big:snapshot:val", &big]).unwrap();
    let before = dump_all(&mut c);
    config_set(&mut c, "flowarchive.read-max-bytes", "64kb").unwrap();
    let e = err_text(get(&mut c, "big"));
    assert!(
        e.contains("flow \"big\" cannot be read")
            && e.contains("larger than read-max-bytes (65536 bytes)"),
        "{e}"
    );
    let e = err_text(get_events(&mut c, "big"));
    assert!(
        e.contains("larger than read-max-bytes (65536 bytes)"),
        "{e}"
    );
    assert_same(&before, &dump_all(&mut c), "nothing changed");
    config_set(&mut c, "flowarchive.read-max-bytes", "1mb").unwrap();
    assert_eq!(get(&mut c, "big").unwrap().as_deref(), Some(big.as_str()));
}

/// Under `state snapshot`, inside MULTI or a script (where the client cannot wait for a read worker):
/// a snapshot alone is answered, and with its events when one step reads both; a snapshot over 1 MiB
/// with its events is read in steps, so it is refused there, with an error that says the snapshot is
/// part of what is too large (not only the events), and nothing is left half answered.
#[test]
fn a_large_snapshot_with_its_events_is_refused_inside_multi_naming_the_snapshot() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["state", "snapshot"]);
    let mut c = srv.conn();
    for id in ["big", "small"] {
        let spec = FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        write_flow(&mut c, &spec);
    }
    let big = format!(
        "{{\"status\":\"done\",\"pad\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    cmd::<()>(&mut c, &["SET", "argyll:flow:big:snapshot:val", &big]).unwrap();
    let eval = |c: &mut redis::Connection, id: &str, events: bool| {
        let script = match events {
            true => "return redis.call('FLOWARCHIVE.GET', ARGV[1], 'EVENTS')",
            false => "return redis.call('FLOWARCHIVE.GET', ARGV[1])",
        };
        redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .arg(id)
            .query::<redis::Value>(c)
    };
    let e = err_text(eval(&mut c, "big", true));
    assert!(
        e.contains("flow \"big\"") && e.contains("snapshot") && e.contains("MULTI or a script"),
        "{e}"
    );
    assert!(eval(&mut c, "big", false).is_ok());
    assert!(eval(&mut c, "small", true).is_ok());
    cmd::<()>(&mut c, &["MULTI"]).unwrap();
    cmd::<String>(&mut c, &["FLOWARCHIVE.GET", "big", "EVENTS"]).unwrap();
    cmd::<String>(&mut c, &["PING"]).unwrap();
    let exec = format!("{:?}", cmd::<redis::Value>(&mut c, &["EXEC"]));
    assert!(
        exec.contains("snapshot") && exec.contains("MULTI"),
        "{exec}"
    );
    assert_eq!(get(&mut c, "big").unwrap().as_deref(), Some(big.as_str()));
}

/// Most of the engine's flows have no snapshot, and one it has may be stale (it folded the first 3 of
/// 8 events while the flow still ran): GET folds the events as the engine loads a flow, live and
/// archived alike, and never answers a stale snapshot as the flow's final state.
#[test]
fn a_stale_or_missing_snapshot_answers_the_engines_state() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let kinds = [
        ("no-snapshot", Snapshot::None),
        ("stale", Snapshot::Stale(3)),
        ("current", Snapshot::Current),
    ];
    let specs: Vec<FlowSpec> = kinds
        .iter()
        .map(|(id, snapshot)| FlowSpec {
            events: 8,
            snapshot: *snapshot,
            ..FlowSpec::done(id)
        })
        .collect();
    for spec in &specs {
        write_flow(&mut c, spec);
        let state = get(&mut c, spec.id).unwrap().unwrap();
        assert_eq!(state, state_json(spec), "{}", spec.id);
        assert!(state.contains(r#""status":"completed""#), "{state}");
    }
    let stale: String = cmd(&mut c, &["GET", "argyll:flow:stale:snapshot:val"]).unwrap();
    assert!(stale.contains(r#""status":"active""#), "{stale}");
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 3, "{summary:?}");
    for spec in &specs {
        let state = get(&mut c, spec.id).unwrap().unwrap();
        assert_eq!(state, archived_state(&state_json(spec)), "{}", spec.id);
        let (_, events) = get_events(&mut c, spec.id).unwrap();
        assert_eq!(events, events_of(spec));
    }
}

/// `flowarchive.state` as a module argument, with the server's other arguments for `s3`.
fn layout_server(s3: &S3, state: &str) -> Server {
    let mut opts = ServerOpts::new(s3);
    opts.module_args.extend(["state", state].map(String::from));
    Server::start(opts)
}

fn log_bytes(c: &mut redis::Connection, id: &str) -> Vec<Vec<u8>> {
    cmd(
        c,
        &["LRANGE", &format!("argyll:flow:{id}:events"), "0", "-1"],
    )
    .unwrap()
}

/// `GET … EVENTS` is written by the module from its own buffers, by whichever thread holds them: a
/// short live log in the command, a long one (over 1024 events) by a read worker on the blocked
/// client's context, an archived flow by the fetch worker or, cached, in the command. Whichever writes
/// it, a RESP2 and a RESP3 client get the same bytes: an array of the state and an array of every
/// event as a bulk string, event for event as LRANGE showed them before archiving; under a folding
/// layout and one served from its snapshot. A nil written by the fetch worker (no incarnation before
/// the archived one) is RESP3's null on a RESP3 connection.
#[test]
fn get_events_is_the_same_bulk_strings_in_resp2_and_resp3() {
    for layout in ["fold", "snapshot"] {
        let s3 = S3::new_bucket();
        let srv = layout_server(&s3, layout);
        let mut c = srv.conn();
        config_set(&mut c, "flowarchive.cache-bytes", "0").unwrap();
        let (mut raw2, mut raw3) = (
            resp::RawConn::open(srv.port, false),
            resp::RawConn::open(srv.port, true),
        );
        let ids = [("short", 7usize), ("long", 1500)];
        let mut logs = Vec::new();
        for (id, events) in ids {
            write_flow(
                &mut c,
                &FlowSpec {
                    events,
                    snapshot: Snapshot::Current,
                    ..FlowSpec::done(id)
                },
            );
            let log = log_bytes(&mut c, id);
            let (state, events) = get_events(&mut c, id).unwrap();
            assert_eq!(events.len(), log.len(), "{layout} {id}");
            let want = resp::state_and_events(state.as_bytes(), &log);
            let ask = [b"FLOWARCHIVE.GET".as_slice(), id.as_bytes(), b"EVENTS"];
            assert!(raw2.call(&ask) == want, "{layout} {id} live, RESP2");
            assert!(raw3.call(&ask) == want, "{layout} {id} live, RESP3");
            logs.push(log);
        }
        for ((id, _), log) in ids.iter().zip(&logs) {
            archive(&mut c, id).unwrap();
            let state = get(&mut c, id).unwrap().expect("archived");
            let want = resp::state_and_events(state.as_bytes(), log);
            let ask = [b"FLOWARCHIVE.GET".as_slice(), id.as_bytes(), b"EVENTS"];
            let fetches = info_field(&mut c, "get_archive_fetches");
            assert!(raw2.call(&ask) == want, "{layout} {id} fetched, RESP2");
            assert!(raw3.call(&ask) == want, "{layout} {id} fetched, RESP3");
            assert_eq!(info_field(&mut c, "get_archive_fetches"), fetches + 2);
            let previous = [
                b"FLOWARCHIVE.GET".as_slice(),
                id.as_bytes(),
                b"PREVIOUS",
                b"1",
            ];
            assert_eq!(raw2.call(&previous), b"$-1\r\n", "{layout} {id}");
            assert_eq!(raw3.call(&previous), b"_\r\n", "{layout} {id}");
            assert_eq!(info_field(&mut c, "get_archive_fetches"), fetches + 4);

            config_set(&mut c, "flowarchive.cache-bytes", "64mb").unwrap();
            get(&mut c, id).unwrap();
            let hits = info_field(&mut c, "get_cache_hits");
            assert!(raw2.call(&ask) == want, "{layout} {id} cached, RESP2");
            assert!(raw3.call(&ask) == want, "{layout} {id} cached, RESP3");
            assert_eq!(info_field(&mut c, "get_cache_hits"), hits + 2);
            config_set(&mut c, "flowarchive.cache-bytes", "0").unwrap();
        }
        let unknown = [b"FLOWARCHIVE.GET".as_slice(), b"never-was", b"EVENTS"];
        assert_eq!(raw2.call(&unknown), b"$-1\r\n");
        assert_eq!(raw3.call(&unknown), b"_\r\n");
        checker::assert_alive(&mut { srv }, layout);
    }
}

/// A layout served from its snapshot answers a live log as stored, without reading its events: an
/// event may hold any bytes (CR and LF, RESP's own markers, NUL, bytes that are not UTF-8), be empty,
/// or be larger than a log block. `GET … EVENTS` answers each exactly, a short log (written in the
/// command) and a long one (by a read worker), to RESP2 and RESP3 clients; a flow with a snapshot and
/// no log (an empty list is no key) answers its snapshot and no events.
#[test]
fn live_events_are_answered_byte_for_byte() {
    let s3 = S3::new_bucket();
    let srv = layout_server(&s3, "snapshot");
    let mut c = srv.conn();
    let mut raw3 = resp::RawConn::open(srv.port, true);
    let odd: Vec<Vec<u8>> = vec![
        b"{\"a\":\"x\r\ny\"}".to_vec(),
        b"\r\n*1\r\n$4\r\nPING\r\n".to_vec(),
        b"-ERR not an error\r\n".to_vec(),
        b"$-1\r\n".to_vec(),
        b"_\r\n".to_vec(),
        Vec::new(),
        b"\0".to_vec(),
        b"a\0b\xff\xfe\xc3(\r".to_vec(),
        vec![b'\n'; 70_000],
    ];
    let snapshot = b"{\"id\":\"s\",\r\n\"status\":\"completed\"}\0".to_vec();
    for (id, fill) in [("short", 10usize), ("long", 1100)] {
        let key = format!("argyll:flow:{id}:events");
        let mut log = odd.clone();
        log.extend((0..fill).map(|i| format!("{{\"n\":{i}}}\r\n").into_bytes()));
        log.extend(odd.iter().rev().cloned());
        let mut push = redis::cmd("RPUSH");
        push.arg(&key).arg(&log);
        push.query::<()>(&mut c).unwrap();
        let mut set = redis::cmd("SET");
        set.arg(snapshot_key(id)).arg(&snapshot);
        set.query::<()>(&mut c).unwrap();
        assert_eq!(log_bytes(&mut c, id), log, "stored as written");
        let answer: (Vec<u8>, Vec<Vec<u8>>) = redis::cmd("FLOWARCHIVE.GET")
            .arg(id)
            .arg("EVENTS")
            .query(&mut c)
            .unwrap();
        assert!(answer == (snapshot.clone(), log.clone()), "{id}, RESP2");
        let want = resp::state_and_events(&snapshot, &log);
        let ask = [b"FLOWARCHIVE.GET".as_slice(), id.as_bytes(), b"EVENTS"];
        assert!(raw3.call(&ask) == want, "{id}, RESP3");
    }
    let mut set = redis::cmd("SET");
    set.arg("argyll:flow:bare:snapshot:val").arg(&snapshot);
    set.query::<()>(&mut c).unwrap();
    let answer: (Vec<u8>, Vec<Vec<u8>>) = redis::cmd("FLOWARCHIVE.GET")
        .arg("bare")
        .arg("EVENTS")
        .query(&mut c)
        .unwrap();
    assert_eq!(answer, (snapshot.clone(), Vec::new()));
    let ask = [b"FLOWARCHIVE.GET".as_slice(), b"bare", b"EVENTS"];
    let none: [&[u8]; 0] = [];
    assert_eq!(raw3.call(&ask), resp::state_and_events(&snapshot, &none));
    assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
    checker::assert_alive(&mut { srv }, "after the odd events");
}
