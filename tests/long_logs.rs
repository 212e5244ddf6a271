//! Event logs read by `mainthread::read_log` against a real server: the archive's capture and live
//! `FLOWARCHIVE.GET … EVENTS`. A log of at most 1024 events and 1 MiB is read in one step; a longer
//! one in chunks that stop at `step-budget-us` once 64 events (or 256 KiB) are in. These tests attack the edges: logs of
//! 1023 to 1025 and 2048 to 2049 events at the smallest and largest budget and with the budget changed
//! during the sweep; every list write between two chunks of a capture (nothing is deleted unless the
//! archive holds what was live at commit, checked event by event by the checker); a live read while
//! the log rotates, or while a large snapshot is rewritten (never a mixture of two states);
//! `read-max-bytes` hit at exactly its byte; what never reads a large snapshot (a refused read, a
//! DRYRUN) copies and follows nothing of it; events of 0 bytes; the main-thread CPU figure in INFO;
//! and, on short logs of large events read in steps (past their first 1 MiB), the caller's rights
//! (asked in every step, also when taken away mid-read), writes, `CLIENT PAUSE` and `MODULE UNLOAD`
//! in the middle of a live read or a capture.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::checker::{self, assert_alive, Expect, Model};
use common::*;

const BUDGET: &str = "flowarchive.step-budget-us";

fn lrange(c: &mut redis::Connection, key: &str) -> Vec<String> {
    cmd(c, &["LRANGE", key, "0", "-1"]).unwrap()
}

/// Writes a completed flow of `events` events into `model`.
fn write(c: &mut redis::Connection, model: &mut Model, id: &str, events: usize) {
    model.write(
        c,
        &FlowSpec {
            events,
            ..FlowSpec::done(id)
        },
    );
}

/// A completed flow `id` of three events with `blobs` events of `bytes` bytes (`widen`) after its
/// first: a short log past 1 MiB, read in steps. The engine's state of it (the blobs have no type),
/// and its log.
fn wide(c: &mut redis::Connection, id: &str, blobs: usize, bytes: usize) -> (String, Vec<String>) {
    let spec = FlowSpec {
        events: 3,
        ..FlowSpec::done(id)
    };
    write_flow(c, &spec);
    (state_json(&spec), widen(c, id, blobs, bytes))
}

/// A short log whose read takes some hundred steps at the smallest budget (12 MB of events).
const MANY_STEPS: (usize, usize) = (300, 40 << 10);

fn steps(c: &mut redis::Connection) -> i64 {
    info_field(c, "main_thread_steps")
}

/// Runs `slow` (a stepped read or archive) on `conn` in a thread of its own and, once it has taken two
/// main-thread steps, `fault` on `c`: `slow`'s outcome, and whether it took a step after the fault
/// (else the fault may have come after its last step, not in its middle; a step is counted when it is
/// handed to the event loop, so one counted before the fault may still run after it).
fn amid<T: Send + 'static>(
    c: &mut redis::Connection,
    mut conn: redis::Connection,
    slow: impl FnOnce(&mut redis::Connection) -> T + Send + 'static,
    fault: impl FnOnce(&mut redis::Connection),
) -> (T, bool) {
    let base = steps(c);
    let running = std::thread::spawn(move || slow(&mut conn));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while steps(c) < base + 2 && !running.is_finished() {
        assert!(std::time::Instant::now() < deadline, "no step was taken");
        std::thread::sleep(Duration::from_millis(1));
    }
    fault(c);
    let at = steps(c);
    let out = running.join().unwrap();
    (out, steps(c) > at)
}

/// A connection of ACL user `name` (password `pw`).
fn conn_as(srv: &Server, name: &str) -> redis::Connection {
    let mut c = srv.conn();
    cmd::<()>(&mut c, &["AUTH", name, "pw"]).unwrap();
    c
}

/// A connection of a new ACL user `name` (password `pw`) who may run every command on the keys
/// `rules` name, made through `admin`.
fn user(admin: &mut redis::Connection, srv: &Server, name: &str, rules: &str) -> redis::Connection {
    let mut setuser = vec!["ACL", "SETUSER", name, "on", ">pw", "+@all"];
    setuser.extend(rules.split_whitespace());
    run(admin, &setuser);
    conn_as(srv, name)
}

/// Every key of the flows but the label indexes of the labels from `large-03000` on.
const FEW_LABELS: &str = "~argyll:flow:* ~archived:* ~argyll:idx:status* \
    %R~argyll:archive:lease:* ~argyll:idx:label:large-00* ~argyll:idx:label:large-01* \
    ~argyll:idx:label:large-02*";

/// Whether an error reply carries any of a blob's bytes.
fn leaks(e: &str) -> bool {
    e.contains("xxxxxxxx")
}

type Read = (String, Vec<String>);

/// The error of a read that must be refused (when it was answered, how many events it got: a log of
/// megabytes is not shown).
fn refusal(r: redis::RedisResult<Read>) -> String {
    match r {
        Ok((_, events)) => panic!("answered {} events instead of an error", events.len()),
        Err(e) => e.to_string(),
    }
}

/// Asserts a read answered `want`, naming the first difference (a log of megabytes is not shown).
fn assert_read(got: &Read, want: &Read, what: &str) {
    assert!(got.0 == want.0, "{what}: another state");
    let (got, want) = (&got.1, &want.1);
    let first = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]);
    assert!(
        first.is_none() && got.len() == want.len(),
        "{what}: {} events, want {}; first differing: {first:?}",
        got.len(),
        want.len()
    );
}

/// Logs around one step (1024) and the smallest chunk (64), each read live and archived, under `budget`
/// (or with the budget flipping between its bounds during the sweep when `None`); checked event by
/// event live, then archived.
fn boundaries(budget: Option<&str>) {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, budget.unwrap_or("50")).unwrap();
    let mut model = Model::new(0);
    let sizes = [1usize, 63, 64, 65, 1023, 1024, 1025, 1088, 2048, 2049, 5000];
    for n in sizes {
        write(&mut c, &mut model, &format!("n{n}"), n);
    }
    for n in sizes {
        let id = format!("n{n}");
        let (_, events) = get_events(&mut c, &id).unwrap();
        assert_eq!(events, model.flows[&id].events, "live {id}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = budget.is_none().then(|| {
        let (stop, mut c) = (stop.clone(), srv.conn());
        std::thread::spawn(move || {
            let mut flips = 0;
            while !stop.load(Ordering::Relaxed) {
                let value = if flips % 2 == 0 { "100000" } else { "50" };
                config_set(&mut c, BUDGET, value).unwrap();
                flips += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            flips
        })
    });
    let summary = sweep(&mut c, &[]).unwrap();
    stop.store(true, Ordering::Relaxed);
    if let Some(f) = flipper {
        assert!(f.join().unwrap() > 1, "the budget never changed");
    }
    assert_eq!(int(&summary["archived"]), sizes.len() as i64, "{summary:?}");
    checker::check_swept("after the sweep", &srv, &s3, &model, sizes.len());
    for n in sizes {
        let id = format!("n{n}");
        let (_, events) = get_events(&mut c, &id).unwrap();
        assert_eq!(events, model.flows[&id].events, "archived {id}");
    }
}

#[test]
fn logs_around_one_step_at_the_smallest_budget() {
    boundaries(Some("50"));
}

#[test]
fn logs_around_one_step_at_the_largest_budget() {
    boundaries(Some("100000"));
}

#[test]
fn logs_around_one_step_with_the_budget_changed_during_the_sweep() {
    boundaries(None);
}

/// One list write to a flow's log, applied by a script only while the log exists (so the test knows
/// whether it reached the live flow): its name, the script, and what it makes of the log.
struct Change {
    name: &'static str,
    script: &'static str,
    apply: fn(&mut Vec<String>),
}

const CHANGES: [Change; 8] = [
    Change {
        name: "rpushx",
        script: "return redis.call('RPUSHX', KEYS[1], '{\"late\":1}') > 0 and 1 or 0",
        apply: |l| l.push("{\"late\":1}".into()),
    },
    Change {
        name: "lpushx",
        script: "return redis.call('LPUSHX', KEYS[1], '{\"early\":1}') > 0 and 1 or 0",
        apply: |l| l.insert(0, "{\"early\":1}".into()),
    },
    Change {
        name: "lset-first",
        script: "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 redis.call('LSET', KEYS[1], 0, '{\"edited\":0}') return 1",
        apply: |l| l[0] = "{\"edited\":0}".into(),
    },
    Change {
        name: "lset-last",
        script: "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 redis.call('LSET', KEYS[1], -1, '{\"edited\":1}') return 1",
        apply: |l| *l.last_mut().unwrap() = "{\"edited\":1}".into(),
    },
    Change {
        name: "ltrim",
        script: "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 redis.call('LTRIM', KEYS[1], 1, -2) return 1",
        apply: |l| {
            l.pop();
            l.remove(0);
        },
    },
    Change {
        name: "rotate",
        // Same length, every element moved: only a followed log can tell.
        script: "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 redis.call('LMOVE', KEYS[1], KEYS[1], 'RIGHT', 'LEFT') return 1",
        apply: |l| l.rotate_right(1),
    },
    Change {
        name: "del",
        script: "return redis.call('DEL', KEYS[1])",
        apply: |l| l.clear(),
    },
    Change {
        name: "renamed-over",
        // Another list of the same length renamed over the log.
        script: "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 local n = redis.call('LLEN', KEYS[1]) \
                 for i = 1, n do redis.call('RPUSH', KEYS[2], '{\"other\":1}') end \
                 redis.call('RENAME', KEYS[2], KEYS[1]) return 1",
        apply: |l| l.iter_mut().for_each(|e| *e = "{\"other\":1}".into()),
    },
];

