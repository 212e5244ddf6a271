//! Valkey Cluster: routing by the flow id, per-node sweeps and the cron fan-out, the
//! per-slot co-located index, the cluster layout rules, and chaos (failover, a primary killed, slot
//! migration) in the middle of sweeps, on a real 3+3 cluster started by the test. Quick by default;
//! FLOWARCHIVE_CHAOS=long runs more flows and more rounds.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::*;
use common::index::{convert_index, rebuild_index};
use common::proxy::{Fault, Proxy, Rule};
use common::*;

/// A cluster of `flavor` whose nodes reach S3 through `proxy` when given.
fn bed(flavor: Flavor, proxy: Option<&Proxy>) -> (S3, Cluster) {
    let s3 = S3::new_bucket();
    let endpoint = proxy.map(Proxy::endpoint).unwrap_or_else(s3_endpoint);
    let mut args = s3.module_args(&endpoint);
    args.extend(layout_args());
    args.extend(["retention", "1h", "concurrency", "2"].map(String::from));
    let cluster = Cluster::start(flavor, &args);
    (s3, cluster)
}

/// `count` eligible flows plus a few that are not terminal or not idle long enough.
fn mixed_flows(count: usize) -> Vec<TFlow> {
    let now = now_ms();
    let mut flows: Vec<TFlow> = (0..count)
        .map(|i| TFlow::done(format!("f-{}-{i}", unique("c")), 3 + i % 7))
        .collect();
    for i in 0..count / 5 + 1 {
        flows.push(TFlow {
            status: "active",
            ..TFlow::done(format!("active-{}-{i}", unique("c")), 4)
        });
        flows.push(TFlow {
            last_ms: now,
            ..TFlow::done(format!("recent-{}-{i}", unique("c")), 4)
        });
    }
    flows
}

fn eligible_ids(flows: &[TFlow]) -> BTreeSet<String> {
    flows
        .iter()
        .filter(|f| f.eligible())
        .map(|f| f.id.clone())
        .collect()
}

fn write_all(cluster: &mut Cluster, flows: &[TFlow]) {
    let mut client = cluster.client();
    for f in flows {
        f.write(&mut client);
    }
    // On every replica before any fault: a killed primary takes the writes it has not sent with it.
    cluster.wait_replicated();
}

/// `COMMAND INFO` declares the id as a routing-only key (key spec flag `not_key`), so `COMMAND
/// GETKEYS` (and ACL key checks) see no key; a node that does not own the id's slot answers -MOVED;
/// a cluster client (Rust and redis-py) reaches the owner at once.
fn routing(flavor: Flavor) {
    let (_s3, mut cluster) = bed(flavor, None);
    for command in ["FLOWARCHIVE.FLOW", "FLOWARCHIVE.GET"] {
        let info: Vec<redis::Value> = cluster.on(0, &["COMMAND", "INFO", command]).unwrap();
        let redis::Value::Array(fields) = &info[0] else {
            panic!("COMMAND INFO {command}: {info:?}")
        };
        assert_eq!(
            (int(&fields[3]), int(&fields[4]), int(&fields[5])),
            (1, 1, 1),
            "{command}: first key, last key, step"
        );
        assert!(
            format!("{:?}", fields[8]).contains("not_key"),
            "{command} key spec: {:?}",
            fields[8]
        );
        let e = err_text(cluster.on::<Vec<String>>(0, &["COMMAND", "GETKEYS", command, "abc"]));
        assert!(e.contains("no key arguments"), "{command}: {e}");
    }

    let flows: Vec<TFlow> = (0..24)
        .map(|i| TFlow::done(format!("route-{i}"), 3))
        .collect();
    write_all(&mut cluster, &flows);
    // Straight to a node that does not own the slot: -MOVED naming the slot, nothing done there.
    for f in &flows[..6] {
        let slot = slot_of(&f.id);
        let owner = cluster.owner(slot);
        let other = cluster.other_than(owner);
        for command in ["FLOWARCHIVE.GET", "FLOWARCHIVE.FLOW"] {
            let e = err_text(cluster.on::<redis::Value>(other, &[command, &f.id]));
            assert!(
                e.contains(&format!("{slot}")) && e.to_lowercase().contains("moved"),
                "{e}"
            );
        }
        let state: String = cluster.on(owner, &["FLOWARCHIVE.GET", &f.id]).unwrap();
        assert_eq!(state, f.state());
    }
    // Through the cluster client: no redirection at all.
    for i in 0..cluster.nodes.len() {
        cluster.on::<()>(i, &["CONFIG", "RESETSTAT"]).unwrap();
    }
    let mut client = cluster.client();
    for f in &flows[..12] {
        let reply: redis::Value = redis::cmd("FLOWARCHIVE.FLOW")
            .arg(&f.id)
            .query(&mut client)
            .unwrap_or_else(|e| panic!("FLOW {}: {e}", f.id));
        assert_eq!(int(&reply_map(reply)["events"]), f.events as i64);
    }
    for f in &flows {
        let state: String = redis::cmd("FLOWARCHIVE.GET")
            .arg(&f.id)
            .query(&mut client)
            .unwrap();
        assert!(state.contains(&f.id));
    }
    assert_eq!(cluster.moved_total(), 0, "redirections");
    // redis-py's RedisCluster routes by COMMAND INFO alone: it refuses a command that declares no key.
    let ids: Vec<&str> = flows.iter().map(|f| f.id.as_str()).collect();
    let script = format!(
        "import redis, json, sys\n\
         rc = redis.RedisCluster(host='127.0.0.1', port={}, decode_responses=True)\n\
         for i in json.loads(sys.argv[1]):\n    assert i in rc.execute_command('FLOWARCHIVE.GET', i)\n",
        cluster.nodes[0].port
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script, &serde_json::to_string(&ids).unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redis-py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cluster.moved_total(), 0, "redirections of redis-py");
    // ACL checks the flow's real keys, never the id: a user whose key patterns match no id reads a
    // live flow, and cannot archive without rights on the slot's index hash.
    let live = &flows[20];
    let owner = cluster.owner(slot_of(&live.id));
    cluster
        .on::<()>(
            owner,
            &[
                "ACL",
                "SETUSER",
                "reader",
                "on",
                ">pw",
                "+@flowarchive",
                "~argyll:*",
            ],
        )
        .unwrap();
    let mut c = cluster.conn(owner);
    cmd::<()>(&mut c, &["AUTH", "reader", "pw"]).unwrap();
    let state: String = cmd(&mut c, &["FLOWARCHIVE.GET", &live.id]).unwrap();
    assert_eq!(state, live.state());
    let e = err_text(archive(&mut c, &live.id));
    let index = slot_index_key(slot_of(&live.id));
    assert!(e.contains("NOPERM") || e.contains("permission"), "{e}");
    assert!(e.contains(&index), "the refusal names {index}: {e}");
    let archived = cluster.check(&flows);
    assert_eq!(archived.len(), 12);
}

#[test]
fn flow_and_get_route_to_the_flow_slot_without_redirections() {
    routing(Flavor::Valkey9);
}

#[test]
fn valkey8_flow_and_get_route_to_the_flow_slot_without_redirections() {
    routing(Flavor::Valkey8);
}

