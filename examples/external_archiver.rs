//! The best external cron archiver we know how to write, to measure flowarchive against (scripts/bench,
//! peer kind `external-rust`; docs/BENCHMARKS.md, "Against a Rust external archiver").
//!
//!   external_archiver <redis-url> <s3-endpoint> <bucket> <prefix> <threads> [retention-ms]
//!
//! It archives what the module's sweep archives of the bench's flows, in the module's object format
//! (version 1, which the module still reads) and index, so FLOWARCHIVE.GET reads its flows back:
//! - **select**: terminal flows (`completed`, `failed`) whose status ZSET score is older than the
//!   retention (default 1 day), oldest first, from the engine's default layout (docs/ENGINE.md);
//! - **read**, per flow on the worker's own connection, one pipelined round trip: `WATCH` of the
//!   flow's four keys, then its event log (the flow: none, no flow), snapshot and sequence (absent for
//!   most flows), labels, status entries and index entry (long logs in further pipelined pages of
//!   1,000 events);
//! - **encode** an object of docs/FORMAT.md, version 1 (no folded state: FLOWARCHIVE.GET folds the
//!   snapshot, if any, and events when it reads the object; the trailer's `snapshot` and `seq` are
//!   `null` for a flow without them): this file carries its own copy of the small format writer
//!   (header, event lines, trailer; one-pass gzip with a per-thread compressor), duplicated from the
//!   module's `src/format/writer.rs`, whose code the cdylib does not expose;
//! - **upload** with a presigned, write-once PUT (Content-MD5, x-amz-checksum-sha256, the sha256 in
//!   the object's metadata, `If-None-Match: *`) over a keep-alive connection per thread, then **verify**
//!   with a HEAD (size and ETag = MD5). An object already there with the same bytes is an idempotent
//!   retry; other content leaves the flow live;
//! - **commit** as the module does: `MULTI`, one script that checks the flow's status entries are
//!   unchanged and it is not yet indexed, then writes the index entry (`HSET archived:flows`) and
//!   removes the flow as the engine would (`ZREM`/`HDEL` its status entries, `SREM` from its label sets
//!   and the label value once no flow carries it, `UNLINK` its keys), `EXEC`. A write to any of the
//!   flow's keys since it was read aborts the `EXEC` (`WATCH`): the flow stays live. Nothing is deleted
//!   before its object is verified.
//!
//! Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (path-style URLs, region us-east-1).
//! Prints one JSON line: counts, bytes, seconds, and the workers' CPU time per stage (thread CPU clock).

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use md5::Md5;
use redis::{Connection, Value};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde_json::{json, Map};
use sha2::{Digest, Sha256};

const P: &str = "argyll";
const INDEX: &str = "archived:flows";
const TERMINAL: [&str; 2] = ["completed", "failed"];
const PAGE: isize = 1000;
const EXPIRES: Duration = Duration::from_secs(3600);

/// The commit, atomic on the server: refuses (0) when the flow's status entries changed or it is
/// already indexed, else writes the index entry and removes the flow as the engine would (1).
/// KEYS: index, status zset, status hash, the four flow keys, then per label its member set and values
/// set. ARGV: flow id, member, status, captured score, location, then the label values.
const COMMIT: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HGET', KEYS[3], ARGV[2]) ~= ARGV[3] then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[2]) ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
local i = 8
while i < #KEYS do
  redis.call('SREM', KEYS[i], ARGV[2])
  if redis.call('SCARD', KEYS[i]) == 0 then redis.call('SREM', KEYS[i + 1], ARGV[6 + (i - 8) / 2]) end
  i = i + 2
end
redis.call('UNLINK', KEYS[4], KEYS[5], KEYS[6], KEYS[7])
return 1
"#;

// ------------------------------------------------------------------ the format writer (docs/FORMAT.md)

/// Removes whitespace outside strings of a value stored over several lines (JSONL holds one per line).
fn single_line(json: &[u8]) -> Cow<'_, [u8]> {
    if !json.contains(&b'\n') && !json.contains(&b'\r') {
        return Cow::Borrowed(json);
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_str, mut escaped) = (false, false);
    for &b in json {
        if in_str {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_str = b == b'"';
            out.push(b);
        }
    }
    Cow::Owned(out)
}

