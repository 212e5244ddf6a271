//! The store's safety promises against a real Valkey with the module, a real SeaweedFS and the fault
//! proxy: write-once objects (and no upload into a store found to replace them), no trust in a bare
//! ETag, a checksum echo trusted (`verify auto`) only from a store proven to validate checksums, a
//! rate cap that follows CONFIG SET at once, and a secret that is never shown and survives CONFIG
//! REWRITE.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::proxy::{Fault, Proxy, Rule};
use common::*;

// ---------------------------------------------------------------- write-once objects

#[test]
fn another_keyspace_with_the_same_flow_id_never_overwrites_the_archive() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut db0 = srv.conn();
    write_flow(&mut db0, &FlowSpec::done("shared"));
    archive(&mut db0, "shared").unwrap();
    let stored = s3.get("flows/shared.jsonl.gz").unwrap();
    let put = proxy
        .heads()
        .into_iter()
        .find(|h| h.starts_with("put "))
        .expect("a PUT");
    assert!(put.contains("\r\nif-none-match: *\r\n"), "{put}");

    // Another server on the same bucket and prefix has its own flow of the same id. (Another DB of
    // this server has its own object key, db<n>/flows/..., see tests/read_safety.rs.)
    let other = server_via(&s3, Some(&proxy), &[]);
    let mut db1 = other.conn();
    write_flow(
        &mut db1,
        &FlowSpec {
            events: 9,
            ..FlowSpec::done("shared")
        },
    );
    // Its archive never replaces the first object: it takes the next generation key, and each server
    // reads its own history.
    let done = archive(&mut db1, "shared").unwrap();
    let location: String = redis::from_redis_value(&done["location"]).unwrap();
    assert_eq!(location, s3.location("flows/shared.g1.jsonl.gz"));
    assert_eq!(
        s3.get("flows/shared.jsonl.gz").unwrap(),
        stored,
        "the first history is kept"
    );
    let mut keys = s3.list();
    keys.sort();
    assert_eq!(keys, ["flows/shared.g1.jsonl.gz", "flows/shared.jsonl.gz"]);
    for (c, events) in [(&mut db0, 5), (&mut db1, 9)] {
        let (_, log): (String, Vec<String>) = redis::cmd("FLOWARCHIVE.GET")
            .arg("shared")
            .arg("EVENTS")
            .query(c)
            .unwrap();
        assert_eq!(log.len(), events);
    }
}

/// A rule that puts a store that replaces objects whatever `If-None-Match` says (`Fault::Overwrites`)
/// in place of SeaweedFS for every object of this test (not the bucket: its proof reaches SeaweedFS).
fn overwrites(s3: &S3) -> Vec<Rule> {
    vec![Rule {
        method: "",
        path: format!("/{}/", s3.prefix),
        fault: Fault::Overwrites,
    }]
}

/// A store that ignores `If-None-Match: *` would let another server's archive of an id replace this
/// one's indexed object. The write-once probe finds it out before the first upload (its second PUT
/// of a scratch object is taken, then the object removed) and nothing is uploaded into that store:
/// every flow stays live, FLOW and SWEEP alike, with an error that says why. The verdict is the
/// store's: another prefix is another store, probed again, and one that writes once gets uploads.
#[test]
fn a_store_that_replaces_objects_gets_no_upload() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    proxy.set(overwrites(&s3));
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let ids = ["over-1", "over-2", "over-3"];
    for id in ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    let before = dump_all(&mut c);

    let msg = err_text(archive(&mut c, "over-1"));
    assert!(
        msg.contains("replaced an object a PUT with If-None-Match: * must not replace"),
        "{msg}"
    );
    assert!(msg.contains("nothing is uploaded into it"), "{msg}");
    let sent = proxy.requests();
    assert_eq!(
        sent.len(),
        4,
        "bucket, the write-once probe, no upload: {sent:?}"
    );
    write_once_probe(&sent[1..4], &s3);
    assert_eq!(info_field(&mut c, "s3_store_writes_once"), 0);
    assert_eq!(info_field(&mut c, "failures_s3_not_write_once"), 1);
    let said = "replaced an object under If-None-Match: *: it does not write once";
    assert!(srv.log().contains(said), "{}", srv.log());

    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    assert_eq!(int(&summary["failed"]), 3, "{summary:?}");
    assert_eq!(proxy.requests().len(), 4, "the verdict stands: no request");
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 1);
    assert_same(&before, &dump_all(&mut c), "every flow stays live");
    assert_eq!(srv.log().matches(said).count(), 1, "said once");

    // Another store (another prefix), which writes once: proven, and the flows go.
    config_set(&mut c, "flowarchive.prefix", &format!("{}-next", s3.prefix)).unwrap();
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 3, "{summary:?}");
    assert_eq!(info_field(&mut c, "s3_store_writes_once"), 1);
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 2);
    for id in ids {
        assert_eq!(
            get_events(&mut c, id).unwrap().1,
            events_of(&FlowSpec::done(id)),
            "{id}"
        );
    }
}

/// A write-once probe whose answer decides nothing (a 5xx, a 4xx other than 403) fails its upload
/// and is not remembered: the next upload probes again. A store that forbids the probe (403) is not
/// proven either way; uploads then go on relying on the header, as the log says.
#[test]
fn a_write_once_probe_that_decides_nothing_fails_its_upload() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["retry-attempts", "1"]);
    let mut c = srv.conn();
    for id in ["d1", "d2"] {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    let before = dump_all(&mut c);
    let probe_answers = |status| proxy.set(at_write_once_probe("PUT", Fault::Status(status)));
    for status in [500, 400] {
        probe_answers(status);
        let msg = err_text(archive(&mut c, "d1"));
        assert!(msg.contains(&format!("HTTP {status}")), "{msg}");
        assert_same(&before, &dump_all(&mut c), "the flow stays live");
        assert!(s3.list().is_empty(), "nothing uploaded");
        assert_eq!(info_field(&mut c, "s3_store_writes_once"), -1);
    }

    probe_answers(403);
    archive(&mut c, "d1").unwrap();
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 3);
    assert_eq!(info_field(&mut c, "s3_store_writes_once"), -1);
    assert!(
        srv.log().contains("the write-once probe was forbidden")
            && srv.log().contains("uploads rely on it unproven"),
        "{}",
        srv.log()
    );
    archive(&mut c, "d2").unwrap();
    assert_eq!(
        info_field(&mut c, "s3_write_once_probes"),
        3,
        "that verdict stands"
    );
}

