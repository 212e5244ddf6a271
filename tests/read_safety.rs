//! Safety of FLOWARCHIVE.GET's archive path: objects that parse whatever the flow holds, one
//! object per DB, bounded memory and threads, and reads only where the module itself writes.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::checker;
use common::proxy::Proxy;
use common::resp;
use common::*;
use serde_json::{json, Value};

/// A format-1 object written independently of the module's encoder (docs/FORMAT.md is the contract).
fn object(id: &str, db: i32, events: &[String], snapshot: &str) -> Vec<u8> {
    let trailer = format!(
        "{{\"snapshot\":{snapshot},\"seq\":null,\"labels\":{{}},\"status\":\"completed\"}}"
    );
    crafted_object(id, db, 1, events, &trailer)
}

/// A header followed by `zeros` zero bytes: a few hundred KB of gzip per hundreds of MB of content.
fn bomb(id: &str, zeros: usize, raw_bytes: Option<usize>) -> Vec<u8> {
    let mut header = json!({
        "format": "flowarchive", "version": 1, "flow_id": id, "events": 0, "sha256": "0".repeat(64),
    });
    if let Some(raw) = raw_bytes {
        header["raw_bytes"] = raw.into();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("{header}\n").as_bytes()).unwrap();
    let chunk = vec![0u8; 1 << 20];
    for _ in 0..zeros >> 20 {
        gz.write_all(&chunk).unwrap();
    }
    gz.finish().unwrap()
}

fn archived_json(snapshot: &str) -> Value {
    let mut v: Value = serde_json::from_str(snapshot).unwrap();
    v["archived"] = Value::Bool(true);
    v
}

/// A live flow's state as GET answers it (the engine's), and its event log.
fn stored(c: &mut redis::Connection, id: &str) -> (String, Vec<String>) {
    let state = get(c, id).unwrap().expect("a live flow");
    let events: Vec<String> = cmd(
        c,
        &["LRANGE", &format!("argyll:flow:{id}:events"), "0", "-1"],
    )
    .unwrap();
    (state, events)
}

fn rss(c: &mut redis::Connection) -> i64 {
    let info: String = cmd(c, &["INFO", "memory"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory_rss:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Objects refused by a capped `Store::get` count as `s3_too_large`, when that kind exists.
fn s3_too_large(c: &mut redis::Connection) -> i64 {
    let info: String = cmd(c, &["INFO", "flowarchive"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("flowarchive_get_fetch_errors_s3_too_large:"))
        .map_or(0, |n| n.trim().parse().unwrap())
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

/// A label named `seq` once made the archive unreadable forever (its keys already deleted).
#[test]
fn a_flow_with_a_label_named_seq_reads_back_exactly() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let labels = [
        ("tenant", "acme"),
        ("seq", "41"),
        ("snapshot", "{\"x\":1}"),
        ("status", ",\"seq\":"),
    ];
    write_flow(
        &mut c,
        &FlowSpec {
            labels: &labels,
            ..FlowSpec::done("labelled")
        },
    );
    let (snapshot, events) = stored(&mut c, "labelled");
    archive(&mut c, "labelled").unwrap();
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:labelled:events"]).unwrap(),
        0,
        "archived and deleted"
    );
    let state = get(&mut c, "labelled").unwrap().unwrap();
    assert_eq!(
        state,
        format!(
            "{},\"archived\":true}}",
            snapshot.strip_suffix('}').unwrap()
        ),
        "the stored bytes plus the flag"
    );
    assert_eq!(
        get_events(&mut c, "labelled").unwrap(),
        (state, events),
        "every event, in order"
    );
    let text = gunzip(&s3.get("flows/labelled.jsonl.gz").unwrap());
    let trailer: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(trailer["labels"]["seq"], "41");
    // The labels hash as the engine stores it: `:` escaped as `%`.
    assert_eq!(trailer["labels"]["status"], ",\"seq\"%");
}

/// "Never delete what you cannot read back": a flow whose object GET would refuse is not archived.
#[test]
fn a_flow_that_would_not_read_back_is_not_deleted() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "flowarchive.read-max-bytes", "64kb"],
    )
    .unwrap();
    write_flow(
        &mut c,
        &FlowSpec {
            events: 400,
            ..FlowSpec::done("wide")
        },
    );
    let before = dump_all(&mut c);
    let e = archive(&mut c, "wide").unwrap_err().to_string();
    // Refused while capturing (the log outgrows the cap) or at the read-back gate; either way before
    // anything is uploaded or deleted.
    assert!(
        e.contains("flow \"wide\" cannot be read")
            && e.contains("read back")
            && e.contains("65536"),
        "{e}"
    );
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
    assert_eq!(s3.list(), [] as [String; 0], "nothing uploaded");
    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "flowarchive.read-max-bytes", "1mb"],
    )
    .unwrap();
    archive(&mut c, "wide").unwrap();
    assert_eq!(get_events(&mut c, "wide").unwrap().1.len(), 400);
}

