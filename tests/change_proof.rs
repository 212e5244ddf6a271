//! The commit's change proof against a real server: every kind of write between capture and commit
//! keeps the flow live and intact, for a flow read in one step (compared at commit, no keyspace hook)
//! and for a long one (followed by keyspace events from its first chunk); and a module that has only
//! archived short flows has no keyspace hook at all, so the server's own writes pay nothing. A label
//! grown between capture and commit is not read past the captured labels' bytes, and a label field
//! expired but not yet reclaimed (Valkey 9) keeps the flow live until the server reclaims it.

mod common;

use std::time::Duration;

use common::checker;
use common::proxy::{Fault, Proxy, Rule};
use common::*;

/// More events than one read step (`EVENTS_PER_STEP` = 1024): read over several steps, followed.
const LONG: usize = 1024 + 300;

/// Archives `id` with its PUT held back, applies `change` while the object is on its way, and checks
/// the archive was refused and every key of the DB is as the change left it.
fn change_during_upload(
    srv: &Server,
    proxy: &Proxy,
    id: &str,
    events: usize,
    change: impl FnOnce(&mut redis::Connection),
) {
    write_flow(
        &mut srv.conn(),
        &FlowSpec {
            events,
            ..FlowSpec::done(id)
        },
    );
    change_written_during_upload(srv, proxy, id, change);
}

/// `change_during_upload` of a flow written already.
fn change_written_during_upload(
    srv: &Server,
    proxy: &Proxy,
    id: &str,
    change: impl FnOnce(&mut redis::Connection),
) {
    let mut expected = None;
    let (_, answer) = held_upload(srv, proxy, id, |c| {
        change(c);
        expected = Some(dump_all(c));
    });
    let e = err_text(answer);
    assert!(
        e.contains("changed while it was being archived") && e.contains("nothing was deleted"),
        "{id}: {e}"
    );
    let mut c = srv.conn();
    assert_same(&expected.unwrap(), &dump_all(&mut c), id);
    assert_eq!(
        cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", id]).unwrap(),
        0,
        "{id}"
    );
}

fn run(c: &mut redis::Connection, args: &[&str]) {
    cmd::<redis::Value>(c, args).unwrap();
}

/// Queues the command `args` in `tx`.
fn queue(tx: &mut redis::Pipeline, args: &[&str]) {
    tx.cmd(args[0]);
    for a in &args[1..] {
        tx.arg(*a);
    }
}

/// The events of the lead flow `a-lead`, which a sweep reads over at least 30 steps (1,024 events a
/// step at most), before the flows whose ids sort after it.
const LEAD_EVENTS: usize = 30 * 1024;

/// A snapshot or labels hash read over several steps (3 MiB; one step reads 1 MiB).
const LARGE: usize = 3 << 20;

/// The smallest step budget and 16 flows in flight, and the lead flow (`LEAD_EVENTS`) written into
/// `model`: a sweep then begins every flow whose id sorts after the lead's, and finishes them only
/// once the lead is read.
fn behind_a_lead(c: &mut redis::Connection, model: &mut checker::Model) {
    config_set(c, "flowarchive.step-budget-us", "50").unwrap();
    config_set(c, "flowarchive.concurrency", "16").unwrap();
    let lead = FlowSpec {
        events: LEAD_EVENTS,
        ..FlowSpec::done("a-lead")
    };
    model.write(c, &lead);
}

/// The end of a sweep whose writes, between its capture steps, changed `changed` flows: it archived
/// the lead and the quiet flow alone (the checker finds every other flow live as the writes left
/// it) and holds no byte of those it refused, and a quiet sweep then archives each changed flow as
/// it was left (every flow checked).
fn archived_as_left(
    srv: &Server,
    s3: &S3,
    c: &mut redis::Connection,
    model: &checker::Model,
    swept: SweepThread,
    changed: usize,
) {
    let summary = swept.join().unwrap().unwrap();
    assert_eq!(int(&summary["archived"]), 2, "{summary:?}");
    assert_eq!(
        int(&summary["skipped_changed"]),
        changed as i64,
        "{summary:?}"
    );
    let tally = checker::check("after the writes", srv, s3, model, checker::Expect::Either);
    assert_eq!(tally.archived, 2, "the lead and the quiet flow");
    let held = info_field(c, "buffered_bytes");
    assert_eq!(
        held, 0,
        "every byte of the flows refused mid-capture released"
    );
    let summary = sweep(c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), changed as i64, "{summary:?}");
    checker::check_swept("after a quiet sweep", srv, s3, model, model.flows.len());
}

/// A sweep running on a thread of its own: its summary.
type SweepThread =
    std::thread::JoinHandle<redis::RedisResult<std::collections::HashMap<String, redis::Value>>>;

#[test]
fn every_write_between_capture_and_commit_keeps_a_short_flow() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    type Change = Box<dyn Fn(&mut redis::Connection, &str)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "late",
            Box::new(|c, id| run(c, &["RPUSH", &events_key(id), "{}"])),
        ),
        (
            "flooded",
            // Grown past one read step: measured at commit, not read.
            Box::new(|c, id| {
                let events: Vec<String> = (0..3000).map(|i| format!("{{\"n\":{i}}}")).collect();
                cmd::<()>(
                    c,
                    &[
                        &["RPUSH", &events_key(id)][..],
                        &events.iter().map(String::as_str).collect::<Vec<_>>()[..],
                    ]
                    .concat(),
                )
                .unwrap();
            }),
        ),
        (
            "edited",
            Box::new(|c, id| run(c, &["LSET", &events_key(id), "2", "{}"])),
        ),
        (
            "trimmed",
            Box::new(|c, id| run(c, &["LTRIM", &events_key(id), "0", "3"])),
        ),
        (
            "popped-pushed",
            Box::new(|c, id| {
                // Same length, other content.
                run(c, &["RPOP", &events_key(id)]);
                run(c, &["RPUSH", &events_key(id), "{\"type\":\"other\"}"]);
            }),
        ),
        (
            "resnapshot",
            Box::new(move |c, id| run(c, &["SET", &snapshot_key(id), "{}"])),
        ),
        (
            "reseq",
            Box::new(|c, id| run(c, &["SET", &format!("argyll:flow:{id}:snapshot:seq"), "9"])),
        ),
        (
            "relabelled",
            Box::new(|c, id| run(c, &["HSET", &labels_key(id), "x", "y"])),
        ),
        (
            "unlabelled",
            Box::new(|c, id| run(c, &["DEL", &labels_key(id)])),
        ),
        (
            "renamed-over",
            Box::new(|c, id| {
                run(c, &["RPUSH", "elsewhere", "a", "b", "c", "d", "e"]);
                run(c, &["RENAME", "elsewhere", &events_key(id)]);
            }),
        ),
        (
            "expired",
            Box::new(|c, id| {
                run(c, &["PEXPIRE", &events_key(id), "1"]);
                std::thread::sleep(Duration::from_millis(20));
                run(c, &["EXISTS", &events_key(id)]);
            }),
        ),
        (
            "in-a-transaction",
            Box::new(|c, id| {
                redis::pipe()
                    .atomic()
                    .cmd("LSET")
                    .arg(events_key(id))
                    .arg(0)
                    .arg("{}")
                    .query::<()>(c)
                    .unwrap();
            }),
        ),
        (
            "by-a-script",
            Box::new(|c, id| {
                run(
                    c,
                    &[
                        "EVAL",
                        "return redis.call('LSET', KEYS[1], 1, '{}')",
                        "1",
                        &events_key(id),
                    ],
                );
            }),
        ),
    ];
    for (id, change) in &cases {
        change_during_upload(&srv, &proxy, id, 5, |c| change(c, id));
    }
    // None of it needed a keyspace hook.
    let mut c = srv.conn();
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 0);
}

#[test]
fn a_rewrite_to_the_same_content_is_archived_with_that_content() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("same"));
    let before: Vec<String> = cmd(&mut c, &["LRANGE", &events_key("same"), "0", "-1"]).unwrap();
    proxy.hold("PUT");
    let mut other = srv.conn();
    let flow = std::thread::spawn(move || archive(&mut other, "same"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    // Deleted and written again, event for event: what the archive holds is what Valkey holds.
    let mut rewrite = vec!["RPUSH".to_string(), events_key("same")];
    rewrite.extend(before.iter().cloned());
    redis::pipe()
        .atomic()
        .cmd("DEL")
        .arg(events_key("same"))
        .cmd(&rewrite[0])
        .arg(&rewrite[1..])
        .query::<()>(&mut c)
        .unwrap();
    proxy.release();
    let r = flow.join().unwrap().unwrap();
    assert_eq!(int(&r["events"]), 5);
    let (_, events) = get_events(&mut c, "same").unwrap();
    assert_eq!(events, before, "the archive holds every event as it was");
}

/// Small keys framed into more bytes than the commit keeps (1 MiB) are compared by their hash: a
/// snapshot of 1 MB (read in one step, so not followed) with a label of 100 kB, edited to the same
/// size, keeps the flow, and the same flow unchanged is archived; no keyspace event was needed.
#[test]
fn small_keys_too_large_to_keep_are_compared_by_their_hash() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let large = |c: &mut redis::Connection, id: &str| {
        write_padded_flow(c, id, 1_000_000);
        let label = "l".repeat(100_000);
        run(c, &["HSET", &labels_key(id), "note", &label]);
    };
    large(&mut c, "big-same");
    let r = archive(&mut c, "big-same").unwrap();
    assert_eq!(int(&r["events"]), 5);
    large(&mut c, "big-edited");
    change_written_during_upload(&srv, &proxy, "big-edited", |c| {
        let key = "argyll:flow:big-edited:snapshot:val";
        let len: i64 = cmd(c, &["STRLEN", key]).unwrap();
        // One byte of the padding, the size unchanged.
        run(c, &["SETRANGE", key, &(len - 100).to_string(), "q"]);
    });
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 0);
}
/// Sweeps on another connection, each of its steps held back by a busy script, and runs `tx` (its
/// last command INFO) as soon as every flow of the round is begun (INFO `buffered_bytes` at `begun`),
/// all of it between two steps: that it came within the sweep's first `most_steps` steps is
/// checked. The sweep, still going, and the transaction's replies.
fn between_capture_steps(
    srv: &Server,
    c: &mut redis::Connection,
    tx: &redis::Pipeline,
    begun: i64,
    most_steps: i64,
) -> (SweepThread, Vec<redis::Value>) {
    let busy = Busy::start(srv);
    let mut other = srv.conn();
    other
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let start = info_field(c, "main_thread_steps");
    let swept = std::thread::spawn(move || sweep(&mut other, &[]));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while info_field(c, "buffered_bytes") < begun {
        assert!(
            std::time::Instant::now() < deadline,
            "the flows were not begun"
        );
    }
    let replies: Vec<redis::Value> = tx.query(c).unwrap();
    busy.stop();
    let info = text(replies.last().unwrap());
    let steps = info
        .lines()
        .find_map(|l| l.strip_prefix("flowarchive_main_thread_steps:"));
    let steps = steps.unwrap().trim().parse::<i64>().unwrap() - start;
    assert!(
        steps <= most_steps,
        "the writes came after {steps} steps: the lead may have been read whole"
    );
    (swept, replies)
}

