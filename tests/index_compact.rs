//! The compact archive index (`index-format compact`): archives and reads through it, the same
//! conflict refusals in both formats, conversion in both directions by scripts/flowarchive-index while
//! flows are read, and the caller's ACL on its keys. The index is read back through
//! tests/common/index.rs, written from docs/FORMAT.md, not from the module's code.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::checker::{check, Expect, Model};
use common::index::{
    compact_entries, compact_entry, compact_location, convert_index as convert, INDEX,
};
use common::*;

const COMPACT: [&str; 4] = ["index-format", "compact", "index-buckets", "8"];

/// UUIDs, and ids the compact index keeps as they are (':' and braces, a 16-byte id, an uppercase UUID).
fn flow_ids(tag: &str) -> Vec<String> {
    let mut out: Vec<String> = (0..6)
        .map(|i| format!("{i:08x}-{tag}-4000-8000-00000000{i:04x}"))
        .collect();
    out.extend(
        [
            "run:{x}:step",
            "abcdef0123456789",
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
        ]
        .iter()
        .map(|s| format!("{tag}{s}")),
    );
    out
}

fn write_all(c: &mut redis::Connection, model: &mut Model, ids: &[String]) {
    for (i, id) in ids.iter().enumerate() {
        model.write(
            c,
            &FlowSpec {
                events: 3 + i % 4,
                ..FlowSpec::done(id)
            },
        );
    }
}

fn location_of(reply: &std::collections::HashMap<String, redis::Value>) -> String {
    text(&reply["location"])
}

fn exists(c: &mut redis::Connection, key: &str) -> bool {
    cmd::<i64>(c, &["EXISTS", key]).unwrap() == 1
}

#[test]
fn compact_index_archives_reads_and_refuses_like_the_hash() {
    archives_reads_and_refuses(Flavor::Valkey9);
}

/// Valkey 8 and Redis 7.0 keep small hashes as listpacks too: the same behaviour there.
#[test]
fn valkey8_compact_index_archives_reads_and_refuses_like_the_hash() {
    archives_reads_and_refuses(Flavor::Valkey8);
}

#[test]
fn redis7_compact_index_archives_reads_and_refuses_like_the_hash() {
    archives_reads_and_refuses(Flavor::Redis7);
}

