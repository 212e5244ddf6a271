//! The safety promises against real servers: ACLs, MODULE UNLOAD, paused and demoted primaries,
//! all-or-nothing commits, bounded errors, threads and main-thread steps, the cluster guard.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::checker::{self, repl_field};
use common::proxy::Proxy;
use common::*;

fn conn_as(srv: &Server, user: &str) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{user}:pw@127.0.0.1:{}/", srv.port)).unwrap();
    client.get_connection().unwrap()
}

/// Runs an ACL command written as one line, its words split on spaces.
fn acl(c: &mut redis::Connection, line: &str) {
    cmd::<()>(c, &line.split(' ').collect::<Vec<_>>()).unwrap();
}

/// A server whose DB 3 holds the archived flow `secret`, and a user `confined` to DB 0 who has planted
/// DB 3's location for `secret` in DB 0's index (anyone who may write the index can): the server, a
/// connection of the default user (every DB) and one of `confined`.
fn planted_from_db3(s3: &S3) -> (Server, redis::Connection, redis::Connection) {
    let srv = Server::start(ServerOpts::new(s3));
    let mut admin = srv.conn();
    let mut db3 = srv.conn();
    cmd::<()>(&mut db3, &["SELECT", "3"]).unwrap();
    write_flow(&mut db3, &FlowSpec::done("secret"));
    archive(&mut db3, "secret").unwrap();
    let location: String = cmd(&mut db3, &["HGET", "archived:flows", "secret"]).unwrap();
    acl(
        &mut admin,
        "ACL SETUSER confined on >pw +@all ~* resetdbs db=0",
    );
    let mut confined = conn_as(&srv, "confined");
    assert!(cmd::<()>(&mut confined, &["SELECT", "3"]).is_err());
    let plant = ["HSET", "archived:flows", "secret", &location];
    cmd::<()>(&mut confined, &plant).unwrap();
    (srv, admin, confined)
}

/// Names of the server's threads that belong to the module.
fn module_threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("flowarchive"))
        .collect()
}

/// A sweep that selects by SCAN (no status ZSET) judges a flow by its status hash only for a caller who
/// may read that hash: for one who may not, every flow it finds is a candidate its capture refuses, so
/// what a flow is counted as tells nothing of what the hash holds.
#[test]
fn a_scan_selection_reads_no_status_hash_its_caller_may_not_read() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &[]);
    let mut admin = srv.conn();
    config_set(&mut admin, "flowarchive.status-set-key", "").unwrap();
    write_flow(&mut admin, &FlowSpec::done("done"));
    let running = FlowSpec {
        status: "active",
        ..FlowSpec::done("running")
    };
    write_flow(&mut admin, &running);
    let rule =
        "ACL SETUSER blind on >pw +@all ~argyll:flow:* ~archived:* %R~argyll:archive:lease:*";
    acl(&mut admin, rule);
    let before = dump_all(&mut admin);
    let swept = sweep(&mut conn_as(&srv, "blind"), &[]).unwrap();
    assert_eq!(int(&swept["archived"]), 0, "{swept:?}");
    assert_eq!(int(&swept["skipped_noperm"]), 2, "{swept:?}");
    assert_same(
        &before,
        &dump_all(&mut admin),
        "nothing touched for `blind`",
    );
    // Judged by its status hash, the running flow is not a candidate at all.
    let swept = sweep(&mut admin, &[]).unwrap();
    assert_eq!(int(&swept["archived"]), 1, "{swept:?}");
    assert_eq!(int(&swept["skipped_noperm"]), 0, "{swept:?}");
}

/// An index entry naming another DB's object (as SWAPDB leaves them, or as anyone who may write the
/// index can plant one) is answered only to a caller who may read the flow's keys in that DB too: on
/// Valkey 9.1 a user confined to DB 0 who plants DB 3's location for an id is refused, where it read
/// DB 3's flow; a user of every DB reads it.
#[test]
fn an_entry_naming_another_db_is_answered_only_to_a_caller_allowed_there() {
    let s3 = S3::new_bucket();
    let (_srv, mut admin, mut confined) = planted_from_db3(&s3);
    let e = err_text(get(&mut confined, "secret"));
    assert!(e.starts_with("NOPERM"), "{e}");
    assert_eq!(
        cmd::<i32>(&mut confined, &["HLEN", "archived:flows"]).unwrap(),
        1,
        "still in DB 0"
    );
    assert!(
        get(&mut admin, "secret").unwrap().is_some(),
        "a user of every DB"
    );
}

/// The same holds along a chain of incarnations: an entry planted before an archive of the same id
/// is recorded by that archive as its predecessor, and `PREVIOUS` reaches it only for a caller allowed
/// in the DB it names, fetched or cached.
#[test]
fn an_earlier_incarnation_in_another_db_is_answered_only_to_a_caller_allowed_there() {
    let s3 = S3::new_bucket();
    let (_srv, mut admin, mut confined) = planted_from_db3(&s3);
    // Its own flow of that id, archived: the planted entry is recorded as its predecessor.
    let own = FlowSpec {
        events: 7,
        ..FlowSpec::done("secret")
    };
    write_flow(&mut confined, &own);
    archive(&mut confined, "secret").unwrap();
    assert_eq!(
        get_events(&mut confined, "secret").unwrap().1,
        events_of(&own)
    );
    let previous = |c: &mut redis::Connection| {
        cmd::<Option<String>>(c, &["FLOWARCHIVE.GET", "secret", "PREVIOUS", "1"])
    };
    let e = err_text(previous(&mut confined));
    assert!(e.starts_with("NOPERM"), "fetched: {e}");
    assert!(
        previous(&mut admin).unwrap().is_some(),
        "a user of every DB"
    );
    let e = err_text(previous(&mut confined));
    assert!(e.starts_with("NOPERM"), "cached: {e}");
}

/// A client keeps the DB it selected when its user loses that DB (`ACL SETUSER … resetdbs`), or when
/// it authenticates as a user confined elsewhere after a `SELECT`; the server refuses it every key
/// command there, and the module too: no read, no archive, and a sweep skips every flow (Valkey 9.1).
#[test]
fn a_client_whose_user_may_not_use_its_selected_db_is_refused_there() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut admin = srv.conn();
    let mut db3 = srv.conn();
    cmd::<()>(&mut db3, &["SELECT", "3"]).unwrap();
    for id in ["archived", "live", "victim"] {
        write_flow(&mut db3, &FlowSpec::done(id));
    }
    archive(&mut db3, "archived").unwrap();
    acl(&mut admin, "ACL SETUSER moved on >pw +@all ~*");
    let mut moved = conn_as(&srv, "moved");
    cmd::<()>(&mut moved, &["SELECT", "3"]).unwrap();
    assert!(
        get(&mut moved, "archived").unwrap().is_some(),
        "allowed in DB 3"
    );
    acl(&mut admin, "ACL SETUSER moved resetdbs db=0");
    let mut authed = srv.conn();
    cmd::<()>(&mut authed, &["SELECT", "3"]).unwrap();
    cmd::<()>(&mut authed, &["AUTH", "moved", "pw"]).unwrap();
    let before = dump_all(&mut db3);
    for c in [&mut moved, &mut authed] {
        let e = err_text(cmd::<Option<String>>(
            c,
            &["HGET", "archived:flows", "archived"],
        ));
        assert!(e.contains("NOPERM"), "the server's own refusal: {e}");
        for e in [
            err_text(get(c, "archived")),
            err_text(get(c, "live")),
            err_text(archive(c, "victim")),
        ] {
            assert!(e.starts_with("NOPERM") && e.contains("database 3"), "{e}");
        }
        let swept = sweep(c, &[]).unwrap();
        assert_eq!(int(&swept["archived"]), 0, "{swept:?}");
        assert_eq!(int(&swept["skipped_noperm"]), 2, "{swept:?}");
    }
    assert_same(
        &before,
        &dump_all(&mut db3),
        "nothing archived or deleted in DB 3",
    );
}

