//! FLOWARCHIVE.SWEEP, its INFO fields and the cron script.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy, Rule};
use common::*;

fn flows_of(v: &redis::Value) -> BTreeSet<String> {
    redis::from_redis_value::<Vec<String>>(v)
        .unwrap()
        .into_iter()
        .collect()
}

fn indexed(c: &mut redis::Connection) -> BTreeSet<String> {
    let ids: Vec<String> = cmd(c, &["HKEYS", "archived:flows"]).unwrap();
    ids.into_iter().collect()
}

fn bed_with(extra: &[&str], proxy: Option<&Proxy>) -> (S3, Server) {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, proxy, extra);
    (s3, srv)
}

#[test]
fn a_thousand_mixed_flows_dry_run_then_sweep() {
    let (s3, srv) = bed_with(
        &["retention", "1h", "concurrency", "8", "batch-size", "64"],
        None,
    );
    let mut c = srv.conn();
    let recent = now_ms() - 60_000;
    let mut expected = BTreeSet::new();
    for i in 0..1000 {
        let id = format!("f{i:04}");
        let spec = match i % 4 {
            0 => FlowSpec {
                status: "active",
                labels: &[("tenant", "acme")],
                ..FlowSpec::done(&id)
            },
            1 => FlowSpec {
                last_ms: recent,
                ..FlowSpec::done(&id)
            },
            2 => FlowSpec {
                labels: &[("tenant", "acme"), ("region", "eu")],
                ..FlowSpec::done(&id)
            },
            _ => FlowSpec {
                status: "failed",
                labels: &[],
                compact_events: true,
                ..FlowSpec::done(&id)
            },
        };
        if i % 4 >= 2 {
            expected.insert(id.clone());
        }
        write_flow(&mut c, &spec);
    }
    cmd::<()>(&mut c, &["SET", "argyll:catalog:wf", "{}"]).unwrap();
    cmd::<()>(&mut c, &["SET", "other:thing", "x"]).unwrap();
    let before = dump_all(&mut c);

    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    assert_eq!(int(&dry["dry_run"]), 1);
    assert_eq!(flows_of(&dry["flows"]), expected);
    assert_eq!(int(&dry["archived"]), 0);
    assert_same(&before, &dump_all(&mut c), "DRYRUN changes nothing");
    assert!(s3.list().is_empty());

    let done = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&done["candidates"]), 500, "{done:?}");
    assert_eq!(int(&done["archived"]), 500, "{done:?}");
    assert_eq!(int(&done["failed"]), 0);
    assert!(int(&done["stored_bytes"]) > 0 && int(&done["raw_bytes"]) > int(&done["stored_bytes"]));
    assert_eq!(indexed(&mut c), expected, "exactly the long-terminal flows");
    assert_eq!(s3.list().len(), 500);

    let after = dump_all(&mut c);
    let shared = [
        "argyll:idx:status",
        "argyll:idx:status:completed",
        "argyll:idx:status:failed",
        "argyll:idx:label:tenant:acme",
        "argyll:idx:label:region:eu",
        "argyll:idx:label:region",
        "archived:flows",
    ];
    for (k, v) in &before.0 {
        let key = String::from_utf8_lossy(k).to_string();
        let archived_key = expected
            .iter()
            .any(|id| key.starts_with(&format!("argyll:flow:{id}:")));
        if archived_key {
            assert!(!after.0.contains_key(k), "{key} should be gone");
        } else if !shared.contains(&key.as_str()) {
            assert_eq!(after.0.get(k), Some(v), "{key} changed");
        }
    }
    let remaining: Vec<String> = cmd(&mut c, &["HKEYS", "argyll:idx:status"]).unwrap();
    assert_eq!(remaining.len(), 500);
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:idx:label:region:eu"]).unwrap(),
        0
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["SISMEMBER", "argyll:idx:label:tenant", "acme"]).unwrap(),
        1
    );

    assert_eq!(info_field(&mut c, "sweeps_run"), 2);
    assert_eq!(info_field(&mut c, "last_sweep_archived"), 500);
    assert_eq!(info_field(&mut c, "last_sweep_candidates"), 500);
    assert_eq!(info_field(&mut c, "flows_archived"), 500);
    assert_eq!(info_field(&mut c, "sweep_running"), 0);
    assert!(srv.log().contains("flowarchive: sweep done"));

    let again = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&again["candidates"]), 0, "nothing left to do");
}

