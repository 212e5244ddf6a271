//! Test bed: real valkey-server / redis-server processes with the module loaded, a real SeaweedFS
//! (started by scripts/s3.sh, shared by all tests, one bucket per test), and a fault-injecting proxy.
#![allow(dead_code)]

pub mod aws;
pub mod checker;
pub mod http;
pub mod proxy;
pub mod s3front;
pub mod sigv4;
pub mod tls;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

pub const S3_KEY: &str = "flowarchive-test-key";
pub const S3_SECRET: &str = "flowarchive-test-secret-9f3b";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Paths written by scripts/install-deps.sh, overridable from the environment.
fn testbed(name: &str) -> String {
    if let Ok(v) = std::env::var(name) {
        return v;
    }
    let env = std::fs::read_to_string(root().join("target/testbed.env"))
        .expect("target/testbed.env missing: run scripts/install-deps.sh (or scripts/test.sh)");
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("{name} not in target/testbed.env"))
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flavor {
    Valkey9,
    Valkey8,
    Redis7,
}

impl Flavor {
    pub fn binary(self) -> String {
        testbed(match self {
            Flavor::Valkey9 => "FLOWARCHIVE_VALKEY9",
            Flavor::Valkey8 => "FLOWARCHIVE_VALKEY8",
            Flavor::Redis7 => "FLOWARCHIVE_REDIS7",
        })
    }
}