/// Under `state snapshot` a read shows the snapshot, and the event log for `EVENTS`: a user who may
/// read the snapshot and the index but not the log is refused `EVENTS` of an archived flow, as of a
/// live one, and answered its state.
#[test]
fn under_state_snapshot_archived_events_need_the_right_to_read_the_log() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args
        .extend(["state".to_string(), "snapshot".to_string()]);
    let srv = Server::start(opts);
    let mut admin = srv.conn();
    let spec = FlowSpec {
        snapshot: Snapshot::Current,
        ..FlowSpec::done("snap")
    };
    write_flow(&mut admin, &spec);
    let rule = "ACL SETUSER snapper on >pw +@all %R~argyll:flow:*:snapshot:val %R~archived:*";
    acl(&mut admin, rule);
    let mut snapper = conn_as(&srv, "snapper");
    for archived in [false, true] {
        if archived {
            archive(&mut admin, "snap").unwrap();
        }
        let e = err_text(get_events(&mut snapper, "snap"));
        assert!(
            e.starts_with("NOPERM") && e.contains("events"),
            "archived {archived}: {e}"
        );
        assert!(
            get(&mut snapper, "snap").unwrap().is_some(),
            "archived {archived}"
        );
    }
}

#[test]
fn acl_users_touch_only_the_keys_they_may() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &[]);
    let mut admin = srv.conn();
    for id in ["tenantA-1", "tenantA-2", "other-1"] {
        write_flow(&mut admin, &FlowSpec::done(id));
    }
    // `narrow` sees only its own namespace; `tenant` may touch the engine's shared indexes, the
    // archive index and tenant A's flows.
    for rule in [
        &[
            "ACL",
            "SETUSER",
            "narrow",
            "on",
            ">pw",
            "+@all",
            "~tenantA:*",
        ][..],
        &[
            "ACL",
            "SETUSER",
            "tenant",
            "on",
            ">pw",
            "+@all",
            "~argyll:idx:*",
            "~archived:*",
            "~argyll:flow:tenantA-*",
            // Whether the engine's own archiver holds a flow is read, never written.
            "%R~argyll:archive:lease:*",
        ],
    ] {
        cmd::<()>(&mut admin, rule).unwrap();
    }
    let before = dump_all(&mut admin);

    let mut narrow = conn_as(&srv, "narrow");
    for e in [
        err_text(get(&mut narrow, "other-1")),
        err_text(
            redis::cmd("FLOWARCHIVE.FLOW")
                .arg("other-1")
                .arg("FORCE")
                .query::<redis::Value>(&mut narrow),
        ),
        err_text(sweep(&mut narrow, &[])),
        err_text(sweep(&mut narrow, &["DRYRUN"])),
    ] {
        assert!(e.starts_with("NOPERM"), "{e}");
    }
    assert_same(
        &before,
        &dump_all(&mut admin),
        "nothing touched for `narrow`",
    );

    let mut tenant = conn_as(&srv, "tenant");
    let e = err_text(
        redis::cmd("FLOWARCHIVE.FLOW")
            .arg("other-1")
            .query::<redis::Value>(&mut tenant),
    );
    assert!(e.starts_with("NOPERM") && e.contains("other-1"), "{e}");
    assert!(err_text(get(&mut tenant, "other-1")).starts_with("NOPERM"));
    let dry = sweep(&mut tenant, &["DRYRUN"]).unwrap();
    let listed: BTreeSet<String> = redis::from_redis_value(&dry["flows"]).unwrap();
    assert_eq!(
        listed,
        BTreeSet::from(["tenantA-1".to_string(), "tenantA-2".to_string()])
    );
    assert_eq!(int(&dry["skipped_noperm"]), 1);
    let done = sweep(&mut tenant, &[]).unwrap();
    assert_eq!(int(&done["archived"]), 2);
    assert_eq!(int(&done["skipped_noperm"]), 1);
    assert_eq!(info_field(&mut admin, "last_sweep_skipped_noperm"), 1);
    assert_eq!(
        cmd::<i64>(&mut admin, &["EXISTS", "argyll:flow:other-1:events"]).unwrap(),
        1,
        "the flow `tenant` may not write stays live"
    );
    // Reads of its own archived flows work; the admin reads everything.
    assert!(get(&mut tenant, "tenantA-1").unwrap().is_some());
    assert!(get(&mut admin, "other-1").unwrap().is_some());
}

/// The commit asks the caller's rights again: rights taken away while its flow uploads refuse the
/// commit, and nothing is deleted.
#[test]
fn rights_taken_away_during_the_upload_refuse_the_commit() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut admin = srv.conn();
    write_flow(&mut admin, &FlowSpec::done("wide-1"));
    set_user(&mut admin, "wide", &["+@all", "~*"]);
    let before = dump_all(&mut admin);
    proxy.hold("PUT");
    let mut wide = conn_as(&srv, "wide");
    let sweeping = std::thread::spawn(move || sweep(&mut wide, &[]));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    // The flow's own keys and the engine's indexes stay allowed; the archive index no longer is.
    set_user(&mut admin, "wide", &["resetkeys", "~argyll:*"]);
    proxy.release();
    let done = sweeping.join().unwrap().unwrap();
    assert_eq!(int(&done["archived"]), 0, "{done:?}");
    assert_eq!(int(&done["skipped_noperm"]), 1, "{done:?}");
    assert_same(&before, &dump_all(&mut admin), "nothing deleted");

    // Given every key again, the same user archives it.
    set_user(&mut admin, "wide", &["~*"]);
    let done = sweep(&mut conn_as(&srv, "wide"), &[]).unwrap();
    assert_eq!(int(&done["archived"]), 1, "{done:?}");
    assert_eq!(
        cmd::<i64>(&mut admin, &["EXISTS", "argyll:flow:wide-1:events"]).unwrap(),
        0
    );
}