/// The same flow id in two DBs is two flows, two objects, two answers.
#[test]
fn the_same_id_in_two_dbs_archives_to_two_objects() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c0 = srv.conn();
    let mut c3 = srv.conn();
    cmd::<()>(&mut c3, &["SELECT", "3"]).unwrap();
    write_flow(&mut c0, &FlowSpec::done("twin"));
    write_flow(
        &mut c3,
        &FlowSpec {
            events: 9,
            labels: &[("tenant", "other")],
            ..FlowSpec::done("twin")
        },
    );
    let (snap0, events0) = stored(&mut c0, "twin");
    let (snap3, events3) = stored(&mut c3, "twin");
    assert_ne!(events0, events3);
    let loc0 = archive(&mut c0, "twin").unwrap();
    let loc3 = archive(&mut c3, "twin").unwrap();
    assert_eq!(
        loc0["location"],
        redis::Value::BulkString(s3.location("flows/twin.jsonl.gz").into_bytes())
    );
    assert_eq!(
        loc3["location"],
        redis::Value::BulkString(s3.location("db3/flows/twin.jsonl.gz").into_bytes())
    );
    let mut listed = s3.list();
    listed.sort();
    assert_eq!(listed, ["db3/flows/twin.jsonl.gz", "flows/twin.jsonl.gz"]);

    let (state0, read0) = get_events(&mut c0, "twin").unwrap();
    let (state3, read3) = get_events(&mut c3, "twin").unwrap();
    assert_eq!(
        (serde_json::from_str::<Value>(&state0).unwrap(), read0),
        (archived_json(&snap0), events0)
    );
    assert_eq!(
        (serde_json::from_str::<Value>(&state3).unwrap(), read3),
        (archived_json(&snap3), events3)
    );

    // DB 0's object under DB 3's key: the header names DB 0, so DB 3 refuses it.
    let db0_object = s3.get("flows/twin.jsonl.gz").unwrap();
    s3.put_as_archive("db3/flows/twin.jsonl.gz", &db0_object);
    cmd::<()>(&mut c3, &["CONFIG", "SET", "flowarchive.cache-bytes", "0"]).unwrap();
    let e = get(&mut c3, "twin").unwrap_err().to_string();
    assert!(e.contains("belongs to DB 0, not this one"), "{e}");
    // An index entry names the DB it was archived from (SWAPDB moves entries with their DB): DB 3's
    // entry naming DB 0's object reads DB 0's history, and the object's header must agree.
    cmd::<()>(
        &mut c3,
        &[
            "HSET",
            "archived:flows",
            "twin",
            &s3.location("flows/twin.jsonl.gz"),
        ],
    )
    .unwrap();
    let (state, _) = get_events(&mut c3, "twin").unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&state).unwrap(),
        archived_json(&snap0)
    );
}

/// An object is bound to the generation of the key it was written for: a store that answers an
/// earlier incarnation's object at a later incarnation's key (a stale replica, a copy gone wrong)
/// gets an error, never the earlier flow's state as the id's newest. Its checksum and header agree
/// with its own bytes, so nothing but the generation tells the two apart.
#[test]
fn an_earlier_incarnation_answered_at_a_later_key_is_refused() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("again"));
    let (snap1, _) = stored(&mut c, "again");
    archive(&mut c, "again").unwrap();
    write_flow(
        &mut c,
        &FlowSpec {
            events: 9,
            ..FlowSpec::done("again")
        },
    );
    let (snap2, events2) = stored(&mut c, "again");
    let second = archive(&mut c, "again").unwrap();
    assert_eq!(
        text(&second["location"]),
        s3.location("flows/again.g1.jsonl.gz")
    );
    let header = |rel: &str| -> Value {
        let text = gunzip(&s3.get(rel).unwrap());
        serde_json::from_str(text.lines().next().unwrap()).unwrap()
    };
    assert_eq!(header("flows/again.jsonl.gz")["generation"], 0);
    assert_eq!(header("flows/again.g1.jsonl.gz")["generation"], 1);
    let (state, events) = get_events(&mut c, "again").unwrap();
    assert_eq!(
        (serde_json::from_str::<Value>(&state).unwrap(), events),
        (archived_json(&snap2), events2)
    );

    let first_object = s3.get("flows/again.jsonl.gz").unwrap();
    let second_object = s3.get("flows/again.g1.jsonl.gz").unwrap();
    s3.put_as_archive("flows/again.g1.jsonl.gz", &first_object);
    cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.cache-bytes", "0"]).unwrap();
    let previous = |c: &mut redis::Connection| -> redis::RedisResult<Option<String>> {
        cmd(c, &["FLOWARCHIVE.GET", "again", "PREVIOUS", "1"])
    };
    // The predecessor is found through the newest object's header, so it is refused too.
    for e in [
        get(&mut c, "again").unwrap_err(),
        previous(&mut c).unwrap_err(),
    ] {
        let e = e.to_string();
        assert!(e.contains("written for generation 0"), "{e}");
    }
    assert_eq!(info_field(&mut c, "get_fetch_errors_other_generation"), 2);
    s3.put_as_archive("flows/again.g1.jsonl.gz", &second_object);
    assert_eq!(
        get(&mut c, "again")
            .unwrap()
            .map(|s| serde_json::from_str::<Value>(&s).unwrap()),
        Some(archived_json(&snap2))
    );
    let before = previous(&mut c).unwrap().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&before).unwrap(),
        archived_json(&snap1)
    );
}