/// Archives `id` with its PUT held at the proxy's gate, applies `change` while the object is held:
/// INFO `buffered_bytes` in the upload and the archive's answer.
fn held_upload(
    srv: &Server,
    proxy: &Proxy,
    id: &str,
    change: impl FnOnce(&mut redis::Connection),
) -> (
    i64,
    redis::RedisResult<std::collections::HashMap<String, redis::Value>>,
) {
    held_upload_in(srv, proxy, 0, id, change)
}

/// The commit keeps the small keys framed into exactly 1 MiB and hashes one byte more, so that an
/// upload holds no second copy of a larger snapshot (INFO `buffered_bytes` in the upload shows which).
/// Either way an unchanged flow is archived, and one whose snapshot is edited at its last padding byte,
/// or grown or shrunk by a byte to the other side of the boundary, during the upload is kept. Every
/// byte held for them is released, also when the upload fails.
#[test]
fn small_keys_of_exactly_one_mib_are_kept_and_one_byte_more_hashed() {
    const KEEP: usize = 1 << 20;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    // A flow whose small keys frame into `framed` bytes: six parts of an 8-byte length each, the
    // snapshot's mark (1 byte), the snapshot, its sequence ("5"), the label count (8) and the label
    // `tenant` = `acme` (10): the snapshot and 68 bytes.
    let flow = |c: &mut redis::Connection, id: &str, framed: usize| {
        write_padded_flow(c, id, framed - 68);
    };
    for (form, framed, other) in [("kept", KEEP, KEEP + 1), ("hashed", KEEP + 1, KEEP)] {
        let holds = |held: i64| match form {
            "kept" => held >= KEEP as i64,
            _ => held < (KEEP / 4) as i64,
        };
        let same = format!("{form}-same");
        flow(&mut c, &same, framed);
        let (held, answer) = held_upload(&srv, &proxy, &same, |_| {});
        assert!(holds(held), "{same}: {held} bytes held in the upload");
        assert_eq!(int(&answer.unwrap()["events"]), 5, "{same}");

        let edited = format!("{form}-edited");
        flow(&mut c, &edited, framed);
        let (held, answer) = held_upload(&srv, &proxy, &edited, |c| {
            let at = framed - 68 - 3;
            run(
                c,
                &["SETRANGE", &snapshot_key(&edited), &at.to_string(), "q"],
            );
        });
        assert!(holds(held), "{edited}: {held} bytes held in the upload");
        let e = err_text(answer);
        assert!(
            e.contains("changed while it was being archived"),
            "{edited}: {e}"
        );

        let across = format!("{form}-across");
        flow(&mut c, &across, framed);
        change_written_during_upload(&srv, &proxy, &across, |c| {
            let snapshot = padded_snapshot(c, &across, other - 68);
            run(c, &["SET", &snapshot_key(&across), &snapshot]);
        });
    }
    for id in [
        "kept-edited",
        "hashed-edited",
        "kept-across",
        "hashed-across",
    ] {
        assert_eq!(
            cmd::<i64>(&mut c, &["EXISTS", &snapshot_key(id)]).unwrap(),
            1,
            "{id}"
        );
        assert_eq!(
            cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", id]).unwrap(),
            0,
            "{id}"
        );
    }
    wait_for("every byte released", Duration::from_secs(10), || {
        info_field(&mut c, "buffered_bytes") == 0
    });

    // A sweep commits the one it finds unchanged (and the four above, with their changes), keeps the
    // one edited, and releases them all.
    for id in ["swept-same", "swept-edited"] {
        flow(&mut c, id, KEEP);
    }
    // Only these two are held: the other four go on and leave them a place among the uploads.
    proxy.set(
        ["swept-same.", "swept-edited."]
            .map(|id| Rule {
                method: "PUT",
                path: id.to_string(),
                fault: Fault::Gate,
            })
            .to_vec(),
    );
    // The sweep's uploads run in the idle scheduling class: on a machine whose cores are all busy
    // they reach the store only slowly (over a minute with three busy loops on two cores).
    let mut other = srv.conn();
    other
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let sweeping = std::thread::spawn(move || sweep(&mut other, &[]));
    wait_for("both PUTs held", Duration::from_secs(180), || {
        proxy.gated() == 2
    });
    run(
        &mut c,
        &["SETRANGE", &snapshot_key("swept-edited"), "100", "q"],
    );
    proxy.release();
    let swept = sweeping.join().unwrap().unwrap();
    assert_eq!(int(&swept["archived"]), 5, "{swept:?}");
    assert_eq!(int(&swept["skipped_changed"]), 1, "{swept:?}");
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &snapshot_key("swept-same")]).unwrap(),
        0
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &snapshot_key("swept-edited")]).unwrap(),
        1
    );
    wait_for("every byte released", Duration::from_secs(10), || {
        info_field(&mut c, "buffered_bytes") == 0
    });

    // An upload that fails once the small keys are kept releases them too.
    flow(&mut c, "kept-failed", KEEP);
    proxy.set(vec![Rule {
        method: "PUT",
        path: "kept-failed".into(),
        fault: Fault::Status(403),
    }]);
    let e = err_text(archive(&mut c, "kept-failed"));
    assert!(e.contains("nothing was deleted"), "{e}");
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &snapshot_key("kept-failed")]).unwrap(),
        1
    );
    wait_for("every byte released", Duration::from_secs(10), || {
        info_field(&mut c, "buffered_bytes") == 0
    });
}

/// What an upload holds of a flow is counted in INFO `buffered_bytes`: with a snapshot of 16 MB
/// (followed, so measured at commit) or labels of 4.5 MB (too large to keep for the commit, so
/// hashed), each encoded into a few kB, the module's heap during the upload rises by what
/// `buffered_bytes` counts and little more.
#[test]
fn an_upload_counts_what_it_holds_of_the_snapshot_and_the_labels() {
    const SNAPSHOT: usize = 16 << 20;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let key = "argyll:flow:large:snapshot:val";
    let spec = FlowSpec {
        snapshot: Snapshot::Current,
        ..FlowSpec::done("large")
    };
    write_flow(&mut c, &spec);
    let padded = padded_snapshot(&mut c, "large", SNAPSHOT);
    run(&mut c, &["SET", key, &padded]);
    let values: Vec<String> = (0..3)
        .map(|i| format!("{i}{}", "l".repeat(1_500_000)))
        .collect();
    let labels: Vec<(&str, &str)> = ["a", "b", "c"]
        .into_iter()
        .zip(values.iter().map(String::as_str))
        .collect();
    let spec = FlowSpec {
        labels: &labels,
        ..FlowSpec::done("labelled")
    };
    write_flow(&mut c, &spec);
    for id in ["large", "labelled"] {
        let before = info_field(&mut c, "heap_bytes");
        let mut heap = 0;
        let (held, answer) = held_upload(&srv, &proxy, id, |c| {
            heap = info_field(c, "heap_bytes");
        });
        assert_eq!(int(&answer.unwrap()["events"]), 5, "{id}");
        let rise = heap - before;
        assert!(
            rise <= held + (2 << 20),
            "{id}: the heap rose by {rise} bytes in the upload, {held} of them counted"
        );
        wait_for("every byte released", Duration::from_secs(10), || {
            info_field(&mut c, "buffered_bytes") == 0
        });
    }
}

/// Labels are a hash: rewritten in another order during the upload they are the same labels, and the
/// flow is archived; two labels' values swapped, or a label renamed to a name of the same size (the
/// same count and bytes, so only the comparison itself sees it), keep the flow.
#[test]
fn labels_compare_as_a_set_whatever_order_they_are_read_in() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let labels = [("tenant", "acme"), ("team", "core"), ("zone", "euro")];
    let rewrite = |c: &mut redis::Connection, id: &str, pairs: &[(&str, &str)]| {
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(labels_key(id));
        for (name, value) in pairs {
            pipe.cmd("HSET").arg(labels_key(id)).arg(name).arg(value);
        }
        pipe.query::<()>(c).unwrap();
    };
    for id in ["reordered", "swapped", "renamed"] {
        let spec = FlowSpec {
            labels: &labels,
            ..FlowSpec::done(id)
        };
        write_flow(&mut c, &spec);
    }
    let read = |c: &mut redis::Connection| -> Vec<String> {
        cmd(c, &["HGETALL", &labels_key("reordered")]).unwrap()
    };
    let before = read(&mut c);
    let (_, answer) = held_upload(&srv, &proxy, "reordered", |c| {
        let mut reversed = labels;
        reversed.reverse();
        rewrite(c, "reordered", &reversed);
        let after = read(c);
        assert!(after != before, "read in another order: {after:?}");
    });
    assert_eq!(int(&answer.unwrap()["events"]), 5);
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &labels_key("reordered")]).unwrap(),
        0
    );

    change_written_during_upload(&srv, &proxy, "swapped", |c| {
        rewrite(
            c,
            "swapped",
            &[("tenant", "core"), ("team", "acme"), ("zone", "euro")],
        );
    });
    change_written_during_upload(&srv, &proxy, "renamed", |c| {
        rewrite(
            c,
            "renamed",
            &[("tenant", "acme"), ("team", "core"), ("zonf", "euro")],
        );
    });
}