/// A flow with many labels checks dozens of keys with one access (its own keys, its status entries and
/// two label index keys per label) and one key each with the others, so the stand-in's counts run
/// from 1 to past 10 (3 labels) and past 100 (50 labels) in one command. Every key of such a group is
/// checked with the others: a selector that allows all but one label index key (which the root allows
/// alone) refuses the archive naming that key, whether it is the last key checked or one in the
/// middle, at capture and, taken away during the upload, at commit; allowed every key, the user
/// archives both flows.
#[test]
fn every_key_of_a_group_of_many_is_checked_with_the_others() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut admin = srv.conn();
    let names: Vec<(String, String)> = (0..50)
        .map(|i| (format!("k{i:02}"), format!("v{i:02}")))
        .collect();
    let labels: Vec<(&str, &str)> = names.iter().map(|(l, v)| (&l[..], &v[..])).collect();
    for (id, n) in [("few", 3), ("many", 50)] {
        let spec = FlowSpec {
            labels: &labels[..n],
            ..FlowSpec::done(id)
        };
        write_flow(&mut admin, &spec);
    }
    // Every key the archives touch under one selector, but the set of label `forbidden`'s value.
    let selector = |forbidden: Option<usize>| {
        let mut rules: Vec<String> = [
            "+@all",
            FLOW_KEYS,
            "~argyll:idx:status*",
            ENGINE_KEYS[1],
            INDEX_KEYS,
        ]
        .map(String::from)
        .to_vec();
        for i in 0..labels.len() {
            rules.push(format!("~argyll:idx:label:k{i:02}"));
            if Some(i) != forbidden {
                rules.push(format!("~argyll:idx:label:k{i:02}:*"));
            }
        }
        format!("({})", rules.join(" "))
    };
    let allow = |admin: &mut redis::Connection, forbidden: Option<usize>| {
        cmd::<()>(
            admin,
            &[
                "ACL",
                "SETUSER",
                "labels",
                "clearselectors",
                &selector(forbidden),
            ],
        )
        .unwrap();
    };
    set_user(
        &mut admin,
        "labels",
        &[
            "+@all",
            "~argyll:idx:label:k02:*",
            "~argyll:idx:label:k49:*",
        ],
    );
    let mut c = conn_as(&srv, "labels");
    let refused = |c: &mut redis::Connection, id: &str, key: &str| {
        let e = err_text(archive(c, id));
        assert!(
            e.starts_with("NOPERM") && e.contains("no single ACL selector") && e.contains(key),
            "{id}, {key}: {e}"
        );
    };
    let before = dump_all(&mut admin);
    // The last label of the few, the last key checked of them and one in the middle of the many.
    allow(&mut admin, Some(2));
    refused(&mut c, "few", "argyll:idx:label:k02:v02");
    refused(&mut c, "many", "argyll:idx:label:k02:v02");
    // The last label of the many, the last key checked of them.
    allow(&mut admin, Some(49));
    refused(&mut c, "many", "argyll:idx:label:k49:v49");
    assert_same(&before, &dump_all(&mut admin), "nothing deleted");
    archive(&mut c, "few").unwrap();

    // Allowed at capture, taken away during the upload: refused by the commit's check.
    allow(&mut admin, None);
    let before = dump_all(&mut admin);
    proxy.hold("PUT");
    let mut uploading = conn_as(&srv, "labels");
    let flow = std::thread::spawn(move || archive(&mut uploading, "many"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    allow(&mut admin, Some(49));
    proxy.release();
    let e = err_text(flow.join().unwrap());
    assert!(
        e.starts_with("NOPERM") && e.contains("argyll:idx:label:k49:v49"),
        "{e}"
    );
    assert_same(&before, &dump_all(&mut admin), "nothing deleted");

    allow(&mut admin, None);
    archive(&mut c, "many").unwrap();
    for id in ["few", "many"] {
        let events = format!("argyll:flow:{id}:events");
        assert_eq!(cmd::<i64>(&mut admin, &["EXISTS", &events]).unwrap(), 0);
        assert!(get(&mut c, id).unwrap().is_some(), "{id}");
    }
}

/// `conn_as` in DB `db`.
fn conn_in(srv: &Server, user: &str, db: u8) -> redis::Connection {
    let url = format!("redis://{user}:pw@127.0.0.1:{}/{db}", srv.port);
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// The ACL rules of the users the selector tests log in as: the keys an archive touches (the flow's
/// own keys, the engine's indexes, the archiver's lease, the archive index) spread over the root
/// permissions and a `( ... )` selector.
const FLOW_KEYS: &str = "~argyll:flow:*";
const ENGINE_KEYS: [&str; 2] = ["~argyll:idx:*", "%R~argyll:archive:lease:*"];
const INDEX_KEYS: &str = "~archived:*";

fn set_user(admin: &mut redis::Connection, name: &str, rules: &[&str]) {
    let mut args = vec!["ACL", "SETUSER", name, "on", ">pw"];
    args.extend(rules);
    cmd::<()>(admin, &args).unwrap();
}

/// Whether the server itself lets `c`'s user run one multi-key command over `read` and `write` keys:
/// `EXISTS` for reads, `EVAL` declaring its keys for writes (nothing is run).
fn server_allows(c: &mut redis::Connection, read: &[&str], write: &[&str]) -> bool {
    let exists = read.is_empty() || cmd::<i64>(c, &[&["EXISTS"], read].concat()).is_ok();
    let n = write.len().to_string();
    let eval = write.is_empty()
        || cmd::<Option<String>>(c, &[&["EVAL", "return nil", n.as_str()], write].concat()).is_ok();
    exists && eval
}

/// Users whose permissions allow every key of an archive, but not under one selector, archive and read
/// nothing: the module checks an archive's keys (and a read's) as the server checks one command's.
fn archives_need_one_selector_for_all_their_keys(flavor: Flavor) {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    let srv = Server::start(opts);
    let mut admin = srv.conn();
    for id in ["done-1", "done-2", "old"] {
        write_flow(&mut admin, &FlowSpec::done(id));
    }
    archive(&mut admin, "old").unwrap();
    let [idx, lease] = ENGINE_KEYS;
    let index_apart = format!("(+@all {INDEX_KEYS})");
    let flow_apart = format!("(+@all {FLOW_KEYS})");
    let all = format!("(+@all {FLOW_KEYS} {idx} {lease} {INDEX_KEYS})");
    // The index allowed by a selector, the rest by the root; the reverse; all by one selector.
    set_user(
        &mut admin,
        "index-apart",
        &["+@all", FLOW_KEYS, idx, lease, &index_apart],
    );
    set_user(
        &mut admin,
        "flow-apart",
        &["+@all", INDEX_KEYS, idx, lease, &flow_apart],
    );
    set_user(&mut admin, "together", &["+@all", "~unrelated:*", &all]);

    let events = "argyll:flow:done-1:events";
    let state = [
        events,
        "argyll:flow:old:events",
        "argyll:flow:old:snapshot:val",
    ];
    let status = "argyll:idx:status:completed";
    let before = dump_all(&mut admin);
    for user in ["index-apart", "flow-apart"] {
        let mut c = conn_as(&srv, user);
        // The server: every key alone, never the flow's keys with the index in one command.
        for key in [events, status, "archived:flows"] {
            assert!(server_allows(&mut c, &[key], &[key]), "{user}: {key}");
        }
        assert!(
            !server_allows(&mut c, &[], &[events, "archived:flows"]),
            "{user}"
        );
        assert!(
            !server_allows(&mut c, &[events, "archived:flows"], &[]),
            "{user}"
        );
        let e = err_text(
            redis::cmd("COPY")
                .arg(events)
                .arg("archived:copy")
                .query::<i64>(&mut c),
        );
        assert!(e.starts_with("NOPERM"), "{user}: {e}");

        // The module refuses alike: FLOW, SWEEP (and its DRYRUN) and the read of an archived flow.
        refused_by_no_single_selector(&mut c, user);
        for args in [&["DRYRUN"][..], &[]] {
            let summary = sweep(&mut c, args).unwrap();
            assert_eq!(int(&summary["archived"]), 0, "{user} {args:?}");
            assert_eq!(int(&summary["skipped_noperm"]), 2, "{user} {args:?}");
        }
        assert!(!server_allows(
            &mut c,
            &["archived:flows", state[1], state[2]],
            &[]
        ));
        let e = err_text(get(&mut c, "old"));
        assert!(e.starts_with("NOPERM"), "{user}: {e}");
        // A live flow's read touches its own keys only, which one selector allows: as for the server.
        assert!(server_allows(&mut c, &state[..1], &[]));
        assert!(get(&mut c, "done-1").unwrap().is_some(), "{user}");
        assert_same(&before, &dump_all(&mut admin), user);
    }

    every_key_by_a_root_without_commands(&srv, &mut admin);

    let mut c = conn_as(&srv, "together");
    assert!(server_allows(
        &mut c,
        &state,
        &[events, "archived:flows", status]
    ));
    assert!(get(&mut c, "old").unwrap().is_some());
    let done = archive(&mut c, "done-1").unwrap();
    assert!(text(&done["location"]).ends_with("done-1.jsonl.gz"));
    let swept = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&swept["archived"]), 1);
    assert_eq!(int(&swept["skipped_noperm"]), 0);
    for id in ["done-1", "done-2"] {
        let live = format!("argyll:flow:{id}:events");
        assert_eq!(cmd::<i64>(&mut admin, &["EXISTS", &live]).unwrap(), 0);
        assert!(get(&mut c, id).unwrap().is_some());
    }
    // The stand-in the module checks keys through does nothing for a client.
    let e = err_text(cmd::<()>(
        &mut c,
        &["FLOWARCHIVE.ACLCHECK", "ADD", "1", "archived:flows"],
    ));
    assert!(e.contains("not for clients"), "{e}");
    assert_eq!(
        cmd::<Vec<String>>(&mut admin, &["HKEYS", "archived:flows"])
            .unwrap()
            .len(),
        3
    );

    granted_one_by_one(&srv, &mut admin);
    if flavor == Flavor::Valkey9 {
        dbs_count_per_selector(&srv, &mut admin);
    }
}

/// `FLOWARCHIVE.FLOW done-1 FORCE` by `user` answers NOPERM: no single selector allows all its keys.
fn refused_by_no_single_selector(c: &mut redis::Connection, user: &str) {
    let e = err_text(
        redis::cmd("FLOWARCHIVE.FLOW")
            .arg("done-1")
            .arg("FORCE")
            .query::<redis::Value>(c),
    );
    assert!(
        e.starts_with("NOPERM") && e.contains("no single ACL selector"),
        "{user}: {e}"
    );
}

/// A root that allows every key (`~*`) but grants no command, and a selector that grants the commands
/// on the flow's keys only: every key is allowed alone, and none of the archive's keys beyond the
/// flow's own together with the commands. FLOW and SWEEP refuse, as the server would refuse the one
/// command; nothing changes. (The module takes a user's keys as all allowed only where its root is its
/// one selector.)
fn every_key_by_a_root_without_commands(srv: &Server, admin: &mut redis::Connection) {
    let commands_apart = format!("(+@all {FLOW_KEYS})");
    set_user(admin, "keys-apart", &["-@all", "~*", &commands_apart]);
    let before = dump_all(admin);
    let mut c = conn_as(srv, "keys-apart");
    let events = "argyll:flow:done-1:events";
    assert!(server_allows(&mut c, &[events], &[events]));
    assert!(!server_allows(&mut c, &[], &[events, "archived:flows"]));
    refused_by_no_single_selector(&mut c, "keys-apart");
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    assert_eq!(int(&summary["skipped_noperm"]), 2, "{summary:?}");
    assert_same(&before, &dump_all(admin), "keys-apart");
}