/// A 1 MB gzip that inflates to 1 GB once took the server's memory with it.
/// A store that announces a body larger than the machine holds, under a read cap as large as the
/// config allows, gets an error: the first buffer takes the announced length only up to 1 MiB.
/// Taken at its word, the allocation of 100 GB aborted the server.
#[test]
fn an_announced_length_past_memory_is_an_error_not_an_abort() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["cache-bytes", "0"]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("big"));
    archive(&mut c, "big").unwrap();
    config_set(&mut c, "flowarchive.read-max-bytes", "1000gb").unwrap();
    proxy.set(vec![common::proxy::Rule {
        method: "GET",
        path: "/flows/big".into(),
        fault: common::proxy::Fault::HugeLength,
    }]);
    assert!(get(&mut c, "big").is_err());
    proxy.set(Vec::new());
    assert_eq!(cmd::<String>(&mut srv.conn(), &["PING"]).unwrap(), "PONG");
    assert!(
        get(&mut c, "big").unwrap().is_some(),
        "read again once the store is honest"
    );
}

/// Stores `body` as flow `id`'s object in DB 0 and points the index at it, as an archive would.
fn plant(c: &mut redis::Connection, s3: &S3, id: &str, body: &[u8]) {
    let rel = format!("flows/{id}.jsonl.gz");
    s3.put_as_archive(&rel, body);
    cmd::<()>(c, &["HSET", "archived:flows", id, &s3.location(&rel)]).unwrap();
}

/// A version-2 object of no events whose trailer holds `state`, written independently of the module.
fn state_object(id: &str, state: &str) -> Vec<u8> {
    let trailer = format!(
        "{{\"state\":{state},\"snapshot\":null,\"seq\":null,\"labels\":{{}},\"status\":\"completed\"}}"
    );
    crafted_object(id, 0, 2, &[], &trailer)
}

/// A crafted state that names `archived` at its top level is answered marked with a few copies of its
/// own size at most: its members are copied one at a time, with no tree and no list of names. Built
/// whole, a state of 15 MiB of small numbers took the module's heap peak 622 MiB up under a 32 MiB
/// read cap (60 MiB now), and one of 13 MiB of names 111 MiB.
#[test]
fn a_state_that_names_archived_is_marked_in_about_its_own_size() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, "flowarchive.read-max-bytes", "32mb").unwrap();
    config_set(&mut c, "flowarchive.cache-bytes", "0").unwrap();
    let mut names = String::from("{\"id\":\"names\",\"archived\":false");
    for i in 0.. {
        if names.len() >= 13 << 20 {
            break;
        }
        names.push_str(&format!(",\"{i:x}\":0"));
    }
    names.push('}');
    let mut tree = String::from("{\"id\":\"tree\",\"archived\":false,\"x\":[0");
    tree.push_str(&",0".repeat(15 << 19));
    tree.push_str("]}");
    for (id, state) in [("tree", &tree), ("names", &names)] {
        plant(&mut c, &s3, id, &state_object(id, state));
        let base = info_field(&mut c, "heap_bytes_peak");
        let answer = get(&mut c, id).unwrap().expect("answered");
        let marked: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(marked["archived"], true, "{id}");
        assert_eq!(marked["id"], id);
        let rose = info_field(&mut c, "heap_bytes_peak") - base;
        println!("{id}: the heap peak rose {} MiB", rose >> 20);
        assert!(
            rose < 96 << 20,
            "{id}: the heap peak rose {} MiB",
            rose >> 20
        );
    }
}