#[test]
fn failing_uploads_are_counted_and_stay_live() {
    let proxy = Proxy::start(s3_port());
    let (_s3, srv) = bed_with(&["concurrency", "3"], Some(&proxy));
    let mut c = srv.conn();
    for i in 0..10 {
        write_flow(&mut c, &FlowSpec::done(&format!("good-{i}")));
    }
    for i in 0..4 {
        write_flow(&mut c, &FlowSpec::done(&format!("bad-{i}")));
    }
    proxy.set(vec![Rule {
        method: "PUT",
        path: "bad-".into(),
        fault: Fault::Status(403),
    }]);
    let r = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&r["archived"]), 10);
    assert_eq!(int(&r["failed"]), 4);
    let reasons = reply_map(r["failed_by_reason"].clone());
    assert_eq!(int(&reasons["s3_rejected"]), 4);
    for i in 0..4 {
        assert_eq!(
            cmd::<i64>(&mut c, &["EXISTS", &format!("argyll:flow:bad-{i}:events")]).unwrap(),
            1
        );
    }
    assert_eq!(indexed(&mut c).len(), 10);
    assert_eq!(info_field(&mut c, "failures_s3_rejected"), 4);
    assert_eq!(info_field(&mut c, "last_sweep_failed"), 4);
    assert!(srv.log().contains("[s3_rejected]"), "failures are logged");

    // The cron script: 1 when flows failed, 0 when all went through, 2 when the sweep cannot run.
    let script = |port: u16| {
        Command::new("python3")
            .arg(root().join("scripts/flowarchive-sweep"))
            .env("FLOWARCHIVE_PORT", port.to_string())
            .output()
            .unwrap()
    };
    let out = script(srv.port);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("candidates=4") && stdout.contains("failed[s3_rejected]=4"),
        "{stdout}"
    );
    proxy.clear();
    let out = script(srv.port);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("archived=4"));
    let out = script(free_port());
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn events_appended_during_a_sweep_skip_those_flows() {
    let proxy = Proxy::start(s3_port());
    let (_s3, srv) = bed_with(&["concurrency", "4"], Some(&proxy));
    let mut c = srv.conn();
    let ids: Vec<String> = (0..8).map(|i| format!("busy-{i}")).collect();
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    // Flows' uploads held (the store's checksum probe is a PUT too, not of a flow).
    proxy.set(vec![Rule {
        method: "PUT",
        path: "/flows/".into(),
        fault: Fault::Gate,
    }]);
    assert_eq!(sweep_async(&mut c).unwrap(), "STARTED");
    wait_for("the first uploads held", Duration::from_secs(120), || {
        proxy.gated() >= 2
    });
    let in_upload: Vec<String> = proxy
        .requests()
        .iter()
        .filter(|r| r.starts_with("PUT"))
        .filter_map(|r| {
            ids.iter()
                .find(|id| r.contains(&format!("/{id}.jsonl.gz")))
                .cloned()
        })
        .take(2)
        .collect();
    for id in &in_upload {
        cmd::<()>(
            &mut c,
            &[
                "RPUSH",
                &format!("argyll:flow:{id}:events"),
                "{\"type\":\"attribute_set\"}",
            ],
        )
        .unwrap();
    }
    proxy.release();
    wait_for("the sweep to end", Duration::from_secs(30), || {
        info_field(&mut c, "sweep_running") == 0
    });
    assert_eq!(info_field(&mut c, "last_sweep_skipped_changed"), 2);
    assert_eq!(info_field(&mut c, "last_sweep_archived"), 6);
    for id in &in_upload {
        assert_eq!(
            cmd::<i64>(&mut c, &["LLEN", &format!("argyll:flow:{id}:events")]).unwrap(),
            6,
            "{id} kept whole"
        );
        assert_eq!(
            cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", id]).unwrap(),
            0
        );
    }
}

const SCHED_OTHER: u32 = 0;
const SCHED_IDLE: u32 = 5;

/// The scheduling policy (field 41 of /proc/<pid>/task/<tid>/stat) of each thread named `name` (the
/// kernel keeps its first 15 bytes).
fn thread_policies(pid: u32, name: &str) -> Vec<u32> {
    let name = &name[..name.len().min(15)];
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] == name {
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            out.push(fields[38].parse().unwrap());
        }
    }
    out
}

#[test]
fn one_sweep_at_a_time_limit_and_responsiveness() {
    let proxy = Proxy::start(s3_port());
    let (_s3, srv) = bed_with(&["concurrency", "2"], Some(&proxy));
    let mut c = srv.conn();
    for i in 0..300 {
        write_flow(&mut c, &FlowSpec::done(&format!("p{i}")));
    }
    write_flow(
        &mut c,
        &FlowSpec {
            events: 20_000,
            ..FlowSpec::done("huge")
        },
    );
    let limited = sweep(&mut c, &["LIMIT", "5"]).unwrap();
    assert_eq!(int(&limited["archived"]), 5);
    assert_eq!(indexed(&mut c).len(), 5);

    // The uploads held: the sweep is running until they are let go, however slowly this machine runs.
    proxy.hold("PUT");
    assert_eq!(sweep_async(&mut c).unwrap(), "STARTED");
    let e = sweep(&mut c, &[]).unwrap_err().to_string();
    assert!(e.contains("already running"), "{e}");
    let e = sweep_async(&mut c).unwrap_err();
    assert!(e.contains("already running"), "{e}");
    assert_eq!(info_field(&mut c, "sweep_running"), 1);
    // The upload workers run in the idle scheduling class: the event loop preempts them at once. The
    // coordinator, in the sweep's critical path, keeps the normal class. (A worker just spawned may not
    // have switched yet; the upload pool may still hold an idle thread of the LIMIT sweep, which keeps
    // its class.)
    wait_for(
        "the two upload workers, and every upload thread, in SCHED_IDLE",
        Duration::from_secs(20),
        || {
            let policies = thread_policies(srv.pid(), "flowarchive-upload");
            policies.len() >= 2 && policies.iter().all(|&p| p == SCHED_IDLE)
        },
    );
    let coordinators = thread_policies(srv.pid(), "flowarchive-sweep");
    assert!(
        !coordinators.is_empty() && coordinators.iter().all(|&p| p == SCHED_OTHER),
        "coordinators: {coordinators:?}"
    );
    // Then slowed, at least 296 × 20 ms over two workers: long enough to be probed.
    proxy.delay("PUT", Duration::from_millis(20));
    let mut pings = 0;
    let mut slowest = Duration::ZERO;
    while info_field(&mut c, "sweep_running") == 1 {
        let t = Instant::now();
        assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
        slowest = slowest.max(t.elapsed());
        pings += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        pings > 10,
        "the sweep ran long enough to be probed ({pings} pings)"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "PING answered during the sweep (slowest {slowest:?})"
    );
    assert_eq!(indexed(&mut c).len(), 301);
    assert_eq!(info_field(&mut c, "last_sweep_archived"), 296);

    for bad in [&["LIMIT"][..], &["LIMIT", "0"], &["LIMIT", "x"], &["NOW"]] {
        let e = sweep(&mut c, bad).unwrap_err().to_string();
        assert!(e.contains("LIMIT") || e.contains("syntax"), "{bad:?}: {e}");
    }
}