/// Commands granted one by one leave the stand-in out (and Redis 7.0 has no `@flowarchive`): a user
/// without selectors is checked key by key, its root being its one selector; a user with selectors
/// is refused until it is granted the stand-in.
fn granted_one_by_one(srv: &Server, admin: &mut redis::Connection) {
    for id in ["solo-1", "solo-2"] {
        write_flow(admin, &FlowSpec::done(id));
    }
    let keys = [FLOW_KEYS, ENGINE_KEYS[0], ENGINE_KEYS[1], INDEX_KEYS];
    let grants = ["-@all", "+flowarchive.flow", "+flowarchive.get"];
    set_user(admin, "root-only", &[&grants[..], &keys].concat());
    let mut c = conn_as(srv, "root-only");
    archive(&mut c, "solo-1").unwrap();
    assert!(get(&mut c, "solo-1").unwrap().is_some());

    let reads = "(+flowarchive.get ~unrelated:*)";
    set_user(
        admin,
        "with-selector",
        &[&grants[..], &keys, &[reads]].concat(),
    );
    let before = dump_all(admin);
    let mut c = conn_as(srv, "with-selector");
    let e = err_text(archive(&mut c, "solo-2"));
    assert!(
        e.starts_with("NOPERM") && e.contains("flowarchive.aclcheck"),
        "{e}"
    );
    assert_same(&before, &dump_all(admin), "with-selector");
    set_user(admin, "with-selector", &["+flowarchive.aclcheck"]);
    archive(&mut c, "solo-2").unwrap();
}

/// Valkey 9.1 grants databases per selector too: the selector that allows an archive's keys must allow
/// the DB it runs in, as the server requires of a command.
fn dbs_count_per_selector(srv: &Server, admin: &mut redis::Connection) {
    let mut db1 = srv.conn();
    cmd::<()>(&mut db1, &["SELECT", "1"]).unwrap();
    write_flow(&mut db1, &FlowSpec::done("in-db1"));
    let [idx, lease] = ENGINE_KEYS;
    let keys = format!("{FLOW_KEYS} {idx} {lease} {INDEX_KEYS}");
    // `db-apart`: every key by the root, in DB 0 only, and in DB 1 only the index, by a selector;
    // `db-each`: every key by the root in DB 0 and by a selector in DB 1.
    let index_in_db1 = format!("(+@all {INDEX_KEYS} db=1)");
    set_user(
        admin,
        "db-apart",
        &["+@all", "~*", "resetdbs", "db=0", &index_in_db1],
    );
    let db1_too = format!("(+@all {keys} db=1)");
    set_user(
        admin,
        "db-each",
        &["+@all", "~*", "resetdbs", "db=0", &db1_too],
    );

    let events = "argyll:flow:in-db1:events";
    let before = dump_all(&mut db1);
    let mut c = conn_in(srv, "db-apart", 1);
    assert!(!server_allows(&mut c, &[events], &[]));
    let e = err_text(
        redis::cmd("FLOWARCHIVE.FLOW")
            .arg("in-db1")
            .query::<redis::Value>(&mut c),
    );
    assert!(e.starts_with("NOPERM"), "{e}");
    assert_same(&before, &dump_all(&mut db1), "db-apart");

    let mut c = conn_in(srv, "db-each", 1);
    assert!(server_allows(
        &mut c,
        &[events],
        &[events, "archived:flows"]
    ));
    archive(&mut c, "in-db1").unwrap();
    assert!(get(&mut c, "in-db1").unwrap().is_some());
}

#[test]
fn acl_selectors_allow_an_archive_only_with_all_its_keys() {
    archives_need_one_selector_for_all_their_keys(Flavor::Valkey9);
}

#[test]
fn acl_selectors_allow_an_archive_only_with_all_its_keys_on_valkey_8_0() {
    archives_need_one_selector_for_all_their_keys(Flavor::Valkey8);
}

#[test]
fn acl_selectors_allow_an_archive_only_with_all_its_keys_on_redis_7_0() {
    archives_need_one_selector_for_all_their_keys(Flavor::Redis7);
}

#[test]
fn module_unload_waits_for_work_in_flight_and_leaves_no_thread() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    opts.module_args
        .extend(["concurrency".to_string(), "2".to_string()]);
    opts.extra = vec!["--enable-module-command".into(), "yes".into()];
    let srv = Server::start(opts);
    let mut c = srv.conn();
    for i in 0..20 {
        write_flow(&mut c, &FlowSpec::done(&format!("u{i}")));
    }
    proxy.hold("PUT");
    let started: String = cmd(&mut c, &["FLOWARCHIVE.SWEEP", "ASYNC"]).unwrap();
    assert_eq!(started, "STARTED");
    wait_for("an upload held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    let e = err_text(cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]));
    assert!(e.to_lowercase().contains("unload"), "{e}");
    assert!(srv.log().contains("MODULE UNLOAD refused"));
    // A late event on a flow of the sweep: the module is still there to prove it changed, so the flow survives.
    cmd::<()>(
        &mut c,
        &["RPUSH", "argyll:flow:u19:events", "{\"type\":\"late\"}"],
    )
    .unwrap();
    proxy.release();
    wait_for("the sweep to end", Duration::from_secs(60), || {
        info_field(&mut c, "sweep_running") == 0
    });
    // Live or archived, the flow has its late event.
    let (_, events): (String, Vec<String>) = redis::cmd("FLOWARCHIVE.GET")
        .arg("u19")
        .arg("EVENTS")
        .query(&mut c)
        .unwrap();
    assert_eq!(events.len(), 6);
    assert_eq!(events[5], "{\"type\":\"late\"}");
    // Idle now: the unload goes through and no module thread is left running.
    wait_for("the unload", Duration::from_secs(10), || {
        cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]).is_ok()
    });
    assert_eq!(module_threads(srv.pid()), Vec::<String>::new());
    assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
}