/// The snapshot as the trailer holds it: one line, no whitespace around the object.
fn snapshot_form(json: &[u8]) -> Vec<u8> {
    let space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let start = json.iter().position(|b| !space(b)).unwrap_or(json.len());
    let end = json
        .iter()
        .rposition(|b| !space(b))
        .map_or(start, |i| i + 1);
    single_line(&json[start..end]).into_owned()
}

fn valid_json(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

struct Flow {
    id: String,
    status: &'static str,
    score: String,
    events: Vec<Vec<u8>>,
    /// `None` for a flow without a snapshot (most of the engine's flows).
    snapshot: Option<Vec<u8>>,
    seq: Option<i64>,
    labels: Vec<(String, String)>,
}

struct Object {
    body: Vec<u8>,
    raw_bytes: u64,
    md5: [u8; 16],
    sha256: [u8; 32],
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Header, event lines and trailer, gzipped; `None` when an event or the snapshot is not JSON (a
/// snapshot must be an object).
fn encode(flow: &Flow, keys: &[String; 4]) -> Option<Object> {
    let mut content =
        Vec::with_capacity(flow.events.iter().map(|e| e.len() + 1).sum::<usize>() + 512);
    for event in &flow.events {
        if !valid_json(event) {
            return None;
        }
        content.extend_from_slice(&single_line(event));
        content.push(b'\n');
    }
    let snapshot = match &flow.snapshot {
        None => b"null".to_vec(),
        Some(stored) => {
            let snapshot = snapshot_form(stored);
            if !matches!(
                serde_json::from_slice(&snapshot),
                Ok(serde_json::Value::Object(_))
            ) {
                return None;
            }
            snapshot
        }
    };
    let labels: Map<String, serde_json::Value> = flow
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let rest = json!({"seq": flow.seq, "labels": labels, "status": flow.status}).to_string();
    content.extend_from_slice(br#"{"snapshot":"#);
    content.extend_from_slice(&snapshot);
    content.push(b',');
    content.extend_from_slice(&rest.as_bytes()[1..]);
    content.push(b'\n');
    let header = json!({
        "format": "flowarchive",
        "version": 1,
        "flow_id": flow.id,
        "db": 0,
        "events": flow.events.len(),
        "raw_bytes": content.len(),
        "sha256": hex(&Sha256::digest(&content)),
        "keys": {"events": keys[0], "snapshot": keys[1], "seq": keys[2], "labels": keys[3]},
    })
    .to_string();
    let body = gzip(&[header.as_bytes(), b"\n", &content])?;
    Some(Object {
        raw_bytes: (header.len() + 1 + content.len()) as u64,
        md5: Md5::digest(&body).into(),
        sha256: Sha256::digest(&body).into(),
        body,
    })
}

thread_local! {
    static DEFLATE: RefCell<Compress> = RefCell::new(Compress::new(Compression::new(1), false));
}

/// One gzip member (mtime 0, as the module writes), deflated in one pass by the thread's compressor.
fn gzip(parts: &[&[u8]]) -> Option<Vec<u8>> {
    let raw: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = vec![0u8; 10 + raw / 2 + 1024];
    out[..10].copy_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255]);
    let mut used = 10;
    DEFLATE.with(|d| {
        let mut d = d.borrow_mut();
        d.reset();
        for (i, part) in parts.iter().enumerate() {
            let flush = if i + 1 == parts.len() {
                FlushCompress::Finish
            } else {
                FlushCompress::None
            };
            let mut input = *part;
            loop {
                if used == out.len() {
                    out.resize(out.len() * 2, 0);
                }
                let (i0, o0) = (d.total_in(), d.total_out());
                let status = d.compress(input, &mut out[used..], flush).ok()?;
                let (consumed, written) =
                    ((d.total_in() - i0) as usize, (d.total_out() - o0) as usize);
                used += written;
                input = &input[consumed..];
                if flush == FlushCompress::Finish && status == Status::StreamEnd
                    || flush == FlushCompress::None && input.is_empty()
                {
                    break;
                }
                if consumed == 0 && written == 0 && used < out.len() {
                    return None;
                }
            }
        }
        Some(())
    })?;
    out.truncate(used);
    let mut crc = Crc::new();
    parts.iter().for_each(|p| crc.update(p));
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&crc.amount().to_le_bytes());
    Some(out)
}

/// `<prefix>/flows/<escaped id>.jsonl.gz` (docs/FORMAT.md, "Object key"; DB 0, first generation).
fn object_key(prefix: &str, id: &str) -> String {
    let folder = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    let mut escaped = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            escaped.push(b as char);
        } else {
            escaped.push_str(&format!("%{b:02X}"));
        }
    }
    let key = format!("{folder}flows/{escaped}.jsonl.gz");
    if key.len() <= 1024 {
        key
    } else {
        format!(
            "{folder}flows/_sha256/{}.jsonl.gz",
            hex(&Sha256::digest(id.as_bytes()))
        )
    }
}

