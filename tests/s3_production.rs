//! Production S3: HTTPS through a private CA, role credentials from IMDSv2 / STS / the
//! container endpoint with rotation, retries, one connection pool, SSE and storage class.
//!
//! Real servers throughout — valkey-server with the module, SeaweedFS behind the verifying S3 front
//! (tests/common/s3front.rs) — and mocks only where AWS itself is the server (tests/common/aws.rs).
//! The first tests prove the test bed itself: a verifier that accepted everything would make every
//! test below unable to fail.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aws_sigv4::http_request::SignableBody;
use common::aws::{now_unix, Credential, Issued, Kind, Mock, IMDS_ROLE};
use common::http::Request;
use common::s3front::S3Front;
use common::sigv4::{self, Signer};
use common::tls::{Ca, CertKind};
use common::*;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

// ------------------------------------------------------------------ the test bed itself

/// AWS's published presigned examples: the S3 documentation's ("Authenticating Requests: Using Query
/// Parameters", UNSIGNED-PAYLOAD), and get-vanilla, get-vanilla-with-session-token and
/// get-vanilla-query-order-key-case of AWS's SigV4 test suite (aws-c-auth, their query-signed form,
/// signing the empty body's hash), each with what to sign it with, when, and its signature.
struct Example {
    what: &'static str,
    host: &'static str,
    target: &'static str,
    secret: &'static str,
    now: i64,
    unsigned_payload: bool,
}

const S3_DOC_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const SUITE_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// 2013-05-24T00:00:00Z and 2015-08-30T12:36:00Z.
const S3_DOC_TIME: i64 = 1_369_353_600;
const SUITE_TIME: i64 = 1_440_938_160;

const EXAMPLES: [Example; 4] = [
    Example {
        what: "S3 documentation",
        host: "examplebucket.s3.amazonaws.com",
        target: "/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404",
        secret: S3_DOC_SECRET,
        now: S3_DOC_TIME,
        unsigned_payload: true,
    },
    Example {
        what: "get-vanilla",
        host: "example.amazonaws.com",
        target: "/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Signature=e93c787ed7f371d5c6b165c1b38ede9550f4dce4144713e844b25b7192d3865d",
        secret: SUITE_SECRET,
        now: SUITE_TIME,
        unsigned_payload: false,
    },
    Example {
        what: "get-vanilla-with-session-token",
        host: "example.amazonaws.com",
        target: "/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Security-Token=6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267&X-Amz-Signature=7ff2b50b376cb4d151970630573d6291dc128cc5c2a12ffb237f73cc53f67b6c",
        secret: SUITE_SECRET,
        now: SUITE_TIME,
        unsigned_payload: false,
    },
    Example {
        what: "get-vanilla-query-order-key-case",
        host: "example.amazonaws.com",
        target: "/?Param2=value2&Param1=value1&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Signature=86012e2c9ad4d77369f5d81c11f75158aae4f895a085212cc6d3f923d300bed5",
        secret: SUITE_SECRET,
        now: SUITE_TIME,
        unsigned_payload: false,
    },
];

/// `target` with the last character of its `X-Amz-Signature` changed to another hex digit.
fn signature_off_by_one(target: &str) -> String {
    let at = target.find("X-Amz-Signature=").expect("a presigned target") + 16 + 63;
    let was = &target[at..at + 1];
    let now = if was == "0" { "1" } else { "0" };
    format!("{}{now}{}", &target[..at], &target[at + 1..])
}

#[test]
fn the_verifier_gives_the_signatures_of_aws_published_examples() {
    for e in &EXAMPLES {
        let r = Request {
            method: "GET".into(),
            target: e.target.into(),
            headers: vec![("host".into(), e.host.into())],
            body: Vec::new(),
        };
        let verify_with = |r: &Request, secret: &str, now: i64| {
            let body = match e.unsigned_payload {
                true => SignableBody::UnsignedPayload,
                false => SignableBody::empty(),
            };
            sigv4::verify_payload(
                &r.method,
                r.path(),
                r.query(),
                &r.headers,
                secret,
                now,
                body,
            )
        };
        let verify = |r: &Request, now: i64| verify_with(r, e.secret, now);
        let auth = verify(&r, e.now).unwrap_or_else(|f| panic!("{}: {f:?}", e.what));
        assert_eq!(auth.signed_at, e.now, "{}", e.what);
        // One character off, another secret, another host: refused; too late: expired.
        let mut off = r.clone();
        off.target = signature_off_by_one(&r.target);
        let mut other_host = r.clone();
        other_host.headers[0].1 = "example.com".into();
        for refusal in [
            verify(&off, e.now),
            verify_with(&r, "other", e.now),
            verify(&other_host, e.now),
        ] {
            assert_eq!(
                refusal.unwrap_err().code,
                "SignatureDoesNotMatch",
                "{}",
                e.what
            );
        }
        let late = auth.signed_at + auth.expires + 1;
        assert_eq!(verify(&r, late).unwrap_err().why, "Request has expired");
    }
    assert_eq!(sigv4::parse_amz_date("20130524T000000Z"), Some(S3_DOC_TIME));
    assert_eq!(sigv4::amz_date(SUITE_TIME), "20150830T123600Z");
}

