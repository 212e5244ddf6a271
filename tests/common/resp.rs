//! A client that sees a reply's exact bytes: commands are sent as RESP arrays over a plain socket and
//! each reply is taken whole, as the server wrote it (a client library would hide a simple string
//! written for a bulk one, or a RESP2 null for a RESP3 one).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct RawConn {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl RawConn {
    /// A connection to the server on `port`, speaking RESP3 after `HELLO 3` when `resp3`.
    pub fn open(port: u16, resp3: bool) -> RawConn {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut conn = RawConn { stream, reader };
        if resp3 {
            let hello = conn.call(&[b"HELLO", b"3"]);
            assert!(
                hello.starts_with(b"%"),
                "{}",
                String::from_utf8_lossy(&hello)
            );
        }
        conn
    }

    /// Sends one command without waiting for its reply.
    pub fn send(&mut self, args: &[&[u8]]) {
        self.stream.write_all(&command(args)).unwrap();
    }

    /// Sends one command and takes its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> Vec<u8> {
        self.send(args);
        self.reply()
    }

    /// The next reply, whole, as its bytes came.
    pub fn reply(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.frame(&mut out);
        out
    }

    fn line(&mut self, out: &mut Vec<u8>) -> (u8, String) {
        let from = out.len();
        self.reader.read_until(b'\n', out).unwrap();
        let line = &out[from..];
        assert!(
            line.ends_with(b"\r\n"),
            "cut reply: {:?}",
            String::from_utf8_lossy(out)
        );
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        (line[0], text)
    }

    fn frame(&mut self, out: &mut Vec<u8>) {
        let (kind, text) = self.line(out);
        let n = |t: &str| t.parse::<i64>().unwrap();
        match kind {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => {}
            b'$' | b'=' | b'!' if n(&text) >= 0 => {
                let from = out.len();
                out.resize(from + n(&text) as usize + 2, 0);
                self.reader.read_exact(&mut out[from..]).unwrap();
                assert!(out.ends_with(b"\r\n"), "a bulk string past its length");
            }
            b'$' => {}
            b'*' | b'~' | b'>' => (0..n(&text).max(0)).for_each(|_| self.frame(out)),
            b'%' | b'|' => (0..2 * n(&text)).for_each(|_| self.frame(out)),
            other => panic!("not RESP: {:?}", other as char),
        }
    }
}

/// A command as a RESP array of bulk strings.
pub fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(bulk(a).as_slice());
    }
    out
}

/// One bulk string.
pub fn bulk(bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", bytes.len()).into_bytes();
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
    out
}

/// `[state, [event, ...]]` as RESP2 and RESP3 both write it: arrays of bulk strings.
pub fn state_and_events<E: AsRef<[u8]>>(state: &[u8], events: &[E]) -> Vec<u8> {
    let mut out = b"*2\r\n".to_vec();
    out.extend(bulk(state));
    out.extend(format!("*{}\r\n", events.len()).into_bytes());
    for e in events {
        out.extend(bulk(e.as_ref()));
    }
    out
}