#[test]
fn gzip_bombs_and_oversized_objects_are_refused_in_bounded_memory() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let declared = bomb("declared", 1 << 30, Some(1024));
    assert!(declared.len() < 2 << 20, "{}", declared.len());
    plant(&mut c, &s3, "declared", &declared);
    plant(
        &mut c,
        &s3,
        "undeclared",
        &bomb("undeclared", 256 << 20, None),
    );
    let before = rss(&mut c);

    let started = Instant::now();
    let e = get(&mut c, "declared").unwrap_err().to_string();
    assert!(
        e.contains("flow \"declared\" archived at s3://")
            && e.contains("too large: content runs past its declared size of 1024 bytes"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "flowarchive.read-max-bytes", "32mb"],
    )
    .unwrap();
    let e = get(&mut c, "undeclared").unwrap_err().to_string();
    assert!(e.contains("passes the read cap of 33554432 bytes"), "{e}");
    let grown = rss(&mut c) - before;
    assert!(grown < 200 << 20, "RSS grew by {grown} bytes");
    // The module's own heap never held more than the cap and a small constant (the content buffer
    // once doubled past the cap).
    let peak = info_field(&mut c, "heap_bytes_peak");
    assert!(peak < (32 << 20) + (1 << 20), "heap peak {peak}");

    // The object itself is capped too: small content behind 80 KB of gzip header fields.
    let text = gunzip(&object("big", 0, &[], "{\"id\":\"big\"}"));
    let mut gz = flate2::GzBuilder::new()
        .extra(vec![b'x'; 40_000])
        .comment(vec![b'x'; 40_000])
        .write(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let big = gz.finish().unwrap();
    assert!(big.len() > 64 << 10 && text.len() < 1024, "{}", big.len());
    plant(&mut c, &s3, "big", &big);
    assert!(get(&mut c, "big").unwrap().is_some(), "readable under 32mb");
    cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.cache-bytes", "0"]).unwrap();
    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "flowarchive.read-max-bytes", "64kb"],
    )
    .unwrap();
    let e = get(&mut c, "big").unwrap_err().to_string();
    // Refused by the fetch (too large) or, with a capped Store::get, by the store (larger than); never
    // by the decoder, which would name the content.
    assert!(
        e.contains("65536")
            && (e.contains("too large") || e.contains("larger than"))
            && !e.contains("content")
            && !e.contains("declares"),
        "{e}"
    );
    assert_eq!(
        info_field(&mut c, "get_fetch_errors_too_large") + s3_too_large(&mut c),
        3
    );
}