/// The signature of an S3 request presigned by `aws-sigv4`'s own presigning (which signs `host` and the
/// headers given), at `now`.
fn aws_presigned_signature(
    path_and_query: &str,
    headers: &[(String, String)],
    token: &str,
    now: i64,
) -> String {
    use aws_sigv4::http_request::{
        sign, PercentEncodingMode, SignableRequest, SignatureLocation, SigningSettings,
        UriPathNormalizationMode,
    };
    let identity =
        aws_credential_types::Credentials::new("AK", "SK", Some(token.into()), None, "t").into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(Duration::from_secs(60));
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("eu-west-1")
        .name("s3")
        .time(std::time::UNIX_EPOCH + Duration::from_secs(now as u64))
        .settings(settings)
        .build()
        .unwrap()
        .into();
    let request = SignableRequest::new(
        "PUT",
        path_and_query,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::UnsignedPayload,
    )
    .unwrap();
    sign(request, &params).unwrap().into_parts().1
}

/// What the front presigns to forward is what AWS's own presigning gives (token, an extra parameter
/// and an encoded key included), and what the verifier accepts.
#[test]
fn the_fronts_presigning_is_aws_presigning() {
    let headers = vec![
        ("host".to_string(), "h:1".to_string()),
        ("if-none-match".to_string(), "*".to_string()),
    ];
    let signer = Signer {
        key_id: "AK",
        secret: "SK",
        token: Some("T/+="),
        region: "eu-west-1",
    };
    let extra = [("list-type".to_string(), "2".to_string())];
    let now = now_unix();
    let q = signer.presign("PUT", "/b/k%3Ax", &extra, &headers, now, 60);
    let aws = aws_presigned_signature("/b/k%3Ax?list-type=2", &headers, "T/+=", now);
    assert!(
        q.ends_with(&format!("&X-Amz-Signature={aws}")),
        "{q} vs {aws}"
    );
    let auth = sigv4::verify("PUT", "/b/k%3Ax", &q, &headers, "SK", now).unwrap();
    assert_eq!(auth.token.as_deref(), Some("T/+="));
    assert_eq!(auth.signed_headers, ["host", "if-none-match"]);
    let refusal = sigv4::verify("PUT", "/b/k%3Ay", &q, &headers, "SK", now).unwrap_err();
    assert_eq!(refusal.code, "SignatureDoesNotMatch");
}

/// The requests the module sent through `front`, as received.
fn sent(front: &S3Front, method: &str) -> Vec<Request> {
    let all = front.server.requests();
    all.into_iter().filter(|r| r.method == method).collect()
}

/// Sends `r` again to `front`, every header as the module sent it: the status and body.
fn replay(front: &S3Front, r: &Request) -> (u16, Vec<u8>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build();
    let mut request = agent.request(&r.method, &format!("{}{}", front.endpoint(), r.target));
    for (k, v) in &r.headers {
        if !["host", "content-length", "connection", "user-agent"].contains(&k.as_str()) {
            request = request.set(k, v);
        }
    }
    let result = match r.body.is_empty() {
        true => request.call(),
        false => request.send_bytes(&r.body),
    };
    let response = match result {
        Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
        Err(e) => panic!("{e}"),
    };
    let status = response.status();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut body).unwrap();
    (status, body)
}