/// A template whose key would leave the flow's slot, and an id whose braces would break the hash
/// tag, are refused with an error that names the template or the id; nothing is deleted.
#[test]
fn untagged_templates_and_unplaceable_ids_are_refused() {
    let (_s3, mut cluster) = bed(Flavor::Valkey9, None);
    let flow = TFlow::done("plain", 3);
    write_all(&mut cluster, std::slice::from_ref(&flow));
    let owner = cluster.owner(slot_of("plain"));
    let before = dump_all(&mut cluster.conn(owner));
    for (config, template) in [
        ("events-key", "$prefix:flow:$id:events"),
        ("labels-key", "$prefix:labels:$id"),
        ("index-key", "archived:$id"),
    ] {
        let old: Vec<String> = cluster
            .on(owner, &["CONFIG", "GET", &format!("flowarchive.{config}")])
            .unwrap();
        cluster
            .on::<()>(
                owner,
                &["CONFIG", "SET", &format!("flowarchive.{config}"), template],
            )
            .unwrap();
        let e = err_text(archive(&mut cluster.conn(owner), "plain"));
        assert!(
            e.contains(config),
            "the error names the template {config}: {e}"
        );
        cluster
            .on::<()>(
                owner,
                &["CONFIG", "SET", &format!("flowarchive.{config}"), &old[1]],
            )
            .unwrap();
        assert_same(&before, &dump_all(&mut cluster.conn(owner)), config);
    }
    // Braces in the id: the server routes by the id's own tag, the keys hash by `{<id>}`.
    for id in ["a{b}c", "x}y", "{z"] {
        let f = TFlow::done(id, 2);
        let keys_slot = redis::cluster_routing::get_slot(tagged_keys(id)[0].as_bytes());
        let node = cluster.owner(keys_slot);
        f.write(&mut cluster.conn(node));
        let route = cluster.owner(slot_of(id));
        let before = dump_all(&mut cluster.conn(node));
        let e = err_text(archive(&mut cluster.conn(route), id));
        assert!(e.contains('{') || e.contains("brace"), "{id}: {e}");
        assert_same(&before, &dump_all(&mut cluster.conn(node)), id);
    }
    archive(&mut cluster.conn(owner), "plain").unwrap();
    cluster.check(&[flow]);
}

/// The cron script pointed at a replica sweeps every primary in parallel; each archives exactly the
/// eligible flows of its slots, indexes them in its own slots, and the replicas follow.
fn fan_out(flavor: Flavor) {
    let (_s3, mut cluster) = bed(flavor, None);
    let flows = mixed_flows(if long_chaos() { 300 } else { 45 });
    write_all(&mut cluster, &flows);
    let eligible = eligible_ids(&flows);

    let e = err_text(cluster.sweep(3, &[]));
    assert!(
        e.contains("replica"),
        "a sweep on a replica is refused: {e}"
    );
    let dry = cluster.sweep(0, &["DRYRUN"]).unwrap();
    let mine: BTreeSet<String> = eligible
        .iter()
        .filter(|id| cluster.owner(slot_of(id)) == 0)
        .cloned()
        .collect();
    let listed: BTreeSet<String> = redis::from_redis_value::<Vec<String>>(&dry["flows"])
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        listed, mine,
        "a node selects exactly the eligible flows of its slots"
    );

    let (code, out, err) = cluster.cron(3);
    assert_eq!(code, 0, "cron: {out}\n{err}");
    let total = out.lines().last().unwrap_or_default().to_string();
    assert!(
        total.contains(&format!("archived={}", eligible.len())) && total.contains("failed=0"),
        "{out}"
    );
    assert_eq!(
        out.lines().count(),
        4,
        "one line per primary and the sum: {out}"
    );
    let mut per_node = 0;
    for p in cluster.primaries() {
        let own = eligible
            .iter()
            .filter(|id| cluster.owner(slot_of(id)) == p)
            .count() as i64;
        assert_eq!(info_field(&mut cluster.conn(p), "last_sweep_archived"), own);
        per_node += info_field(&mut cluster.conn(p), "flows_archived");
    }
    assert_eq!(per_node, eligible.len() as i64, "INFO sums across nodes");
    assert_eq!(cluster.check(&flows), eligible);
    cluster.assert_replicas_equal();
    // A second run finds nothing left.
    let (code, out, _) = cluster.cron(0);
    assert_eq!(code, 0);
    assert!(out.lines().last().unwrap().contains("archived=0"), "{out}");

    // A user who may not list the shards sweeps the node it names, and is told so.
    let late = mixed_flows(9);
    write_all(&mut cluster, &late);
    let setuser = "ACL SETUSER cron on >pw ~* &* +@all -cluster|shards";
    cluster
        .on::<()>(0, &setuser.split(' ').collect::<Vec<_>>())
        .unwrap();
    let mine: BTreeSet<String> = eligible_ids(&late)
        .into_iter()
        .filter(|id| cluster.owner(slot_of(id)) == 0)
        .collect();
    let user = [("FLOWARCHIVE_USER", "cron"), ("FLOWARCHIVE_PASSWORD", "pw")];
    let (code, out, err) = cluster.cron_with(0, &user);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("+cluster|shards"), "{err}");
    assert!(
        out.lines()
            .last()
            .unwrap()
            .contains(&format!("archived={}", mine.len())),
        "{out}"
    );
    let mut archived = eligible;
    archived.extend(mine);
    let mut all = flows;
    all.extend(late);
    assert_eq!(cluster.check(&all), archived, "only the named node's flows");
}

#[test]
fn cron_sweeps_every_primary_archiving_exactly_the_eligible_flows() {
    fan_out(Flavor::Valkey9);
}

#[test]
fn valkey8_cron_sweeps_every_primary_archiving_exactly_the_eligible_flows() {
    fan_out(Flavor::Valkey8);
}

/// Sweeps started on every primary, slowed by the proxy so they are in the middle of uploads.
fn start_slow_sweeps(cluster: &mut Cluster, proxy: &Proxy) {
    proxy.delay("PUT", Duration::from_millis(250));
    for p in cluster.primaries() {
        let started: String = cluster.on(p, &["FLOWARCHIVE.SWEEP", "ASYNC"]).unwrap();
        assert_eq!(started, "STARTED");
    }
    std::thread::sleep(Duration::from_millis(800));
}

/// After chaos: the checker on the intermediate state, then a clean cron run archives the rest,
/// the checker again with every eligible flow archived, and replicas equal to primaries.
fn settle_and_check(cluster: &mut Cluster, proxy: &Proxy, flows: &[TFlow]) {
    cluster.wait_sweeps_done(Duration::from_secs(120));
    proxy.clear();
    cluster.check(flows);
    let node = cluster.any_live();
    let (code, out, err) = cluster.cron(node);
    assert_eq!(code, 0, "cron after chaos: {out}\n{err}");
    assert_eq!(cluster.check(flows), eligible_ids(flows));
    cluster.assert_replicas_equal();
}

/// A coordinated failover (CLUSTER FAILOVER on a replica) and a primary killed outright, both while
/// every primary sweeps: every flow stays live with all its events or is archived with exactly
/// them; the killed node comes back as a replica of its successor with the same data.
#[test]
fn failover_and_a_killed_primary_mid_sweep_lose_nothing() {
    let proxy = Proxy::start(s3_port());
    let (_s3, mut cluster) = bed(Flavor::Valkey9, Some(&proxy));
    let rounds = if long_chaos() { 3 } else { 1 };
    let flows = mixed_flows(if long_chaos() { 240 } else { 60 });
    write_all(&mut cluster, &flows);
    for round in 0..rounds {
        start_slow_sweeps(&mut cluster, &proxy);
        // Failover of the shard of slot 0 to its replica.
        let old = cluster.owner(0);
        let (_, _, replicas) = cluster
            .slot_map(old)
            .into_iter()
            .find(|(r, _, _)| r.0 == 0)
            .unwrap();
        cluster
            .on::<()>(replicas[0], &["CLUSTER", "FAILOVER"])
            .unwrap();
        wait_for("the failover", Duration::from_secs(30), || {
            cluster.owner(0) == replicas[0]
        });
        // Kill the primary of the last range.
        let victim = cluster.owner(16383);
        cluster.nodes[victim].kill();
        cluster.wait_healthy(Duration::from_secs(60));
        assert_ne!(cluster.owner(16383), victim);
        cluster.wait_sweeps_done(Duration::from_secs(120));
        cluster.check(&flows);
        // The killed node restarts from its AOF and nodes.conf and rejoins as a replica.
        cluster.nodes[victim].crash_and_restart();
        cluster.wait_full();
        eprintln!("round {round} done");
    }
    settle_and_check(&mut cluster, &proxy, &flows);
}

