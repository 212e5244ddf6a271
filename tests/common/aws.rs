//! Mocks of the AWS services that hand out role credentials — where AWS itself is the server, so
//! nothing real can stand in: EC2's instance metadata service (IMDSv2 only), STS
//! `AssumeRoleWithWebIdentity`, and the ECS / EKS Pod Identity container credentials endpoint. Each
//! issues short-lived credentials into an [`Issued`] register that the S3 front proxy
//! ([`super::s3front`]) checks every request against: key id, secret, session token and expiry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::http::{Handler, HttpServer, Request, Response};
use super::sigv4::query_pairs;

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time (the `Expiration` format of every credential source).
pub fn rfc3339(unix: i64) -> String {
    let d = super::sigv4::amz_date(unix);
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &d[0..4],
        &d[4..6],
        &d[6..8],
        &d[9..11],
        &d[11..13],
        &d[13..15]
    )
}

#[derive(Clone, Debug, PartialEq)]
pub struct Credential {
    pub key_id: String,
    pub secret: String,
    pub token: Option<String>,
    /// Unix time after which S3 refuses it (`None`: a long-term key).
    pub expires_at: Option<i64>,
    /// Who issued it: "static", "imds", "sts", "container".
    pub source: &'static str,
}

/// Every credential the test bed accepts.
#[derive(Default)]
pub struct Issued {
    creds: Mutex<HashMap<String, Credential>>,
    seq: AtomicUsize,
}

impl Issued {
    /// A register that accepts SeaweedFS's own static key (what `access-key`/`secret-key-file` give).
    pub fn new() -> Arc<Issued> {
        let issued = Arc::new(Issued::default());
        issued.insert(Credential {
            key_id: super::S3_KEY.into(),
            secret: super::S3_SECRET.into(),
            token: None,
            expires_at: None,
            source: "static",
        });
        issued
    }

    pub fn insert(&self, c: Credential) {
        self.creds.lock().unwrap().insert(c.key_id.clone(), c);
    }

    /// New temporary credentials from `source`, expiring `ttl_secs` from now.
    pub fn issue(&self, source: &'static str, ttl_secs: i64) -> Credential {
        let n = self.seq.fetch_add(1, Ordering::SeqCst);
        let tag = std::process::id();
        let c = Credential {
            key_id: format!("ASIA{}{tag}X{n}", source.to_ascii_uppercase()),
            secret: format!("secret/{source}+{tag}/{n}"),
            token: Some(format!("token-{source}-{tag}-{n}/+=")),
            expires_at: Some(now_unix() + ttl_secs),
            source,
        };
        self.insert(c.clone());
        c
    }

    pub fn get(&self, key_id: &str) -> Option<Credential> {
        self.creds.lock().unwrap().get(key_id).cloned()
    }

