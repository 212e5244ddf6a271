//! The archive index and the server's memory: no eviction policy, TTL, config change or key layout can
//! take the index (and with it every archived flow); the module's own memory never evicts a user's
//! key or pushes the server into OOM; archiving runs when memory is full.

mod common;

use std::time::Duration;

use common::proxy::{Fault, Proxy, Rule};
use common::*;

/// The flow's state and events as GET answers them, archived: equal to what was written.
fn assert_archived(c: &mut redis::Connection, spec: &FlowSpec) {
    let (state, events) = get_events(c, spec.id).unwrap_or_else(|e| panic!("{}: {e}", spec.id));
    assert_eq!(state, archived_state(&state_json(spec)), "{}", spec.id);
    assert_eq!(events, events_of(spec), "{}", spec.id);
}

/// Every flow of `ids` either archived and answered in full, or live with its keys as written.
fn archived_or_intact(c: &mut redis::Connection, ids: &[String], before: &Dump) -> (usize, usize) {
    let (mut archived, mut live) = (0, 0);
    for id in ids {
        let spec = FlowSpec::done(id);
        if cmd::<i64>(c, &["EXISTS", &format!("argyll:flow:{id}:events")]).unwrap() == 1 {
            let now = dump_all(c);
            for key in flow_keys(id) {
                let key = key.into_bytes();
                assert_eq!(now.0.get(&key), before.0.get(&key), "{id}: a key changed");
            }
            live += 1;
        } else {
            assert_archived(c, &spec);
            archived += 1;
        }
    }
    (archived, live)
}

fn used_memory(c: &mut redis::Connection) -> i64 {
    let info: String = cmd(c, &["INFO", "memory"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn stat(c: &mut redis::Connection, name: &str) -> i64 {
    let info: String = cmd(c, &["INFO", "stats"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn eviction_policies_that_can_take_the_index_refuse_archiving_loudly() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.extra = vec!["--maxmemory-policy".into(), "allkeys-lru".into()];
    let srv = Server::start(opts);
    assert!(
        srv.log()
            .contains("maxmemory-policy allkeys-lru may evict the archive index"),
        "no warning at load"
    );
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("kept"));
    let before = dump_all(&mut c);
    for policy in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
        config_set(&mut c, "maxmemory-policy", policy).unwrap();
        let e = err_text(archive(&mut c, "kept"));
        assert!(
            e.contains(&format!(
                "maxmemory-policy {policy} may evict the archive index"
            )) && e.contains("nothing was deleted"),
            "{e}"
        );
        let e = err_text(sweep(&mut c, &[]));
        assert!(e.contains("may evict the archive index"), "{e}");
        assert_same(&before, &dump_all(&mut c), policy);
    }
    assert!(info_field(&mut c, "failures_unsafe") >= 3);
    for policy in ["volatile-lru", "noeviction"] {
        config_set(&mut c, "maxmemory-policy", policy).unwrap();
    }
    archive(&mut c, "kept").unwrap();
    assert_archived(&mut c, &FlowSpec::done("kept"));
}

/// Starts a sweep (at concurrency 1) whose flow uploads the proxy lets through one at a time until
/// it has archived `n` flows, and returns with the next one's upload held.
fn sweep_until_archived(c: &mut redis::Connection, proxy: &Proxy, n: i64) {
    // Each change of the rules lets the upload held go on and holds the next.
    let gate = || {
        proxy.set(vec![Rule {
            method: "PUT",
            path: "/flows/".into(),
            fault: Fault::Gate,
        }])
    };
    gate();
    let base = info_field(c, "flows_archived");
    assert_eq!(sweep_async(c).unwrap(), "STARTED");
    for archived in 0..=n {
        wait_for("the next upload held", Duration::from_secs(120), || {
            proxy.gated() == 1 && info_field(c, "flows_archived") >= base + archived
        });
        if archived < n {
            gate();
        }
    }
}

/// A policy that can take the index set mid-sweep: the commits still to come refuse, and every flow
/// is archived and readable or live and intact.
#[test]
fn an_evicting_policy_set_mid_sweep_stops_its_commits() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["concurrency", "1"]);
    let mut c = srv.conn();
    let ids: Vec<String> = (0..12).map(|i| format!("mid{i}")).collect();
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    let before = dump_all(&mut c);
    sweep_until_archived(&mut c, &proxy, 2);
    config_set(&mut c, "maxmemory-policy", "allkeys-lru").unwrap();
    proxy.release();
    wait_for("the sweep's end", Duration::from_secs(60), || {
        info_field(&mut c, "sweep_running") == 0
    });
    config_set(&mut c, "maxmemory-policy", "noeviction").unwrap();
    let (archived, live) = archived_or_intact(&mut c, &ids, &before);
    assert!(
        archived >= 2 && live >= 1,
        "{archived} archived, {live} live"
    );
    assert!(info_field(&mut c, "failures_unsafe") >= 1);
}

#[test]
fn an_index_with_a_ttl_is_refused_until_it_is_persisted() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    for id in ["first", "second"] {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    archive(&mut c, "first").unwrap();
    cmd::<()>(&mut c, &["EXPIRE", "archived:flows", "3600"]).unwrap();
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut c, "second"));
    assert!(e.contains("has a TTL") && e.contains("PERSIST"), "{e}");
    assert_same(&before, &dump_all(&mut c), "refused");
    cmd::<()>(&mut c, &["PERSIST", "archived:flows"]).unwrap();
    archive(&mut c, "second").unwrap();
    for id in ["first", "second"] {
        assert_archived(&mut c, &FlowSpec::done(id));
    }
}

