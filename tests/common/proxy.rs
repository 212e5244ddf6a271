//! A fault-injecting HTTP proxy in front of SeaweedFS. Every request gets its own upstream connection
//! (and `Connection: close`), so a fault applies to exactly the requests it matches.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer this status with an S3-style XML error, never reaching S3 (503 is `SlowDown`, other 5xx
    /// `InternalError`, 4xx `AccessDenied`).
    Status(u16),
    /// Apply the inner fault to every other matching request (the first, the third, ...) and forward
    /// the rest: with `Status(503)`, a throttling store that a retry gets through.
    EveryOther(Box<Fault>),
    /// Forward, then close the connection without passing the answer on: the request took effect,
    /// its answer is lost.
    LoseAnswer,
    /// Read the request, then never answer.
    Hang,
    /// Read the request, then close the connection without an answer.
    Reset,
    /// Forward after this long.
    Delay(Duration),
    /// Hold the request, reading no timeout, until the rules next change ([`Proxy::release`],
    /// [`Proxy::clear`], [`Proxy::set`]), then forward it as it is; a held request ends unanswered
    /// if the proxy stops first. A test acts while an upload is held with it, however late it runs.
    Gate,
    /// Hold the request, like [`Fault::Gate`], for as long as the first rule it matches is a `Latch`:
    /// a change of the other rules (a [`Fault::Gate`] stepped on) leaves it held; one that drops its
    /// rule lets it go on.
    Latch,
    /// Forward, then cut the response body to half.
    Truncate,
    /// Answer `200 OK` with the ETag S3 gives the request body (its MD5), never reaching S3: a store
    /// that claims to have stored an object it did not store.
    FakeStored,
    /// A store that records a client's checksum without checking the bytes (moto does, when the SDK's
    /// checksum-algorithm header comes with the PUT) and corrupts them: the proxy keeps the PUT's body
    /// with one byte flipped, answers it with the MD5 ETag of what it kept and the client's checksum
    /// echoed, and serves that object to HEAD and GET (with the client's metadata) and DELETE, never
    /// reaching S3 for the matched paths. It honours `If-None-Match: *`.
    EchoUnchecked,
    /// A store that checks no `x-amz-checksum-*` header and corrupts what it keeps after answering:
    /// it takes any PUT (one whose checksum names other bytes too) and answers it as a good store
    /// would for the bytes sent (their MD5 as ETag, the client's checksum echoed), then keeps them
    /// with one byte flipped and serves that object to HEAD and GET (the MD5 ETag of what it kept,
    /// the client's checksum and metadata) and DELETE, never reaching S3 for the matched paths. The
    /// PUT's answer cannot show the corruption; a HEAD does. It honours `If-None-Match: *`.
    ChecksumIgnored,
    /// A store that ignores `If-None-Match: *`: it keeps every PUT's body as sent, replacing any
    /// object at the key, answers it as a good store would (its MD5 as ETag, the client's checksum
    /// echoed), and serves it to HEAD and GET (with the client's metadata) and DELETE, never reaching
    /// S3 for the matched paths.
    Overwrites,
    /// Answer this redirect status (301, 307...) with a `Location`, never reaching S3.
    Redirect(u16),
    /// Answer 200 announcing a body of 100 GB and send five bytes, never reaching S3.
    HugeLength,
}

#[derive(Clone, Debug)]
pub struct Rule {
    /// HTTP method to match, or "" for any.
    pub method: &'static str,
    /// Substring of the request path to match, or "" for any.
    pub path: String,
    pub fault: Fault,
}

impl Rule {
    /// Whether this rule applies to a request of `method` for `path`.
    fn matches(&self, method: &str, path: &str) -> bool {
        (self.method.is_empty() || self.method == method) && path.contains(&self.path)
    }
}

/// An object the proxy holds itself (`Fault::EchoUnchecked`): its bytes and the headers it answers.
struct Held {
    body: Vec<u8>,
    headers: Vec<(String, String)>,
}