    /// How many credentials `source` has issued.
    pub fn count(&self, source: &str) -> usize {
        self.creds
            .lock()
            .unwrap()
            .values()
            .filter(|c| c.source == source)
            .count()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// IMDSv2 at `/latest/...`, role `flowarchive-role`.
    Imds,
    /// STS; the web identity token and role ARN it accepts.
    Sts { web_token: String, role_arn: String },
    /// The container endpoint at `path`; the `Authorization` value it requires.
    Container { path: String, auth: String },
}

pub const IMDS_ROLE: &str = "flowarchive-role";

/// One mock credential service.
pub struct Mock {
    pub server: HttpServer,
    pub state: Arc<MockState>,
}

pub struct MockState {
    kind: Kind,
    issued: Arc<Issued>,
    /// Lifetime of the credentials it issues, in seconds.
    pub ttl_secs: AtomicI64,
    /// While set, every request gets a 500 (an outage: refreshes fail).
    pub failing: AtomicBool,
    /// Credentials handed out.
    pub served: AtomicUsize,
    /// Requests refused (no IMDSv2 token, bad Authorization, bad web identity, ...).
    pub refused: AtomicUsize,
    imds_tokens: Mutex<Vec<(String, i64)>>,
}

impl Mock {
    pub fn start(kind: Kind, issued: Arc<Issued>, ttl_secs: i64) -> Mock {
        let state = Arc::new(MockState {
            kind,
            issued,
            ttl_secs: AtomicI64::new(ttl_secs),
            failing: AtomicBool::new(false),
            served: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            imds_tokens: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        let handler: Handler = Arc::new(move |r: &Request| s.answer(r));
        Mock {
            server: HttpServer::start(None, handler),
            state,
        }
    }

    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    pub fn served(&self) -> usize {
        self.state.served.load(Ordering::SeqCst)
    }

    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }
}

impl MockState {
    fn answer(&self, r: &Request) -> Response {
        if self.failing.load(Ordering::SeqCst) {
            return Response::text(500, "outage");
        }
        let answer = match &self.kind {
            Kind::Imds => self.imds(r),
            Kind::Sts {
                web_token,
                role_arn,
            } => self.sts(r, web_token, role_arn),
            Kind::Container { path, auth } => self.container(r, path, auth),
        };
        if answer.status >= 400 {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        answer
    }

    fn issue(&self, source: &'static str) -> Credential {
        self.served.fetch_add(1, Ordering::SeqCst);
        self.issued
            .issue(source, self.ttl_secs.load(Ordering::SeqCst))
    }

    fn credentials_json(c: &Credential, imds: bool) -> Response {
        let mut v = serde_json::json!({
            "AccessKeyId": c.key_id,
            "SecretAccessKey": c.secret,
            "Token": c.token,
            "Expiration": rfc3339(c.expires_at.unwrap()),
        });
        if imds {
            v["Code"] = "Success".into();
            v["Type"] = "AWS-HMAC".into();
            v["LastUpdated"] = rfc3339(now_unix()).into();
        } else {
            v["RoleArn"] = "arn:aws:iam::123456789012:role/flowarchive".into();
        }
        Response::new(200, "application/json", v.to_string())
    }

    /// IMDSv2: a PUT for a session token (with its TTL header), then GETs carrying it; a GET without
    /// a valid token is refused with 401, as on an instance that requires IMDSv2.
    fn imds(&self, r: &Request) -> Response {
        let now = now_unix();
        if r.method == "PUT" && r.path() == "/latest/api/token" {
            let ttl = r
                .header("x-aws-ec2-metadata-token-ttl-seconds")
                .and_then(|v| v.parse::<i64>().ok())
                .filter(|t| (1..=21_600).contains(t));
            let Some(ttl) = ttl else {
                return Response::text(400, "missing or bad token TTL");
            };
            if r.header("x-forwarded-for").is_some() {
                return Response::text(403, "forwarded");
            }
            let token = format!("imds-token-{}-{now}", self.served.load(Ordering::SeqCst));
            self.imds_tokens
                .lock()
                .unwrap()
                .push((token.clone(), now + ttl));
            return Response::text(200, token);
        }
        let valid = r.header("x-aws-ec2-metadata-token").is_some_and(|t| {
            self.imds_tokens
                .lock()
                .unwrap()
                .iter()
                .any(|(k, exp)| k == t && *exp >= now)
        });
        if !valid {
            return Response::text(401, "IMDSv2 token required");
        }
        const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
        match (r.method.as_str(), r.path().strip_prefix(CREDS)) {
            ("GET", Some("")) => Response::text(200, IMDS_ROLE),
            ("GET", Some(role)) if role == IMDS_ROLE => {
                Self::credentials_json(&self.issue("imds"), true)
            }
            _ => Response::text(404, "not found"),
        }
    }

    /// STS `AssumeRoleWithWebIdentity` (query or form parameters; the call is not signed).
    fn sts(&self, r: &Request, web_token: &str, role_arn: &str) -> Response {
        let mut params = query_pairs(r.query());
        params.extend(query_pairs(&String::from_utf8_lossy(&r.body)));
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let error = |status: u16, code: &str| {
            Response::new(
                status,
                "text/xml",
                format!(
                    "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>{code}</Code><Message>refused by the mock</Message></Error><RequestId>r</RequestId></ErrorResponse>"
                ),
            )
        };
        if get("Action") != Some("AssumeRoleWithWebIdentity")
            || get("Version") != Some("2011-06-15")
        {
            return error(400, "InvalidAction");
        }
        if get("RoleSessionName").is_none_or(str::is_empty) {
            return error(400, "ValidationError");
        }
        if get("WebIdentityToken") != Some(web_token) {
            return error(400, "InvalidIdentityToken");
        }
        if get("RoleArn") != Some(role_arn) {
            return error(403, "AccessDenied");
        }
        let c = self.issue("sts");
        Response::new(
            200,
            "text/xml",
            format!(
                "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<AssumeRoleWithWebIdentityResult>\
<SubjectFromWebIdentityToken>system:serviceaccount:default:flowarchive</SubjectFromWebIdentityToken>\
<Audience>sts.amazonaws.com</Audience>\
<AssumedRoleUser><Arn>{role_arn}/{session}</Arn><AssumedRoleId>AROA:{session}</AssumedRoleId></AssumedRoleUser>\
<Credentials><SessionToken>{token}</SessionToken><SecretAccessKey>{secret}</SecretAccessKey>\
<Expiration>{exp}</Expiration><AccessKeyId>{key}</AccessKeyId></Credentials>\
<Provider>oidc.eks.amazonaws.com</Provider>\
</AssumeRoleWithWebIdentityResult>\
<ResponseMetadata><RequestId>mock-request</RequestId></ResponseMetadata>\
</AssumeRoleWithWebIdentityResponse>",
                session = get("RoleSessionName").unwrap_or(""),
                token = xml_escape(c.token.as_deref().unwrap_or("")),
                secret = xml_escape(&c.secret),
                exp = rfc3339(c.expires_at.unwrap()),
                key = c.key_id,
            ),
        )
    }

    /// ECS (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`) or EKS Pod Identity (full URI with an
    /// authorization token): a GET of `path` carrying `Authorization: auth` (when `auth` is set).
    fn container(&self, r: &Request, path: &str, auth: &str) -> Response {
        if r.method != "GET" || r.path() != path {
            return Response::text(404, "not found");
        }
        if !auth.is_empty() && r.header("authorization") != Some(auth) {
            return Response::text(401, "bad authorization token");
        }
        Self::credentials_json(&self.issue("container"), false)
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