/// Long logs, read at the smallest budget (64 events a step), each changed once while the sweep
/// captures them. Every flow ends either live as changed, or archived with exactly the changed log
/// (or, when the change came after the commit deleted it, the log as it was): the checker compares
/// every event. A second, quiet sweep then archives the rest, again checked event by event, but for a
/// flow whose log was deleted (no flow any more) and one whose change removed its `flow_started`
/// (the engine could not load it: refused as unreadable, left live).
#[test]
fn every_list_write_during_a_chunked_capture_is_kept() {
    const EVENTS: usize = 20_000;
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let mut model = Model::new(0);
    for change in &CHANGES {
        write(&mut c, &mut model, change.name, EVENTS);
    }
    // A sweep of these logs at the smallest budget takes thousands of steps: on loaded cores it can
    // run past the connections' usual 60 s read timeout.
    let patient = Some(Duration::from_secs(600));
    c.set_read_timeout(patient).unwrap();
    let mut other = srv.conn();
    other.set_read_timeout(patient).unwrap();
    let swept = std::thread::spawn(move || sweep(&mut other, &[]));
    // The first long capture subscribes to keyspace events: the sweep is reading chunks now.
    wait_for("a chunked capture", Duration::from_secs(30), || {
        info_field(&mut c, "keyspace_events_subscribed") == 1
    });
    let (mut hits, mut deleted, mut unservable) = (0, false, 0);
    for change in &CHANGES {
        let key = events_key(change.name);
        let spare = format!("spare:{}", change.name);
        let hit: i64 = cmd(&mut c, &["EVAL", change.script, "2", &key, &spare]).unwrap();
        if hit > 0 {
            hits += 1;
            deleted |= change.name == "del";
            let flow = model.flows.get_mut(change.name).unwrap();
            (change.apply)(&mut flow.events);
            unservable += usize::from(!flow.events.is_empty() && flow.state().is_none());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let summary = swept.join().unwrap().unwrap();
    assert!(hits > 0, "every change came after its flow was archived");
    assert!(
        int(&summary["skipped_changed"]) > 0,
        "no change landed during a capture: {summary:?}"
    );
    checker::check("after the changed sweep", &srv, &s3, &model, Expect::Either);

    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["failed"]), unservable as i64, "{summary:?}");
    let tally = checker::check("after a quiet sweep", &srv, &s3, &model, Expect::Either);
    assert_eq!(
        tally.archived,
        CHANGES.len() - usize::from(deleted) - unservable
    );
}

/// A live read of a long log while another client rotates it (each rotation moves every element):
/// every answer is one state, some rotation of the original, never chunks of two; a read that kept
/// meeting changes says so.
#[test]
fn a_live_read_of_a_rotating_log_is_never_a_mixture() {
    const EVENTS: usize = 3000;
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let id = "rotating";
    write_flow(
        &mut c,
        &FlowSpec {
            events: EVENTS,
            status: "active",
            ..FlowSpec::done(id)
        },
    );
    let original = lrange(&mut c, &events_key(id));
    let position: std::collections::HashMap<&str, usize> = original
        .iter()
        .enumerate()
        .map(|(i, e)| (e.as_str(), i))
        .collect();
    let key = events_key(id);
    read_while_written(
        &srv,
        move |c, _| cmd::<redis::Value>(c, &["LMOVE", &key, &key, "RIGHT", "LEFT"]).map(drop),
        || get_events(&mut c, id),
        |(_, events)| {
            assert_eq!(events.len(), EVENTS);
            let first = position[events[0].as_str()];
            for (j, e) in events.iter().enumerate() {
                assert_eq!(
                    position[e.as_str()],
                    (first + j) % EVENTS,
                    "a mixture of two states at event {j}"
                );
            }
        },
    );
}

/// A live read of a flow whose 3 MiB snapshot another client keeps rewriting, each time with other
/// bytes of the same length (its `metadata`, which the engine's state keeps): the read copies the
/// snapshot over several steps, and every answer is the state of one of the two snapshots, never of
/// pieces of both; a read that kept meeting rewrites says so.
#[test]
fn a_live_read_of_a_large_snapshot_being_rewritten_is_never_torn() {
    const LEN: usize = 3 << 20;
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let id = "rewritten";
    write_flow(
        &mut c,
        &FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        },
    );
    let key = snapshot_key(id);
    let stored: String = cmd(&mut c, &["GET", &key]).unwrap();
    let body = stored.strip_suffix('}').expect("a JSON object");
    // The snapshot with a metadata value of `LEN` bytes in all, its digits counted on from `first`.
    let with_metadata = |first: usize| {
        let head = format!("{body},\"metadata\":{{\"pad\":\"");
        let digits = (0..LEN - head.len() - 3).map(|i| char::from(b'0' + ((first + i) % 10) as u8));
        format!("{head}{}\"}}}}", digits.collect::<String>())
    };
    let mut states = Vec::new();
    for (staged, first) in [("staged:a", 0), ("staged:b", 1)] {
        let snapshot = with_metadata(first);
        assert_eq!(snapshot.len(), LEN);
        run(&mut c, &["SET", staged, &snapshot]);
        run(&mut c, &["SET", &key, &snapshot]);
        states.push(get(&mut c, id).unwrap().expect("the state"));
    }
    assert_ne!(states[0], states[1]);
    assert!(states[0].contains("\"metadata\":{\"pad\":\"0123"));

    const SET_FROM: &str = "return redis.call('SET', KEYS[1], redis.call('GET', KEYS[2]))";
    read_while_written(
        &srv,
        move |c, n| {
            let staged = ["staged:a", "staged:b"][n % 2];
            cmd::<redis::Value>(c, &["EVAL", SET_FROM, "2", &key, staged]).map(drop)
        },
        || get(&mut c, id),
        |state| {
            let state = state.expect("the state");
            assert!(
                states.contains(&state),
                "an answer that is neither snapshot's state ({} bytes)",
                state.len()
            );
        },
    );
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0);
}

/// Reads 60 times (`read`) while another connection writes (`write`, given how many writes came
/// before it) in a loop, quiet now and then for long enough for a whole read: every answer passes
/// `check`, every other read says it kept meeting changes, at least one read answers, and the writer
/// wrote throughout.
fn read_while_written<T>(
    srv: &Server,
    mut write: impl FnMut(&mut redis::Connection, usize) -> redis::RedisResult<()> + Send + 'static,
    mut read: impl FnMut() -> redis::RedisResult<T>,
    check: impl Fn(T),
) {
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, writes, mut c) = (stop.clone(), writes.clone(), srv.conn());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = writes.fetch_add(1, Ordering::Relaxed);
                write(&mut c, n).unwrap();
                let pause = if n % 20 == 0 { 40 } else { 1 };
                std::thread::sleep(Duration::from_millis(pause));
            }
        })
    };
    let (mut whole, mut refused) = (0, 0);
    for _ in 0..60 {
        match read() {
            Ok(answer) => {
                whole += 1;
                check(answer);
            }
            Err(e) => {
                assert!(
                    e.to_string().contains("changed during every read attempt"),
                    "{e}"
                );
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(writes.load(Ordering::Relaxed) > 60, "hardly written");
    assert!(whole > 0, "no read succeeded ({refused} refused)");
}

/// Bytes a live read counts: the snapshot (if any), and each event with its line end.
fn live_bytes(c: &mut redis::Connection, id: &str) -> u64 {
    let snapshot: Option<String> = cmd(c, &["GET", &snapshot_key(id)]).unwrap();
    let events = lrange(c, &events_key(id));
    snapshot.map_or(0, |s| s.len() as u64) + events.iter().map(|e| e.len() as u64 + 1).sum::<u64>()
}

/// `read-max-bytes` at exactly a flow's bytes answers the flow; one byte less refuses it, a short log
/// (read in the command) and a long one (read in chunks) alike. An archive at the exact cap, which
/// cannot read back under it (the object's lines cost more), deletes nothing.
#[test]
fn the_read_cap_holds_at_its_exact_byte() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    for (id, events) in [("short", 700), ("long", 1100)] {
        write_flow(
            &mut c,
            &FlowSpec {
                events,
                ..FlowSpec::done(id)
            },
        );
        let log = lrange(&mut c, &events_key(id));
        let exact = live_bytes(&mut c, id);
        assert!(exact > 64 << 10, "{id}: {exact}");
        config_set(&mut c, "flowarchive.read-max-bytes", &exact.to_string()).unwrap();
        assert_eq!(get_events(&mut c, id).unwrap().1, log, "{id} at the cap");
        let before = dump_all(&mut c);
        let e = err_text(archive(&mut c, id));
        assert!(e.contains("read-max-bytes"), "{id}: {e}");
        assert_same(&before, &dump_all(&mut c), id);
        config_set(
            &mut c,
            "flowarchive.read-max-bytes",
            &(exact - 1).to_string(),
        )
        .unwrap();
        let e = err_text(get_events(&mut c, id));
        assert!(
            e.contains(&format!("larger than read-max-bytes ({} bytes)", exact - 1)),
            "{id}: {e}"
        );
        config_set(&mut c, "flowarchive.read-max-bytes", "64mb").unwrap();
    }
}

/// Events of 0 bytes are no events: the engine cannot load such a flow, so a live GET answers an error
/// naming the first of them, and the flow is never archived (not JSON): it stays whole. A long log with
/// empty events at the step edge (1023, 1024) is refused the same way.
#[test]
fn empty_events_are_refused_live_and_never_archived() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    for (id, events) in [("few", 5usize), ("many", 1500)] {
        write_flow(
            &mut c,
            &FlowSpec {
                events,
                ..FlowSpec::done(id)
            },
        );
        let key = events_key(id);
        for at in [1usize, 3, 1023, 1024] {
            if at < events {
                run(&mut c, &["LSET", &key, &at.to_string(), ""]);
            }
        }
        let log = lrange(&mut c, &key);
        assert!(log.iter().any(String::is_empty));
        let e = err_text(get_events(&mut c, id));
        assert!(e.contains("event 1 is not JSON"), "{id}: {e}");
        let before = dump_all(&mut c);
        let e = err_text(archive(&mut c, id));
        assert!(e.contains("not JSON"), "{id}: {e}");
        assert_same(&before, &dump_all(&mut c), id);
        assert_eq!(lrange(&mut c, &key), log, "{id} after");
    }
}

fn run(c: &mut redis::Connection, args: &[&str]) {
    cmd::<redis::Value>(c, args).unwrap();
}

/// `main_thread_max_cpu_us`: some CPU time once long logs were read, never more than the wall-clock
/// maximum (each CPU interval lies inside its wall-clock one).
#[test]
fn main_thread_cpu_is_within_its_wall_clock() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    assert_eq!(info_field(&mut c, "main_thread_max_cpu_us"), 0);
    for id in ["a", "b"] {
        write_flow(
            &mut c,
            &FlowSpec {
                events: 3000,
                ..FlowSpec::done(id)
            },
        );
    }
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 2, "{summary:?}");
    let cpu = info_field(&mut c, "main_thread_max_cpu_us");
    let wall = info_field(&mut c, "main_thread_max_us");
    assert!(cpu > 0, "no CPU time recorded");
    // Slack for the two clocks' sources and rounding.
    assert!(
        cpu <= wall + wall / 20 + 2,
        "CPU {cpu} µs over wall clock {wall} µs"
    );
}