/// Under a volatile policy at the memory limit only keys with a TTL are evicted: never the index,
/// never a user's key; archived reads, held in the module's own memory, add nothing the server
/// counts, and near the limit the read cache yields: emptied, nothing cached.
#[test]
fn module_memory_evicts_nothing_and_the_index_survives_pressure() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let ids: Vec<String> = (0..30).map(|i| format!("pressed{i}")).collect();
    let specs: Vec<FlowSpec> = ids
        .iter()
        .map(|id| FlowSpec {
            events: 40,
            ..FlowSpec::done(id)
        })
        .collect();
    for spec in &specs {
        write_flow(&mut c, spec);
    }
    sweep(&mut c, &[]).unwrap();
    let read_all = |c: &mut redis::Connection| {
        for spec in &specs {
            let (_, events) = get_events(c, spec.id).unwrap();
            assert_eq!(events.len(), 40);
        }
    };
    // Without pressure the reads are cached, in the module's heap, not in used_memory.
    let (used, heap) = (used_memory(&mut c), info_field(&mut c, "heap_bytes"));
    read_all(&mut c);
    assert_eq!(info_field(&mut c, "get_cache_flows"), 30);
    assert!(info_field(&mut c, "heap_bytes") > heap + 30 * 40 * 100);
    let grown = used_memory(&mut c) - used;
    assert!(
        grown < 256 << 10,
        "30 archived reads raised used_memory by {grown}"
    );

    let value = "u".repeat(1000);
    for i in 0..500 {
        cmd::<()>(&mut c, &["SET", &format!("user:{i}"), &value]).unwrap();
    }
    let limit = used_memory(&mut c) + (4 << 20);
    config_set(&mut c, "maxmemory", &limit.to_string()).unwrap();
    config_set(&mut c, "maxmemory-policy", "volatile-lru").unwrap();
    // Keys with a TTL fill what is left, and more: the policy evicts among them.
    let filler = "f".repeat(10_000);
    for i in 0..800 {
        cmd::<()>(
            &mut c,
            &["SET", &format!("cache:{i}"), &filler, "EX", "3600"],
        )
        .unwrap();
    }
    assert!(
        stat(&mut c, "evicted_keys") > 0,
        "the filler never reached the limit"
    );
    let used = used_memory(&mut c);
    for _ in 0..2 {
        read_all(&mut c);
    }
    assert_eq!(
        info_field(&mut c, "get_cache_flows"),
        0,
        "the cache did not yield"
    );
    assert!(info_field(&mut c, "get_cache_yields") >= 1);
    let grown = used_memory(&mut c) - used;
    assert!(
        grown < 1 << 20,
        "60 archived reads raised used_memory by {grown}"
    );
    for i in 0..500 {
        assert_eq!(
            cmd::<i64>(&mut c, &["EXISTS", &format!("user:{i}")]).unwrap(),
            1,
            "user:{i} was evicted"
        );
    }
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "archived:flows"]).unwrap(),
        1
    );
    for spec in &specs {
        assert_archived(&mut c, spec);
    }
}

/// With `noeviction` at the limit the server refuses writes with OOM; FLOW and SWEEP still run (what
/// they write is one index entry a flow, and they free more), and the engine can write again after.
#[test]
fn archiving_runs_when_memory_is_full() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let specs: Vec<FlowSpec> = ["full0", "full1", "full2", "full3"]
        .into_iter()
        .map(|id| FlowSpec {
            events: 2000,
            ..FlowSpec::done(id)
        })
        .collect();
    for spec in &specs {
        write_flow(&mut c, spec);
    }
    // Past the limit, with nothing the policy may evict: every write that can add memory is refused.
    let value = "v".repeat(10_000);
    for i in 0..100 {
        cmd::<()>(&mut c, &["SET", &format!("fill:{i}"), &value]).unwrap();
    }
    config_set(&mut c, "maxmemory-policy", "noeviction").unwrap();
    let limit = used_memory(&mut c) - (256 << 10);
    config_set(&mut c, "maxmemory", &limit.to_string()).unwrap();
    let oom = err_text(cmd::<()>(&mut c, &["SET", "refused", "x"]));
    assert!(oom.contains("OOM"), "{oom}");
    archive(&mut c, "full0").unwrap();
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 3, "{summary:?}");
    // UNLINK frees long logs in the background: writes come back once it has.
    wait_for(
        "the engine can write again",
        Duration::from_secs(10),
        || cmd::<()>(&mut c, &["SET", "after", &value]).is_ok(),
    );
    for spec in &specs {
        assert_archived(&mut c, spec);
    }
}

