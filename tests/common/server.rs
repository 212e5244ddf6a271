//! Servers under test: real valkey-server / redis-server processes with the module loaded, killed
//! when dropped; the paths install-deps.sh resolved; free ports and unique names.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::*;

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

/// A free port below the kernel's ephemeral range (from 20000), so no outgoing connection can take it
/// between this check and a server binding it: for ports a test cannot retry, like a cluster bus.
pub fn stable_free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let base = 20_000 + (std::process::id() as usize * 97) % 10_000;
    loop {
        let port = (20_000 + (base + NEXT.fetch_add(1, Ordering::SeqCst)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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

/// Sends `sig` (e.g. `-STOP`, `-CONT`) to a server process.
pub fn signal(sig: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

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

    /// The server's peak resident memory so far (VmHWM), in bytes: unlike INFO's `used_memory_peak`,
    /// sampled between commands, it also holds a copy made and freed within one main-thread step.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb << 10
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
        Self::start_failing_with(opts, None)
    }

    /// `start_failing` with the config file `conf` as the first argument: what it loads (a
    /// `loadmodule` line) comes before the module.
    pub fn start_failing_with_config_file(opts: ServerOpts, conf: &Path) -> String {
        Self::start_failing_with(opts, Some(conf))
    }

    fn start_failing_with(opts: ServerOpts, conf: Option<&Path>) -> String {
        let dir = root().join("target/test-servers").join(unique("srv"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Self::spawn(&opts, free_port(), &dir, conf);
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
                // Ready once it answers PING (not while it loads its data), and the server answering
                // must be this one: a port another test's server took between `free_port` and this
                // one's bind answers too, while this one is still failing to bind.
                let ready = redis::cmd("PING").query::<String>(&mut c).is_ok();
                if ready && self.answers_as_itself(&mut c) {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(self.log())
    }

    /// Whether the server behind `c` is this one's process (`INFO server`'s `process_id`).
    fn answers_as_itself(&self, c: &mut redis::Connection) -> bool {
        let Ok(info) = redis::cmd("INFO").arg("server").query::<String>(c) else {
            return false;
        };
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse::<u32>().ok());
        pid == Some(self.child.id())
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