#[test]
fn commits_wait_out_client_pause_and_never_write_on_a_demoted_primary() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let primary = server_via(&s3, Some(&proxy), &[]);
    let replica = server_via(&s3, Some(&proxy), &[]);
    let mut p = primary.conn();
    let mut r = replica.conn();
    for id in ["paused", "demoted", "long-pause"] {
        write_flow(&mut p, &FlowSpec::done(id));
    }
    replicate(&mut r, primary.port, "argyll:flow:paused:events");

    // A commit that lands while writes are paused waits for the pause to end, then commits.
    proxy.hold("PUT");
    let mut c = primary.conn();
    let flow = std::thread::spawn(move || archive(&mut c, "paused"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    cmd::<()>(&mut p, &["CLIENT", "PAUSE", "2500", "WRITE"]).unwrap();
    proxy.release();
    let done = flow.join().unwrap().expect("archived once the pause ended");
    assert!(done.contains_key("location"));
    assert!(
        primary.log().find("ASSERTION").is_none(),
        "no server assertion"
    );

    // A pause longer than the commit waits: the flow stays live and the client gets an error.
    proxy.hold("PUT");
    let mut c = primary.conn();
    let flow = std::thread::spawn(move || archive(&mut c, "long-pause"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    cmd::<()>(&mut p, &["CLIENT", "PAUSE", "14000", "WRITE"]).unwrap();
    proxy.release();
    let e = err_text(flow.join().unwrap());
    assert!(
        e.contains("paused") && e.contains("nothing was deleted"),
        "{e}"
    );
    cmd::<()>(&mut p, &["CLIENT", "UNPAUSE"]).unwrap();
    assert_eq!(
        cmd::<i64>(&mut p, &["EXISTS", "argyll:flow:long-pause:events"]).unwrap(),
        1
    );

    // Demoted during the upload: the old primary refuses to commit; the new primary has the flow.
    proxy.hold("PUT");
    let mut c = primary.conn();
    let flow = std::thread::spawn(move || archive(&mut c, "demoted"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    cmd::<()>(&mut r, &["REPLICAOF", "NO", "ONE"]).unwrap();
    cmd::<()>(
        &mut p,
        &["REPLICAOF", "127.0.0.1", &replica.port.to_string()],
    )
    .unwrap();
    proxy.release();
    // The server itself unblocks the waiting client when the role changes; either way it gets an error.
    let e = err_text(flow.join().unwrap());
    assert!(
        e.contains("no longer a writable primary") || e.contains("UNBLOCKED"),
        "{e}"
    );
    wait_for("the commit to give up", Duration::from_secs(10), || {
        info_field(&mut p, "failures_not_writable") == 1
    });
    assert_eq!(
        cmd::<i64>(&mut r, &["LLEN", "argyll:flow:demoted:events"]).unwrap(),
        5,
        "the new primary keeps the flow"
    );
    assert_eq!(
        cmd::<i64>(&mut r, &["HEXISTS", "archived:flows", "demoted"]).unwrap(),
        0
    );
    assert!(primary.log().find("ASSERTION").is_none());
    assert!(replica.log().find("ASSERTION").is_none());
}

/// Waits until the upload on `c`'s server has ended and its commit, finding writes paused, has tried
/// again (every 50 ms, a main-thread step each time) three times.
fn commit_waits(c: &mut redis::Connection) {
    wait_for("the upload to end", Duration::from_secs(10), || {
        info_field(c, "uploads_in_flight") == 0
    });
    let steps = info_field(c, "main_thread_steps");
    wait_for(
        "the commit to wait in the pause",
        Duration::from_secs(10),
        || info_field(c, "main_thread_steps") >= steps + 3,
    );
}

/// A primary and its replica, both uploading through one proxy, the primary holding flows whose
/// labels hashes hold 3 MiB each (read in steps, followed by hash events, counted at commit), all
/// replicated.
struct LargeLabels {
    s3: S3,
    proxy: Proxy,
    primary: Server,
    replica: Server,
    model: checker::Model,
}

fn replicated_large_labels(ids: &[&str]) -> LargeLabels {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let primary = server_via(&s3, Some(&proxy), &[]);
    let replica = server_via(&s3, Some(&proxy), &[]);
    let mut p = primary.conn();
    let mut model = checker::Model::new(0);
    for id in ids {
        model.write_labeled(&mut p, &FlowSpec::done(id), 3 << 20);
    }
    let last = ids.last().expect("a flow");
    replicate(&mut replica.conn(), primary.port, &labels_key(last));
    LargeLabels {
        s3,
        proxy,
        primary,
        replica,
        model,
    }
}

/// A flow whose labels hash holds 3 MiB (read in steps, followed by hash events, counted at commit)
/// and whose upload ends while writes are paused (`CLIENT PAUSE WRITE` for 4 s) is committed only
/// once the pause is over: its commit is seen trying again in the pause, its answer comes after the
/// pause, the server asserts nothing, and the flow is archived with every event and label, deleted
/// on the replica as on the primary. Paused longer than a commit waits, such a flow stays live with
/// every event and label, on the replica too.
#[test]
fn a_large_labels_hash_waits_out_a_client_pause_and_its_replica_follows_the_commit() {
    let LargeLabels {
        s3,
        proxy,
        mut primary,
        replica,
        model,
    } = replicated_large_labels(&["paused", "long-pause"]);
    let mut p = primary.conn();

    let mut paused_at = None;
    let (_, answer) = held_upload_in(&primary, &proxy, 0, "paused", |c| {
        cmd::<()>(c, &["CLIENT", "PAUSE", "4000", "WRITE"]).unwrap();
        paused_at = Some(Instant::now());
        proxy.release();
        commit_waits(c);
        assert!(paused_at.unwrap().elapsed() < Duration::from_millis(3500));
    });
    let done = answer.expect("archived once the pause ended");
    assert_eq!(int(&done["events"]), 5);
    let answered = paused_at.unwrap().elapsed();
    assert!(
        answered >= Duration::from_millis(3900),
        "committed {answered:?} into a pause of 4 s"
    );
    assert_eq!(info_field(&mut p, "hash_events_subscribed"), 1);

    let (_, answer) = held_upload_in(&primary, &proxy, 0, "long-pause", |c| {
        cmd::<()>(c, &["CLIENT", "PAUSE", "14000", "WRITE"]).unwrap();
    });
    let e = err_text(answer);
    assert!(
        e.contains("paused") && e.contains("nothing was deleted"),
        "{e}"
    );
    cmd::<()>(&mut p, &["CLIENT", "UNPAUSE"]).unwrap();
    assert_eq!(info_field(&mut p, "buffered_bytes"), 0, "all released");
    checker::assert_alive(&mut primary, "after the pauses");
    let tally = checker::check(
        "after the pauses",
        &primary,
        &s3,
        &model,
        checker::Expect::Either,
    );
    assert_eq!((tally.archived, tally.live), (1, 1));
    assert!(model.flows["long-pause"].labels.len() > 3000);
    checker::assert_replicas_match(&primary, &[&replica], &[0]);
}

/// A FAILOVER while a flow whose labels hash holds 3 MiB uploads, its replica stopped: the primary
/// pauses writes until the replica has caught up, the commit waits in that pause, then the replica
/// resumes, takes over, and the old primary becomes its replica. The commit refuses on the demoted
/// node, deleting nothing there: the new primary and the old one, now its replica, hold the flow key
/// for key, with every event and label. A sweep on the new primary then archives it, and it is gone
/// from both.
#[test]
fn a_large_labels_hash_is_never_deleted_on_a_primary_demoted_by_a_failover_during_its_commit() {
    let LargeLabels {
        s3,
        proxy,
        primary: mut old,
        replica: mut new,
        model,
    } = replicated_large_labels(&["failover"]);
    let (mut o, mut n) = (old.conn(), new.conn());

    let (_, answer) = held_upload_in(&old, &proxy, 0, "failover", |o| {
        // A write the stopped replica cannot acknowledge: the failover waits for it, writes paused.
        signal("-STOP", new.pid());
        cmd::<()>(o, &["SET", "unacknowledged", "1"]).unwrap();
        cmd::<()>(o, &["FAILOVER"]).unwrap();
        assert_eq!(repl_field(o, "master_failover_state"), "waiting-for-sync");
        proxy.release();
        commit_waits(o);
        assert_eq!(repl_field(o, "master_failover_state"), "waiting-for-sync");
        signal("-CONT", new.pid());
    });
    // The server itself unblocks the waiting client when the role changes; either way it gets an error.
    let e = err_text(answer);
    assert!(
        e.contains("no longer a writable primary") || e.contains("UNBLOCKED"),
        "{e}"
    );
    wait_for("the commit to give up", Duration::from_secs(15), || {
        info_field(&mut o, "failures_not_writable") == 1
    });
    assert_eq!(repl_field(&mut n, "role"), "master");
    assert_eq!(repl_field(&mut o, "role"), "slave");
    assert_eq!(info_field(&mut o, "buffered_bytes"), 0, "all released");
    checker::assert_alive(&mut old, "the demoted primary");
    checker::assert_alive(&mut new, "the new primary");
    let either = checker::Expect::Either;
    let tally = checker::check("after the failover", &new, &s3, &model, either);
    assert_eq!(tally.live, 1);
    checker::assert_replicas_match(&new, &[&old], &[0]);

    let summary = sweep(&mut n, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    checker::check_swept("swept on the new primary", &new, &s3, &model, 1);
    checker::assert_replicas_match(&new, &[&old], &[0]);
}

/// A FAILOVER that times out while a flow whose labels hash holds 3 MiB uploads, its replica stopped:
/// the primary pauses writes for the failover's 4 s, the commit waits in that pause, and once the
/// failover is given up the primary, a primary still, commits: the flow is archived with every event
/// and label, and deleted on the replica too once it resumes.
#[test]
fn a_large_labels_hash_waits_out_a_failover_that_times_out_then_commits() {
    let LargeLabels {
        s3,
        proxy,
        mut primary,
        replica,
        model,
    } = replicated_large_labels(&["aborted"]);
    let mut p = primary.conn();

    let (_, answer) = held_upload_in(&primary, &proxy, 0, "aborted", |c| {
        signal("-STOP", replica.pid());
        cmd::<()>(c, &["SET", "unacknowledged", "1"]).unwrap();
        cmd::<()>(c, &["FAILOVER", "TIMEOUT", "4000"]).unwrap();
        proxy.release();
        commit_waits(c);
        assert_eq!(repl_field(c, "master_failover_state"), "waiting-for-sync");
        wait_for(
            "the failover to be given up",
            Duration::from_secs(10),
            || repl_field(c, "master_failover_state") == "no-failover",
        );
        signal("-CONT", replica.pid());
    });
    let done = answer.expect("archived once the failover was given up");
    assert_eq!(int(&done["events"]), 5);
    assert_eq!(repl_field(&mut p, "role"), "master");
    checker::assert_alive(&mut primary, "after the failover");
    checker::check_swept("archived", &primary, &s3, &model, 1);
    checker::assert_replicas_match(&primary, &[&replica], &[0]);
}

/// A primary demoted during the upload of a flow whose labels hash holds 3 MiB (followed, counted at
/// commit), loaded by a full sync (from disk, the default) with another node's version of the flow
/// (the same labels but one, rewritten to the same length: the same field count), and promoted again
/// before its commit, keeps that version live: the load is a change to every flow in flight.
#[test]
fn a_large_labels_hash_loaded_over_by_a_full_sync_during_its_upload_is_not_deleted() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let a = server_via(&s3, Some(&proxy), &[]);
    let b = server_via(&s3, Some(&proxy), &[]);
    let (mut ca, mut cb) = (a.conn(), b.conn());
    let mut model = checker::Model::new(0);
    model.write_labeled(&mut ca, &FlowSpec::done("loaded-over"), 3 << 20);
    let mut theirs = checker::Model::new(0);
    theirs.write_labeled(&mut cb, &FlowSpec::done("loaded-over"), 3 << 20);
    let key = "argyll:flow:loaded-over:idx:labels";
    let (name, value) = theirs.flows["loaded-over"].labels[7].clone();
    let other: String = value.chars().rev().collect();
    cmd::<()>(&mut cb, &["HSET", key, &name, &other]).unwrap();
    cmd::<()>(&mut cb, &["SET", "only-on-b", "1"]).unwrap();
    let labels = |c: &mut redis::Connection| -> std::collections::BTreeMap<String, String> {
        cmd(c, &["HGETALL", key]).unwrap()
    };
    let want = labels(&mut cb);
    assert_ne!(labels(&mut ca), want);

    let (_, _unblocked) = held_upload_in(&a, &proxy, 0, "loaded-over", |c| {
        replicate(c, b.port, "only-on-b");
        cmd::<()>(c, &["REPLICAOF", "NO", "ONE"]).unwrap();
    });
    wait_for("the commit's decision", Duration::from_secs(20), || {
        let info: String = cmd(&mut ca, &["INFO", "flowarchive"]).unwrap();
        info.lines()
            .filter(|l| l.contains("flowarchive_failures_") || l.contains("flows_archived:"))
            .any(|l| !l.ends_with(":0"))
    });
    assert_eq!(info_field(&mut ca, "flows_archived"), 0);
    assert!(labels(&mut ca) == want, "the loaded version stays live");
    assert_eq!(
        cmd::<i64>(&mut ca, &["HEXISTS", "archived:flows", "loaded-over"]).unwrap(),
        0
    );
    let log = a.log();
    assert!(!log.contains("ASSERTION"), "{log}");
}

#[test]
fn a_commit_checks_every_key_before_its_first_write() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("partial"));
    proxy.hold("PUT");
    let mut other = srv.conn();
    let flow = std::thread::spawn(move || archive(&mut other, "partial"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    // The label-values set the commit would edit last turns into a string during the upload.
    cmd::<()>(&mut c, &["DEL", "argyll:idx:label:tenant"]).unwrap();
    cmd::<()>(&mut c, &["SET", "argyll:idx:label:tenant", "oops"]).unwrap();
    let before = dump_all(&mut c);
    proxy.release();
    let e = err_text(flow.join().unwrap());
    assert!(e.contains("holds a string, expected a set"), "{e}");
    assert_same(&before, &dump_all(&mut c), "no write of the commit landed");
    // Repaired, the next attempt archives (it is not refused as already archived).
    cmd::<()>(&mut c, &["DEL", "argyll:idx:label:tenant"]).unwrap();
    cmd::<()>(&mut c, &["SADD", "argyll:idx:label:tenant", "acme"]).unwrap();
    archive(&mut c, "partial").unwrap();
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:partial:events"]).unwrap(),
        0
    );
}

#[test]
fn errors_stay_small_whatever_the_input() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &[]);
    let mut c = srv.conn();
    let huge = "h".repeat(1 << 20);
    write_flow(
        &mut c,
        &FlowSpec {
            status: "active",
            ..FlowSpec::done(&huge)
        },
    );
    for e in [
        err_text(archive(&mut c, &huge)),
        err_text(archive(&mut c, &format!("{huge}x"))),
    ] {
        assert!(e.len() < 700, "{} bytes", e.len());
    }
    // Printf directives and NUL bytes in ids reach the log as text, never as a format.
    for id in ["%s%s%s%s%n%p", "a\0b%s"] {
        write_flow(
            &mut c,
            &FlowSpec {
                status: "active",
                ..FlowSpec::done(id)
            },
        );
        let e = err_text(archive(&mut c, id));
        assert!(e.contains("not terminal"), "{e}");
        write_flow(&mut c, &FlowSpec::done(id));
        archive(&mut c, id).unwrap();
        assert!(get(&mut c, id).unwrap().is_some());
    }
    assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
    let log = srv.log();
    assert!(log.lines().all(|l| l.len() < 1000), "log lines stay short");
    assert!(log.contains("%s%s%s%s%n%p"), "the id is logged as text");
}

#[test]
fn a_long_live_event_log_is_read_in_chunks() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &[]);
    let mut c = srv.conn();
    let spec = FlowSpec {
        events: 30_000,
        ..FlowSpec::done("long")
    };
    write_flow(&mut c, &spec);
    let (state, events): (String, Vec<String>) = redis::cmd("FLOWARCHIVE.GET")
        .arg("long")
        .arg("EVENTS")
        .query(&mut c)
        .unwrap();
    assert_eq!(state, state_json(&spec));
    assert_eq!(events, events_of(&spec));
    // Inside MULTI a live flow cannot be read in steps nor folded off the main thread: a clear
    // error, not a long stall.
    cmd::<()>(&mut c, &["MULTI"]).unwrap();
    cmd::<()>(&mut c, &["FLOWARCHIVE.GET", "long", "EVENTS"]).unwrap();
    let e = err_text(cmd::<Vec<redis::Value>>(&mut c, &["EXEC"]));
    assert!(e.contains("cannot wait for inside MULTI"), "{e}");
}