#[test]
fn a_crash_mid_sweep_loses_nothing() {
    let proxy = Proxy::start(s3_port());
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    opts.module_args
        .extend(["concurrency".to_string(), "2".to_string()]);
    opts.extra = ["--appendonly", "yes", "--appendfsync", "always"]
        .map(String::from)
        .to_vec();
    let mut srv = Server::start(opts);
    let mut c = srv.conn();
    let ids: Vec<String> = (0..200).map(|i| format!("c{i:03}")).collect();
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    // 20 flows archived, then the kill lands while the next uploads are held.
    proxy.hold("PUT");
    sweep_async(&mut c).unwrap();
    hold_sweep_at(
        &mut c,
        &proxy,
        &|| proxy.hold("PUT"),
        20,
        "20 flows archived",
    );
    srv.crash_and_restart();
    let mut c = srv.conn();
    let after_crash = indexed(&mut c).len();
    assert!(
        (20..200).contains(&after_crash),
        "crashed mid-sweep ({after_crash} archived)"
    );
    proxy.clear();
    let r = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&r["archived"]) as usize, 200 - after_crash);
    assert_eq!(indexed(&mut c).len(), 200);
    for id in &ids {
        let live: i64 = cmd(&mut c, &["EXISTS", &format!("argyll:flow:{id}:events")]).unwrap();
        assert_eq!(live, 0, "{id}");
        let state: Option<String> = redis::cmd("FLOWARCHIVE.GET").arg(id).query(&mut c).unwrap();
        let state: serde_json::Value = serde_json::from_str(&state.expect("readable")).unwrap();
        assert_eq!(state["id"], id.as_str());
        assert_eq!(state["archived"], true);
    }
}

#[test]
fn layouts_without_a_status_index_are_swept_by_scan() {
    let args = [
        &NO_STATUS_INDEX[..],
        &["retention", "1d", "batch-size", "7"],
    ]
    .concat();
    let (_s3, srv) = bed_with(&args, None);
    let mut c = srv.conn();
    for i in 0..30 {
        let id = format!("s{i}");
        let status = if i % 3 == 0 { "active" } else { "completed" };
        write_flow(
            &mut c,
            &FlowSpec {
                status,
                ..FlowSpec::done(&id)
            },
        );
    }
    write_flow(
        &mut c,
        &FlowSpec {
            last_ms: now_ms(),
            ..FlowSpec::done("fresh")
        },
    );
    let r = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&r["archived"]), 20, "{r:?}");
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:fresh:events"]).unwrap(),
        1
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:s0:events"]).unwrap(),
        1
    );
}

#[test]
fn the_internal_timer_sweeps_when_enabled() {
    let (_s3, srv) = bed_with(&[], None);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("timed"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(info_field(&mut c, "sweeps_run"), 0, "off by default");
    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "flowarchive.sweep-interval", "1s"],
    )
    .unwrap();
    wait_for("a timer sweep", Duration::from_secs(10), || {
        cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", "timed"]).unwrap_or(0) == 1
    });
    cmd::<()>(
        &mut c,
        &["CONFIG", "SET", "flowarchive.sweep-interval", "0s"],
    )
    .unwrap();
}