/// 500 concurrent reads of distinct archived flows once started 506 threads.
#[test]
fn five_hundred_concurrent_reads_use_a_few_threads() {
    const FLOWS: usize = 500;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let ids: Vec<String> = (0..FLOWS).map(|i| format!("many-{i}")).collect();
    std::thread::scope(|scope| {
        for part in ids.chunks(FLOWS / 5) {
            let s3 = &s3;
            scope.spawn(move || {
                for id in part {
                    let events = vec![json!({"type": "flow_started", "id": id}).to_string()];
                    let snapshot = json!({"id": id, "status": "completed"}).to_string();
                    s3.put_as_archive(
                        &format!("flows/{id}.jsonl.gz"),
                        &object(id, 0, &events, &snapshot),
                    );
                }
            });
        }
    });
    let mut pipe = redis::pipe();
    for id in &ids {
        pipe.cmd("HSET")
            .arg("archived:flows")
            .arg(id)
            .arg(s3.location(&format!("flows/{id}.jsonl.gz")))
            .ignore();
    }
    pipe.query::<()>(&mut c).unwrap();
    assert!(get(&mut c, "many-0").unwrap().is_some());
    let baseline = threads(srv.pid());
    proxy.delay("GET", Duration::from_millis(20));

    let done = std::sync::atomic::AtomicBool::new(false);
    let (peak, answers) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(threads(srv.pid()));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        });
        let clients: Vec<_> = ids
            .iter()
            .map(|id| {
                let port = srv.port;
                scope.spawn(move || {
                    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                    let mut c = client.get_connection().unwrap();
                    (id.clone(), get(&mut c, id))
                })
            })
            .collect();
        let answers: Vec<_> = clients.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (sampler.join().unwrap(), answers)
    });
    let mut busy = 0;
    for (id, answer) in answers {
        match answer {
            Ok(Some(state)) => {
                let v: Value = serde_json::from_str(&state).unwrap();
                assert_eq!(
                    (v["id"].as_str(), v["archived"].as_bool()),
                    (Some(id.as_str()), Some(true))
                );
            }
            Err(e) if e.to_string().contains("busy") && e.to_string().contains("retry") => {
                busy += 1
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert!(busy < FLOWS / 2, "{busy} busy answers for a queue of 1024");
    assert!(
        peak <= baseline + 6,
        "{peak} threads at the peak, {baseline} before the reads"
    );
}

/// Beyond 4 running and 1024 queued fetches, a read answers a busy error at once, without a thread.
#[test]
fn reads_beyond_the_queue_are_busy_errors() {
    use std::io::Read;
    const READS: usize = 1100;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let ids: Vec<String> = (0..READS).map(|i| format!("queued-{i}")).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        let location = s3.location(&format!("flows/{id}.jsonl.gz"));
        pipe.cmd("HSET")
            .arg("archived:flows")
            .arg(id)
            .arg(location)
            .ignore();
    }
    pipe.query::<()>(&mut c).unwrap();
    proxy.all(common::proxy::Fault::Hang);
    let baseline = threads(srv.pid());
    // Raw connections, so that a thousand blocked clients cost no thread here either.
    let mut conns: Vec<std::net::TcpStream> = ids
        .iter()
        .map(|id| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
            let req = format!("*2\r\n$15\r\nFLOWARCHIVE.GET\r\n${}\r\n{id}\r\n", id.len());
            s.write_all(req.as_bytes()).unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut busy = 0;
    for (s, id) in conns.iter_mut().zip(&ids) {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 512];
        if let Ok(n) = s.read(&mut buf) {
            let reply = String::from_utf8_lossy(&buf[..n]);
            assert!(
                reply.starts_with(&format!("-ERR flow \"{id}\" archived at "))
                    && reply.contains("busy")
                    && reply.contains("retry"),
                "{reply}"
            );
            busy += 1;
        }
    }
    assert!(
        (READS - 1024 - 4..=READS - 1024).contains(&busy),
        "{busy} busy answers"
    );
    assert!(threads(srv.pid()) <= baseline + 4, "fetch threads");
    assert!(info_field(&mut c, "get_fetch_errors_busy") >= busy as i64);
}

/// Index entries naming another bucket, a `..` path or another flow's object once made the module
/// sign and send a GET for them.
#[test]
fn reads_follow_only_locations_the_module_writes() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("real"));
    archive(&mut c, "real").unwrap();
    let bucket = s3.name().to_string();
    let planted = [
        (
            "other-bucket",
            format!(
                "s3://flowarchive-elsewhere/{}/flows/other-bucket.jsonl.gz",
                s3.prefix
            ),
        ),
        ("dotdot", format!("s3://{bucket}/../x")),
        (
            "dotdot2",
            format!("s3://{bucket}/{}/flows/../../dotdot2.jsonl.gz", s3.prefix),
        ),
        ("borrowed", s3.location("flows/real.jsonl.gz")),
        (
            "not-s3",
            format!(
                "https://{bucket}.s3.amazonaws.com/{}/flows/not-s3.jsonl.gz",
                s3.prefix
            ),
        ),
        (
            "crlf",
            format!("s3://{bucket}/x\r\n-ERR injected{}", "y".repeat(4000)),
        ),
    ];
    for (id, location) in &planted {
        cmd::<()>(&mut c, &["HSET", "archived:flows", id, location]).unwrap();
    }
    let before = proxy.requests().len();
    for (id, _) in &planted {
        let e = get(&mut c, id).unwrap_err().to_string();
        assert!(
            e.contains(&format!("flow \"{id}\" archived at "))
                && e.contains("not where flowarchive writes this flow")
                && e.contains("nothing was fetched")
                && e.len() < 600
                && !e.contains('\n'),
            "{e}"
        );
    }
    assert_eq!(
        proxy.requests()[before..],
        [] as [String; 0],
        "no request sent"
    );
    assert_eq!(
        info_field(&mut c, "get_fetch_errors_bad_location"),
        planted.len() as i64
    );

    // An archive written under an older prefix reads once that root is allowed, and only then.
    let body = s3.get("flows/real.jsonl.gz").unwrap();
    let text = gunzip(&body).replacen("\"flow_id\":\"real\"", "\"flow_id\":\"moved\"", 1);
    s3.put_as_archive("old/flows/moved.jsonl.gz", &gzip(&text));
    cmd::<()>(
        &mut c,
        &[
            "HSET",
            "archived:flows",
            "moved",
            &s3.location("old/flows/moved.jsonl.gz"),
        ],
    )
    .unwrap();
    let e = get(&mut c, "moved").unwrap_err().to_string();
    assert!(e.contains("not where flowarchive writes this flow"), "{e}");
    assert_eq!(proxy.requests().len(), before, "still no request");
    let root = format!("s3://{bucket}/{}/old", s3.prefix);
    cmd::<()>(
        &mut c,
        &[
            "CONFIG",
            "SET",
            "flowarchive.read-allow",
            &format!("s3://some-old-bucket {root}"),
        ],
    )
    .unwrap();
    let state = get(&mut c, "moved").unwrap().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&state).unwrap()["archived"],
        true
    );
    assert_eq!(
        proxy.requests()[before..]
            .iter()
            .filter(|r| r.starts_with("GET"))
            .count(),
        1
    );
    for bad in [
        "flowarchive-tests",
        "s3://UPPER",
        "s3://ok-bucket/../x",
        "s3://ok-bucket/a//b",
    ] {
        let e = cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.read-allow", bad]).unwrap_err();
        assert!(e.to_string().contains("read-allow"), "{bad}: {e}");
    }
    let allowed: Vec<String> = cmd(&mut c, &["CONFIG", "GET", "flowarchive.read-allow"]).unwrap();
    assert_eq!(
        allowed[1],
        format!("s3://some-old-bucket {root}"),
        "a refused value changes nothing"
    );

    // What was read under a root is answered from the cache only while the root is allowed, and
    // read again under another read cap.
    let fetches = |proxy: &Proxy| {
        let sent = proxy.requests();
        sent.iter().filter(|r| r.starts_with("GET")).count()
    };
    let fetched = fetches(&proxy);
    assert!(get(&mut c, "moved").unwrap().is_some());
    assert_eq!(fetches(&proxy), fetched, "from the cache");
    let allow = |c: &mut redis::Connection, roots: &str| {
        cmd::<()>(c, &["CONFIG", "SET", "flowarchive.read-allow", roots]).unwrap()
    };
    allow(&mut c, "s3://some-old-bucket");
    let e = get(&mut c, "moved").unwrap_err().to_string();
    assert!(e.contains("not where flowarchive writes this flow"), "{e}");
    allow(&mut c, &allowed[1]);
    assert!(get(&mut c, "moved").unwrap().is_some());
    assert_eq!(
        fetches(&proxy),
        fetched,
        "the root allowed again: from the cache"
    );
    config_set(&mut c, "flowarchive.read-max-bytes", "128mb").unwrap();
    assert!(get(&mut c, "moved").unwrap().is_some());
    assert_eq!(fetches(&proxy), fetched + 1, "another cap: read again");

    // A fetch in flight is shared only under the same settings: a read made once the root is dropped
    // is refused, not answered by the fetch begun before.
    config_set(&mut c, "flowarchive.cache-bytes", "0").unwrap();
    proxy.hold("GET");
    let mut early = srv.conn();
    let reading = std::thread::spawn(move || get(&mut early, "moved"));
    wait_for("the read held", Duration::from_secs(60), || {
        proxy.gated() == 1
    });
    allow(&mut c, "s3://some-old-bucket");
    let e = get(&mut c, "moved").unwrap_err().to_string();
    assert!(e.contains("not where flowarchive writes this flow"), "{e}");
    proxy.release();
    assert!(
        reading.join().unwrap().unwrap().is_some(),
        "read as allowed when asked"
    );
}