#[test]
fn index_key_changes_keep_every_archive_readable() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["concurrency", "1"]);
    let mut c = srv.conn();
    let first = FlowSpec::done("early");
    write_flow(&mut c, &first);
    archive(&mut c, "early").unwrap();
    config_set(&mut c, "flowarchive.index-key", "archived:v2").unwrap();
    assert_eq!(
        config(&mut c, "flowarchive.index-read-keys"),
        "archived:flows"
    );
    assert_archived(&mut c, &first);
    // A new incarnation is indexed under the new name and finds its predecessor under the old one.
    let again = FlowSpec {
        events: 7,
        ..FlowSpec::done("early")
    };
    write_flow(&mut c, &again);
    let location = text(&archive(&mut c, "early").unwrap()["location"]);
    assert!(location.ends_with("early.g1.jsonl.gz"), "{location}");
    assert_archived(&mut c, &again);
    let before: Option<String> =
        cmd(&mut c, &["FLOWARCHIVE.GET", "early", "PREVIOUS", "1"]).unwrap();
    assert_eq!(before, Some(archived_state(&state_json(&first))));
    assert_eq!(
        cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", "early"]).unwrap(),
        0
    );

    // Changed in the middle of a sweep, which keeps writing the name it started with.
    let ids: Vec<String> = (0..10).map(|i| format!("swept{i}")).collect();
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    sweep_until_archived(&mut c, &proxy, 4);
    config_set(&mut c, "flowarchive.index-key", "archived:v3").unwrap();
    proxy.release();
    wait_for("the sweep's end", Duration::from_secs(60), || {
        info_field(&mut c, "sweep_running") == 0
    });
    sweep(&mut c, &[]).unwrap();
    for id in &ids {
        assert_archived(&mut c, &FlowSpec::done(id));
    }
    assert_eq!(
        config(&mut c, "flowarchive.index-read-keys"),
        "archived:flows archived:v2"
    );
    // Earlier names are kept up to a bound; past it a change is refused until they are cleared.
    for n in 4..10 {
        config_set(&mut c, "flowarchive.index-key", &format!("archived:v{n}")).unwrap();
    }
    let e = err_text(config_set(&mut c, "flowarchive.index-key", "archived:v10"));
    assert!(e.contains("already holds 8 earlier index names"), "{e}");
    for id in ids.iter().chain([&"early".to_string()]) {
        assert!(get(&mut c, id).unwrap().is_some(), "{id}");
    }
}

#[test]
fn index_names_that_can_meet_a_flows_keys_or_the_engines_are_refused() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args
        .extend(["index-key", "argyll:idx:status"].map(String::from));
    let srv = Server::start(opts);
    assert!(
        srv.log().contains("can name the same key"),
        "no warning at load"
    );
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("guarded"));
    let before = dump_all(&mut c);
    for index in [
        "argyll:idx:status",
        "argyll:flow:$id:idx:labels",
        "argyll:flow:guarded:events",
        "$prefix:idx:label:tenant",
    ] {
        config_set(&mut c, "flowarchive.index-key", index).unwrap();
        let e = err_text(archive(&mut c, "guarded"));
        assert!(e.contains("can name the same key"), "{index}: {e}");
        let e = err_text(get(&mut c, "guarded"));
        assert!(e.contains("can name the same key"), "{index}: {e}");
        let e = err_text(sweep(&mut c, &[]));
        assert!(e.contains("can name the same key"), "{index}: {e}");
        assert_same(&before, &dump_all(&mut c), index);
    }
    config_set(&mut c, "flowarchive.index-key", "archived:flows").unwrap();
    // The earlier names are read too, so they are held to the same rule.
    let e = err_text(archive(&mut c, "guarded"));
    assert!(e.contains("index-read-keys"), "{e}");
    config_set(&mut c, "flowarchive.index-read-keys", "").unwrap();
    archive(&mut c, "guarded").unwrap();
    assert_archived(&mut c, &FlowSpec::done("guarded"));
}

