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

/// A flow written the way the Argyll engine writes it (see shared/flow-layout.md).
pub struct FlowSpec<'a> {
    pub id: &'a str,
    pub status: &'a str,
    /// Unix ms of the last event (status ZSET score and snapshot last_updated).
    pub last_ms: i64,
    pub events: usize,
    pub labels: &'a [(&'a str, &'a str)],
    /// Older engines write events without sequence and aggregate_id.
    pub compact_events: bool,
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
        }
    }
}

pub fn event_json(id: &str, i: usize, compact: bool) -> String {
    let ts = format!(
        "2026-03-18T09:14:{:02}.{:06}Z",
        (i / 1_000_000) % 60,
        i % 1_000_000
    );
    let ty = if i == 0 {
        "flow_started"
    } else {
        "step_completed"
    };
    let data = serde_json::json!({"flow_id": id, "step_id": format!("step-{i}"), "outputs": {"n": i, "note": "x".repeat(i % 50)}});
    if compact {
        serde_json::json!({"timestamp": ts, "type": ty, "data": data}).to_string()
    } else {
        serde_json::json!({"timestamp": ts, "sequence": i, "type": ty, "aggregate_id": ["flow", id], "data": data}).to_string()
    }
}

pub fn snapshot_json(spec: &FlowSpec) -> String {
    let labels: serde_json::Map<String, serde_json::Value> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    serde_json::json!({
        "created_at": "2026-03-18T09:14:03.120481Z",
        "completed_at": "2026-03-18T09:14:05.9Z",
        "last_updated": fmt_ms(spec.last_ms),
        "plan": {"goals": ["ship"], "required": ["order_id"], "steps": {}, "attributes": {}, "excluded": {}},
        "labels": labels,
        "attributes": {"receipt": {"value": "r-77", "step": "charge", "set_at": "2026-03-18T09:14:03.402113Z"}},
        "id": spec.id,
        "status": spec.status,
    })
    .to_string()
}

fn fmt_ms(ms: i64) -> String {
    // Good enough for tests: seconds precision via the system `date`-free arithmetic.
    let secs = ms / 1000;
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
        ms % 1000
    )
}

pub fn write_flow(c: &mut redis::Connection, spec: &FlowSpec) {
    let p = "argyll";
    let id = spec.id;
    let member = format!("flow:{id}");
    let events_key = format!("{p}:flow:{id}:events");
    let mut pipe = redis::pipe();
    for chunk in (0..spec.events).collect::<Vec<_>>().chunks(1000) {
        let evs: Vec<String> = chunk
            .iter()
            .map(|i| event_json(id, *i, spec.compact_events))
            .collect();
        pipe.cmd("RPUSH").arg(&events_key).arg(evs).ignore();
    }
    pipe.cmd("SET")
        .arg(format!("{p}:flow:{id}:snapshot:val"))
        .arg(snapshot_json(spec))
        .ignore();
    pipe.cmd("SET")
        .arg(format!("{p}:flow:{id}:snapshot:seq"))
        .arg(spec.events.saturating_sub(1))
        .ignore();
    for (l, v) in spec.labels {
        pipe.cmd("HSET")
            .arg(format!("{p}:flow:{id}:idx:labels"))
            .arg(*l)
            .arg(*v)
            .ignore();
        pipe.cmd("SADD")
            .arg(format!("{p}:idx:label:{l}:{v}"))
            .arg(&member)
            .ignore();
        pipe.cmd("SADD")
            .arg(format!("{p}:idx:label:{l}"))
            .arg(*v)
            .ignore();
    }
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

pub fn flow_keys(id: &str) -> Vec<String> {
    ["events", "snapshot:val", "snapshot:seq", "idx:labels"]
        .iter()
        .map(|s| format!("argyll:flow:{id}:{s}"))
        .collect()
}

/// Every key of the DB with its type and content in a canonical order (members of sets, hashes and
/// sorted sets sorted), for byte-identical comparisons. DUMP would not do: a large set's DUMP changes
/// while the server rehashes it.
pub fn dump_all(c: &mut redis::Connection) -> Snapshot {
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
    Snapshot(map)
}

#[derive(PartialEq)]
pub struct Snapshot(pub std::collections::BTreeMap<Vec<u8>, (String, Vec<Vec<u8>>)>);

impl Snapshot {
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// Names only the keys that differ, so a failing comparison stays readable.
impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} keys", self.0.len())
    }
}

pub fn assert_same(before: &Snapshot, after: &Snapshot, what: &str) {
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

/// FLOWARCHIVE.SWEEP ASYNC: its answer, or the error text.
pub fn sweep_async(c: &mut redis::Connection) -> Result<String, String> {
    redis::cmd("FLOWARCHIVE.SWEEP")
        .arg("ASYNC")
        .query(c)
        .map_err(|e| e.to_string())
}
