//! The shared SeaweedFS of the test bed (scripts/s3.sh): one bucket, a prefix per test.

use std::io::Read;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::*;

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

/// When this test process first asked for a prefix (seconds since the epoch, base 36): the bucket
/// outlives test processes, whose ids the system reuses, so a prefix of the process id alone can name
/// an earlier run's objects.
fn process_stamp() -> &'static str {
    static STAMP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STAMP.get_or_init(|| {
        let mut secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut digits = Vec::new();
        while secs > 0 {
            digits.push(char::from_digit((secs % 36) as u32, 36).unwrap());
            secs /= 36;
        }
        digits.iter().rev().collect()
    })
}
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
            prefix: format!("{}-{}", unique("t"), process_stamp()),
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

    /// Whether a bucket of this name exists on the test store (a signed HEAD bucket).
    pub fn bucket_exists(&self, name: &str) -> bool {
        let bucket = Bucket::new(
            s3_endpoint().parse().unwrap(),
            UrlStyle::Path,
            name.to_string(),
            "us-east-1",
        )
        .unwrap();
        let url = bucket
            .head_bucket(Some(&self.creds))
            .sign(Duration::from_secs(60));
        match self.agent.head(url.as_str()).call() {
            Ok(_) => true,
            Err(ureq::Error::Status(404, _)) => false,
            Err(e) => panic!("HEAD bucket {name}: {e}"),
        }
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
