//! `scripts/flowarchive-index --rebuild`: the archive index rebuilt from the bucket alone after it
//! was lost, in either index format: every archived flow readable again at its newest incarnation
//! (earlier ones through `previous`), abandoned attempts and foreign objects listed and left alone,
//! live flows never indexed, a dry run that writes nothing, and a second run that writes nothing.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::index::{compact_entries, compact_location, location, rebuild_index as rebuild, INDEX};
use common::*;

fn summary(out: &str) -> &str {
    out.lines()
        .rfind(|l| l.starts_with("objects="))
        .unwrap_or_else(|| panic!("no summary in {out}"))
}

fn conn_db(srv: &Server, db: u32) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{}/{db}", srv.port))
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Every key of the index in either format (the hash, the compact meta and buckets).
fn index_keys(c: &mut redis::Connection) -> Vec<String> {
    let mut keys: Vec<String> = cmd(c, &["KEYS", &format!("{INDEX}*")]).unwrap();
    keys.sort();
    keys
}

/// A header line as docs/FORMAT.md writes it, for objects the module did not write.
fn header(id: &str, previous: Option<&str>) -> String {
    serde_json::json!({
        "format": "flowarchive", "version": 2, "flow_id": id, "db": 0, "events": 0,
        "raw_bytes": 0, "sha256": "", "keys": {}, "previous": previous,
    })
    .to_string()
}

#[test]
fn rebuild_restores_a_lost_hash_index() {
    rebuild_restores_a_lost_index(&[]);
}

#[test]
fn rebuild_restores_a_lost_compact_index() {
    rebuild_restores_a_lost_index(&["index-format", "compact", "index-buckets", "8"]);
}