fn archives_reads_and_refuses(flavor: Flavor) {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    opts.module_args
        .extend(COMPACT.iter().map(|a| a.to_string()));
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let mut model = Model::new(0);
    let ids = flow_ids("aaaa");
    write_all(&mut c, &mut model, &ids);
    let mut locations = BTreeMap::new();
    for id in &ids {
        let reply = archive(&mut c, id).unwrap();
        assert_eq!(int(&reply["already_archived"]), 0);
        locations.insert(id.clone(), location_of(&reply));
    }
    check("compact", &srv, &s3, &model, Expect::Either);
    assert!(!exists(&mut c, INDEX), "nothing in the hash format");
    assert_eq!(compact_entries(&mut c, INDEX), ids.len() as i64);
    for (id, location) in &locations {
        assert_eq!(
            compact_location(&mut c, INDEX, id).as_deref(),
            Some(location.as_str())
        );
    }
    // Canonical UUIDs in `u` buckets as 16 raw bytes, the rest in `s` buckets as they are.
    let keys: Vec<String> = cmd(&mut c, &["KEYS", "archived:flows:*"]).unwrap();
    assert!(keys.iter().any(|k| k.starts_with("archived:flows:u")));
    assert!(keys.iter().any(|k| k.starts_with("archived:flows:s")));
    let encoding: String = cmd(&mut c, &["OBJECT", "ENCODING", &keys[0]]).unwrap();
    assert_eq!(encoding, "listpack");

    // Archived already: the same location again, nothing uploaded twice.
    let objects = s3.list().len();
    let uuid = &ids[0];
    let again = archive(&mut c, uuid).unwrap();
    assert_eq!(int(&again["already_archived"]), 1);
    assert_eq!(location_of(&again), locations[uuid]);

    // The engine starts an archived id again: each new incarnation is archived at the next
    // generation, its entry replacing the last one in place (compact to compact, the entry count
    // unchanged) or moving it (compact to hash: the compact entry removed), and every earlier
    // incarnation stays readable through its successor.
    let revived = &ids[7];
    let entries = compact_entries(&mut c, INDEX);
    let mut generations = vec![locations[revived].clone()];
    for (format, g) in [("compact", 1), ("hash", 2)] {
        config_set(&mut c, "flowarchive.index-format", format).unwrap();
        let spec = FlowSpec {
            events: 5 + 2 * g,
            ..FlowSpec::done(revived)
        };
        write_flow(&mut c, &spec);
        let reply = archive(&mut c, revived).unwrap();
        let location = location_of(&reply);
        assert!(location.ends_with(&format!(".g{g}.jsonl.gz")), "{location}");
        generations.push(location);
        assert_eq!(
            get(&mut c, revived).unwrap(),
            Some(archived_state(&state_json(&spec))),
            "{format}"
        );
    }
    assert_eq!(
        compact_entries(&mut c, INDEX),
        entries - 1,
        "moved to the hash"
    );
    assert_eq!(compact_location(&mut c, INDEX, revived), None);
    assert_eq!(
        cmd::<Option<String>>(&mut c, &["HGET", INDEX, revived]).unwrap(),
        generations.last().cloned()
    );
    for back in 1..=2 {
        let n = back.to_string();
        let (state, events): (String, Vec<String>) = cmd(
            &mut c,
            &["FLOWARCHIVE.GET", revived, "EVENTS", "PREVIOUS", &n],
        )
        .unwrap();
        let spec = FlowSpec {
            events: [7, model.flows[revived].events.len()][back - 1],
            ..FlowSpec::done(revived)
        };
        assert_eq!(events.len(), spec.events, "{back} back");
        assert_eq!(state, archived_state(&state_json(&spec)), "{back} back");
    }
    assert_eq!(
        cmd::<Option<String>>(&mut c, &["FLOWARCHIVE.GET", revived, "PREVIOUS", "3"]).unwrap(),
        None
    );
    // From the hash format the archived flows are still found in the compact one.
    let again = archive(&mut c, uuid).unwrap();
    assert_eq!(location_of(&again), locations[uuid]);
    assert_eq!(int(&again["already_archived"]), 1);
    assert_eq!(s3.list().len(), objects + 2, "one object per incarnation");
    // A flow archived in the hash format is found from the compact format too.
    config_set(&mut c, "flowarchive.index-format", "hash").unwrap();
    let mut hashed = Model::new(0);
    let late = flow_ids("bbbb");
    write_all(&mut c, &mut hashed, &late[..2]);
    for id in &late[..2] {
        archive(&mut c, id).unwrap();
    }
    config_set(&mut c, "flowarchive.index-format", "compact").unwrap();
    let reply = archive(&mut c, &late[1]).unwrap();
    assert_eq!(int(&reply["already_archived"]), 1);
    let (_, events) = get_events(&mut c, &late[1]).unwrap();
    assert_eq!(events, hashed.flows[&late[1]].events);

    // A planted head is refused before any request, as a planted hash entry is.
    cmd::<i64>(
        &mut c,
        &["HSET", "archived:flows:meta", "h0", "s3://elsewhere/x/"],
    )
    .unwrap();
    let e = err_text(get(&mut c, &ids[3]));
    assert!(e.contains("not where flowarchive writes"), "{e}");
}

