//! "Nothing lost", proven flow by flow and event by event.
//!
//! A chaos test keeps a [`Model`]: for every flow it wrote, the exact event list (late events
//! included), snapshot (if any), sequence, labels, status and score, updated whenever the test changes
//! the flow. [`check`] then holds every flow of the model against the server and the bucket: a flow is
//! either LIVE (all its keys exactly as modelled, its status and label index entries present, no
//! archive index entry, `FLOWARCHIVE.GET` answering the engine's state of its events) or ARCHIVED (none
//! of its keys, no index entries of the engine, an archive index entry whose object holds exactly the
//! modelled events, snapshot and state, and `FLOWARCHIVE.GET` answering that state marked archived and
//! those events). Anything else is a lost or damaged flow, reported by id with what differs. Counts are
//! never trusted: a count can match while the content is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::index::{self, INDEX};
use super::{
    add_labels, assert_same, blob, cmd, dump_all, escape_label, event_json, events_of, gunzip,
    labels_of, parse_ms, set_padded_snapshot, snapshot_of, state_of, wait_for, widen, write_flow,
    FlowSpec, Server, Snapshot, S3,
};

const P: &str = "argyll";
/// Every status a model flow can have (so a leftover entry under another status is found too).
pub const STATUSES: [&str; 3] = ["active", "completed", "failed"];
const TERMINAL: [&str; 2] = ["completed", "failed"];
/// Problems listed in a failure message before the rest are only counted.
const SHOWN: usize = 20;

/// Deterministic xorshift64: a failing chaos run replays exactly with the same seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// What the test knows one flow holds.
#[derive(Clone, Debug)]
pub struct FlowModel {
    pub id: String,
    pub status: String,
    pub last_ms: i64,
    pub events: Vec<String>,
    /// The stored snapshot and sequence, if the flow has them.
    pub snapshot: Option<String>,
    pub seq: Option<String>,
    /// The labels hash as the engine stores it (escaped names and values).
    pub labels: Vec<(String, String)>,
    /// Events of the older compact form.
    pub compact_events: bool,
}

impl FlowModel {
    fn member(&self) -> String {
        format!("flow:{}", self.id)
    }

    fn key(&self, part: &str) -> String {
        format!("{P}:flow:{}:{part}", self.id)
    }

    /// Terminal and idle longer than `retention_ms` at `now_ms`, idle since the later of its status
    /// change and its last event: what a fault-free sweep archives.
    pub fn eligible(&self, retention_ms: i64, now_ms: i64) -> bool {
        let last_event = self
            .events
            .last()
            .and_then(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .and_then(|e| e["timestamp"].as_str().map(parse_ms))
            .unwrap_or(i64::MIN);
        TERMINAL.contains(&self.status.as_str())
            && self.last_ms.max(last_event) < now_ms - retention_ms
    }

    /// What the engine answers for this flow (the fold of its events).
    pub fn state(&self) -> Option<String> {
        state_of(&self.events)
    }
}

/// The flows of one DB, as the test wrote and changed them.
pub struct Model {
    pub db: i64,
    pub flows: BTreeMap<String, FlowModel>,
}

/// Moves a live flow to another status and score in the engine's indexes, in one atomic step.
const RESTATUS_IF_LIVE: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
     redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) \
     redis.call('ZREM', KEYS[3], ARGV[1]) \
     redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1]) \
     return 1";

impl Model {
    pub fn new(db: i64) -> Model {
        Model {
            db,
            flows: BTreeMap::new(),
        }
    }

    /// `write`s `spec` (a flow with a snapshot), then pads its snapshot to exactly `len` bytes
    /// (`set_padded_snapshot`) and records it; the snapshot.
    pub fn write_padded(
        &mut self,
        c: &mut redis::Connection,
        spec: &FlowSpec,
        len: usize,
    ) -> String {
        self.write(c, spec);
        let snapshot = set_padded_snapshot(c, spec.id, len);
        if let Some(flow) = self.flows.get_mut(spec.id) {
            flow.snapshot = Some(snapshot.clone());
        }
        snapshot
    }