// ------------------------------------------------------------------ S3

struct S3 {
    bucket: Bucket,
    creds: Credentials,
}

enum Stored {
    Verified,
    /// Other bytes are at the key, or the store did not prove ours: the flow stays live.
    NotProven,
}

impl S3 {
    fn put_verified(
        &self,
        agent: &ureq::Agent,
        key: &str,
        obj: &Object,
    ) -> Result<Stored, Box<ureq::Error>> {
        let md5 = B64.encode(obj.md5);
        let sha = B64.encode(obj.sha256);
        let sha_hex = hex(&obj.sha256);
        let headers = [
            ("content-md5", md5.as_str()),
            ("content-type", "application/x-ndjson"),
            ("if-none-match", "*"),
            ("x-amz-meta-flowarchive-sha256", sha_hex.as_str()),
            ("x-amz-checksum-sha256", sha.as_str()),
        ];
        let mut put = self.bucket.put_object(Some(&self.creds), key);
        for (name, value) in headers {
            put.headers_mut().insert(name, value);
        }
        let mut request = agent.put(put.sign(EXPIRES).as_str());
        for (name, value) in headers {
            request = request.set(name, value);
        }
        match request.send_bytes(&obj.body) {
            Ok(_) | Err(ureq::Error::Status(412 | 409, _)) => {}
            Err(e) => return Err(Box::new(e)),
        }
        let head = self.bucket.head_object(Some(&self.creds), key);
        let stored = agent
            .head(head.sign(EXPIRES).as_str())
            .call()
            .map_err(Box::new)?;
        let size = stored.header("content-length").and_then(|v| v.parse().ok());
        let etag = stored
            .header("etag")
            .map(|e| e.trim_matches('"').to_string());
        Ok(
            if size == Some(obj.body.len()) && etag == Some(hex(&obj.md5)) {
                Stored::Verified
            } else {
                Stored::NotProven
            },
        )
    }
}

// ------------------------------------------------------------------ Valkey

fn flow_keys(id: &str) -> [String; 4] {
    ["events", "snapshot:val", "snapshot:seq", "idx:labels"].map(|k| format!("{P}:flow:{id}:{k}"))
}

/// Candidates: (id, status, score as the server prints it), oldest first per status.
fn select(
    con: &mut Connection,
    cutoff_ms: i64,
) -> redis::RedisResult<Vec<(String, &'static str, String)>> {
    let mut out = Vec::new();
    for status in TERMINAL {
        let mut offset = 0;
        loop {
            let page: Vec<(String, String)> = redis::cmd("ZRANGE")
                .arg(format!("{P}:idx:status:{status}"))
                .arg("-inf")
                .arg(cutoff_ms)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(offset)
                .arg(1000)
                .arg("WITHSCORES")
                .query(con)?;
            if page.is_empty() {
                break;
            }
            offset += page.len();
            out.extend(page.into_iter().filter_map(|(member, score)| {
                member
                    .strip_prefix("flow:")
                    .map(|id| (id.to_string(), status, score))
            }));
        }
    }
    Ok(out)
}

/// The replies of `read_flow`'s pipeline: WATCH, the first page of events, the log's length,
/// snapshot, seq, labels, status hash entry, status ZSET score, whether the index has the flow.
type FlowReads = (
    Value,
    Vec<Vec<u8>>,
    isize,
    Option<Vec<u8>>,
    Option<i64>,
    Vec<(String, String)>,
    Option<String>,
    Option<String>,
    bool,
);

