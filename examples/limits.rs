//! Benchmark limits for scripts/bench, on the very objects flowarchive uploaded:
//!   limits s3  <endpoint> <bucket> <src-prefix> <dst-prefix> <concurrency> [request-endpoint]
//!       re-issues only the S3 requests of an archive (presigned PUT with Content-MD5 and
//!       x-amz-checksum-sha256, then HEAD), with `concurrency` threads; no Valkey, no encoding. The
//!       objects are read from <endpoint>, the requests go to [request-endpoint] when given (e.g.
//!       a delaying proxy before the same store). With LIMITS_READY=1 it prints `ready` once the
//!       objects are fetched and waits for a line on stdin before the first request, so a caller can
//!       measure other processes over the request phase alone; its own CPU over that phase is
//!       reported as `cpu_s`.
//!   limits cpu <endpoint> <bucket> <src-prefix>
//!       single-core speed of gzip (level 1) + sha256 + md5 on the objects' uncompressed bytes.
//!   limits gzip <endpoint> <bucket> <src-prefix>
//!       thread CPU per object of three ways to gzip (level 1) the objects' uncompressed bytes: the
//!       module's former encoder (a fresh `GzEncoder` fed each line and its newline), one pass
//!       with a fresh compressor, one pass with one compressor per thread reset for each object (the
//!       module's `format::writer` now). Three rounds each; the least CPU of the three counts.
//! Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Prints one JSON line.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use md5::Md5;
use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use sha2::{Digest, Sha256};

const EXPIRES: Duration = Duration::from_secs(3600);

struct S3 {
    bucket: Bucket,
    creds: Credentials,
    agent: ureq::Agent,
}

fn fetch_all(s3: &S3, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut list = s3.bucket.list_objects_v2(Some(&s3.creds));
        list.with_prefix(prefix);
        if let Some(t) = &token {
            list.with_continuation_token(t.clone());
        }
        let url = list.sign(EXPIRES);
        let text = s3
            .agent
            .get(url.as_str())
            .call()
            .expect("list")
            .into_string()
            .expect("list body");
        let page = ListObjectsV2::parse_response(&text).expect("list xml");
        keys.extend(page.contents.into_iter().map(|o| o.key));
        match page.next_continuation_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    keys.into_iter()
        .map(|k| {
            let url = s3.bucket.get_object(Some(&s3.creds), &k).sign(EXPIRES);
            let mut body = Vec::new();
            s3.agent
                .get(url.as_str())
                .call()
                .expect("get")
                .into_reader()
                .read_to_end(&mut body)
                .expect("read");
            (k, body)
        })
        .collect()
}

fn put_and_head(s3: &S3, key: &str, body: &[u8]) {
    let md5 = B64.encode(Md5::digest(body));
    let sha = B64.encode(Sha256::digest(body));
    // The requests the module makes: a write-once PUT with signed checksums, then a HEAD.
    let mut put = s3.bucket.put_object(Some(&s3.creds), key);
    put.headers_mut().insert("content-md5", md5.clone());
    put.headers_mut()
        .insert("x-amz-checksum-sha256", sha.clone());
    put.headers_mut().insert("if-none-match", "*");
    let url = put.sign(EXPIRES);
    s3.agent
        .put(url.as_str())
        .set("content-md5", &md5)
        .set("x-amz-checksum-sha256", &sha)
        .set("if-none-match", "*")
        .send_bytes(body)
        .expect("put");
    let url = s3.bucket.head_object(Some(&s3.creds), key).sign(EXPIRES);
    s3.agent.head(url.as_str()).call().expect("head");
}

fn gunzip_all(objects: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    objects
        .iter()
        .map(|(_, b)| {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&b[..])
                .read_to_end(&mut out)
                .expect("gunzip");
            out
        })
        .collect()
}

/// CPU seconds (user and system) of this whole process so far.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The module's former encoder: a fresh `GzEncoder`, fed each line, then its newline.
fn gzip_by_lines(raw: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 6 + 64),
        flate2::Compression::new(1),
    );
    for line in raw.split_inclusive(|&b| b == b'\n') {
        let (text, newline) = line.split_at(line.len() - usize::from(line.ends_with(b"\n")));
        gz.write_all(text).expect("gzip");
        gz.write_all(newline).expect("gzip");
    }
    gz.finish().expect("gzip")
}