    /// `write`s `spec` without labels, then gives it a labels hash of exactly `bytes` bytes
    /// (`labels_of`, named after the flow: no two flows share a label), indexed as the engine indexes
    /// labels, and records it. Its events carry none of them, so its log stays short whatever `bytes`
    /// is.
    pub fn write_labeled(&mut self, c: &mut redis::Connection, spec: &FlowSpec, bytes: usize) {
        self.write(
            c,
            &FlowSpec {
                labels: &[],
                ..spec.clone()
            },
        );
        let labels = labels_of(&format!("{}-", spec.id), bytes);
        self.add_labels(c, spec.id, &labels);
    }

    /// Adds `labels` (names and values as the engine is given them) to the written flow `id`'s labels
    /// hash and label indexes (`add_labels`), and records them as stored (escaped).
    pub fn add_labels(&mut self, c: &mut redis::Connection, id: &str, labels: &[(String, String)]) {
        let pairs: Vec<(&str, &str)> = labels.iter().map(|(l, v)| (&l[..], &v[..])).collect();
        let mut pipe = redis::pipe();
        add_labels(&mut pipe, id, &pairs);
        pipe.query::<()>(c).unwrap();
        let stored = &mut self.flows.get_mut(id).expect("written").labels;
        for (l, v) in labels.iter().filter(|(_, v)| !v.is_empty()) {
            let (l, v) = (escape_label(l), escape_label(v));
            match stored.iter_mut().find(|(name, _)| *name == l) {
                Some(label) => label.1 = v,
                None => stored.push((l, v)),
            }
        }
    }

    /// Writes the flow with `write_flow` and records exactly what that wrote.
    pub fn write(&mut self, c: &mut redis::Connection, spec: &FlowSpec) {
        write_flow(c, spec);
        let stored = snapshot_of(spec);
        let flow = FlowModel {
            id: spec.id.to_string(),
            status: spec.status.to_string(),
            last_ms: spec.last_ms,
            events: events_of(spec),
            snapshot: stored.as_ref().map(|(s, _)| s.clone()),
            seq: stored.map(|(_, seq)| seq.to_string()),
            labels: spec
                .labels
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(l, v)| (escape_label(l), escape_label(v)))
                .collect(),
            compact_events: spec.compact_events,
        };
        assert!(
            self.flows.insert(flow.id.clone(), flow).is_none(),
            "model: flow {} written twice",
            spec.id
        );
    }

    /// Appends a late event (RPUSHX) if the flow is still live: a late event for a flow archived
    /// meanwhile would recreate a stray key the engine never writes. True (and recorded) when it was
    /// appended.
    pub fn append_late_event(&mut self, c: &mut redis::Connection, id: &str) -> bool {
        let flow = self.flows.get_mut(id).expect("model flow");
        let spec = FlowSpec {
            id,
            status: &flow.status,
            last_ms: flow.last_ms,
            events: flow.events.len() + 1,
            labels: &[],
            compact_events: flow.compact_events,
            snapshot: Snapshot::None,
        };
        let event = event_json(&spec, flow.events.len());
        let appended: i64 = redis::cmd("RPUSHX")
            .arg(flow.key("events"))
            .arg(&event)
            .query(c)
            .unwrap();
        if appended > 0 {
            flow.events.push(event);
        }
        appended > 0
    }

    /// Moves a still-live flow to `status` with score `last_ms` in the engine's status hash and ZSETs,
    /// atomically; true (and recorded) when the flow was live.
    pub fn set_status(
        &mut self,
        c: &mut redis::Connection,
        id: &str,
        status: &str,
        last_ms: i64,
    ) -> bool {
        let flow = self.flows.get_mut(id).expect("model flow");
        let done: i64 = redis::cmd("EVAL")
            .arg(RESTATUS_IF_LIVE)
            .arg(4)
            .arg(flow.key("events"))
            .arg(format!("{P}:idx:status"))
            .arg(format!("{P}:idx:status:{}", flow.status))
            .arg(format!("{P}:idx:status:{status}"))
            .arg(flow.member())
            .arg(status)
            .arg(last_ms)
            .query(c)
            .unwrap();
        if done == 1 {
            flow.status = status.to_string();
            flow.last_ms = last_ms;
        }
        done == 1
    }

    /// Widens a written flow with `n` events of `bytes` bytes after its first (`widen`), and records
    /// them.
    pub fn widen(&mut self, c: &mut redis::Connection, id: &str, n: usize, bytes: usize) {
        let flow = self.flows.get_mut(id).expect("model flow");
        let wide = std::iter::repeat_n(blob(bytes), n);
        flow.events.splice(1..1, wide);
        assert!(
            widen(c, id, n, bytes) == flow.events,
            "model: flow {id} widened to another log"
        );
    }

    pub fn ids(&self) -> Vec<String> {
        self.flows.keys().cloned().collect()
    }
}