/// A long log of large events pauses by bytes, not only after 64 events: at the smallest budget each
/// step of a live read copies about 256 KiB (8 events of 32 KiB), not 64 events (2 MiB). Every event
/// is answered.
#[test]
fn a_chunk_of_large_events_pauses_by_bytes() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let started = FlowSpec {
        events: 1,
        status: "active",
        ..FlowSpec::done("wide")
    };
    write_flow(&mut c, &started);
    let event = format!("{{\"blob\":\"{}\"}}", "x".repeat(32 << 10));
    let key = events_key("wide");
    for _ in 0..11 {
        let mut push = redis::cmd("RPUSH");
        push.arg(&key);
        for _ in 0..100 {
            push.arg(&event);
        }
        push.query::<()>(&mut c).unwrap();
    }
    config_set(&mut c, BUDGET, "50").unwrap();
    let (read, steps) = stepped(&mut c, |c| get_events(c, "wide"));
    let (state, events) = read.unwrap();
    // Blobs are events of no type: the engine's state is that of the flow_started alone.
    assert_eq!(state, state_json(&started));
    assert_eq!(events.len(), 1101);
    assert!(events[1..].iter().all(|e| *e == event));
    // 64 events a step would be 18 chunks; 256 KiB a step is about 8 events, so over 100.
    assert!(steps > 60, "{steps} steps");
}

/// A short log (under 1024 events) of large events is read in steps too once its first 1 MiB is in,
/// live and at capture: 40 events of 32 KiB are not copied in one stretch of the main thread (1,000 of
/// 60 KB took 115 ms in one). Every event is answered; the capture follows the log from its first chunk, so a
/// write while the flow is uploaded keeps it, and without one it is archived whole.
#[test]
fn a_short_log_of_large_events_is_read_in_steps() {
    let s3 = S3::new_bucket();
    let proxy = common::proxy::Proxy::start(s3_port());
    let srv = server_via(&s3, Some(&proxy), &[]);
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let wide = |c: &mut redis::Connection, id: &str| wide(c, id, 40, 32 << 10);

    // Live: every event answered, over many steps.
    let (spec, events) = wide(&mut c, "wide-live");
    assert_eq!(events.len(), 43);
    let (read, steps) = stepped(&mut c, |c| get_events(c, "wide-live"));
    let (state, answered) = read.unwrap();
    // Blobs are events of no type: the engine's state is that of the flow's own events.
    assert_eq!(state, spec);
    assert_eq!(answered, events);
    assert!(steps >= 3, "{steps} steps for 1.3 MB of events");

    // Archived: the capture reads it in steps (and follows it, below).
    let (archived, steps) = stepped(&mut c, |c| archive(c, "wide-live"));
    let r = archived.unwrap();
    assert_eq!(int(&r["events"]), 43);
    assert!(
        steps >= 3,
        "{steps} steps to capture and commit 1.3 MB of events"
    );
    let (archived_state, archived_events) = get_events(&mut c, "wide-live").unwrap();
    assert_eq!(archived_events, events);
    assert!(
        archived_state.contains("\"archived\":true"),
        "{archived_state}"
    );

    // A blob rewritten to the same size while the object is on its way: followed, so kept.
    let (_, before_change) = wide(&mut c, "wide-changed");
    proxy.hold("PUT");
    let mut other = srv.conn();
    let flow = std::thread::spawn(move || archive(&mut other, "wide-changed"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    let edited = before_change[20].replacen('x', "y", 1);
    run(
        &mut c,
        &["LSET", &events_key("wide-changed"), "20", &edited],
    );
    proxy.release();
    let e = err_text(flow.join().unwrap());
    assert!(e.contains("changed while it was being archived"), "{e}");
    let mut now = before_change;
    now[20] = edited;
    assert_eq!(lrange(&mut c, &events_key("wide-changed")), now);
    assert_eq!(
        cmd::<i64>(&mut c, &["HEXISTS", "archived:flows", "wide-changed"]).unwrap(),
        0
    );
}

/// A snapshot larger than one read step (1 MiB) is copied in steps, live and at capture, followed by
/// a watch that takes string writes too: 3 MiB at the smallest budget take several steps, the state
/// and events are answered exactly, and the archive holds the snapshot byte for byte (the checker
/// compares it). A snapshot of exactly 1 MiB is still read in one step, and follows nothing.
#[test]
fn a_large_snapshot_is_read_in_steps() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let mut model = Model::new(0);
    for (id, len) in [("one-step", 1 << 20), ("large", 3 << 20)] {
        let spec = FlowSpec {
            events: 8,
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        model.write_padded(&mut c, &spec, len);
    }
    let live = |c: &mut redis::Connection, id: &str| -> i64 {
        let (read, steps) = stepped(c, |c| get_events(c, id));
        let (state, events) = read.unwrap();
        assert_eq!(Some(state), model.flows[id].state(), "{id}");
        assert_eq!(events, model.flows[id].events, "{id}");
        steps
    };
    assert_eq!(
        live(&mut c, "one-step"),
        0,
        "read in the command's own step"
    );
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 0);
    let steps = live(&mut c, "large");
    assert!(steps >= 4, "{steps} steps for a snapshot of 3 MiB");
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 1);

    let (archived, steps) = stepped(&mut c, |c| archive(c, "large"));
    let r = archived.unwrap();
    assert!(steps >= 4, "{steps} steps to capture and commit it");
    assert_eq!(int(&r["events"]), 8);
    archive(&mut c, "one-step").unwrap();
    checker::check_swept("archived", &srv, &s3, &model, 2);
}

/// `read-max-bytes`, `buffer-max-bytes` and `step-budget-us` lowered, or raised, between the steps of
/// a capture and of a live `GET … EVENTS` (of a 12 MiB snapshot, copied in steps, and of a short log of
/// 12 MB of large events): each read keeps the cap it began with (it counted its whole snapshot at
/// its first step), so each archive and each answer is whole, and the new settings hold for the reads
/// that begin after them; every byte counted is released, and every flow is live as written or
/// archived with exactly its events.
#[test]
fn settings_changed_between_the_steps_of_a_read_leave_it_its_own() {
    let s3 = S3::new_bucket();
    let mut srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "200").unwrap();
    let mut model = Model::new(0);
    for id in ["snap-a", "snap-b", "snap-c"] {
        let spec = FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        model.write_padded(&mut c, &spec, 12 << 20);
    }
    for id in ["wide-a", "wide-b", "wide-c"] {
        write(&mut c, &mut model, id, 3);
        model.widen(&mut c, id, MANY_STEPS.0, MANY_STEPS.1);
    }
    let settings = |c: &mut redis::Connection, read_max: &str, buffer_max: &str, budget: &str| {
        config_set(c, "flowarchive.read-max-bytes", read_max).unwrap();
        config_set(c, "flowarchive.buffer-max-bytes", buffer_max).unwrap();
        config_set(c, BUDGET, budget).unwrap();
    };
    let lowered = |c: &mut redis::Connection| settings(c, "1mb", "1mb", "50");
    let raised = |c: &mut redis::Connection| settings(c, "64mb", "256mb", "200");
    let flows: &std::collections::BTreeMap<_, _> = &model.flows;
    let want = |id: &str| (flows[id].state().unwrap(), flows[id].events.clone());
    let busy = Busy::start(&srv);
    // Begun under the defaults, the settings lowered after two steps, then raised again.
    for id in ["snap-a", "wide-a"] {
        let owned = id.to_string();
        let (answer, mid) = amid(&mut c, srv.conn(), move |c| archive(c, &owned), lowered);
        assert!(mid, "{id}: the settings changed after the last step");
        let events = model.flows[id].events.len() as i64;
        assert_eq!(int(&answer.unwrap()["events"]), events, "{id}");
        assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "{id}: released");
        raised(&mut c);
    }
    for id in ["snap-b", "wide-b"] {
        let owned = id.to_string();
        let (answer, mid) = amid(&mut c, srv.conn(), move |c| get_events(c, &owned), lowered);
        assert!(mid, "{id}: the settings changed after the last step");
        assert_read(&answer.unwrap(), &want(id), id);
        assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "{id}: released");
        // A read begun under the lowered cap is refused by it.
        let e = refusal(get_events(&mut c, id));
        assert!(
            e.contains("larger than read-max-bytes (1048576 bytes)"),
            "{e}"
        );
        raised(&mut c);
    }
    // Begun under a small buffer budget and the smallest step, then given the defaults and the
    // largest step.
    let unbounded = |c: &mut redis::Connection| settings(c, "64mb", "256mb", "100000");
    for id in ["snap-c", "wide-c"] {
        settings(&mut c, "64mb", "1mb", "50");
        let owned = id.to_string();
        let (answer, _) = amid(
            &mut c,
            srv.conn(),
            move |c| get_events(c, &owned),
            unbounded,
        );
        assert_read(&answer.unwrap(), &want(id), id);
        settings(&mut c, "64mb", "1mb", "50");
        let owned = id.to_string();
        let (answer, _) = amid(&mut c, srv.conn(), move |c| archive(c, &owned), unbounded);
        answer.unwrap();
        assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "{id}: released");
    }
    busy.stop();
    assert_alive(&mut srv, "after the changes");
    let tally = checker::check("after the changes", &srv, &s3, &model, Expect::Either);
    assert_eq!((tally.archived, tally.live), (4, 2));
}

/// A labels hash larger than one read step (1 MiB) is copied in steps at capture, followed by a watch
/// that takes hash writes too, and counted, not read again, at commit: 3 MiB at the smallest budget
/// take several steps, and the archive holds every label (the checker compares them, and the
/// archived flow's state). One of exactly 1 MiB is still read in the command's own step and compared
/// at commit, and follows nothing.
#[test]
fn a_large_labels_hash_is_read_in_steps() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let mut model = Model::new(0);
    for (id, bytes) in [("one-step", 1 << 20), ("large", 3 << 20)] {
        model.write_labeled(&mut c, &FlowSpec::done(id), bytes);
    }
    let steps = |c: &mut redis::Connection, id: &str| {
        let (archived, steps) = stepped(c, |c| archive(c, id));
        assert_eq!(int(&archived.unwrap()["events"]), 5);
        steps
    };
    assert_eq!(steps(&mut c, "one-step"), 1, "the commit's step alone");
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 0);
    assert_eq!(info_field(&mut c, "hash_events_subscribed"), 0);
    let taken = steps(&mut c, "large");
    assert!(
        taken >= 5,
        "{taken} steps to capture and commit labels of 3 MiB"
    );
    assert_eq!(info_field(&mut c, "hash_events_subscribed"), 1);
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 0);
    for id in ["one-step", "large"] {
        let want = archived_state(&model.flows[id].state().unwrap());
        assert_eq!(get(&mut c, id).unwrap(), Some(want), "{id}");
    }
    checker::check_swept("archived", &srv, &s3, &model, 2);
}