#[test]
fn flow_calls_beyond_the_pool_get_a_busy_error() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let ids: Vec<String> = (0..300).map(|i| format!("b{i}")).collect();
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    // Held until the pool has turned calls away: none can finish before then but with a busy error.
    proxy.hold("PUT");
    let port = srv.port;
    let calls: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            std::thread::spawn(move || {
                let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                let mut c = client.get_connection().unwrap();
                archive(&mut c, &id).map(|_| ()).map_err(|e| e.to_string())
            })
        })
        .collect();
    wait_for("a call turned away", Duration::from_secs(60), || {
        calls.iter().any(|h| h.is_finished())
    });
    let threads = module_threads(srv.pid());
    assert!(threads.len() <= 8, "{} module threads", threads.len());
    proxy.release();
    let results: Vec<_> = calls.into_iter().map(|h| h.join().unwrap()).collect();
    let busy = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|e| e.contains("busy")))
        .count();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok + busy, 300, "{results:?}");
    assert!(busy > 0 && ok > 0, "ok {ok}, busy {busy}");
    // Every busy flow is live and untouched.
    for (id, r) in ids.iter().zip(&results) {
        let live = cmd::<i64>(&mut c, &["EXISTS", &format!("argyll:flow:{id}:events")]).unwrap();
        assert_eq!(live == 1, r.is_err(), "{id}");
    }
}

#[test]
fn selection_steps_stay_bounded_with_ties() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["batch-size", "7"]);
    let mut c = srv.conn();
    // 400 flows share one score, 100 more on either side of it.
    let mut ids = Vec::new();
    for i in 0..600 {
        let id = format!("t{i:03}");
        let last_ms = match i {
            0..=99 => LONG_AGO - 1000 + i as i64,
            100..=499 => LONG_AGO,
            _ => LONG_AGO + i as i64,
        };
        write_flow(
            &mut c,
            &FlowSpec {
                last_ms,
                events: 1,
                ..FlowSpec::done(&id)
            },
        );
        ids.push(id);
    }
    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    let listed: Vec<String> = redis::from_redis_value(&dry["flows"]).unwrap();
    assert_eq!(listed.len(), 600, "every flow once");
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    // Oldest first: the 100 older flows, then the tie, then the newer ones.
    assert!(listed[..100].iter().all(|id| id.as_str() < "t100"));
    let done = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&done["archived"]), 600);
}