#[test]
fn conversion_both_ways_keeps_every_flow_readable() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["index-buckets", "8", "cache-bytes", "0"]);
    let mut c = srv.conn();
    let mut model = Model::new(0);
    let all: Vec<String> = ["cccc", "dddd", "eeee"]
        .iter()
        .flat_map(|t| flow_ids(t))
        .collect();
    write_all(&mut c, &mut model, &all);
    // Two thirds archived in the hash format, the rest after the switch in the compact one: both
    // formats hold entries while the conversion runs.
    for id in &all[..18] {
        archive(&mut c, id).unwrap();
    }
    config_set(&mut c, "flowarchive.index-format", "compact").unwrap();
    for id in &all[18..] {
        archive(&mut c, id).unwrap();
    }
    check("mixed", &srv, &s3, &model, Expect::Either);

    // A reader fetches every flow from S3 (no cache) and compares it event by event throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, port) = (stop.clone(), srv.port);
        let want: Vec<(String, Vec<String>)> = model
            .flows
            .values()
            .map(|f| (f.id.clone(), f.events.clone()))
            .collect();
        std::thread::spawn(move || {
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                .unwrap()
                .get_connection()
                .unwrap();
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) || reads < want.len() {
                let (id, events) = &want[reads % want.len()];
                let (_, got) = get_events(&mut c, id).unwrap_or_else(|e| panic!("{id}: {e}"));
                assert_eq!(&got, events, "{id}");
                reads += 1;
            }
            reads
        })
    };
    let (code, out) = convert(&srv, "compact", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("moved=18") && out.contains("left=0"), "{out}");
    assert!(!exists(&mut c, INDEX));
    check("compact", &srv, &s3, &model, Expect::Either);
    // Idempotent; and a user who may run neither CLUSTER SHARDS nor INFO converts a standalone server.
    let setuser = "ACL SETUSER conv on >pw ~* &* +@all -info -cluster|shards";
    cmd::<()>(&mut c, &setuser.split(' ').collect::<Vec<_>>()).unwrap();
    let user = [("FLOWARCHIVE_USER", "conv"), ("FLOWARCHIVE_PASSWORD", "pw")];
    let (code, out) = convert(&srv, "compact", &user);
    assert_eq!(code, 0, "idempotent: {out}");
    assert!(out.contains("moved=0"), "{out}");
    assert!(out.contains("no permission for INFO"), "{out}");

    config_set(&mut c, "flowarchive.index-format", "hash").unwrap();
    let (code, out) = convert(&srv, "hash", &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("moved={}", all.len())), "{out}");
    assert!(
        !exists(&mut c, "archived:flows:meta"),
        "the compact index is gone"
    );
    let keys: Vec<String> = cmd(&mut c, &["KEYS", "archived:flows:*"]).unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    check("hash again", &srv, &s3, &model, Expect::Either);
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() >= all.len());

    // A hash entry the compact format cannot rebuild stays where it is, and is counted.
    cmd::<i64>(&mut c, &["HSET", INDEX, "odd", "s3://elsewhere/odd.gz"]).unwrap();
    let (code, out) = convert(&srv, "compact", &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("kept=1") && out.contains("left=1"), "{out}");
    let odd: Option<String> = cmd(&mut c, &["HGET", INDEX, "odd"]).unwrap();
    assert_eq!(odd.as_deref(), Some("s3://elsewhere/odd.gz"));
}

#[test]
fn compact_index_keys_need_the_callers_acl() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &COMPACT);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("acl-1"));
    write_flow(&mut c, &FlowSpec::done("acl-2"));
    archive(&mut c, "acl-1").unwrap();
    // Rights on the flow's keys and the bare hash-format index, not on the compact keys.
    for (user, index) in [("narrow", "~archived:flows"), ("wide", "~archived:flows*")] {
        cmd::<()>(
            &mut c,
            &[
                "ACL",
                "SETUSER",
                user,
                "on",
                "nopass",
                "+@all",
                "~argyll:*",
                index,
            ],
        )
        .unwrap();
    }
    let as_user = |user: &str| {
        let mut u = srv.conn();
        cmd::<()>(&mut u, &["AUTH", user, "x"]).unwrap();
        u
    };
    let mut narrow = as_user("narrow");
    let e = err_text(archive(&mut narrow, "acl-2"));
    assert!(
        e.starts_with("NOPERM") && e.contains("archived:flows:"),
        "{e}"
    );
    let e = err_text(get(&mut narrow, "acl-1"));
    assert!(
        e.starts_with("NOPERM") && e.contains("archived:flows:"),
        "{e}"
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:acl-2:events"]).unwrap(),
        1,
        "nothing deleted"
    );
    let mut wide = as_user("wide");
    archive(&mut wide, "acl-2").unwrap();
    assert!(get(&mut wide, "acl-1")
        .unwrap()
        .unwrap()
        .contains("\"archived\":true"));

    // In the hash format a caller needs no rights on the compact keys while none exist.
    config_set(&mut c, "flowarchive.index-format", "hash").unwrap();
    write_flow(&mut c, &FlowSpec::done("acl-3"));
    let e = err_text(archive(&mut narrow, "acl-3"));
    assert!(e.starts_with("NOPERM"), "compact entries exist here: {e}");
    let fresh = S3::new_bucket();
    let plain = server_via(&fresh, None, &[]);
    let mut p = plain.conn();
    cmd::<()>(
        &mut p,
        &[
            "ACL",
            "SETUSER",
            "narrow",
            "on",
            "nopass",
            "+@all",
            "~argyll:*",
            "~archived:flows",
        ],
    )
    .unwrap();
    write_flow(&mut p, &FlowSpec::done("acl-4"));
    let mut n = plain.conn();
    cmd::<()>(&mut n, &["AUTH", "narrow", "x"]).unwrap();
    archive(&mut n, "acl-4").unwrap();
    assert!(get(&mut n, "acl-4").unwrap().is_some());
    assert_eq!(get(&mut n, "never").unwrap(), None);
}