/// With no index at all for the DB (flushed, deleted, an older dump), a read asks the bucket: the
/// newest archive of the flow is found by its object keys and served as usual, earlier incarnations
/// through it; an unknown id costs two HEADs. With any index present, nothing is asked.
#[test]
fn reads_find_archives_when_the_whole_index_is_lost() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["cache-bytes", "0"]);
    let mut c = srv.conn();
    // A fresh DB: no archive yet, no index. An unknown id costs the HEADs of its first key's two forms.
    let before = proxy.requests().len();
    assert_eq!(get(&mut c, "nobody").unwrap(), None);
    let asked: Vec<String> = proxy.requests()[before..].to_vec();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert!(asked.iter().all(|r| r.starts_with("HEAD ")), "{asked:?}");

    let plain = FlowSpec::done("lost-1");
    let first = FlowSpec::done("again");
    let second = FlowSpec {
        events: 9,
        ..FlowSpec::done("again")
    };
    write_flow(&mut c, &plain);
    archive(&mut c, "lost-1").unwrap();
    write_flow(&mut c, &first);
    archive(&mut c, "again").unwrap();
    write_flow(&mut c, &second);
    archive(&mut c, "again").unwrap();
    cmd::<()>(&mut c, &["DEL", "archived:flows"]).unwrap();

    assert_archived(&mut c, &plain);
    assert_archived(&mut c, &second);
    let back: Option<String> = cmd(&mut c, &["FLOWARCHIVE.GET", "again", "PREVIOUS", "1"]).unwrap();
    assert_eq!(back, Some(archived_state(&state_json(&first))));
    let before = proxy.requests().len();
    assert_eq!(get(&mut c, "never-archived").unwrap(), None);
    let asked = proxy.requests().len() - before;
    assert!(asked <= 2, "{asked} requests for an unknown id");
    assert!(info_field(&mut c, "get_index_probes") >= 5);
    assert_eq!(info_field(&mut c, "get_index_probes_found"), 3);

    // Any index present: a read of an unknown id asks nothing.
    write_flow(&mut c, &FlowSpec::done("indexed"));
    archive(&mut c, "indexed").unwrap();
    let before = proxy.requests().len();
    assert_eq!(
        get(&mut c, "lost-1").unwrap(),
        None,
        "an index exists: no search"
    );
    assert_eq!(proxy.requests().len(), before);
}

/// An archive of flow `holder` in flight, its PUT held at the proxy's gate.
type Held =
    std::thread::JoinHandle<redis::RedisResult<std::collections::HashMap<String, redis::Value>>>;

/// Writes flow `holder` (`spec`), lowers `buffer-max-bytes` to 1 MiB and archives it with its PUT held
/// at the proxy's gate (and no other request), answering once the upload holds its bytes: while it
/// is held, no copy may take the module past the budget. With the module's heap peak at that moment.
fn hold_holder(
    srv: &Server,
    c: &mut redis::Connection,
    proxy: &Proxy,
    model: &mut checker::Model,
    spec: FlowSpec,
) -> (Held, i64) {
    assert_eq!(spec.id, "holder");
    model.write(c, &spec);
    config_set(c, "flowarchive.buffer-max-bytes", &(1 << 20).to_string()).unwrap();
    proxy.set(vec![Rule {
        method: "PUT",
        path: "flows/holder".into(),
        fault: Fault::Gate,
    }]);
    let mut a = srv.conn();
    let archiving = std::thread::spawn(move || archive(&mut a, "holder"));
    wait_for("the upload to hold bytes", Duration::from_secs(120), || {
        info_field(c, "buffered_bytes") > 0 && proxy.gated() > 0
    });
    (archiving, info_field(c, "heap_bytes_peak"))
}

/// Lets the held upload of `holder` through; its archive ends and every byte is released.
fn release_holder(c: &mut redis::Connection, proxy: &Proxy, archiving: Held) {
    proxy.release();
    archiving.join().unwrap().unwrap();
    assert_eq!(info_field(c, "buffered_bytes"), 0, "all released");
}

/// However many flows a sweep has in flight, the module holds at most `buffer-max-bytes` of them
/// (captured logs, encoded objects and the logs kept for the commit, INFO `buffered_bytes`) while
/// more than one flow holds bytes: at concurrency 8 with flows of about 400 kB and a 1 MB budget, the
/// sweep begins no flow while the budget is reached and a copy that would pass it is refused (the flow
/// stays live for the next sweep). Every flow ends archived, every event as written.
#[test]
fn flows_in_flight_hold_no_more_than_buffer_max_bytes() {
    let budget: i64 = 1 << 20;
    let s3 = S3::new_bucket();
    let srv = server_via(
        &s3,
        None,
        &["concurrency", "8", "buffer-max-bytes", &budget.to_string()],
    );
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    let ids: Vec<String> = (0..12).map(|i| format!("wide-{i:02}")).collect();
    for id in &ids {
        // 1,600 events of about 250 bytes.
        let spec = FlowSpec {
            events: 1600,
            ..FlowSpec::done(id)
        };
        model.write(&mut c, &spec);
    }
    // Without the budget this sweep holds about 2.9 MB at once.
    let peak = swept_within(&srv, &s3, &model, &ids, budget);
    assert!(peak > budget / 4, "{peak}: the flows were not held at all");
}

/// The same holds of snapshots: at concurrency 8 with flows whose snapshots are 2 MiB each (copied
/// in steps, after the judgement) and a 4 MiB budget, a snapshot that would take the module past the
/// budget while other flows hold bytes is measured, not copied (the flow stays live for the next
/// sweep). Every flow ends archived, its snapshot as written.
#[test]
fn snapshots_in_flight_hold_no_more_than_buffer_max_bytes() {
    let budget: i64 = 4 << 20;
    let s3 = S3::new_bucket();
    let srv = server_via(
        &s3,
        None,
        &["concurrency", "8", "buffer-max-bytes", &budget.to_string()],
    );
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    let ids: Vec<String> = (0..8).map(|i| format!("large-{i:02}")).collect();
    for id in &ids {
        let spec = FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        model.write_padded(&mut c, &spec, 2 << 20);
    }
    swept_within(&srv, &s3, &model, &ids, budget);
}