#[test]
fn cluster_nodes_refuse_archives_whose_keys_span_slots() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.extra = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let srv = Server::start(opts);
    let mut c = srv.conn();
    cmd::<()>(&mut c, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]).unwrap();
    wait_for("cluster ok", Duration::from_secs(20), || {
        cmd::<String>(&mut c, &["CLUSTER", "INFO"])
            .unwrap()
            .contains("cluster_state:ok")
    });
    // The default layout spreads a flow's keys over many slots: refused, naming the template.
    write_flow(&mut c, &FlowSpec::done("spread"));
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut c, "spread"));
    assert!(e.contains("template events-key"), "{e}");
    let swept = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&swept["archived"]), 0);
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
    // A layout whose keys all carry the flow id as hash tag archives on its node.
    for (name, value) in [
        ("events-key", "$prefix:flow:{$id}:events"),
        ("snapshot-key", "$prefix:flow:{$id}:snapshot:val"),
        ("seq-key", ""),
        ("labels-key", ""),
        ("status-key", ""),
        ("status-set-key", ""),
        ("label-set-key", ""),
        ("label-values-key", ""),
        ("lease-key", "$prefix:archive:lease:{$id}"),
        ("index-key", "archived:{$id}"),
    ] {
        cmd::<()>(
            &mut c,
            &["CONFIG", "SET", &format!("flowarchive.{name}"), value],
        )
        .unwrap();
    }
    let mut rpush = vec![
        "RPUSH".to_string(),
        "argyll:flow:{tagged}:events".to_string(),
    ];
    rpush.extend(events_of(&FlowSpec::done("tagged")));
    let rpush: Vec<&str> = rpush.iter().map(String::as_str).collect();
    cmd::<()>(&mut c, &rpush).unwrap();
    archive(&mut c, "tagged").unwrap();
    assert_eq!(
        cmd::<i64>(&mut c, &["HEXISTS", "archived:{tagged}", "tagged"]).unwrap(),
        1
    );
}

#[test]
fn archived_flows_stay_readable_when_swapdb_moves_them() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("moved"));
    let spec = FlowSpec::done("moved");
    archive(&mut c, "moved").unwrap();
    // DB 1 has an index of its own (a DB with none would have its reads ask the bucket).
    cmd::<()>(&mut c, &["SELECT", "1"]).unwrap();
    write_flow(&mut c, &FlowSpec::done("other"));
    archive(&mut c, "other").unwrap();
    cmd::<()>(&mut c, &["SELECT", "0"]).unwrap();
    cmd::<()>(&mut c, &["SWAPDB", "0", "1"]).unwrap();
    assert_eq!(
        get(&mut c, "moved").unwrap(),
        None,
        "DB 0 holds DB 1's data now"
    );
    assert_eq!(
        get(&mut c, "other").unwrap(),
        Some(archived_state(&state_json(&FlowSpec::done("other"))))
    );
    cmd::<()>(&mut c, &["SELECT", "1"]).unwrap();
    let state = get(&mut c, "moved")
        .unwrap()
        .expect("the entry moved with its DB");
    assert_eq!(state, archived_state(&state_json(&spec)));
}

#[test]
fn a_sweep_on_a_demoted_primary_stops_uploading() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let primary = server_via(&s3, Some(&proxy), &["concurrency", "2", "batch-size", "10"]);
    let replica = server_via(&s3, Some(&proxy), &[]);
    let (mut p, mut r) = (primary.conn(), replica.conn());
    for i in 0..120 {
        write_flow(&mut p, &FlowSpec::done(&format!("d{i:03}")));
    }
    replicate(&mut r, primary.port, "argyll:flow:d119:events");
    // A few flows archived, then the demotion lands while the next uploads are held.
    proxy.hold("PUT");
    let started: String = cmd(&mut p, &["FLOWARCHIVE.SWEEP", "ASYNC"]).unwrap();
    assert_eq!(started, "STARTED");
    hold_sweep_at(&mut p, &proxy, &|| proxy.hold("PUT"), 2, "the first flows");
    cmd::<()>(&mut r, &["REPLICAOF", "NO", "ONE"]).unwrap();
    cmd::<()>(
        &mut p,
        &["REPLICAOF", "127.0.0.1", &replica.port.to_string()],
    )
    .unwrap();
    let puts_at_demotion = proxy
        .requests()
        .iter()
        .filter(|q| q.starts_with("PUT"))
        .count();
    proxy.delay("PUT", Duration::from_millis(150));
    wait_for("the sweep to stop", Duration::from_secs(30), || {
        info_field(&mut p, "sweep_running") == 0
    });
    let puts = proxy
        .requests()
        .iter()
        .filter(|q| q.starts_with("PUT"))
        .count();
    // At most the flows already handed to the two uploaders, and the next batch's first captures.
    assert!(
        puts <= puts_at_demotion + 12,
        "{puts_at_demotion} PUTs at demotion, {puts} after"
    );
    assert!(primary.log().contains("no longer a writable primary"));
    // Nothing the demoted node uploaded afterwards was committed anywhere: the new primary keeps
    // every flow it did not index itself.
    let indexed: i64 = cmd(&mut r, &["HLEN", "archived:flows"]).unwrap();
    let live = (0..120)
        .filter(|i| {
            cmd::<i64>(&mut r, &["EXISTS", &format!("argyll:flow:d{i:03}:events")]).unwrap() == 1
        })
        .count() as i64;
    assert_eq!(indexed + live, 120);
}

#[test]
fn a_key_of_the_flow_created_as_another_type_during_the_upload_is_never_deleted() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    write_flow(
        &mut c,
        &FlowSpec {
            labels: &[],
            ..FlowSpec::done("retyped")
        },
    );
    proxy.hold("PUT");
    let mut other = srv.conn();
    let flow = std::thread::spawn(move || archive(&mut other, "retyped"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    // The labels key was absent at capture; a set appears under its name.
    cmd::<()>(&mut c, &["SADD", "argyll:flow:retyped:idx:labels", "x"]).unwrap();
    proxy.release();
    // Seen as a change, or refused by the commit's type check: either way nothing is deleted.
    let e = err_text(flow.join().unwrap());
    assert!(
        e.contains("holds a set, expected a hash") || e.contains("changed while"),
        "{e}"
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["SCARD", "argyll:flow:retyped:idx:labels"]).unwrap(),
        1
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["LLEN", "argyll:flow:retyped:events"]).unwrap(),
        5
    );
}

/// A flow larger than `read-max-bytes` could never be read back: it is refused whole, measured before
/// it is copied (a snapshot where the server holds it, each event as it is read), and stays live;
/// under a larger cap the same flow archives and reads back event by event.
#[test]
fn a_flow_larger_than_the_read_cap_is_refused_and_stays_live() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["read-max-bytes", "1048576"]);
    let mut c = srv.conn();
    let wide = FlowSpec::done("wide-snapshot");
    write_flow(&mut c, &wide);
    let mut snapshot: serde_json::Value = serde_json::from_str(&state_json(&wide)).unwrap();
    snapshot["padding"] = "p".repeat(2 << 20).into();
    let snapshot = snapshot.to_string();
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:wide-snapshot:snapshot:val", &snapshot],
    )
    .unwrap();
    // 300 events of 8 kB: the log passes the cap within its first chunk.
    let long = FlowSpec {
        events: 300,
        ..FlowSpec::done("wide-log")
    };
    write_flow(&mut c, &long);
    let padded: Vec<String> =
        std::iter::once(event_json(&long, 0))
            .chain((1..300).map(|i| {
                serde_json::json!({"sequence": i, "pad": "e".repeat(8 << 10)}).to_string()
            }))
            .collect();
    cmd::<()>(&mut c, &["DEL", "argyll:flow:wide-log:events"]).unwrap();
    let mut rpush = vec!["RPUSH", "argyll:flow:wide-log:events"];
    rpush.extend(padded.iter().map(String::as_str));
    cmd::<()>(&mut c, &rpush).unwrap();

    // Eligibility is answered first: a running flow with such a snapshot is refused as running.
    let running = FlowSpec {
        status: "active",
        ..FlowSpec::done("wide-running")
    };
    write_flow(&mut c, &running);
    cmd::<()>(
        &mut c,
        &["SET", "argyll:flow:wide-running:snapshot:val", &snapshot],
    )
    .unwrap();
    // A label hash past the cap: its scan stops there, and the flow is refused as too large.
    write_flow(&mut c, &FlowSpec::done("wide-labels"));
    let pad = "l".repeat(64 << 10);
    for i in 0..40 {
        let name = format!("pad{i}");
        cmd::<()>(
            &mut c,
            &["HSET", "argyll:flow:wide-labels:idx:labels", &name, &pad],
        )
        .unwrap();
    }
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut c, "wide-running"));
    assert!(e.contains("not terminal"), "{e}");
    for id in ["wide-snapshot", "wide-log", "wide-labels"] {
        let e = err_text(archive(&mut c, id));
        assert!(
            e.contains("larger than flowarchive.read-max-bytes (1048576 bytes)"),
            "{id}: {e}"
        );
    }
    assert_same(&before, &dump_all(&mut c), "refused flows");

    config_set(&mut c, "flowarchive.read-max-bytes", "8mb").unwrap();
    for id in ["wide-snapshot", "wide-log", "wide-labels"] {
        archive(&mut c, id).unwrap();
    }
    let (state, events): (String, Vec<String>) = redis::cmd("FLOWARCHIVE.GET")
        .arg("wide-snapshot")
        .arg("EVENTS")
        .query(&mut c)
        .unwrap();
    // The snapshot (without a sequence: every event folds on top of it) is archived whole; the
    // engine's state drops its unknown padding.
    assert_eq!(state, archived_state(&state_json(&wide)));
    assert_eq!(events, events_of(&wide));
    let events: Vec<String> = redis::cmd("FLOWARCHIVE.GET")
        .arg("wide-log")
        .arg("EVENTS")
        .query::<(String, Vec<String>)>(&mut c)
        .unwrap()
        .1;
    assert_eq!(events, padded);
}