/// A probe's scratch object is removed however the probe ends: after a PUT that stored it and whose
/// answer was lost (the probe decides nothing) as after a verdict. A removal the store refuses is
/// said in the log.
#[test]
fn a_write_once_probe_leaves_no_scratch_object() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["retry-attempts", "1"]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("l1"));
    let scratch = |s3: &S3| scratch_objects(s3).len();
    proxy.set(at_write_once_probe("PUT", Fault::LoseAnswer));
    for _ in 0..3 {
        err_text(archive(&mut c, "l1"));
    }
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 3);
    assert_eq!(scratch(&s3), 0, "{:?}", s3.list());

    proxy.set(at_write_once_probe("DELETE", Fault::Status(403)));
    archive(&mut c, "l1").unwrap();
    assert_eq!(scratch(&s3), 1, "the store refused its removal");
    assert!(
        srv.log().contains("a probe's scratch object") && srv.log().contains("was not removed"),
        "{}",
        srv.log()
    );
}

/// The probes' few bytes are not held to the upload rate cap: uploads waiting for a probe are not
/// failed while it would wait out a large upload's debt to the cap.
#[test]
fn a_probe_is_not_held_by_the_upload_rate_cap() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(
        &s3,
        Some(&proxy),
        &[
            "concurrency",
            "4",
            "retry-attempts",
            "1",
            "retry-max-ms",
            "0",
            "request-timeout-ms",
            "2000",
        ],
    );
    let mut c = srv.conn();
    let ids: Vec<String> = (0..5).map(|i| format!("capped-{i}")).collect();
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    // One upload of about 1 KB at 100 bytes a second leaves a debt of about nine seconds, longer than
    // waiting uploads give a probe (three requests of two seconds each, no retry).
    config_set(&mut c, "flowarchive.upload-bytes-per-sec", "100").unwrap();
    archive(&mut c, &ids[0]).unwrap();
    config_set(&mut c, "flowarchive.prefix", &format!("{}-next", s3.prefix)).unwrap();
    let mut other = srv.conn();
    other
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let sweeping = std::thread::spawn(move || sweep(&mut other, &[]));
    std::thread::sleep(Duration::from_secs(8));
    config_set(&mut c, "flowarchive.upload-bytes-per-sec", "0").unwrap();
    let swept = sweeping.join().unwrap().unwrap();
    assert_eq!(int(&swept["failed"]), 0, "{swept:?}");
    assert_eq!(int(&swept["archived"]), 4, "{swept:?}");
}

/// While one upload probes whether the store writes once, the others wait for its verdict: one probe
/// for a sweep of many uploaders, and no upload before it.
#[test]
fn uploads_wait_for_the_one_write_once_probe() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["concurrency", "4"]);
    let mut c = srv.conn();
    let ids: Vec<String> = (0..8).map(|i| format!("wait-{i}")).collect();
    for id in &ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    proxy.set(at_write_once_probe("PUT", Fault::Gate));
    let mut other = srv.conn();
    other
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let sweeping = std::thread::spawn(move || sweep(&mut other, &[]));
    // The sweep's uploads run in the idle scheduling class: slow on a busy machine.
    wait_for("the probe held", Duration::from_secs(180), || {
        proxy.gated() == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(proxy.gated(), 1, "one probe");
    let flow_puts = |proxy: &Proxy| {
        let sent = proxy.requests();
        let flow_put = |r: &&String| r.starts_with("PUT ") && r.contains("/flows/");
        sent.iter().filter(flow_put).count()
    };
    assert_eq!(flow_puts(&proxy), 0, "no upload before the verdict");
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 1);
    proxy.release();
    let swept = sweeping.join().unwrap().unwrap();
    assert_eq!(int(&swept["archived"]), 8, "{swept:?}");
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 1);
    assert_eq!(info_field(&mut c, "s3_store_writes_once"), 1);
    assert_eq!(flow_puts(&proxy), 8);
}

/// A waiting upload waits as long as the probe's own requests may take, by the settings the probe
/// was sent with: timeouts lowered meanwhile (the same store) do not make it give up on a probe that
/// then decides. It once gave up after three requests of its own timeout, failing a flow whose
/// store was proven a moment later.
#[test]
fn a_waiting_upload_waits_for_the_probe_by_its_probers_settings() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["request-timeout-ms", "60000"]);
    let mut c = srv.conn();
    for id in ["w-0", "w-1"] {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    proxy.set(at_write_once_probe("PUT", Fault::Gate));
    let mut first = srv.conn();
    let prober = std::thread::spawn(move || archive(&mut first, "w-0"));
    wait_for("the probe held", Duration::from_secs(60), || {
        proxy.gated() == 1
    });
    config_set(&mut c, "flowarchive.request-timeout-ms", "1000").unwrap();
    config_set(&mut c, "flowarchive.retry-max-ms", "0").unwrap();
    let mut second = srv.conn();
    let waiter = std::thread::spawn(move || archive(&mut second, "w-1"));
    // Past three requests by the waiter's own settings (three seconds).
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !waiter.is_finished(),
        "the waiting upload gave up: {:?}",
        waiter.join()
    );
    proxy.release();
    prober.join().unwrap().unwrap();
    waiter.join().unwrap().unwrap();
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 1);
    assert_eq!(info_field(&mut c, "s3_store_writes_once"), 1);
}

/// A probe PUT that got no answer may still reach the store after the probe removed its scratch
/// object (a proxy that sends a request on once its client has gone), and store it then: the key is
/// removed again at the first upload once that PUT's URL has expired. Both when the PUT was retried
/// (its retry answered, the probe decided) and when it was not (the probe decided nothing). It once
/// stayed for good; then, for a PUT not retried, it still did.
#[test]
fn a_probe_put_that_lands_late_is_removed_once_it_can_no_longer_land() {
    let retried = std::thread::spawn(|| late_probe_put_removed("3"));
    late_probe_put_removed("1");
    retried.join().unwrap();
}