/// And of snapshots copied whole for their own status or last update: under `state snapshot`, flows
/// with snapshots of 2 MiB and no status entry (one with an entry but no score) are judged by their
/// snapshot, which the step that judges them copies whole. While another flow's upload holds bytes
/// and a copy would take the module past `buffer-max-bytes`, each is measured, not copied, and stays
/// live (the module's heap does not rise by a snapshot), under a sweep and a DRYRUN alike; a DRYRUN
/// with nothing else in flight counts each copy while it holds it. Swept at concurrency 8 under a 4
/// MiB budget, every flow ends archived as written, with no more held at once than the budget allows.
#[test]
fn snapshots_judged_whole_are_measured_before_they_are_copied() {
    let budget: i64 = 4 << 20;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(
        &s3,
        Some(&proxy),
        &["state", "snapshot", "concurrency", "8"],
    );
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    let ids: Vec<String> = (0..8).map(|i| format!("judged-{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let spec = FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        model.write_padded(&mut c, &spec, 2 << 20);
        let member = format!("flow:{id}");
        match i {
            0 => cmd::<()>(&mut c, &["ZREM", "argyll:idx:status:completed", &member]),
            _ => cmd::<()>(&mut c, &["HDEL", "argyll:idx:status", &member]),
        }
        .unwrap();
    }
    // A small flow's upload holds a few kB while its PUT waits; under a 1 MiB budget no other flow
    // may copy a snapshot of 2 MiB meanwhile.
    let holder = FlowSpec {
        snapshot: Snapshot::Current,
        ..FlowSpec::done("holder")
    };
    let (archiving, peak) = hold_holder(&srv, &mut c, &proxy, &mut model, holder);
    for id in &ids {
        let refused = err_text(archive(&mut c, id));
        assert!(refused.contains("buffer-max-bytes"), "{id}: {refused}");
    }
    // A sweep selects the flows by their score (all but the first) and the holder, which it finds
    // in flight.
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["candidates"]), ids.len() as i64, "{summary:?}");
    assert_eq!(
        int(&summary["skipped_ineligible"]),
        ids.len() as i64,
        "{summary:?}"
    );
    let rise = info_field(&mut c, "heap_bytes_peak") - peak;
    assert!(rise < 512 << 10, "the refused flows copied {rise} bytes");
    // A DRYRUN refuses them alike (it would archive the holder only).
    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    let listed: Vec<String> = redis::from_redis_value(&dry["flows"]).unwrap();
    assert_eq!(listed, ["holder"], "{dry:?}");
    let rise = info_field(&mut c, "heap_bytes_peak") - peak;
    assert!(rise < 512 << 10, "the DRYRUN copied {rise} bytes");
    release_holder(&mut c, &proxy, archiving);

    // Nothing else in flight: a DRYRUN copies each alone, counted while it holds it.
    config_set(&mut c, "flowarchive.buffer-max-bytes", &budget.to_string()).unwrap();
    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    let listed: Vec<String> = redis::from_redis_value(&dry["flows"]).unwrap();
    assert_eq!(listed.len(), ids.len() - 1, "{dry:?}");
    let peak = info_field(&mut c, "buffered_bytes_peak");
    assert!(
        peak >= 2 << 20,
        "{peak}: the DRYRUN's copies were not counted"
    );
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "all released");

    // No sweep selects a flow without a score: it is archived by its id.
    archive(&mut c, &ids[0]).unwrap();
    let mut archived = 1;
    for _ in 0..ids.len() {
        let summary = sweep(&mut c, &[]).unwrap();
        archived += int(&summary["archived"]);
        if archived == ids.len() as i64 {
            break;
        }
    }
    assert_eq!(archived, ids.len() as i64);
    let peak = info_field(&mut c, "buffered_bytes_peak");
    assert!(
        peak <= budget + budget / 4,
        "{peak} bytes held at once, over buffer-max-bytes {budget}"
    );
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "all released");
    // The checker reads each flow's state as the engine folds it, its snapshot in the object.
    config_set(&mut c, "flowarchive.state", "fold").unwrap();
    checker::check_swept("after the sweeps", &srv, &s3, &model, ids.len() + 1);
}

/// And of labels: at concurrency 8 with flows whose labels hashes hold 2 MiB each (read in steps,
/// the first MiB in the step that judges the flow) and a 4 MiB budget, a label that would take the
/// module past the budget while other flows hold bytes is measured, not copied (the flow stays live
/// for the next sweep). Every flow ends archived, with its labels as written.
#[test]
fn labels_in_flight_hold_no_more_than_buffer_max_bytes() {
    let budget: i64 = 4 << 20;
    let s3 = S3::new_bucket();
    let srv = server_via(
        &s3,
        None,
        &["concurrency", "8", "buffer-max-bytes", &budget.to_string()],
    );
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    let ids: Vec<String> = (0..8).map(|i| format!("labeled-{i:02}")).collect();
    for id in &ids {
        model.write_labeled(&mut c, &FlowSpec::done(id), 2 << 20);
    }
    swept_within(&srv, &s3, &model, &ids, budget);
}