#[test]
fn every_write_to_a_long_flow_between_its_steps_and_the_commit_keeps_it() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    // Short flows archived and read: still no hook.
    write_flow(&mut c, &FlowSpec::done("short"));
    archive(&mut c, "short").unwrap();
    assert!(get(&mut c, "short").unwrap().is_some());
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 0);

    change_during_upload(&srv, &proxy, "long-edited", LONG, |c| {
        run(c, &["LSET", &events_key("long-edited"), "700", "{}"])
    });
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 1);
    change_during_upload(&srv, &proxy, "long-snapshot", LONG, |c| {
        run(c, &["SET", "argyll:flow:long-snapshot:snapshot:val", "{}"])
    });
    change_during_upload(&srv, &proxy, "long-expired", LONG, |c| {
        run(c, &["PEXPIRE", &events_key("long-expired"), "1"]);
        std::thread::sleep(Duration::from_millis(20));
        run(c, &["EXISTS", &events_key("long-expired")]);
    });

    // A transaction queued before the capture began and executed during the upload: its writes
    // raise their events when they run.
    let id = "long-queued";
    write_flow(
        &mut c,
        &FlowSpec {
            events: LONG,
            ..FlowSpec::done(id)
        },
    );
    let mut tx = srv.conn();
    run(&mut tx, &["MULTI"]);
    run(&mut tx, &["LSET", &events_key(id), "3", "{}"]);
    proxy.hold("PUT");
    let mut other = srv.conn();
    let flow = std::thread::spawn(move || archive(&mut other, id));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    run(&mut tx, &["EXEC"]);
    let expected = dump_all(&mut c);
    proxy.release();
    let e = err_text(flow.join().unwrap());
    assert!(e.contains("changed while it was being archived"), "{e}");
    assert_same(&expected, &dump_all(&mut c), id);

    // Quiet again: archived whole.
    let r = archive(&mut c, "long-edited").unwrap();
    assert_eq!(int(&r["events"]), LONG as i64);
}

/// A snapshot larger than one read step (1 MiB) is followed from the capture's first step, string
/// writes included, and measured at commit instead of compared: every kind of write to it while the
/// object is on its way keeps the flow live and intact, among them a rewrite to the very same bytes
/// (a watch cannot tell it apart), a set command's store over it and back to a string, and writes in
/// a transaction or a script. String writes are subscribed to only then: a long log alone does not.
#[test]
fn every_write_to_a_large_snapshot_during_the_upload_keeps_the_flow() {
    const SNAPSHOT: usize = 3 << 20;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let large = |c: &mut redis::Connection, id: &str| write_padded_flow(c, id, SNAPSHOT);
    change_during_upload(&srv, &proxy, "long", LONG, |c| {
        run(c, &["LSET", &events_key("long"), "700", "{}"])
    });
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 1);
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 0);

    type Change = Box<dyn Fn(&mut redis::Connection, &str, &str)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "ranged",
            Box::new(|c, key, _| run(c, &["SETRANGE", key, "2000000", "q"])),
        ),
        (
            "same-bytes",
            Box::new(|c, key, snapshot| run(c, &["SET", key, snapshot])),
        ),
        (
            "appended",
            Box::new(|c, key, _| run(c, &["APPEND", key, " "])),
        ),
        (
            "bit-set",
            Box::new(|c, key, _| run(c, &["SETBIT", key, "9", "1"])),
        ),
        (
            "bitfield",
            Box::new(|c, key, _| run(c, &["BITFIELD", key, "SET", "u8", "#700000", "65"])),
        ),
        ("deleted", Box::new(|c, key, _| run(c, &["DEL", key]))),
        (
            "got-deleted",
            Box::new(|c, key, _| run(c, &["GETDEL", key])),
        ),
        (
            "renamed-over",
            Box::new(|c, key, snapshot| {
                run(c, &["SET", "elsewhere", &snapshot.replacen('0', "1", 1)]);
                run(c, &["RENAME", "elsewhere", key]);
            }),
        ),
        (
            "copied-over",
            Box::new(|c, key, snapshot| {
                run(c, &["SET", "elsewhere", &snapshot.replacen('0', "1", 1)]);
                run(c, &["COPY", "elsewhere", key, "REPLACE"]);
                run(c, &["DEL", "elsewhere"]);
            }),
        ),
        (
            "restored",
            Box::new(|c, key, snapshot| {
                run(c, &["SET", "elsewhere", &snapshot.replacen('0', "1", 1)]);
                let dump: Vec<u8> = cmd(c, &["DUMP", "elsewhere"]).unwrap();
                run(c, &["DEL", "elsewhere"]);
                redis::cmd("RESTORE")
                    .arg(key)
                    .arg(0)
                    .arg(dump)
                    .arg("REPLACE")
                    .query::<()>(c)
                    .unwrap();
            }),
        ),
        (
            "stored-over-and-back",
            // A set command's store raises a set event, not followed; the SET back to a string is.
            Box::new(|c, key, snapshot| {
                run(c, &["SADD", "members", "m"]);
                run(c, &["SUNIONSTORE", key, "members"]);
                run(c, &["DEL", "members"]);
                run(c, &["SET", key, snapshot]);
            }),
        ),
        (
            "expired",
            Box::new(|c, key, _| {
                run(c, &["PEXPIRE", key, "1"]);
                std::thread::sleep(Duration::from_millis(20));
                run(c, &["EXISTS", key]);
            }),
        ),
        (
            "in-a-transaction",
            Box::new(|c, key, _| {
                redis::pipe()
                    .atomic()
                    .cmd("SETRANGE")
                    .arg(key)
                    .arg(100)
                    .arg("q")
                    .query::<()>(c)
                    .unwrap();
            }),
        ),
        (
            "by-a-script",
            Box::new(|c, key, _| {
                let script = "return redis.call('SETRANGE', KEYS[1], 3000000, 'q')";
                run(c, &["EVAL", script, "1", key]);
            }),
        ),
    ];
    for (id, change) in &cases {
        let snapshot = large(&mut c, id);
        change_written_during_upload(&srv, &proxy, id, |c| {
            change(c, &snapshot_key(id), &snapshot)
        });
    }
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 1);
    // Unchanged, the same flow is archived, and its object holds the snapshot exactly.
    let snapshot = large(&mut c, "unchanged");
    let (_, answer) = held_upload(&srv, &proxy, "unchanged", |_| {});
    assert_eq!(int(&answer.unwrap()["events"]), 5);
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &snapshot_key("unchanged")]).unwrap(),
        0
    );
    let object = gunzip(&s3.get("flows/unchanged.jsonl.gz").expect("the object"));
    assert!(
        object.contains(&format!("\"snapshot\":{snapshot},")),
        "the snapshot as stored"
    );
}

/// `snapshot` (made by `padded_snapshot`) with every digit of its padding moved on by one: as long, as
/// valid, the same state, other bytes from the padding's first on.
fn repadded(snapshot: &str) -> String {
    let start = snapshot.find("\"pad\":\"").expect("a padded snapshot") + 7;
    let (head, pad) = snapshot.split_at(start);
    let pad = pad
        .strip_suffix("\"}")
        .expect("the padding ends the object");
    let moved = pad.bytes().map(|d| char::from(b'0' + (d - b'0' + 1) % 10));
    format!("{head}{}\"}}", moved.collect::<String>())
}

/// The byte of a padded snapshot the tests below write: in its padding, within the first piece a
/// capture copies (256 KiB), so it is copied in the capture's first step.
fn early_pad_byte(snapshot: &str) -> usize {
    snapshot.find("\"pad\":\"").expect("a padded snapshot") + 7 + 10
}

/// A snapshot larger than one step (1 MiB) is copied over many steps: a write to it between two of
/// them, even one that leaves its length as it was (a watch must see it: the commit measures the
/// snapshot, it does not compare it), keeps the flow live and intact. A sweep begins every flow of
/// its round, each copying the first piece of its snapshot in the step that judges it, then finishes
/// them one after another: the flows that follow a long log wait between their first and second step
/// while it is read (at most 1,024 events a step, so for at least 30 steps, each made to wait behind a
/// busy script), and that is where the writes land, all at once. Among them a write to the piece
/// already copied, rewrites of the same length by every command that can make one, a snapshot grown
/// from under 1 MiB (read whole and compared), shrunk under it, or deleted. A quiet sweep then archives
/// each as it was left, byte for byte (the checker compares every key and object).
#[test]
fn every_write_to_a_large_snapshot_between_capture_steps_keeps_the_flow() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    // No snapshot: a long log alone (its fold, stored as a snapshot, would pass 1 MiB).
    behind_a_lead(&mut c, &mut model);
    // Flow `id` with a snapshot padded to `len` bytes (and `events` events); its snapshot.
    let mut flow = |c: &mut redis::Connection, id: &str, len: Option<usize>, events: usize| {
        let spec = FlowSpec {
            events,
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        match len {
            Some(len) => _ = model.write_padded(c, &spec, len),
            None => model.write(c, &spec),
        }
        model.flows[id].snapshot.clone().unwrap()
    };
    // The ids sort after the lead's, so the sweep finishes them after it.
    let large = [
        "b-ranged",
        "b-rewritten",
        "b-same-bytes",
        "b-stored-over-and-back",
        "b-renamed-over",
        "b-copied-over",
        "b-restored",
        "b-moved-out-and-back",
        "b-appended",
        "b-shrunk",
        "b-deleted",
        "b-quiet",
    ];
    let mut before = std::collections::HashMap::new();
    for id in large {
        before.insert(id, flow(&mut c, id, Some(LARGE), 5));
    }
    // Under 1 MiB when judged (read whole, compared at commit), and a long log to read in steps.
    flow(&mut c, "b-grown", None, LONG);

    // What each write leaves, and the writes: small commands in one transaction, whatever bytes they
    // write staged beforehand (a transaction carrying megabytes is read over many event-loop turns,
    // and the capture would go on meanwhile).
    let ranged = |s: &str| {
        let mut b = s.as_bytes().to_vec();
        b[early_pad_byte(s)] = b'x';
        String::from_utf8(b).unwrap()
    };
    let offset = |s: &str| early_pad_byte(s).to_string();
    let staged = |id: &str| format!("staged:{id}");
    let mut after: Vec<(&str, Option<String>)> = Vec::new();
    let mut stage = |c: &mut redis::Connection, id: &'static str, content: String| {
        run(c, &["SET", &staged(id), &content]);
        after.push((id, Some(content)));
    };
    for id in [
        "b-rewritten",
        "b-stored-over-and-back",
        "b-renamed-over",
        "b-copied-over",
        "b-restored",
    ] {
        stage(&mut c, id, repadded(&before[id]));
    }
    let shrunk = padded_snapshot(&mut c, "b-shrunk", 512 << 10);
    stage(&mut c, "b-shrunk", shrunk);
    let grown = padded_snapshot(&mut c, "b-grown", LARGE);
    stage(&mut c, "b-grown", grown);
    // A string command's write of a staged value, and a restore of its dump.
    const SET_FROM: &str = "return redis.call('SET', KEYS[1], redis.call('GET', KEYS[2]))";
    const RESTORE_FROM: &str =
        "return redis.call('RESTORE', KEYS[1], 0, redis.call('DUMP', KEYS[2]), 'REPLACE')";
    let mut tx = redis::pipe();
    tx.atomic();
    let mut add = |args: &[&str]| queue(&mut tx, args);
    let s = &before["b-ranged"];
    add(&["SETRANGE", &snapshot_key("b-ranged"), &offset(s), "x"]);
    after.push(("b-ranged", Some(ranged(s))));
    for id in ["b-rewritten", "b-shrunk", "b-grown"] {
        add(&["EVAL", SET_FROM, "2", &snapshot_key(id), &staged(id)]);
    }
    let s = &before["b-same-bytes"];
    add(&[
        "EVAL",
        SET_FROM,
        "2",
        &snapshot_key("b-same-bytes"),
        &snapshot_key("b-same-bytes"),
    ]);
    after.push(("b-same-bytes", Some(s.clone())));
    let (id, key) = (
        "b-stored-over-and-back",
        snapshot_key("b-stored-over-and-back"),
    );
    add(&["SADD", "members", "m"]);
    add(&["SUNIONSTORE", &key, "members"]);
    add(&["DEL", "members"]);
    add(&["EVAL", SET_FROM, "2", &key, &staged(id)]);
    add(&[
        "RENAME",
        &staged("b-renamed-over"),
        &snapshot_key("b-renamed-over"),
    ]);
    add(&[
        "COPY",
        &staged("b-copied-over"),
        &snapshot_key("b-copied-over"),
        "REPLACE",
    ]);
    let (id, key) = ("b-restored", snapshot_key("b-restored"));
    add(&["EVAL", RESTORE_FROM, "2", &key, &staged(id)]);
    let s = &before["b-moved-out-and-back"];
    let key = snapshot_key("b-moved-out-and-back");
    add(&["MOVE", &key, "1"]);
    add(&["SELECT", "1"]);
    add(&["SETRANGE", &key, &offset(s), "x"]);
    add(&["MOVE", &key, "0"]);
    add(&["SELECT", "0"]);
    after.push(("b-moved-out-and-back", Some(ranged(s))));
    add(&["APPEND", &snapshot_key("b-appended"), " "]);
    after.push(("b-appended", Some(format!("{} ", before["b-appended"]))));
    // With its sequence, so the log alone is the flow again.
    add(&[
        "DEL",
        &snapshot_key("b-deleted"),
        "argyll:flow:b-deleted:snapshot:seq",
    ]);
    after.push(("b-deleted", None));
    let stages: Vec<String> = after.iter().map(|(id, _)| staged(id)).collect();
    let mut del = vec!["DEL"];
    del.extend(stages.iter().map(String::as_str));
    add(&del);
    add(&["INFO", "flowarchive"]);

    // Every flow begun (each counts its snapshot from its first step): the lead is being read, the
    // others wait for their second step.
    let begun = (large.len() * LARGE) as i64;
    // The lead alone takes a step per 1,024 events at least: within its first 30, it was still being
    // read, and the others had had only their first step.
    let (swept, _) = between_capture_steps(&srv, &mut c, &tx, begun, (LEAD_EVENTS / 1024) as i64);
    for (id, snapshot) in after {
        model.flows.get_mut(id).unwrap().snapshot = snapshot;
    }
    model.flows.get_mut("b-deleted").unwrap().seq = None;
    // Every large one but the quiet one, and the grown one.
    archived_as_left(&srv, &s3, &mut c, &model, swept, large.len());
}