/// WATCHes the flow's keys and reads it (one round trip, more for long logs). `None`: no longer a
/// candidate (status or score changed, already indexed, gone: no event log).
fn read_flow(
    con: &mut Connection,
    id: &str,
    status: &'static str,
    score: &str,
    keys: &[String; 4],
) -> redis::RedisResult<Option<Flow>> {
    let member = format!("flow:{id}");
    let (_, events, len, snapshot, seq, labels, hstatus, zscore, indexed): FlowReads =
        redis::pipe()
            .cmd("WATCH")
            .arg(&keys[..])
            .cmd("LRANGE")
            .arg(&keys[0])
            .arg(0)
            .arg(PAGE - 1)
            .cmd("LLEN")
            .arg(&keys[0])
            .cmd("GET")
            .arg(&keys[1])
            .cmd("GET")
            .arg(&keys[2])
            .cmd("HGETALL")
            .arg(&keys[3])
            .cmd("HGET")
            .arg(format!("{P}:idx:status"))
            .arg(&member)
            .cmd("ZSCORE")
            .arg(format!("{P}:idx:status:{status}"))
            .arg(&member)
            .cmd("HEXISTS")
            .arg(INDEX)
            .arg(id)
            .query(con)?;
    if len == 0 || indexed || hstatus.as_deref() != Some(status) || zscore.as_deref() != Some(score)
    {
        return Ok(None);
    }
    let mut events = events;
    if len > PAGE {
        let mut pages = redis::pipe();
        let mut start = PAGE;
        while start < len {
            pages
                .cmd("LRANGE")
                .arg(&keys[0])
                .arg(start)
                .arg(start + PAGE - 1);
            start += PAGE;
        }
        let rest: Vec<Vec<Vec<u8>>> = pages.query(con)?;
        events.extend(rest.into_iter().flatten());
    }
    Ok(Some(Flow {
        id: id.to_string(),
        status,
        score: score.to_string(),
        events,
        snapshot,
        seq,
        labels,
    }))
}

/// MULTI, the commit script (by its sha1), EXEC. `Some(true)`: archived; `Some(false)`: the script
/// refused (the status entries changed, or already indexed); `None`: EXEC aborted because a watched
/// key changed.
fn commit(
    con: &mut Connection,
    script_sha: &str,
    flow: &Flow,
    keys: &[String; 4],
    location: &str,
) -> redis::RedisResult<Option<bool>> {
    let member = format!("flow:{}", flow.id);
    let mut script_keys = vec![
        INDEX.to_string(),
        format!("{P}:idx:status:{}", flow.status),
        format!("{P}:idx:status"),
    ];
    script_keys.extend(keys.iter().cloned());
    let mut script_args = vec![
        flow.id.clone(),
        member,
        flow.status.to_string(),
        flow.score.clone(),
        location.to_string(),
    ];
    for (label, value) in &flow.labels {
        script_keys.push(format!("{P}:idx:label:{label}:{value}"));
        script_keys.push(format!("{P}:idx:label:{label}"));
        script_args.push(value.clone());
    }
    let done: Option<(i64,)> = redis::pipe()
        .atomic()
        .cmd("EVALSHA")
        .arg(script_sha)
        .arg(script_keys.len())
        .arg(script_keys)
        .arg(script_args)
        .query(con)?;
    Ok(done.map(|(n,)| n == 1))
}

// ------------------------------------------------------------------ the run

#[derive(Default)]
struct Tally {
    archived: usize,
    skipped_changed: usize,
    skipped_ineligible: usize,
    failed: usize,
    raw_bytes: u64,
    stored_bytes: u64,
    /// Thread CPU microseconds per stage: read, encode, upload+verify, commit.
    cpu_us: [u64; 4],
}

fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