/// And of a labels hash's first step: a label of 8 MiB, more than that step reads of any labels
/// hash (1 MiB), is measured before it is copied too. While another flow's upload holds bytes and it
/// would take the module past `buffer-max-bytes`, a FLOW, a sweep and a DRYRUN each refuse its flow,
/// the module's heap not rising by the label; with nothing else in flight it is archived as written.
#[test]
fn a_large_label_is_measured_before_the_first_step_copies_it() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    let id = "one-large-label";
    model.write(&mut c, &FlowSpec::done(id));
    let value: String = (0..8 << 20)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let mut pipe = redis::pipe();
    add_labels(&mut pipe, id, &[("large", &value)]);
    pipe.query::<()>(&mut c).unwrap();
    model
        .flows
        .get_mut(id)
        .unwrap()
        .labels
        .push(("large".into(), value));
    let holder = FlowSpec::done("holder");
    let (archiving, peak) = hold_holder(&srv, &mut c, &proxy, &mut model, holder);
    let refused = err_text(archive(&mut c, id));
    assert!(refused.contains("buffer-max-bytes"), "{refused}");
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    let listed: Vec<String> = redis::from_redis_value(&dry["flows"]).unwrap();
    assert_eq!(listed, ["holder"], "{dry:?}");
    let rise = info_field(&mut c, "heap_bytes_peak") - peak;
    assert!(rise < 512 << 10, "the refused flow copied {rise} bytes");
    release_holder(&mut c, &proxy, archiving);

    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    checker::check_swept("archived", &srv, &s3, &model, 2);
}

/// A flood of GETs of unknown ids while no index exists for the DB (every one searched in the
/// bucket): each is answered, nil or the busy error, never more than two HEADs per id asked, and the
/// server answers other clients throughout. 16 clients of a read-only user ask 100 distinct ids each.
#[test]
fn a_flood_of_unknown_ids_without_an_index_costs_two_heads_each_at_most() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["cache-bytes", "0"]);
    let mut c = srv.conn();
    cmd::<()>(
        &mut c,
        &[
            "ACL",
            "SETUSER",
            "reader",
            "on",
            "nopass",
            "+@flowarchive",
            "~*",
        ],
    )
    .unwrap();
    let before = proxy.requests().len();
    let clients: Vec<_> = (0..16)
        .map(|n| {
            let mut r = srv.conn();
            std::thread::spawn(move || {
                cmd::<()>(&mut r, &["AUTH", "reader", "x"]).unwrap();
                let (mut nil, mut busy) = (0, 0);
                for i in 0..100 {
                    match get(&mut r, &format!("unknown-{n}-{i}")) {
                        Ok(None) => nil += 1,
                        Err(e) if e.to_string().contains("busy") => busy += 1,
                        other => panic!("unknown-{n}-{i}: {other:?}"),
                    }
                }
                (nil, busy)
            })
        })
        .collect();
    // Other clients are served while the flood runs.
    for _ in 0..20 {
        assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut nil, mut busy) = (0, 0);
    for client in clients {
        let (n, b) = client.join().unwrap();
        nil += n;
        busy += b;
    }
    assert_eq!(nil + busy, 1600);
    let asked = &proxy.requests()[before..];
    assert!(asked.iter().all(|r| r.starts_with("HEAD ")), "only HEADs");
    assert!(
        asked.len() <= 2 * nil,
        "{} requests for {nil} ids searched",
        asked.len()
    );
    assert!(nil > 0, "every GET refused busy");
}

/// Writes `spec` with every event past the first five carrying `pad` bytes more in its value (an
/// `attribute_set` the engine folds like any other), and answers the events as written.
fn write_padded(c: &mut redis::Connection, spec: &FlowSpec, pad: usize) -> Vec<String> {
    write_flow(c, spec);
    let events: Vec<String> = (0..spec.events)
        .map(|i| {
            let mut event: serde_json::Value = serde_json::from_str(&event_json(spec, i)).unwrap();
            if i >= 5 {
                event["data"]["value"]["note"] = "p".repeat(pad).into();
            }
            event.to_string()
        })
        .collect();
    let key = format!("argyll:flow:{}:events", spec.id);
    cmd::<()>(c, &["DEL", &key]).unwrap();
    let mut rpush = vec!["RPUSH", key.as_str()];
    rpush.extend(events.iter().map(String::as_str));
    cmd::<()>(c, &rpush).unwrap();
    events
}