/// The module's own PUT, HEAD and GET of a flow, signed with temporary credentials (IMDS) and SSE-KMS,
/// as the front received them: accepted as sent, and refused once anything they sign is changed, or
/// their signature is one character off (checked by the verifier, and by the front over HTTP). The id
/// needs encoding in the object key and again in the URL; the HEAD (`verify head`) signs
/// `x-amz-checksum-mode`, a header AWS's own presigning never signs.
#[test]
fn the_front_accepts_the_modules_own_requests_and_refuses_them_altered() {
    let (s3, issued, _imds, front, srv) = imds_bed(60);
    let mut c = srv.conn();
    config_set(&mut c, "sse", "aws:kms").unwrap();
    config_set(&mut c, "verify", "head").unwrap();
    let id = "a:b c+d";
    write_and_archive(&mut c, id).unwrap();
    reads_back(&mut c, id);
    assert!(front.refused().is_empty(), "{:?}", front.refused());
    let head = front
        .accepted()
        .into_iter()
        .find(|a| a.method == "HEAD" && a.path.contains("a%253Ab"))
        .expect("the module's HEAD of the flow");
    assert_eq!(head.signed_header("x-amz-checksum-mode"), Some("ENABLED"));
    let put = sent(&front, "PUT")
        .into_iter()
        .find(|r| r.path().contains("a%253Ab%2520c%252Bd"))
        .expect("the module's PUT of the flow");
    let get = sent(&front, "GET")
        .into_iter()
        .find(|r| r.path() == put.path())
        .expect("the module's GET of the flow");
    let key_id = sigv4::QueryAuth::parse(&sigv4::query_pairs(put.query()))
        .unwrap()
        .key_id;
    let cred = issued.get(&key_id).unwrap();
    assert_eq!(cred.source, "imds");
    let verify = |r: &Request, secret: &str, now: i64| {
        sigv4::verify(&r.method, r.path(), r.query(), &r.headers, secret, now)
    };
    let now = now_unix();
    let auth = verify(&put, &cred.secret, now).unwrap();
    assert_eq!(auth.token, cred.token, "the session token is signed");
    for header in [
        "content-md5",
        "if-none-match",
        "x-amz-checksum-sha256",
        "x-amz-server-side-encryption",
    ] {
        assert!(auth.signed_headers.iter().any(|h| h == header), "{header}");
    }
    verify(&get, &cred.secret, now).unwrap();

    let sse = put
        .headers
        .iter()
        .position(|(k, _)| k == "x-amz-server-side-encryption")
        .unwrap();
    let mut changed_header = put.clone();
    changed_header.headers[sse].1 = "AES256".into();
    let mut changed_method = get.clone();
    changed_method.method = "HEAD".into();
    let mut changed_path = get.clone();
    changed_path.target = get.target.replacen("a%253Ab", "a%253Ac", 1);
    let mut off_by_one = get.clone();
    off_by_one.target = signature_off_by_one(&get.target);
    for (what, r) in [
        ("a changed signed header", &changed_header),
        ("another method", &changed_method),
        ("another path", &changed_path),
        ("a signature one character off", &off_by_one),
    ] {
        let refusal = verify(r, &cred.secret, now).unwrap_err();
        assert_eq!(refusal.code, "SignatureDoesNotMatch", "{what}");
    }
    assert_eq!(
        verify(&get, "other secret", now).unwrap_err().code,
        "SignatureDoesNotMatch"
    );
    let mut lost_header = put.clone();
    lost_header.headers.remove(sse);
    assert_eq!(
        verify(&lost_header, &cred.secret, now).unwrap_err().why,
        "signed header x-amz-server-side-encryption is missing"
    );
    let late = auth.signed_at + auth.expires + 1;
    assert_eq!(
        verify(&put, &cred.secret, late).unwrap_err().why,
        "Request has expired"
    );

    // Over HTTP: the GET as the module sent it is answered with the object; one character off, it is
    // refused and never reaches SeaweedFS.
    let location = index::location(&mut c, id).unwrap();
    let stored = location
        .strip_prefix(&format!("s3://{}/{}/", s3.name(), s3.prefix))
        .unwrap();
    let (status, body) = replay(&front, &get);
    assert_eq!(status, 200);
    assert_eq!(body, s3.get(stored).unwrap());
    let accepted = front.accepted().len();
    let (status, body) = replay(&front, &off_by_one);
    assert_eq!(status, 403);
    assert!(
        String::from_utf8_lossy(&body).contains("<Code>SignatureDoesNotMatch</Code>"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(front.accepted().len(), accepted, "nothing forwarded");
    let refused = front.refused();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].starts_with("SignatureDoesNotMatch"),
        "{refused:?}"
    );
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
    proxy.all(proxy::Fault::EveryOther(Box::new(proxy::Fault::Status(
        503,
    ))));
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

// ------------------------------------------------------------------ the module

/// Module args for `s3` at `endpoint`, without the static key (the credential chain must find one),
/// plus `extra`.
fn keyless_args(s3: &S3, endpoint: &str, extra: &[&str]) -> Vec<String> {
    let args = s3.module_args(endpoint);
    let mut out: Vec<String> = args
        .chunks(2)
        .filter(|p| p[0] != "access-key" && p[0] != "secret-key-file")
        .flatten()
        .cloned()
        .collect();
    out.extend(extra.iter().map(|s| s.to_string()));
    out
}

fn start(module_args: Vec<String>, env: &[(&str, &str)]) -> Server {
    let mut opts = ServerOpts::new(&S3::new_bucket());
    opts.module_args = module_args;
    opts.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Server::start(opts)
}

/// A server using `s3` through `front` with the static key, plus `extra` module args.
fn via_front(s3: &S3, front: &S3Front, extra: &[&str]) -> Server {
    let mut args = s3.module_args(&front.endpoint());
    args.extend(extra.iter().map(|s| s.to_string()));
    start(args, &[])
}

fn info_text(c: &mut redis::Connection) -> String {
    cmd(c, &["INFO", "flowarchive"]).unwrap()
}

/// The credential source INFO shows in use (its `credentials_source_<name>` gauge is 1).
fn source_in_use(c: &mut redis::Connection) -> String {
    let info = info_text(c);
    let in_use: Vec<&str> = info
        .lines()
        .filter_map(|l| l.strip_prefix("flowarchive_credentials_source_"))
        .filter_map(|l| l.trim().strip_suffix(":1"))
        .collect();
    assert_eq!(in_use.len(), 1, "{info}");
    in_use[0].to_string()
}

fn is_live(c: &mut redis::Connection, id: &str) -> bool {
    cmd::<i64>(c, &["EXISTS", &format!("argyll:flow:{id}:events")]).unwrap() == 1
}

/// Writes and archives flow `id`: the error text if FLOWARCHIVE.FLOW fails.
fn write_and_archive(c: &mut redis::Connection, id: &str) -> Result<(), String> {
    write_flow(c, &FlowSpec::done(id));
    archive(c, id).map(|_| ()).map_err(|e| e.to_string())
}

/// The archived flow reads back from S3 (the cache is off in these tests).
fn reads_back(c: &mut redis::Connection, id: &str) {
    let snapshot: String = cmd(c, &["FLOWARCHIVE.GET", id]).unwrap();
    assert!(snapshot.contains(id), "{snapshot}");
}

fn config_set(c: &mut redis::Connection, name: &str, value: &str) -> Result<(), String> {
    cmd::<()>(c, &["CONFIG", "SET", &format!("flowarchive.{name}"), value])
        .map_err(|e| e.to_string())
}

#[test]
fn https_through_a_private_ca_and_tls_failures_name_their_cause() {
    let s3 = S3::new_bucket();
    let ca = Ca::new();
    let issued = Issued::new();
    let front = S3Front::start(issued.clone(), Some(ca.server_config(CertKind::Good)));
    let srv = via_front(&s3, &front, &["cache-bytes", "0"]);
    let mut c = srv.conn();

    // Without the CA: refused with the cause, and the flow stays live.
    let e = write_and_archive(&mut c, "no-ca").unwrap_err();
    assert!(e.contains("unknown issuer"), "{e}");
    assert!(is_live(&mut c, "no-ca"));
    assert!(!e.contains("X-Amz"), "{e}");
    assert_eq!(info_field(&mut c, "failures_s3_tls"), 1);

    // A file that is no PEM bundle is refused by CONFIG SET with the reason.
    let junk = root().join("target/test-tls/junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let e = config_set(&mut c, "tls-ca-file", junk.to_str().unwrap()).unwrap_err();
    assert!(e.contains("no PEM certificate"), "{e}");
    let e = config_set(&mut c, "tls-ca-file", "/nonexistent/ca.pem").unwrap_err();
    assert!(e.contains("cannot be read"), "{e}");

    // With tls-ca-file: archived and read back over HTTPS.
    config_set(&mut c, "tls-ca-file", ca.pem_file.to_str().unwrap()).unwrap();
    archive(&mut c, "no-ca").unwrap();
    assert!(!is_live(&mut c, "no-ca"));
    reads_back(&mut c, "no-ca");

    // An expired certificate, or one for another name: the error says which.
    for (kind, cause) in [
        (CertKind::Expired, "expired"),
        (
            CertKind::WrongName,
            "not valid for the endpoint's host name",
        ),
    ] {
        let bad = S3Front::start(issued.clone(), Some(ca.server_config(kind)));
        config_set(&mut c, "endpoint", &bad.endpoint()).unwrap();
        let id = format!("bad-{kind:?}");
        let e = write_and_archive(&mut c, &id).unwrap_err();
        assert!(e.contains(cause), "{kind:?}: {e}");
        assert!(is_live(&mut c, &id));
    }
    drop(srv);

    // The system trust store counts too: SSL_CERT_FILE naming the CA, no tls-ca-file.
    let mut args = s3.module_args(&front.endpoint());
    args.extend(["cache-bytes", "0"].map(String::from));
    let srv = start(args, &[("SSL_CERT_FILE", ca.pem_file.to_str().unwrap())]);
    let mut c = srv.conn();
    write_and_archive(&mut c, "system-store").unwrap();
    reads_back(&mut c, "system-store");
}

/// A server whose only credentials come from the IMDSv2 mock, through the verifying front.
fn imds_bed(ttl_secs: i64) -> (S3, Arc<Issued>, Mock, S3Front, Server) {
    let s3 = S3::new_bucket();
    let issued = Issued::new();
    let imds = Mock::start(Kind::Imds, issued.clone(), ttl_secs);
    let front = S3Front::start(issued.clone(), None);
    let srv = start(
        keyless_args(&s3, &front.endpoint(), &["cache-bytes", "0"]),
        &[
            ("AWS_EC2_METADATA_DISABLED", "false"),
            ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds.endpoint()),
        ],
    );
    (s3, issued, imds, front, srv)
}

#[test]
fn imds_credentials_rotate_and_nothing_is_signed_with_expired_ones() {
    // Credentials that live 4 s: refreshed after 2 s, never used in their last 0.4 s.
    let (_s3, issued, imds, front, srv) = imds_bed(4);
    let mut c = srv.conn();
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(7) {
        write_and_archive(&mut c, &format!("rot-{n}")).unwrap();
        reads_back(&mut c, &format!("rot-{n}"));
        n += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(source_in_use(&mut c), "imds");
    let left = info_field(&mut c, "credentials_expires_in_s");
    assert!((0..=4).contains(&left), "{left}");
    assert!(imds.served() >= 3, "rotated: {} sets", imds.served());
    assert!(
        imds.served() <= 6,
        "cached between rotations: {} sets",
        imds.served()
    );
    assert_eq!(
        imds.refused(),
        0,
        "IMDSv2 only: every request carried a session token"
    );
    assert!(front.refused().is_empty(), "{:?}", front.refused());
    let accepted = front.accepted();
    assert!(accepted.len() >= 2 * n);
    assert!(accepted
        .iter()
        .all(|a| a.source == "imds" && a.credential_left.unwrap() > 0));
    assert!(issued.count("imds") >= 3);
    assert_eq!(info_field(&mut c, "credentials_refresh_failures"), 0);

    // An IMDS outage: the cached set keeps working until it is about to expire, refreshes fail and
    // are counted; then archiving stops with a clear error, the flow stays live, and nothing is
    // signed with the expired set.
    imds.set_failing(true);
    let outage = std::time::Instant::now();
    let mut first_error = None;
    let mut i = 0;
    while outage.elapsed() < Duration::from_secs(5) && first_error.is_none() {
        let id = format!("out-{i}");
        if let Err(e) = write_and_archive(&mut c, &id) {
            assert!(is_live(&mut c, &id));
            first_error = Some(e);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let e = first_error.expect("archiving stops once the credentials expire");
    assert!(e.contains("credentials") && e.contains("imds"), "{e}");
    assert!(info_field(&mut c, "credentials_refresh_failures") >= 1);
    assert!(srv.log().contains("credentials refresh failed"));
    assert_eq!(front.expired(), 0, "never signed with expired credentials");

    imds.set_failing(false);
    write_and_archive(&mut c, &format!("out-{i}")).unwrap();
    assert_eq!(front.expired(), 0);
}

#[test]
fn web_identity_container_and_env_credentials() {
    let s3 = S3::new_bucket();
    let issued = Issued::new();
    let front = S3Front::start(issued.clone(), None);
    let dir = root().join("target/test-tls");
    std::fs::create_dir_all(&dir).unwrap();

    // Web identity (EKS IRSA): the token file's JWT goes to STS with the role.
    let token_file = dir.join(unique("jwt"));
    std::fs::write(&token_file, "eyJ.jwt.1\n").unwrap();
    let sts = Mock::start(
        Kind::Sts {
            web_token: "eyJ.jwt.1".into(),
            role_arn: "arn:aws:iam::123456789012:role/flowarchive".into(),
        },
        issued.clone(),
        60,
    );
    let srv = start(
        keyless_args(&s3, &front.endpoint(), &["cache-bytes", "0"]),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/flowarchive"),
            ("AWS_ROLE_SESSION_NAME", "valkey-0"),
            ("AWS_ENDPOINT_URL_STS", &sts.endpoint()),
        ],
    );
    let mut c = srv.conn();
    write_and_archive(&mut c, "web").unwrap();
    reads_back(&mut c, "web");
    assert_eq!(source_in_use(&mut c), "web_identity");
    assert_eq!(sts.served(), 1, "one set, cached");
    assert!(front.accepted().iter().all(|a| a.source == "sts"));
    // A pinned source that is not configured: a clear error naming it, the flow stays live.
    config_set(&mut c, "credentials", "container").unwrap();
    let e = write_and_archive(&mut c, "pinned").unwrap_err();
    assert!(e.contains("AWS_CONTAINER_CREDENTIALS"), "{e}");
    assert!(is_live(&mut c, "pinned"));
    let e = config_set(&mut c, "credentials", "instance").unwrap_err();
    assert!(e.contains("auto, config, env"), "{e}");
    drop(srv);

    // EKS Pod Identity: a full URI and an authorization token file.
    let auth_file = dir.join(unique("pod-token"));
    std::fs::write(&auth_file, "pod-identity-token\n").unwrap();
    let container = Mock::start(
        Kind::Container {
            path: "/v1/credentials".into(),
            auth: "pod-identity-token".into(),
        },
        issued.clone(),
        60,
    );
    let full_uri = format!("{}/v1/credentials", container.endpoint());
    let srv = start(
        keyless_args(&s3, &front.endpoint(), &["cache-bytes", "0"]),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &full_uri),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                auth_file.to_str().unwrap(),
            ),
        ],
    );
    let mut c = srv.conn();
    write_and_archive(&mut c, "pod").unwrap();
    reads_back(&mut c, "pod");
    assert_eq!(source_in_use(&mut c), "container");
    assert_eq!(
        info_field(&mut c, "credentials_expires_in_s") / 10,
        5,
        "about 60 s left"
    );
    assert_eq!(container.refused(), 0);
    drop(srv);

    // The environment: long-term keys, no expiry; never shown in INFO.
    let srv = start(
        keyless_args(&s3, &front.endpoint(), &["cache-bytes", "0"]),
        &[
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
        ],
    );
    let mut c = srv.conn();
    write_and_archive(&mut c, "env").unwrap();
    assert_eq!(source_in_use(&mut c), "env");
    assert_eq!(info_field(&mut c, "credentials_expires_in_s"), -1);
    let info = info_text(&mut c);
    assert!(
        !info.contains(S3_KEY) && !info.contains(S3_SECRET),
        "{info}"
    );
}