/// Every field name of the object's header and trailer (docs/FORMAT.md), and GET's `archived`.
const OBJECT_FIELDS: [&str; 16] = [
    "format",
    "version",
    "flow_id",
    "db",
    "events",
    "raw_bytes",
    "sha256",
    "keys",
    "previous",
    "archived_at",
    "state",
    "snapshot",
    "seq",
    "labels",
    "status",
    "archived",
];

/// Labels named after the object's own fields, and after them with a quote, a brace or a newline
/// around them, whose values look like the object's lines (a header, a trailer, an event, a bare
/// `null`, a line break and a closing brace), in a labels hash of 3 MiB read in steps, beside labels
/// holding a NUL, a line separator, a character outside the BMP and what the engine escapes in its
/// label indexes, are plain data: the flow is archived in steps, its object's trailer holds every
/// label as stored (the checker compares each), and FLOWARCHIVE.GET answers exactly the state it
/// answered live (the labels its first event carries among them), marked archived.
#[test]
fn labels_named_like_the_objects_own_fields_are_read_back_label_for_label() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let values = [
        r#"{"format":"flowarchive","version":2,"flow_id":"other","db":0,"events":0}"#,
        "\"}\n{\"state\":null,\"snapshot\":null,\"seq\":null,\"labels\":{},\"status\":\"failed\"}",
        r#"{"timestamp":"2026-01-01T00:00:00Z","type":"flow_failed","data":{}}"#,
        "null",
        "\n}",
    ];
    let mut labels: Vec<(String, String)> = Vec::new();
    for (i, field) in OBJECT_FIELDS.iter().enumerate() {
        let value = values[i % values.len()];
        labels.push((field.to_string(), value.to_string()));
        for name in [
            format!("\"{field}\""),
            format!("{field}\"}}"),
            format!("\n{field}"),
        ] {
            labels.push((name, values[(i + 1) % values.len()].to_string()));
        }
    }
    let pairs: Vec<(&str, &str)> = labels.iter().map(|(l, v)| (&l[..], &v[..])).collect();
    let spec = FlowSpec {
        labels: &pairs,
        ..FlowSpec::done("lookalike")
    };
    let mut model = Model::new(0);
    model.write(&mut c, &spec);
    // In the labels hash only (the engine's state would encode them as Go does): a NUL, a line
    // separator, a character outside the BMP, and what the engine escapes in its label indexes.
    let odd = [
        ("nul\u{0}", "\u{0}{\"state\":null}"),
        ("line\u{2028}separator", "\u{2029}"),
        ("emoji\u{1F600}", "\u{1F600}\n"),
        ("status:seq", "%{\"labels\":{}}\\"),
    ];
    let odd: Vec<(String, String)> = (odd.iter())
        .map(|(l, v)| (l.to_string(), v.to_string()))
        .collect();
    model.add_labels(&mut c, "lookalike", &odd);
    model.add_labels(&mut c, "lookalike", &labels_of("pad-", 3 << 20));
    let live = get(&mut c, "lookalike").unwrap().expect("live");
    assert_eq!(Some(&live), model.flows["lookalike"].state().as_ref());
    assert!(
        live.contains(r#""labels":{"\n"#),
        "the first event's labels: {live}"
    );

    let r = archive(&mut c, "lookalike").unwrap();
    assert_eq!(int(&r["events"]), 5);
    assert_eq!(
        info_field(&mut c, "hash_events_subscribed"),
        1,
        "read in steps"
    );
    assert_eq!(
        get(&mut c, "lookalike").unwrap(),
        Some(archived_state(&live))
    );
    checker::check_swept("archived", &srv, &s3, &model, 1);
}

/// One label of 6 MiB among 2 MiB of others, in a labels hash read in steps (the large label taken
/// whole in the step that reaches it), while another client writes to other keys all along, hashes
/// among them (so the hash watch sees writes that are not the flow's): the flow is archived with
/// every label whole, the other client's writes keep nothing, and every byte the capture and the
/// upload held is released after.
#[test]
fn a_label_of_several_mib_is_read_whole_in_steps_while_other_keys_are_written() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = Model::new(0);
    let id = "one-large-label";
    model.write_labeled(&mut c, &FlowSpec::done(id), 2 << 20);
    let value: String = (0..6 << 20)
        .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
        .collect();
    model.add_labels(&mut c, id, &[("large".to_string(), value)]);

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let (flag, count, mut w) = (stop.clone(), written.clone(), srv.conn());
    let writer = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            let i = count.fetch_add(1, Ordering::Relaxed).to_string();
            redis::pipe()
                .cmd("HSET")
                .arg("other:labels")
                .arg(&i)
                .arg("x".repeat(1000))
                .cmd("HDEL")
                .arg("other:labels")
                .arg(i.clone() + "0")
                .cmd("SET")
                .arg("other:string")
                .arg(&i)
                .cmd("RPUSH")
                .arg("other:list")
                .arg(&i)
                .query::<()>(&mut w)
                .unwrap();
        }
    });
    wait_for("the writer to start", Duration::from_secs(10), || {
        written.load(Ordering::Relaxed) > 10
    });
    let before = written.load(Ordering::Relaxed);
    let r = archive(&mut c, id);
    let during = written.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_eq!(int(&r.unwrap()["events"]), 5);
    assert!(during > 0, "no write came during the archive");
    assert_eq!(
        info_field(&mut c, "hash_events_subscribed"),
        1,
        "read in steps"
    );
    wait_for("every byte released", Duration::from_secs(10), || {
        info_field(&mut c, "buffered_bytes") == 0
    });
    checker::check_swept("archived", &srv, &s3, &model, 1);
}

/// The same id in DB 1 and DB 0, each with a labels hash of 3 MiB read in steps, the same names with
/// other values: each archive reads its own DB's hash in every step, so each object holds its own
/// DB's labels, label for label, and the other DB's flow stays live and whole until its own archive.
#[test]
fn the_same_id_in_two_dbs_is_archived_with_each_dbs_own_large_labels() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let (mut c0, mut c1) = (srv.conn(), srv.conn());
    run(&mut c1, &["SELECT", "1"]);
    let (mut m0, mut m1) = (Model::new(0), Model::new(1));
    let spec = FlowSpec::done("twin");
    m0.write_labeled(&mut c0, &spec, 3 << 20);
    let theirs: Vec<(String, String)> = (m0.flows["twin"].labels.iter())
        .map(|(l, v)| (l.clone(), v.chars().rev().collect()))
        .collect();
    m1.write(
        &mut c1,
        &FlowSpec {
            labels: &[],
            ..spec.clone()
        },
    );
    m1.add_labels(&mut c1, "twin", &theirs);

    assert_eq!(int(&archive(&mut c1, "twin").unwrap()["events"]), 5);
    assert_eq!(
        info_field(&mut c0, "hash_events_subscribed"),
        1,
        "read in steps"
    );
    let either = Expect::Either;
    assert_eq!(
        checker::check("DB 1 archived", &srv, &s3, &m1, either).archived,
        1
    );
    assert_eq!(checker::check("DB 0 live", &srv, &s3, &m0, either).live, 1);
    assert_eq!(int(&archive(&mut c0, "twin").unwrap()["events"]), 5);
    for (what, model) in [("DB 0", &m0), ("DB 1", &m1)] {
        checker::check_swept(what, &srv, &s3, model, 1);
    }
}

/// A label that is not text (UTF-8) has no place in the object's JSON: the archive is refused saying
/// so, the flow stays exactly as it was and nothing stays held, whether the label is judged in the
/// command's first step (a small hash: a name that is not text) or read in the last step of a hash
/// of 3 MiB (a value that is not text, in the bucket the scan reaches last). Mended, each archives.
#[test]
fn labels_that_are_not_text_refuse_the_archive_in_any_step() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let mut model = Model::new(0);
    model.write_labeled(&mut c, &FlowSpec::done("small"), 1 << 10);
    model.write_labeled(&mut c, &FlowSpec::done("large"), 3 << 20);
    let (small, large) = (labels_key("small"), labels_key("large"));
    redis::cmd("HSET")
        .arg(&small)
        .arg(&b"\xffname"[..])
        .arg("v")
        .query::<()>(&mut c)
        .unwrap();
    // The field the server's scan hands over last, as the capture's last step reads it.
    let mut cursor = 0u64;
    let mut last = String::new();
    loop {
        let (next, pairs): (u64, Vec<String>) = redis::cmd("HSCAN")
            .arg(&large)
            .arg(cursor)
            .query(&mut c)
            .unwrap();
        last = pairs.chunks(2).last().map_or(last, |p| p[0].clone());
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let value: Vec<u8> = cmd(&mut c, &["HGET", &large, &last]).unwrap();
    let mut bad = value.clone();
    bad[0] = 0xff;
    redis::cmd("HSET")
        .arg(&large)
        .arg(&last)
        .arg(&bad)
        .query::<()>(&mut c)
        .unwrap();

    let before = dump_all(&mut c);
    for (id, what, steps) in [
        ("small", "a label name is not UTF-8", 0..=0),
        ("large", "a label value is not UTF-8", 2..=i64::MAX),
    ] {
        let (refused, taken) = stepped(&mut c, |c| archive(c, id));
        let e = err_text(refused);
        assert!(e.contains(what), "{id}: {e}");
        assert!(steps.contains(&taken), "{id}: refused after {taken} steps");
        assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "{id}");
    }
    assert_same(&before, &dump_all(&mut c), "refused labels");

    redis::cmd("HDEL")
        .arg(&small)
        .arg(&b"\xffname"[..])
        .query::<()>(&mut c)
        .unwrap();
    redis::cmd("HSET")
        .arg(&large)
        .arg(&last)
        .arg(&value)
        .query::<()>(&mut c)
        .unwrap();
    for id in ["small", "large"] {
        assert_eq!(int(&archive(&mut c, id).unwrap()["events"]), 5, "{id}");
    }
    checker::check_swept("mended", &srv, &s3, &model, 2);
}