/// A live read is held to `buffer-max-bytes` like a capture: while an archive's upload holds most of
/// the budget (its log kept for the commit to compare), a GET of another live flow that would pass
/// it, by its events or by its snapshot (one read in the command, one in steps), is refused with a
/// retry, copying nothing more; once the archive is done the same GETs answer the flows, every event
/// as written.
#[test]
fn a_live_read_is_refused_with_a_retry_while_the_buffers_are_full() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["buffer-max-bytes", "1048576"]);
    let mut c = srv.conn();
    // 800 events of about 1 kB: a whole log, kept until the commit.
    let big = FlowSpec {
        events: 800,
        ..FlowSpec::done("big")
    };
    write_padded(&mut c, &big, 1000);
    let other = FlowSpec {
        events: 400,
        ..FlowSpec::done("other")
    };
    let other_events = write_padded(&mut c, &other, 1000);
    let snapshotted = [("half", 600_000), ("large", 1_500_000)];
    for (id, len) in snapshotted {
        write_padded_flow(&mut c, id, len);
    }
    proxy.hold("PUT");
    let mut a = srv.conn();
    let archiving = std::thread::spawn(move || archive(&mut a, "big"));
    wait_for(
        "the upload to hold the log",
        Duration::from_secs(10),
        || info_field(&mut c, "buffered_bytes") > 700_000 && proxy.gated() > 0,
    );
    let peak = info_field(&mut c, "heap_bytes_peak");
    for id in ["other", "half", "large"] {
        let refused = err_text(get_events(&mut c, id));
        assert!(
            refused.contains("buffer-max-bytes") && refused.contains("retry"),
            "{id}: {refused}"
        );
    }
    let rise = info_field(&mut c, "heap_bytes_peak") - peak;
    assert!(rise < 300_000, "the refused reads copied {rise} bytes");
    proxy.release();
    archiving.join().unwrap().unwrap();
    let (_, events) = get_events(&mut c, "other").unwrap();
    assert_eq!(events, other_events);
    for (id, _) in snapshotted {
        let spec = FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        let (state, events) = get_events(&mut c, id).unwrap();
        assert_eq!(
            (state, events),
            (state_json(&spec), events_of(&spec)),
            "{id}"
        );
    }
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0);
}

/// Whether the last of `lens` (event sizes) starts a new block of a captured event log: a block is
/// as large as all before it together, at least 4096 bytes and at least the event
/// (`format::event_log`), and an event that does not fit the last block's room starts the next.
fn last_starts_a_block(lens: &[usize]) -> bool {
    let (mut capacity, mut room, mut started) = (0, 0, false);
    for (i, &len) in lens.iter().enumerate() {
        started = i == 0 || len > room;
        if started {
            let block = capacity.max(4096).max(len);
            capacity += block;
            room = block;
        }
        room -= len;
    }
    started
}

/// A large live `GET … EVENTS` (a log of 1,100 events, read in chunks) while a sweep's upload holds
/// most of `buffer-max-bytes`, at the very point of refusal. Alone, the read takes `M` bytes of the
/// budget at its peak, its last event starting a new block of the log (the largest growth, the one
/// refused). With the sweep holding `H`, a budget of `H + M - 1` refuses the read at that block with
/// a retry, nothing copied past the budget and all of it released; a budget of `H + M` answers it
/// whole. The sweep loses nothing (every event of both flows checked), and once it is done the read
/// answers under the budget that refused it.
#[test]
fn a_long_live_read_is_refused_at_the_block_that_would_pass_the_budget() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["concurrency", "1"]);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    // 700 events of about 1 kB: kept whole for the commit while the upload waits.
    let big = FlowSpec {
        events: 700,
        ..FlowSpec::done("big")
    };
    model.write(&mut c, &big);
    model.flows.get_mut("big").unwrap().events = write_padded(&mut c, &big, 1000);
    // 1,100 events of about 300 bytes, still running (no sweep takes it), the last one grown until
    // it starts a new block.
    let reader = FlowSpec {
        events: 1100,
        status: "active",
        ..FlowSpec::done("reader")
    };
    model.write(&mut c, &reader);
    let mut events = write_padded(&mut c, &reader, 100);
    let last = events.len() - 1;
    let mut pad = 100;
    while !last_starts_a_block(&events.iter().map(String::len).collect::<Vec<_>>()) {
        pad += 64;
        let mut event: serde_json::Value = serde_json::from_str(&events[last]).unwrap();
        event["data"]["value"]["note"] = "p".repeat(pad).into();
        events[last] = event.to_string();
    }
    let key = "argyll:flow:reader:events";
    cmd::<()>(&mut c, &["LSET", key, &last.to_string(), &events[last]]).unwrap();
    model.flows.get_mut("reader").unwrap().events = events.clone();

    // Alone: answered whole, its peak the only bytes ever held so far.
    assert_eq!(get_events(&mut c, "reader").unwrap().1, events);
    let alone = info_field(&mut c, "buffered_bytes_peak");
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0);
    assert!(alone > 300_000, "{alone}");

    // The sweep holds its log until the reads below are done.
    proxy.hold("PUT");
    let mut s = srv.conn();
    let sweeping = std::thread::spawn(move || sweep(&mut s, &[]));
    wait_for(
        "the upload to hold the log",
        Duration::from_secs(60),
        || proxy.gated() > 0,
    );
    let held = info_field(&mut c, "buffered_bytes");
    assert!(held > 700_000, "{held}: the sweep holds most of the budget");

    let budget = held + alone - 1;
    config_set(&mut c, "flowarchive.buffer-max-bytes", &budget.to_string()).unwrap();
    let refused = match get_events(&mut c, "reader") {
        Ok((_, answered)) => panic!("{} events answered past the budget", answered.len()),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains("buffer-max-bytes") && refused.contains("retry"),
        "{refused}"
    );
    assert!(refused.len() < 300, "{refused}");
    assert_eq!(info_field(&mut c, "buffered_bytes"), held, "all released");
    let peak = info_field(&mut c, "buffered_bytes_peak");
    assert!(peak <= budget, "{peak} held at once, over {budget}");

    config_set(
        &mut c,
        "flowarchive.buffer-max-bytes",
        &(budget + 1).to_string(),
    )
    .unwrap();
    assert_eq!(get_events(&mut c, "reader").unwrap().1, events);
    assert_eq!(
        info_field(&mut c, "buffered_bytes"),
        held,
        "the sweep held on"
    );
    assert_eq!(info_field(&mut c, "buffered_bytes_peak"), budget + 1);

    proxy.release();
    assert_eq!(int(&sweeping.join().unwrap().unwrap()["archived"]), 1);
    config_set(&mut c, "flowarchive.buffer-max-bytes", &budget.to_string()).unwrap();
    assert_eq!(get_events(&mut c, "reader").unwrap().1, events);
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0);
    checker::check(
        "after the sweep",
        &srv,
        &s3,
        &model,
        checker::Expect::Settled { retention_ms: 0 },
    );
    assert!(srv.log().lines().all(|l| !l.contains("panic")));
}