/// The scenario of the test above, with `retry-attempts` set to `attempts`.
fn late_probe_put_removed(attempts: &str) {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(
        &s3,
        Some(&proxy),
        &["request-timeout-ms", "1000", "retry-attempts", attempts],
    );
    let mut c = srv.conn();
    for id in ["late-0", "late-1", "late-2"] {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    // The first attempt of a probe PUT is held past its timeout; a retry (every other) goes through.
    let held = match attempts {
        "1" => Fault::Gate,
        _ => Fault::EveryOther(Box::new(Fault::Gate)),
    };
    proxy.set(at_write_once_probe("PUT", held));
    let first = archive(&mut c, "late-0");
    assert_eq!(first.is_ok(), attempts != "1", "{attempts}: {first:?}");
    assert_eq!(scratch_objects(&s3), Vec::<String>::new());
    // The held attempts reach the store now: the first stores the scratch object again.
    let removed = Instant::now();
    proxy.clear();
    wait_for("the late PUT stored", Duration::from_secs(10), || {
        scratch_objects(&s3).len() == 1
    });
    // Not removed before its URL expires (60 s and twice the timeout after it was signed).
    archive(&mut c, "late-1").unwrap();
    assert_eq!(scratch_objects(&s3).len(), 1, "{attempts}");
    std::thread::sleep(Duration::from_secs(62).saturating_sub(removed.elapsed()));
    archive(&mut c, if attempts == "1" { "late-0" } else { "late-2" }).unwrap();
    assert_eq!(scratch_objects(&s3), Vec::<String>::new(), "{attempts}");
}

// ---------------------------------------------------------------- verify put-response

#[test]
fn put_response_needs_the_checksum_echo_an_etag_alone_is_no_proof() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["verify", "put-response"]);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("lied"));
    let before = dump_all(&mut c);
    proxy.set(vec![Rule {
        method: "PUT",
        path: "/flows/lied".into(),
        fault: Fault::FakeStored,
    }]);
    let msg = err_text(archive(&mut c, "lied"));
    assert!(msg.contains("not stored"), "{msg}");
    assert!(msg.contains("nothing was deleted"), "{msg}");
    assert_eq!(proxy.faulted(), 1, "the PUT got the lie");
    assert!(proxy.requests().iter().any(|r| r.starts_with("HEAD ")));
    assert_same(&before, &dump_all(&mut c), "the flow stays live");
    assert!(s3.list().is_empty());

    // SeaweedFS echoes the sha256 checksum: then the PUT's answer is proof and no HEAD is sent.
    proxy.clear();
    let heads_before = proxy.requests().len();
    archive(&mut c, "lied").unwrap();
    let sent: Vec<String> = proxy.requests()[heads_before..].to_vec();
    assert!(!sent.iter().any(|r| r.starts_with("HEAD ")), "{sent:?}");
    assert_eq!(s3.list(), ["flows/lied.jsonl.gz"]);
}

/// A store that records the client's checksum without checking the bytes (moto does) and keeps
/// corrupted bytes: its answers echo our sha256 while its ETag is the MD5 of other bytes. Every proof
/// must agree, so in both verify modes the contradiction fails the verification, nothing is deleted,
/// the corrupt object is removed from the flow's key, and a later attempt archives the flow whole.
#[test]
fn a_store_that_echoes_checksums_unchecked_cannot_make_a_delete() {
    for mode in ["head", "put-response", "auto"] {
        let s3 = S3::new_bucket();
        let proxy = Proxy::start(s3_port());
        let srv = server_via(&s3, Some(&proxy), &["verify", mode]);
        let mut c = srv.conn();
        let spec = FlowSpec::done("echoed");
        write_flow(&mut c, &spec);
        let before = dump_all(&mut c);
        proxy.set(vec![Rule {
            method: "",
            path: "/flows/echoed".into(),
            fault: Fault::EchoUnchecked,
        }]);
        let msg = err_text(archive(&mut c, "echoed"));
        assert!(
            msg.contains("contradicts the upload") && msg.contains("is the MD5 of other bytes"),
            "{mode}: {msg}"
        );
        assert_same(&before, &dump_all(&mut c), mode);
        let sent = proxy.requests();
        assert!(
            sent.iter()
                .any(|r| r.starts_with("DELETE ") && r.contains("/flows/echoed")),
            "{mode}: the corrupt object is removed: {sent:?}"
        );
        // The store keeps answering for that key: a retry finds nothing there and archives whole.
        proxy.clear();
        archive(&mut c, "echoed").unwrap();
        assert_eq!(
            get_events(&mut c, "echoed").unwrap().1,
            events_of(&spec),
            "{mode}"
        );
    }
}

// ---------------------------------------------------------------- verify auto

/// The requests the proxy saw from the `from`-th on.
/// Rules giving `fault` to every `method` request of a write-once probe's scratch object.
fn at_write_once_probe(method: &'static str, fault: Fault) -> Vec<Rule> {
    vec![Rule {
        method,
        path: "/_flowarchive/write-once-probe-".into(),
        fault,
    }]
}

/// The probes' scratch objects in this test's prefix.
fn scratch_objects(s3: &S3) -> Vec<String> {
    let keys = s3.list();
    keys.into_iter().filter(|k| k.contains("-probe-")).collect()
}

fn sent_since(proxy: &Proxy, from: usize) -> Vec<String> {
    proxy.requests()[from..].to_vec()
}

/// Whether `request` ("METHOD path") is `method` of this test's object `rel` (e.g. `flows/a.jsonl.gz`).
fn is(request: &str, method: &str, s3: &S3, rel: &str) -> bool {
    request.starts_with(&format!("{method} /{}/{}", s3.name(), s3.key(rel)))
}

/// The object path of `request` ("METHOD path?query").
fn path(request: &str) -> &str {
    let path = request.split_once(' ').map_or(request, |(_, p)| p);
    path.split('?').next().unwrap_or(path)
}

/// Whether `request` is `method` of a checksum probe's scratch object under this test's prefix.
fn is_probe(request: &str, method: &str, s3: &S3) -> bool {
    is(request, method, s3, "_flowarchive/checksum-probe-")
}

