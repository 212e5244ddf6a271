//! A verifying, recording S3 front in front of SeaweedFS, over HTTP or HTTPS.
//!
//! SeaweedFS 4.48 refuses any request carrying `X-Amz-Security-Token` for its static identities and
//! answers `aws:kms` PUTs with 500, so temporary credentials and SSE cannot be tested against it
//! directly. This front checks each presigned request as S3 would ([`super::sigv4::verify`]): a known
//! key id, the session token issued with it, the credential not expired (403 `ExpiredToken`), the URL
//! not expired, and the signature, recomputed by AWS's own signer (`aws-sigv4`). Then it records the
//! SSE and storage-class headers, strips the SSE ones, re-signs the request with SeaweedFS's own key
//! and forwards it. Like S3, it echoes the object's encryption on PUT, HEAD and GET answers, and under
//! `aws:kms` the ETag is no MD5 of the object.
//! The underlying [`HttpServer`] keeps connections alive and counts them (for the pool test).

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::aws::{now_unix, Issued};
use super::http::{Handler, HttpServer, Request, Response};
use super::sigv4::{self, query_pairs, Signer};

/// Headers SeaweedFS cannot take (it answers `aws:kms` with 500): recorded, then not forwarded.
const STRIPPED: [&str; 4] = [
    "x-amz-server-side-encryption",
    "x-amz-server-side-encryption-aws-kms-key-id",
    "x-amz-server-side-encryption-context",
    "x-amz-server-side-encryption-bucket-key-enabled",
];
/// Query parameters of query-string authentication (not forwarded: the front signs anew).
const AUTH_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// A request the front accepted: who signed it and the headers it signed.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub method: String,
    pub path: String,
    pub key_id: String,
    /// The issuer of the credential ("static", "imds", "sts", "container").
    pub source: &'static str,
    /// Signed headers (lowercase names) as sent.
    pub signed: Vec<(String, String)>,
    /// Seconds the credential had left when the request arrived (`None`: long-term key).
    pub credential_left: Option<i64>,
}