/// The label indexes a labels hash read in steps names are checked once it is whole, in a step of
/// their own, as the capture checks those of smaller labels: the caller's rights on them all first,
/// then their types. A user without rights on the indexes of the last labels written (read in a later
/// step) is refused naming one, a label index of another type refuses the archive too, both before
/// anything is uploaded and neither deleting anything; with both mended the flow is archived. (The
/// refusal names the key refused without asking the server once per key: with 3,000 labels that
/// took longer than a minute.)
#[test]
fn the_label_indexes_of_a_large_labels_hash_are_checked_once_it_is_whole() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = Model::new(0);
    model.write_labeled(&mut c, &FlowSpec::done("large"), 3 << 20);
    let labels = model.flows["large"].labels.clone();
    let (last, value) = labels.last().unwrap();
    assert!(last.starts_with("large-03"), "{last}");
    let mut few = user(&mut c, &srv, "fewlabels", FEW_LABELS);
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut few, "large"));
    assert!(e.contains("NOPERM") && e.contains("large-03"), "{e}");
    assert_same(&before, &dump_all(&mut c), "refused by the rights");

    let set = format!("argyll:idx:label:{last}:{value}");
    run(&mut c, &["DEL", &set]);
    run(&mut c, &["SET", &set, "not a set"]);
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut c, "large"));
    assert!(e.contains("expected a set"), "{e}");
    assert_same(&before, &dump_all(&mut c), "refused by the type");
    let object = "flows/large.jsonl.gz";
    assert!(s3.get(object).is_none(), "both refused before the upload");

    run(&mut c, &["DEL", &set]);
    run(&mut c, &["SADD", &set, "flow:large"]);
    archive(&mut c, "large").unwrap();
    checker::check_swept("archived", &srv, &s3, &model, 1);
}

/// DRYRUN checks each flow in one step, as an archive's capture begins it: the label indexes of labels
/// read in that step (up to 1 MiB) are checked, those of a labels hash read on in later steps are not.
/// For a user who may not write some of each flow's label indexes, DRYRUN lists the large one and not
/// the small one; the sweep refuses both under `skipped_noperm`, uploading and deleting nothing.
#[test]
fn dryrun_does_not_check_the_label_indexes_of_a_large_labels_hash() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = Model::new(0);
    model.write_labeled(&mut c, &FlowSpec::done("large"), 3 << 20);
    model.write_labeled(&mut c, &FlowSpec::done("small"), 64 << 10);
    // Every key but the label indexes of the large flow's labels from `large-03000` on, and of every
    // label of the small flow.
    let mut few = user(&mut c, &srv, "fewlabels", FEW_LABELS);
    let before = dump_all(&mut c);
    let dry = sweep(&mut few, &["DRYRUN"]).unwrap();
    let listed: Vec<String> = redis::from_redis_value(&dry["flows"]).unwrap();
    assert_eq!(listed, ["large"], "{dry:?}");
    assert_eq!(int(&dry["skipped_noperm"]), 1, "{dry:?}");
    let summary = sweep(&mut few, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 0, "{summary:?}");
    assert_eq!(int(&summary["skipped_noperm"]), 2, "{summary:?}");
    assert_same(&before, &dump_all(&mut c), "refused by the rights");
    for id in ["large", "small"] {
        assert!(s3.get(&format!("flows/{id}.jsonl.gz")).is_none(), "{id}");
    }
    let tally = checker::check("refused", &srv, &s3, &model, Expect::Either);
    assert_eq!(tally.live, 2);
}

/// What reads nothing of a large snapshot copies nothing of it and follows nothing: a live GET or a
/// FLOWARCHIVE.FLOW by a user who may not read the snapshot key is refused before anything is read,
/// and a DRYRUN sweep judges the flow without copying its snapshot (a folded layout's rules never read
/// it); neither subscribes to a keyspace event nor counts a byte, and the module's heap stays far
/// below the snapshot. Nor do a live read and an archive of a snapshot of exactly 1 MiB, read whole.
/// The first live read of the large one does subscribe (the test can see it).
#[test]
fn what_does_not_read_a_large_snapshot_copies_and_follows_nothing() {
    const LEN: usize = 16 << 20;
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    for (id, len) in [("large", LEN), ("one-step", 1 << 20)] {
        write_padded_flow(&mut c, id, len);
    }
    // Every key of the flow but the snapshot.
    let rules = "~argyll:idx:* ~archived:* %R~argyll:flow:*:events \
                 %R~argyll:flow:*:snapshot:seq %R~argyll:flow:*:idx:labels";
    let mut nosnap = user(&mut c, &srv, "nosnap", rules);

    let rise = heap_rise(&mut c, |_| {
        let e = err_text(get(&mut nosnap, "large"));
        assert!(e.contains("NOPERM") && e.contains("snapshot:val"), "{e}");
        let e = err_text(archive(&mut nosnap, "large"));
        assert!(e.contains("NOPERM"), "{e}");
    });
    assert!(
        rise < (1 << 20),
        "a refused read raised the heap by {rise} bytes"
    );
    let mut dry = Vec::new();
    let rise = heap_rise(&mut c, |c| {
        let summary = sweep(c, &["DRYRUN"]).unwrap();
        dry = match &summary["flows"] {
            redis::Value::Array(flows) => flows.iter().map(text).collect(),
            other => panic!("{other:?}"),
        };
    });
    assert_eq!(dry, ["large", "one-step"]);
    assert!(rise < (1 << 20), "DRYRUN raised the heap by {rise} bytes");
    assert!(get(&mut c, "one-step").unwrap().is_some());
    archive(&mut c, "one-step").unwrap();
    assert_eq!(info_field(&mut c, "keyspace_events_subscribed"), 0);
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 0);
    // Only the reads of the 1 MiB one counted bytes.
    assert!(info_field(&mut c, "buffered_bytes_peak") < (LEN / 4) as i64);
    assert_eq!(
        cmd::<i64>(&mut c, &["LLEN", &events_key("large")]).unwrap(),
        5
    );

    assert!(get(&mut c, "large").unwrap().is_some());
    assert_eq!(info_field(&mut c, "string_events_subscribed"), 1);
}

/// The module's heap rise (INFO `heap_bytes_peak`, which only rises) while `read` runs.
fn heap_rise(c: &mut redis::Connection, read: impl FnOnce(&mut redis::Connection)) -> i64 {
    let before = info_field(c, "heap_bytes_peak");
    read(c);
    info_field(c, "heap_bytes_peak") - before
}

/// A long log answered with `EVENTS` is written to the client from what was read, never copied into
/// reply values first (a copy took as much again as the log, uncounted). A layout served from its
/// snapshot answers a small stored snapshot, so nothing is folded and the reads hold only the log:
/// live, the module's heap rises by what the read counted against `buffer-max-bytes` and little
/// more; archived, by the object and its content and little more. The answers are the log, event for
/// event.
#[test]
fn a_long_log_is_answered_from_what_was_read_not_a_copy() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args
        .extend(["state", "snapshot"].map(String::from));
    let srv = Server::start(opts.clone());
    let mut c = srv.conn();
    let id = "long";
    write_flow(
        &mut c,
        &FlowSpec {
            events: 20_000,
            ..FlowSpec::done(id)
        },
    );
    let snapshot = format!("{{\"id\":\"{id}\",\"status\":\"completed\"}}");
    cmd::<()>(&mut c, &["SET", &snapshot_key(id), &snapshot]).unwrap();
    let log = lrange(&mut c, &events_key(id));
    let bytes = live_bytes(&mut c, id) as i64;
    assert!(bytes > 2 << 20, "{bytes}");
    // Room for the threads' small buffers; a second copy of the log does not fit in it.
    let slack = bytes / 4;

    let mut answered = (String::new(), Vec::new());
    let rise = heap_rise(&mut c, |c| answered = get_events(c, id).unwrap());
    assert_eq!(answered, (snapshot.clone(), log.clone()), "live");
    let counted = info_field(&mut c, "buffered_bytes_peak");
    assert!(counted >= bytes, "{counted} < {bytes}");
    assert!(
        rise <= counted + slack,
        "live: the heap rose by {rise} bytes, the read counted {counted}"
    );

    archive(&mut c, id).unwrap();
    let location = common::index::location(&mut c, id).expect("indexed");
    // A second server over the same bucket, whose heap has held nothing of the flow, reads it with no
    // cache (the cache would hold a third copy on purpose).
    let reader = Server::start(opts);
    let mut r = reader.conn();
    config_set(&mut r, "flowarchive.cache-bytes", "0").unwrap();
    cmd::<()>(&mut r, &["HSET", common::index::INDEX, id, &location]).unwrap();
    let rel = location
        .strip_prefix(&s3.location(""))
        .expect("under the test's prefix");
    let object = s3.get(rel).expect("the object");
    let rise = heap_rise(&mut r, |r| answered = get_events(r, id).unwrap());
    assert_eq!(answered.1, log, "archived");
    let held = object.len() as i64 + bytes;
    assert!(
        rise <= held + slack,
        "archived: the heap rose by {rise} bytes for an object of {} bytes and {bytes} of content",
        object.len()
    );
}

/// ACL users for the reads below: each may read the keys named by `rules` (read-only) and run every
/// command.
fn readers(admin: &mut redis::Connection, users: &[(&str, &str)]) {
    for (name, rules) in users {
        let mut args = vec!["ACL", "SETUSER", name, "reset", "on", ">pw", "+@all"];
        args.extend(rules.split_whitespace());
        cmd::<()>(admin, &args).unwrap();
    }
}