/// Asserts that `sent` are a write-once probe: two PUTs of one scratch object under this test's
/// prefix, then its removal.
fn write_once_probe(sent: &[String], s3: &S3) {
    let scratch = |r: &String, method| is(r, method, s3, "_flowarchive/write-once-probe-");
    assert!(
        scratch(&sent[0], "PUT") && scratch(&sent[1], "PUT") && scratch(&sent[2], "DELETE"),
        "the write-once probe: {sent:?}"
    );
    assert!(
        path(&sent[0]) == path(&sent[1]) && path(&sent[1]) == path(&sent[2]),
        "one scratch object: {sent:?}"
    );
}

/// A rule that puts the store that checks no checksum (`Fault::ChecksumIgnored`) in place of
/// SeaweedFS for every object of this test (not the bucket: its proof still reaches SeaweedFS).
fn checksums_ignored(s3: &S3) -> Vec<Rule> {
    vec![Rule {
        method: "",
        path: format!("/{}/", s3.prefix),
        fault: Fault::ChecksumIgnored,
    }]
}

/// On SeaweedFS, which refuses a body whose checksum does not match (400 BadDigest), `verify auto`
/// (the default) proves that once, with the bucket, before the first upload; from then on each flow
/// costs exactly one S3 request, its PUT, whose echoed checksum proves it: FLOW and SWEEP alike. The
/// probe stores nothing, and every flow reads back whole.
#[test]
fn auto_archives_with_one_request_per_flow_on_a_store_that_validates_checksums() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    assert_eq!(config(&mut c, "flowarchive.verify"), "auto");
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), -1);
    let ids: Vec<String> = (0..20).map(|i| format!("one-{i:02}")).collect();
    let specs: Vec<FlowSpec> = ids.iter().map(|id| FlowSpec::done(id)).collect();
    for spec in &specs {
        write_flow(&mut c, spec);
    }

    archive(&mut c, &ids[0]).unwrap();
    let sent = sent_since(&proxy, 0);
    assert_eq!(sent.len(), 6, "{sent:?}");
    assert!(
        sent[0].starts_with(&format!("HEAD /{}", s3.name())) && !sent[0].contains(&s3.prefix),
        "the bucket's proof first: {sent:?}"
    );
    write_once_probe(&sent[1..4], &s3);
    assert!(
        is_probe(&sent[4], "PUT", &s3),
        "then the checksum probe: {sent:?}"
    );
    assert!(
        is(&sent[5], "PUT", &s3, "flows/one-00.jsonl.gz"),
        "{sent:?}"
    );
    assert_eq!(info_field(&mut c, "s3_store_writes_once"), 1);
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 1);
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), 1);
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 1);
    assert_eq!(info_field(&mut c, "s3_heads_saved"), 1);

    // FLOW: one PUT per flow.
    for id in &ids[1..10] {
        let before = proxy.requests().len();
        archive(&mut c, id).unwrap();
        let sent = sent_since(&proxy, before);
        assert_eq!(sent.len(), 1, "{id}: {sent:?}");
        assert!(
            is(&sent[0], "PUT", &s3, &format!("flows/{id}.jsonl.gz")),
            "{sent:?}"
        );
    }
    // SWEEP (four uploaders): one PUT per flow too.
    let before = proxy.requests().len();
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 10, "{summary:?}");
    let sent = sent_since(&proxy, before);
    assert_eq!(sent.len(), 10, "{sent:?}");
    assert!(sent.iter().all(|r| r.starts_with("PUT ")), "{sent:?}");
    println!(
        "verify auto on SeaweedFS: {} S3 requests for {} flows (bucket proof 1, write-once probe 3, \
         checksum probe 1, one PUT per flow)",
        proxy.requests().len(),
        ids.len()
    );
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 1);
    assert_eq!(info_field(&mut c, "s3_heads_saved"), 20);
    assert_eq!(info_field(&mut c, "failures_s3_verify"), 0);

    for spec in &specs {
        assert_eq!(
            get_events(&mut c, spec.id).unwrap(),
            (archived_state(&state_json(spec)), events_of(spec)),
            "{}",
            spec.id
        );
    }
    let mut stored = s3.list();
    stored.sort();
    let expected: Vec<String> = ids
        .iter()
        .map(|id| format!("flows/{id}.jsonl.gz"))
        .collect();
    assert_eq!(stored, expected, "the probes left nothing");
    assert!(
        srv.log()
            .contains("refused a PUT whose x-amz-checksum-sha256 did not match its body"),
        "the verdict is logged"
    );
}

/// A store that takes a PUT whatever its checksum says, and answers it as a good store would while
/// it keeps corrupted bytes: `auto` finds out with its probe (stored, then removed), says so once,
/// and proves every upload into that store with a HEAD, which catches the corruption: nothing is
/// deleted. The verdict stands for that store even once it behaves. The control: `put-response`
/// believes the same answer, which is why `auto` proves a store before it trusts its echo.
#[test]
fn auto_finds_a_store_that_ignores_checksums_and_keeps_its_heads() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let spec = FlowSpec::done("kept");
    write_flow(&mut c, &spec);
    let before = dump_all(&mut c);
    proxy.set(checksums_ignored(&s3));

    let msg = err_text(archive(&mut c, "kept"));
    assert!(
        msg.contains("HEAD ") && msg.contains("is the MD5 of other bytes"),
        "the HEAD shows the corruption: {msg}"
    );
    assert!(msg.contains("nothing was deleted"), "{msg}");
    assert_same(&before, &dump_all(&mut c), "the flow stays live");
    let sent = proxy.requests();
    assert_eq!(sent.len(), 9, "{sent:?}");
    assert!(
        sent[0].starts_with(&format!("HEAD /{}", s3.name())),
        "{sent:?}"
    );
    write_once_probe(&sent[1..4], &s3);
    assert!(is_probe(&sent[4], "PUT", &s3), "{sent:?}");
    assert!(
        is_probe(&sent[5], "DELETE", &s3) && path(&sent[5]) == path(&sent[4]),
        "the probe's object is removed: {sent:?}"
    );
    let flow = "flows/kept.jsonl.gz";
    for (r, method) in sent[6..].iter().zip(["PUT", "HEAD", "DELETE"]) {
        assert!(is(r, method, &s3, flow), "{method}: {sent:?}");
    }
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), 0);
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 1);
    assert_eq!(info_field(&mut c, "s3_heads_saved"), 0);
    let said = "stored a PUT whose x-amz-checksum-sha256 did not match its body: it does not \
                validate checksums, so verify auto proves every upload with a HEAD";
    assert!(srv.log().contains(said), "{}", srv.log());

    // The same store, behaving now: still never trusted for its echo (no probe, a HEAD per upload).
    proxy.clear();
    let from = proxy.requests().len();
    archive(&mut c, "kept").unwrap();
    let sent = sent_since(&proxy, from);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        is(&sent[0], "PUT", &s3, flow) && is(&sent[1], "HEAD", &s3, flow),
        "{sent:?}"
    );
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 1);
    assert_eq!(info_field(&mut c, "s3_heads_saved"), 0);
    assert_eq!(get_events(&mut c, "kept").unwrap().1, events_of(&spec));
    assert_eq!(srv.log().matches(said).count(), 1, "said once");

    // The control: put-response takes the lying store's answer as proof and deletes a flow whose
    // archive holds other bytes (its read then fails). `auto` exists for this.
    config_set(&mut c, "flowarchive.verify", "put-response").unwrap();
    write_flow(&mut c, &FlowSpec::done("fooled"));
    proxy.set(checksums_ignored(&s3));
    archive(&mut c, "fooled").unwrap();
    assert!(get(&mut c, "fooled").is_err(), "the archive is corrupt");
}

