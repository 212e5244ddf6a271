use std::time::{Duration, Instant};

use super::throttle::{throttle, TokenBucket, THROTTLE_SLICE};
use super::verify::{Answer, Proof, Proven};
use super::*;

pub(super) fn settings() -> S3Settings {
    S3Settings {
        endpoint: "http://127.0.0.1:9".into(),
        region: "us-east-1".into(),
        bucket: "flows".into(),
        prefix: String::new(),
        path_style: true,
        credentials: credentials::CredentialConfig {
            pin: None,
            access_key: "AKIDEXAMPLE".into(),
            secret_key: credentials::Hidden("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into()),
            region: "us-east-1".into(),
            tls_ca_file: String::new(),
            warn: |_| {},
        },
        timeout_ms: 1000,
        verify: VerifyMode::Head,
        notice: |_| {},
        object_name_max: crate::layout::OBJECT_NAME_MAX,
        upload_bytes_per_sec: &NO_CAP,
        retry: retry::Policy {
            attempts: 1,
            total: Duration::from_secs(10),
        },
        sse: Sse::None,
        sse_kms_key_id: String::new(),
        storage_class: String::new(),
        checksum: Checksum::Sha256,
    }
}

/// What the store signs with (static keys: no request).
fn signing(store: &Store) -> rusty_s3::Credentials {
    credentials::current(&store.credentials, Duration::from_secs(1))
        .unwrap()
        .signing()
}

static NO_CAP: AtomicI64 = AtomicI64::new(0);

#[test]
fn token_bucket_follows_the_current_rate() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let waits = |r: Result<(), Duration>, ms: u64| {
        let w = r.expect_err("should wait").as_secs_f64() * 1000.0;
        assert!((w - ms as f64).abs() < 1.0, "waits {w} ms, not {ms}");
    };
    let mut b = TokenBucket::new();
    // A new cap starts with a full bucket (one second of the rate): 500 bytes at 10 B/s pass and
    // leave a debt of 490 bytes.
    assert_eq!(b.admit(500, 10, at(0)), Ok(()));
    waits(b.admit(1, 10, at(0)), 49_100);
    // Two seconds later, 20 bytes of the debt are repaid.
    waits(b.admit(1, 10, at(2000)), 47_100);
    // Raising the cap applies to the debt at once: 100 ms at 100 MB/s repays it.
    assert_eq!(b.admit(1, 100 << 20, at(2100)), Ok(()));
    // Lowering it applies at once too: the bucket holds at most one second of the new rate.
    assert_eq!(b.admit(30, 10, at(2200)), Ok(()));
    waits(b.admit(5, 10, at(2200)), 2500);
    // 0 is unlimited and forgets the debt.
    assert_eq!(b.admit(1 << 30, 0, at(2200)), Ok(()));
    assert_eq!(b.admit(10, 10, at(2200)), Ok(()));
}

#[test]
fn token_bucket_keeps_the_long_run_rate() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new();
    let mut now = t0;
    let mut sent = 0u64;
    for i in 0..200u64 {
        let bytes = 1 + (i * 7919) % 3000;
        while let Err(wait) = b.admit(bytes, 1000, now) {
            now += wait.min(THROTTLE_SLICE);
        }
        sent += bytes;
    }
    // Everything sent but the first full bucket took `sent / rate` seconds, give or take one slice.
    let took = (now - t0).as_secs_f64();
    let ideal = (sent - 1000) as f64 / 1000.0;
    assert!(
        took >= ideal - 3.0 && took <= ideal + 0.1,
        "{took} vs {ideal}"
    );
}