pub fn module_path() -> PathBuf {
    if let Ok(p) = std::env::var("FLOWARCHIVE_MODULE") {
        return PathBuf::from(p);
    }
    let p = root().join("target/debug/libflowarchive.so");
    assert!(
        p.exists(),
        "{} missing: run `cargo build` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A unique name per test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

// ---------------------------------------------------------------- S3

pub fn s3_endpoint() -> String {
    std::env::var("FLOWARCHIVE_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:18333".into())
}

pub fn s3_port() -> u16 {
    s3_endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(18333)
}

/// A file holding the test secret (for `secret-key-file`), written once per test process; the rename
/// makes it appear whole to test processes running at the same time.
pub fn secret_file() -> PathBuf {
    static WRITTEN: std::sync::Once = std::sync::Once::new();
    let path = root().join("target/test-secret-key");
    WRITTEN.call_once(|| {
        let tmp = root().join(format!("target/test-secret-key.{}", std::process::id()));
        std::fs::write(&tmp, format!("{S3_SECRET}\n")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    });
    path
}

/// The shared test bucket, and this test's own object prefix inside it. (One bucket for all tests:
/// SeaweedFS gives every bucket its own volumes and runs out of them after a few dozen.)
pub struct S3 {
    pub bucket: Bucket,
    pub creds: Credentials,
    pub agent: ureq::Agent,
    pub prefix: String,
}

const TEST_BUCKET: &str = "flowarchive-tests";
static BUCKET_READY: std::sync::Once = std::sync::Once::new();

impl S3 {
    /// A fresh prefix in the shared test bucket (created on first use).
    pub fn new_bucket() -> S3 {
        assert!(
            TcpStream::connect(("127.0.0.1", s3_port())).is_ok(),
            "SeaweedFS not reachable at {}: start it with scripts/s3.sh start (scripts/test.sh does)",
            s3_endpoint()
        );
        let bucket = Bucket::new(
            s3_endpoint().parse().unwrap(),
            UrlStyle::Path,
            TEST_BUCKET,
            "us-east-1",
        )
        .unwrap();
        let s3 = S3 {
            bucket,
            creds: Credentials::new(S3_KEY, S3_SECRET),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(20))
                .build(),
            prefix: unique("t"),
        };
        BUCKET_READY.call_once(|| s3.create_bucket());
        s3
    }

    fn create_bucket(&self) {
        let url = self
            .bucket
            .create_bucket(&self.creds)
            .sign(Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.agent.put(url.as_str()).call() {
                Ok(_) | Err(ureq::Error::Status(409, _)) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("create bucket: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("cannot create bucket: {e}"),
            }
        }
    }

    pub fn name(&self) -> &str {
        self.bucket.name()
    }

    /// The object key of `rel` (e.g. `flows/abc.jsonl.gz`) under this test's prefix.
    pub fn key(&self, rel: &str) -> String {
        format!("{}/{rel}", self.prefix)
    }

    /// The `s3://` location the module records for `rel`.
    pub fn location(&self, rel: &str) -> String {
        format!("s3://{}/{}", self.name(), self.key(rel))
    }

    /// Module args that point the module at this bucket and prefix (the secret through a file: the
    /// module refuses a `secret-key` load argument).
    pub fn module_args(&self, endpoint: &str) -> Vec<String> {
        let secret_file = secret_file();
        [
            "endpoint",
            endpoint,
            "bucket",
            self.name(),
            "prefix",
            &self.prefix,
            "path-style",
            "yes",
            "access-key",
            S3_KEY,
            "secret-key-file",
            secret_file.to_str().unwrap(),
            "region",
            "us-east-1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn get(&self, rel: &str) -> Option<Vec<u8>> {
        let url = self
            .bucket
            .get_object(Some(&self.creds), &self.key(rel))
            .sign(Duration::from_secs(60));
        match self.agent.get(url.as_str()).call() {
            Ok(r) => {
                let mut body = Vec::new();
                r.into_reader().read_to_end(&mut body).unwrap();
                Some(body)
            }
            Err(ureq::Error::Status(404, _)) => None,
            Err(e) => panic!("GET {rel}: {e}"),
        }
    }

    pub fn put(&self, rel: &str, body: &[u8]) {
        let url = self
            .bucket
            .put_object(Some(&self.creds), &self.key(rel))
            .sign(Duration::from_secs(60));
        self.agent.put(url.as_str()).send_bytes(body).unwrap();
    }

    /// Uploads `body` the way flowarchive does, with its sha256 recorded in the object metadata.
    pub fn put_as_archive(&self, rel: &str, body: &[u8]) {
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let key = self.key(rel);
        let mut action = self.bucket.put_object(Some(&self.creds), &key);
        action
            .headers_mut()
            .insert("x-amz-meta-flowarchive-sha256", sha.clone());
        let url = action.sign(Duration::from_secs(60));
        self.agent
            .put(url.as_str())
            .set("x-amz-meta-flowarchive-sha256", &sha)
            .send_bytes(body)
            .unwrap();
    }

    pub fn delete(&self, rel: &str) {
        let url = self
            .bucket
            .delete_object(Some(&self.creds), &self.key(rel))
            .sign(Duration::from_secs(60));
        self.agent.delete(url.as_str()).call().unwrap();
    }

    /// Object keys under this test's prefix, relative to it.
    pub fn list(&self) -> Vec<String> {
        let mut action = self.bucket.list_objects_v2(Some(&self.creds));
        action.with_prefix(format!("{}/", self.prefix));
        action.with_max_keys(1000);
        let url = action.sign(Duration::from_secs(60));
        let text = self
            .agent
            .get(url.as_str())
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        let parsed = rusty_s3::actions::ListObjectsV2::parse_response(&text).unwrap();
        let strip = format!("{}/", self.prefix);
        parsed
            .contents
            .into_iter()
            .map(|o| o.key.trim_start_matches(&strip).to_string())
            .collect()
    }
}

// ---------------------------------------------------------------- servers

/// A server process with the module loaded; killed when dropped.
pub struct Server {
    pub port: u16,
    pub dir: PathBuf,
    pub flavor: Flavor,
    child: Child,
    opts: ServerOpts,
    /// The config file given as the first argument, if any (CONFIG REWRITE writes there).
    conf: Option<PathBuf>,
}

#[derive(Clone)]
pub struct ServerOpts {
    pub flavor: Flavor,
    pub module_args: Vec<String>,
    pub extra: Vec<String>,
    /// Environment of the server process (e.g. AWS_* variables for the credential chain).
    pub env: Vec<(String, String)>,
}

impl ServerOpts {
    pub fn new(s3: &S3) -> Self {
        ServerOpts {
            flavor: Flavor::Valkey9,
            module_args: s3.module_args(&s3_endpoint()),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A Valkey 9 server for `s3`, reaching S3 through `proxy` when given, with extra module args.
pub fn server_via(s3: &S3, proxy: Option<&proxy::Proxy>, extra: &[&str]) -> Server {
    let mut opts = ServerOpts::new(s3);
    if let Some(p) = proxy {
        opts.module_args = s3.module_args(&p.endpoint());
    }
    opts.module_args.extend(extra.iter().map(|a| a.to_string()));
    Server::start(opts)
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(opts: ServerOpts) -> Server {
        Self::start_with(opts, None)
    }

    /// Starts a server whose first argument is the config file `conf` (created empty when missing),
    /// so CONFIG REWRITE has a file to write and a restart reads it.
    pub fn start_with_config_file(opts: ServerOpts, conf: &Path) -> Server {
        if !conf.exists() {
            std::fs::write(conf, "").unwrap();
        }
        Self::start_with(opts, Some(conf.to_path_buf()))
    }

    /// Starts a server that must fail to start (e.g. the module refuses to load); its log.
    pub fn start_failing(opts: ServerOpts) -> String {
        let dir = root().join("target/test-servers").join(unique("srv"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Self::spawn(&opts, free_port(), &dir, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("the server started although it should not have");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        log
    }

    fn start_with(opts: ServerOpts, conf: Option<PathBuf>) -> Server {
        // A free port can be taken by an outgoing connection before the server binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let dir = root().join("target/test-servers").join(unique("srv"));
            std::fs::create_dir_all(&dir).unwrap();
            let child = Self::spawn(&opts, port, &dir, conf.as_deref());
            let mut server = Server {
                port,
                dir,
                flavor: opts.flavor,
                child,
                opts: opts.clone(),
                conf: conf.clone(),
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("server did not start; log:\n{log}"),
            }
        }
        panic!("no free port after 5 tries");
    }

    /// Kills the server (SIGKILL, no shutdown) and starts it again on the same port and directory.
    pub fn crash_and_restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.opts, self.port, &self.dir, self.conf.as_deref());
        if let Err(log) = self.wait_ready() {
            panic!("server did not restart; log:\n{log}");
        }
    }

    /// Kills the server and starts it from its config file alone (as CONFIG REWRITE left it: port,
    /// directory, log file and `loadmodule` line with its arguments).
    pub fn restart_from_config_file(&mut self) {
        let conf = self.conf.clone().expect("started with a config file");
        self.kill();
        self.child = Self::command(self.flavor)
            .arg(conf)
            .spawn()
            .expect("cannot start server");
        if let Err(log) = self.wait_ready() {
            panic!("server did not restart from its config file; log:\n{log}");
        }
    }

    fn spawn(opts: &ServerOpts, port: u16, dir: &Path, conf: Option<&Path>) -> Child {
        let mut cmd = Self::command(opts.flavor);
        cmd.args(conf)
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("server.log"))
            .arg("--save")
            .arg("")
            .arg("--loglevel")
            .arg("verbose")
            .arg("--loadmodule")
            .arg(module_path())
            .args(&opts.module_args)
            .args(&opts.extra)
            .envs(opts.env.iter().map(|(k, v)| (k, v)));
        cmd.spawn().expect("cannot start server")
    }

    fn command(flavor: Flavor) -> Command {
        let mut cmd = Command::new(flavor.binary());
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            // The module falls back to the server's AWS_* environment; tests pass keys explicitly,
            // and never let the credential chain reach for an instance metadata service off this
            // machine (a test that wants IMDS sets its mock's endpoint and turns this off).
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        cmd
    }

    /// Waits until the server answers PING; its log if it exits or never answers.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(self.log());
            }
            if let Ok(mut c) = self.try_conn() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(self.log())
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?;
        let c = client.get_connection_with_timeout(Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(c)
    }

    pub fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect")
    }

    pub fn conn_resp3(&self) -> redis::Connection {
        let client =
            redis::Client::open(format!("redis://127.0.0.1:{}/?protocol=resp3", self.port))
                .unwrap();
        client.get_connection().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------- flows

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

pub fn file_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path)
        .map(|s| s.contains(needle))
        .unwrap_or(false)
}