#[test]
fn slowdowns_are_retried_and_errors_that_would_repeat_are_not() {
    let proxy = proxy::Proxy::start(s3_port());
    let s3 = S3::new_bucket();
    // One request at a time: every first attempt meets a 503 and every retry gets through.
    let srv = server_via(
        &s3,
        Some(&proxy),
        // `verify head`: the HEADs are retried too.
        &[
            "concurrency",
            "1",
            "retry-max-ms",
            "10000",
            "verify",
            "head",
        ],
    );
    let mut c = srv.conn();
    for i in 0..20 {
        write_flow(&mut c, &FlowSpec::done(&format!("slow-{i}")));
    }
    proxy.all(proxy::Fault::EveryOther(Box::new(proxy::Fault::Status(
        503,
    ))));
    let r = reply_map(redis::cmd("FLOWARCHIVE.SWEEP").query(&mut c).unwrap());
    assert_eq!(r["archived"], redis::Value::Int(20), "{r:?}");
    assert_eq!(r["failed"], redis::Value::Int(0), "{r:?}");
    let retries = info_field(&mut c, "s3_retries");
    assert_eq!(
        retries, 44,
        "each PUT and HEAD retried once, and before the first the bucket's proof and the \
         write-once probe's three requests"
    );
    assert_eq!(info_field(&mut c, "failures_s3_throttled"), 0);

    // An upload that took effect but whose answer was lost: the retry finds the object at its key
    // (write-once), proves it holds these very bytes, and the flow is archived once.
    proxy.set(vec![proxy::Rule {
        method: "PUT",
        path: String::new(),
        fault: proxy::Fault::EveryOther(Box::new(proxy::Fault::LoseAnswer)),
    }]);
    let retries = info_field(&mut c, "s3_retries");
    write_and_archive(&mut c, "lost-answer").unwrap();
    assert!(!is_live(&mut c, "lost-answer"));
    reads_back(&mut c, "lost-answer");
    assert_eq!(info_field(&mut c, "s3_retries"), retries + 1);
    let puts = proxy
        .requests()
        .iter()
        .filter(|r| r.starts_with("PUT"))
        .count();
    assert!(puts >= 2, "{puts}");
    assert_eq!(
        s3.list()
            .iter()
            .filter(|k| k.contains("lost-answer"))
            .count(),
        1,
        "one object, no second generation"
    );
    let retries = info_field(&mut c, "s3_retries");

    // 500 always: bounded attempts, then the flow fails and stays live.
    config_set(&mut c, "retry-attempts", "3").unwrap();
    proxy.all(proxy::Fault::Status(500));
    let before = proxy.requests().len();
    let e = write_and_archive(&mut c, "down").unwrap_err();
    assert!(e.contains("500"), "{e}");
    assert!(is_live(&mut c, "down"));
    assert_eq!(proxy.requests().len() - before, 3, "three attempts");
    assert_eq!(info_field(&mut c, "s3_retries"), retries + 2);
    assert_eq!(info_field(&mut c, "s3_retries_exhausted"), 1);

    // 403: once, at once.
    proxy.all(proxy::Fault::Status(403));
    let before = proxy.requests().len();
    let e = write_and_archive(&mut c, "denied").unwrap_err();
    assert!(e.contains("403"), "{e}");
    assert_eq!(proxy.requests().len() - before, 1);
    assert!(is_live(&mut c, "denied"));
    for bad in ["0", "1000"] {
        assert!(config_set(&mut c, "retry-attempts", bad).is_err(), "{bad}");
    }
}