/// The same ids in DB 0 and DB 1, each with a 3 MiB snapshot or a log over 1 MiB: writes to one DB's
/// copy between the capture steps of DB 0's sweep (by SELECT inside a transaction and a script, by a
/// MOVE out and back) keep exactly the flows written, whichever DB the write came from; the other
/// DB's copy of the same id is archived as it was. During the upload of one DB's copy, a write to the
/// other's keeps nothing, and a `COPY … DB 1 REPLACE` over its snapshot or its log, at the same
/// length, from a transaction in DB 0 keeps it (that event reached the keyspace hook in DB 0, and the
/// flow was deleted, its archive holding what the copy replaced). Then every flow is archived as
/// left, each in its own DB's objects, every event checked.
#[test]
fn a_write_to_one_dbs_copy_of_an_id_keeps_only_that_dbs_flow() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let (mut c0, mut c1) = (srv.conn(), srv.conn());
    run(&mut c1, &["SELECT", "1"]);
    let (mut m0, mut m1) = (checker::Model::new(0), checker::Model::new(1));
    behind_a_lead(&mut c0, &mut m0);
    // Each id in both DBs; the DB whose copy is written is in its name.
    let large = [
        "b-0-ranged",
        "b-1-ranged",
        "b-1-by-a-script",
        "b-1-moved-out-and-back",
        "b-1-copied-over",
        "b-quiet",
    ];
    let spec = |id| FlowSpec {
        events: 5,
        snapshot: Snapshot::Current,
        ..FlowSpec::done(id)
    };
    for id in large {
        m0.write_padded(&mut c0, &spec(id), LARGE);
        m1.write_padded(&mut c1, &spec(id), LARGE);
    }
    // Logs over 1 MiB of few large events, read in steps.
    for id in ["c-0-long", "c-1-long"] {
        for (model, c) in [(&mut m0, &mut c0), (&mut m1, &mut c1)] {
            model.write(
                c,
                &FlowSpec {
                    events: 5,
                    ..FlowSpec::done(id)
                },
            );
            model.widen(c, id, 24, 60_000);
        }
    }
    let ranged = |model: &checker::Model, id: &str| {
        let s = model.flows[id].snapshot.clone().unwrap();
        let at = early_pad_byte(&s);
        let mut b = s.into_bytes();
        b[at] = b'x';
        (at.to_string(), String::from_utf8(b).unwrap())
    };
    let (at0, after0) = ranged(&m0, "b-0-ranged");
    let (at1, after1) = ranged(&m1, "b-1-ranged");
    let (at_script, after_script) = ranged(&m1, "b-1-by-a-script");
    let (at_moved, after_moved) = ranged(&m1, "b-1-moved-out-and-back");
    // Blobs of another length, in the first MiB of a log.
    let wider = blob(61_000);

    // The writes, in one transaction sent from DB 0.
    let mut tx = redis::pipe();
    tx.atomic();
    let mut add = |args: &[&str]| queue(&mut tx, args);
    add(&["SETRANGE", &snapshot_key("b-0-ranged"), &at0, "x"]);
    add(&["SELECT", "1"]);
    add(&["SETRANGE", &snapshot_key("b-1-ranged"), &at1, "x"]);
    add(&["SELECT", "0"]);
    const IN_DB_1: &str = "redis.call('SELECT', 1) \
        return redis.call('SETRANGE', KEYS[1], ARGV[1], 'x')";
    add(&[
        "EVAL",
        IN_DB_1,
        "1",
        &snapshot_key("b-1-by-a-script"),
        &at_script,
    ]);
    add(&["SELECT", "1"]);
    let key = snapshot_key("b-1-moved-out-and-back");
    add(&["MOVE", &key, "2"]);
    add(&["SELECT", "2"]);
    add(&["SETRANGE", &key, &at_moved, "x"]);
    add(&["MOVE", &key, "1"]);
    add(&["SELECT", "1"]);
    add(&["LSET", &events_key("c-1-long"), "1", &wider]);
    add(&["SELECT", "0"]);
    add(&["LSET", &events_key("c-0-long"), "1", &wider]);
    add(&["INFO", "flowarchive"]);

    let begun = (large.len() * LARGE) as i64;
    let (swept, _) = between_capture_steps(&srv, &mut c0, &tx, begun, (LEAD_EVENTS / 1024) as i64);
    let record = |model: &mut checker::Model, id: &str, snapshot: String| {
        model.flows.get_mut(id).unwrap().snapshot = Some(snapshot);
    };
    record(&mut m0, "b-0-ranged", after0);
    record(&mut m1, "b-1-ranged", after1);
    record(&mut m1, "b-1-by-a-script", after_script);
    record(&mut m1, "b-1-moved-out-and-back", after_moved);
    m1.flows.get_mut("c-1-long").unwrap().events[1] = wider.clone();
    m0.flows.get_mut("c-0-long").unwrap().events[1] = wider.clone();
    let summary = swept.join().unwrap().unwrap();
    // In DB 0: the lead, the quiet flow and every flow written in DB 1 only.
    assert_eq!(int(&summary["archived"]), 7, "{summary:?}");
    assert_eq!(int(&summary["skipped_changed"]), 2, "{summary:?}");
    for id in ["b-0-ranged", "c-0-long"] {
        assert_eq!(
            cmd::<i64>(&mut c0, &["EXISTS", &events_key(id)]).unwrap(),
            1,
            "{id} was written in DB 0"
        );
    }
    checker::check("DB 0", &srv, &s3, &m0, checker::Expect::Either);
    let tally = checker::check("DB 1", &srv, &s3, &m1, checker::Expect::Either);
    assert_eq!(tally.archived, 0, "DB 1 was not swept");

    // During the upload of one DB's copy, a write to the other DB's copy of the same id, and writes
    // into it from a client in the other DB: a COPY over its snapshot, and over its log, each as long
    // as what it replaces (the commit measures them).
    let flow = m0.flows.get_mut("b-0-ranged").unwrap();
    let s = flow.snapshot.as_mut().unwrap();
    let at = early_pad_byte(s) + 1;
    s.replace_range(at..at + 1, "y");
    let (_, answer) = held_upload_in(&srv, &proxy, 1, "b-0-ranged", |c| {
        run(
            c,
            &[
                "SETRANGE",
                &snapshot_key("b-0-ranged"),
                &at.to_string(),
                "y",
            ],
        );
    });
    assert_eq!(int(&answer.unwrap()["events"]), 5, "DB 1's copy archived");
    let (_, answer) = held_upload_in(&srv, &proxy, 0, "c-0-long", |c| {
        run(c, &["SELECT", "1"]);
        run(c, &["LSET", &events_key("c-0-long"), "2", &wider]);
    });
    assert_eq!(int(&answer.unwrap()["events"]), 29, "DB 0's copy archived");
    m1.flows.get_mut("c-0-long").unwrap().events[2] = wider.clone();
    let copied = repadded(m1.flows["b-1-copied-over"].snapshot.as_ref().unwrap());
    run(&mut c0, &["SET", "staged", &copied]);
    let mut log = m1.flows["c-1-long"].events.clone();
    log[3] = blob(61_000);
    let mut push = vec!["RPUSH", "staged-log"];
    push.extend(log.iter().map(String::as_str));
    run(&mut c0, &push);
    for (id, key, staged) in [
        ("b-1-copied-over", snapshot_key("b-1-copied-over"), "staged"),
        ("c-1-long", events_key("c-1-long"), "staged-log"),
    ] {
        let (_, answer) = held_upload_in(&srv, &proxy, 1, id, |c| {
            // In a transaction, whose commands reached the hook in the client's DB.
            redis::pipe()
                .atomic()
                .cmd("COPY")
                .arg(staged)
                .arg(&key)
                .arg("DB")
                .arg(1)
                .arg("REPLACE")
                .cmd("DEL")
                .arg(staged)
                .query::<()>(c)
                .unwrap();
        });
        let e = err_text(answer);
        assert!(
            e.contains("changed while it was being archived"),
            "{id}: {e}"
        );
    }
    record(&mut m1, "b-1-copied-over", copied);
    m1.flows.get_mut("c-1-long").unwrap().events = log;

    // Quiet, each DB's sweep archives every flow as the writes left it.
    for (c, model) in [(&mut c0, &m0), (&mut c1, &m1)] {
        let summary = sweep(c, &[]).unwrap();
        assert_eq!(int(&summary["failed"]), 0, "{summary:?}");
        let what = format!("DB {} after a quiet sweep", model.db);
        checker::check_swept(&what, &srv, &s3, model, model.flows.len());
    }
}