/// The index lookups that probe which index keys exist (the other format's, earlier names') ask the
/// caller's rights on every key they then read, and a read searches the bucket only when no index key
/// exists at all: a user who may read the flow's keys but not the index is refused before any probe,
/// with no request to the bucket, whether the index exists or not; one who may read the index but not
/// an earlier name that holds entries is refused too; one who may read the index, in a DB with none,
/// gets nil after at most two HEADs.
#[test]
fn a_user_who_may_not_read_the_index_causes_no_bucket_lookup() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["cache-bytes", "0"]);
    let mut c = srv.conn();
    for (user, keys) in [
        ("flows-only", &["~argyll:*"][..]),
        ("index-too", &["~argyll:*", "~archived:flows"][..]),
    ] {
        let mut args = vec!["ACL", "SETUSER", user, "on", "nopass", "+@all"];
        args.extend(keys);
        cmd::<()>(&mut c, &args).unwrap();
    }
    let as_user = |user: &str, db: &str| {
        let mut u = srv.conn();
        cmd::<()>(&mut u, &["AUTH", user, "x"]).unwrap();
        cmd::<()>(&mut u, &["SELECT", db]).unwrap();
        u
    };
    // DB 1 holds no index key; DB 0 an index and, under an earlier name, another.
    write_flow(&mut c, &FlowSpec::done("archived-one"));
    archive(&mut c, "archived-one").unwrap();
    let requests = || proxy.requests().len();
    for db in ["0", "1"] {
        let before = requests();
        let mut flows_only = as_user("flows-only", db);
        for id in ["archived-one", "unknown"] {
            let e = err_text(get(&mut flows_only, id));
            assert!(
                e.starts_with("NOPERM") && e.contains("archived:flows"),
                "DB {db}, {id}: {e}"
            );
        }
        assert_eq!(requests(), before, "DB {db}: no request to the bucket");
    }
    let before = requests();
    let mut index_too = as_user("index-too", "1");
    assert_eq!(get(&mut index_too, "unknown").unwrap(), None);
    let asked = requests() - before;
    assert!((1..=2).contains(&asked), "{asked} requests");

    cmd::<()>(&mut c, &["HSET", "old:flows", "elsewhere", "s3://x/y"]).unwrap();
    config_set(&mut c, "flowarchive.index-read-keys", "old:flows").unwrap();
    let before = requests();
    let mut index_too = as_user("index-too", "0");
    let e = err_text(get(&mut index_too, "unknown"));
    assert!(e.starts_with("NOPERM") && e.contains("old:flows"), "{e}");
    assert_eq!(requests(), before, "no request to the bucket");
}

/// Sweeps until every one of `ids` (flows of `model` on `srv`) is archived, with no more held at
/// once (INFO `buffered_bytes_peak`) than `budget` and a quarter (an encoded object may come on top
/// of a flow's copy before that is freed), every byte released after, and every flow archived as
/// written (the checker). The peak.
fn swept_within(srv: &Server, s3: &S3, model: &checker::Model, ids: &[String], budget: i64) -> i64 {
    let mut c = srv.conn();
    let mut archived = 0;
    for _ in 0..ids.len() {
        let summary = sweep(&mut c, &[]).unwrap();
        archived += int(&summary["archived"]);
        if archived == ids.len() as i64 {
            break;
        }
    }
    assert_eq!(archived, ids.len() as i64);
    let peak = info_field(&mut c, "buffered_bytes_peak");
    assert!(
        peak <= budget + budget / 4,
        "{peak} bytes held at once, over buffer-max-bytes {budget}"
    );
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "all released");
    checker::check_swept("after the sweeps", srv, s3, model, ids.len());
    peak
}