#[test]
fn one_connection_pool_for_flow_get_and_sweep() {
    // Over HTTPS, where a new connection costs a TLS handshake too.
    let s3 = S3::new_bucket();
    let ca = Ca::new();
    let front = S3Front::start(Issued::new(), Some(ca.server_config(CertKind::Good)));
    let ca_file = ca.pem_file.to_str().unwrap();
    let srv = via_front(&s3, &front, &["cache-bytes", "0", "tls-ca-file", ca_file]);
    let mut c = srv.conn();
    for i in 0..50 {
        write_and_archive(&mut c, &format!("pool-{i}")).unwrap();
    }
    for i in 0..100 {
        reads_back(&mut c, &format!("pool-{}", i % 50));
    }
    for i in 0..10 {
        write_flow(&mut c, &FlowSpec::done(&format!("swept-{i}")));
    }
    let r = reply_map(redis::cmd("FLOWARCHIVE.SWEEP").query(&mut c).unwrap());
    assert_eq!(r["archived"], redis::Value::Int(10));
    let requests = front.accepted().len();
    // One request an upload where the store is proven to validate checksums (`verify auto`).
    assert!(requests >= 50 + 100 + 10, "{requests}");
    assert!(
        front.connections() <= 6,
        "{} connections for {requests} requests",
        front.connections()
    );
    assert_eq!(info_field(&mut c, "s3_pools_built"), 1);
    // A new endpoint gets a new pool.
    let other = S3Front::start(Issued::new(), Some(ca.server_config(CertKind::Good)));
    config_set(&mut c, "endpoint", &other.endpoint()).unwrap();
    write_and_archive(&mut c, "moved").unwrap();
    assert_eq!(info_field(&mut c, "s3_pools_built"), 2);
    assert_eq!(other.connections(), 1);
    // So do new TLS settings (the same CA from another file), and then a new connection.
    let copy = root().join("target/test-tls").join(unique("ca-copy.pem"));
    std::fs::write(&copy, ca.pem()).unwrap();
    config_set(&mut c, "tls-ca-file", copy.to_str().unwrap()).unwrap();
    write_and_archive(&mut c, "new-tls").unwrap();
    assert_eq!(info_field(&mut c, "s3_pools_built"), 3);
    assert_eq!(other.connections(), 2);
    let _ = std::fs::remove_file(&copy);
}