/// What [`check`] requires beyond "live or archived, intact".
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// Any flow may be live or archived (the state right after a fault).
    Either,
    /// A fault-free sweep ran last: flows eligible under this retention must be archived, the others
    /// live.
    Settled { retention_ms: i64 },
}

/// How many flows the check found in each state.
#[derive(Debug, Default)]
pub struct Tally {
    pub live: usize,
    pub archived: usize,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Holds every flow of `model` against `srv` and the bucket; panics naming each flow that is lost or
/// differs, and any stray object or index entry.
pub fn check(what: &str, srv: &Server, s3: &S3, model: &Model, expect: Expect) -> Tally {
    try_check(what, srv, s3, model, expect).unwrap_or_else(|findings| panic!("{findings}"))
}

/// [`check`] after a fault-free sweep with no retention window (every terminal flow eligible, so
/// archived, and every other one live), asserting that `archived` flows were found archived.
pub fn check_swept(what: &str, srv: &Server, s3: &S3, model: &Model, archived: usize) {
    let tally = check(what, srv, s3, model, Expect::Settled { retention_ms: 0 });
    assert_eq!(tally.archived, archived, "{what}: flows archived");
}

/// [`check`], answering the findings instead of panicking.
pub fn try_check(
    what: &str,
    srv: &Server,
    s3: &S3,
    model: &Model,
    expect: Expect,
) -> Result<Tally, String> {
    let mut c = srv.conn();
    cmd::<()>(&mut c, &["SELECT", &model.db.to_string()]).unwrap();
    let objects: BTreeSet<String> = s3.list().iter().map(|k| percent_decode(k)).collect();
    assert!(
        objects.len() < 1000,
        "{what}: {} objects; S3::list reads one page of 1000, use fewer flows per bucket",
        objects.len()
    );
    let now = now_ms();
    let mut problems = Vec::new();
    let mut tally = Tally::default();
    let mut archived = BTreeSet::new();
    for flow in model.flows.values() {
        let before = problems.len();
        let state = match flow_state(&mut c, flow) {
            State::Live => {
                tally.live += 1;
                check_live(&mut c, flow, &mut problems);
                "live"
            }
            State::Archived(location) => {
                tally.archived += 1;
                archived.insert(flow.id.clone());
                check_archived(
                    &mut c,
                    s3,
                    &objects,
                    model.db,
                    flow,
                    &location,
                    &mut problems,
                );
                "archived"
            }
            State::Lost => {
                problems.push(format!(
                    "flow {:?}: LOST (none of its keys and no index entry)",
                    flow.id
                ));
                continue;
            }
        };
        if let Expect::Settled { retention_ms } = expect {
            let eligible = flow.eligible(retention_ms, now);
            if eligible != (state == "archived") && problems.len() == before {
                let stored = objects
                    .iter()
                    .find(|o| is_flow_object(o, model.db, &flow.id));
                problems.push(format!(
                    "flow {:?}: {state} after a fault-free sweep, but it is {} (status {}, idle \
                     {}s){}",
                    flow.id,
                    if eligible { "eligible" } else { "not eligible" },
                    flow.status,
                    (now - flow.last_ms) / 1000,
                    match stored {
                        Some(o) if state == "live" => format!("; an object is already at {o:?}"),
                        _ => String::new(),
                    }
                ));
            }
        }
    }
    check_shared_indexes(&mut c, model, &archived, &mut problems);
    for key in &objects {
        if !valid_object_key(key) {
            problems.push(format!("stray object {key:?} (not a flow object key)"));
        }
    }
    if problems.is_empty() {
        return Ok(tally);
    }
    let more = problems.len().saturating_sub(SHOWN);
    Err(format!(
        "{what}: {} problem(s) over {} flows ({} live, {} archived), db {}:\n  {}{}",
        problems.len(),
        model.flows.len(),
        tally.live,
        tally.archived,
        model.db,
        problems[..problems.len().min(SHOWN)]
            .iter()
            .map(|p| clipped(p))
            .collect::<Vec<_>>()
            .join("\n  "),
        if more > 0 {
            format!("\n  ... and {more} more")
        } else {
            String::new()
        }
    ))
}

/// Bytes of one problem shown: a flow of megabytes would otherwise print all of them, twice.
const SHOWN_BYTES: usize = 4000;

/// `problem`, its middle cut out past `SHOWN_BYTES` (where it differs is usually at either end).
fn clipped(problem: &str) -> String {
    if problem.len() <= SHOWN_BYTES {
        return problem.to_string();
    }
    let half = SHOWN_BYTES / 2;
    let head = problem.floor_char_boundary(half);
    let tail = problem.ceil_char_boundary(problem.len() - half);
    let cut = tail - head;
    format!(
        "{} ...({cut} bytes)... {}",
        &problem[..head],
        &problem[tail..]
    )
}

enum State {
    Live,
    Archived(String),
    Lost,
}

fn flow_state(c: &mut redis::Connection, flow: &FlowModel) -> State {
    let keys = [
        flow.key("events"),
        flow.key("snapshot:val"),
        flow.key("snapshot:seq"),
        flow.key("idx:labels"),
    ];
    let mut exists = redis::cmd("EXISTS");
    for k in &keys {
        exists.arg(k);
    }
    let live: i64 = exists.query(c).unwrap();
    match (live, index::location(c, &flow.id)) {
        (0, Some(l)) => State::Archived(l),
        (0, None) => State::Lost,
        _ => State::Live,
    }
}

/// Names the first element where two event lists differ.
fn events_diff(want: &[String], got: &[String]) -> Option<String> {
    if let Some(i) = (0..want.len().min(got.len())).find(|&i| want[i] != got[i]) {
        return Some(format!(
            "event #{i} differs: want {:?}, got {:?}",
            want[i], got[i]
        ));
    }
    (want.len() != got.len()).then(|| {
        format!(
            "{} events, want {} (first extra/missing: {:?})",
            got.len(),
            want.len(),
            got.get(want.len()).or(want.get(got.len()))
        )
    })
}

fn check_live(c: &mut redis::Connection, flow: &FlowModel, problems: &mut Vec<String>) {
    let mut fail = |what: String| problems.push(format!("flow {:?}: live, {what}", flow.id));
    let events: Vec<String> = cmd(c, &["LRANGE", &flow.key("events"), "0", "-1"]).unwrap();
    if let Some(d) = events_diff(&flow.events, &events) {
        fail(d);
    }
    let snapshot: Option<String> = cmd(c, &["GET", &flow.key("snapshot:val")]).unwrap();
    if snapshot != flow.snapshot {
        fail(format!(
            "snapshot differs: want {:?}, got {snapshot:?}",
            flow.snapshot
        ));
    }
    let seq: Option<String> = cmd(c, &["GET", &flow.key("snapshot:seq")]).unwrap();
    if seq != flow.seq {
        fail(format!("seq is {seq:?}, want {:?}", flow.seq));
    }
    let mut labels: Vec<(String, String)> = cmd(c, &["HGETALL", &flow.key("idx:labels")]).unwrap();
    labels.sort();
    let mut want = flow.labels.clone();
    want.sort();
    if labels != want {
        fail(format!("labels are {labels:?}, want {want:?}"));
    }
    let member = flow.member();
    let status: Option<String> = cmd(c, &["HGET", &format!("{P}:idx:status"), &member]).unwrap();
    if status.as_deref() != Some(flow.status.as_str()) {
        fail(format!(
            "status index says {status:?}, want {:?}",
            flow.status
        ));
    }
    for s in STATUSES {
        let score: Option<i64> =
            cmd(c, &["ZSCORE", &format!("{P}:idx:status:{s}"), &member]).unwrap();
        let want = (s == flow.status).then_some(flow.last_ms);
        if score != want {
            fail(format!(
                "score in status set {s:?} is {score:?}, want {want:?}"
            ));
        }
    }
    if index::location(c, &flow.id).is_some() {
        fail("has an archive index entry while live".into());
    }
    let read: Option<String> = redis::cmd("FLOWARCHIVE.GET")
        .arg(&flow.id)
        .query(c)
        .unwrap_or_else(|e| Some(format!("error: {e}")));
    if read != flow.state() {
        fail(format!(
            "FLOWARCHIVE.GET answers {read:?}, not the engine's state {:?}",
            flow.state()
        ));
    }
}

/// Where a flow of DB `db` is stored, relative to the prefix: `[db<n>/]flows/<escaped id>`, then
/// `.jsonl.gz` or, for a later generation (an earlier object held other content), `.g<N>.jsonl.gz`.
fn flow_object_stem(db: i64, id: &str) -> String {
    let escaped: String = id
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    match db {
        0 => format!("flows/{escaped}"),
        db => format!("db{db}/flows/{escaped}"),
    }
}

/// `rel` is an object key of flow `id` of DB `db` (any generation).
fn is_flow_object(rel: &str, db: i64, id: &str) -> bool {
    rel.strip_prefix(&flow_object_stem(db, id))
        .and_then(|r| r.strip_suffix(".jsonl.gz"))
        .is_some_and(|g| g.is_empty() || generation(g).is_some())
}

/// `.g<N>` (N > 0) as N.
fn generation(suffix: &str) -> Option<u32> {
    let n = suffix.strip_prefix(".g")?;
    (!n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

/// `S3::list` answers keys URL-encoded (`encoding-type=url`): the stored key of `a%3Ab` lists as
/// `a%253Ab`.
fn percent_decode(listed: &str) -> String {
    let b = listed.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `flows/<escaped id or _sha256/<hex>>[.g<N>].jsonl.gz`, optionally under `db<n>/`.
pub fn valid_object_key(rel: &str) -> bool {
    let rest = match rel.strip_prefix("db") {
        Some(r) => match r.split_once('/') {
            Some((n, rest)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => rest,
            _ => return false,
        },
        None => rel,
    };
    let Some(mut name) = rest
        .strip_prefix("flows/")
        .and_then(|r| r.strip_suffix(".jsonl.gz"))
    else {
        return false;
    };
    if let Some(dot) = name.rfind('.') {
        if generation(&name[dot..]).is_none() {
            return false;
        }
        name = &name[..dot];
    }
    if let Some(hex) = name.strip_prefix("_sha256/") {
        return hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    }
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len()
                && b[i + 1..i + 3]
                    .iter()
                    .all(|h| matches!(h, b'0'..=b'9' | b'A'..=b'F')) =>
            {
                i += 3
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c == b'-' => i += 1,
            _ => return false,
        }
    }
    !name.is_empty()
}

fn json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {text:?}"))
}

fn check_archived(
    c: &mut redis::Connection,
    s3: &S3,
    objects: &BTreeSet<String>,
    db: i64,
    flow: &FlowModel,
    location: &str,
    problems: &mut Vec<String>,
) {
    let mut fail = |what: String| problems.push(format!("flow {:?}: archived, {what}", flow.id));
    let member = flow.member();
    let status: Option<String> = cmd(c, &["HGET", &format!("{P}:idx:status"), &member]).unwrap();
    if status.is_some() {
        fail(format!("status index still says {status:?}"));
    }
    for s in STATUSES {
        let score: Option<i64> =
            cmd(c, &["ZSCORE", &format!("{P}:idx:status:{s}"), &member]).unwrap();
        if score.is_some() {
            fail(format!("still in status set {s:?}"));
        }
    }
    let base = format!("s3://{}/{}/", s3.name(), s3.prefix);
    // The object names the DB the flow was archived from; SWAPDB may have moved the flow and its
    // index entry to another DB number since.
    let named = |rel: &str| -> i64 {
        rel.strip_prefix("db")
            .and_then(|r| r.split_once('/'))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or(0)
    };
    match location.strip_prefix(&base) {
        Some(rel) if valid_object_key(rel) && is_flow_object(rel, named(rel), &flow.id) => {
            if !objects.contains(rel) {
                let near: Vec<&String> = objects
                    .iter()
                    .filter(|o| o.contains(&flow.id[..flow.id.len().min(5)]))
                    .take(3)
                    .collect();
                fail(format!(
                    "index points to {location:?}, which is not in the bucket (near: {near:?})"
                ));
            } else {
                check_object(s3, rel, named(rel), flow, &mut fail);
            }
        }
        _ => fail(format!(
            "index location {location:?} is not {base}{}[.g<N>].jsonl.gz",
            flow_object_stem(db, &flow.id)
        )),
    }
    let Some(state) = flow.state() else {
        return fail("the model's events hold no flow the engine knows".into());
    };
    // The engine's state, byte for byte, with the archived flag added at its end.
    let want = format!("{},\"archived\":true}}", &state[..state.len() - 1]);
    match redis::cmd("FLOWARCHIVE.GET")
        .arg(&flow.id)
        .query::<Option<String>>(c)
    {
        Ok(Some(text)) if text == want => {}
        Ok(Some(text)) => fail(format!("FLOWARCHIVE.GET answers {text}, want {want}")),
        Ok(None) => fail("FLOWARCHIVE.GET answers nil".into()),
        Err(e) => fail(format!("FLOWARCHIVE.GET fails: {e}")),
    }
    match redis::cmd("FLOWARCHIVE.GET")
        .arg(&flow.id)
        .arg("EVENTS")
        .query::<(String, Vec<String>)>(c)
    {
        Ok((_, events)) => {
            if let Some(d) = events_diff(&flow.events, &events) {
                fail(format!("FLOWARCHIVE.GET EVENTS: {d}"));
            }
        }
        Err(e) => fail(format!("FLOWARCHIVE.GET EVENTS fails: {e}")),
    }
}

/// The object itself: header names the flow, the lines are the model's events, the trailer holds its
/// state, snapshot, seq, labels and status (the parts FLOWARCHIVE.GET does not show).
fn check_object(s3: &S3, rel: &str, db: i64, flow: &FlowModel, fail: &mut impl FnMut(String)) {
    let Some(body) = s3.get(rel) else {
        return fail(format!("object {rel:?} vanished"));
    };
    let text = gunzip(&body);
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() < 2 {
        return fail(format!("object {rel:?} has {} lines", lines.len()));
    }
    let (header, trailer) = match (json(lines[0]), json(lines[lines.len() - 1])) {
        (Ok(h), Ok(t)) => (h, t),
        (Err(e), _) | (_, Err(e)) => return fail(format!("object {rel:?}: {e}")),
    };
    if header["flow_id"] != flow.id.as_str() || header["db"] != db {
        fail(format!(
            "object {rel:?} names flow {} of DB {}",
            header["flow_id"], header["db"]
        ));
    }
    let events: Vec<String> = lines[1..lines.len() - 1]
        .iter()
        .map(|l| l.to_string())
        .collect();
    if let Some(d) = events_diff(&flow.events, &events) {
        fail(format!("object {rel:?}: {d}"));
    }
    let labels: serde_json::Map<String, serde_json::Value> = flow
        .labels
        .iter()
        .map(|(l, v)| (l.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let parse = |text: &Option<String>| text.as_deref().map(json).transpose();
    let (Ok(state), Ok(snapshot)) = (parse(&flow.state()), parse(&flow.snapshot)) else {
        return fail("the model's state or snapshot is not JSON".into());
    };
    let mut want = serde_json::json!({
        "state": state,
        "snapshot": snapshot,
        "seq": flow.seq.as_ref().map(|s| s.parse::<i64>().unwrap_or(-1)),
        "labels": labels,
        "status": flow.status,
    });
    // An object written while the layout served its snapshot (`flowarchive.state snapshot`) holds
    // no state: readers fold its events.
    if trailer.get("state").is_none() {
        want.as_object_mut().map(|w| w.shift_remove("state"));
    }
    if trailer != want {
        fail(format!("object {rel:?} trailer is {trailer}, want {want}"));
    }
}

/// The engine-wide indexes as a whole: the status hash names exactly the live flows, each label set
/// exactly the live flows carrying that label, each label's value set exactly the values still
/// carried, and the archive index exactly the archived flows.
fn check_shared_indexes(
    c: &mut redis::Connection,
    model: &Model,
    archived: &BTreeSet<String>,
    problems: &mut Vec<String>,
) {
    let live: Vec<&FlowModel> = model
        .flows
        .values()
        .filter(|f| !archived.contains(&f.id))
        .collect();
    let want: BTreeSet<String> = live.iter().map(|f| f.member()).collect();
    let got: BTreeSet<String> = cmd::<Vec<String>>(c, &["HKEYS", &format!("{P}:idx:status")])
        .unwrap()
        .into_iter()
        .collect();
    for extra in got.difference(&want) {
        problems.push(format!(
            "status hash has {extra:?}, which is not a live flow"
        ));
    }
    let got: BTreeSet<String> = cmd::<Vec<String>>(c, &["HKEYS", INDEX])
        .unwrap()
        .into_iter()
        .collect();
    for extra in got.difference(archived) {
        problems.push(format!(
            "archive index has {extra:?}, which is not an archived flow"
        ));
    }
    // The compact index counts its entries: exactly the archived flows the hash does not hold.
    let compact = archived.difference(&got).count() as i64;
    let counted = index::compact_entries(c, INDEX);
    if counted != compact {
        problems.push(format!(
            "the compact index counts {counted} entries, {compact} archived flows are not in the hash"
        ));
    }
    let pairs: BTreeSet<(String, String)> = model
        .flows
        .values()
        .flat_map(|f| f.labels.iter().cloned())
        .collect();
    for (l, v) in &pairs {
        let want: BTreeSet<String> = live
            .iter()
            .filter(|f| f.labels.iter().any(|(fl, fv)| fl == l && fv == v))
            .map(|f| f.member())
            .collect();
        let got: BTreeSet<String> =
            cmd::<Vec<String>>(c, &["SMEMBERS", &format!("{P}:idx:label:{l}:{v}")])
                .unwrap()
                .into_iter()
                .collect();
        if got != want {
            let missing: Vec<_> = want.difference(&got).take(5).collect();
            let extra: Vec<_> = got.difference(&want).take(5).collect();
            problems.push(format!(
                "label set {l}:{v}: missing live flows {missing:?}, has gone flows {extra:?}"
            ));
        }
        let carried: bool =
            cmd::<i64>(c, &["SISMEMBER", &format!("{P}:idx:label:{l}"), v]).unwrap() == 1;
        if carried == want.is_empty() {
            problems.push(format!(
                "label values of {l:?}: value {v:?} listed={carried}, but {} live flows carry it",
                want.len()
            ));
        }
    }
}

/// One field of `INFO replication` (empty when absent).
pub fn repl_field(c: &mut redis::Connection, name: &str) -> String {
    let info: String = cmd(c, &["INFO", "replication"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// Waits until every replica has applied the primary's whole stream, then compares DBs `dbs` of each
/// replica with the primary's key by key.
pub fn assert_replicas_match(primary: &Server, replicas: &[&Server], dbs: &[i64]) {
    let mut p = primary.conn();
    assert_eq!(repl_field(&mut p, "role"), "master", "not the primary");
    for r in replicas {
        let mut rc = r.conn();
        wait_for(
            &format!("replica {} to catch up with {}", r.port, primary.port),
            Duration::from_secs(30),
            || {
                let _: redis::RedisResult<i64> = cmd(&mut p, &["WAIT", "1", "1000"]);
                let want = repl_field(&mut p, "master_repl_offset");
                repl_field(&mut rc, "master_link_status") == "up"
                    && repl_field(&mut rc, "master_repl_offset") == want
            },
        );
        for db in dbs {
            let db = db.to_string();
            cmd::<()>(&mut p, &["SELECT", &db]).unwrap();
            cmd::<()>(&mut rc, &["SELECT", &db]).unwrap();
            assert_same(
                &dump_all(&mut p),
                &dump_all(&mut rc),
                &format!("replica {} vs primary {}, db {db}", r.port, primary.port),
            );
        }
        cmd::<()>(&mut p, &["SELECT", "0"]).unwrap();
    }
}

/// Log lines that mean the server crashed or a module panicked.
const CRASH_MARKS: [&str; 4] = ["ASSERTION", "crashed by signal", "panicked", "STACK TRACE"];

/// The server process still runs and its log shows no crash report or assertion.
pub fn assert_alive(srv: &mut Server, what: &str) {
    let log = srv.log();
    let alive = srv.alive();
    let marks: Vec<&str> = log
        .lines()
        .filter(|l| CRASH_MARKS.iter().any(|m| l.contains(m)))
        .take(10)
        .collect();
    if alive && marks.is_empty() {
        return;
    }
    // From the first crash line (the assertion and its stack), else the end of the log.
    let lines: Vec<&str> = log.lines().collect();
    let from = lines
        .iter()
        .position(|l| CRASH_MARKS.iter().any(|m| l.contains(m)))
        .unwrap_or(lines.len().saturating_sub(40));
    let tail = &lines[from.saturating_sub(5)..lines.len().min(from + 35)];
    panic!(
        "{what}: server on port {} {} ({marks:?}); log:\n{}",
        srv.port,
        if alive { "reported a crash" } else { "is DEAD" },
        tail.join("\n")
    );
}