fn rebuild_restores_a_lost_index(format: &[&str]) {
    let compact = !format.is_empty();
    let s3 = S3::new_bucket();
    let mut extra = vec!["cache-bytes", "0"];
    extra.extend_from_slice(format);
    let srv = server_via(&s3, None, &extra);
    let mut c = srv.conn();
    let mut c3 = conn_db(&srv, 3);

    // Archived flows: plain, escaped, a UUID (the compact `u` buckets), one whose escaped key passes
    // 1024 bytes (`_sha256`), one whose name passes the store's 255 bytes (`_sha256` too, which the
    // compact format cannot rebuild: indexed in the hash), one of DB 3.
    let long = format!("long-{}", "é".repeat(600));
    let named = ":".repeat(86);
    let ids = [
        "plain-1",
        "a:b/c",
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        long.as_str(),
        named.as_str(),
    ];
    let mut want: BTreeMap<(u32, String), (FlowSpec, String)> = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let spec = FlowSpec {
            events: 3 + i,
            ..FlowSpec::done(id)
        };
        write_flow(&mut c, &spec);
        let at = text(&archive(&mut c, id).unwrap()["location"]);
        want.insert((0, id.to_string()), (spec, at));
    }
    assert!(want[&(0, long.clone())].1.contains("/flows/_sha256/"));
    assert!(want[&(0, named.clone())].1.contains("/flows/_sha256/"));
    assert!(want[&(0, "a:b/c".into())]
        .1
        .ends_with("/flows/a%3Ab%2Fc.jsonl.gz"));
    let in_db3 = FlowSpec {
        events: 6,
        ..FlowSpec::done("in-db-3")
    };
    write_flow(&mut c3, &in_db3);
    let at = text(&archive(&mut c3, "in-db-3").unwrap()["location"]);
    assert!(at.contains("/db3/flows/in-db-3.jsonl.gz"), "{at}");
    want.insert((3, "in-db-3".into()), (in_db3, at));

    // A reused id: two incarnations, the second at `.g1` naming the first as `previous`.
    let first = FlowSpec {
        events: 4,
        ..FlowSpec::done("again")
    };
    write_flow(&mut c, &first);
    let first_at = text(&archive(&mut c, "again").unwrap()["location"]);
    let second = FlowSpec {
        events: 7,
        ..FlowSpec::done("again")
    };
    write_flow(&mut c, &second);
    let second_at = text(&archive(&mut c, "again").unwrap()["location"]);
    assert!(
        second_at.ends_with("/flows/again.g1.jsonl.gz"),
        "{second_at}"
    );
    want.insert((0, "again".into()), (second, second_at));

    // An abandoned attempt: an object of the flow's own at generation 0 that no commit indexed, so
    // the archive that did commit took generation 1 (docs/FORMAT.md: objects are written once).
    let abandoned = format!("{header}\n", header = header("late:1", None));
    s3.put("flows/late%3A1.jsonl.gz", &gzip(&abandoned));
    let late = FlowSpec {
        events: 5,
        ..FlowSpec::done("late:1")
    };
    write_flow(&mut c, &late);
    let late_at = text(&archive(&mut c, "late:1").unwrap()["location"]);
    assert!(
        late_at.ends_with("/flows/late%3A1.g1.jsonl.gz"),
        "{late_at}"
    );
    want.insert((0, "late:1".into()), (late, late_at));

    // Objects that are no flow's archive where they are: not gzip, and a header naming another flow.
    s3.put("flows/junk.jsonl.gz", b"not gzip at all");
    let foreign = format!("{}\n", header("someone-else", None));
    s3.put("flows/mismatch.jsonl.gz", &gzip(&foreign));
    // And an object written for generation 0 of its flow, found at generation 2's key.
    let mut shifted: serde_json::Value = serde_json::from_str(&header("shifted", None)).unwrap();
    shifted["generation"] = 0.into();
    s3.put("flows/shifted.g2.jsonl.gz", &gzip(&format!("{shifted}\n")));

    // A live flow with an archived object: the engine started the id again after its archive.
    let live = FlowSpec {
        events: 3,
        ..FlowSpec::done("live-1")
    };
    write_flow(&mut c, &live);
    archive(&mut c, "live-1").unwrap();
    let live_again = FlowSpec {
        events: 5,
        ..FlowSpec::done("live-1")
    };
    write_flow(&mut c, &live_again);
    let live_events = "argyll:flow:live-1:events";
    let live_before: Vec<String> = cmd(&mut c, &["LRANGE", live_events, "0", "-1"]).unwrap();

    // The index is lost, in both DBs.
    for conn in [&mut c, &mut c3] {
        let keys = index_keys(conn);
        assert!(!keys.is_empty());
        assert_eq!(
            keys.iter().any(|k| k.ends_with(":meta")),
            compact,
            "{keys:?}"
        );
        let mut del = vec!["DEL"];
        del.extend(keys.iter().map(String::as_str));
        cmd::<i64>(conn, &del).unwrap();
    }
    // With no index in a DB, a read asks the bucket: every flow still answers its newest archive.
    for ((db, id), (spec, _)) in &want {
        let conn = if *db == 3 { &mut c3 } else { &mut c };
        let found = get(conn, id).unwrap();
        assert_eq!(found, Some(archived_state(&state_json(spec))), "{id}");
    }

    // A dry run says what it would write and writes nothing.
    let prefix = s3.prefix.clone();
    let (code, out, err) = rebuild(
        &srv,
        &["--dry-run", "--bucket", s3.name(), "--prefix", &prefix],
    );
    assert_eq!(code, 1, "{out}{err}");
    let expect = "objects=14 flows=9 written=8 present=0 live=1 unreferenced=1 bad=3";
    assert_eq!(summary(&out), expect, "{out}{err}");
    for (_, at) in want.values() {
        assert!(
            out.lines()
                .any(|l| l.starts_with("would write") && l.contains(at.as_str())),
            "{at} in {out}"
        );
    }
    assert!(index_keys(&mut c).is_empty() && index_keys(&mut c3).is_empty());

    // The rebuild: every archived flow at the location it was archived to, in the configured format.
    let (code, out, err) = rebuild(&srv, &[]);
    assert_eq!(code, 1, "skipped objects: {out}{err}");
    assert_eq!(summary(&out), expect, "{out}{err}");
    assert!(!out.contains("would write"), "{out}");
    let unreferenced = format!("unreferenced {prefix}/flows/late%3A1.jsonl.gz");
    assert!(out.lines().any(|l| l == unreferenced), "{out}");
    for bad in ["junk", "mismatch", "shifted.g2"] {
        let line = format!("bad {prefix}/flows/{bad}.jsonl.gz");
        assert!(out.lines().any(|l| l == line), "{line} in {out}");
    }
    assert!(
        err.contains("whose object key this is not")
            && err.contains("not gzip")
            && err.contains("header names generation 0, the key is of generation 2"),
        "{err}"
    );
    for ((db, id), (spec, at)) in &want {
        let conn = if *db == 3 { &mut c3 } else { &mut c };
        assert_eq!(location(conn, id).as_deref(), Some(at.as_str()), "{id}");
        let hashed: Option<String> = cmd(conn, &["HGET", INDEX, id]).unwrap();
        // A `_sha256` name the compact format cannot rebuild is in the hash whatever the format.
        let compact = compact && *id != named;
        assert_eq!(hashed.is_none(), compact, "{id} in the configured format");
        if compact {
            assert_eq!(
                compact_location(conn, INDEX, id).as_deref(),
                Some(at.as_str())
            );
        }
        let (state, events) = get_events(conn, id).unwrap();
        assert_eq!(state, archived_state(&state_json(spec)), "{id}");
        assert_eq!(events, events_of(spec), "{id}");
    }
    if compact {
        assert_eq!(compact_entries(&mut c, INDEX), 6);
        assert_eq!(cmd::<i64>(&mut c, &["HLEN", INDEX]).unwrap(), 1);
        assert_eq!(compact_entries(&mut c3, INDEX), 1);
        let buckets: String = cmd(&mut c, &["HGET", "archived:flows:meta", "buckets"]).unwrap();
        assert_eq!(buckets, "8");
    }
    // The reused id answers its newest incarnation, and the first one a step back.
    let (state, events): (String, Vec<String>) = cmd(
        &mut c,
        &["FLOWARCHIVE.GET", "again", "EVENTS", "PREVIOUS", "1"],
    )
    .unwrap();
    assert_eq!(state, archived_state(&state_json(&first)));
    assert_eq!(events, events_of(&first));
    let back: Option<String> = cmd(&mut c, &["FLOWARCHIVE.GET", "again", "PREVIOUS", "1"]).unwrap();
    assert_eq!(back, Some(archived_state(&state_json(&first))));
    assert!(first_at.ends_with("/flows/again.jsonl.gz"), "{first_at}");
    // The live flow: no entry, its keys as they were.
    assert_eq!(location(&mut c, "live-1"), None);
    let live_after: Vec<String> = cmd(&mut c, &["LRANGE", live_events, "0", "-1"]).unwrap();
    assert_eq!(live_after, live_before);
    assert_eq!(live_after, events_of(&live_again));
    // Nothing deleted from the bucket.
    assert_eq!(s3.list().len(), 14);

    // Idempotent: a second run finds every entry present and writes nothing.
    let before = (index_keys(&mut c), index_keys(&mut c3));
    let dump = dump_all(&mut c);
    let (code, out, err) = rebuild(&srv, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        summary(&out),
        "objects=14 flows=9 written=0 present=8 live=1 unreferenced=1 bad=3",
        "{out}{err}"
    );
    assert_eq!((index_keys(&mut c), index_keys(&mut c3)), before);
    assert_same(&dump, &dump_all(&mut c), "a second run");
}