/// A layout served from its snapshot reads a large one whole only where the judgement needs it (no
/// status index entry, or no score), else in steps as the folded layout does, and follows it from
/// the capture's first step on, string writes included, since the commit measures it instead of
/// comparing it: a write of the same length during the upload keeps the flow, a rewrite to the same
/// bytes too, and unchanged it is archived with the snapshot exactly as stored, which GET then answers
/// (flagged archived), whether it was read in steps or whole.
#[test]
fn a_large_snapshot_served_as_the_state_is_followed_too() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["state", "snapshot"]);
    let mut c = srv.conn();
    let large = |c: &mut redis::Connection, id: &str| write_padded_flow(c, id, 3 << 20);
    let snapshot = large(&mut c, "ranged");
    // Live, it is answered from where the server holds it: the module copies none of it (the peak
    // of its heap, before any capture copied a snapshot).
    let peak = info_field(&mut c, "heap_bytes_peak");
    assert!(get(&mut c, "ranged").unwrap() == Some(snapshot), "live");
    let rise = info_field(&mut c, "heap_bytes_peak") - peak;
    assert!(rise < 1 << 20, "a live GET copied {rise} bytes");
    change_written_during_upload(&srv, &proxy, "ranged", |c| {
        run(c, &["SETRANGE", &snapshot_key("ranged"), "2000000", "q"])
    });
    let snapshot = large(&mut c, "same-bytes");
    change_written_during_upload(&srv, &proxy, "same-bytes", |c| {
        run(c, &["SET", &snapshot_key("same-bytes"), &snapshot])
    });
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 1);

    let snapshot = large(&mut c, "unchanged");
    let (_, answer) = held_upload(&srv, &proxy, "unchanged", |_| {});
    assert_eq!(int(&answer.unwrap()["events"]), 5);
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &snapshot_key("unchanged")]).unwrap(),
        0
    );
    let archived = get(&mut c, "unchanged").unwrap();
    assert!(
        archived == Some(archived_state(&snapshot)),
        "the snapshot as stored"
    );

    // Indexed and scored, it is copied in steps; without its status entry, whole at the judgement.
    config_set(&mut c, "flowarchive.step-budget-us", "50").unwrap();
    for (id, unindexed) in [("stepped", false), ("judged-by-it", true)] {
        let snapshot = large(&mut c, id);
        if unindexed {
            run(
                &mut c,
                &["HDEL", "argyll:idx:status", &format!("flow:{id}")],
            );
        }
        let (archived, steps) = stepped(&mut c, |c| archive(c, id));
        assert_eq!(int(&archived.unwrap()["events"]), 5, "{id}");
        match unindexed {
            false => assert!(steps >= 6, "{id}: {steps} steps for 3 MiB"),
            true => assert!(steps <= 3, "{id}: {steps} steps, read whole"),
        }
        let archived = get(&mut c, id).unwrap();
        assert!(archived == Some(archived_state(&snapshot)), "{id}");
    }
}

/// A SWAPDB or a FLUSHDB during the upload deletes nothing, also of a 3 MiB snapshot (measured at
/// commit) when the other DB holds the same id with a snapshot of the same length.
#[test]
fn a_flush_or_swap_during_the_upload_deletes_nothing() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    change_during_upload(&srv, &proxy, "swapped", 5, |c| {
        run(c, &["SWAPDB", "0", "1"])
    });
    // The flow is in DB 1 now, whole.
    let mut c = srv.conn();
    run(&mut c, &["SELECT", "1"]);
    assert_eq!(
        cmd::<i64>(&mut c, &["LLEN", &events_key("swapped")]).unwrap(),
        5
    );
    change_during_upload(&srv, &proxy, "flushed", 5, |c| run(c, &["FLUSHDB"]));

    // The same id in DB 0 and DB 1, with 3 MiB snapshots of the same length and other bytes (followed,
    // measured at commit): swapped during the upload, DB 0 holds the other copy, which is kept; the
    // other DB flushed, the flow is kept too (a flush keeps every flow in flight), then archived.
    let mut c = srv.conn();
    let mut c1 = srv.conn();
    run(&mut c1, &["SELECT", "1"]);
    run(&mut c1, &["FLUSHDB"]);
    let ours = write_padded_flow(&mut c, "twin", 3 << 20);
    write_padded_flow(&mut c1, "twin", 3 << 20);
    let theirs = repadded(&ours);
    run(&mut c1, &["SET", &snapshot_key("twin"), &theirs]);
    change_written_during_upload(&srv, &proxy, "twin", |c| run(c, &["SWAPDB", "0", "1"]));
    let snapshot =
        |c: &mut redis::Connection| -> String { cmd(c, &["GET", &snapshot_key("twin")]).unwrap() };
    assert!(
        snapshot(&mut c) == theirs && snapshot(&mut c1) == ours,
        "swapped"
    );
    change_written_during_upload(&srv, &proxy, "twin", |c| {
        run(c, &["SELECT", "1"]);
        run(c, &["FLUSHDB"]);
        run(c, &["SELECT", "0"]);
    });
    let answer = archive(&mut c, "twin").unwrap();
    let location = text(&answer["location"]);
    let rel = location.split(&format!("{}/", s3.prefix)).nth(1).unwrap();
    let object = gunzip(&s3.get(rel).expect("the object"));
    assert!(object.contains(&format!("\"snapshot\":{theirs},")));
}

/// A 3 MiB snapshot in flight (followed, measured at commit) whose server reloads its data, evicts it
/// or is flushed asynchronously during the upload keeps its flow: `DEBUG RELOAD NOSAVE` bringing back
/// an older snapshot of the same length, `DEBUG RELOAD`, an eviction under `volatile-lru` of the
/// snapshot (which has a TTL) and `FLUSHALL ASYNC`, each refused with nothing deleted by the module.
#[test]
fn a_reload_an_eviction_or_an_async_flush_during_the_upload_keeps_a_large_flow() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    opts.extra = vec!["--enable-debug-command".into(), "yes".into()];
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let refused = |id: &str, answer| {
        let e = err_text(answer);
        assert!(
            e.contains("changed while it was being archived"),
            "{id}: {e}"
        );
    };
    // Saved with one snapshot, rewritten to another of the same length, archived while the older is
    // loaded back.
    let older = write_padded_flow(&mut c, "reloaded-older", LARGE);
    run(&mut c, &["SAVE"]);
    run(
        &mut c,
        &["SET", &snapshot_key("reloaded-older"), &repadded(&older)],
    );
    let (_, answer) = held_upload(&srv, &proxy, "reloaded-older", |c| {
        run(c, &["DEBUG", "RELOAD", "NOSAVE"])
    });
    refused("reloaded-older", answer);
    let now: String = cmd(&mut c, &["GET", &snapshot_key("reloaded-older")]).unwrap();
    assert!(now == older, "the older snapshot, loaded back");

    write_padded_flow(&mut c, "reloaded", LARGE);
    let (_, answer) = held_upload(&srv, &proxy, "reloaded", |c| run(c, &["DEBUG", "RELOAD"]));
    refused("reloaded", answer);

    write_padded_flow(&mut c, "evicted", LARGE);
    run(&mut c, &["PEXPIRE", &snapshot_key("evicted"), "3600000"]);
    config_set(&mut c, "maxmemory-policy", "volatile-lru").unwrap();
    let (_, answer) = held_upload(&srv, &proxy, "evicted", |c| {
        let used = info_field_of(c, "memory", "used_memory");
        config_set(c, "maxmemory", &(used - (1 << 20)).to_string()).unwrap();
        cmd::<redis::Value>(c, &["SET", "filler", "x"]).ok();
        config_set(c, "maxmemory", "0").unwrap();
    });
    refused("evicted", answer);
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &snapshot_key("evicted")]).unwrap(),
        0
    );
    config_set(&mut c, "maxmemory-policy", "noeviction").unwrap();

    write_padded_flow(&mut c, "flushed", LARGE);
    let (_, answer) = held_upload(&srv, &proxy, "flushed", |c| run(c, &["FLUSHALL", "ASYNC"]));
    refused("flushed", answer);
    assert_eq!(cmd::<i64>(&mut c, &["DBSIZE"]).unwrap(), 0);
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0);
}

/// A numeric field of INFO `section`.
fn info_field_of(c: &mut redis::Connection, section: &str, name: &str) -> i64 {
    let info: String = cmd(c, &["INFO", section]).unwrap();
    let prefix = format!("{name}:");
    let value = info.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
    value.unwrap().trim().parse().unwrap()
}

/// The first block of a captured event log (`FIRST_BLOCK` in src/format/event_log.rs): the capture
/// copies a log into blocks that never move, the first this large, and the commit compares the
/// server's log with that copy.
const FIRST_BLOCK: usize = 4096;

/// `event` (an `attribute_set`) with its value's note set to `note`.
fn with_note(event: &str, note: &str) -> String {
    let mut e: serde_json::Value = serde_json::from_str(event).unwrap();
    e["data"]["value"]["note"] = note.into();
    e.to_string()
}