struct Job {
    client: redis::Client,
    s3: S3,
    prefix: String,
    script_sha: String,
    flows: Vec<(String, &'static str, String)>,
    next: AtomicUsize,
    tally: Mutex<Tally>,
}

fn worker(job: &Job) -> redis::RedisResult<()> {
    let mut con = job.client.get_connection()?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let mut t = Tally::default();
    while let Some((id, status, score)) = job.flows.get(job.next.fetch_add(1, Ordering::Relaxed)) {
        let keys = flow_keys(id);
        let mut clock = thread_cpu_us();
        let mut lap = |stage: usize, t: &mut Tally| {
            let now = thread_cpu_us();
            t.cpu_us[stage] += now - clock;
            clock = now;
        };
        let flow = read_flow(&mut con, id, status, score, &keys);
        lap(0, &mut t);
        let Ok(Some(flow)) = flow else {
            redis::cmd("UNWATCH").query::<()>(&mut con)?;
            match flow {
                Ok(_) => t.skipped_ineligible += 1,
                Err(_) => t.failed += 1, // not readable as the layout says (e.g. seq not an integer)
            }
            continue;
        };
        let obj = encode(&flow, &keys);
        lap(1, &mut t);
        let Some(obj) = obj else {
            redis::cmd("UNWATCH").query::<()>(&mut con)?;
            t.failed += 1;
            continue;
        };
        let key = object_key(&job.prefix, id);
        let stored = job.s3.put_verified(&agent, &key, &obj);
        lap(2, &mut t);
        if !matches!(stored, Ok(Stored::Verified)) {
            redis::cmd("UNWATCH").query::<()>(&mut con)?;
            t.failed += 1;
            continue;
        }
        let location = format!("s3://{}/{key}", job.s3.bucket.name());
        let done = commit(&mut con, &job.script_sha, &flow, &keys, &location);
        lap(3, &mut t);
        match done {
            Ok(Some(true)) => {
                t.archived += 1;
                t.raw_bytes += obj.raw_bytes;
                t.stored_bytes += obj.body.len() as u64;
            }
            Ok(Some(false)) => t.skipped_ineligible += 1,
            Ok(None) => t.skipped_changed += 1,
            // The transaction failed as a whole (nothing was written): the flow stays live.
            Err(_) => t.failed += 1,
        }
    }
    let mut all = job.tally.lock().unwrap_or_else(|e| e.into_inner());
    all.archived += t.archived;
    all.skipped_changed += t.skipped_changed;
    all.skipped_ineligible += t.skipped_ineligible;
    all.failed += t.failed;
    all.raw_bytes += t.raw_bytes;
    all.stored_bytes += t.stored_bytes;
    for (a, b) in all.cpu_us.iter_mut().zip(t.cpu_us) {
        *a += b;
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 6 {
        eprintln!("usage: external_archiver <redis-url> <s3-endpoint> <bucket> <prefix> <threads> [retention-ms]");
        std::process::exit(2);
    }
    let threads: usize = args[5].parse().expect("threads");
    let retention: i64 = args
        .get(6)
        .map_or(86_400_000, |r| r.parse().expect("retention-ms"));
    let client = redis::Client::open(args[1].as_str()).expect("redis url");
    let endpoint = args[2].parse().expect("endpoint url");
    let bucket =
        Bucket::new(endpoint, UrlStyle::Path, args[3].clone(), "us-east-1").expect("bucket");
    let creds = Credentials::new(
        std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
        std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
    );
    let start = Instant::now();
    let mut con = client.get_connection().expect("connect");
    // Loaded once, so a commit never meets NOSCRIPT inside its transaction.
    let script_sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(COMMIT)
        .query(&mut con)
        .expect("SCRIPT LOAD");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let flows = select(&mut con, now - retention).expect("select");
    let candidates = flows.len();
    let job = Arc::new(Job {
        client,
        s3: S3 { bucket, creds },
        prefix: args[4].clone(),
        script_sha,
        flows,
        next: AtomicUsize::new(0),
        tally: Mutex::new(Tally::default()),
    });
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let job = job.clone();
            std::thread::spawn(move || worker(&job))
        })
        .collect();
    for h in handles {
        h.join()
            .expect("worker panicked")
            .expect("Valkey connection failed");
    }
    let secs = start.elapsed().as_secs_f64();
    let t = job.tally.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "{}",
        json!({
            "candidates": candidates, "archived": t.archived, "skipped_changed": t.skipped_changed,
            "skipped_ineligible": t.skipped_ineligible, "failed": t.failed, "raw_bytes": t.raw_bytes,
            "stored_bytes": t.stored_bytes, "seconds": secs,
            "worker_cpu_us": {"read": t.cpu_us[0], "encode": t.cpu_us[1], "upload": t.cpu_us[2], "commit": t.cpu_us[3]},
        })
    );
}