/// An index restored from an old RDB: present entries are never overwritten, one naming an older
/// incarnation than the newest is reported as stale; a DB restricted with --db; an existing entry in
/// the other format counts as present. With nothing left to do the exit code is 0.
#[test]
fn rebuild_never_overwrites_and_reports_stale_entries() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["cache-bytes", "0", "index-buckets", "4"]);
    let mut c = srv.conn();
    for (id, events) in [("old", 3), ("old", 6), ("other", 4)] {
        write_flow(
            &mut c,
            &FlowSpec {
                events,
                ..FlowSpec::done(id)
            },
        );
        archive(&mut c, id).unwrap();
    }
    let newest: String = cmd(&mut c, &["HGET", INDEX, "old"]).unwrap();
    let oldest = s3.location("flows/old.jsonl.gz");
    assert_ne!(newest, oldest);
    // As an old RDB had it: "old" at its first incarnation, "other" not yet archived.
    cmd::<()>(&mut c, &["DEL", INDEX]).unwrap();
    cmd::<i64>(&mut c, &["HSET", INDEX, "old", &oldest]).unwrap();
    config_set(&mut c, "flowarchive.index-format", "compact").unwrap();
    let (code, out, err) = rebuild(&srv, &["--db", "0"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        summary(&out),
        "objects=3 flows=2 written=1 present=1 live=0 unreferenced=0 bad=0",
        "{out}{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("stale ") && l.contains(&oldest) && l.contains(&newest)),
        "{out}"
    );
    let kept: String = cmd(&mut c, &["HGET", INDEX, "old"]).unwrap();
    assert_eq!(kept, oldest, "never overwritten");
    assert_eq!(
        compact_entries(&mut c, INDEX),
        1,
        "other, in the compact format"
    );
    assert!(get(&mut c, "other").unwrap().is_some());

    // Once the operator points the entry at the newest incarnation, all is indexed: exit 0.
    cmd::<i64>(&mut c, &["HSET", INDEX, "old", &newest]).unwrap();
    let (code, out, err) = rebuild(&srv, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        summary(&out),
        "objects=3 flows=2 written=0 present=2 live=0 unreferenced=0 bad=0"
    );
    // The conversion mode still works beside it, and the rebuild finds the moved entry.
    let out = Command::new("python3")
        .arg(root().join("scripts/flowarchive-index"))
        .args(["--to", "compact"])
        .env("FLOWARCHIVE_PORT", srv.port.to_string())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("moved=1") && text.contains("left=0"),
        "{text}"
    );
    let (code, out, err) = rebuild(&srv, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("written=0 present=2"), "{out}");
    assert_eq!(compact_entries(&mut c, INDEX), 2);
    // Another bucket than the module's is refused by reads: the script says so.
    let (code, _, err) = rebuild(&srv, &["--bucket", "no-such-bucket-flowarchive"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("read-allow"), "{err}");
}