#[test]
fn throttle_without_a_cap_passes_at_once() {
    let start = Instant::now();
    throttle(1 << 30, &NO_CAP);
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn extracts_s3_error_codes() {
    let xml = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
    assert_eq!(s3_error_code(xml), Some("SignatureDoesNotMatch"));
    assert_eq!(s3_error_code("<Code><script></Code>"), None);
    assert_eq!(s3_error_code("plain"), None);
}

/// The PUT the module sends (`put_request`, as `put_verified` and the checksum probe build it):
/// every digest and the write-once condition signed, and sent with the very values signed.
#[test]
fn presigned_put_signs_the_checksum_headers() {
    let digests = Digests {
        md5_b64: "1B2M2Y8AsgTpgAmY7PhCfg==".into(),
        sha_b64: "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
        sha_hex: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
    };
    let agent = ureq::Agent::new();
    let store = Store::new(&settings()).unwrap();
    let put = store.put_request(&agent, &signing(&store), "flows/a%3Ab.jsonl.gz", &digests);
    let url = put.url();
    assert!(
        url.starts_with("http://127.0.0.1:9/flows/flows/a%253Ab.jsonl.gz?"),
        "{url}"
    );
    assert!(
        url.contains(
            "X-Amz-SignedHeaders=content-md5%3Bcontent-type%3Bhost%3Bif-none-match%3B\
             x-amz-checksum-sha256%3Bx-amz-meta-flowarchive-sha256&"
        ),
        "{url}"
    );
    for (name, value) in [
        ("content-md5", digests.md5_b64.as_str()),
        ("if-none-match", "*"),
        ("x-amz-checksum-sha256", digests.sha_b64.as_str()),
        ("x-amz-meta-flowarchive-sha256", digests.sha_hex.as_str()),
    ] {
        assert_eq!(put.header(name), Some(value), "{name}");
    }
    assert!(
        !url.contains("wJalrXUtnFEMI"),
        "the secret never appears in a URL"
    );
    // `checksum md5`: no x-amz-checksum-* header, signed or sent.
    let md5 = Store::new(&S3Settings {
        checksum: Checksum::Md5,
        ..settings()
    })
    .unwrap();
    let put = md5.put_request(&agent, &signing(&md5), "flows/x.jsonl.gz", &digests);
    assert!(!put.url().contains("x-amz-checksum"), "{}", put.url());
    assert_eq!(put.header("x-amz-checksum-sha256"), None);
    assert_eq!(put.header("content-md5"), Some(digests.md5_b64.as_str()));
    assert_eq!(
        store.location("flows/x.jsonl.gz"),
        "s3://flows/flows/x.jsonl.gz"
    );
}

fn answer(etag: Option<&str>, sha: Option<&str>, recorded: Option<&str>) -> Answer {
    Answer {
        size: Some(3),
        etag: etag.map(String::from),
        sha: sha.map(String::from),
        recorded: recorded.map(String::from),
        encrypted_by_key: false,
    }
}

/// Every proof a store gives must agree: one contradiction fails the verification, whatever else
/// agrees (a store that records a client's checksum unchecked, as moto does, echoes ours for
/// corrupted bytes while its ETag is their MD5).
#[test]
fn every_proof_must_agree_and_one_contradiction_fails() {
    let md5 = "0cc175b9c0f1b6a831c399e269772661";
    let other = "92eb5ffee6ae2fec3ad71c777531578f";
    let proof = Proof {
        size: 3,
        md5_hex: md5.into(),
        sha_b64: "c2hh",
        sha_hex: "ab12".into(),
        metadata_proves: false,
        kms: false,
    };
    let ok = |a: &Answer| proof.check("HEAD", "k", a).unwrap();
    assert_eq!(ok(&answer(Some(md5), None, None)), Proven::ByStore);
    assert_eq!(
        ok(&answer(Some(md5), Some("c2hh"), Some("ab12"))),
        Proven::ByStore
    );
    assert_eq!(
        ok(&answer(Some("opaque-etag"), Some("c2hh"), None)),
        Proven::ByEcho,
        "a checksum only as the upload sent it"
    );
    assert_eq!(
        ok(&answer(Some("opaque-etag"), None, Some("ab12"))),
        Proven::Not,
        "metadata alone proves nothing"
    );
    for (what, a) in [
        (
            "an MD5 ETag of other bytes",
            answer(Some(other), Some("c2hh"), None),
        ),
        (
            "another checksum",
            answer(Some(md5), Some("b3RoZXI="), None),
        ),
        (
            "another recorded sha256",
            answer(Some(md5), Some("c2hh"), Some("ffff")),
        ),
    ] {
        let e = proof.check("HEAD", "k", &a).unwrap_err();
        assert_eq!(e.kind, FailureKind::Verify, "{what}");
        assert!(e.message.contains("contradicts"), "{what}: {e}");
    }
    let mut short = answer(Some(md5), None, None);
    short.size = Some(2);
    assert!(proof.check("HEAD", "k", &short).is_err(), "size");
    short.size = None;
    assert_eq!(
        proof.check("PUT", "k", &short).unwrap(),
        Proven::ByStore,
        "a PUT's answer states no object size"
    );
    // An object encrypted with a KMS or customer key has an ETag that is no MD5: not counted, so
    // only the echoed checksum speaks for it.
    let mut kms = answer(Some(other), Some("c2hh"), None);
    kms.encrypted_by_key = true;
    assert_eq!(ok(&kms), Proven::ByEcho);
    kms.sha = None;
    assert_eq!(ok(&kms), Proven::Not);
}

#[test]
fn refuses_missing_bucket() {
    let mut s = settings();
    s.bucket.clear();
    let err = Store::new(&s).err().unwrap();
    assert_eq!(err.kind, FailureKind::Config);
    assert!(err.message.contains("flowarchive.bucket"));
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let store = Store::new(&settings()).unwrap();
    let obj = Encoded {
        body: b"x".to_vec(),
        raw_bytes: 1,
        object_sha256: [0; 32],
        object_md5: [0; 16],
    };
    let err = store.put_verified("flows/x.jsonl.gz", &obj).err().unwrap();
    assert_eq!(err.kind, FailureKind::Unreachable, "{err}");
    assert!(!err.message.contains("X-Amz"), "{err}");
}

/// The settings of the shared SeaweedFS of the test bed (scripts/s3.sh; credentials as in
/// tests/common/mod.rs), its bucket created, and a prefix of this test run.
pub(super) fn seaweedfs_settings() -> (S3Settings, String) {
    let endpoint = std::env::var("FLOWARCHIVE_S3_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:18333".into());
    let mut s = S3Settings {
        endpoint,
        bucket: "flowarchive-tests".into(),
        timeout_ms: 10_000,
        ..settings()
    };
    s.credentials.access_key = "flowarchive-test-key".into();
    s.credentials.secret_key = credentials::Hidden("flowarchive-test-secret-9f3b".into());
    let store = Store::new(&s).unwrap();
    let url = store
        .bucket
        .create_bucket(&signing(&store))
        .sign(Duration::from_secs(60));
    let agent = http::agent(&store.endpoint, "").unwrap();
    match agent.put(url.as_str()).call() {
        Ok(_) | Err(ureq::Error::Status(409, _)) => {}
        Err(e) => panic!("SeaweedFS not usable (scripts/s3.sh start): {e}"),
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    (s, format!("unit-{}-{nanos}", std::process::id()))
}

/// A store of the shared SeaweedFS, and a prefix of this test run.
fn seaweedfs() -> (Store, String) {
    let (s, prefix) = seaweedfs_settings();
    (Store::new(&s).unwrap(), prefix)
}

fn encoded(body: &[u8]) -> Encoded {
    use md5::Md5;
    use sha2::{Digest, Sha256};
    Encoded {
        body: body.to_vec(),
        raw_bytes: body.len() as u64,
        object_sha256: Sha256::digest(body).into(),
        object_md5: Md5::digest(body).into(),
    }
}

#[test]
#[ignore = "needs the test bed's SeaweedFS; scripts/test.sh runs it"]
fn seaweedfs_second_put_of_a_key_is_exists_and_keeps_the_first_object() {
    let (store, prefix) = seaweedfs();
    let key = format!("{prefix}/flows/twice.jsonl.gz");
    let first = encoded(b"first history");
    store.put_verified(&key, &first).unwrap();
    for verify in [VerifyMode::Head, VerifyMode::PutResponse, VerifyMode::Auto] {
        let store = Store {
            verify,
            ..seaweedfs().0
        };
        let err = store
            .put_verified(&key, &encoded(b"another history"))
            .unwrap_err();
        assert_eq!(err.kind, FailureKind::Exists, "{err}");
        assert!(err.message.contains("already exists"), "{err}");
        // Even the same bytes are not rewritten: the caller compares and decides.
        let err = store.put_verified(&key, &first).unwrap_err();
        assert_eq!(err.kind, FailureKind::Exists, "{err}");
    }
    let (body, recorded) = store.get(&key, MAX_OBJECT).unwrap();
    assert_eq!(body, b"first history");
    assert_eq!(recorded, Some(hex(&first.object_sha256)));
}

#[test]
#[ignore = "needs the test bed's SeaweedFS; scripts/test.sh runs it"]
fn seaweedfs_get_refuses_objects_over_the_cap() {
    let (store, prefix) = seaweedfs();
    let key = format!("{prefix}/flows/big.jsonl.gz");
    let obj = encoded(&[7u8; 1000]);
    store.put_verified(&key, &obj).unwrap();
    assert_eq!(store.get(&key, 1000).unwrap().0, obj.body);
    let err = store.get(&key, 999).unwrap_err();
    assert_eq!(err.kind, FailureKind::TooLarge, "{err}");
    assert!(err.message.contains("larger than 999 bytes"), "{err}");
    let err = store.get(&format!("{prefix}/flows/none"), 10).unwrap_err();
    assert_eq!(err.kind, FailureKind::Missing, "{err}");
}