/// Raw deflate of `raw` in one pass into a buffer zero-filled once (the gzip framing is the same
/// few bytes either way).
fn deflate_one_pass(d: &mut flate2::Compress, raw: &[u8]) -> Vec<u8> {
    d.reset();
    let mut out = vec![0u8; raw.len() / 2 + 1024];
    let mut used = 0;
    loop {
        if used == out.len() {
            out.resize(out.len() * 2, 0);
        }
        let before = (d.total_in() as usize, d.total_out());
        let status = d
            .compress(
                &raw[before.0..],
                &mut out[used..],
                flate2::FlushCompress::Finish,
            )
            .expect("deflate");
        used += (d.total_out() - before.1) as usize;
        if status == flate2::Status::StreamEnd {
            out.truncate(used);
            return out;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let key = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
    let endpoint = args
        .get(2)
        .expect("endpoint")
        .parse()
        .expect("endpoint url");
    let store = |endpoint| {
        let bucket =
            Bucket::new(endpoint, UrlStyle::Path, args[3].clone(), "us-east-1").expect("bucket");
        Arc::new(S3 {
            bucket,
            creds: Credentials::new(key.clone(), secret.clone()),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
        })
    };
    let s3 = store(endpoint);
    let objects = Arc::new(fetch_all(&s3, &args[4]));
    let stored: usize = objects.iter().map(|(_, b)| b.len()).sum();
    match args[1].as_str() {
        "s3" => {
            let dst = args[5].clone();
            let threads: usize = args[6].parse().expect("concurrency");
            let s3 = match args.get(7) {
                Some(requests) => store(requests.parse().expect("request endpoint url")),
                None => s3,
            };
            if std::env::var("LIMITS_READY").as_deref() == Ok("1") {
                println!("ready");
                std::io::stdout().flush().expect("stdout");
                std::io::stdin()
                    .read_line(&mut String::new())
                    .expect("stdin");
            }
            let next = Arc::new(AtomicUsize::new(0));
            let cpu = process_cpu_s();
            let start = Instant::now();
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (s3, objects, next, dst) =
                        (s3.clone(), objects.clone(), next.clone(), dst.clone());
                    std::thread::spawn(move || loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some((k, body)) = objects.get(i) else {
                            break;
                        };
                        let name = k.rsplit('/').next().unwrap_or(k);
                        put_and_head(&s3, &format!("{dst}/{name}"), body);
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("worker");
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                r#"{{"objects":{},"stored_bytes":{stored},"seconds":{secs},"cpu_s":{}}}"#,
                objects.len(),
                process_cpu_s() - cpu
            );
        }
        "cpu" => {
            let raw = gunzip_all(&objects);
            let raw_bytes: usize = raw.iter().map(Vec::len).sum();
            let start = Instant::now();
            for r in &raw {
                let content = Sha256::digest(r);
                let mut gz = flate2::write::GzEncoder::new(
                    Vec::with_capacity(r.len() / 6),
                    flate2::Compression::new(1),
                );
                gz.write_all(r).expect("gzip");
                let body = gz.finish().expect("gzip");
                std::hint::black_box((content, Sha256::digest(&body), Md5::digest(&body)));
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                r#"{{"objects":{},"raw_bytes":{raw_bytes},"seconds":{secs}}}"#,
                raw.len()
            );
        }
        "gzip" => {
            let raw = gunzip_all(&objects);
            let mut reused = flate2::Compress::new(flate2::Compression::new(1), false);
            let mut best = [u64::MAX; 3];
            for _ in 0..3 {
                for (way, best) in best.iter_mut().enumerate() {
                    let start = thread_cpu_ns();
                    for r in &raw {
                        let body = match way {
                            0 => gzip_by_lines(r),
                            1 => deflate_one_pass(
                                &mut flate2::Compress::new(flate2::Compression::new(1), false),
                                r,
                            ),
                            _ => deflate_one_pass(&mut reused, r),
                        };
                        std::hint::black_box(body);
                    }
                    *best = (*best).min(thread_cpu_ns() - start);
                }
            }
            let per = |ns: u64| ns as f64 / 1000.0 / raw.len().max(1) as f64;
            println!(
                r#"{{"objects":{},"raw_bytes":{},"us_per_object":{{"by_lines_fresh":{:.1},"one_pass_fresh":{:.1},"one_pass_reused":{:.1}}}}}"#,
                raw.len(),
                raw.iter().map(Vec::len).sum::<usize>(),
                per(best[0]),
                per(best[1]),
                per(best[2])
            );
        }
        other => panic!("unknown mode {other}"),
    }
}