#[test]
fn a_sweep_covers_the_callers_db_only() {
    let (_s3, srv) = bed_with(&[], None);
    let mut c0 = srv.conn();
    write_flow(&mut c0, &FlowSpec::done("zero"));
    let mut c3 = srv.conn();
    cmd::<()>(&mut c3, &["SELECT", "3"]).unwrap();
    write_flow(&mut c3, &FlowSpec::done("three"));
    let db0 = dump_all(&mut c0);
    let r = sweep(&mut c3, &[]).unwrap();
    assert_eq!(int(&r["archived"]), 1);
    assert_eq!(
        cmd::<i64>(&mut c3, &["HEXISTS", "archived:flows", "three"]).unwrap(),
        1
    );
    assert_eq!(
        cmd::<i64>(&mut c3, &["EXISTS", "argyll:flow:three:events"]).unwrap(),
        0
    );
    assert_same(
        &db0,
        &dump_all(&mut c0),
        "DB 0 untouched by a sweep of DB 3",
    );
    let state: Option<String> = redis::cmd("FLOWARCHIVE.GET")
        .arg("three")
        .query(&mut c3)
        .unwrap();
    assert!(state.unwrap().contains("\"archived\":true"));
    let none: Option<String> = redis::cmd("FLOWARCHIVE.GET")
        .arg("three")
        .query(&mut c0)
        .unwrap();
    assert_eq!(none, None, "DB 0 has no such flow");
}

#[test]
fn the_cron_script_authenticates_over_tls() {
    let s3 = S3::new_bucket();
    let dir = root().join("target/test-servers").join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let tls_port = free_port();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = Flavor::Valkey8; // the Valkey 9.1 wheel is built without TLS
    opts.extra = vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        cert.display().to_string(),
        "--tls-key-file".into(),
        key.display().to_string(),
        "--tls-ca-cert-file".into(),
        cert.display().to_string(),
        "--tls-auth-clients".into(),
        "no".into(),
    ];
    let srv = Server::start(opts);
    let mut c = srv.conn();
    cmd::<()>(
        &mut c,
        &["ACL", "SETUSER", "cron", "on", ">cron-pass", "~*", "+@all"],
    )
    .unwrap();
    write_flow(&mut c, &FlowSpec::done("cron-tls"));
    let run = |password: &str| {
        Command::new("python3")
            .arg(root().join("scripts/flowarchive-sweep"))
            .env("FLOWARCHIVE_PORT", tls_port.to_string())
            .env("FLOWARCHIVE_TLS", "1")
            .env("FLOWARCHIVE_TLS_CA", &cert)
            .env("FLOWARCHIVE_USER", "cron")
            .env("FLOWARCHIVE_PASSWORD", password)
            .output()
            .unwrap()
    };
    let out = run("wrong");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("cron-pass");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("archived=1"));
    assert_eq!(
        cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", "cron-tls"]).unwrap(),
        1
    );
}

/// The commands of the incremental AOF files under `dir`, in order (each as its arguments).
fn aof_commands(dir: &std::path::Path) -> Vec<Vec<String>> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("appendonlydir"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let data = std::fs::read(file).unwrap();
        let mut at = 0;
        let line = |at: &mut usize| {
            let end = *at + data[*at..].windows(2).position(|w| w == b"\r\n").unwrap();
            let text = String::from_utf8_lossy(&data[*at + 1..end]).to_string();
            *at = end + 2;
            text
        };
        while at < data.len() {
            let n: usize = line(&mut at).parse().unwrap();
            let mut args = Vec::new();
            for _ in 0..n {
                let len: usize = line(&mut at).parse().unwrap();
                args.push(String::from_utf8_lossy(&data[at..at + len]).to_string());
                at += len + 2;
            }
            out.push(args);
        }
    }
    out
}