#[test]
fn cluster_compact_keys_sit_in_the_flows_slot_and_convert_per_primary() {
    use common::cluster::{layout_args, slot_index_key, slot_of, Cluster, TFlow};
    let s3 = S3::new_bucket();
    let mut args = s3.module_args(&s3_endpoint());
    args.extend(layout_args());
    args.extend(COMPACT.iter().map(|s| s.to_string()));
    let mut cluster = Cluster::start(Flavor::Valkey9, &args);
    let flows: Vec<TFlow> = flow_ids("ffff")
        .into_iter()
        .filter(|id| !id.contains('{'))
        .map(|id| TFlow::done(id, 4))
        .collect();
    let mut client = cluster.client();
    for f in &flows {
        f.write(&mut client);
    }
    for i in cluster.primaries() {
        cluster.sweep(i, &[]).unwrap();
    }
    let read_all = |client: &mut redis::cluster::ClusterConnection, what: &str| {
        for f in &flows {
            let (_, events): (String, Vec<String>) = redis::cmd("FLOWARCHIVE.GET")
                .arg(&f.id)
                .arg("EVENTS")
                .query(client)
                .unwrap_or_else(|e| panic!("{what}: {}: {e}", f.id));
            assert_eq!(events, f.event_list(), "{what}: {}", f.id);
        }
    };
    read_all(&mut client, "compact");
    // Every compact key of a flow is in the flow's slot, on the node that serves it: 1 bucket per slot
    // (8 buckets over 16384 slots).
    for f in &flows {
        let base = slot_index_key(slot_of(&f.id));
        let owner = cluster.owner(slot_of(&f.id));
        let location = compact_location(&mut cluster.conn(owner), &base, &f.id);
        assert!(location.is_some(), "{} on node {owner}", f.id);
        for key in [format!("{base}:meta"), compact_entry(&base, 1, &f.id).0] {
            let slot: i64 = cluster.on(owner, &["CLUSTER", "KEYSLOT", &key]).unwrap();
            assert_eq!(slot, slot_of(&f.id) as i64);
        }
    }
    for i in cluster.primaries() {
        let set = ["CONFIG", "SET", "flowarchive.index-format", "hash"];
        cluster.on::<()>(i, &set).unwrap();
    }
    let port = cluster.nodes[0].port.to_string();
    let run_script = |to: &str, user: &[(&str, &str)]| {
        let out = Command::new("python3")
            .arg(root().join("scripts/flowarchive-index"))
            .args(["--to", to])
            .env("FLOWARCHIVE_PORT", &port)
            .envs(user.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (
            out.status.code(),
            text,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let convert_cluster = |to: &str| {
        let (code, out, err) = run_script(to, &[]);
        assert_eq!(code, Some(0), "{out}{err}");
        out
    };
    // A user who may not list the shards converts the node it names, as a cluster node (its per-slot
    // indexes), and is told the other primaries were not looked at.
    let setuser = "ACL SETUSER conv on >pw ~* &* +@all -cluster|shards";
    cluster
        .on::<()>(0, &setuser.split(' ').collect::<Vec<_>>())
        .unwrap();
    let on_first = flows
        .iter()
        .filter(|f| cluster.owner(slot_of(&f.id)) == 0)
        .count();
    assert!(on_first > 0 && on_first < flows.len());
    let user = [("FLOWARCHIVE_USER", "conv"), ("FLOWARCHIVE_PASSWORD", "pw")];
    let (code, out, err) = run_script("hash", &user);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains(&format!("moved={on_first}")), "{out}");
    assert!(err.contains("+cluster|shards"), "{err}");
    let out = convert_cluster("hash");
    let rest = flows.len() - on_first;
    assert!(out.contains(&format!("moved={rest}")), "{out}");
    read_all(&mut client, "hash");
    for f in &flows {
        let owner = cluster.owner(slot_of(&f.id));
        let at: Option<String> = cluster
            .on(owner, &["HGET", &slot_index_key(slot_of(&f.id)), &f.id])
            .unwrap();
        assert!(at.is_some(), "{} in the per-slot hash", f.id);
    }
    // A user who may run neither CLUSTER SHARDS nor INFO: the node's per-slot indexes show it is a
    // cluster node; they are converted, and the exit code says the other primaries were not.
    let setuser = "ACL SETUSER blind on >pw ~* &* +@all -info -cluster|shards";
    cluster
        .on::<()>(0, &setuser.split(' ').collect::<Vec<_>>())
        .unwrap();
    let blind = [
        ("FLOWARCHIVE_USER", "blind"),
        ("FLOWARCHIVE_PASSWORD", "pw"),
    ];
    let (code, out, err) = run_script("compact", &blind);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains(&format!("moved={on_first}")), "{out}");
    assert!(err.contains("it holds per-slot indexes"), "{err}");
    let out = convert_cluster("compact");
    assert!(out.contains(&format!("moved={rest}")), "{out}");
    read_all(&mut client, "compact again");
}

#[test]
fn the_commit_refuses_a_flow_indexed_meanwhile_in_either_format() {
    let s3 = S3::new_bucket();
    let proxy = common::proxy::Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &COMPACT);
    let mut other = srv.conn();
    let head = format!("s3://{}/{}/", s3.name(), s3.prefix);
    for (configured, id) in [
        ("compact", "0f8fad5b-d9cb-469f-a165-70867728950e"),
        ("hash", "meanwhile:{x}"),
    ] {
        config_set(&mut other, "flowarchive.index-format", configured).unwrap();
        write_flow(&mut other, &FlowSpec::done(id));
        proxy.hold("PUT");
        let mut c = srv.conn();
        let flow = id.to_string();
        let handle = std::thread::spawn(move || archive(&mut c, &flow));
        wait_for("the PUT held", std::time::Duration::from_secs(120), || {
            proxy.gated() > 0
        });
        // Another writer indexes the flow in the format the commit does not write.
        let planted = format!("{head}flows/elsewhere.jsonl.gz");
        if configured == "compact" {
            cmd::<i64>(&mut other, &["HSET", INDEX, id, &planted]).unwrap();
        } else {
            let (bucket, field) = compact_entry(INDEX, 8, id);
            let meta = format!("{INDEX}:meta");
            cmd::<i64>(
                &mut other,
                &["HSET", &meta, "buckets", "8", "h0", &head, "entries", "1"],
            )
            .unwrap();
            redis::cmd("HSET")
                .arg(&bucket)
                .arg(&field)
                .arg(0)
                .query::<i64>(&mut other)
                .unwrap();
        }
        proxy.release();
        let e = err_text(handle.join().unwrap());
        assert!(
            e.contains("by another archive meanwhile"),
            "{configured}: {e}"
        );
        let events = format!("argyll:flow:{id}:events");
        assert!(exists(&mut other, &events), "{configured}: nothing deleted");
    }
}