/// A live `GET … EVENTS` of a short log of large events, read by a read worker in steps, is allowed
/// exactly as one the command reads itself (a small flow): a user who may not read the flow's keys, or
/// may read its log but not its snapshot or sequence (the fold reads all three), is refused with
/// NOPERM naming the key and gets no event; a user who may read exactly those keys gets every event.
/// Under `state snapshot` (the stored snapshot answered, and the log) alike, where the sequence is not
/// read: the snapshot and the log are needed.
#[test]
fn a_stepped_live_read_checks_rights_as_one_in_the_command() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let (wide_state, wide_log) = wide(&mut c, "wide", 40, 32 << 10);
    let small = FlowSpec::done("small");
    write_flow(&mut c, &small);
    let key = |part: &str| format!("%R~argyll:flow:*:{part}");
    let (events, val, seq) = (key("events"), key("snapshot:val"), key("snapshot:seq"));
    readers(
        &mut c,
        &[
            ("outsider", "~other:*"),
            ("log-only", &events),
            ("no-snapshot", &format!("{events} {seq}")),
            ("no-seq", &format!("{events} {val}")),
            ("exact", &format!("{events} {val} {seq}")),
        ],
    );
    let refused = [
        ("outsider", "events"),
        ("log-only", "snapshot:val"),
        ("no-snapshot", "snapshot:val"),
        ("no-seq", "snapshot:seq"),
    ];
    for (user, missing) in refused {
        let mut r = conn_as(&srv, user);
        for id in ["small", "wide"] {
            let e = refusal(get_events(&mut r, id));
            assert!(
                e.starts_with("NOPERM") && e.contains(&format!("argyll:flow:{id}:{missing}")),
                "{user} reading {id}: {e}"
            );
            assert!(!leaks(&e), "{user} reading {id}: event bytes in {e}");
        }
    }
    let mut r = conn_as(&srv, "exact");
    assert_eq!(
        get_events(&mut r, "small").unwrap(),
        (state_json(&small), events_of(&small))
    );
    let before = steps(&mut c);
    let read = get_events(&mut r, "wide").unwrap();
    assert_read(&read, &(wide_state, wide_log), "exact reading wide");
    assert!(
        steps(&mut c) - before >= 3,
        "the wide log was not read in steps"
    );

    let srv = server_via(&s3, None, &["state", "snapshot"]);
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let logs = small_and_wide(&mut c);
    readers(
        &mut c,
        &[
            ("log-only", &events),
            ("snapshot-only", &val),
            ("exact", &format!("{events} {val}")),
        ],
    );
    for (user, missing) in [("log-only", "snapshot:val"), ("snapshot-only", "events")] {
        let mut r = conn_as(&srv, user);
        for id in ["small", "wide"] {
            let e = refusal(get_events(&mut r, id));
            assert!(
                e.starts_with("NOPERM") && e.contains(&format!("argyll:flow:{id}:{missing}")),
                "{user} reading {id} (state snapshot): {e}"
            );
            assert!(!leaks(&e), "{user} reading {id}: event bytes in {e}");
        }
    }
    let mut r = conn_as(&srv, "exact");
    for id in ["small", "wide"] {
        let before = steps(&mut c);
        let read = get_events(&mut r, id).unwrap();
        assert_read(
            &read,
            &logs[id],
            &format!("exact reading {id} (state snapshot)"),
        );
        let stepped = steps(&mut c) - before >= 3;
        assert_eq!(stepped, id == "wide", "{id} read in steps: {stepped}");
    }
}

/// Two finished flows with a current snapshot: `small` as written, `wide` with 40 events of 32 KiB
/// more (read in steps); each id's snapshot and event log.
fn small_and_wide(
    c: &mut redis::Connection,
) -> std::collections::HashMap<&'static str, (String, Vec<String>)> {
    let mut logs = std::collections::HashMap::new();
    for id in ["small", "wide"] {
        let spec = FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done(id)
        };
        write_flow(c, &spec);
        let log = match id {
            "wide" => widen(c, id, 40, 32 << 10),
            _ => events_of(&spec),
        };
        logs.insert(id, (snapshot_of(&spec).unwrap().0, log));
    }
    logs
}

/// Under `state snapshot` a live `GET … EVENTS` reads the snapshot and the log, nothing else: a
/// sequence key the reader may not read, holding no sequence (no number, or another type), neither
/// refuses the read nor shows in its answer, whether the command reads the log itself (a small flow)
/// or a read worker reads it in steps.
#[test]
fn a_live_read_under_state_snapshot_reads_no_sequence() {
    let s3 = S3::new_bucket();
    let srv = server_via(&s3, None, &["state", "snapshot"]);
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let logs = small_and_wide(&mut c);
    let key = |part: &str| format!("%R~argyll:flow:*:{part}");
    readers(
        &mut c,
        &[(
            "exact",
            &format!("{} {}", key("events"), key("snapshot:val")),
        )],
    );
    let mut r = conn_as(&srv, "exact");
    for (what, write) in [
        ("no number", &["SET", "not-a-sequence"][..]),
        ("a list", &["RPUSH", "not-a-sequence"][..]),
    ] {
        for id in ["small", "wide"] {
            let seq = format!("argyll:flow:{id}:snapshot:seq");
            cmd::<()>(&mut c, &["DEL", &seq]).unwrap();
            cmd::<()>(&mut c, &[write[0], &seq, write[1]]).unwrap();
            let read = get_events(&mut r, id);
            let read = read.unwrap_or_else(|e| panic!("{id} with a sequence key of {what}: {e}"));
            assert_read(
                &read,
                &logs[id],
                &format!("{id} with a sequence key of {what}"),
            );
        }
    }
}

/// Rights taken away while a stepped live read is under way refuse it: the read checks them again in
/// every step that reads the flow's keys, as a read in the command checks them in the step that reads
/// them. A read that met them gone after its first chunks answers NOPERM and no event (it once answered
/// every event). Under `state fold` and `state snapshot` alike.
#[test]
fn rights_taken_away_during_a_stepped_live_read_refuse_it() {
    let s3 = S3::new_bucket();
    for state in ["fold", "snapshot"] {
        let mut opts = ServerOpts::new(&s3);
        opts.module_args.extend(["state", state].map(String::from));
        let srv = Server::start(opts);
        let mut c = srv.conn();
        config_set(&mut c, BUDGET, "50").unwrap();
        let spec = FlowSpec {
            snapshot: Snapshot::Current,
            ..FlowSpec::done("guarded")
        };
        write_flow(&mut c, &spec);
        widen(&mut c, "guarded", MANY_STEPS.0, MANY_STEPS.1);
        let mut landed = 0;
        for _ in 0..5 {
            readers(&mut c, &[("reader", "%R~argyll:flow:guarded:*")]);
            let mut r = conn_as(&srv, "reader");
            let calm = get_events(&mut r, "guarded").unwrap();
            assert_eq!(calm.1.len(), MANY_STEPS.0 + 5, "{state}");
            let (answer, stepped_after) = amid(
                &mut c,
                r,
                |r| get_events(r, "guarded"),
                |c| cmd::<()>(c, &["ACL", "SETUSER", "reader", "resetkeys"]).unwrap(),
            );
            // Refused, the read met the change: it had its rights before. Answered, it read on after
            // the change if it took another step.
            if answer.is_ok() && !stepped_after {
                continue;
            }
            landed += 1;
            let e = refusal(answer);
            assert!(
                e.starts_with("NOPERM") && e.contains("argyll:flow:guarded:"),
                "{state}: {e}"
            );
            assert!(!leaks(&e), "{state}: event bytes in {e}");
        }
        assert!(
            landed > 0,
            "{state}: the rights were never taken away mid-read"
        );
    }
}

/// A write to a short log of large events while a live read of it is under way.
struct Write {
    name: &'static str,
    /// Applies it to the log at the key given, which holds the log given.
    apply: fn(&mut redis::Connection, &str, &[String]),
    /// What it makes of the log; `None` when the log is gone.
    then: fn(&[String]) -> Option<Vec<String>>,
}

/// Another event of the same size as the blob `e`.
fn edited(e: &str, by: &str) -> String {
    e.replacen('x', by, 1)
}

const WRITES: [Write; 4] = [
    Write {
        name: "rpush",
        apply: |c, key, _| run(c, &["RPUSH", key, "{\"late\":1}"]),
        then: |l| Some([l, &["{\"late\":1}".to_string()]].concat()),
    },
    Write {
        // An event the read has taken and one it has not, in one transaction.
        name: "lset-read-and-unread",
        apply: |c, key, l| {
            let last = MANY_STEPS.0;
            let mut tx = redis::pipe();
            tx.atomic();
            tx.cmd("LSET").arg(key).arg(1).arg(edited(&l[1], "a"));
            tx.cmd("LSET").arg(key).arg(last).arg(edited(&l[last], "b"));
            tx.query::<()>(c).unwrap();
        },
        then: |l| {
            let mut l = l.to_vec();
            l[1] = edited(&l[1], "a");
            l[MANY_STEPS.0] = edited(&l[MANY_STEPS.0], "b");
            Some(l)
        },
    },
    Write {
        name: "del",
        apply: |c, key, _| run(c, &["DEL", key]),
        then: |_| None,
    },
    Write {
        // Deleted and written again at once, as many events, every blob another.
        name: "replaced",
        apply: |c, key, l| {
            let mut tx = redis::pipe();
            tx.atomic();
            tx.cmd("DEL").arg(key);
            tx.cmd("RPUSH").arg(key).arg(replaced(l));
            tx.query::<()>(c).unwrap();
        },
        then: |l| Some(replaced(l)),
    },
];

/// The log with every blob replaced by a small one (as many events, quick to write).
fn replaced(l: &[String]) -> Vec<String> {
    l.iter()
        .map(|e| match e.starts_with("{\"blob\"") {
            true => blob(16),
            false => e.clone(),
        })
        .collect()
}

/// A write during a stepped live read of a short log of large events (an event appended; one event the
/// read has taken and one it has not rewritten in one transaction; the log deleted; the log deleted and
/// written again as long): the read follows the log from its first step, so one that meets the write
/// starts again and answers the log as written, whole, or, the log gone, says so; never the first
/// chunks of one log with the later ones of another. Each write lands once the read has taken its
/// first chunk (its first MiB, where the event rewritten first lies); an attempt where it came after
/// the read's last step must answer the log before or after it, whole, and is made again.
#[test]
fn a_write_during_a_stepped_live_read_restarts_it_or_fails_it() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    for write in &WRITES {
        let id = format!("written-{}", write.name);
        let key = events_key(&id);
        let mut met = false;
        for _ in 0..5 {
            run(&mut c, &["DEL", &key]);
            let (state, log) = wide(&mut c, &id, MANY_STEPS.0, MANY_STEPS.1);
            let then = (write.then)(&log).map(|l| (state_of(&l).unwrap(), l));
            let before = (state, log);
            let (answer, stepped_after) = amid(
                &mut c,
                srv.conn(),
                {
                    let id = id.clone();
                    move |r| get_events(r, &id)
                },
                |c| (write.apply)(c, &key, &before.1),
            );
            let what = format!(
                "{} ({})",
                write.name,
                if stepped_after { "mid-read" } else { "late" }
            );
            let read = match answer {
                Ok(read) => read,
                Err(e) => {
                    let e = e.to_string();
                    let gone = e.contains("was archived or removed while it was read; retry");
                    assert!(then.is_none() && gone, "{what}: {e}");
                    // The read began with the log there: it met the write.
                    met = true;
                    break;
                }
            };
            // Begun before the write, a read that answers the log as written met it.
            if then.as_ref() == Some(&read) {
                met = true;
                break;
            }
            match (&then, stepped_after) {
                (Some(then), true) => assert_read(&read, then, &what),
                (None, true) => panic!("{what}: answered {} events of a deleted log", read.1.len()),
                // Came after the read's last step: the log before the write, whole.
                (_, false) => assert_read(&read, &before, &what),
            }
        }
        assert!(met, "{}: never written mid-read", write.name);
    }
}