/// An event log of large events is refused at the cap without the server copying a whole chunk of
/// it: a chunk of 1024 events read in one `LRANGE` would be built whole as a reply (here 95 MB)
/// before the first event was measured.
#[test]
fn a_log_of_large_events_is_refused_without_copying_a_chunk() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["read-max-bytes", "1048576"]);
    let mut c = srv.conn();
    let spec = FlowSpec {
        events: 1,
        ..FlowSpec::done("big-events")
    };
    write_flow(&mut c, &spec);
    // Taken before the log grows: reading it whole afterwards would itself raise the peak.
    let before = dump_all(&mut c);
    let key = "argyll:flow:big-events:events";
    let event = serde_json::json!({"pad": "e".repeat(1 << 20)}).to_string();
    for _ in 0..95 {
        cmd::<()>(&mut c, &["RPUSH", key, &event]).unwrap();
    }
    let peak = srv.peak_rss();
    let e = err_text(archive(&mut c, "big-events"));
    assert!(e.contains("larger than flowarchive.read-max-bytes"), "{e}");
    let grew = srv.peak_rss().saturating_sub(peak);
    assert!(
        grew < 24 << 20,
        "the refusal raised the peak RSS by {grew} bytes"
    );
    // The flow stays live and whole: the large events, then (trimmed back) what it was.
    assert_eq!(cmd::<i64>(&mut c, &["LLEN", key]).unwrap(), 96);
    for at in ["1", "-1"] {
        assert_eq!(cmd::<String>(&mut c, &["LINDEX", key, at]).unwrap(), event);
    }
    cmd::<()>(&mut c, &["LTRIM", key, "0", "0"]).unwrap();
    assert_same(&before, &dump_all(&mut c), "refused flow");
}

/// Without a status index the sweep selects by the end of each event log; a flow whose snapshot is over
/// `read-max-bytes` is a candidate its capture refuses without copying the snapshot (counted, left
/// live), and the other flows archive.
#[test]
fn selection_by_scan_passes_a_snapshot_over_the_cap_to_a_refusal() {
    use common::cluster::{layout_args, tagged_keys, TFlow};
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args.extend(layout_args());
    opts.module_args
        .extend(["read-max-bytes", "1048576"].map(String::from));
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let flows: Vec<TFlow> = (0..3).map(|i| TFlow::done(format!("sel-{i}"), 4)).collect();
    for f in &flows {
        f.write(&mut c);
    }
    let big = TFlow::done("sel-big", 4);
    big.write(&mut c);
    let mut snapshot: serde_json::Value = serde_json::from_str(&big.state()).unwrap();
    snapshot["padding"] = "p".repeat(2 << 20).into();
    let [_, val, ..] = tagged_keys(&big.id);
    cmd::<()>(&mut c, &["SET", &val, &snapshot.to_string()]).unwrap();
    let before: Vec<Option<Vec<u8>>> = tagged_keys(&big.id)
        .iter()
        .map(|k| cmd(&mut c, &["DUMP", k]).unwrap())
        .collect();

    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 3, "{summary:?}");
    assert_eq!(int(&summary["failed"]), 1, "{summary:?}");
    let after: Vec<Option<Vec<u8>>> = tagged_keys(&big.id)
        .iter()
        .map(|k| cmd(&mut c, &["DUMP", k]).unwrap())
        .collect();
    assert_eq!(before, after, "the refused flow stays as it was");
    for f in &flows {
        let (_, events) = get_events(&mut c, &f.id).unwrap();
        assert_eq!(events, f.event_list(), "{}", f.id);
    }

    config_set(&mut c, "flowarchive.read-max-bytes", "8mb").unwrap();
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    // The engine's state drops the snapshot's unknown padding; the object keeps the snapshot whole.
    let state = get(&mut c, &big.id).unwrap().unwrap();
    assert_eq!(state, archived_state(&big.state()));
}

fn async_load_node(s3: &S3, proxy: &Proxy) -> Server {
    let mut opts = ServerOpts::new(s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    opts.extra = ASYNC_LOAD.iter().map(|a| a.to_string()).collect();
    Server::start(opts)
}

/// Valkey turns `repl-diskless-load swapdb` into a blocking disk load when a module does not declare
/// it handles async loading; the module declares it, and treats the swap as a change to every flow in
/// flight: a primary demoted mid-upload, loaded with another node's version of the flow (same length,
/// other events) and promoted again before its commit, keeps that version live.
#[test]
fn replicas_keep_async_diskless_loading_and_a_swapped_in_flow_is_not_deleted() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let a = async_load_node(&s3, &proxy);
    let b = async_load_node(&s3, &proxy);
    let spec = FlowSpec {
        events: 3000,
        ..FlowSpec::done("swapped")
    };
    write_flow(&mut a.conn(), &spec);
    write_flow(&mut b.conn(), &spec);
    let events = |c: &mut redis::Connection| -> Vec<String> {
        cmd(c, &["LRANGE", "argyll:flow:swapped:events", "0", "-1"]).unwrap()
    };
    // B's version differs in one event only: same length, same indexes.
    let other = events(&mut b.conn())[1].replacen('{', "{\"edited\":true,", 1);
    cmd::<()>(
        &mut b.conn(),
        &["LSET", "argyll:flow:swapped:events", "1", &other],
    )
    .unwrap();
    let theirs = events(&mut b.conn());
    assert_ne!(events(&mut a.conn()), theirs);

    proxy.hold("PUT");
    let port = a.port;
    let flow = std::thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        archive(&mut c, "swapped")
    });
    wait_for("the upload held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    let mut ca = a.conn();
    replicate(&mut ca, b.port, "argyll:flow:swapped:events");
    wait_for("the async load ends", Duration::from_secs(20), || {
        events(&mut ca) == theirs
    });
    cmd::<()>(&mut ca, &["REPLICAOF", "NO", "ONE"]).unwrap();
    proxy.release();
    // The client was unblocked by the role change; the archive itself goes on to its commit.
    let _ = flow.join().unwrap();
    wait_for("the commit's decision", Duration::from_secs(20), || {
        let info: String = cmd(&mut ca, &["INFO", "flowarchive"]).unwrap();
        info.lines()
            .filter(|l| l.contains("flowarchive_failures_") || l.contains("flows_archived:"))
            .any(|l| !l.ends_with(":0"))
    });
    assert_eq!(info_field(&mut ca, "flows_archived"), 0);
    assert_eq!(events(&mut ca), theirs, "the swapped-in version stays live");
    assert_eq!(
        cmd::<i64>(&mut ca, &["HEXISTS", "archived:flows", "swapped"]).unwrap(),
        0
    );
    let log = a.log();
    assert!(
        !log.contains("Skipping diskless-load"),
        "the replica fell back to a disk load:\n{log}"
    );
}