#[test]
fn sse_kms_and_storage_class_are_signed_and_verified_by_checksum() {
    let s3 = S3::new_bucket();
    let front = S3Front::start(Issued::new(), None);
    let srv = via_front(
        &s3,
        &front,
        &[
            "cache-bytes",
            "0",
            "sse",
            "aws:kms",
            "sse-kms-key-id",
            "arn:aws:kms:us-east-1:123456789012:alias/flows",
            "storage-class",
            "STANDARD_IA",
        ],
    );
    let mut c = srv.conn();
    write_and_archive(&mut c, "kms").unwrap();
    reads_back(&mut c, "kms");
    let put = front
        .accepted()
        .into_iter()
        .find(|a| a.method == "PUT")
        .unwrap();
    assert_eq!(
        put.signed_header("x-amz-server-side-encryption"),
        Some("aws:kms")
    );
    assert_eq!(
        put.signed_header("x-amz-server-side-encryption-aws-kms-key-id"),
        Some("arn:aws:kms:us-east-1:123456789012:alias/flows")
    );
    assert_eq!(
        put.signed_header("x-amz-storage-class"),
        Some("STANDARD_IA")
    );

    config_set(&mut c, "sse", "AES256").unwrap();
    config_set(&mut c, "storage-class", "").unwrap();
    write_and_archive(&mut c, "aes").unwrap();
    let put = front
        .accepted()
        .into_iter()
        .rfind(|a| a.method == "PUT")
        .unwrap();
    assert_eq!(
        put.signed_header("x-amz-server-side-encryption"),
        Some("AES256")
    );
    assert_eq!(
        put.signed_header("x-amz-server-side-encryption-aws-kms-key-id"),
        None
    );
    assert_eq!(put.signed_header("x-amz-storage-class"), None);

    for (name, bad, why) in [
        ("sse", "aws:kms:dsse", "none, AES256 or aws:kms"),
        ("storage-class", "GLACIER", "restore"),
        ("storage-class", "cheap", "storage-class must be"),
        ("sse-kms-key-id", "bad id\n", "sse-kms-key-id"),
        ("checksum", "crc32", "sha256 or md5"),
    ] {
        let e = config_set(&mut c, name, bad).unwrap_err();
        assert!(e.contains(why), "{name} {bad}: {e}");
    }
}