/// An object with anything after its one gzip member (zero padding, a second member whose content
/// would answer other events, a stray magic) is refused by GET, even with the object's own sha256
/// metadata made to match: nothing appended to an object is ever answered. The same object without
/// the tail reads.
#[test]
fn bytes_after_the_gzip_member_are_never_answered() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    cmd::<()>(&mut c, &["CONFIG", "SET", "flowarchive.cache-bytes", "0"]).unwrap();
    let events = vec!["{\"n\":1}".to_string(), "{\"n\":2}".to_string()];
    let good = object("tail", 0, &events, "{\"id\":\"tail\"}");
    let other = object("tail", 0, &["{\"n\":666}".to_string()], "{\"id\":\"x\"}");
    let rel = "flows/tail.jsonl.gz";
    cmd::<()>(
        &mut c,
        &["HSET", "archived:flows", "tail", &s3.location(rel)],
    )
    .unwrap();
    for tail in [vec![0u8; 1], vec![0u8; 512], other, vec![0x1f, 0x8b]] {
        s3.put_as_archive(rel, &[&good[..], &tail].concat());
        let e = err_text(get_events(&mut c, "tail"));
        assert!(
            e.contains(&format!("{} bytes after the gzip member", tail.len())),
            "{}: {e}",
            tail.len()
        );
    }
    s3.put_as_archive(rel, &good);
    assert_eq!(get_events(&mut c, "tail").unwrap().1, events);
}