/// Writes a completed flow `id` into `model`, widened with `blobs` events of `MANY_STEPS`' size to a
/// short log of large events read in steps.
fn write_wide(c: &mut redis::Connection, model: &mut Model, id: &str, blobs: usize) {
    write(c, model, id, 5);
    model.widen(c, id, blobs, MANY_STEPS.1);
}

/// Large events of a flow archived in some ten steps (2.4 MB), quick to upload.
const FEW: usize = 60;

fn repl_offset(c: &mut redis::Connection) -> String {
    checker::repl_field(c, "master_repl_offset")
}

/// `CLIENT PAUSE WRITE` and `CLIENT PAUSE ALL` in the middle of a stepped live read of a short log of
/// large events, and of a stepped capture of one. Under a write pause the server answers at once and
/// the read answers every event before the pause ends (a read writes nothing); under a pause of all
/// clients the read answers every event once it may. A capture's commit waits for either pause to end,
/// writing nothing meanwhile, and then archives its flow; the checker finds every flow live or
/// archived with exactly its events.
#[test]
fn client_pause_during_a_stepped_read_or_capture_loses_nothing() {
    use std::time::Instant;
    let s3 = S3::new_bucket();
    let mut srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let mut model = Model::new(0);
    for id in ["read-write", "read-all"] {
        write_wide(&mut c, &mut model, id, MANY_STEPS.0);
    }
    for id in ["flow-write", "flow-all"] {
        write_wide(&mut c, &mut model, id, FEW);
    }
    let whole = |id: &str| {
        let flow = &model.flows[id];
        (flow.state().unwrap(), flow.events.clone())
    };
    let pause = |c: &mut redis::Connection, ms: u64, what: &str| {
        cmd::<()>(c, &["CLIENT", "PAUSE", &ms.to_string(), what]).unwrap();
        Instant::now()
    };

    // Reads. A write pause: the read goes on and answers long before the pause ends (it lasts until
    // the UNPAUSE below).
    let mut paused = None;
    let ((read, answered), _) = amid(
        &mut c,
        srv.conn(),
        |r| (get_events(r, "read-write"), Instant::now()),
        |c| {
            paused = Some(pause(c, 60_000, "WRITE"));
            assert_eq!(cmd::<String>(c, &["PING"]).unwrap(), "PONG");
        },
    );
    let paused = paused.unwrap();
    assert_read(
        &read.unwrap(),
        &whole("read-write"),
        "read during a write pause",
    );
    assert!(
        answered.duration_since(paused) < Duration::from_secs(30),
        "the read waited {:?} for the write pause to end",
        answered.duration_since(paused)
    );
    cmd::<()>(&mut c, &["CLIENT", "UNPAUSE"]).unwrap();
    // A pause of all clients, the read still under way when it began.
    let mut paused = None;
    let ((read, answered), _) = amid(
        &mut c,
        srv.conn(),
        |r| (get_events(r, "read-all"), Instant::now()),
        |c| paused = Some(pause(c, 800, "ALL")),
    );
    assert!(
        answered > paused.unwrap(),
        "the read ended before the pause"
    );
    assert_read(
        &read.unwrap(),
        &whole("read-all"),
        "read during a pause of all",
    );
    assert_alive(&mut srv, "after the reads");

    // Captures: each uploads during the pause; its commit waits for the pause to end, writing
    // nothing meanwhile (ended at once for writes, after its 8 s for all clients).
    for (id, what) in [("flow-write", "WRITE"), ("flow-all", "ALL")] {
        let object = format!("flows/{id}.jsonl.gz");
        let mut resumed = None;
        let ((archived, done), _) = amid(
            &mut c,
            srv.conn(),
            move |r| (archive(r, id), Instant::now()),
            |c| {
                let (offset, committed) = (repl_offset(c), info_field(c, "flows_archived"));
                // A write pause lasts until the UNPAUSE below, however late this thread runs; one of
                // all clients ends on its own (no command is served meanwhile), not before
                // `sent` + 8 s.
                let sent = Instant::now();
                let ms = if what == "WRITE" { 60_000 } else { 8000 };
                pause(c, ms, what);
                wait_for("the upload", Duration::from_millis(ms - 500), || {
                    s3.get(&object).is_some()
                });
                // The commit is tried meanwhile.
                std::thread::sleep(Duration::from_millis(200));
                resumed = Some(match what {
                    "WRITE" => {
                        assert_eq!(repl_offset(c), offset, "{id}: written while paused");
                        assert_eq!(info_field(c, "flows_archived"), committed, "{id}");
                        cmd::<()>(c, &["CLIENT", "UNPAUSE"]).unwrap();
                        Instant::now()
                    }
                    _ => sent + Duration::from_millis(ms),
                });
            },
        );
        let archived = archived.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(int(&archived["events"]), FEW as i64 + 5, "{id}");
        assert!(done >= resumed.unwrap(), "{id}: committed during the pause");
        assert_alive(&mut srv, id);
    }
    let tally = checker::check("after the pauses", &srv, &s3, &model, Expect::Either);
    assert_eq!((tally.live, tally.archived), (2, 2));
}

/// `MODULE UNLOAD`'s answer when the server refuses it for the module's blocked clients (a GET or
/// FLOW waiting for its worker), before the module is asked.
const BLOCKED_CLIENTS: &str = "the module has blocked clients";

/// `MODULE UNLOAD` while a stepped live read of a short log of large events is under way, while a
/// FLOW's stepped capture of one is and while its upload is held back, and while a sweep captures and
/// uploads such flows: refused each time (for a GET or FLOW by the server, whose clients wait on the
/// module; for the sweep, which no client waits on, by the module itself). The read answers every
/// event, each archive commits; the checker finds every flow archived with exactly its events. Idle
/// again, the module unloads.
#[test]
fn module_unload_is_refused_during_a_stepped_read_or_capture() {
    let s3 = S3::new_bucket();
    let proxy = common::proxy::Proxy::start(s3_port());
    let mut opts = ServerOpts::new(&s3);
    opts.module_args = s3.module_args(&proxy.endpoint());
    opts.extra = ["--enable-module-command", "yes"]
        .map(String::from)
        .to_vec();
    let mut srv = Server::start(opts);
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    let mut model = Model::new(0);
    let swept = ["swept-0", "swept-1", "swept-2"];
    write_wide(&mut c, &mut model, "read", MANY_STEPS.0);
    for id in ["captured", "held"].iter().chain(&swept) {
        write_wide(&mut c, &mut model, id, FEW);
    }
    let refused = |c: &mut redis::Connection, what: &str, why: &str| {
        let e = err_text(cmd::<()>(c, &["MODULE", "UNLOAD", "flowarchive"]));
        assert!(
            e.contains("Error unloading module") && e.contains(why),
            "{what}: {e}"
        );
    };

    let flow = &model.flows["read"];
    let whole = (flow.state().unwrap(), flow.events.clone());
    let mut met = false;
    for _ in 0..5 {
        let (read, stepped_after) = amid(
            &mut c,
            srv.conn(),
            |r| get_events(r, "read"),
            |c| refused(c, "a stepped read", BLOCKED_CLIENTS),
        );
        assert_read(&read.unwrap(), &whole, "the read");
        if stepped_after {
            met = true;
            break;
        }
    }
    assert!(met, "every unload came after the read's last step");

    let (archived, _) = amid(
        &mut c,
        srv.conn(),
        |r| archive(r, "captured"),
        |c| refused(c, "a stepped capture", BLOCKED_CLIENTS),
    );
    assert_eq!(int(&archived.unwrap()["events"]), FEW as i64 + 5);

    proxy.hold("PUT");
    let mut other = srv.conn();
    let held = std::thread::spawn(move || archive(&mut other, "held"));
    wait_for("the PUT held", Duration::from_secs(120), || {
        proxy.gated() > 0
    });
    refused(&mut c, "an upload held back", BLOCKED_CLIENTS);
    proxy.release();
    let archived = held.join().unwrap();
    assert_eq!(int(&archived.unwrap()["events"]), FEW as i64 + 5);

    // A sweep: its captures in steps, then its uploads held back until the unloads are done.
    proxy.hold("PUT");
    let before = steps(&mut c);
    assert_eq!(sweep_async(&mut c).unwrap(), "STARTED");
    wait_for("the sweep's capture steps", Duration::from_secs(20), || {
        steps(&mut c) >= before + 2
    });
    let refusals = |srv: &Server| srv.log().matches("MODULE UNLOAD refused").count();
    for what in ["the sweep's captures", "the sweep's uploads"] {
        if what.ends_with("uploads") {
            wait_for("a PUT of the sweep held", Duration::from_secs(120), || {
                proxy.gated() > 0
            });
        }
        let running = info_field(&mut c, "sweep_running") == 1;
        assert!(running, "{what}: the sweep ended");
        // The server itself refuses while a step's timer is pending: asked again until the module
        // is asked, and refuses.
        let logged = refusals(&srv);
        let mut tries = 0;
        while refusals(&srv) == logged {
            tries += 1;
            assert!(tries < 100, "{what}: the module was never asked");
            let e = err_text(cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]));
            assert!(e.contains("Error unloading module"), "{what}: {e}");
        }
    }
    proxy.release();
    wait_for("the sweep to end", Duration::from_secs(60), || {
        info_field(&mut c, "sweep_running") == 0
    });
    assert_alive(&mut srv, "after the unloads");
    let tally = checker::check("after the unloads", &srv, &s3, &model, Expect::Either);
    assert_eq!(tally.archived, model.flows.len());
    wait_for("the unload, idle", Duration::from_secs(10), || {
        cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]).is_ok()
    });
}