/// Slots holding flows move from one primary to another while both sweep (CLUSTER MIGRATESLOTS on
/// Valkey 9, the classic MIGRATING/IMPORTING + MIGRATE resharding on Valkey 8): nothing is archived
/// from a slot in motion, an archive of a slot that moved is abandoned with the flow live, and the
/// flows that arrived are archived on their new node.
fn migration(flavor: Flavor) {
    let proxy = Proxy::start(s3_port());
    let (_s3, mut cluster) = bed(flavor, Some(&proxy));
    let rounds = if long_chaos() { 3 } else { 1 };
    let flows = mixed_flows(if long_chaos() { 240 } else { 60 });
    write_all(&mut cluster, &flows);
    if flavor == Flavor::Valkey9 {
        assert!(
            cluster.has_migrateslots(0),
            "Valkey 9 has CLUSTER MIGRATESLOTS"
        );
    }
    for round in 0..rounds {
        let primaries = cluster.primaries();
        let (from, to) = (primaries[round % 3], primaries[(round + 1) % 3]);
        let slots = cluster.slots_with_flows(from, &flows);
        assert!(!slots.is_empty());
        start_slow_sweeps(&mut cluster, &proxy);
        cluster.move_slots(&slots, from, to);
        for s in &slots {
            assert_eq!(cluster.owner(*s), to);
        }
        cluster.wait_sweeps_done(Duration::from_secs(120));
        cluster.check(&flows);
    }
    settle_and_check(&mut cluster, &proxy, &flows);
}

#[test]
fn slot_migration_mid_sweep_loses_nothing() {
    migration(Flavor::Valkey9);
}

#[test]
fn valkey8_classic_resharding_mid_sweep_loses_nothing() {
    migration(Flavor::Valkey8);
}