/// On a cluster the entries go to the per-slot index `<index-key>:{N}` on the primary that owns the
/// flow's slot, exactly where the commits had put them; a live flow gets none.
#[test]
fn rebuild_on_a_cluster_writes_per_slot_indexes_on_their_owners() {
    use common::cluster::{layout_args, tagged_keys, Cluster, TFlow};
    let s3 = S3::new_bucket();
    let mut args = s3.module_args(&s3_endpoint());
    args.extend(layout_args());
    args.extend(["cache-bytes", "0"].iter().map(|s| s.to_string()));
    let mut cluster = Cluster::start(Flavor::Valkey9, &args);
    let mut flows: Vec<TFlow> = (0..12)
        .map(|i| TFlow::done(format!("rb-{i}:x"), 5 + i % 3))
        .collect();
    flows.push(TFlow::done("rb-live", 5));
    let mut client = cluster.client();
    for f in &flows {
        f.write(&mut client);
    }
    for i in cluster.primaries() {
        cluster.sweep(i, &[]).unwrap();
    }
    // The last flow is started again: live, with an archived object of its id.
    let live = TFlow::done("rb-live", 6);
    let [events, _, _, labels] = tagged_keys(&live.id);
    redis::cmd("DEL")
        .arg(&events)
        .query::<i64>(&mut client)
        .unwrap();
    redis::cmd("DEL")
        .arg(&labels)
        .query::<i64>(&mut client)
        .unwrap();
    live.write(&mut client);
    *flows.last_mut().unwrap() = live;

    let primaries = cluster.primaries();
    let mut before = BTreeMap::new();
    for &p in &primaries {
        let mut entries = cluster.index_entries(p);
        for fields in entries.values_mut() {
            fields.remove("rb-live");
        }
        entries.retain(|_, fields| !fields.is_empty());
        let keys: Vec<String> = cluster.index_entries(p).into_keys().collect();
        for k in keys {
            cluster.on::<i64>(p, &["DEL", &k]).unwrap();
        }
        before.insert(p, entries);
    }
    assert_eq!(
        before.values().map(|e| e.len()).sum::<usize>(),
        12,
        "{before:?}"
    );
    // With no index on its node, a read of an archived flow asks the bucket.
    let found: Option<String> = redis::cmd("FLOWARCHIVE.GET")
        .arg(&flows[0].id)
        .query(&mut client)
        .unwrap();
    let live = flows[0].state();
    let archived = format!("{},\"archived\":true}}", &live[..live.len() - 1]);
    assert_eq!(found, Some(archived));

    let (code, out, err) = rebuild(&cluster.nodes[primaries[1]], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        summary(&out),
        "objects=13 flows=13 written=12 present=0 live=1 unreferenced=0 bad=0",
        "{out}{err}"
    );
    cluster.check(&flows);
    for &p in &primaries {
        assert_eq!(cluster.index_entries(p), before[&p], "node {p}");
    }
    let (code, out, err) = rebuild(&cluster.nodes[primaries[0]], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("written=0 present=12 live=1"), "{out}");
}