/// The nine events of the finished flow `spec` with the first eight holding `bytes` bytes together:
/// the eighth (index 7, an `attribute_set`) ends at `bytes`, its note padded to make them up.
fn events_ending_at(spec: &FlowSpec, bytes: usize) -> Vec<String> {
    let mut events: Vec<String> = (0..9).map(|i| event_json(spec, i)).collect();
    events[7] = with_note(&events[7], "");
    let before: usize = events[..8].iter().map(String::len).sum();
    events[7] = with_note(&events[7], &"p".repeat(bytes - before));
    events
}

/// Holds: the event at the end of the capture's first block, replaced between capture and commit,
/// keeps the flow. Logs whose first eight events fill the block exactly, end one byte short of it or
/// one byte past it (the eighth then starts the second block), each with that eighth event replaced
/// (LSET) during the upload by one a byte longer, a byte shorter, or as long with other bytes: every
/// commit is refused, the flow live and untouched and not indexed (the attempt's object stays in the
/// bucket, unreferenced). A later sweep archives each with its new content, at another key than the
/// attempt's, every event compared.
#[test]
fn an_event_replaced_at_the_end_of_the_first_block_keeps_the_flow() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    let mut ids = Vec::new();
    for fill in [FIRST_BLOCK - 1, FIRST_BLOCK, FIRST_BLOCK + 1] {
        for how in ["longer", "shorter", "other"] {
            let id = format!("fill-{fill}-{how}");
            let spec = FlowSpec {
                events: 9,
                ..FlowSpec::done(&id)
            };
            model.write(&mut c, &spec);
            let events = events_ending_at(&spec, fill);
            assert_eq!(events[..8].iter().map(String::len).sum::<usize>(), fill);
            let mut rpush = vec!["RPUSH".to_string(), events_key(&id)];
            rpush.extend(events.iter().cloned());
            redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(events_key(&id))
                .cmd(&rpush[0])
                .arg(&rpush[1..])
                .query::<()>(&mut c)
                .unwrap();
            let note = serde_json::from_str::<serde_json::Value>(&events[7]).unwrap()["data"]
                ["value"]["note"]
                .as_str()
                .unwrap()
                .len();
            let replaced = with_note(
                &events[7],
                &match how {
                    "longer" => "p".repeat(note + 1),
                    "shorter" => "p".repeat(note - 1),
                    _ => "q".repeat(note),
                },
            );
            assert_eq!(
                replaced.len() as i64 - events[7].len() as i64,
                match how {
                    "longer" => 1,
                    "shorter" => -1,
                    _ => 0,
                }
            );
            change_written_during_upload(&srv, &proxy, &id, |c| {
                run(c, &["LSET", &events_key(&id), "7", &replaced])
            });
            let flow = model.flows.get_mut(&id).unwrap();
            flow.events = events;
            flow.events[7] = replaced;
            ids.push(id);
        }
    }
    let stale = s3.list();
    assert_eq!(
        stale.len(),
        ids.len(),
        "one attempt's object each: {stale:?}"
    );
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), ids.len() as i64);
    checker::check_swept("after the sweep", &srv, &s3, &model, ids.len());
    for id in &ids {
        let attempt = format!("flows/{id}.jsonl.gz");
        assert!(stale.contains(&attempt), "{id}: {stale:?}");
        assert_ne!(
            common::index::location(&mut c, id),
            Some(s3.location(&attempt)),
            "{id}: indexed at the attempt's object"
        );
    }
}

/// The comparison and the keyspace-event subscription at first need, on every server the module
/// supports (Redis 7.0 and Valkey 8.0 subscribe at runtime as Valkey 9 does).
fn short_and_long_flows_keep_late_writes(flavor: Flavor) {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    opts.module_args = s3.module_args(&proxy.endpoint());
    let srv = Server::start(opts);
    change_during_upload(&srv, &proxy, "short", 5, |c| {
        run(c, &["LSET", &events_key("short"), "1", "{}"])
    });
    let mut c = srv.conn();
    assert_eq!(
        info_field(&mut c, "keyspace_events_subscribed"),
        0,
        "{flavor:?}"
    );
    change_during_upload(&srv, &proxy, "long", LONG, |c| {
        run(c, &["LSET", &events_key("long"), "600", "{}"])
    });
    assert_eq!(
        info_field(&mut c, "keyspace_events_subscribed"),
        1,
        "{flavor:?}"
    );
    let r = archive(&mut c, "long").unwrap();
    assert_eq!(int(&r["events"]), LONG as i64, "{flavor:?}");
}

#[test]
fn late_writes_are_kept_on_valkey_8_0() {
    short_and_long_flows_keep_late_writes(Flavor::Valkey8);
}

#[test]
fn late_writes_are_kept_on_redis_7_0() {
    short_and_long_flows_keep_late_writes(Flavor::Redis7);
}

/// A labels hash of 3 MiB read in steps and followed by hash events on `flavor`: a label rewritten to
/// other bytes of the same length during the upload (the commit counts the fields, so only the watch
/// sees it) keeps the flow live and whole; left alone, the same hash is archived label for label.
fn a_large_labels_hash_keeps_late_writes(flavor: Flavor) {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    opts.module_args = s3.module_args(&proxy.endpoint());
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    for id in ["rewritten", "unchanged"] {
        model.write_labeled(&mut c, &FlowSpec::done(id), 3 << 20);
    }
    let (name, value) = model.flows["rewritten"].labels[7].clone();
    let other: String = value.chars().rev().collect();
    assert_ne!(other, value);
    // As the engine relabels a flow: its labels hash and the label's indexes, in one transaction.
    let (member, set) = ("flow:rewritten", format!("argyll:idx:label:{name}"));
    change_written_during_upload(&srv, &proxy, "rewritten", |c| {
        redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(labels_key("rewritten"))
            .arg(&name)
            .arg(&other)
            .cmd("SREM")
            .arg(format!("{set}:{value}"))
            .arg(member)
            .cmd("SADD")
            .arg(format!("{set}:{other}"))
            .arg(member)
            .cmd("SREM")
            .arg(&set)
            .arg(&value)
            .cmd("SADD")
            .arg(&set)
            .arg(&other)
            .query::<()>(c)
            .unwrap();
    });
    let flow = model.flows.get_mut("rewritten").unwrap();
    flow.labels[7].1 = other;
    assert_eq!(
        info_field(&mut c, "hash_events_subscribed"),
        1,
        "{flavor:?}"
    );
    let r = archive(&mut c, "unchanged").unwrap();
    assert_eq!(int(&r["events"]), 5, "{flavor:?}");
    let either = checker::Expect::Either;
    let tally = checker::check(&format!("{flavor:?}"), &srv, &s3, &model, either);
    assert_eq!((tally.archived, tally.live), (1, 1), "{flavor:?}");
}

#[test]
fn a_large_labels_hash_keeps_late_writes_on_valkey_8_0() {
    a_large_labels_hash_keeps_late_writes(Flavor::Valkey8);
}

#[test]
fn a_large_labels_hash_keeps_late_writes_on_redis_7_0() {
    a_large_labels_hash_keeps_late_writes(Flavor::Redis7);
}

/// The label value written between capture and commit: far more than the flow's captured labels.
const BIG_LABEL: usize = 48 << 20;

/// A label replaced by a 48 MB value between capture and commit (same field count, so `HLEN` agrees
/// and the commit scans the hash): the commit stops reading at the captured labels' bytes, so it
/// neither copies the value nor deletes anything; the flow is counted as changed and stays whole.
/// The next sweep archives it with its new label, which reads back whole.
#[test]
fn a_label_grown_between_capture_and_commit_is_not_copied_by_the_commit() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    // No engine-wide label sets: a 48 MB label value would otherwise name a 48 MB key. A read of the
    // flow with its new label holds it twice (content and trailer), past the default cap.
    let srv = server_via(
        &s3,
        Some(&proxy),
        &[
            "label-set-key",
            "",
            "label-values-key",
            "",
            "read-max-bytes",
            "268435456",
        ],
    );
    let mut c = srv.conn();
    let id = "big-label";
    let spec = FlowSpec::done(id);
    write_flow(&mut c, &spec);
    let labels = labels_key(id);
    let mut expected = dump_all(&mut c);
    let events: Vec<String> = cmd(&mut c, &["LRANGE", &events_key(id), "0", "-1"]).unwrap();
    let big = "L".repeat(BIG_LABEL);

    proxy.hold("PUT");
    let mut other = srv.conn();
    let swept = std::thread::spawn(move || sweep(&mut other, &[]));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    run(&mut c, &["HSET", &labels, "tenant", &big]);
    // A server may hand the commit's scan each value as a new string, a transient copy that is the
    // server's own: the peak holds one such copy already, so only a copy by the module raises it.
    run(&mut c, &["SET", "transient", &big]);
    run(&mut c, &["DEL", "transient"]);
    let peak = srv.peak_rss();
    proxy.release();
    let summary = swept.join().unwrap().unwrap();
    let grew = srv.peak_rss().saturating_sub(peak);
    assert!(
        grew < BIG_LABEL as u64 / 2,
        "the commit raised the peak RSS by {grew} bytes: it copied the {BIG_LABEL}-byte label"
    );
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    assert_eq!(int(&summary["skipped_changed"]), 1, "{summary:?}");
    assert_eq!(int(&summary["failed"]), 0, "{summary:?}");
    assert_eq!(info_field(&mut c, "failures_changed"), 1);
    // Every key as before, but for the new label.
    expected.0.insert(
        labels.clone().into_bytes(),
        ("hash".into(), vec![format!("tenant={big}").into_bytes()]),
    );
    assert_same(&expected, &dump_all(&mut c), id);
    assert!(index::location(&mut c, id).is_none());

    // Quiet again: archived with its new label, read back whole (encoding, uploading and reading
    // back 48 MB in a debug build, with the suite's other tests on the same cores, can take minutes).
    proxy.clear();
    c.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    let left: Vec<String> = cmd(&mut c, &["KEYS", &format!("argyll:flow:{id}:*")]).unwrap();
    assert!(left.is_empty(), "{left:?}");
    let state = get(&mut c, id).unwrap().unwrap();
    assert_eq!(state, archived_state(&state_json(&spec)));
    assert_eq!(get_events(&mut c, id).unwrap().1, events);
    // The first sweep's object holds the old label: this one is the index's, a later generation.
    let location = index::location(&mut c, id).unwrap();
    let rel = location
        .strip_prefix(&format!("s3://{}/{}/", s3.name(), s3.prefix))
        .unwrap();
    let text = gunzip(&s3.get(rel).unwrap());
    let trailer: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(
        trailer["labels"] == serde_json::json!({ "tenant": big }),
        "the trailer does not hold the new label whole"
    );
}