/// An archive whose upload is in flight when its slot starts moving is abandoned at commit with the
/// flow live, by the commit's slot check alone (the flow's keys have not moved yet): on Valkey 9 an
/// atomic slot migration towards a stopped target (so it stays in flight), on Valkey 8 the classic
/// MIGRATING/IMPORTING state.
fn in_flight(flavor: Flavor) {
    let proxy = Proxy::start(s3_port());
    let (_s3, mut cluster) = bed(flavor, Some(&proxy));
    let flow = TFlow::done("moving", 6);
    write_all(&mut cluster, std::slice::from_ref(&flow));
    let slot = slot_of(&flow.id);
    let from = cluster.owner(slot);
    let to = cluster.other_than(from);
    proxy.set(vec![Rule {
        method: "PUT",
        path: "flows/moving".into(),
        fault: Fault::Gate,
    }]);
    let port = cluster.nodes[from].port;
    let archiving = std::thread::spawn(move || {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
        archive(&mut client.get_connection().unwrap(), "moving").map(|_| ())
    });
    wait_for("the upload held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    let s = slot.to_string();
    let atomic = cluster.has_migrateslots(from);
    if atomic {
        signal("-STOP", cluster.nodes[to].pid());
        cluster
            .on::<()>(
                from,
                &[
                    "CLUSTER",
                    "MIGRATESLOTS",
                    "SLOTSRANGE",
                    &s,
                    &s,
                    "NODE",
                    &cluster.ids[to],
                ],
            )
            .unwrap();
        wait_for("the export to start", Duration::from_secs(10), || {
            info_field(&mut cluster.conn(from), "cluster_slots_migrating") == 1
        });
        let dry = cluster.sweep(from, &["DRYRUN"]).unwrap();
        assert_eq!(
            int(&dry["candidates"]),
            0,
            "nothing selected from a slot in motion"
        );
    } else {
        let (from_id, to_id) = (cluster.ids[from].clone(), cluster.ids[to].clone());
        cluster
            .on::<()>(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
            .unwrap();
        cluster
            .on::<()>(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
            .unwrap();
    }
    proxy.release();
    let e = err_text(archiving.join().unwrap());
    assert!(e.contains("slot"), "abandoned by the slot check: {e}");
    assert_eq!(info_field(&mut cluster.conn(from), "flows_archived"), 0);
    assert_eq!(
        info_field(&mut cluster.conn(from), "failures_slot_moved"),
        1
    );
    if atomic {
        signal("-CONT", cluster.nodes[to].pid());
        // Stopped longer than the node timeout, the target may have been failed over and the
        // export aborted; either way the source sees the migration end.
        wait_for("the export to end", Duration::from_secs(60), || {
            info_field(&mut cluster.conn(from), "cluster_slots_migrating") == 0
        });
        cluster.wait_healthy(Duration::from_secs(60));
        assert!(info_field(&mut cluster.conn(from), "cluster_slot_migrations_seen") >= 1);
    } else {
        // Reads of the slot go to the importing node (ASK: the id is no key here), which cannot
        // tell "not found" yet and answers TRYAGAIN instead of a false nil.
        let e = err_text(cluster.on::<redis::Value>(from, &["FLOWARCHIVE.GET", "moving"]));
        assert!(e.to_lowercase().contains("ask"), "{e}");
        let mut target = cluster.conn(to);
        cmd::<()>(&mut target, &["ASKING"]).unwrap();
        let e = err_text(cmd::<redis::Value>(
            &mut target,
            &["FLOWARCHIVE.GET", "moving"],
        ));
        assert!(e.to_lowercase().contains("tryagain"), "{e}");
        // The migration is called off.
        for i in [from, to] {
            cluster
                .on::<()>(i, &["CLUSTER", "SETSLOT", &s, "STABLE"])
                .unwrap();
        }
    }
    proxy.clear();
    // Live with all its events on the slot's owner now; it archives there.
    assert!(
        cluster.check(std::slice::from_ref(&flow)).is_empty(),
        "live"
    );
    let mut client = cluster.client();
    let reply: redis::Value = redis::cmd("FLOWARCHIVE.FLOW")
        .arg("moving")
        .query(&mut client)
        .unwrap();
    assert_eq!(int(&reply_map(reply)["events"]), 6);
    assert_eq!(cluster.check(std::slice::from_ref(&flow)).len(), 1);
    cluster.assert_replicas_equal();
}

#[test]
fn an_archive_in_flight_when_its_slot_starts_migrating_is_abandoned() {
    in_flight(Flavor::Valkey9);
}

#[test]
fn valkey8_an_archive_in_flight_when_its_slot_starts_migrating_is_abandoned() {
    in_flight(Flavor::Valkey8);
}

/// The internal timer sweeps on each primary (its own slots) and never on a replica.
#[test]
fn the_timer_sweeps_on_every_primary_and_no_replica() {
    let (_s3, mut cluster) = bed(Flavor::Valkey9, None);
    let flows = mixed_flows(20);
    write_all(&mut cluster, &flows);
    for i in 0..cluster.nodes.len() {
        cluster
            .on::<()>(i, &["CONFIG", "SET", "flowarchive.sweep-interval", "1s"])
            .unwrap();
    }
    let eligible = eligible_ids(&flows);
    wait_for("the timer sweeps", Duration::from_secs(30), || {
        let archived: i64 = cluster
            .primaries()
            .into_iter()
            .map(|p| info_field(&mut cluster.conn(p), "flows_archived"))
            .sum();
        archived == eligible.len() as i64
    });
    let primaries = cluster.primaries();
    // A primary whose slots held no eligible flow may not have ticked yet when the others are done.
    wait_for("every primary's timer", Duration::from_secs(30), || {
        primaries
            .iter()
            .all(|&p| info_field(&mut cluster.conn(p), "sweeps_run") > 0)
    });
    for i in 0..cluster.nodes.len() {
        let runs = info_field(&mut cluster.conn(i), "sweeps_run");
        assert_eq!(
            runs > 0,
            primaries.contains(&i),
            "node {i} ran {runs} sweeps"
        );
    }
    assert_eq!(cluster.check(&flows), eligible);
    cluster.assert_replicas_equal();
}

/// The labels of one of `flows` as its node holds them, by name.
fn labels_on(c: &mut redis::Connection, f: &TFlow) -> std::collections::BTreeMap<String, String> {
    let [_, _, _, labels] = tagged_keys(&f.id);
    cmd(c, &["HGETALL", &labels]).unwrap()
}

/// The labels the object its index entry on `c` names for `f` holds in its trailer, by name.
fn archived_labels(
    c: &mut redis::Connection,
    s3: &S3,
    f: &TFlow,
) -> std::collections::BTreeMap<String, String> {
    let index = slot_index_key(slot_of(&f.id));
    let location: String = cmd(c, &["HGET", &index, &f.id]).unwrap();
    let base = format!("s3://{}/{}/", s3.name(), s3.prefix);
    let rel = location
        .strip_prefix(&base)
        .expect("an object of this bucket");
    let object = gunzip(&s3.get(rel).expect("the object"));
    let trailer: serde_json::Value = serde_json::from_str(object.lines().last().unwrap()).unwrap();
    serde_json::from_value(trailer["labels"].clone()).unwrap()
}

/// Two flows whose labels hashes hold 3 MiB each (read in steps, followed by hash events) in one
/// node's slots: a sweep on that node archives the one left alone, which reads back with every
/// event and every label, and keeps the other, whose first label by name is rewritten to other
/// bytes of the same length during its upload (only the watch can see that: the commit counts the
/// fields), live with every label as written. The next sweep archives it with the rewritten label.
/// The replicas follow.
#[test]
fn large_labels_hashes_are_swept_on_their_node_and_a_write_during_the_upload_keeps_the_flow() {
    let proxy = Proxy::start(s3_port());
    let (s3, mut cluster) = bed(Flavor::Valkey9, Some(&proxy));
    let quiet = TFlow::done(format!("quiet-{}", unique("l")), 5);
    let node = cluster.owner(slot_of(&quiet.id));
    let written = (0..)
        .map(|i| TFlow::done(format!("written-{}-{i}", unique("l")), 5))
        .find(|f| cluster.owner(slot_of(&f.id)) == node)
        .unwrap();
    let flows = [quiet.clone(), written.clone()];
    let mut c = cluster.conn(node);
    for f in &flows {
        f.write(&mut c);
        let [_, _, _, key] = tagged_keys(&f.id);
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        for (l, v) in labels_of(&format!("{}-", f.id), 3 << 20) {
            hset.arg(l).arg(v);
        }
        hset.query::<()>(&mut c).unwrap();
    }
    let before = labels_on(&mut c, &quiet);
    let mut want = labels_on(&mut c, &written);
    let (first, value) = want.pop_first().unwrap();
    let other: String = value.chars().rev().collect();
    assert_ne!(other, value);
    want.insert(first.clone(), other.clone());

    let gate = |f: &TFlow| Rule {
        method: "PUT",
        path: f.id.clone(),
        fault: Fault::Gate,
    };
    proxy.set(vec![gate(&quiet), gate(&written)]);
    let mut sweeper = cluster.conn(node);
    let swept = std::thread::spawn(move || sweep(&mut sweeper, &[]));
    wait_for("both uploads held", Duration::from_secs(120), || {
        proxy.gated() == 2
    });
    let [_, _, _, key] = tagged_keys(&written.id);
    cmd::<()>(&mut c, &["HSET", &key, &first, &other]).unwrap();
    proxy.release();
    let summary = swept.join().unwrap().unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    assert_eq!(info_field(&mut c, "hash_events_subscribed"), 1);
    let archived = cluster.check(&flows);
    assert_eq!(archived, BTreeSet::from([quiet.id.clone()]));
    assert!(
        archived_labels(&mut c, &s3, &quiet) == before,
        "archived as written"
    );
    assert!(labels_on(&mut c, &written) == want, "kept as written");

    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    assert_eq!(cluster.check(&flows).len(), 2);
    assert!(
        archived_labels(&mut c, &s3, &written) == want,
        "archived as rewritten"
    );
    cluster.assert_replicas_equal();
}

/// A coordinated failover (CLUSTER FAILOVER on its replica) while a flow whose labels hash holds
/// 3 MiB uploads from its primary: the old primary, now a replica, deletes nothing (its commit is
/// refused by its role, or by the slot it no longer serves), and the new one holds the flow with
/// every event and label, its replica (the old primary) the same. A sweep on the new primary
/// archives it, read back label for label, and it is gone from both.
#[test]
fn a_large_labels_hash_uploading_through_a_failover_is_archived_by_the_new_primary_alone() {
    let proxy = Proxy::start(s3_port());
    let (s3, mut cluster) = bed(Flavor::Valkey9, Some(&proxy));
    let flow = TFlow::done(format!("failover-{}", unique("l")), 5);
    let slot = slot_of(&flow.id);
    let old = cluster.owner(slot);
    let mut c = cluster.conn(old);
    flow.write(&mut c);
    let [_, _, _, key] = tagged_keys(&flow.id);
    let mut hset = redis::cmd("HSET");
    hset.arg(&key);
    for (l, v) in labels_of(&format!("{}-", flow.id), 3 << 20) {
        hset.arg(l).arg(v);
    }
    hset.query::<()>(&mut c).unwrap();
    let labels = labels_on(&mut c, &flow);
    let replica = (cluster.slot_map(old).into_iter())
        .find(|((a, b), _, _)| (*a..=*b).contains(&slot))
        .map(|(_, _, replicas)| replicas[0])
        .unwrap();
    cluster.assert_replicas_equal();

    proxy.set(vec![Rule {
        method: "PUT",
        path: flow.id.clone(),
        fault: Fault::Gate,
    }]);
    let mut archiver = cluster.conn(old);
    let id = flow.id.clone();
    let archiving = std::thread::spawn(move || archive(&mut archiver, &id));
    wait_for("the upload held", Duration::from_secs(120), || {
        proxy.gated() == 1
    });
    cluster.on::<()>(replica, &["CLUSTER", "FAILOVER"]).unwrap();
    wait_for("the failover", Duration::from_secs(30), || {
        cluster.owner(slot) == replica
    });
    proxy.release();
    let answer = archiving.join().unwrap();
    assert!(answer.is_err(), "{answer:?}");
    // Refused by its role, or by the slot it no longer serves.
    wait_for("the commit's decision", Duration::from_secs(20), || {
        let info: String = cmd(&mut c, &["INFO", "flowarchive"]).unwrap();
        info.lines()
            .filter(|l| l.contains("flowarchive_failures_") || l.contains("flows_archived:"))
            .any(|l| !l.ends_with(":0"))
    });
    proxy.clear();
    assert_eq!(info_field(&mut c, "flows_archived"), 0);
    assert!(
        cluster.check(std::slice::from_ref(&flow)).is_empty(),
        "kept live"
    );
    let mut n = cluster.conn(replica);
    assert!(labels_on(&mut n, &flow) == labels, "every label kept");
    cluster.wait_healthy(Duration::from_secs(60));
    cluster.assert_replicas_equal();

    let summary = sweep(&mut n, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    assert_eq!(cluster.check(std::slice::from_ref(&flow)).len(), 1);
    assert!(
        archived_labels(&mut n, &s3, &flow) == labels,
        "archived as written"
    );
    cluster.assert_replicas_equal();
}

// ------------------------------------------------------------------ several DBs (Valkey 9)

/// A Valkey 9.1 cluster with `cluster-databases 4` (SELECT works on every node), its nodes reaching
/// S3 through `proxy` when given.
fn multi_db_bed(proxy: Option<&Proxy>) -> (S3, Cluster) {
    let s3 = S3::new_bucket();
    let endpoint = proxy.map(Proxy::endpoint).unwrap_or_else(s3_endpoint);
    let mut args = s3.module_args(&endpoint);
    args.extend(layout_args());
    args.extend(["retention", "1h", "concurrency", "2"].map(String::from));
    let cluster = Cluster::start_with(Flavor::Valkey9, &args, &["--cluster-databases", "4"]);
    let databases: Vec<String> = cluster
        .on(0, &["CONFIG", "GET", "cluster-databases"])
        .unwrap();
    assert_eq!(databases[1], "4", "the server takes cluster-databases");
    (s3, cluster)
}

/// A connection to node `i` with DB `db` selected.
fn conn_in(cluster: &Cluster, i: usize, db: u32) -> redis::Connection {
    let mut c = cluster.conn(i);
    cmd::<()>(&mut c, &["SELECT", &db.to_string()]).unwrap();
    c
}

/// A connection to the primary that owns `id`'s slot, in DB `db`.
fn owner_in(cluster: &mut Cluster, id: &str, db: u32) -> redis::Connection {
    let owner = cluster.owner(slot_of(id));
    conn_in(cluster, owner, db)
}

/// Writes `flows` into DB `db`, each on its slot's owner, and waits for the replicas.
fn write_in(cluster: &mut Cluster, db: u32, flows: &[TFlow]) {
    for f in flows {
        f.write(&mut owner_in(cluster, &f.id, db));
    }
    cluster.wait_replicated();
}

/// The checker of one DB, on a cluster of several: every flow of `flows` (the flows written in DB
/// `db`) is either live there with exactly its events and no index entry, or archived (no live key,
/// an entry in its slot's index hash in DB `db` on its owner, naming an object of DB `db`'s folder)
/// and answered by GET EVENTS in DB `db` with exactly its state and events. Every index hash of DB
/// `db` sits on the owner of its slot, is named for it, and holds only flows of that slot written in
/// that DB. Answers the archived ids.
fn check_in(cluster: &mut Cluster, s3: &S3, db: u32, flows: &[TFlow]) -> BTreeSet<String> {
    let folder = if db == 0 {
        s3.location("flows/")
    } else {
        s3.location(&format!("db{db}/flows/"))
    };
    let known: BTreeSet<&String> = flows.iter().map(|f| &f.id).collect();
    let mut indexed = BTreeSet::new();
    for p in cluster.primaries() {
        let mut c = conn_in(cluster, p, db);
        let keys: Vec<String> = cmd(&mut c, &["KEYS", &format!("{INDEX_KEY}*")]).unwrap();
        for key in keys {
            let slot = redis::cluster_routing::get_slot(key.as_bytes());
            assert_eq!(cluster.owner(slot), p, "DB {db}: {key} on node {p}");
            assert_eq!(key, slot_index_key(slot), "DB {db}: index hash name");
            let fields: Vec<String> = cmd(&mut c, &["HKEYS", &key]).unwrap();
            for f in fields {
                assert_eq!(slot_of(&f), slot, "DB {db}: {f} in {key}");
                assert!(known.contains(&f), "DB {db}: unknown flow {f} indexed");
                assert!(indexed.insert(f.clone()), "DB {db}: {f} indexed twice");
            }
        }
    }
    let mut archived = BTreeSet::new();
    for f in flows {
        let mut c = owner_in(cluster, &f.id, db);
        let live: i64 = cmd(&mut c, &["EXISTS", &tagged_keys(&f.id)[0]]).unwrap();
        let (state, events) =
            get_events(&mut c, &f.id).unwrap_or_else(|e| panic!("DB {db}: GET {}: {e}", f.id));
        assert_eq!(events, f.event_list(), "DB {db}: events of {}", f.id);
        let entry: Option<String> =
            cmd(&mut c, &["HGET", &slot_index_key(slot_of(&f.id)), &f.id]).unwrap();
        if live == 1 {
            assert_eq!(entry, None, "DB {db}: {} live and indexed", f.id);
            assert_eq!(state, f.state(), "DB {db}: live state of {}", f.id);
        } else {
            let entry = entry.unwrap_or_else(|| panic!("DB {db}: {} gone, not indexed", f.id));
            assert!(
                entry.starts_with(&folder),
                "DB {db}: {} indexed at {entry}, not under {folder}",
                f.id
            );
            assert_eq!(
                state,
                archived_state(&f.state()),
                "DB {db}: state of {}",
                f.id
            );
            for k in tagged_keys(&f.id) {
                let n: i64 = cmd(&mut c, &["EXISTS", &k]).unwrap();
                assert_eq!(n, 0, "DB {db}: {k} of archived flow {}", f.id);
            }
            archived.insert(f.id.clone());
        }
    }
    assert_eq!(
        archived, indexed,
        "DB {db}: archived flows and index entries"
    );
    archived
}

/// The same ids in DB 0 and DB 2, each DB's flow of an id with other events (and, for some ids,
/// finished in one DB and running in the other), plus ids of DB 2 alone.
fn two_db_flows(tag: &str, count: usize) -> (Vec<TFlow>, Vec<TFlow>) {
    let ids: Vec<String> = (0..count).map(|i| format!("{tag}-{i}")).collect();
    let db0 = ids
        .iter()
        .enumerate()
        .map(|(i, id)| TFlow {
            status: if i % 4 == 1 { "active" } else { "completed" },
            ..TFlow::done(id.clone(), 5 + i % 3)
        })
        .collect();
    let db2 = ids
        .iter()
        .enumerate()
        .map(|(i, id)| TFlow {
            status: if i % 4 == 3 { "active" } else { "completed" },
            ..TFlow::done(id.clone(), 9 + i % 4)
        })
        .chain((0..count / 4).map(|i| TFlow::done(format!("{tag}-db2-only-{i}"), 6)))
        .collect();
    (db0, db2)
}

/// Object keys in the bucket under DB `db`'s folder (relative to the test's prefix).
fn objects_of(s3: &S3, db: u32) -> BTreeSet<String> {
    s3.list()
        .into_iter()
        .filter(|k| {
            if db == 0 {
                k.starts_with("flows/")
            } else {
                k.starts_with(&format!("db{db}/flows/"))
            }
        })
        .collect()
}

/// On a cluster of 4 DBs, the same flow ids in DB 0 and DB 2 with other content: FLOWARCHIVE.FLOW in
/// either DB, sweeps by clients that selected DB 2 and then (the cron script, FLOWARCHIVE_DB) DB 0,
/// each archive only its own DB's flows, into its own DB's slot index hash on the owner and its own
/// folder (`db2/flows/`); GET in each DB answers that DB's state and every event, never the other's;
/// DB 1 and 3 see nothing (their reads, finding no index, ask the bucket under `db1/`, `db3/`); each
/// object's header names its DB; with the slot's index hash deleted in DB 0 and DB 2, each DB's read
/// finds its own object in the bucket; a replica answers each DB's archived flow; the replicas hold
/// each DB as their primary does.
#[test]
fn the_same_ids_in_two_dbs_of_a_cluster_archive_and_read_apart() {
    let (s3, mut cluster) = multi_db_bed(None);
    let (db0, db2) = two_db_flows("twin", 16);
    write_in(&mut cluster, 0, &db0);
    write_in(&mut cluster, 2, &db2);

    // FLOW in one DB leaves the other DB's flow of that id alone.
    let (a, b) = (&db0[0].id, &db0[2].id);
    let reply = archive(&mut owner_in(&mut cluster, a, 2), a).unwrap();
    assert_eq!(int(&reply["events"]), db2[0].events as i64);
    let reply = archive(&mut owner_in(&mut cluster, b, 0), b).unwrap();
    assert_eq!(int(&reply["events"]), db0[2].events as i64);
    assert_eq!(
        check_in(&mut cluster, &s3, 2, &db2),
        BTreeSet::from([a.clone()])
    );
    assert_eq!(
        check_in(&mut cluster, &s3, 0, &db0),
        BTreeSet::from([b.clone()])
    );

    // Sweeps of DB 2 on every primary: DB 2's eligible flows only.
    for p in cluster.primaries() {
        let summary = sweep(&mut conn_in(&cluster, p, 2), &[]).unwrap();
        assert_eq!(int(&summary["failed"]), 0, "node {p}: {summary:?}");
    }
    assert_eq!(check_in(&mut cluster, &s3, 2, &db2), eligible_ids(&db2));
    assert_eq!(
        check_in(&mut cluster, &s3, 0, &db0),
        BTreeSet::from([b.clone()])
    );

    // The cron script in DB 0: DB 0's eligible flows only.
    let node = cluster.any_live();
    let (code, out, err) = cluster.cron_with(node, &[("FLOWARCHIVE_DB", "0")]);
    assert_eq!(code, 0, "cron: {out}\n{err}");
    assert_eq!(check_in(&mut cluster, &s3, 0, &db0), eligible_ids(&db0));
    assert_eq!(check_in(&mut cluster, &s3, 2, &db2), eligible_ids(&db2));

    // One object per archived flow, in its DB's folder, its header naming that DB.
    for (db, flows) in [(0u32, &db0), (2, &db2)] {
        let objects = objects_of(&s3, db);
        assert_eq!(
            objects.len(),
            eligible_ids(flows).len(),
            "DB {db}: {objects:?}"
        );
        for key in objects {
            let header = gunzip(&s3.get(&key).unwrap());
            let header: serde_json::Value =
                serde_json::from_str(header.lines().next().unwrap()).unwrap();
            assert_eq!(
                header["db"].as_i64().unwrap_or(0),
                db as i64,
                "{key}: {header}"
            );
        }
    }
    // DB 1 and 3 hold nothing and answer nothing for these ids.
    for db in [1u32, 3] {
        for f in db0.iter().chain(&db2) {
            let mut c = owner_in(&mut cluster, &f.id, db);
            assert_eq!(get(&mut c, &f.id).unwrap(), None, "DB {db}: {}", f.id);
        }
        for p in cluster.primaries() {
            let n: i64 = cmd(&mut conn_in(&cluster, p, db), &["DBSIZE"]).unwrap();
            assert_eq!(n, 0, "DB {db} on node {p}");
        }
    }
    // A replica (READONLY) answers each DB's archived flow of an id from that DB's index.
    for (db, f) in [(2u32, &db2[2]), (0, &db0[2])] {
        let asker = cluster.any_live();
        let slot = slot_of(&f.id);
        let (_, _, replicas) = cluster
            .slot_map(asker)
            .into_iter()
            .find(|((a, b), _, _)| (*a..=*b).contains(&slot))
            .unwrap();
        let mut c = conn_in(&cluster, replicas[0], db);
        cmd::<()>(&mut c, &["READONLY"]).unwrap();
        let (state, events) = get_events(&mut c, &f.id).unwrap();
        assert_eq!(state, archived_state(&f.state()), "DB {db} on a replica");
        assert_eq!(events, f.event_list(), "DB {db} on a replica");
    }
    // With the slot's index hash gone in both DBs, a read asks the bucket in its own DB's folder:
    // DB 2 answers DB 2's object, DB 0 DB 0's, each with every event.
    let (x0, x2) = (&db0[0], &db2[0]);
    let index = slot_index_key(slot_of(&x0.id));
    let probes = |cluster: &mut Cluster| {
        let owner = cluster.owner(slot_of(&x0.id));
        info_field(&mut cluster.conn(owner), "get_index_probes_found")
    };
    let found_before = probes(&mut cluster);
    for (db, f) in [(2u32, x2), (0, x0)] {
        let mut c = owner_in(&mut cluster, &f.id, db);
        cmd::<()>(&mut c, &["DEL", &index]).unwrap();
        let (state, events) = get_events(&mut c, &f.id).unwrap();
        assert_eq!(state, archived_state(&f.state()), "DB {db} from the bucket");
        assert_eq!(events, f.event_list(), "DB {db} from the bucket");
    }
    assert_eq!(
        probes(&mut cluster),
        found_before + 2,
        "both read by the bucket search"
    );
    replicas_equal_in(&mut cluster, &[0, 1, 2, 3]);
}

/// Every primary's replicas hold exactly its data in each DB of `dbs`.
fn replicas_equal_in(cluster: &mut Cluster, dbs: &[u32]) {
    cluster.wait_replicated();
    let asker = cluster.any_live();
    for (_, p, replicas) in cluster.slot_map(asker) {
        for &db in dbs {
            let primary = dump_all(&mut conn_in(cluster, p, db));
            for &r in &replicas {
                let mut rc = conn_in(cluster, r, db);
                cmd::<()>(&mut rc, &["READONLY"]).unwrap();
                wait_for("the replica to catch up", Duration::from_secs(10), || {
                    dump_all(&mut rc) == primary
                });
            }
        }
    }
}

/// On a cluster of 4 DBs, an atomic slot migration (`CLUSTER MIGRATESLOTS`) of the slots of one
/// primary that hold flows, in DB 2 and under the same ids in DB 0, while every primary sweeps DB 2
/// with its uploads held at the proxy: no flow is lost or archived twice, the flows archived before
/// the move are read from their new owner in DB 2, the index entries moved with their slots into DB
/// 2's hashes there, DB 0's flows are untouched, and later sweeps of DB 2 and DB 0 archive the rest.
#[test]
fn an_atomic_slot_migration_mid_sweep_of_db_2_loses_nothing() {
    let proxy = Proxy::start(s3_port());
    let (s3, mut cluster) = multi_db_bed(Some(&proxy));
    assert!(
        cluster.has_migrateslots(0),
        "Valkey 9 has CLUSTER MIGRATESLOTS"
    );
    let (db0, db2) = two_db_flows("mig", 40);
    write_in(&mut cluster, 0, &db0);
    write_in(&mut cluster, 2, &db2);
    let primaries = cluster.primaries();
    let (from, to) = (primaries[0], primaries[1]);
    let slots = cluster.slots_with_flows(from, &db2);
    assert!(!slots.is_empty());
    // A first flow of the moving slots archived in DB 2 before the move.
    let early = db2
        .iter()
        .find(|f| f.eligible() && slots.contains(&slot_of(&f.id)))
        .unwrap();
    archive(&mut conn_in(&cluster, from, 2), &early.id).unwrap();

    proxy.hold("PUT");
    for p in cluster.primaries() {
        let started: String = cmd(
            &mut conn_in(&cluster, p, 2),
            &["FLOWARCHIVE.SWEEP", "ASYNC"],
        )
        .unwrap();
        assert_eq!(started, "STARTED");
    }
    // Two uploads (the concurrency) held on each of the three primaries.
    wait_for("uploads held", Duration::from_secs(60), || {
        proxy.gated() >= 6
    });
    cluster.move_slots(&slots, from, to);
    proxy.release();
    cluster.wait_sweeps_done(Duration::from_secs(120));
    // The old owner's held uploads were of the moved slots: each commit refused.
    let refused = info_field(&mut cluster.conn(from), "failures_slot_moved");
    assert!(refused >= 2, "commits refused for a moved slot: {refused}");
    let moved: Vec<&TFlow> = db2
        .iter()
        .filter(|f| slots.contains(&slot_of(&f.id)))
        .collect();
    for f in &moved {
        assert_eq!(cluster.owner(slot_of(&f.id)), to);
    }
    // Nothing of DB 2's moving slots is left on the old owner, in any DB.
    for db in 0..4u32 {
        let mut c = conn_in(&cluster, from, db);
        for &s in &slots {
            let n: i64 = cmd(&mut c, &["CLUSTER", "COUNTKEYSINSLOT", &s.to_string()]).unwrap();
            assert_eq!(n, 0, "DB {db}: slot {s} keys left on the old owner");
        }
    }
    let archived = check_in(&mut cluster, &s3, 2, &db2);
    assert!(archived.contains(&early.id));
    assert_eq!(check_in(&mut cluster, &s3, 0, &db0), BTreeSet::new());

    // Later sweeps archive the rest, each DB's own, once.
    for db in ["2", "0"] {
        let node = cluster.any_live();
        let (code, out, err) = cluster.cron_with(node, &[("FLOWARCHIVE_DB", db)]);
        assert_eq!(code, 0, "cron in DB {db}: {out}\n{err}");
    }
    assert_eq!(check_in(&mut cluster, &s3, 2, &db2), eligible_ids(&db2));
    assert_eq!(check_in(&mut cluster, &s3, 0, &db0), eligible_ids(&db0));
    for (db, flows) in [(0u32, &db0), (2, &db2)] {
        assert_eq!(
            objects_of(&s3, db).len(),
            eligible_ids(flows).len(),
            "DB {db}: one object per archived flow"
        );
    }
    let archived_total: i64 = (0..cluster.nodes.len())
        .map(|i| info_field(&mut cluster.conn(i), "flows_archived"))
        .sum();
    assert_eq!(
        archived_total as usize,
        eligible_ids(&db0).len() + eligible_ids(&db2).len(),
        "flows archived across the nodes"
    );
    replicas_equal_in(&mut cluster, &[0, 2]);
}

/// On a cluster of 4 DBs, the internal timer sweeps DB 0 on every primary and no other DB, as
/// README and docs/OPERATIONS.md say ("sweeps of DB 0"): DB 2's eligible flows stay live after
/// several timer sweeps, and the cron script with FLOWARCHIVE_DB=2 archives them.
#[test]
fn the_timer_of_a_multi_db_cluster_sweeps_db_0_only() {
    let (s3, mut cluster) = multi_db_bed(None);
    let (db0, db2) = two_db_flows("tick", 12);
    write_in(&mut cluster, 0, &db0);
    write_in(&mut cluster, 2, &db2);
    for i in 0..cluster.nodes.len() {
        cluster
            .on::<()>(i, &["CONFIG", "SET", "flowarchive.sweep-interval", "1s"])
            .unwrap();
    }
    let primaries = cluster.primaries();
    wait_for(
        "three timer sweeps on every primary",
        Duration::from_secs(60),
        || {
            primaries
                .iter()
                .all(|&p| info_field(&mut cluster.conn(p), "sweeps_run") >= 3)
        },
    );
    for i in 0..cluster.nodes.len() {
        cluster
            .on::<()>(i, &["CONFIG", "SET", "flowarchive.sweep-interval", "0s"])
            .unwrap();
    }
    cluster.wait_sweeps_done(Duration::from_secs(60));
    assert_eq!(check_in(&mut cluster, &s3, 0, &db0), eligible_ids(&db0));
    assert_eq!(check_in(&mut cluster, &s3, 2, &db2), BTreeSet::new());
    let node = cluster.any_live();
    let (code, out, err) = cluster.cron_with(node, &[("FLOWARCHIVE_DB", "2")]);
    assert_eq!(code, 0, "cron in DB 2: {out}\n{err}");
    assert_eq!(check_in(&mut cluster, &s3, 2, &db2), eligible_ids(&db2));
}

/// Sweeps DB `db` on node `p` with its uploads held at the proxy, runs `during` while they are held,
/// then lets them go and waits for the sweep's end.
fn held_sweep_in(
    cluster: &mut Cluster,
    proxy: &Proxy,
    p: usize,
    db: u32,
    during: impl FnOnce(&mut Cluster),
) {
    proxy.hold("PUT");
    let started: String = cmd(
        &mut conn_in(cluster, p, db),
        &["FLOWARCHIVE.SWEEP", "ASYNC"],
    )
    .unwrap();
    assert_eq!(started, "STARTED");
    wait_for("uploads held", Duration::from_secs(60), || {
        proxy.gated() > 0
    });
    during(cluster);
    proxy.release();
    cluster.wait_sweeps_done(Duration::from_secs(120));
}

/// On a cluster of 4 DBs, FLUSHDB on a primary in the middle of its sweep of DB 2: of DB 0, it keeps
/// every DB 2 flow live or archived whole and writes nothing into DB 0; of DB 2 itself, it leaves DB
/// 2 empty there (no index entry written for a flushed flow); the other primaries' flows and DB 0's
/// flows of every other node are untouched, and the replicas follow.
#[test]
fn flushdb_of_one_db_mid_sweep_on_a_cluster_node_loses_nothing_else() {
    let proxy = Proxy::start(s3_port());
    let (s3, mut cluster) = multi_db_bed(Some(&proxy));
    let (db0, db2) = two_db_flows("flush", 30);
    write_in(&mut cluster, 0, &db0);
    write_in(&mut cluster, 2, &db2);
    let p = cluster.primaries()[0];
    let on_p = |cluster: &mut Cluster, f: &TFlow| cluster.owner(slot_of(&f.id)) == p;
    let mut elsewhere0 = Vec::new();
    for f in &db0 {
        if !on_p(&mut cluster, f) {
            elsewhere0.push(f.clone());
        }
    }
    let mut elsewhere2 = Vec::new();
    for f in &db2 {
        if !on_p(&mut cluster, f) {
            elsewhere2.push(f.clone());
        }
    }
    assert!(elsewhere2.len() < db2.len(), "node {p} holds flows");

    held_sweep_in(&mut cluster, &proxy, p, 2, |cluster| {
        cmd::<()>(&mut conn_in(cluster, p, 0), &["FLUSHDB"]).unwrap();
    });
    let n: i64 = cmd(&mut conn_in(&cluster, p, 0), &["DBSIZE"]).unwrap();
    assert_eq!(n, 0, "nothing written into the flushed DB 0");
    check_in(&mut cluster, &s3, 0, &elsewhere0);
    let archived = check_in(&mut cluster, &s3, 2, &db2);
    eprintln!("archived in DB 2 after DB 0's flush: {}", archived.len());

    held_sweep_in(&mut cluster, &proxy, p, 2, |cluster| {
        cmd::<()>(&mut conn_in(cluster, p, 2), &["FLUSHDB"]).unwrap();
    });
    let n: i64 = cmd(&mut conn_in(&cluster, p, 2), &["DBSIZE"]).unwrap();
    assert_eq!(n, 0, "nothing written into the flushed DB 2");
    // With DB 2's index hashes flushed on the node, a read asks the bucket (`db2/flows/`, no index
    // key of the slot in DB 2): it answers DB 2's own history or nothing, never DB 0's. A flow the
    // flush took after an attempt stored its object is answered from that object (docs/SAFETY.md:
    // an unreferenced object is read while its slot has no index).
    let mut from_bucket = 0;
    for f in db2
        .iter()
        .filter(|f| !elsewhere2.iter().any(|e| e.id == f.id))
    {
        let mut c = conn_in(&cluster, p, 2);
        match get(&mut c, &f.id).unwrap() {
            None => assert!(!archived.contains(&f.id), "{} was archived", f.id),
            Some(_) => {
                let (state, events) = get_events(&mut c, &f.id).unwrap();
                assert_eq!(state, archived_state(&f.state()), "DB 2: {}", f.id);
                assert_eq!(events, f.event_list(), "DB 2: {}", f.id);
                from_bucket += 1;
            }
        }
    }
    eprintln!("answered from the bucket after the flush: {from_bucket}");
    assert_eq!(check_in(&mut cluster, &s3, 2, &elsewhere2), BTreeSet::new());
    assert_eq!(check_in(&mut cluster, &s3, 0, &elsewhere0), BTreeSet::new());
    replicas_equal_in(&mut cluster, &[0, 2]);
}

/// Every index hash of DBs `dbs` on every primary, by (DB, node, key), with its entries.
type IndexHashes =
    std::collections::BTreeMap<(u32, usize, String), std::collections::BTreeMap<String, String>>;

fn index_hashes(cluster: &mut Cluster, dbs: &[u32]) -> IndexHashes {
    let mut out = IndexHashes::new();
    for &db in dbs {
        for p in cluster.primaries() {
            let mut c = conn_in(cluster, p, db);
            let keys: Vec<String> = cmd(&mut c, &["KEYS", &format!("{INDEX_KEY}*")]).unwrap();
            for k in keys {
                let entries = cmd(&mut c, &["HGETALL", &k]).unwrap();
                out.insert((db, p, k), entries);
            }
        }
    }
    out
}

/// On a cluster of 4 DBs whose index hashes are lost in DB 0 and DB 2, `flowarchive-index --rebuild`
/// writes each DB's entries into that DB's per-slot index on the flow's owner, exactly where the
/// commits had put them (DB 2's under `db2/flows/`, none of them into DB 0), and every flow of both
/// DBs reads back its own history.
#[test]
fn rebuild_on_a_multi_db_cluster_restores_each_dbs_per_slot_index() {
    let (s3, mut cluster) = multi_db_bed(None);
    let (db0, db2) = two_db_flows("rebuilt", 12);
    write_in(&mut cluster, 0, &db0);
    write_in(&mut cluster, 2, &db2);
    for db in [0u32, 2] {
        for p in cluster.primaries() {
            sweep(&mut conn_in(&cluster, p, db), &[]).unwrap();
        }
    }
    let before = index_hashes(&mut cluster, &[0, 2]);
    for (db, p, key) in before.keys() {
        cmd::<()>(&mut conn_in(&cluster, *p, *db), &["DEL", key]).unwrap();
    }
    let node = cluster.primaries()[1];
    let (code, out, err) = rebuild_index(&cluster.nodes[node], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(index_hashes(&mut cluster, &[0, 2]), before, "{out}{err}");
    assert_eq!(check_in(&mut cluster, &s3, 0, &db0), eligible_ids(&db0));
    assert_eq!(check_in(&mut cluster, &s3, 2, &db2), eligible_ids(&db2));
}

/// Each flow of `flows` of DB `db` answers GET EVENTS there: archived with exactly its events if
/// eligible (the sweeps archived them all), else live.
fn reads_back_in(cluster: &mut Cluster, db: u32, flows: &[TFlow]) {
    for f in flows {
        let mut c = owner_in(cluster, &f.id, db);
        let (state, events) =
            get_events(&mut c, &f.id).unwrap_or_else(|e| panic!("DB {db}: GET {}: {e}", f.id));
        assert_eq!(events, f.event_list(), "DB {db}: events of {}", f.id);
        let want = if f.eligible() {
            archived_state(&f.state())
        } else {
            f.state()
        };
        assert_eq!(state, want, "DB {db}: state of {}", f.id);
    }
}

/// On a cluster of 4 DBs, `flowarchive-index --to compact` with FLOWARCHIVE_DB=2 converts DB 2's
/// per-slot indexes on every primary and leaves DB 0's hashes as they were; then DB 0's too; every
/// flow of both DBs reads back its own history throughout.
#[test]
fn index_conversion_on_a_multi_db_cluster_converts_the_selected_db() {
    let (_s3, mut cluster) = multi_db_bed(None);
    let (db0, db2) = two_db_flows("conv", 12);
    write_in(&mut cluster, 0, &db0);
    write_in(&mut cluster, 2, &db2);
    for db in [0u32, 2] {
        for p in cluster.primaries() {
            sweep(&mut conn_in(&cluster, p, db), &[]).unwrap();
        }
    }
    for i in 0..cluster.nodes.len() {
        for (name, value) in [("index-format", "compact"), ("cache-bytes", "0")] {
            cluster
                .on::<()>(i, &["CONFIG", "SET", &format!("flowarchive.{name}"), value])
                .unwrap();
        }
    }
    let db0_hashes = index_hashes(&mut cluster, &[0]);
    assert!(!db0_hashes.is_empty() && !index_hashes(&mut cluster, &[2]).is_empty());
    let convert = |cluster: &Cluster, db: &str| {
        let (code, text) = convert_index(&cluster.nodes[0], "compact", &[("FLOWARCHIVE_DB", db)]);
        assert_eq!(code, 0, "DB {db}: {text}");
        assert!(text.contains("left=0"), "DB {db}: {text}");
        text
    };
    let text = convert(&cluster, "2");
    let moved: usize = eligible_ids(&db2).len();
    assert!(
        text.ends_with(&format!("moved={moved} kept=0 conflicts=0 left=0\n")),
        "{text}"
    );
    // DB 2 has no hash-format entry left; DB 0's hashes are untouched.
    for ((_, p, key), _) in index_hashes(&mut cluster, &[2]) {
        let kind: String = cmd(&mut conn_in(&cluster, p, 2), &["TYPE", &key]).unwrap();
        assert!(
            key.contains(":u") || key.contains(":s") || key.ends_with(":meta"),
            "{key} {kind}"
        );
    }
    assert_eq!(index_hashes(&mut cluster, &[0]), db0_hashes);
    reads_back_in(&mut cluster, 2, &db2);
    reads_back_in(&mut cluster, 0, &db0);
    convert(&cluster, "0");
    reads_back_in(&mut cluster, 0, &db0);
    reads_back_in(&mut cluster, 2, &db2);
}