/// `read-max-bytes` lowered below a labels hash of 4 MiB between the later steps of reading it, with
/// `step-budget-us` set to its largest value in the middle of a FLOWARCHIVE.FLOW and to its smallest
/// in the middle of a sweep: each capture keeps the cap it began with, so each archive holds every
/// label (the checker compares them label for label with the live ones) and every byte is released;
/// a capture begun under the lowered cap is refused by it, the flow kept whole.
#[test]
fn settings_changed_between_the_steps_of_reading_a_large_labels_hash_leave_it_its_own() {
    let s3 = S3::new_bucket();
    let mut srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = Model::new(0);
    for id in ["flowed", "refused", "swept"] {
        model.write_labeled(&mut c, &FlowSpec::done(id), 4 << 20);
    }
    let settings = |c: &mut redis::Connection, read_max: &str, budget: &str| {
        config_set(c, "flowarchive.read-max-bytes", read_max).unwrap();
        config_set(c, BUDGET, budget).unwrap();
    };

    // FLOW, begun at the smallest budget, given a cap of 1 MiB and the largest budget.
    settings(&mut c, "64mb", "50");
    let (answer, mid) = amid(
        &mut c,
        srv.conn(),
        |c| archive(c, "flowed"),
        |c| settings(c, "1mb", "100000"),
    );
    assert_eq!(int(&answer.unwrap()["events"]), 5);
    assert!(mid, "the settings changed after the last step");
    assert_eq!(info_field(&mut c, "hash_events_subscribed"), 1, "in steps");
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "released");

    // Begun under the lowered cap: refused by it, nothing touched.
    let before = dump_all(&mut c);
    let e = err_text(archive(&mut c, "refused"));
    assert!(
        e.contains("larger than flowarchive.read-max-bytes (1048576 bytes)"),
        "{e}"
    );
    assert_same(
        &before,
        &dump_all(&mut c),
        "refused by the cap it began with",
    );
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "released");

    // A sweep, begun under the default cap and a middling budget, given a cap of 1 MiB and the
    // smallest budget.
    settings(&mut c, "64mb", "200");
    let (summary, mid) = amid(
        &mut c,
        srv.conn(),
        |c| sweep(c, &[]),
        |c| settings(c, "1mb", "50"),
    );
    let summary = summary.unwrap();
    assert_eq!(int(&summary["archived"]), 2, "{summary:?}");
    assert_eq!(int(&summary["failed"]), 0, "{summary:?}");
    assert!(mid, "the settings changed after the sweep's last step");
    wait_for("every byte released", Duration::from_secs(10), || {
        info_field(&mut c, "buffered_bytes") == 0
    });
    assert_alive(&mut srv, "after the changes");
    // Read back under a cap that takes them (the 1 MiB one refuses each archive's read).
    settings(&mut c, "64mb", "250");
    checker::check_swept("archived", &srv, &s3, &model, 3);
}

/// A labels hash that alone passes `read-max-bytes` (4 MiB under a cap of 3 MiB; its events, snapshot
/// and sequence a few hundred bytes) is refused by FLOWARCHIVE.FLOW and by a sweep in a later step of
/// its read, with a short error naming the cap, the module's heap rising by the cap and a little;
/// one of 2 MiB passes the capture's cap but not the read-back's (which counts the trailer, where the
/// labels are, once more: the state answered), so it is refused before its upload. Nothing is
/// uploaded or deleted of either, every byte is released, while a flow whose labels hash of 1.25 MiB
/// is read in steps is archived beside them. A live GET reads no labels, so it answers the refused
/// flows' state as the engine would. DRYRUN, which reads 1 MiB of a labels hash, lists all three.
#[test]
fn labels_that_alone_pass_read_max_bytes_refuse_the_archive_and_keep_the_flow_whole() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    config_set(&mut c, BUDGET, "50").unwrap();
    config_set(&mut c, "flowarchive.read-max-bytes", "3mb").unwrap();
    let mut model = Model::new(0);
    model.write_labeled(&mut c, &FlowSpec::done("over"), 4 << 20);
    model.write_labeled(&mut c, &FlowSpec::done("read-back"), 2 << 20);
    model.write_labeled(&mut c, &FlowSpec::done("within"), 5 << 18);
    let before = dump_all(&mut c);
    let peak = info_field(&mut c, "heap_bytes_peak");
    let (refused, taken) = stepped(&mut c, |c| archive(c, "over"));
    let rise = info_field(&mut c, "heap_bytes_peak") - peak;
    assert!(
        rise < (4 << 20),
        "the module's heap rose {rise} bytes, past the cap"
    );
    let e = err_text(refused);
    assert!(
        e.contains("larger than flowarchive.read-max-bytes (3145728 bytes)") && e.contains("over"),
        "{e}"
    );
    assert!(e.len() <= 600, "{} bytes: {e}", e.len());
    assert!(
        taken >= 2,
        "refused after {taken} steps, not in a later one"
    );
    let e = err_text(archive(&mut c, "read-back"));
    assert!(
        e.contains("does not read back") && e.contains("exceed the read cap"),
        "{e}"
    );
    assert!(e.len() <= 600, "{} bytes: {e}", e.len());
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "released");
    assert_same(&before, &dump_all(&mut c), "refused by the cap");
    for id in ["over", "read-back"] {
        let live = get(&mut c, id).unwrap();
        assert_eq!(live.as_ref(), model.flows[id].state().as_ref(), "{id}");
    }

    // DRYRUN judges each flow in the one step a capture begins with, which reads 1 MiB of labels:
    // it lists all three, and the sweep refuses two.
    let dry = sweep(&mut c, &["DRYRUN"]).unwrap();
    let mut listed: Vec<String> = redis::from_redis_value(&dry["flows"]).unwrap();
    listed.sort();
    assert_eq!(listed, ["over", "read-back", "within"], "{dry:?}");
    let summary = sweep(&mut c, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 1, "{summary:?}");
    assert_eq!(int(&summary["failed"]), 2, "{summary:?}");
    let reasons = reply_map(summary["failed_by_reason"].clone());
    assert_eq!(int(&reasons["unreadable"]), 2, "{summary:?}");
    assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "released");
    for id in ["over", "read-back"] {
        let object = format!("flows/{id}.jsonl.gz");
        assert!(s3.get(&object).is_none(), "{id}: nothing uploaded");
    }
    let tally = checker::check("two refused", &srv, &s3, &model, Expect::Either);
    assert_eq!((tally.archived, tally.live), (1, 2));
}

/// An archived flow whose labels (3 MiB, in the object's trailer) pass `read-max-bytes` once it is
/// lowered to 2 MiB after the archive: a GET, with or without EVENTS, read by a server that never held
/// the flow (the bucket's object through a copy of its index entry), is refused with a short error
/// naming the cap and the flow, never a partial state, and the module's heap rises by no more than
/// the cap and a little; raised again, the same object is answered whole.
#[test]
fn an_archived_trailer_past_a_lowered_read_max_bytes_is_refused_in_bounded_memory() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = Model::new(0);
    model.write_labeled(&mut c, &FlowSpec::done("trailer"), 3 << 20);
    let live = model.flows["trailer"].state().unwrap();
    assert_eq!(int(&archive(&mut c, "trailer").unwrap()["events"]), 5);
    let entry: String = cmd(&mut c, &["HGET", "archived:flows", "trailer"]).unwrap();
    let object = s3.get("flows/trailer.jsonl.gz").unwrap();
    assert!(
        gunzip(&object).len() > 3 << 20,
        "the labels are in the object"
    );

    let reader = Server::start(ServerOpts::new(&s3));
    let mut r = reader.conn();
    run(&mut r, &["HSET", "archived:flows", "trailer", &entry]);
    config_set(&mut r, "flowarchive.read-max-bytes", "2mb").unwrap();
    let rise = heap_rise(&mut r, |r| {
        let e = err_text(get(r, "trailer"));
        assert!(
            e.contains("read cap of 2097152 bytes") && e.contains("trailer"),
            "{e}"
        );
        assert!(e.len() <= 600, "{} bytes: {e}", e.len());
        let e = refusal(get_events(r, "trailer"));
        assert!(e.contains("read cap of 2097152 bytes"), "{e}");
    });
    assert!(rise < (2 << 20) + (1 << 20), "the heap rose {rise} bytes");
    assert_eq!(info_field(&mut r, "buffered_bytes"), 0, "released");

    config_set(&mut r, "flowarchive.read-max-bytes", "64mb").unwrap();
    assert_eq!(get(&mut r, "trailer").unwrap(), Some(archived_state(&live)));
    let (_, events) = get_events(&mut r, "trailer").unwrap();
    assert_eq!(events, model.flows["trailer"].events);
}

/// A user who may read and write a flow's own keys, its labels hash among them, its status entries and
/// the archive index, but may only read (or only write) its label indexes, cannot archive a flow whose
/// labels hash of 3 MiB is read in steps, nor one whose labels are read at once: the commit would
/// remove the flow from indexes it may not remove from. FLOWARCHIVE.FLOW answers NOPERM naming a label
/// index and the sweep counts each under `skipped_noperm`; nothing is uploaded or deleted. With full
/// rights on the label indexes the same user archives both.
#[test]
fn label_indexes_the_caller_may_only_read_or_only_write_refuse_the_archive() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    let mut model = Model::new(0);
    model.write_labeled(&mut c, &FlowSpec::done("large"), 3 << 20);
    model.write_labeled(&mut c, &FlowSpec::done("small"), 64 << 10);
    let rest = "~argyll:flow:* ~archived:* ~argyll:idx:status* %R~argyll:archive:lease:*";
    for (name, labels) in [
        ("readlabels", "%R~argyll:idx:label:*"),
        ("writelabels", "%W~argyll:idx:label:*"),
    ] {
        let mut few = user(&mut c, &srv, name, &format!("{rest} {labels}"));
        let before = dump_all(&mut c);
        for id in ["large", "small"] {
            let e = err_text(archive(&mut few, id));
            assert!(
                e.contains("NOPERM") && e.contains(&format!("argyll:idx:label:{id}-")),
                "{name} {id}: {e}"
            );
        }
        let summary = sweep(&mut few, &[]).unwrap();
        assert_eq!(int(&summary["archived"]), 0, "{name}: {summary:?}");
        assert_eq!(int(&summary["skipped_noperm"]), 2, "{name}: {summary:?}");
        assert_same(&before, &dump_all(&mut c), name);
        assert_eq!(info_field(&mut c, "buffered_bytes"), 0, "{name}");
        for id in ["large", "small"] {
            assert!(
                s3.get(&format!("flows/{id}.jsonl.gz")).is_none(),
                "{name} {id}"
            );
        }
    }
    let tally = checker::check("refused", &srv, &s3, &model, Expect::Either);
    assert_eq!(tally.live, 2);

    run(
        &mut c,
        &["ACL", "SETUSER", "readlabels", "~argyll:idx:label:*"],
    );
    let mut full = conn_as(&srv, "readlabels");
    let summary = sweep(&mut full, &[]).unwrap();
    assert_eq!(int(&summary["archived"]), 2, "{summary:?}");
    checker::check_swept("archived", &srv, &s3, &model, 2);
}