struct Shared {
    rules: Mutex<Vec<Rule>>,
    held: Mutex<std::collections::HashMap<String, Held>>,
    upstream: String,
    stop: AtomicBool,
    requests: Mutex<Vec<String>>,
    heads: Mutex<Vec<String>>,
    faulted: AtomicUsize,
    /// Requests matched by [`Fault::EveryOther`] so far.
    alternated: AtomicUsize,
    /// Bumped by every change of the rules: a request held by [`Fault::Gate`] goes on once it moves.
    generation: AtomicUsize,
    /// The generation each request held by [`Fault::Gate`] waits to see move.
    gated: Mutex<Vec<usize>>,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    pub fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            rules: Mutex::new(Vec::new()),
            held: Mutex::new(std::collections::HashMap::new()),
            upstream: format!("127.0.0.1:{upstream_port}"),
            stop: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            heads: Mutex::new(Vec::new()),
            faulted: AtomicUsize::new(0),
            alternated: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            gated: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || handle(conn, &s));
                }
            }
        });
        Proxy { port, shared }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, rules: Vec<Rule>) {
        let mut current = self.shared.rules.lock().unwrap();
        *current = rules;
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn all(&self, fault: Fault) {
        self.set(vec![Rule {
            method: "",
            path: String::new(),
            fault,
        }]);
    }

    /// Delays every `method` request by `by` before forwarding it.
    pub fn delay(&self, method: &'static str, by: Duration) {
        self.set(vec![Rule {
            method,
            path: String::new(),
            fault: Fault::Delay(by),
        }]);
    }

    /// Holds every `method` request of a flow's object ([`Fault::Gate`]) until [`Proxy::release`];
    /// the module's probes of a store before its first upload go on.
    pub fn hold(&self, method: &'static str) {
        self.set(vec![Rule {
            method,
            path: "/flows/".into(),
            fault: Fault::Gate,
        }]);
    }

    /// Forwards the requests held by [`Proxy::hold`] and lets later ones through unfaulted.
    pub fn release(&self) {
        self.clear();
    }

    pub fn clear(&self) {
        self.set(Vec::new());
    }

    /// "METHOD path" of every request seen.
    pub fn requests(&self) -> Vec<String> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The head (request line and headers, lowercased) of every request seen.
    pub fn heads(&self) -> Vec<String> {
        self.shared.heads.lock().unwrap().clone()
    }

    /// How many requests [`Fault::Gate`] holds now: not counting one that a change of the rules has
    /// let go but that has not left the gate yet, so a request counted stays held until the next change.
    pub fn gated(&self) -> usize {
        let gated = self.shared.gated.lock().unwrap();
        let generation = self.shared.generation.load(Ordering::SeqCst);
        gated.iter().filter(|&&g| g == generation).count()
    }

    pub fn faulted(&self) -> usize {
        self.shared.faulted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_request(conn: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = conn.read(&mut byte).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut byte).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    let first = head.lines().next().unwrap_or("").to_string();
    // Force one request per upstream connection.
    let mut rewritten: Vec<u8> = head
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .flat_map(|l| format!("{l}\r\n").into_bytes())
        .collect();
    rewritten.extend_from_slice(b"Connection: close\r\n\r\n");
    rewritten.extend_from_slice(&buf[head_end..]);
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    Some((method, path, rewritten))
}

impl Fault {
    /// What the store this fault plays keeps of a PUT, for a fault that plays one.
    fn kept(&self) -> Option<Kept> {
        match self {
            Fault::EchoUnchecked => Some(Kept::Flipped),
            Fault::ChecksumIgnored => Some(Kept::FlippedAnsweredAsSent),
            Fault::Overwrites => Some(Kept::AsSent),
            _ => None,
        }
    }
}

/// What a store the proxy plays keeps of a PUT, and how it answers it.
#[derive(Clone, Copy, PartialEq)]
enum Kept {
    /// The bytes with one flipped, answered with their own ETag (`Fault::EchoUnchecked`).
    Flipped,
    /// The bytes with one flipped, answered with the ETag of those sent (`Fault::ChecksumIgnored`).
    FlippedAnsweredAsSent,
    /// The bytes as sent (`Fault::Overwrites`).
    AsSent,
}

/// `Fault::EchoUnchecked`, `Fault::ChecksumIgnored` and `Fault::Overwrites`: the proxy is the store
/// for the matched object, keeping what `kept` says. It checks no checksum; the first two honour
/// `If-None-Match: *` (412 for a key they hold), as moto does, and `Overwrites` does not.
fn echo_unchecked(
    conn: &mut TcpStream,
    s: &Shared,
    method: &str,
    path: &str,
    request: &[u8],
    head_end: usize,
    kept: Kept,
) {
    use md5::Digest;
    let key = path.split('?').next().unwrap_or(path).to_string();
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let mut held = s.held.lock().unwrap();
    let answer = |conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut out = format!("HTTP/1.1 {status}\r\n");
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let _ = conn.write_all(out.as_bytes());
        let _ = conn.write_all(body);
    };
    match method {
        "PUT"
            if kept != Kept::AsSent
                && header("if-none-match").as_deref() == Some("*")
                && held.contains_key(&key) =>
        {
            let refused = b"<Error><Code>PreconditionFailed</Code></Error>";
            answer(conn, "412 Precondition Failed", &[], refused);
        }
        "PUT" => {
            let sent = &request[head_end..];
            let mut body = sent.to_vec();
            let middle = body.len() / 2;
            if let (Some(b), false) = (body.get_mut(middle), kept == Kept::AsSent) {
                *b ^= 0x20;
            }
            let etag = |bytes: &[u8]| -> (String, String) {
                let hex: String = md5::Md5::digest(bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                ("ETag".to_string(), format!("\"{hex}\""))
            };
            let mut headers = vec![etag(&body)];
            if let Some(sha) = header("x-amz-checksum-sha256") {
                headers.push(("x-amz-checksum-sha256".into(), sha));
            }
            let mut answered = headers.clone();
            if kept == Kept::FlippedAnsweredAsSent {
                answered[0] = etag(sent);
            }
            answer(conn, "200 OK", &answered, b"");
            if let Some(meta) = header("x-amz-meta-flowarchive-sha256") {
                headers.push(("x-amz-meta-flowarchive-sha256".into(), meta));
            }
            held.insert(key, Held { body, headers });
        }
        "HEAD" | "GET" => match held.get(&key) {
            Some(h) if method == "GET" => answer(conn, "200 OK", &h.headers, &h.body),
            Some(h) => {
                let mut headers = h.headers.clone();
                headers.push(("Content-Length".into(), h.body.len().to_string()));
                let mut out = "HTTP/1.1 200 OK\r\n".to_string();
                for (k, v) in &headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("Connection: close\r\n\r\n");
                let _ = conn.write_all(out.as_bytes());
            }
            None => answer(conn, "404 Not Found", &[], b""),
        },
        "DELETE" => {
            held.remove(&key);
            answer(conn, "204 No Content", &[], b"");
        }
        _ => answer(conn, "400 Bad Request", &[], b""),
    }
}

/// Serves one request per client connection (the answer closes it).
fn handle(mut conn: TcpStream, s: &Shared) {
    let Some((method, path, request)) = read_request(&mut conn) else {
        return;
    };
    s.requests.lock().unwrap().push(format!("{method} {path}"));
    let head_end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(request.len(), |p| p + 4);
    s.heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&request[..head_end]).to_lowercase());
    let rules = s.rules.lock().unwrap();
    // Read under the rules' lock: a change after this match moves it.
    let generation = s.generation.load(Ordering::SeqCst);
    let fault = rules
        .iter()
        .find(|r| r.matches(&method, &path))
        .map(|r| r.fault.clone())
        .and_then(|f| match f {
            Fault::EveryOther(inner) => s
                .alternated
                .fetch_add(1, Ordering::SeqCst)
                .is_multiple_of(2)
                .then_some(*inner),
            f => Some(f),
        });
    drop(rules);
    if fault.is_some() {
        s.faulted.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(kept) = fault.as_ref().and_then(Fault::kept) {
        echo_unchecked(&mut conn, s, &method, &path, &request, head_end, kept);
        return;
    }
    match fault {
        Some(Fault::Status(code)) => {
            let body = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{}</Code><Message>injected</Message></Error>",
                match code {
                    503 => "SlowDown",
                    500.. => "InternalError",
                    _ => "AccessDenied",
                }
            );
            let head = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
                head.len()
            );
            return;
        }
        Some(Fault::Hang) => {
            while !s.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                let mut probe = [0u8; 1];
                conn.set_read_timeout(Some(Duration::from_millis(1))).ok();
                if matches!(conn.peek(&mut probe), Ok(0)) {
                    return;
                }
            }
            return;
        }
        Some(Fault::FakeStored) => {
            use md5::Digest;
            let etag: String = md5::Md5::digest(&request[head_end..])
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nETag: \"{etag}\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        Some(Fault::Reset) => {
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        Some(Fault::HugeLength) => {
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\nConnection: close\r\n\r\nshort",
            );
            return;
        }
        Some(Fault::Redirect(code)) => {
            let _ = write!(
                conn,
                "HTTP/1.1 {code} Moved\r\nLocation: http://elsewhere.invalid{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        Some(Fault::Delay(d)) => std::thread::sleep(d),
        Some(Fault::Latch) => loop {
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
            let latched = s
                .rules
                .lock()
                .unwrap()
                .iter()
                .find(|r| r.matches(&method, &path))
                .is_some_and(|r| r.fault == Fault::Latch);
            if !latched {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        },
        Some(Fault::Gate) => {
            s.gated.lock().unwrap().push(generation);
            while s.generation.load(Ordering::SeqCst) == generation
                && !s.stop.load(Ordering::SeqCst)
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut gated = s.gated.lock().unwrap();
            if let Some(i) = gated.iter().position(|&g| g == generation) {
                gated.swap_remove(i);
            }
            drop(gated);
            if s.stop.load(Ordering::SeqCst) {
                return;
            }
        }
        _ => {}
    }
    let Ok(mut up) = TcpStream::connect(&s.upstream) else {
        return;
    };
    if up.write_all(&request).is_err() {
        return;
    }
    let mut response = Vec::new();
    let _ = up.read_to_end(&mut response);
    if fault == Some(Fault::LoseAnswer) {
        let _ = conn.shutdown(Shutdown::Both);
        return;
    }
    if fault == Some(Fault::Truncate) {
        if let Some(p) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let body_len = response.len() - (p + 4);
            response.truncate(p + 4 + body_len / 2);
        }
    }
    // Upstream closed after one answer; closing tells the client too.
    let _ = conn.write_all(&response);
}