/// The commit checks the index key its object is recorded in, whatever `object-name-max` says by
/// then: a flow whose name passed the limit is stored under its `_sha256` name, which the compact
/// index records in the hash; the limit raised during its upload, the hash is still checked at
/// commit (here for the TTL it was given meanwhile), and the flow is kept whole.
#[test]
fn the_commit_checks_where_its_object_is_recorded_after_the_name_limit_changes() {
    let s3 = S3::new_bucket();
    let proxy = common::proxy::Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &COMPACT);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("first"));
    archive(&mut c, "first").unwrap();
    let long = "a".repeat(250);
    write_flow(&mut c, &FlowSpec::done(&long));
    cmd::<i64>(
        &mut c,
        &["HSET", INDEX, "other", "s3://elsewhere/other.jsonl.gz"],
    )
    .unwrap();
    let before = dump_all(&mut c);
    let (_, answer) = held_upload_in(&srv, &proxy, 0, &long, |c| {
        cmd::<i64>(c, &["EXPIRE", INDEX, "3600"]).unwrap();
        config_set(c, "flowarchive.object-name-max", "1024").unwrap();
    });
    let e = err_text(answer);
    assert!(
        e.contains("TTL") && e.contains("nothing was deleted"),
        "{e}"
    );
    assert_same(&before, &dump_all(&mut c), "the flow and the index");
    // Without the TTL, and under a limit the store takes, the same flow is archived under its
    // `_sha256` name, recorded in the hash.
    cmd::<i64>(&mut c, &["PERSIST", INDEX]).unwrap();
    config_set(&mut c, "flowarchive.object-name-max", "255").unwrap();
    let location = location_of(&archive(&mut c, &long).unwrap());
    assert!(location.contains("/_sha256/"), "{location}");
    let recorded: Option<String> = cmd(&mut c, &["HGET", INDEX, &long]).unwrap();
    assert_eq!(recorded.as_deref(), Some(location.as_str()));
}