#[test]
fn md5_only_stores_keep_the_sha256_in_metadata_and_reads_verify_it() {
    let s3 = S3::new_bucket();
    let front = S3Front::start(Issued::new(), None);
    front.reject_checksum_headers(true);
    let srv = via_front(&s3, &front, &["cache-bytes", "0"]);
    let mut c = srv.conn();
    // A store that refuses x-amz-checksum-* headers refuses the default; nothing is lost.
    let e = write_and_archive(&mut c, "sha").unwrap_err();
    assert!(e.contains("400"), "{e}");
    assert!(is_live(&mut c, "sha"));
    config_set(&mut c, "checksum", "md5").unwrap();
    archive(&mut c, "sha").unwrap();
    reads_back(&mut c, "sha");
    assert!(front
        .refused()
        .iter()
        .all(|r| r.starts_with("InvalidRequest")));
    let put = front
        .accepted()
        .into_iter()
        .rfind(|a| a.method == "PUT")
        .unwrap();
    assert!(put.signed_header("content-md5").is_some());
    assert!(put
        .signed
        .iter()
        .all(|(k, _)| !k.starts_with("x-amz-checksum")));

    // SSE-KMS without flexible checksums: the ETag is no MD5, so the upload is proven by its size
    // and the sha256 kept in its metadata.
    config_set(&mut c, "sse", "aws:kms").unwrap();
    write_and_archive(&mut c, "kms-md5").unwrap();
    reads_back(&mut c, "kms-md5");
    config_set(&mut c, "sse", "none").unwrap();

    // The object replaced behind the module's back (same metadata, other bytes): the read refuses it.
    let rel = s3
        .list()
        .into_iter()
        .find(|k| k.contains("sha"))
        .expect("archived object");
    let body = s3.get(&rel).unwrap();
    let mut forged = gunzip(&body);
    forged = forged.replacen("step-1", "step-X", 1);
    let recorded = cmd::<String>(&mut c, &["HGET", "archived:flows", "sha"]).unwrap();
    assert!(recorded.ends_with(&rel), "{recorded}");
    s3.delete(&rel);
    let sha = {
        use sha2::Digest;
        sigv4::hex(&sha2::Sha256::digest(&body))
    };
    let key = s3.key(&rel);
    let mut action = s3.bucket.put_object(Some(&s3.creds), &key);
    action
        .headers_mut()
        .insert("x-amz-meta-flowarchive-sha256", sha.clone());
    let url = action.sign(Duration::from_secs(60));
    s3.agent
        .put(url.as_str())
        .set("x-amz-meta-flowarchive-sha256", &sha)
        .send_bytes(&gzip(&forged))
        .unwrap();
    let e = cmd::<String>(&mut c, &["FLOWARCHIVE.GET", "sha"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("sha256"), "{e}");
}
