//! The archive index as a test reads it, in either format, written from docs/FORMAT.md rather than the
//! module's code, so the module and the documented format are held against each other.

use std::process::Command;

use sha2::{Digest, Sha256};

use super::s3::s3_endpoint;
use super::server::{root, Server, S3_KEY, S3_SECRET};

/// The default `index-key` (standalone).
pub const INDEX: &str = "archived:flows";

/// Where `id` is archived according to the index, in either format (hash first).
pub fn location(c: &mut redis::Connection, id: &str) -> Option<String> {
    let hashed: Option<String> = redis::cmd("HGET").arg(INDEX).arg(id).query(c).unwrap();
    hashed.or_else(|| compact_location(c, INDEX, id))
}

/// The compact entry of `id` under `base`: its bucket key and field.
pub fn compact_entry(base: &str, buckets: u64, id: &str) -> (String, Vec<u8>) {
    let digest = Sha256::digest(id.as_bytes());
    let b = u64::from_be_bytes(digest[..8].try_into().unwrap()) % buckets;
    match uuid_bytes(id) {
        Some(raw) => (format!("{base}:u{b}"), raw),
        None => (format!("{base}:s{b}"), id.as_bytes().to_vec()),
    }
}

fn uuid_bytes(id: &str) -> Option<Vec<u8>> {
    let canonical = id.len() == 36
        && id.char_indices().all(|(i, ch)| match i {
            8 | 13 | 18 | 23 => ch == '-',
            _ => matches!(ch, '0'..='9' | 'a'..='f'),
        });
    canonical.then(|| {
        let hex: String = id.chars().filter(|&ch| ch != '-').collect();
        (0..16)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    })
}

/// The location the compact index under `base` records for `id`, rebuilt as docs/FORMAT.md says.
pub fn compact_location(c: &mut redis::Connection, base: &str, id: &str) -> Option<String> {
    let meta = format!("{base}:meta");
    let buckets: Option<u64> = redis::cmd("HGET")
        .arg(&meta)
        .arg("buckets")
        .query(c)
        .unwrap();
    let (bucket, field) = compact_entry(base, buckets?, id);
    let value: Option<u64> = redis::cmd("HGET")
        .arg(&bucket)
        .arg(&field)
        .query(c)
        .unwrap();
    let value = value?;
    let head: String = redis::cmd("HGET")
        .arg(&meta)
        .arg(format!("h{}", value / 16))
        .query::<Option<String>>(c)
        .unwrap()
        .expect("the head an entry names");
    let folder = head["s3://".len()..].split_once('/').unwrap().1.to_string();
    Some(head + &object_file(&folder, id, value % 16))
}

/// Entries the compact index under `base` counts.
pub fn compact_entries(c: &mut redis::Connection, base: &str) -> i64 {
    let n: Option<i64> = redis::cmd("HGET")
        .arg(format!("{base}:meta"))
        .arg("entries")
        .query(c)
        .unwrap();
    n.unwrap_or(0)
}

fn object_file(folder: &str, id: &str, generation: u64) -> String {
    let escaped: String = id
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let suffix = match generation {
        0 => ".jsonl.gz".to_string(),
        g => format!(".g{g}.jsonl.gz"),
    };
    let file = format!("flows/{escaped}{suffix}");
    if folder.len() + file.len() <= 1024 {
        return file;
    }
    let hex: String = Sha256::digest(id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("flows/_sha256/{hex}{suffix}")
}

/// Runs `scripts/flowarchive-index --rebuild` with `args` against `srv` (a node of a cluster too), with
/// the test store's endpoint and credentials: exit code, stdout, stderr.
pub fn rebuild_index(srv: &Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("python3")
        .arg(root().join("scripts/flowarchive-index"))
        .arg("--rebuild")
        .args(args)
        .env("FLOWARCHIVE_PORT", srv.port.to_string())
        .env_remove("FLOWARCHIVE_DB")
        .env_remove("FLOWARCHIVE_INDEX_KEY")
        .env("FLOWARCHIVE_S3_ENDPOINT", s3_endpoint())
        .env("FLOWARCHIVE_S3_REGION", "us-east-1")
        .env("FLOWARCHIVE_S3_PATH_STYLE", "1")
        .env("AWS_ACCESS_KEY_ID", S3_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `scripts/flowarchive-index --to <to> --batch 3` against `srv` with the environment `extra`: its
/// exit code and output (stdout, then stderr).
pub fn convert_index(srv: &Server, to: &str, extra: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new("python3")
        .arg(root().join("scripts/flowarchive-index"))
        .args(["--to", to, "--batch", "3"])
        .env("FLOWARCHIVE_PORT", srv.port.to_string())
        .envs(extra.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}
