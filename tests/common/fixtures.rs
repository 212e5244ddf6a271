//! Flows written the way the engine writes them, whole-DB snapshots for comparisons, reply helpers.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

pub fn cmd<T: redis::FromRedisValue>(
    c: &mut redis::Connection,
    args: &[&str],
) -> redis::RedisResult<T> {
    let mut command = redis::cmd(args[0]);
    for a in &args[1..] {
        command.arg(*a);
    }
    command.query(c)
}

/// A flow written the way the Argyll engine writes it (see docs/ENGINE.md): its event log, its entries in
/// the engine's status and label indexes, its labels hash, and, only when `snapshot` says so, a
/// snapshot (most of the engine's flows have none).
#[derive(Clone)]
pub struct FlowSpec<'a> {
    pub id: &'a str,
    pub status: &'a str,
    /// Unix ms of the last event of the engine's status change (the status ZSET score); the events are
    /// stamped around it (`event_json`).
    pub last_ms: i64,
    pub events: usize,
    pub labels: &'a [(&'a str, &'a str)],
    /// Older engines write events without sequence and aggregate_id.
    pub compact_events: bool,
    pub snapshot: Snapshot,
}

/// Whether a flow has a snapshot, and what it folded in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Snapshot {
    /// None (the engine's usual case: a flow that started and ended in one engine process).
    None,
    /// Folded from every event (`snapshot:seq` = the log's length).
    Current,
    /// Folded from the first n events only: the engine reloaded the flow while it still ran.
    Stale(usize),
}

pub const LONG_AGO: i64 = 1_700_000_000_000;

impl<'a> FlowSpec<'a> {
    pub fn done(id: &'a str) -> Self {
        FlowSpec {
            id,
            status: "completed",
            last_ms: LONG_AGO,
            events: 5,
            labels: &[("tenant", "acme")],
            compact_events: false,
            snapshot: Snapshot::None,
        }
    }
}

/// The plan of every fixture flow, as the engine writes it (Go's encoding of its ExecutionPlan).
pub const PLAN: &str = r#"{"goals":["work"],"required":["order_id"],"steps":{"work":{"id":"work","name":"Work","type":"script","attributes":{"n":{"role":"output","type":"number"},"order_id":{"role":"required","type":"string"}},"script":{"language":"ale","script":"(+ 1 1)"}}},"attributes":{"n":{"providers":["work"],"consumers":[]},"order_id":{"providers":[],"consumers":["work"]}},"excluded":{}}"#;

/// Unix ms as the engine writes a timestamp in an event (RFC 3339, UTC).
pub fn event_time(ms: i64) -> String {
    fmt_ms(ms)
}

/// The same instant as the engine answers it in a FlowState (Go's RFC 3339: trailing zeros of the
/// fraction trimmed).
pub fn state_time(ms: i64) -> String {
    let t = fmt_ms(ms);
    let (secs, rest) = t.split_at(19);
    let frac = rest
        .trim_start_matches('.')
        .trim_end_matches('Z')
        .trim_end_matches('0');
    if frac.is_empty() {
        format!("{secs}Z")
    } else {
        format!("{secs}.{frac}Z")
    }
}

/// Unix ms of event `i` of a flow whose status changed at `last_ms`: the engine's terminal batch
/// (events 3 and 4) at `last_ms`, the first three just before it, late events (5 on) after it.
pub fn event_ms(last_ms: i64, i: usize) -> i64 {
    last_ms - 4 + i.min(4) as i64 + i.saturating_sub(4) as i64
}