/// What is proven is proven of a store: pointed at another store, the module proves that one again
/// (its bucket and its checksums) before the first upload into it; back at the first, whose proof
/// stands, one PUT per flow again. `checksum md5` sends no checksum to probe: `auto` takes the HEAD.
#[test]
fn a_changed_store_is_proven_again() {
    let s3 = S3::new_bucket();
    let good = Proxy::start(s3_port());
    let lying = Proxy::start(s3_port());
    lying.set(checksums_ignored(&s3));
    let srv = server_via(&s3, Some(&good), &[]);
    let mut c = srv.conn();
    let ids = ["c1", "c2", "c3", "c4"];
    for id in ids {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    archive(&mut c, "c1").unwrap();
    assert_eq!(good.requests().len(), 6, "bucket, probes (3 + 1), PUT");
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), 1);

    // Another endpoint: another store, proven again, and found not to validate.
    config_set(&mut c, "flowarchive.endpoint", &lying.endpoint()).unwrap();
    let before = dump_all(&mut c);
    let msg = err_text(archive(&mut c, "c2"));
    assert!(msg.contains("is the MD5 of other bytes"), "{msg}");
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
    let sent = lying.requests();
    assert!(
        sent[0].starts_with(&format!("HEAD /{}", s3.name())),
        "{sent:?}"
    );
    write_once_probe(&sent[1..4], &s3);
    assert!(is_probe(&sent[4], "PUT", &s3), "{sent:?}");
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 2);
    assert_eq!(info_field(&mut c, "s3_write_once_probes"), 2);
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), 0);

    // Back to the first store: its proof stands, one PUT per flow.
    config_set(&mut c, "flowarchive.endpoint", &good.endpoint()).unwrap();
    let from = good.requests().len();
    archive(&mut c, "c2").unwrap();
    let sent = sent_since(&good, from);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), 1);
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 2);

    // checksum md5: another store again (its bucket and writing once proven anew), no checksum
    // probe, a HEAD per upload.
    config_set(&mut c, "flowarchive.checksum", "md5").unwrap();
    let from = good.requests().len();
    archive(&mut c, "c3").unwrap();
    let sent = sent_since(&good, from);
    assert_eq!(sent.len(), 6, "{sent:?}");
    assert!(
        sent[0].starts_with(&format!("HEAD /{}", s3.name())),
        "{sent:?}"
    );
    write_once_probe(&sent[1..4], &s3);
    assert!(is(&sent[4], "PUT", &s3, "flows/c3.jsonl.gz"), "{sent:?}");
    assert!(is(&sent[5], "HEAD", &s3, "flows/c3.jsonl.gz"), "{sent:?}");
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), -1);
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 2);
    config_set(&mut c, "flowarchive.checksum", "sha256").unwrap();
    let from = good.requests().len();
    archive(&mut c, "c4").unwrap();
    assert_eq!(sent_since(&good, from).len(), 1);
    for id in ids {
        assert!(get(&mut c, id).unwrap().is_some(), "{id}");
    }
}

/// A probe whose answer decides nothing (a 5xx) is not remembered: that upload is proven by a HEAD,
/// and the next upload probes again. The scratch object it may have stored is removed.
#[test]
fn a_probe_that_decides_nothing_is_tried_again() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &["retry-attempts", "1"]);
    let mut c = srv.conn();
    for id in ["u1", "u2"] {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    proxy.set(vec![Rule {
        method: "PUT",
        path: "/_flowarchive/checksum-probe-".into(),
        fault: Fault::Status(500),
    }]);
    archive(&mut c, "u1").unwrap();
    let sent = proxy.requests();
    assert_eq!(sent.len(), 8, "{sent:?}");
    assert!(is_probe(&sent[4], "PUT", &s3), "{sent:?}");
    assert!(
        is_probe(&sent[5], "DELETE", &s3),
        "a scratch object it may have stored is removed: {sent:?}"
    );
    assert!(is(&sent[7], "HEAD", &s3, "flows/u1.jsonl.gz"), "{sent:?}");
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), -1);
    proxy.clear();
    let from = proxy.requests().len();
    archive(&mut c, "u2").unwrap();
    let sent = sent_since(&proxy, from);
    assert_eq!(sent.len(), 2, "probe, PUT: {sent:?}");
    assert!(is_probe(&sent[0], "PUT", &s3), "{sent:?}");
    assert_eq!(info_field(&mut c, "s3_checksum_probes"), 2);
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), 1);
}