/// Sends `GET <id> EVENTS` on a connection of its own, reads nothing.
fn pending_get_events(port: u16, id: &str) -> resp::RawConn {
    let mut conn = resp::RawConn::open(port, false);
    conn.send(&[b"FLOWARCHIVE.GET", id.as_bytes(), b"EVENTS"]);
    conn
}

/// A blocked client can leave while its `GET … EVENTS` of a long log (12,000 events, about 1.5 MB)
/// waits or is being sent: its connection closed at once, killed by CLIENT KILL while the read or
/// the fetch runs (CLIENT UNBLOCK cannot end it: the module answers every client it blocks), or
/// closed while the server sends it the reply it does not read. A live read (in chunks, at the
/// smallest step budget) and an archived one (not cached, S3 slowed so the fetch is pending) alike:
/// the server lives on, a client that stays gets every event, the reads' bytes leave
/// `buffered_bytes` (0 again) and the module's heap comes back to where it was, and the server's
/// clients are only the ones that stayed.
#[test]
fn clients_that_leave_a_long_get_events_harm_nothing() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let mut srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    config_set(&mut c, "flowarchive.step-budget-us", "50").unwrap();
    config_set(&mut c, "flowarchive.cache-bytes", "0").unwrap();
    for (id, status) in [("live", "active"), ("gone", "completed")] {
        write_flow(
            &mut c,
            &FlowSpec {
                events: 12_000,
                status,
                ..FlowSpec::done(id)
            },
        );
    }
    let (live_state, live_log) = stored(&mut c, "live");
    let (_, gone_log) = stored(&mut c, "gone");
    archive(&mut c, "gone").unwrap();
    let gone_state = get(&mut c, "gone").unwrap().expect("archived");
    proxy.delay("GET", Duration::from_millis(700));
    let expected = [
        ("live", live_state, live_log),
        ("gone", gone_state, gone_log),
    ];
    // Every pool thread started and every buffer the server keeps made, before the heap is measured.
    for (id, state, log) in &expected {
        assert_eq!(
            &get_events(&mut c, id).unwrap(),
            &(state.clone(), log.clone())
        );
    }
    let heap = info_field(&mut c, "heap_bytes");
    let clients = |c: &mut redis::Connection| -> usize {
        let list: String = cmd(c, &["CLIENT", "LIST"]).unwrap();
        list.lines().count()
    };
    let stayed = clients(&mut c);
    let port = srv.port;
    for (id, state, log) in &expected {
        let fetches = info_field(&mut c, "get_archive_fetches");
        // Gone at once.
        for _ in 0..3 {
            drop(pending_get_events(port, id));
        }
        // Killed while the read or the fetch runs.
        let mut killed = Vec::new();
        for _ in 0..3 {
            let mut conn = resp::RawConn::open(port, false);
            let reply = conn.call(&[b"CLIENT", b"ID"]);
            let client_id = String::from_utf8(reply[1..reply.len() - 2].to_vec()).unwrap();
            conn.send(&[b"FLOWARCHIVE.GET", id.as_bytes(), b"EVENTS"]);
            killed.push((client_id, conn));
        }
        // Closed while the reply is being sent: it reads the reply's first bytes only.
        let stalled: Vec<_> = (0..2).map(|_| pending_get_events(port, id)).collect();
        let stays = {
            let id = id.to_string();
            std::thread::spawn(move || {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                let mut c = client.get_connection().unwrap();
                get_events(&mut c, &id).unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        for (client_id, _) in &killed {
            let unblocked: i64 = cmd(&mut c, &["CLIENT", "UNBLOCK", client_id]).unwrap();
            assert_eq!(unblocked, 0, "{id}: CLIENT UNBLOCK ended a read");
            let gone: i64 = cmd(&mut c, &["CLIENT", "KILL", "ID", client_id]).unwrap();
            assert_eq!(gone, 1, "{id}: client {client_id} had left");
        }
        drop(killed);
        for mut conn in stalled {
            let mut first = [0u8; 64];
            std::io::Read::read_exact(&mut conn.stream, &mut first).unwrap();
            assert!(first.starts_with(b"*2\r\n$"), "{id}");
        }
        assert_eq!(stays.join().unwrap(), (state.clone(), log.clone()), "{id}");
        if *id == "gone" {
            let fetched = info_field(&mut c, "get_archive_fetches") - fetches;
            assert!(fetched < 9, "{id}: {fetched} fetches, none shared");
        }
        wait_for("the reads' bytes released", Duration::from_secs(20), || {
            info_field(&mut c, "buffered_bytes") == 0
        });
        wait_for(
            "only the clients that stayed",
            Duration::from_secs(10),
            || clients(&mut c) == stayed,
        );
        assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
        checker::assert_alive(&mut srv, id);
    }
    // Room for a worker's small buffers; one read's log (1.5 MB) does not fit in it.
    let now = info_field(&mut c, "heap_bytes");
    assert!(
        now <= heap + (256 << 10),
        "the heap held {heap} bytes before the clients left, {now} after"
    );
    for (id, state, log) in &expected {
        assert_eq!(
            &get_events(&mut c, id).unwrap(),
            &(state.clone(), log.clone())
        );
    }
}

/// One long archived flow (3,000 events) read with `EVENTS` by many clients at once: each waiter of
/// the one shared fetch is written from the same decoded flow, then, cached, every read is written in
/// its command; some clients pipeline several reads and a PING on one connection. Every answer is the
/// whole flow, byte for byte, in its connection's order; the first wave shares one S3 read, the cached
/// ones make none; the server lives on.
#[test]
fn many_clients_reading_one_long_archived_flow_each_get_it_whole() {
    const READS: usize = 4;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let mut srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    config_set(&mut c, "flowarchive.cache-bytes", "0").unwrap();
    write_flow(
        &mut c,
        &FlowSpec {
            events: 3_000,
            ..FlowSpec::done("shared")
        },
    );
    let (_, log) = stored(&mut c, "shared");
    archive(&mut c, "shared").unwrap();
    let state = get(&mut c, "shared").unwrap().expect("archived");
    let whole = std::sync::Arc::new(resp::state_and_events(state.as_bytes(), &log));
    let port = srv.port;
    // Each client pipelines `reads` GETs with a PING between the first two; the answers in order.
    let wave = |clients: usize, reads: usize| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let whole = whole.clone();
                std::thread::spawn(move || {
                    let mut conn = resp::RawConn::open(port, false);
                    let ask: [&[u8]; 3] = [b"FLOWARCHIVE.GET", b"shared", b"EVENTS"];
                    let mut sent = resp::command(&ask).repeat(reads);
                    if reads > 1 {
                        let at = resp::command(&ask).len();
                        sent.splice(at..at, resp::command(&[b"PING"]));
                    }
                    std::io::Write::write_all(&mut conn.stream, &sent).unwrap();
                    for i in 0..reads {
                        assert!(conn.reply() == *whole, "read {i}");
                        if i == 0 && reads > 1 {
                            assert_eq!(conn.reply(), b"+PONG\r\n");
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    };
    // The first wave's fetch is held until all ten reads wait on it.
    proxy.hold("GET");
    let fetches = info_field(&mut c, "get_archive_fetches");
    std::thread::scope(|scope| {
        let first = scope.spawn(|| wave(10, 1));
        wait_for(
            "ten reads waiting on the held fetch",
            Duration::from_secs(60),
            || proxy.gated() == 1 && blocked_clients(&mut c) == 10,
        );
        proxy.release();
        first.join().unwrap();
    });
    assert_eq!(info_field(&mut c, "get_archive_fetches"), fetches + 1);
    wave(3, READS);
    // Not cached: a connection's reads follow one another, each fetched (or sharing another
    // connection's fetch).
    let fetched = info_field(&mut c, "get_archive_fetches") - fetches - 1;
    assert!(
        (READS as i64..=3 * READS as i64).contains(&fetched),
        "{fetched} fetches"
    );

    config_set(&mut c, "flowarchive.cache-bytes", "64mb").unwrap();
    get(&mut c, "shared").unwrap();
    let (fetches, hits) = (
        info_field(&mut c, "get_archive_fetches"),
        info_field(&mut c, "get_cache_hits"),
    );
    wave(6, READS);
    assert_eq!(info_field(&mut c, "get_archive_fetches"), fetches);
    assert_eq!(
        info_field(&mut c, "get_cache_hits"),
        hits + 6 * READS as i64
    );
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0);
    checker::assert_alive(&mut srv, "after the waves");
}
