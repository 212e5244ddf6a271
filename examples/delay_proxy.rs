//! A TCP proxy that delays everything it passes by a fixed time in each direction, for scripts/bench's
//! far-S3 run (S3 as a remote region: a PUT and its HEAD each pay the round trip):
//!   delay_proxy <upstream host:port> <one-way delay ms>
//! Prints the port it listens on (127.0.0.1) as one line, then serves until its stdin closes.
//!
//! Each connection is passed through byte for byte, so keep-alive connections stay open and are
//! reused as they would be against a remote store. Every chunk read is written on after the delay,
//! in order, so the delay adds latency without capping throughput (nothing waits behind a sleeping
//! chunk except later chunks of the same connection and direction, which are due later anyway).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

/// Copies `from` to `to`, each chunk `delay` after it was read; closes `to`'s write side at the end.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, chunk) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if chunk.is_empty() || to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).unwrap_or(0);
        let due = Instant::now() + delay;
        if tx.send((due, buf[..n].to_vec())).is_err() || n == 0 {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
    let _ = from.shutdown(Shutdown::Read);
}

fn serve(client: TcpStream, upstream: &str, delay: Duration) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    for s in [&client, &server] {
        let _ = s.set_nodelay(true);
    }
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || pipe(client, server, delay));
    pipe(server2, client2, delay);
    let _ = up.join();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let upstream = args.get(1).expect("upstream host:port").clone();
    let delay_ms: u64 = args.get(2).expect("delay ms").parse().expect("delay ms");
    let delay = Duration::from_millis(delay_ms);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let upstream = upstream.clone();
            std::thread::spawn(move || serve(client, &upstream, delay));
        }
    });
    // Serve until the bench closes our stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}