/// A redirect (a wrong region or endpoint) is an error that says so, for uploads and reads alike: it
/// is neither read as stored nor as a missing object.
#[test]
fn redirects_are_errors_that_name_them() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    // verify head: every upload is followed by the HEAD whose redirect is tested too.
    let srv = server_via(
        &s3,
        Some(&proxy),
        &["retry-attempts", "1", "verify", "head"],
    );
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("moved"));
    write_flow(&mut c, &FlowSpec::done("read"));
    archive(&mut c, "read").unwrap();
    let before = dump_all(&mut c);
    for method in ["PUT", "HEAD"] {
        proxy.set(vec![Rule {
            method,
            path: "/flows/moved".into(),
            fault: Fault::Redirect(307),
        }]);
        let msg = err_text(archive(&mut c, "moved"));
        assert!(msg.contains("redirected (HTTP 307 to"), "{method}: {msg}");
        assert_same(&before, &dump_all(&mut c), method);
    }
    proxy.set(vec![Rule {
        method: "GET",
        path: String::new(),
        fault: Fault::Redirect(301),
    }]);
    let msg = err_text(get(&mut c, "read"));
    assert!(msg.contains("redirected (HTTP 301"), "{msg}");
    assert_eq!(info_field(&mut c, "get_fetch_errors_s3_redirected"), 1);
}

/// SeaweedFS creates a missing bucket on PUT: a mistyped `bucket` would take archives that reads then
/// refuse. The bucket is proven to exist before anything is archived into it; a missing one refuses
/// the archive, creates nothing and deletes nothing.
#[test]
fn a_missing_bucket_is_never_created_and_refuses_every_archive() {
    let s3 = S3::new_bucket();
    let typo = format!("{}-typo", s3.name());
    let srv = server_via(&s3, None, &[]);
    let mut c = srv.conn();
    config_set(&mut c, "flowarchive.bucket", &typo).unwrap();
    write_flow(&mut c, &FlowSpec::done("misdirected"));
    let before = dump_all(&mut c);
    let msg = err_text(archive(&mut c, "misdirected"));
    assert!(
        msg.contains(&format!("bucket \"{typo}\" does not exist (HTTP 404)")),
        "{msg}"
    );
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
    assert!(!s3.bucket_exists(&typo), "the bucket was created");
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    assert!(!s3.bucket_exists(&typo));
    config_set(&mut c, "flowarchive.bucket", s3.name()).unwrap();
    archive(&mut c, "misdirected").unwrap();
}

/// Flows whose labels hashes of 3 MiB are read in steps, uploaded to stores that lie about them: one
/// that answers 200 to the PUT and stores nothing, one that echoes our checksum while it keeps
/// corrupted bytes (under `verify auto`, with the store proven to validate checksums), and, under
/// `verify head`, one that checks no checksum and corrupts what it keeps after answering as a good
/// store would. Each sweep counts every lie as a failed verification and deletes none of those
/// flows: the checker finds every event and label of each live, while the flow that reached the
/// honest store beside them is archived label for label. Told the truth again, every flow is archived.
#[test]
fn stores_that_lie_about_uploads_of_large_labels_delete_nothing() {
    let s3 = S3::new_bucket();
    let proxy = Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    let mut model = checker::Model::new(0);
    for id in ["honest", "fake", "echoed"] {
        model.write_labeled(&mut c, &FlowSpec::done(id), 3 << 20);
    }
    let rule = |method, id: &str, fault| Rule {
        method,
        path: format!("/flows/{id}."),
        fault,
    };
    let lies = |ignored: Fault| {
        vec![
            rule("PUT", "fake", Fault::FakeStored),
            rule("", "echoed", Fault::EchoUnchecked),
            rule("", "ignored", ignored),
        ]
    };
    proxy.set(lies(Fault::Status(403)));
    let failed = |summary: &HashMap<String, redis::Value>, n: i64| {
        assert_eq!(int(&summary["failed"]), n, "{summary:?}");
        let reasons = reply_map(summary["failed_by_reason"].clone());
        assert_eq!(int(&reasons["s3_verify"]), n, "{summary:?}");
    };
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    failed(&summary, 2);
    assert_eq!(info_field(&mut c, "s3_store_validates_checksums"), 1);
    assert_eq!(info_field(&mut c, "hash_events_subscribed"), 1, "in steps");
    let tally = checker::check("auto lied to", &srv, &s3, &model, checker::Expect::Either);
    assert_eq!((tally.archived, tally.live), (1, 2));

    model.write_labeled(&mut c, &FlowSpec::done("ignored"), 3 << 20);
    config_set(&mut c, "flowarchive.verify", "head").unwrap();
    proxy.set(lies(Fault::ChecksumIgnored));
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    failed(&summary, 3);
    let tally = checker::check("head lied to", &srv, &s3, &model, checker::Expect::Either);
    assert_eq!((tally.archived, tally.live), (1, 3));
    wait_for("every byte released", Duration::from_secs(10), || {
        info_field(&mut c, "buffered_bytes") == 0
    });

    proxy.clear();
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 3, "{summary:?}");
    checker::check_swept("told the truth", &srv, &s3, &model, 4);
}

/// Under `sse aws:kms` an object's ETag is no MD5 of its bytes, so a HEAD proves the upload only by
/// the checksum it echoes, which a store that checks nothing echoes for corrupted bytes too. Where the
/// store is not proven to check what it is sent (`verify auto` after its probe failed, `verify
/// head`), the object is read back and hashed before anything is deleted: the corrupted upload is
/// refused and removed, the flow kept; under `verify put-response`, which trusts the echo by
/// choice, the store is taken at its word (docs/S3.md). Taking the echo as proof, both modes
/// deleted the flow under an object that no read could verify.
#[test]
fn an_encrypted_upload_to_a_store_that_checks_nothing_is_read_back_before_a_delete() {
    for mode in ["auto", "head"] {
        let s3 = S3::new_bucket();
        let proxy = Proxy::start(s3_port());
        let srv = server_via(&s3, Some(&proxy), &["verify", mode, "sse", "aws:kms"]);
        let mut c = srv.conn();
        let mut model = checker::Model::new(0);
        model.write(&mut c, &FlowSpec::done("sealed"));
        let before = dump_all(&mut c);
        proxy.set(checksums_ignored(&s3));
        let e = err_text(archive(&mut c, "sealed"));
        assert!(e.contains("nothing was deleted"), "{mode}: {e}");
        assert_same(&before, &dump_all(&mut c), mode);
        let tally = checker::check(mode, &srv, &s3, &model, checker::Expect::Either);
        assert_eq!((tally.archived, tally.live), (0, 1), "{mode}");
    }
}

// ---------------------------------------------------------------- rate cap