#[test]
fn a_batched_commit_is_one_transaction_per_step_and_failed_flows_stay_live() {
    let proxy = Proxy::start(s3_port());
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    // A step budget no commit of this debug build reaches alone, so the flows that returned during the
    // pause are committed in one step however slow the machine is.
    opts.module_args
        .extend(["concurrency", "8", "step-budget-us", "100000"].map(String::from));
    opts.extra = ["--appendonly", "yes", "--appendfsync", "always"]
        .map(String::from)
        .to_vec();
    let primary = Server::start(opts);
    let replica = Server::start(ServerOpts::new(&s3));
    let (mut c, mut r) = (primary.conn(), replica.conn());
    let ids: Vec<String> = (0..8).map(|i| format!("b{i}")).collect();
    for id in &ids {
        let labels: &[(&str, &str)] = match id.as_str() {
            "b5" => &[("tenant", "solo")],
            _ => &[("tenant", "acme")],
        };
        write_flow(
            &mut c,
            &FlowSpec {
                labels,
                ..FlowSpec::done(id)
            },
        );
    }
    replicate(&mut r, primary.port, "argyll:flow:b7:events");

    // Every upload held: all eight flows are begun and uploading at once.
    proxy.hold("PUT");
    sweep_async(&mut c).unwrap();
    wait_for("all flows uploading", Duration::from_secs(120), || {
        info_field(&mut c, "sweep_current_in_flight") == 8 && proxy.gated() == 8
    });
    // During the uploads b3 gets a late event (its commit finds it changed) and b5's label set turns
    // into a string (its commit's type check refuses it); writes then pause until every upload has
    // returned, so the flows that returned meanwhile are committed together when writes resume.
    cmd::<()>(&mut c, &["RPUSH", "argyll:flow:b3:events", "{\"late\":1}"]).unwrap();
    cmd::<()>(&mut c, &["DEL", "argyll:idx:label:tenant:solo"]).unwrap();
    cmd::<()>(&mut c, &["SET", "argyll:idx:label:tenant:solo", "x"]).unwrap();
    cmd::<()>(&mut c, &["CLIENT", "PAUSE", "20000", "WRITE"]).unwrap();
    proxy.release();
    // Each upload's HEAD follows its PUT; the upload has returned once none is in the store stage.
    wait_for("every upload back", Duration::from_secs(9), || {
        let heads = proxy
            .requests()
            .iter()
            .filter(|r| r.starts_with("HEAD "))
            .count();
        heads >= 8 && info_field(&mut c, "uploads_in_flight") == 0
    });
    cmd::<()>(&mut c, &["CLIENT", "UNPAUSE"]).unwrap();
    wait_for("sweep done", Duration::from_secs(30), || {
        info_field(&mut c, "sweep_running") == 0
    });
    assert_eq!(info_field(&mut c, "last_sweep_archived"), 6);
    assert_eq!(info_field(&mut c, "last_sweep_skipped_changed"), 1);
    assert_eq!(info_field(&mut c, "last_sweep_failed"), 1);
    let archived: BTreeSet<String> = ["b0", "b1", "b2", "b4", "b6", "b7"]
        .map(String::from)
        .into();
    assert_eq!(indexed(&mut c), archived);
    for id in ["b3", "b5"] {
        // The keys these flows have (no snapshot, as most of the engine's flows).
        for key in flow_keys(id).iter().filter(|k| !k.contains(":snapshot:")) {
            assert_eq!(cmd::<i64>(&mut c, &["EXISTS", key]).unwrap(), 1, "{key}");
        }
    }

    // The replica applies exactly what the primary did.
    wait_for(
        "replica applies the commits",
        Duration::from_secs(10),
        || cmd::<i64>(&mut r, &["HLEN", "archived:flows"]).unwrap_or(0) == 6,
    );
    // Everything the primary wrote is applied on the replica, not only the commits.
    let acked: i64 = cmd(&mut c, &["WAIT", "1", "10000"]).unwrap();
    assert_eq!(acked, 1, "the replica acknowledges the primary's writes");
    assert_same(
        &dump_all(&mut c),
        &dump_all(&mut r),
        "replica equals primary",
    );

    // In the AOF, every commit write is inside a MULTI/EXEC, each flow's writes all in one, and at
    // least one transaction holds several flows; nothing of b3 or b5 was written by a commit.
    let mut transactions: Vec<Vec<Vec<String>>> = Vec::new();
    let mut open: Option<Vec<Vec<String>>> = None;
    for command in aof_commands(&primary.dir) {
        match command[0].to_uppercase().as_str() {
            "MULTI" => open = Some(Vec::new()),
            "EXEC" => transactions.extend(open.take()),
            _ => match &mut open {
                Some(tx) => tx.push(command),
                // The fixtures' HSET/ZADD/SADD and the test's own writes come before the sweep.
                None => assert!(
                    !["ZREM", "HDEL", "SREM", "UNLINK"]
                        .iter()
                        .any(|w| command[0].eq_ignore_ascii_case(w))
                        && !command.iter().any(|a| a == "archived:flows"),
                    "a commit write outside MULTI/EXEC: {command:?}"
                ),
            },
        }
    }
    let mut committed = BTreeSet::new();
    let mut most = 0;
    for tx in &transactions {
        let flows: Vec<&String> = tx
            .iter()
            .filter(|cmd| cmd[0].eq_ignore_ascii_case("HSET") && cmd[1] == "archived:flows")
            .map(|cmd| &cmd[2])
            .collect();
        most = most.max(flows.len());
        for id in flows {
            assert!(committed.insert(id.clone()), "{id} committed twice");
            let has = |name: &str, arg: &str| {
                tx.iter()
                    .any(|c| c[0].eq_ignore_ascii_case(name) && c.iter().any(|a| a == arg))
            };
            let member = format!("flow:{id}");
            assert!(
                has("ZREM", &member) && has("HDEL", &member) && has("SREM", &member),
                "{id}: {tx:?}"
            );
            assert!(
                has("UNLINK", &format!("argyll:flow:{id}:events")),
                "{id}: {tx:?}"
            );
        }
        for id in ["b3", "b5"] {
            let member = format!("flow:{id}");
            assert!(
                !tx.iter().flatten().any(|a| a == id
                    || a == &member
                    || a.starts_with(&format!("argyll:flow:{id}:"))),
                "{id} written: {tx:?}"
            );
        }
    }
    assert_eq!(committed, archived);
    assert!(
        most >= 2,
        "no commit step held several flows: {transactions:?}"
    );
}

/// The summary's identity: every candidate has exactly one outcome.
fn assert_adds_up(what: &str, f: &dyn Fn(&str) -> i64) {
    let flows = f("flows");
    let outcomes = f("archived")
        + f("skipped_changed")
        + f("skipped_ineligible")
        + f("skipped_noperm")
        + f("failed")
        + f("in_flight")
        + flows;
    assert_eq!(
        f("candidates"),
        outcomes,
        "{what}: candidates = the outcomes"
    );
}