/// Valkey 9's hash field expiry: a label field past its expiry but not yet reclaimed (active expiry
/// off) is still counted by `HLEN` and skipped by every scan. The capture reads the live labels only;
/// the commit finds `HLEN` one more than it captured and refuses, so such a flow is counted as changed
/// and stays live, every key and event as it was, until the server reclaims the field. This is the
/// safe direction: the commit's first check, the field count, cannot tell an expired field the
/// capture did not read from a field written since, and it refuses on any difference rather than
/// reading further; that costs only a delay (the next sweep after the reclaim archives the flow),
/// never data. Once reclaimed, the flow is archived with exactly its live labels.
#[test]
fn an_expired_label_not_yet_reclaimed_keeps_the_flow_until_it_is() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.extra = vec!["--enable-debug-command".into(), "yes".into()];
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let expiry: Vec<redis::Value> = cmd(&mut c, &["COMMAND", "INFO", "HPEXPIRE"]).unwrap();
    if matches!(expiry.first(), None | Some(redis::Value::Nil)) {
        eprintln!(
            "skipped: {} has no hash field expiry (HPEXPIRE)",
            srv.flavor.binary()
        );
        return;
    }
    let mut model = checker::Model::new(0);
    let id = "expiring-label";
    model.write(&mut c, &FlowSpec::done(id));
    let labels = labels_key(id);
    run(&mut c, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    run(&mut c, &["HSET", &labels, "ephemeral", "soon-gone"]);
    run(
        &mut c,
        &["HPEXPIRE", &labels, "1", "FIELDS", "1", "ephemeral"],
    );
    std::thread::sleep(Duration::from_millis(20));
    let hidden = |c: &mut redis::Connection| {
        let pairs: Vec<(String, String)> = cmd(c, &["HGETALL", &labels]).unwrap();
        let counted: i64 = cmd(c, &["HLEN", &labels]).unwrap();
        (pairs, counted)
    };
    let live = vec![("tenant".to_string(), "acme".to_string())];
    assert_eq!(hidden(&mut c), (live.clone(), 2), "expired, not reclaimed");

    let before = dump_all(&mut c);
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    assert_eq!(int(&summary["skipped_changed"]), 1, "{summary:?}");
    assert_same(&before, &dump_all(&mut c), id);
    assert_eq!(hidden(&mut c), (live.clone(), 2), "still not reclaimed");
    let tally = checker::check(
        "while the field lingers",
        &srv,
        &s3,
        &model,
        checker::Expect::Either,
    );
    assert_eq!(tally.live, 1);

    run(&mut c, &["DEBUG", "SET-ACTIVE-EXPIRE", "1"]);
    wait_for("the field's reclaim", Duration::from_secs(10), || {
        cmd::<i64>(&mut c, &["HLEN", &labels]).unwrap() == 1
    });
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    // The object's trailer holds exactly the live labels; GET answers the snapshot and every event.
    let tally = checker::check("once reclaimed", &srv, &s3, &model, checker::Expect::Either);
    assert_eq!(tally.archived, 1);
}

/// The server drops a module's keyspace-event subscriptions when it unloads it, but the library stays
/// mapped (dlclose leaves it loaded), so the module's statics outlive the unload. Loaded again, the module once thought itself subscribed and followed no write: a write to a
/// long log or to a large snapshot while the object was on its way was lost with the flow. After
/// `MODULE UNLOAD` and `MODULE LOAD`, both keep their flow again.
#[test]
fn writes_are_followed_again_after_the_module_is_reloaded() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    opts.extra = vec!["--enable-module-command".into(), "yes".into()];
    let srv = Server::start(opts.clone());
    let mut c = srv.conn();
    let large = |c: &mut redis::Connection, id: &str| {
        write_padded_flow(c, id, 3 << 20);
    };
    let changes = |round: &str| {
        let long = format!("long-{round}");
        change_during_upload(&srv, &proxy, &long, LONG, |c| {
            run(c, &["LSET", &events_key(&long), "700", "{}"])
        });
        let id = format!("large-{round}");
        large(&mut srv.conn(), &id);
        change_written_during_upload(&srv, &proxy, &id, |c| {
            let key = snapshot_key(&id);
            run(c, &["SETRANGE", &key, "2000000", "q"]);
        });
    };
    changes("first");
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 1);

    // Idle once the archives have answered: the unload goes through.
    wait_for("the unload", Duration::from_secs(10), || {
        cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]).is_ok()
    });
    let path = module_path();
    let mut load = vec!["MODULE", "LOAD", path.to_str().unwrap()];
    load.extend(opts.module_args.iter().map(String::as_str));
    run(&mut c, &load);
    // The server dropped the subscriptions with the unload: the new load has none yet.
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 0);
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 0);
    changes("reloaded");
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 1);
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 1);
}

/// A labels hash larger than one step (1 MiB) is followed by its watch, hash writes included, from the
/// capture's first step on, and its fields counted at commit instead of compared: every kind of write
/// to one of 3 MiB during the upload keeps the flow, a rewrite to the same value, a field's expiry set
/// or taking effect and a TTL on the key too; unchanged, it is archived with every label as stored.
/// Hash events are subscribed to only then. (An eviction raises the evicted event a long log's watch
/// has followed all along, as an expiry does.)
#[test]
fn every_write_to_a_large_labels_hash_during_the_upload_keeps_the_flow() {
    const LABELS: usize = 3 << 20;
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    let mut large = |c: &mut redis::Connection, id: &str| {
        model.write_labeled(c, &FlowSpec::done(id), LABELS);
        model.flows[id].labels.clone()
    };
    change_during_upload(&srv, &proxy, "long", LONG, |c| {
        run(c, &["LSET", &events_key("long"), "700", "{}"])
    });
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 1);
    assert_eq!(info_field(&mut c, "hash_events_subscribed"), 0);

    type Change = Box<dyn Fn(&mut redis::Connection, &str, &[(String, String)])>;
    // A hash of one other label, at `elsewhere`.
    let other = |c: &mut redis::Connection| run(c, &["HSET", "elsewhere", "x", "y"]);
    let cases: Vec<(&str, Change)> = vec![
        (
            "field-added",
            Box::new(|c, key, _| run(c, &["HSET", key, "x", "y"])),
        ),
        (
            "same-value",
            Box::new(|c, key, labels| run(c, &["HSET", key, &labels[1].0, &labels[1].1])),
        ),
        (
            "field-deleted",
            Box::new(|c, key, labels| run(c, &["HDEL", key, &labels[2].0])),
        ),
        (
            "incremented",
            Box::new(|c, key, _| run(c, &["HINCRBY", key, "count", "1"])),
        ),
        (
            "field-expiry-set",
            Box::new(|c, key, labels| {
                run(c, &["HEXPIRE", key, "100000", "FIELDS", "1", &labels[3].0])
            }),
        ),
        ("deleted", Box::new(|c, key, _| run(c, &["DEL", key]))),
        (
            "renamed-over",
            Box::new(move |c, key, _| {
                other(c);
                run(c, &["RENAME", "elsewhere", key]);
            }),
        ),
        (
            "copied-over",
            Box::new(move |c, key, _| {
                other(c);
                run(c, &["COPY", "elsewhere", key, "REPLACE"]);
                run(c, &["DEL", "elsewhere"]);
            }),
        ),
        (
            "restored",
            Box::new(move |c, key, _| {
                other(c);
                let dump: Vec<u8> = cmd(c, &["DUMP", "elsewhere"]).unwrap();
                run(c, &["DEL", "elsewhere"]);
                redis::cmd("RESTORE")
                    .arg(key)
                    .arg(0)
                    .arg(dump)
                    .arg("REPLACE")
                    .query::<()>(c)
                    .unwrap();
            }),
        ),
        (
            "ttl-set",
            Box::new(|c, key, _| run(c, &["EXPIRE", key, "100000"])),
        ),
        (
            "expired",
            Box::new(|c, key, _| {
                run(c, &["PEXPIRE", key, "1"]);
                std::thread::sleep(Duration::from_millis(20));
                run(c, &["EXISTS", key]);
            }),
        ),
        (
            "in-a-transaction",
            Box::new(|c, key, labels| {
                redis::pipe()
                    .atomic()
                    .cmd("HSET")
                    .arg(key)
                    .arg(&labels[0].0)
                    .arg("other")
                    .query::<()>(c)
                    .unwrap();
            }),
        ),
        (
            "by-a-script",
            Box::new(|c, key, labels| {
                let script = "return redis.call('HDEL', KEYS[1], ARGV[1])";
                run(c, &["EVAL", script, "1", key, &labels[4].0]);
            }),
        ),
    ];
    for (id, change) in &cases {
        let labels = large(&mut c, id);
        change_written_during_upload(&srv, &proxy, id, |c| change(c, &labels_key(id), &labels));
        // What the checks compare is every key of the DB: each case's are dropped once checked.
        run(&mut c, &["FLUSHDB"]);
    }
    assert_eq!(info_field(&mut c, "hash_events_subscribed"), 1);
    // A field set to expire before the capture, gone during the upload (taken by the server's own
    // expiry, or by the read that finds it expired): the expiry keeps the flow.
    let labels = large(&mut c, "field-expired");
    let (key, field) = (labels_key("field-expired"), &labels[5].0);
    // Long enough for a capture on a busy machine; the PUT is held until the field is gone.
    run(&mut c, &["HPEXPIRE", &key, "5000", "FIELDS", "1", field]);
    let set = std::time::Instant::now();
    let (_, answer) = held_upload_in(&srv, &proxy, 0, "field-expired", |c| {
        let ttl: Vec<i64> = cmd(c, &["HPTTL", &key, "FIELDS", "1", field]).unwrap();
        assert!(ttl[0] > 0, "the field expired before the capture ended");
        std::thread::sleep(Duration::from_millis(5500).saturating_sub(set.elapsed()));
        run(c, &["HEXISTS", &key, field]);
    });
    let e = err_text(answer);
    assert!(e.contains("changed while it was being archived"), "{e}");
    let left = cmd::<i64>(&mut c, &["HLEN", &key]).unwrap() as usize;
    assert_eq!(left, labels.len() - 1);
    assert_eq!(
        cmd::<i64>(&mut c, &["LLEN", &events_key("field-expired")]).unwrap(),
        5
    );

    // Unchanged, the same flow is archived, and its object holds every label exactly.
    let labels = large(&mut c, "unchanged");
    let (_, answer) = held_upload(&srv, &proxy, "unchanged", |_| {});
    assert_eq!(int(&answer.unwrap()["events"]), 5);
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", &labels_key("unchanged")]).unwrap(),
        0
    );
    let object = gunzip(&s3.get("flows/unchanged.jsonl.gz").expect("the object"));
    let stored: std::collections::BTreeMap<_, _> = labels.into_iter().collect();
    let stored = serde_json::to_string(&stored).unwrap();
    assert!(
        object.contains(&format!("\"labels\":{stored},")),
        "the labels as stored"
    );
}