/// Object names the store would refuse (MinIO and SeaweedFS take at most 255 bytes per key segment)
/// are stored under their `_sha256` name, in either index format; a store that refuses a name anyway
/// (the limit raised past it) answers an error that keeps its reason, with the flow live.
#[test]
fn long_ids_are_named_within_the_stores_limit_and_refusals_keep_their_reason() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    // 86 colons escape to 258 bytes; 100 `é` to 600; a UUID-length id stays as it is.
    let ids = [":".repeat(86), "é".repeat(100), "a".repeat(36)];
    for (i, id) in ids.iter().enumerate() {
        if i == 1 {
            config_set(&mut c, "flowarchive.index-format", "compact").unwrap();
        }
        let spec = FlowSpec::done(id);
        write_flow(&mut c, &spec);
        let location = text(&archive(&mut c, id).unwrap()["location"]);
        let name = location.rsplit('/').next().unwrap();
        assert!(name.len() <= 255, "{location}");
        assert_eq!(location.contains("/_sha256/"), i < 2, "{location}");
        let (state, events) = get_events(&mut c, id).unwrap();
        assert_eq!(state, archived_state(&state_json(&spec)));
        assert_eq!(events, events_of(&spec));
    }
    // The compact index records what it can rebuild; the `_sha256` name went to the hash.
    let hashed: i64 = cmd(&mut c, &["HEXISTS", "archived:flows", &ids[1]]).unwrap();
    assert_eq!(hashed, 1);
    assert_eq!(cmd::<i64>(&mut c, &["HLEN", "archived:flows"]).unwrap(), 2);

    // A 915-byte key: the message keeps the reason after it.
    config_set(&mut c, "flowarchive.object-name-max", "1024").unwrap();
    let id = "é".repeat(150);
    write_flow(&mut c, &FlowSpec::done(&id));
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut c, &id));
    assert!(
        e.contains("KeyTooLongError") && e.contains("nothing was deleted"),
        "{e}"
    );
    assert_same(&before, &dump_all(&mut c), "refused by the store");
}

/// Archives `id` on another thread; its result arrives on the channel.
fn archive_in_background(
    srv: &Server,
    id: &'static str,
) -> mpsc::Receiver<redis::RedisResult<HashMap<String, redis::Value>>> {
    let mut c = srv.conn();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(archive(&mut c, id));
    });
    rx
}

#[test]
fn a_changed_rate_cap_frees_a_waiting_upload_at_once() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    for id in ["r1", "r2", "r3", "r4"] {
        write_flow(&mut c, &FlowSpec::done(id));
    }
    for unlimited in ["100mb", "0"] {
        config_set(&mut c, "flowarchive.upload-bytes-per-sec", "10").unwrap();
        let (first, second) = if unlimited == "0" {
            ("r3", "r4")
        } else {
            ("r1", "r2")
        };
        // A fresh cap holds one second of its rate: the first object passes and leaves a debt of
        // hundreds of bytes, so the second waits for about a minute at 10 bytes/s.
        archive(&mut c, first).unwrap();
        let waiting = archive_in_background(&srv, second);
        assert!(
            waiting.recv_timeout(Duration::from_millis(1500)).is_err(),
            "the second upload waits under the cap"
        );
        config_set(&mut c, "flowarchive.upload-bytes-per-sec", unlimited).unwrap();
        let started = Instant::now();
        let done = waiting
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("still waiting after upload-bytes-per-sec {unlimited}"));
        done.unwrap();
        eprintln!("freed by {unlimited} in {:?}", started.elapsed());
    }
    assert_eq!(s3.list().len(), 4);
}

// ---------------------------------------------------------------- secrets

fn write_file(dir: &Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn a_secret_key_load_argument_is_refused() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args
        .extend(["secret-key", "load-arg-s3cret"].map(String::from));
    let log = Server::start_failing(opts);
    assert!(
        log.contains("secret-key load argument is refused")
            && log.contains("secret-key-file")
            && log.contains("AWS_*"),
        "{log}"
    );
}

#[test]
fn an_unreadable_secret_key_file_stops_the_load_naming_the_path() {
    let s3 = S3::new_bucket();
    let missing = root().join("target/no-such-secret-file");
    let mut opts = ServerOpts::new(&s3);
    let at = opts
        .module_args
        .iter()
        .position(|a| a == "secret-key-file")
        .unwrap();
    opts.module_args[at + 1] = missing.to_str().unwrap().into();
    let log = Server::start_failing(opts);
    assert!(
        log.contains(&format!(
            "flowarchive: not loaded: secret-key-file {missing:?} cannot be read"
        )),
        "{log}"
    );
}

#[test]
fn secret_key_file_is_read_when_set_and_a_bad_file_keeps_the_old_one() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let good = secret_file().to_str().unwrap().to_string();
    assert_eq!(config(&mut c, "flowarchive.secret-key-file"), good);
    let wrong = write_file(&srv.dir, "wrong", "wrong-s3cret-value\n");
    let empty = write_file(&srv.dir, "empty", " \n");
    let missing = srv.dir.join("missing").to_str().unwrap().to_string();
    for (bad, reason) in [(&empty, "is empty"), (&missing, "cannot be read")] {
        let e = config_set(&mut c, "flowarchive.secret-key-file", bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains(bad.as_str()) && e.contains(reason), "{e}");
        assert_eq!(config(&mut c, "flowarchive.secret-key-file"), good, "kept");
    }
    // The file's content is used at once: a wrong secret gets 403 and deletes nothing.
    config_set(&mut c, "flowarchive.secret-key-file", &wrong).unwrap();
    write_flow(&mut c, &FlowSpec::done("k1"));
    let before = dump_all(&mut c);
    let msg = err_text(archive(&mut c, "k1"));
    assert!(msg.contains("HTTP 403"), "{msg}");
    assert_same(&before, &dump_all(&mut c), "nothing deleted");
    // Of secret-key and secret-key-file, the one set last is used.
    config_set(&mut c, "flowarchive.secret-key", S3_SECRET).unwrap();
    archive(&mut c, "k1").unwrap();
    let wrong_too = write_file(&srv.dir, "wrong-too", "wrong-s3cret-value");
    config_set(&mut c, "flowarchive.secret-key-file", &wrong_too).unwrap();
    write_flow(&mut c, &FlowSpec::done("k2"));
    assert!(err_text(archive(&mut c, "k2")).contains("HTTP 403"));
    config_set(&mut c, "flowarchive.secret-key-file", &good).unwrap();
    archive(&mut c, "k2").unwrap();
    for text in [srv.log(), config(&mut c, "flowarchive.*")] {
        assert!(!text.contains("wrong-s3cret-value") && !text.contains(S3_SECRET));
    }
}

