//! Production S3 (issue 11): HTTPS through a private CA, role credentials from IMDSv2 / STS / the
//! container endpoint with rotation, retries, one connection pool, SSE and storage class.
//!
//! Real servers throughout — valkey-server with the module, SeaweedFS behind the verifying S3 front
//! (tests/common/s3front.rs) — and mocks only where AWS itself is the server (tests/common/aws.rs).
//! The first tests prove the test bed itself: a verifier that accepted everything would make every
//! test below unable to fail.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::aws::{now_unix, Credential, Issued, Kind, Mock, IMDS_ROLE};
use common::http::Request;
use common::s3front::S3Front;
use common::sigv4::{self, Signer};
use common::tls::{Ca, CertKind};
use common::*;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

// ------------------------------------------------------------------ the test bed itself

#[test]
fn sigv4_matches_the_aws_presigned_url_example() {
    // The example of the S3 documentation ("Authenticating Requests: Using Query Parameters").
    let pairs = sigv4::query_pairs(
        "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host",
    );
    let headers = [(
        "host".to_string(),
        "examplebucket.s3.amazonaws.com".to_string(),
    )];
    let canonical = sigv4::canonical_request("GET", "/test.txt", &pairs, &headers);
    let to_sign = sigv4::string_to_sign(
        "20130524T000000Z",
        "20130524/us-east-1/s3/aws4_request",
        &canonical,
    );
    assert_eq!(
        to_sign.lines().last().unwrap(),
        "3bfa292879f6447bbcda7001decf97f4a54dc650c8942174ae0a9121cf58ad04"
    );
    let sig = sigv4::signature(
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "20130524",
        "us-east-1",
        "s3",
        &to_sign,
    );
    assert_eq!(
        sig,
        "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
    );
    assert_eq!(
        sigv4::parse_amz_date("20130524T000000Z"),
        Some(1_369_353_600)
    );
    assert_eq!(sigv4::amz_date(1_369_353_600), "20130524T000000Z");
}

/// A request as the module sends it: presigned by rusty-s3 with a session token and signed headers.
fn module_style_request(cred: &Credential, key: &str, now_offset: i64) -> Request {
    let bucket = Bucket::new(
        "http://127.0.0.1:9".parse().unwrap(),
        UrlStyle::Path,
        "flows",
        "us-east-1",
    )
    .unwrap();
    let creds = match &cred.token {
        Some(t) => Credentials::new_with_token(&cred.key_id, &cred.secret, t),
        None => Credentials::new(&cred.key_id, &cred.secret),
    };
    let mut action = bucket.put_object(Some(&creds), key);
    action
        .headers_mut()
        .insert("x-amz-server-side-encryption", "aws:kms");
    action.headers_mut().insert(
        "x-amz-checksum-sha256",
        "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
    );
    let now = time::OffsetDateTime::from_unix_timestamp(now_unix() + now_offset).unwrap();
    let url = action.sign_with_time(Duration::from_secs(60), &now);
    Request {
        method: "PUT".into(),
        target: format!("{}?{}", url.path(), url.query().unwrap()),
        headers: vec![
            ("host".into(), "127.0.0.1:9".into()),
            ("x-amz-server-side-encryption".into(), "aws:kms".into()),
            (
                "x-amz-checksum-sha256".into(),
                "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
            ),
        ],
        body: Vec::new(),
    }
}

#[test]
fn sigv4_verifies_what_rusty_s3_signs_and_nothing_else() {
    let issued = Issued::new();
    let cred = issued.issue("sts", 60);
    let r = module_style_request(&cred, "p/flows/a:b c+d.jsonl.gz", 0);
    let verify = |r: &Request, secret: &str, now: i64| {
        sigv4::verify(&r.method, r.path(), r.query(), &r.headers, secret, now)
    };
    let auth = verify(&r, &cred.secret, now_unix()).unwrap();
    assert_eq!(auth.key_id, cred.key_id);
    assert_eq!(auth.token, cred.token);
    assert!(auth
        .signed_headers
        .contains(&"x-amz-server-side-encryption".to_string()));

    // Another secret, a changed signed header, method or path, a lost header: refused.
    assert_eq!(
        verify(&r, "other", now_unix()).unwrap_err().code,
        "SignatureDoesNotMatch"
    );
    let mut changed = r.clone();
    changed.headers[1].1 = "AES256".into();
    assert_eq!(
        verify(&changed, &cred.secret, now_unix()).unwrap_err().code,
        "SignatureDoesNotMatch"
    );
    let mut changed = r.clone();
    changed.method = "GET".into();
    assert!(verify(&changed, &cred.secret, now_unix()).is_err());
    let mut changed = r.clone();
    changed.target = changed.target.replacen("a%3Ab", "a%3Ac", 1);
    assert!(verify(&changed, &cred.secret, now_unix()).is_err());
    let mut changed = r.clone();
    changed.headers.pop();
    assert_eq!(
        verify(&changed, &cred.secret, now_unix()).unwrap_err().code,
        "AccessDenied"
    );
    // A URL used after X-Amz-Expires: refused.
    let old = module_style_request(&cred, "k", -120);
    assert_eq!(
        verify(&old, &cred.secret, now_unix()).unwrap_err().why,
        "Request has expired"
    );

    // The front's own signer produces what the verifier accepts.
    let headers = vec![("host".to_string(), "h:1".to_string())];
    let signer = Signer {
        key_id: "AK",
        secret: "SK",
        token: Some("T/+="),
        region: "eu-west-1",
    };
    let q = signer.presign("GET", "/b/k%20x", &[], &headers, now_unix(), 60);
    let auth = sigv4::verify("GET", "/b/k%20x", &q, &headers, "SK", now_unix()).unwrap();
    assert_eq!(auth.token.as_deref(), Some("T/+="));
}