/// Event `i` of the fixture flow `spec`, as the engine writes it: 0 `flow_started`, 1 `step_started`,
/// 2 `step_completed`, then for a terminal flow `flow_completed` (or `flow_failed`) and
/// `flow_deactivated` in one batch, for an active one two `attribute_set`s; from 5 on late
/// `attribute_set` events (a webhook after the flow ended).
pub fn event_json(spec: &FlowSpec, i: usize) -> String {
    let id = spec.id;
    let labels: serde_json::Map<String, serde_json::Value> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let (ty, data) = match (i, spec.status) {
        (0, _) => {
            let mut data = format!(r#"{{"plan":{PLAN},"init":{{"order_id":"o-1"}}"#);
            if !labels.is_empty() {
                data += &format!(r#","labels":{}"#, serde_json::Value::Object(labels));
            }
            data += &format!(r#","flow_id":{}}}"#, serde_json::json!(id));
            ("flow_started", data)
        }
        (1, _) => (
            "step_started",
            serde_json::json!({"inputs": {"order_id": "o-1"}, "flow_id": id, "step_id": "work", "work_items": {"t1": {"order_id": "o-1"}}}).to_string(),
        ),
        (2, _) => (
            "step_completed",
            serde_json::json!({"outputs": {"n": 2}, "flow_id": id, "step_id": "work", "duration": 7}).to_string(),
        ),
        (3, "failed") => (
            "flow_failed",
            serde_json::json!({"flow_id": id, "error": "work failed"}).to_string(),
        ),
        (3, s) if s != "active" => (
            "flow_completed",
            serde_json::json!({"result": {}, "flow_id": id}).to_string(),
        ),
        (4, s) if s != "active" => (
            "flow_deactivated",
            serde_json::json!({"flow_id": id, "status": s}).to_string(),
        ),
        (i, _) => (
            "attribute_set",
            serde_json::json!({"value": {"n": i, "note": "x".repeat(i % 50)}, "flow_id": id, "step_id": "work", "key": format!("a{i}")}).to_string(),
        ),
    };
    let ts = event_time(event_ms(spec.last_ms, i));
    let id_json = serde_json::json!(id);
    if spec.compact_events {
        format!(r#"{{"timestamp":"{ts}","type":"{ty}","data":{data}}}"#)
    } else {
        format!(
            r#"{{"timestamp":"{ts}","sequence":{i},"type":"{ty}","aggregate_id":["flow",{id_json}],"data":{data}}}"#
        )
    }
}

/// The engine's answer (`GET /engine/flow/{id}`, Go's JSON) for a log of fixture events (`event_json`),
/// checked by hand against the engine's own appliers for these shapes. Elements of other shapes are
/// skipped as the engine skips events it has no applier for. `None` without a `flow_started`.
pub fn state_of(events: &[String]) -> Option<String> {
    use serde_json::Value;
    let parsed: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str(e).ok())
        .collect();
    let time = |e: &Value| {
        let t = e["timestamp"].as_str().unwrap_or_default();
        state_time(parse_ms(t))
    };
    let zero = "0001-01-01T00:00:00Z".to_string();
    let mut id = None;
    let (mut created, mut completed, mut last, mut deactivated) =
        (zero.clone(), zero.clone(), zero.clone(), zero.clone());
    let (mut status, mut error) = (String::new(), String::new());
    let mut labels = String::new();
    let mut attributes: std::collections::BTreeMap<String, String> = Default::default();
    let mut exec = format!(
        r#"{{"started_at":"{zero}","completed_at":"{zero}","inputs":null,"status":"pending"}}"#
    );
    let item = format!(
        r#""work_items":{{"t1":{{"status":"pending","started_at":"{zero}","completed_at":"{zero}","inputs":{{"order_id":"o-1"}},"next_retry_at":"{zero}"}}}}"#
    );
    let mut step_started = zero.clone();
    const KNOWN: [&str; 7] = [
        "flow_started",
        "step_started",
        "step_completed",
        "flow_completed",
        "flow_failed",
        "flow_deactivated",
        "attribute_set",
    ];
    for e in &parsed {
        if !KNOWN.contains(&e["type"].as_str().unwrap_or_default()) {
            continue;
        }
        let t = time(e);
        let data = &e["data"];
        match e["type"].as_str() {
            Some("flow_started") => {
                id = data["flow_id"].as_str().map(str::to_string);
                created = t.clone();
                status = "active".into();
                labels = match data.get("labels").and_then(Value::as_object) {
                    Some(l) if !l.is_empty() => {
                        let sorted: std::collections::BTreeMap<_, _> = l.iter().collect();
                        format!(r#""labels":{},"#, serde_json::to_string(&sorted).unwrap())
                    }
                    _ => String::new(),
                };
                attributes.clear();
                attributes.insert(
                    "order_id".into(),
                    format!(r#"{{"value":"o-1","set_at":"{t}"}}"#),
                );
            }
            Some("step_started") => {
                step_started = t.clone();
                exec = format!(
                    r#"{{"started_at":"{t}","completed_at":"{zero}","inputs":{{"order_id":"o-1"}},"status":"active",{item}}}"#
                );
            }
            Some("step_completed") => {
                exec = format!(
                    r#"{{"started_at":"{step_started}","completed_at":"{t}","inputs":{{"order_id":"o-1"}},"outputs":{{"n":2}},"status":"completed","duration":7,{item}}}"#
                );
            }
            Some("flow_completed") => {
                status = "completed".into();
                completed = t.clone();
            }
            Some("flow_failed") => {
                status = "failed".into();
                error = data["error"].as_str().unwrap_or_default().to_string();
                completed = t.clone();
            }
            Some("flow_deactivated") => deactivated = t.clone(),
            Some("attribute_set") => {
                let key = data["key"].as_str().unwrap_or_default().to_string();
                let value = serde_json::to_string(&data["value"]).unwrap();
                attributes.insert(
                    key,
                    format!(r#"{{"value":{value},"step":"work","set_at":"{t}"}}"#),
                );
            }
            _ => continue,
        }
        last = t;
    }
    let id = id?;
    let attributes: Vec<String> = attributes
        .iter()
        .map(|(k, v)| format!("{}:{v}", serde_json::json!(k)))
        .collect();
    let error = if error.is_empty() {
        String::new()
    } else {
        format!(r#","error":{}"#, serde_json::json!(error))
    };
    Some(format!(
        r#"{{"created_at":"{created}","completed_at":"{completed}","last_updated":"{last}","plan":{PLAN},{labels}"attributes":{{{}}},"deactivated_at":"{deactivated}","executions":{{"work":{exec}}},"id":{},"status":"{status}"{error}}}"#,
        attributes.join(","),
        serde_json::json!(id)
    ))
}

/// What FLOWARCHIVE.GET answers for an archived flow whose state is `state`: the same bytes, with
/// `"archived":true` added at the end.
pub fn archived_state(state: &str) -> String {
    format!("{},\"archived\":true}}", &state[..state.len() - 1])
}

/// The engine's answer for the fixture flow `spec` (`state_of` its events).
pub fn state_json(spec: &FlowSpec) -> String {
    state_of(&events_of(spec)).expect("a fixture flow starts with flow_started")
}

/// Every event of the fixture flow `spec`.
pub fn events_of(spec: &FlowSpec) -> Vec<String> {
    (0..spec.events).map(|i| event_json(spec, i)).collect()
}

/// The snapshot and sequence the engine would have stored for `spec`, if it has one.
pub fn snapshot_of(spec: &FlowSpec) -> Option<(String, usize)> {
    let folded = match spec.snapshot {
        Snapshot::None => return None,
        Snapshot::Current => spec.events,
        Snapshot::Stale(n) => n.min(spec.events),
    };
    let events = events_of(spec);
    Some((state_of(&events[..folded])?, folded))
}

/// Flow `id`'s event log key under the engine's default layout.
pub fn events_key(id: &str) -> String {
    format!("argyll:flow:{id}:events")
}

/// Flow `id`'s snapshot key under the engine's default layout.
pub fn snapshot_key(id: &str) -> String {
    format!("argyll:flow:{id}:snapshot:val")
}

/// The labels hash of flow `id` in the engine's layout.
pub fn labels_key(id: &str) -> String {
    format!("argyll:flow:{id}:idx:labels")
}

/// Flow `id`'s stored snapshot (a JSON object) made exactly `len` bytes long by a field `pad` of
/// varied digits, which the engine's state does not know and drops (so the flow's state is unchanged).
/// Not written: the caller sets it.
pub fn padded_snapshot(c: &mut redis::Connection, id: &str, len: usize) -> String {
    let snapshot: String = cmd(c, &["GET", &snapshot_key(id)]).unwrap();
    let body = snapshot.strip_suffix('}').expect("a JSON object");
    let body = body.split(",\"pad\":").next().unwrap();
    let head = format!("{body},\"pad\":\"");
    let digits = (0..len - head.len() - 2).map(|i| char::from(b'0' + (i * 7 % 10) as u8));
    format!("{head}{}\"}}", digits.collect::<String>())
}

/// `padded_snapshot`, written as flow `id`'s snapshot; the snapshot.
pub fn set_padded_snapshot(c: &mut redis::Connection, id: &str, len: usize) -> String {
    let snapshot = padded_snapshot(c, id, len);
    let key = snapshot_key(id);
    cmd::<()>(c, &["SET", &key, &snapshot]).unwrap();
    snapshot
}

/// The finished fixture flow `id` with a current snapshot padded to exactly `len` bytes
/// (`set_padded_snapshot`); its snapshot.
pub fn write_padded_flow(c: &mut redis::Connection, id: &str, len: usize) -> String {
    let spec = FlowSpec {
        snapshot: Snapshot::Current,
        ..FlowSpec::done(id)
    };
    write_flow(c, &spec);
    set_padded_snapshot(c, id, len)
}

/// Labels whose names and values take exactly `bytes` bytes together (as a capture counts them, and
/// more than a few names' worth): names `<tag>00000`, `<tag>00001`…, values of 1,000 varied letters,
/// the last one what is left. Nothing in them needs escaping if `tag` needs none.
pub fn labels_of(tag: &str, bytes: usize) -> Vec<(String, String)> {
    const VALUE: usize = 1000;
    let mut labels = Vec::new();
    let mut left = bytes;
    while left > 0 {
        let i = labels.len();
        let name = format!("{tag}{i:05}");
        assert!(left > name.len(), "{bytes} bytes cannot end in a label");
        let rest = left - name.len();
        let len = if rest >= 2 * VALUE { VALUE } else { rest };
        let value = (0..len).map(|j| char::from(b'a' + ((i * 7 + j) % 26) as u8));
        left -= name.len() + len;
        labels.push((name, value.collect()));
    }
    labels
}

/// Unix ms of an RFC 3339 timestamp in UTC (`2026-03-18T09:14:03.120Z`), for the fixtures' own times.
pub fn parse_ms(t: &str) -> i64 {
    let num = |a: usize, b: usize| t[a..b].parse::<i64>().unwrap();
    let (y, m, d) = (num(0, 4), num(5, 7), num(8, 10));
    let (h, mi, s) = (num(11, 13), num(14, 16), num(17, 19));
    let frac = t[19..].trim_start_matches('.').trim_end_matches('Z');
    let ms = format!("{frac:0<3}")[..3].parse::<i64>().unwrap_or(0);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    ((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms
}

fn fmt_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 {
        yoe + era * 400 + 1
    } else {
        yoe + era * 400
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// A label name or value as the engine stores it in its indexes: `\` → `\\`, `%` → `\%`, `:` → `%`.
pub fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace(':', "%")
}

pub fn write_flow(c: &mut redis::Connection, spec: &FlowSpec) {
    let p = "argyll";
    let id = spec.id;
    let member = format!("flow:{id}");
    let events_key = format!("{p}:flow:{id}:events");
    let mut pipe = redis::pipe();
    let events = events_of(spec);
    for chunk in events.chunks(1000) {
        pipe.cmd("RPUSH").arg(&events_key).arg(chunk).ignore();
    }
    if let Some((snapshot, seq)) = snapshot_of(spec) {
        pipe.cmd("SET")
            .arg(format!("{p}:flow:{id}:snapshot:val"))
            .arg(snapshot)
            .ignore();
        pipe.cmd("SET")
            .arg(format!("{p}:flow:{id}:snapshot:seq"))
            .arg(seq)
            .ignore();
    }
    add_labels(&mut pipe, id, spec.labels);
    pipe.cmd("HSET")
        .arg(format!("{p}:idx:status"))
        .arg(&member)
        .arg(spec.status)
        .ignore();
    pipe.cmd("ZADD")
        .arg(format!("{p}:idx:status:{}", spec.status))
        .arg(spec.last_ms)
        .arg(&member)
        .ignore();
    pipe.query::<()>(c).unwrap();
}

/// Adds `labels` to flow `id`'s labels hash and to the engine's label indexes, as the engine writes
/// them (escaped; a label with an empty value is not indexed).
pub fn add_labels(pipe: &mut redis::Pipeline, id: &str, labels: &[(&str, &str)]) {
    let (p, member) = ("argyll", format!("flow:{id}"));
    for (l, v) in labels.iter().filter(|(_, v)| !v.is_empty()) {
        let (l, v) = (escape_label(l), escape_label(v));
        pipe.cmd("HSET")
            .arg(format!("{p}:flow:{id}:idx:labels"))
            .arg(&l)
            .arg(&v)
            .ignore();
        pipe.cmd("SADD")
            .arg(format!("{p}:idx:label:{l}:{v}"))
            .arg(&member)
            .ignore();
        pipe.cmd("SADD")
            .arg(format!("{p}:idx:label:{l}"))
            .arg(&v)
            .ignore();
    }
}

/// An event of `bytes` bytes of no type (`{"blob":"xx…"}`): the engine's fold skips it.
pub fn blob(bytes: usize) -> String {
    format!("{{\"blob\":\"{}\"}}", "x".repeat(bytes.saturating_sub(11)))
}

/// Inserts `n` events of `bytes` bytes (`blob`) after the first event of flow `id`'s log, so a log of
/// few events passes 1 MiB (read in main-thread steps); the log as it is then.
pub fn widen(c: &mut redis::Connection, id: &str, n: usize, bytes: usize) -> Vec<String> {
    let key = format!("argyll:flow:{id}:events");
    let first: String = cmd(c, &["LINDEX", &key, "0"]).unwrap();
    let event = blob(bytes);
    let mut pipe = redis::pipe();
    for _ in 0..n {
        pipe.cmd("LINSERT")
            .arg(&key)
            .arg("AFTER")
            .arg(&first)
            .arg(&event)
            .ignore();
    }
    pipe.query::<()>(c).unwrap();
    cmd(c, &["LRANGE", &key, "0", "-1"]).unwrap()
}

pub fn flow_keys(id: &str) -> Vec<String> {
    ["events", "snapshot:val", "snapshot:seq", "idx:labels"]
        .iter()
        .map(|s| format!("argyll:flow:{id}:{s}"))
        .collect()
}

/// Every key of the DB with its type and content in a canonical order (members of sets, hashes and
/// sorted sets sorted), for byte-identical comparisons. DUMP would not do: a large set's DUMP changes
/// while the server rehashes it.
pub fn dump_all(c: &mut redis::Connection) -> Dump {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(c).unwrap();
    let map = keys
        .into_iter()
        .map(|k| {
            let ty: String = redis::cmd("TYPE").arg(&k).query(c).unwrap();
            let mut items: Vec<Vec<u8>> = match ty.as_str() {
                "string" => vec![redis::cmd("GET").arg(&k).query(c).unwrap()],
                "list" => redis::cmd("LRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .query(c)
                    .unwrap(),
                "set" => redis::cmd("SMEMBERS").arg(&k).query(c).unwrap(),
                "hash" => {
                    let pairs: Vec<(Vec<u8>, Vec<u8>)> =
                        redis::cmd("HGETALL").arg(&k).query(c).unwrap();
                    pairs
                        .into_iter()
                        .map(|(f, v)| [f, b"=".to_vec(), v].concat())
                        .collect()
                }
                "zset" => {
                    let pairs: Vec<(Vec<u8>, String)> = redis::cmd("ZRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query(c)
                        .unwrap();
                    pairs
                        .into_iter()
                        .map(|(m, s)| [m, b"=".to_vec(), s.into_bytes()].concat())
                        .collect()
                }
                other => panic!("unexpected type {other}"),
            };
            if ty != "list" {
                items.sort();
            }
            (k, (ty, items))
        })
        .collect();
    Dump(map)
}

#[derive(PartialEq)]
pub struct Dump(pub std::collections::BTreeMap<Vec<u8>, (String, Vec<Vec<u8>>)>);

impl Dump {
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Names only the keys that differ, so a failing comparison stays readable.
impl std::fmt::Debug for Dump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} keys", self.0.len())
    }
}

pub fn assert_same(before: &Dump, after: &Dump, what: &str) {
    let differing: Vec<String> = before
        .0
        .keys()
        .chain(after.0.keys())
        .filter(|k| before.0.get(*k) != after.0.get(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .take(20)
        .collect();
    assert!(differing.is_empty(), "{what}: keys differ: {differing:?}");
}

/// FLOWARCHIVE.FLOW reply as a field -> value map (RESP2 flat array or RESP3 map).
pub fn reply_map(v: redis::Value) -> std::collections::HashMap<String, redis::Value> {
    match v {
        redis::Value::Array(items) => items
            .chunks(2)
            .map(|p| {
                (
                    redis::from_redis_value::<String>(&p[0]).unwrap(),
                    p[1].clone(),
                )
            })
            .collect(),
        redis::Value::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| (redis::from_redis_value::<String>(&k).unwrap(), v))
            .collect(),
        other => panic!("not a map reply: {other:?}"),
    }
}

pub fn archive(
    c: &mut redis::Connection,
    id: &str,
) -> redis::RedisResult<std::collections::HashMap<String, redis::Value>> {
    redis::cmd("FLOWARCHIVE.FLOW")
        .arg(id)
        .query::<redis::Value>(c)
        .map(reply_map)
}

/// An archive object of format `version` with these event lines and this trailer, its header made for
/// them, written independently of the module's encoder (docs/FORMAT.md is the contract).
pub fn crafted_object(
    id: &str,
    db: i32,
    version: u32,
    events: &[String],
    trailer: &str,
) -> Vec<u8> {
    use sha2::Digest;
    let mut content = String::new();
    for line in events.iter().map(String::as_str).chain([trailer]) {
        content.push_str(line);
        content.push('\n');
    }
    let sha: String = sha2::Sha256::digest(content.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let header = serde_json::json!({
        "format": "flowarchive", "version": version, "flow_id": id, "db": db, "events": events.len(),
        "raw_bytes": content.len(), "sha256": sha,
    });
    gzip(&format!("{header}\n{content}"))
}

pub fn gzip(text: &str) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap()
}

/// One field of `INFO flowarchive` as a number.
pub fn info_field(c: &mut redis::Connection, name: &str) -> i64 {
    let info: String = cmd(c, &["INFO", "flowarchive"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("flowarchive_{name}:")))
        .unwrap_or_else(|| panic!("no {name} in INFO:\n{info}"))
        .trim()
        .parse()
        .unwrap()
}

/// INFO `blocked_clients`: the clients the server holds for a module's answer.
pub fn blocked_clients(c: &mut redis::Connection) -> i64 {
    let info: String = cmd(c, &["INFO", "clients"]).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .unwrap_or_else(|| panic!("no blocked_clients in INFO:\n{info}"))
        .trim()
        .parse()
        .unwrap()
}

/// What `op` answers on `c`, and how many main-thread steps the module took meanwhile (INFO
/// `main_thread_steps`: the steps after a command's own, of every read, archive and sweep).
pub fn stepped<T>(
    c: &mut redis::Connection,
    op: impl FnOnce(&mut redis::Connection) -> T,
) -> (T, i64) {
    let before = info_field(c, "main_thread_steps");
    let answer = op(c);
    (answer, info_field(c, "main_thread_steps") - before)
}

pub fn gunzip(b: &[u8]) -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(b)
        .read_to_string(&mut s)
        .expect("gzip");
    s
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// Lets a sweep's uploads, held at `proxy`'s gate ([`Fault::Gate`](super::proxy::Fault::Gate) set
/// by `gate` before the sweep began), through one change of the rules (`gate` again) at a time until
/// `flows_archived` reaches `target`, and returns with an upload held at the gate: nothing more passes
/// it until the test changes the rules, so what the test does next lands while the sweep is in flight
/// however slowly this machine runs. Fails if the sweep ends first.
pub fn hold_sweep_at(
    c: &mut redis::Connection,
    proxy: &super::proxy::Proxy,
    gate: &dyn Fn(),
    target: i64,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        while proxy.gated() == 0 {
            assert_eq!(
                info_field(c, "sweep_running"),
                1,
                "{what}: the sweep ended before {target} flows were archived"
            );
            assert!(
                Instant::now() < deadline,
                "{what}: timed out waiting for an upload at the gate"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if info_field(c, "flows_archived") >= target {
            assert_eq!(
                info_field(c, "sweep_running"),
                1,
                "{what}: the sweep ended with an upload held"
            );
            return;
        }
        gate();
    }
}

/// Server args of a node that replicates diskless and, as a replica, loads asynchronously (`swapdb`):
/// the old data is served until the new is loaded, then swapped in at once, with no keyspace event.
pub const ASYNC_LOAD: [&str; 6] = [
    "--repl-diskless-sync",
    "yes",
    "--repl-diskless-sync-delay",
    "0",
    "--repl-diskless-load",
    "swapdb",
];

/// Makes `replica` a replica of the server on `primary_port` and waits until it holds `witness`, a key
/// the primary has.
pub fn replicate(replica: &mut redis::Connection, primary_port: u16, witness: &str) {
    let port = primary_port.to_string();
    cmd::<()>(replica, &["REPLICAOF", "127.0.0.1", &port]).unwrap();
    wait_for("replica sync", Duration::from_secs(20), || {
        cmd::<i64>(replica, &["EXISTS", witness]).unwrap_or(0) == 1
    });
}

pub fn file_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path)
        .map(|s| s.contains(needle))
        .unwrap_or(false)
}

/// Module args (name, value, ...) of a layout without a status index: status and last update then come
/// from the snapshot, and selection walks snapshot keys with SCAN.
pub const NO_STATUS_INDEX: [&str; 8] = [
    "status-key",
    "",
    "status-set-key",
    "",
    "label-set-key",
    "",
    "label-values-key",
    "",
];

// ---------------------------------------------------------------- replies and commands

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub fn text(v: &redis::Value) -> String {
    redis::from_redis_value(v).unwrap()
}

pub fn int(v: &redis::Value) -> i64 {
    redis::from_redis_value(v).unwrap()
}

/// The error text of a command that must fail.
pub fn err_text<T: std::fmt::Debug>(r: redis::RedisResult<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// CONFIG GET of one config, by its full name.
pub fn config(c: &mut redis::Connection, name: &str) -> String {
    let pair: Vec<String> = cmd(c, &["CONFIG", "GET", name]).unwrap();
    pair.get(1).cloned().unwrap_or_default()
}

pub fn config_set(c: &mut redis::Connection, name: &str, value: &str) -> redis::RedisResult<()> {
    cmd(c, &["CONFIG", "SET", name, value])
}

pub fn get(c: &mut redis::Connection, id: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("FLOWARCHIVE.GET").arg(id).query(c)
}

pub fn get_events(
    c: &mut redis::Connection,
    id: &str,
) -> redis::RedisResult<(String, Vec<String>)> {
    redis::cmd("FLOWARCHIVE.GET").arg(id).arg("EVENTS").query(c)
}

/// FLOWARCHIVE.SWEEP with `args`: its summary as a map.
pub fn sweep(
    c: &mut redis::Connection,
    args: &[&str],
) -> redis::RedisResult<std::collections::HashMap<String, redis::Value>> {
    let mut cmd = redis::cmd("FLOWARCHIVE.SWEEP");
    for a in args {
        cmd.arg(*a);
    }
    cmd.query::<redis::Value>(c).map(reply_map)
}

/// A client that keeps the server's main thread busy for a few milliseconds at a time (a Lua loop,
/// again and again), so that each module step waits behind it, until `stop`.
pub struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Busy {
    pub fn start(srv: &super::server::Server) -> Busy {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, mut c) = (stop.clone(), srv.conn());
        let thread = std::thread::spawn(move || {
            let script = "local t = 0 for i = 1, 200000 do t = t + i end return t";
            while !flag.load(Ordering::Relaxed) {
                cmd::<i64>(&mut c, &["EVAL", script, "0"]).unwrap();
            }
        });
        Busy { stop, thread }
    }

    pub fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// Archives flow `id` of DB `db` (FLOWARCHIVE.FLOW on another connection) with its PUT held at the
/// proxy's gate, and applies `change` (given a connection to DB 0) while it is held, then lets it go
/// (`change` may let it go sooner, to act while the commit runs): INFO `buffered_bytes` in the upload
/// and the archive's answer.
pub fn held_upload_in(
    srv: &super::server::Server,
    proxy: &super::proxy::Proxy,
    db: i64,
    id: &str,
    change: impl FnOnce(&mut redis::Connection),
) -> (
    i64,
    redis::RedisResult<std::collections::HashMap<String, redis::Value>>,
) {
    let mut c = srv.conn();
    proxy.hold("PUT");
    let mut other = srv.conn();
    cmd::<()>(&mut other, &["SELECT", &db.to_string()]).unwrap();
    let owned = id.to_string();
    let flow = std::thread::spawn(move || archive(&mut other, &owned));
    wait_for("the PUT held", Duration::from_secs(20), || {
        proxy.gated() > 0
    });
    let held = info_field(&mut c, "buffered_bytes");
    change(&mut c);
    proxy.release();
    let answer = flow.join().unwrap();
    (held, answer)
}

/// FLOWARCHIVE.SWEEP ASYNC: its answer, or the error text.
pub fn sweep_async(c: &mut redis::Connection) -> Result<String, String> {
    redis::cmd("FLOWARCHIVE.SWEEP")
        .arg("ASYNC")
        .query(c)
        .map_err(|e| e.to_string())
}