/// Reads what a MONITOR connection received so far.
fn drain(monitor: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    monitor
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while let Ok(n) = monitor.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sets the secret at runtime and looks for it everywhere a server shows things. MONITOR and SLOWLOG
/// are the server's to redact (the module marks the config sensitive); they are reported, not asserted.
fn secret_never_shown(flavor: Flavor) {
    const RUNTIME_SECRET: &str = "runtime-s3cret-7e1d";
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    let srv = Server::start(opts);
    let mut c = srv.conn();
    config_set(&mut c, "slowlog-log-slower-than", "0").unwrap();
    let mut monitor = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    monitor.write_all(b"*1\r\n$7\r\nMONITOR\r\n").unwrap();
    assert!(drain(&mut monitor).starts_with("+OK"));
    cmd::<()>(&mut c, &["SET", "monitor-probe", "1"]).unwrap();
    config_set(&mut c, "flowarchive.secret-key", RUNTIME_SECRET).unwrap();
    let monitored = drain(&mut monitor);
    assert!(monitored.contains("monitor-probe"), "{monitored}");
    let slowlog: redis::Value = cmd(&mut c, &["SLOWLOG", "GET", "1000"]).unwrap();
    // The server keeps CONFIG SET arguments of module configs in SLOWLOG even when they are marked
    // sensitive (Valkey 9.1, 8.0 and Redis 7.0 all do): reported, not asserted; see docs/OPERATIONS.md.
    eprintln!(
        "{flavor:?}: SLOWLOG shows the runtime secret: {}",
        format!("{slowlog:?}").contains(RUNTIME_SECRET)
    );

    let modules: redis::Value = cmd(&mut c, &["MODULE", "LIST"]).unwrap();
    let client_list: String = cmd(&mut c, &["CLIENT", "LIST"]).unwrap();
    let everywhere = [
        ("MONITOR", monitored),
        ("MODULE LIST", format!("{modules:?}")),
        ("CONFIG GET", config(&mut c, "flowarchive.secret-key")),
        (
            "CONFIG GET *",
            format!(
                "{:?}",
                cmd::<Vec<String>>(&mut c, &["CONFIG", "GET", "*"]).unwrap()
            ),
        ),
        ("CLIENT LIST", client_list),
        ("INFO", cmd(&mut c, &["INFO", "everything"]).unwrap()),
        ("server log", srv.log()),
    ];
    assert!(format!("{modules:?}").contains("secret-key-file"));
    for (place, text) in everywhere {
        for secret in [S3_SECRET, RUNTIME_SECRET] {
            assert!(!text.contains(secret), "{flavor:?}: {place} shows a secret");
        }
    }
}

#[test]
fn the_secret_is_never_shown_on_valkey_9() {
    secret_never_shown(Flavor::Valkey9);
}

#[test]
fn the_secret_is_never_shown_on_valkey_8_0() {
    secret_never_shown(Flavor::Valkey8);
}

#[test]
fn the_secret_is_never_shown_on_redis_7_0() {
    secret_never_shown(Flavor::Redis7);
}

/// Archives, sets configs at runtime, CONFIG REWRITE, restarts from the rewritten file alone and
/// archives again; the file never holds the secret.
fn rewrite_and_restart(flavor: Flavor) {
    let s3 = S3::new_bucket();
    let dir = root().join("target/test-servers").join(unique("conf"));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("server.conf");
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    let mut srv = Server::start_with_config_file(opts, &conf);
    let mut c = srv.conn();
    write_flow(&mut c, &FlowSpec::done("before"));
    archive(&mut c, "before").unwrap();
    // A runtime secret (the right one) must not end up in the file; a runtime secret-key-file must.
    config_set(&mut c, "flowarchive.secret-key", S3_SECRET).unwrap();
    let moved = write_file(&dir, "moved-secret", &format!("{S3_SECRET}\n"));
    config_set(&mut c, "flowarchive.secret-key-file", &moved).unwrap();
    cmd::<()>(&mut c, &["CONFIG", "REWRITE"]).unwrap();
    let mut written = std::fs::read_to_string(&conf).unwrap();
    assert!(!written.contains(S3_SECRET), "{flavor:?}: {written}");
    assert!(
        written.contains(&format!("flowarchive.secret-key-file {moved}"))
            || written.contains(&format!("flowarchive.secret-key-file \"{moved}\"")),
        "{flavor:?}: {written}"
    );
    eprintln!(
        "{flavor:?}: flowarchive lines after CONFIG REWRITE: {:?}",
        written
            .lines()
            .filter(|l| l.contains("flowarchive."))
            .collect::<Vec<_>>()
    );
    // What an older rewrite wrote for the sensitive config: an empty value means "not set".
    if !written.contains("flowarchive.secret-key \"\"") {
        written.push_str("flowarchive.secret-key \"\"\n");
        std::fs::write(&conf, &written).unwrap();
    }

    srv.restart_from_config_file();
    let mut c = srv.conn();
    assert_eq!(config(&mut c, "flowarchive.secret-key-file"), moved);
    write_flow(&mut c, &FlowSpec::done("after"));
    archive(&mut c, "after").unwrap();
    assert_eq!(s3.list(), ["flows/after.jsonl.gz", "flows/before.jsonl.gz"]);
    assert!(!srv.log().contains(S3_SECRET));
    drop(srv);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_rewrite_and_a_restart_keep_archiving_on_valkey_9() {
    rewrite_and_restart(Flavor::Valkey9);
}

#[test]
fn config_rewrite_and_a_restart_keep_archiving_on_valkey_8_0() {
    rewrite_and_restart(Flavor::Valkey8);
}

#[test]
fn config_rewrite_and_a_restart_keep_archiving_on_redis_7_0() {
    rewrite_and_restart(Flavor::Redis7);
}
