//! A small HTTP/1.1 server for test doubles: keep-alive (so a client's connection pool is visible),
//! optional TLS (rustls), one thread per connection, every request recorded and every accepted TCP
//! connection counted. The answer comes from a handler; [`super::s3front`] and [`super::aws`] are the
//! handlers. Bodies are `Content-Length` only (what ureq and the module send).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest request the server reads (heads and bodies of the module's requests are far smaller).
const MAX_REQUEST: usize = 64 << 20;
/// An idle keep-alive connection is closed after this long.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// Header names lowercased, values trimmed, in the order sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn query(&self) -> &str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }
}

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response::new(status, "text/plain", body)
    }

    /// An S3-style XML error.
    pub fn s3_error(status: u16, code: &str, message: &str) -> Response {
        Response::new(
            status,
            "application/xml",
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
            ),
        )
    }
}

pub type Handler = Arc<dyn Fn(&Request) -> Response + Send + Sync>;

struct Shared {
    stop: AtomicBool,
    connections: AtomicUsize,
    requests: Mutex<Vec<Request>>,
}

pub struct HttpServer {
    pub port: u16,
    tls: bool,
    shared: Arc<Shared>,
}

impl HttpServer {
    /// Serves `handler` on a new loopback port, over TLS when `tls` is given.
    pub fn start(tls: Option<Arc<rustls::ServerConfig>>, handler: Handler) -> HttpServer {
        Self::start_with(tls, handler, true)
    }

    /// As [`HttpServer::start`]; without `keep_alive` every answer closes its connection (so each
    /// request of a client costs a new TCP and TLS handshake).
    pub fn start_with(
        tls: Option<Arc<rustls::ServerConfig>>,
        handler: Handler,
        keep_alive: bool,
    ) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let server = HttpServer {
            port,
            tls: tls.is_some(),
            shared: shared.clone(),
        };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let (shared, handler, tls) = (shared.clone(), handler.clone(), tls.clone());
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(IDLE));
                    // As servers do: an answer goes out at once, not after the client's delayed ACK.
                    let _ = conn.set_nodelay(true);
                    match tls {
                        Some(config) => {
                            let Ok(tls) = rustls::ServerConnection::new(config) else {
                                return;
                            };
                            let stream = rustls::StreamOwned::new(tls, conn);
                            serve(stream, &shared, &handler, keep_alive);
                        }
                        None => serve(conn, &shared, &handler, keep_alive),
                    }
                });
            }
        });
        server
    }

    /// `http://127.0.0.1:port` or `https://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every request served so far (bodies included).
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().unwrap().clear();
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Answers requests on one connection until the client closes it, asks to, or idles out.
fn serve<S: Read + Write>(stream: S, shared: &Shared, handler: &Handler, keep_alive: bool) {
    let mut reader = BufReader::new(stream);
    while !shared.stop.load(Ordering::SeqCst) {
        let Some(request) = read_request(&mut reader) else {
            return;
        };
        shared.requests.lock().unwrap().push(request.clone());
        let response = handler(&request);
        let close = !keep_alive
            || request
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if write_response(reader.get_mut(), &request, &response, close).is_err() || close {
            return;
        }
    }
}

fn read_request(reader: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    if len > MAX_REQUEST {
        return None;
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        target,
        headers,
        body,
    })
}

fn write_response(
    out: &mut impl Write,
    request: &Request,
    response: &Response,
    close: bool,
) -> std::io::Result<()> {
    let head_only = request.method == "HEAD";
    let mut head = format!("HTTP/1.1 {} Test\r\n", response.status);
    for (k, v) in &response.headers {
        let hop = ["connection", "transfer-encoding", "keep-alive"]
            .iter()
            .any(|h| k.eq_ignore_ascii_case(h));
        // A HEAD answer keeps the length of the body it describes; any other gets its own.
        let length = k.eq_ignore_ascii_case("content-length");
        if !hop && (!length || head_only) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    if !head_only {
        head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut answer = head.into_bytes();
    if !head_only {
        answer.extend_from_slice(&response.body);
    }
    out.write_all(&answer)?;
    out.flush()
}