fn summary_adds_up(what: &str, s: &std::collections::HashMap<String, redis::Value>) {
    let failed_by_reason: i64 = reply_map(s["failed_by_reason"].clone())
        .values()
        .map(int)
        .sum();
    assert_eq!(int(&s["failed"]), failed_by_reason, "{what}");
    assert_adds_up(what, &|k| match k {
        "flows" => flows_of(&s["flows"]).len() as i64,
        k => int(&s[k]),
    });
}

/// INFO's `last_sweep_*` add up; `flows` is the DRYRUN list's length (INFO shows no list).
fn info_adds_up(what: &str, c: &mut redis::Connection, flows: i64) {
    let info: String = cmd(c, &["INFO", "flowarchive"]).unwrap();
    let field = |k: &str| -> i64 {
        let name = format!("flowarchive_last_sweep_{k}:");
        info.lines()
            .find_map(|l| l.strip_prefix(&name))
            .unwrap_or_else(|| panic!("no last_sweep_{k} in INFO"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_adds_up(what, &|k| match k {
        "flows" => flows,
        k => field(k),
    });
}

fn no_count_errors(srv: &Server, c: &mut redis::Connection) {
    assert_eq!(info_field(c, "sweep_count_errors"), 0);
    assert!(
        !srv.log().contains("sweep counts do not add up"),
        "{}",
        srv.log()
    );
}

/// Every candidate a sweep counts has exactly one outcome (`candidates = archived + skipped_changed +
/// skipped_ineligible + skipped_noperm + failed + in_flight + flows`), in the summary and in INFO,
/// through DRYRUN, LIMIT, failed uploads, a flow gone since its selection, a long log read in steps
/// of its own and a late write during an upload; and no sweep's counts failed the end-of-sweep check.
#[test]
fn every_candidate_has_one_outcome_and_the_counts_add_up() {
    let proxy = Proxy::start(s3_port());
    let (_s3, srv) = bed_with(&["concurrency", "3", "batch-size", "4"], Some(&proxy));
    let mut c = srv.conn();
    assert_eq!(info_field(&mut c, "sweep_count_errors"), 0, "shown at 0");
    let mut ids: Vec<String> = (0..8).map(|i| format!("good-{i}")).collect();
    ids.extend((0..3).map(|i| format!("bad-{i}")));
    ids.push("late".into());
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    let long = FlowSpec {
        events: 3000,
        ..FlowSpec::done("long")
    };
    write_flow(&mut c, &long);
    // A status entry whose flow is gone: a candidate that is then not found.
    cmd::<()>(
        &mut c,
        &["HSET", "argyll:idx:status", "flow:ghost", "completed"],
    )
    .unwrap();
    let score = LONG_AGO.to_string();
    cmd::<()>(
        &mut c,
        &["ZADD", "argyll:idx:status:completed", &score, "flow:ghost"],
    )
    .unwrap();
    let refused = Rule {
        method: "PUT",
        path: "bad-".into(),
        fault: Fault::Status(403),
    };
    proxy.set(vec![
        refused.clone(),
        Rule {
            method: "PUT",
            path: "/late.".into(),
            fault: Fault::Gate,
        },
    ]);

    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    summary_adds_up("DRYRUN", &dry);
    assert_eq!(int(&dry["candidates"]), 14, "{dry:?}");
    assert_eq!(flows_of(&dry["flows"]).len(), 13);
    assert_eq!(int(&dry["skipped_ineligible"]), 1);
    info_adds_up("DRYRUN", &mut c, 13);

    // Members order by their bytes at one score: the two failing flows come first.
    let limited = sweep(&mut c, &["LIMIT", "2"]).unwrap();
    summary_adds_up("LIMIT", &limited);
    assert_eq!(int(&limited["failed"]), 2, "{limited:?}");
    assert_eq!(int(&limited["archived"]), 0, "{limited:?}");
    info_adds_up("LIMIT", &mut c, 0);

    assert_eq!(sweep_async(&mut c).unwrap(), "STARTED");
    wait_for(
        "the late flow's upload held",
        Duration::from_secs(20),
        || proxy.gated() > 0,
    );
    cmd::<()>(
        &mut c,
        &[
            "RPUSH",
            "argyll:flow:late:events",
            "{\"type\":\"attribute_set\"}",
        ],
    )
    .unwrap();
    // The late flow's upload goes on; the bad ones are still refused.
    proxy.set(vec![refused]);
    wait_for("the sweep to end", Duration::from_secs(60), || {
        info_field(&mut c, "sweep_running") == 0
    });
    info_adds_up("full sweep", &mut c, 0);
    let last = |c: &mut redis::Connection, k: &str| info_field(c, &format!("last_sweep_{k}"));
    assert_eq!(last(&mut c, "candidates"), 14);
    assert_eq!(
        last(&mut c, "archived"),
        9,
        "the good flows and the long one"
    );
    assert_eq!(last(&mut c, "skipped_changed"), 1);
    assert_eq!(last(&mut c, "skipped_ineligible"), 1);
    assert_eq!(last(&mut c, "failed"), 3);
    assert_eq!(last(&mut c, "in_flight"), 0);
    no_count_errors(&srv, &mut c);
}

/// A node demoted mid-sweep stops the sweep at its next selection step: the flows still at the
/// uploaders are not waited for and end counted in `in_flight`, and the counts still add up.
#[test]
fn a_sweep_stopped_with_flows_out_counts_them_in_flight() {
    let proxy = Proxy::start(s3_port());
    let (_s3, srv) = bed_with(&["concurrency", "2", "batch-size", "1"], Some(&proxy));
    let mut c = srv.conn();
    // Selected one per step in member order: the slow flow first, then the quick ones one by one.
    write_flow(&mut c, &FlowSpec::done("a-slow"));
    for i in 0..30 {
        write_flow(&mut c, &FlowSpec::done(&format!("b-{i:02}")));
    }
    // The slow flow held throughout; the quick ones let through a step at a time.
    let slow = Rule {
        method: "PUT",
        path: "/a-slow.".into(),
        fault: Fault::Latch,
    };
    let quick = |fault: Fault| {
        proxy.set(vec![
            slow.clone(),
            Rule {
                method: "PUT",
                path: "/b-".into(),
                fault,
            },
        ])
    };
    quick(Fault::Gate);
    assert_eq!(sweep_async(&mut c).unwrap(), "STARTED");
    hold_sweep_at(
        &mut c,
        &proxy,
        &|| quick(Fault::Gate),
        2,
        "a few quick flows archived",
    );
    // A replica of nothing: the role changes, the data stays. The quick flow held goes on; the
    // sweep's next selection step finds the node demoted.
    let nowhere = free_port().to_string();
    cmd::<()>(&mut c, &["REPLICAOF", "127.0.0.1", &nowhere]).unwrap();
    quick(Fault::Delay(Duration::from_millis(150)));
    wait_for("the sweep to stop", Duration::from_secs(30), || {
        info_field(&mut c, "sweep_running") == 0
    });
    cmd::<()>(&mut c, &["REPLICAOF", "NO", "ONE"]).unwrap();
    info_adds_up("stopped sweep", &mut c, 0);
    assert!(
        info_field(&mut c, "last_sweep_in_flight") >= 1,
        "the slow flow was still out"
    );
    assert!(
        info_field(&mut c, "last_sweep_candidates") < 31,
        "stopped before the end"
    );
    no_count_errors(&srv, &mut c);
    // The flow left out is archived by a later sweep, once its abandoned upload has ended (until then
    // it is claimed: being archived); nothing was lost.
    proxy.release();
    wait_for(
        "a later sweep to archive it",
        Duration::from_secs(30),
        || {
            let again = sweep(&mut c, &[]).unwrap();
            summary_adds_up("a later sweep", &again);
            cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", "a-slow"]).unwrap() == 1
        },
    );
    assert_eq!(indexed(&mut c).len(), 31, "every flow archived once");
    no_count_errors(&srv, &mut c);
}

/// Each round of a sweep commits the flows whose upload returned and begins the next ones in one
/// main-thread step: at concurrency 1, each further flow costs one step (its begin shared with the
/// commit before it), not one for its begin and another for its commit. Measured as the difference
/// between a sweep of n flows and one of 2n, so the selection's own steps cancel out. The step budget
/// is raised so that no commit of this test build, slower than a release one, spends it alone.
#[test]
fn a_round_commits_and_begins_in_one_step() {
    let extra = [
        "concurrency",
        "1",
        "batch-size",
        "100",
        "step-budget-us",
        "100000",
    ];
    let (_s3, srv) = bed_with(&extra, None);
    let mut c = srv.conn();
    let n = 12;
    let mut sweep = |count: i64, tag: &str| {
        let ids: BTreeSet<String> = (0..count).map(|i| format!("{tag}-{i:02}")).collect();
        for id in &ids {
            write_flow(&mut c, &FlowSpec::done(id));
        }
        let (swept, steps) = stepped(&mut c, |c| cmd(c, &["FLOWARCHIVE.SWEEP"]));
        let summary: std::collections::HashMap<String, redis::Value> = swept.unwrap();
        let archived: i64 = redis::from_redis_value(&summary["archived"]).unwrap();
        assert_eq!(archived, count, "{summary:?}");
        assert!(ids.is_subset(&indexed(&mut c)));
        steps
    };
    let (one, two) = (sweep(n, "first"), sweep(2 * n, "second"));
    assert!(
        (n..=n + 2).contains(&(two - one)),
        "{one} main-thread steps for {n} flows, {two} for {}: each further flow should cost one",
        2 * n
    );
    no_count_errors(&srv, &mut c);
}

/// Commits of three DBs run in one turn of the event loop (one module timer, so one execution unit and
/// one MULTI/EXEC): a sweep of DB 0 and FLOWARCHIVE.FLOW archives in DB 1 and DB 3, the same ids in
/// each DB, all uploads held and let go at once while the main thread is kept busy, so their commits
/// wait together. The AOF then holds a transaction that writes to several DBs; a replica holds exactly
/// what the primary holds in every DB; and the primary reloaded from its AOF (DEBUG LOADAOF) holds the
/// same data, DB for DB.
#[test]
fn commits_of_several_dbs_in_one_turn_replicate_and_reload_db_for_db() {
    let proxy = Proxy::start(s3_port());
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    // A budget no commit reaches, so every commit waiting runs in one turn.
    opts.module_args.extend(
        [
            "concurrency",
            "16",
            "step-budget-us",
            "100000",
            "request-timeout-ms",
            "60000",
        ]
        .map(String::from),
    );
    opts.extra = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--enable-debug-command",
        "yes",
    ]
    .map(String::from)
    .to_vec();
    let primary = Server::start(opts);
    let replica = Server::start(ServerOpts::new(&s3));
    let (mut c, mut r) = (primary.conn(), replica.conn());
    const DBS: [&str; 3] = ["0", "1", "3"];
    let ids: Vec<String> = (0..2).map(|i| format!("m{i}")).collect();
    for db in DBS {
        cmd::<()>(&mut c, &["SELECT", db]).unwrap();
        for id in ids.iter().chain([&format!("only-{db}")]) {
            write_flow(&mut c, &FlowSpec::done(id));
        }
        // Stays live: changed during its upload in DB 0, archived by nobody in the others.
        write_flow(&mut c, &FlowSpec::done(&format!("kept-{db}")));
    }
    cmd::<()>(&mut c, &["SELECT", "0"]).unwrap();
    replicate(&mut r, primary.port, "argyll:flow:m0:events");

    proxy.hold("PUT");
    sweep_async(&mut c).unwrap();
    let mut archives = Vec::new();
    for db in ["1", "3"] {
        for id in ids.iter().chain([&format!("only-{db}")]) {
            let mut other = primary.conn();
            cmd::<()>(&mut other, &["SELECT", db]).unwrap();
            let id = id.clone();
            archives.push(std::thread::spawn(move || archive(&mut other, &id)));
        }
    }
    // The sweep of DB 0 uploads all four flows there.
    wait_for("every upload held", Duration::from_secs(120), || {
        proxy.gated() == 4 + 3 + 3
    });
    let late = ["RPUSH", "argyll:flow:kept-0:events", "{\"late\":1}"];
    cmd::<()>(&mut c, &late).unwrap();
    // The main thread busy a few milliseconds at a time: the commits handed over meanwhile wait
    // together for the next turn.
    let busy = Busy::start(&primary);
    proxy.release();
    for a in archives {
        a.join().unwrap().unwrap();
    }
    wait_for("sweep done", Duration::from_secs(30), || {
        info_field(&mut c, "sweep_running") == 0
    });
    busy.stop();
    assert_eq!(info_field(&mut c, "last_sweep_archived"), 3);
    let mut before = Vec::new();
    for db in DBS {
        cmd::<()>(&mut c, &["SELECT", db]).unwrap();
        let expected: BTreeSet<String> =
            ids.iter().cloned().chain([format!("only-{db}")]).collect();
        assert_eq!(indexed(&mut c), expected, "DB {db}");
        let kept = format!("argyll:flow:kept-{db}:events");
        assert_eq!(
            cmd::<i64>(&mut c, &["EXISTS", &kept]).unwrap(),
            1,
            "DB {db}"
        );
        before.push(dump_all(&mut c));
    }

    // The AOF: some transaction writes to several DBs.
    let mut most_dbs = 0;
    let (mut open, mut db) = (None::<BTreeSet<String>>, String::from("0"));
    for command in aof_commands(&primary.dir) {
        match command[0].to_uppercase().as_str() {
            "SELECT" => db = command[1].clone(),
            "MULTI" => open = Some(BTreeSet::new()),
            "EXEC" => most_dbs = most_dbs.max(open.take().map_or(0, |dbs| dbs.len())),
            _ => {
                if let Some(dbs) = &mut open {
                    dbs.insert(db.clone());
                }
            }
        }
    }
    assert!(most_dbs >= 2, "no transaction wrote to several DBs");

    let acked: i64 = cmd(&mut c, &["WAIT", "1", "10000"]).unwrap();
    assert_eq!(acked, 1, "the replica acknowledges the primary's writes");
    for (db, before) in DBS.iter().zip(&before) {
        cmd::<()>(&mut r, &["SELECT", db]).unwrap();
        assert_same(before, &dump_all(&mut r), &format!("replica, DB {db}"));
    }
    for db in ["2", "4"] {
        cmd::<()>(&mut r, &["SELECT", db]).unwrap();
        assert_eq!(
            cmd::<i64>(&mut r, &["DBSIZE"]).unwrap(),
            0,
            "replica, DB {db}"
        );
    }

    cmd::<()>(&mut c, &["DEBUG", "LOADAOF"]).unwrap();
    for (db, before) in DBS.iter().zip(&before) {
        cmd::<()>(&mut c, &["SELECT", db]).unwrap();
        assert_same(before, &dump_all(&mut c), &format!("reloaded, DB {db}"));
    }
}