/// A labels hash larger than one step (1 MiB) is read over several steps: a write to it between two
/// of them keeps the flow live and intact, even one that leaves its field count or its bytes as they
/// were (the watch must see it: the commit counts the fields, it does not compare them). As for large
/// snapshots, a sweep begins every flow of its round, each reading the first MiB of its labels in the
/// step that judges it, then finishes them one after another behind a long log read in at least 30
/// steps, each made to wait behind a busy script; the writes land there, all at once: a label added
/// (also by HINCRBY), one rewritten with the same value, the first and the last label written
/// rewritten to other bytes of the same length (wherever the scan has reached), one deleted, a field's expiry set, the hash renamed
/// over or deleted, a TTL set on it. Every byte the refused captures held is released. A quiet sweep
/// then archives each as it was left, label for label (the checker compares every key and object).
#[test]
fn every_write_to_a_large_labels_hash_between_capture_steps_keeps_the_flow() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    behind_a_lead(&mut c, &mut model);
    // The ids sort after the lead's, so the sweep finishes them after it.
    let large = [
        "c-added",
        "c-same-value",
        "c-early-rewritten",
        "c-late-rewritten",
        "c-field-deleted",
        "c-incremented",
        "c-expiry-set",
        "c-renamed-over",
        "c-deleted",
        "c-ttl-set",
        "c-quiet",
    ];
    for id in large {
        model.write_labeled(&mut c, &FlowSpec::done(id), LARGE);
    }
    let label = |id: &str, at: usize| model.flows[id].labels[at].clone();
    let other_bytes = |v: &str| v.chars().rev().collect::<String>();

    // The writes in one transaction, and what each leaves of the flow's labels. A label added is
    // indexed as the engine indexes it (the checker compares the indexes of every live flow's labels).
    let mut tx = redis::pipe();
    tx.atomic();
    let mut add = |args: &[&str]| queue(&mut tx, args);
    let labeled = |add: &mut dyn FnMut(&[&str]), id: &str, name: &str, value: &str| {
        add(&[
            "SADD",
            &format!("argyll:idx:label:{name}:{value}"),
            &format!("flow:{id}"),
        ]);
        add(&["SADD", &format!("argyll:idx:label:{name}"), value]);
    };
    let mut after: Vec<(&str, Vec<(String, String)>)> = Vec::new();
    let labels_now = |id: &str| model.flows[id].labels.clone();

    let name = "c-added-x".to_string();
    add(&["HSET", &labels_key("c-added"), &name, "y"]);
    labeled(&mut add, "c-added", &name, "y");
    let mut now = labels_now("c-added");
    now.push((name, "y".into()));
    after.push(("c-added", now));

    let (name, value) = label("c-same-value", 1);
    add(&["HSET", &labels_key("c-same-value"), &name, &value]);
    let last = model.flows["c-late-rewritten"].labels.len() - 1;
    for (id, at) in [("c-early-rewritten", 0), ("c-late-rewritten", last)] {
        let (name, value) = label(id, at);
        let value = other_bytes(&value);
        add(&["HSET", &labels_key(id), &name, &value]);
        labeled(&mut add, id, &name, &value);
        let mut now = labels_now(id);
        now[at].1 = value;
        after.push((id, now));
    }
    let (name, _) = label("c-field-deleted", 2);
    add(&["HDEL", &labels_key("c-field-deleted"), &name]);
    let mut now = labels_now("c-field-deleted");
    now.remove(2);
    after.push(("c-field-deleted", now));

    let name = "c-incremented-n".to_string();
    add(&["HINCRBY", &labels_key("c-incremented"), &name, "7"]);
    labeled(&mut add, "c-incremented", &name, "7");
    let mut now = labels_now("c-incremented");
    now.push((name, "7".into()));
    after.push(("c-incremented", now));

    let (name, _) = label("c-expiry-set", 3);
    add(&[
        "HEXPIRE",
        &labels_key("c-expiry-set"),
        "100000",
        "FIELDS",
        "1",
        &name,
    ]);

    let (staged, name) = ("staged:c-renamed-over", "c-renamed-over-x");
    add(&["HSET", staged, name, "y"]);
    add(&["RENAME", staged, &labels_key("c-renamed-over")]);
    labeled(&mut add, "c-renamed-over", name, "y");
    after.push(("c-renamed-over", vec![(name.into(), "y".into())]));

    add(&["DEL", &labels_key("c-deleted")]);
    after.push(("c-deleted", Vec::new()));
    add(&["EXPIRE", &labels_key("c-ttl-set"), "100000"]);
    add(&["INFO", "flowarchive"]);

    // Every flow begun: each counts what it read of its labels in its first step, more than 1 MiB
    // and a piece of 256 KiB (the lead counts its first chunk only until every other flow is begun,
    // less than one of theirs): the lead is being read, the others wait for their next step.
    let begun = (large.len() * (1280 << 10)) as i64;
    // A step begins each flow at most, and the lead alone takes a step per 1,024 events at least:
    // within these, it was still being read, and the others had had only their first step.
    let (swept, _) = between_capture_steps(
        &srv,
        &mut c,
        &tx,
        begun,
        (LEAD_EVENTS / 1024 + large.len()) as i64,
    );
    for (id, labels) in after {
        model.flows.get_mut(id).unwrap().labels = labels;
    }
    archived_as_left(&srv, &s3, &mut c, &model, swept, large.len() - 1);
}

/// Where the server is in rehashing the hash `key` (`DEBUG HTSTATS-KEY`'s answer `stats`): the index
/// of the next bucket it moves, or -1 when it is not rehashing.
fn rehash_index(stats: &str) -> i64 {
    let index = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("rehashing index: "));
    index.map_or(-1, |i| i.parse().unwrap())
}

/// Labels hashes the server is rehashing when their capture begins (a label written past a full table
/// grew each), read between the capture's first and later steps (an HGET moves a rehash one bucket
/// on; a scan call pauses it), which writes nothing: one's rehash moved part of the way, the other's
/// finished, so each scan goes on across two tables, or from two tables into the one they became.
/// Each is read whole, every label once, and archived with every label as stored (the commit counts
/// them, the checker compares them).
#[test]
fn labels_rehashed_between_capture_steps_are_read_whole() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.extra = vec!["--enable-debug-command".into(), "yes".into()];
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    behind_a_lead(&mut c, &mut model);
    let stats = |c: &mut redis::Connection, id: &str| -> String {
        cmd(c, &["DEBUG", "HTSTATS-KEY", &labels_key(id)]).unwrap()
    };
    let (part, whole) = ("c-rehash-moved", "c-rehash-finished");
    for id in [part, whole] {
        model.write_labeled(&mut c, &FlowSpec::done(id), 3500 * (id.len() + 6 + 1000));
        assert_eq!(rehash_index(&stats(&mut c, id)), -1);
        // Labels added one at a time until one grows the table: its rehash has just begun.
        while rehash_index(&stats(&mut c, id)) < 0 {
            let labels = &mut model.flows.get_mut(id).unwrap().labels;
            assert!(labels.len() < 8000, "no rehash");
            let (name, value) = (format!("{id}-{:05}", labels.len()), "v".to_string());
            let mut pipe = redis::pipe();
            add_labels(&mut pipe, id, &[(&name, &value)]);
            pipe.query::<()>(&mut c).unwrap();
            labels.push((name, value));
        }
        assert_eq!(rehash_index(&stats(&mut c, id)), 0);
    }

    let mut tx = redis::pipe();
    tx.atomic();
    for (id, reads) in [(part, 100), (whole, 2000)] {
        for _ in 0..reads {
            tx.cmd("HGET")
                .arg(labels_key(id))
                .arg(format!("{id}-00000"));
        }
        tx.cmd("DEBUG").arg("HTSTATS-KEY").arg(labels_key(id));
    }
    tx.cmd("INFO").arg("flowarchive");
    // Both begun (more than 1 MiB and a piece of 256 KiB of labels each): the lead is being read,
    // they wait for their next step.
    let (swept, replies) = between_capture_steps(
        &srv,
        &mut c,
        &tx,
        2 * (1280 << 10),
        2 + (LEAD_EVENTS / 1024) as i64,
    );
    let rehash = |at: usize| rehash_index(&text(&replies[at]));
    let (moved, finished) = (rehash(100), rehash(100 + 1 + 2000));
    assert!(moved > 0, "part of the way: at {moved}");
    assert_eq!(finished, -1, "finished");
    let summary = swept.join().unwrap().unwrap();
    assert_eq!(int(&summary["archived"]), 3, "{summary:?}");
    checker::check_swept("archived", &srv, &s3, &model, 3);
}

/// A log read whole in one step that the commit could not compare byte for byte (past 1 MiB, here
/// through a 3 MiB last event: one step reads on to the end of the event it is in) is followed from
/// its capture, as a log read in steps is, and measured at commit instead of read and hashed again
/// in the commit's one step. An edit that keeps its length during the upload keeps the flow; left
/// alone, it is archived whole.
#[test]
fn a_log_read_in_one_step_too_large_to_compare_at_commit_is_followed() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    for id in ["edited", "whole"] {
        let spec = FlowSpec {
            events: 6,
            ..FlowSpec::done(id)
        };
        model.write(&mut c, &spec);
        let last = model.flows.get_mut(id).unwrap().events.last_mut().unwrap();
        let mut event: serde_json::Value = serde_json::from_str(last).unwrap();
        event["pad"] = "p".repeat(3 << 20).into();
        *last = event.to_string();
        run(&mut c, &["LSET", &events_key(id), "-1", last]);
    }
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 0);
    let first = &mut model.flows.get_mut("edited").unwrap().events[0];
    *first = first.replacen('{', r#"{"edited":true,"#, 1);
    let edit = first.clone();
    change_written_during_upload(&srv, &proxy, "edited", |c| {
        run(c, &["LSET", &events_key("edited"), "0", &edit])
    });
    assert_eq!(
        info_field(&mut c, "keyspace_events_subscribed"),
        1,
        "a log of one step past 1 MiB is followed"
    );
    archive(&mut c, "whole").unwrap();
    let tally = checker::check("whole archived", &srv, &s3, &model, checker::Expect::Either);
    assert_eq!((tally.live, tally.archived), (1, 1));
}