/// An ureq agent trusting `ca` (or the web roots when `None`), as a client of the test bed.
fn client(ca: Option<&Ca>) -> ureq::Agent {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        roots.add(ca.der()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    ureq::AgentBuilder::new()
        .tls_config(Arc::new(config))
        .timeout(Duration::from_secs(20))
        .build()
}

fn presigned(
    front: &str,
    s3: &S3,
    cred: &Credential,
    method: &str,
    rel: &str,
    headers: &[(&str, &str)],
) -> String {
    let bucket = Bucket::new(
        front.parse().unwrap(),
        UrlStyle::Path,
        s3.name().to_string(),
        "us-east-1",
    )
    .unwrap();
    let creds = match &cred.token {
        Some(t) => Credentials::new_with_token(&cred.key_id, &cred.secret, t),
        None => Credentials::new(&cred.key_id, &cred.secret),
    };
    let key = s3.key(rel);
    let url = match method {
        "PUT" => {
            let mut a = bucket.put_object(Some(&creds), &key);
            for (k, v) in headers {
                a.headers_mut().insert(*k, *v);
            }
            a.sign(Duration::from_secs(60))
        }
        "HEAD" => bucket
            .head_object(Some(&creds), &key)
            .sign(Duration::from_secs(60)),
        _ => bucket
            .get_object(Some(&creds), &key)
            .sign(Duration::from_secs(60)),
    };
    url.to_string()
}

#[test]
fn s3_front_checks_credentials_then_forwards_to_seaweedfs_over_https() {
    let s3 = S3::new_bucket();
    let ca = Ca::new();
    let issued = Issued::new();
    let front = S3Front::start(issued.clone(), Some(ca.server_config(CertKind::Good)));
    let agent = client(Some(&ca));
    let cred = issued.issue("imds", 2);
    let kms = [
        ("x-amz-server-side-encryption", "aws:kms"),
        ("x-amz-server-side-encryption-aws-kms-key-id", "alias/flows"),
        ("x-amz-storage-class", "STANDARD_IA"),
    ];
    let url = presigned(&front.endpoint(), &s3, &cred, "PUT", "a.bin", &kms);
    let mut req = agent.put(&url);
    for (k, v) in kms {
        req = req.set(k, v);
    }
    let put = req.send_bytes(b"hello").unwrap();
    assert_eq!(put.header("x-amz-server-side-encryption"), Some("aws:kms"));
    assert_eq!(
        s3.get("a.bin").as_deref(),
        Some(&b"hello"[..]),
        "stored in SeaweedFS"
    );
    let head = agent
        .head(&presigned(
            &front.endpoint(),
            &s3,
            &cred,
            "HEAD",
            "a.bin",
            &[],
        ))
        .call()
        .unwrap();
    assert_eq!(head.header("content-length"), Some("5"));
    assert_eq!(
        head.header("x-amz-server-side-encryption-aws-kms-key-id"),
        Some("alias/flows")
    );
    assert_ne!(
        head.header("etag").map(|e| e.trim_matches('"').to_string()),
        Some("5d41402abc4b2a76b9719d911017c592".to_string()),
        "under aws:kms the ETag is not the MD5"
    );
    let seen = front.accepted();
    assert_eq!(seen[0].source, "imds");
    assert_eq!(
        seen[0].signed_header("x-amz-storage-class"),
        Some("STANDARD_IA")
    );
    assert_eq!(
        front.connections(),
        1,
        "one kept-alive connection for all three requests"
    );

    // A wrong token, an unknown key, then the credential once expired: refused, never forwarded.
    let mut forged = cred.clone();
    forged.token = Some("forged".into());
    let err = agent
        .get(&presigned(
            &front.endpoint(),
            &s3,
            &forged,
            "GET",
            "a.bin",
            &[],
        ))
        .call()
        .unwrap_err();
    assert!(matches!(err, ureq::Error::Status(403, _)), "{err}");
    let mut unknown = cred.clone();
    unknown.key_id = "ASIAUNKNOWN".into();
    assert!(agent
        .get(&presigned(
            &front.endpoint(),
            &s3,
            &unknown,
            "GET",
            "a.bin",
            &[]
        ))
        .call()
        .is_err());
    std::thread::sleep(Duration::from_millis(2100));
    let err = agent
        .get(&presigned(
            &front.endpoint(),
            &s3,
            &cred,
            "GET",
            "a.bin",
            &[],
        ))
        .call()
        .unwrap_err();
    let ureq::Error::Status(403, r) = err else {
        panic!("{err}")
    };
    assert!(r
        .into_string()
        .unwrap()
        .contains("<Code>ExpiredToken</Code>"));
    assert_eq!(front.expired(), 1);
    let refused = front.refused();
    assert!(refused[0].starts_with("InvalidToken"), "{refused:?}");
    assert!(refused[1].starts_with("InvalidAccessKeyId"), "{refused:?}");

    // Without the CA, or for an expired certificate or another name, the client refuses the server.
    let err = client(None).get(&front.endpoint()).call().unwrap_err();
    assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    for (kind, cause) in [
        (CertKind::Expired, "Expired"),
        (CertKind::WrongName, "NotValidForName"),
    ] {
        let bad = S3Front::start(issued.clone(), Some(ca.server_config(kind)));
        let err = client(Some(&ca)).get(&bad.endpoint()).call().unwrap_err();
        assert!(format!("{err:?}").contains(cause), "{kind:?}: {err:?}");
    }
}

#[test]
fn mocks_issue_credentials_as_aws_does() {
    let issued = Issued::new();
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .build();
    let status = |r: Result<ureq::Response, ureq::Error>| match r {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, _)) => c,
        Err(e) => panic!("{e}"),
    };

    // IMDSv2: a token first; IMDSv1 (no token) is refused.
    let imds = Mock::start(Kind::Imds, issued.clone(), 30);
    let base = imds.endpoint();
    let creds_url = format!("{base}/latest/meta-data/iam/security-credentials/");
    assert_eq!(status(agent.get(&creds_url).call()), 401);
    assert_eq!(
        status(agent.put(&format!("{base}/latest/api/token")).call()),
        400
    );
    let token = agent
        .put(&format!("{base}/latest/api/token"))
        .set("X-aws-ec2-metadata-token-ttl-seconds", "60")
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let get = |url: &str| {
        agent
            .get(url)
            .set("X-aws-ec2-metadata-token", &token)
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    };
    assert_eq!(get(&creds_url), IMDS_ROLE);
    let json: serde_json::Value =
        serde_json::from_str(&get(&format!("{creds_url}{IMDS_ROLE}"))).unwrap();
    assert_eq!(json["Code"], "Success");
    let key = json["AccessKeyId"].as_str().unwrap();
    let cred = issued.get(key).unwrap();
    assert_eq!(json["Token"].as_str(), cred.token.as_deref());
    assert_eq!(json["Expiration"].as_str().unwrap().len(), 20);
    assert_eq!(imds.served(), 1);

    // STS: the right web identity token and role, or an error.
    let sts = Mock::start(
        Kind::Sts {
            web_token: "jwt-1".into(),
            role_arn: "arn:aws:iam::1:role/r".into(),
        },
        issued.clone(),
        30,
    );
    let form = |token: &str| {
        agent
            .post(&sts.endpoint())
            .send_form(&[
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", "arn:aws:iam::1:role/r"),
                ("RoleSessionName", "s"),
                ("WebIdentityToken", token),
            ])
            .map_err(Box::new)
    };
    assert!(matches!(
        form("jwt-2").unwrap_err().as_ref(),
        ureq::Error::Status(400, _)
    ));
    let xml = form("jwt-1").unwrap().into_string().unwrap();
    assert!(xml.contains("<AccessKeyId>ASIASTS"), "{xml}");
    assert_eq!(issued.count("sts"), 1);

    // Container endpoint: the Authorization token is required.
    let container = Mock::start(
        Kind::Container {
            path: "/v1/credentials".into(),
            auth: "pod-token".into(),
        },
        issued.clone(),
        30,
    );
    let url = format!("{}/v1/credentials", container.endpoint());
    assert_eq!(status(agent.get(&url).call()), 401);
    assert_eq!(
        status(agent.get(&url).set("Authorization", "pod-token").call()),
        200
    );
    container.set_failing(true);
    assert_eq!(
        status(agent.get(&url).set("Authorization", "pod-token").call()),
        500
    );
    assert_eq!(container.served(), 1);
}

#[test]
fn fault_proxy_slows_down_every_other_request() {
    let s3 = S3::new_bucket();
    s3.put("x", b"x");
    let proxy = proxy::Proxy::start(s3_port());
    proxy.all(proxy::Fault::SlowDownEveryOther);
    let url = |_| {
        let b = Bucket::new(
            proxy.endpoint().parse().unwrap(),
            UrlStyle::Path,
            s3.name().to_string(),
            "us-east-1",
        )
        .unwrap();
        b.get_object(Some(&s3.creds), &s3.key("x"))
            .sign(Duration::from_secs(60))
            .to_string()
    };
    let codes: Vec<u16> = (0..4)
        .map(|i| match s3.agent.get(&url(i)).call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, r)) => {
                assert!(r.into_string().unwrap().contains("<Code>SlowDown</Code>"));
                c
            }
            Err(e) => panic!("{e}"),
        })
        .collect();
    assert_eq!(codes, [503, 200, 503, 200]);
}