impl Accepted {
    pub fn signed_header(&self, name: &str) -> Option<&str> {
        self.signed
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct State {
    issued: Arc<Issued>,
    upstream: String,
    agent: ureq::Agent,
    accepted: Mutex<Vec<Accepted>>,
    refused: Mutex<Vec<String>>,
    expired: AtomicUsize,
    /// Answer 400 to any request carrying an `x-amz-checksum-*` header, as stores without flexible
    /// checksums (older MinIO, Ceph, ...) do.
    reject_checksums: AtomicBool,
    /// Path → the SSE headers its PUT carried (echoed on later answers, as S3 does).
    encryption: Mutex<HashMap<String, Vec<(String, String)>>>,
}

pub struct S3Front {
    pub server: HttpServer,
    state: Arc<State>,
}

impl S3Front {
    /// A front accepting the credentials in `issued`, over TLS when `tls` is given.
    pub fn start(issued: Arc<Issued>, tls: Option<Arc<rustls::ServerConfig>>) -> S3Front {
        Self::start_with(issued, tls, true)
    }

    /// As [`S3Front::start`]; without `keep_alive` every answer closes its connection.
    pub fn start_with(
        issued: Arc<Issued>,
        tls: Option<Arc<rustls::ServerConfig>>,
        keep_alive: bool,
    ) -> S3Front {
        let state = Arc::new(State {
            issued,
            upstream: super::s3_endpoint().trim_end_matches('/').to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(30))
                .redirects(0)
                .build(),
            accepted: Mutex::new(Vec::new()),
            refused: Mutex::new(Vec::new()),
            expired: AtomicUsize::new(0),
            reject_checksums: AtomicBool::new(false),
            encryption: Mutex::new(HashMap::new()),
        });
        let s = state.clone();
        let handler: Handler = Arc::new(move |r: &Request| s.answer(r));
        S3Front {
            server: HttpServer::start_with(tls, handler, keep_alive),
            state,
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    pub fn accepted(&self) -> Vec<Accepted> {
        self.state.accepted.lock().unwrap().clone()
    }

    /// "Code: reason" of every refused request.
    pub fn refused(&self) -> Vec<String> {
        self.state.refused.lock().unwrap().clone()
    }

    pub fn reject_checksum_headers(&self, reject: bool) {
        self.state.reject_checksums.store(reject, Ordering::SeqCst);
    }

    /// Requests signed with a credential past its expiry.
    pub fn expired(&self) -> usize {
        self.state.expired.load(Ordering::SeqCst)
    }
}

impl State {
    fn answer(&self, r: &Request) -> Response {
        let checksum_header = r
            .headers
            .iter()
            .any(|(k, _)| k.starts_with("x-amz-checksum-"));
        let checked = if checksum_header && self.reject_checksums.load(Ordering::SeqCst) {
            Err(sigv4::Refusal {
                status: 400,
                code: "InvalidRequest",
                why: "x-amz-checksum-* headers are not supported".into(),
            })
        } else {
            self.check(r)
        };
        match checked {
            Ok(accepted) => {
                let response = self.forward(r, &accepted);
                self.accepted.lock().unwrap().push(accepted);
                response
            }
            Err(refusal) => {
                if refusal.code == "ExpiredToken" {
                    self.expired.fetch_add(1, Ordering::SeqCst);
                }
                self.refused
                    .lock()
                    .unwrap()
                    .push(format!("{}: {}", refusal.code, refusal.why));
                Response::s3_error(refusal.status, refusal.code, "refused by the S3 front")
            }
        }
    }

    /// Checks the request as S3 checks a presigned request with temporary credentials.
    fn check(&self, r: &Request) -> Result<Accepted, sigv4::Refusal> {
        let refuse = |status, code, why: String| sigv4::Refusal { status, code, why };
        let auth = sigv4::QueryAuth::parse(&query_pairs(r.query()))?;
        let Some(cred) = self.issued.get(&auth.key_id) else {
            return Err(refuse(403, "InvalidAccessKeyId", auth.key_id));
        };
        if auth.token != cred.token {
            return Err(refuse(
                403,
                "InvalidToken",
                format!("token of {} does not match", auth.key_id),
            ));
        }
        let now = now_unix();
        if cred.expires_at.is_some_and(|t| now >= t) {
            return Err(refuse(
                403,
                "ExpiredToken",
                format!(
                    "{} expired {} s ago",
                    auth.key_id,
                    now - cred.expires_at.unwrap()
                ),
            ));
        }
        let auth = sigv4::verify(
            &r.method,
            r.path(),
            r.query(),
            &r.headers,
            &cred.secret,
            now,
        )?;
        let signed = auth
            .signed_headers
            .iter()
            .filter_map(|h| r.header(h).map(|v| (h.clone(), v.to_string())))
            .collect();
        Ok(Accepted {
            method: r.method.clone(),
            path: r.path().to_string(),
            key_id: auth.key_id,
            source: cred.source,
            signed,
            credential_left: cred.expires_at.map(|t| t - now),
        })
    }

    /// Re-signs the request with SeaweedFS's key (without the SSE headers) and forwards it.
    fn forward(&self, r: &Request, accepted: &Accepted) -> Response {
        let host = self
            .upstream
            .split_once("://")
            .map_or(self.upstream.as_str(), |(_, h)| h)
            .to_string();
        let sse: Vec<(String, String)> = accepted
            .signed
            .iter()
            .filter(|(k, _)| STRIPPED.contains(&k.as_str()))
            .cloned()
            .collect();
        let mut headers: Vec<(String, String)> = accepted
            .signed
            .iter()
            .filter(|(k, _)| k != "host" && !STRIPPED.contains(&k.as_str()))
            .cloned()
            .collect();
        headers.push(("host".into(), host));
        let extra: Vec<(String, String)> = query_pairs(r.query())
            .into_iter()
            .filter(|(k, _)| !AUTH_PARAMS.contains(&k.as_str()))
            .collect();
        let signer = Signer {
            key_id: super::S3_KEY,
            secret: super::S3_SECRET,
            token: None,
            region: "us-east-1",
        };
        // Sent as signed: encoded as S3 reads it (the check above decoded it without fault).
        let path = sigv4::canonical_path(r.path()).unwrap_or_else(|| r.path().to_string());
        let query = signer.presign(&r.method, &path, &extra, &headers, now_unix(), 300);
        let url = format!("{}{path}?{query}", self.upstream);
        let mut request = self.agent.request(&r.method, &url);
        for (k, v) in headers.iter().filter(|(k, _)| k != "host") {
            request = request.set(k, v);
        }
        let result = if r.body.is_empty() && r.method != "PUT" {
            request.call()
        } else {
            request.send_bytes(&r.body)
        };
        let upstream = match result {
            Ok(resp) | Err(ureq::Error::Status(_, resp)) => resp,
            Err(e) => return Response::s3_error(502, "BadGateway", &e.to_string()),
        };
        let status = upstream.status();
        let mut response = Response {
            status,
            headers: upstream
                .headers_names()
                .iter()
                .filter_map(|n| upstream.header(n).map(|v| (n.clone(), v.to_string())))
                .collect(),
            body: Vec::new(),
        };
        let _ = upstream.into_reader().read_to_end(&mut response.body);
        self.echo_encryption(r, sse, &mut response);
        response
    }

    /// Remembers a stored object's encryption and answers about it as S3 does.
    fn echo_encryption(&self, r: &Request, sse: Vec<(String, String)>, response: &mut Response) {
        if response.status >= 300 {
            return;
        }
        let mut known = self.encryption.lock().unwrap();
        if r.method == "PUT" && !sse.is_empty() {
            known.insert(r.path().to_string(), sse);
        }
        let Some(sse) = known.get(r.path()) else {
            return;
        };
        let kms = sse.iter().any(|(_, v)| v == "aws:kms");
        for (k, v) in sse {
            response.headers.push((k.clone(), v.clone()));
        }
        if kms {
            // Under SSE-KMS the ETag is not the MD5 of the object.
            for (k, v) in response.headers.iter_mut() {
                if k.eq_ignore_ascii_case("etag") {
                    *v = format!("\"{}\"", sigv4::hex(&[0xee; 16]));
                }
            }
        }
    }
}
