//! AWS Signature Version 4 for presigned (query-string) S3 requests, written from the specification
//! so the test bed checks the module's signatures as S3 would, independently of the signer the module
//! uses: the canonical request, the string to sign, the HMAC key chain, verification of a request and
//! presigning one (the S3 front proxy re-signs with SeaweedFS's key). Payloads are `UNSIGNED-PAYLOAD`,
//! as in every presigned S3 request.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const UNSIGNED: &str = "UNSIGNED-PAYLOAD";

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &str) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().into()
}

/// URI-encodes as SigV4 asks: everything but `A-Za-z0-9-._~` (and `/` when `keep_slash`).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex_at = |j: usize| {
            bytes
                .get(j..j + 2)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        };
        match (bytes[i], hex_at(i + 1)) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The decoded `name=value` pairs of a query string.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The canonical query string: every pair but `X-Amz-Signature`, encoded, sorted.
pub fn canonical_query(pairs: &[(String, String)]) -> String {
    let mut encoded: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    encoded.sort();
    encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical request of a presigned S3 request. `path` is as sent (it is decoded and re-encoded
/// segment by segment, as S3 does); `headers` are the signed ones, names lowercase, in any order.
pub fn canonical_request(
    method: &str,
    path: &str,
    pairs: &[(String, String)],
    headers: &[(String, String)],
) -> String {
    let uri = uri_encode(&percent_decode(path), true);
    let mut headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| {
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), v)
        })
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    format!(
        "{method}\n{uri}\n{}\n{canonical_headers}\n{}\n{UNSIGNED}",
        canonical_query(pairs),
        signed.join(";")
    )
}

pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    )
}

/// The HMAC chain: `AWS4<secret>` → date → region → service → `aws4_request`.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date);
    let k = hmac(&k, region);
    let k = hmac(&k, service);
    hmac(&k, "aws4_request")
}

pub fn signature(secret: &str, date: &str, region: &str, service: &str, to_sign: &str) -> String {
    hex(&hmac(&signing_key(secret, date, region, service), to_sign))
}

/// `YYYYMMDDTHHMMSSZ` of a Unix time.
pub fn amz_date(unix: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).unwrap();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// The Unix time of a `YYYYMMDDTHHMMSSZ` date.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    if s.len() != 16 || &s[8..9] != "T" || !s.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<u32>().ok();
    let month = time::Month::try_from(n(4..6)? as u8).ok()?;
    let date = time::Date::from_calendar_date(n(0..4)? as i32, month, n(6..8)? as u8).ok()?;
    let t = date
        .with_hms(n(9..11)? as u8, n(11..13)? as u8, n(13..15)? as u8)
        .ok()?;
    Some(t.assume_utc().unix_timestamp())
}

/// The authentication of a presigned request, read from its query.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryAuth {
    pub key_id: String,
    /// `YYYYMMDD` of the credential scope.
    pub date: String,
    pub region: String,
    pub service: String,
    pub amz_date: String,
    pub signed_at: i64,
    pub expires: i64,
    pub signed_headers: Vec<String>,
    pub signature: String,
    pub token: Option<String>,
}

/// Why a presigned request is refused, with the S3 error code it gets.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub why: String,
}

fn refuse(status: u16, code: &'static str, why: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        why: why.into(),
    }
}

impl QueryAuth {
    pub fn parse(pairs: &[(String, String)]) -> Result<QueryAuth, Refusal> {
        let get = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let need = |name: &'static str| {
            get(name).ok_or_else(|| {
                refuse(
                    403,
                    "AccessDenied",
                    format!("query-string auth without {name}"),
                )
            })
        };
        if need("X-Amz-Algorithm")? != ALGORITHM {
            return Err(refuse(
                400,
                "AuthorizationQueryParametersError",
                "algorithm",
            ));
        }
        let credential = need("X-Amz-Credential")?;
        let scope: Vec<&str> = credential.split('/').collect();
        let [key_id, date, region, service, "aws4_request"] = scope[..] else {
            return Err(refuse(
                400,
                "AuthorizationQueryParametersError",
                format!("credential scope {credential}"),
            ));
        };
        let amz_date = need("X-Amz-Date")?;
        let signed_at = parse_amz_date(&amz_date)
            .ok_or_else(|| refuse(400, "AuthorizationQueryParametersError", "X-Amz-Date"))?;
        if !amz_date.starts_with(date) {
            return Err(refuse(
                403,
                "SignatureDoesNotMatch",
                "X-Amz-Date is not the scope's date",
            ));
        }
        let expires: i64 = need("X-Amz-Expires")?
            .parse()
            .ok()
            .filter(|e| (1..=604_800).contains(e))
            .ok_or_else(|| refuse(400, "AuthorizationQueryParametersError", "X-Amz-Expires"))?;
        Ok(QueryAuth {
            key_id: key_id.to_string(),
            date: date.to_string(),
            region: region.to_string(),
            service: service.to_string(),
            amz_date,
            signed_at,
            expires,
            signed_headers: need("X-Amz-SignedHeaders")?
                .split(';')
                .map(str::to_string)
                .collect(),
            signature: need("X-Amz-Signature")?,
            token: get("X-Amz-Security-Token"),
        })
    }

    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// Checks a presigned request as S3 does: `host` must be signed, every signed header present, the
/// signature right for `secret`, and the URL not expired at `now`. The token, key id and the
/// credential's own expiry are the caller's to check against what it issued.
pub fn verify(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    secret: &str,
    now: i64,
) -> Result<QueryAuth, Refusal> {
    let pairs = query_pairs(query);
    let auth = QueryAuth::parse(&pairs)?;
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(refuse(403, "AccessDenied", "host is not signed"));
    }
    let mut signed = Vec::new();
    for name in &auth.signed_headers {
        let value = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                refuse(
                    403,
                    "AccessDenied",
                    format!("signed header {name} is missing"),
                )
            })?;
        signed.push((name.clone(), value.1.clone()));
    }
    if now > auth.signed_at + auth.expires {
        return Err(refuse(403, "AccessDenied", "Request has expired"));
    }
    if auth.signed_at > now + 900 {
        return Err(refuse(403, "RequestTimeTooSkewed", "signed in the future"));
    }
    let canonical = canonical_request(method, path, &pairs, &signed);
    let to_sign = string_to_sign(&auth.amz_date, &auth.scope(), &canonical);
    let expected = signature(secret, &auth.date, &auth.region, &auth.service, &to_sign);
    if expected != auth.signature {
        return Err(refuse(
            403,
            "SignatureDoesNotMatch",
            format!("canonical request was:\n{canonical}"),
        ));
    }
    Ok(auth)
}

/// What a presigned URL is signed with.
pub struct Signer<'a> {
    pub key_id: &'a str,
    pub secret: &'a str,
    pub token: Option<&'a str>,
    pub region: &'a str,
}

impl Signer<'_> {
    /// The query string (with `extra` pairs kept) that presigns `method path` with the `headers`
    /// given (they must include `host`) at Unix time `now`.
    pub fn presign(
        &self,
        method: &str,
        path: &str,
        extra: &[(String, String)],
        headers: &[(String, String)],
        now: i64,
        expires: i64,
    ) -> String {
        let date = amz_date(now);
        let scope = format!("{}/{}/s3/aws4_request", &date[..8], self.region);
        let mut names: Vec<String> = headers
            .iter()
            .map(|(k, _)| k.to_ascii_lowercase())
            .collect();
        names.sort();
        let mut pairs: Vec<(String, String)> = extra.to_vec();
        pairs.push(("X-Amz-Algorithm".into(), ALGORITHM.into()));
        pairs.push((
            "X-Amz-Credential".into(),
            format!("{}/{scope}", self.key_id),
        ));
        pairs.push(("X-Amz-Date".into(), date.clone()));
        pairs.push(("X-Amz-Expires".into(), expires.to_string()));
        pairs.push(("X-Amz-SignedHeaders".into(), names.join(";")));
        if let Some(token) = self.token {
            pairs.push(("X-Amz-Security-Token".into(), token.into()));
        }
        let canonical = canonical_request(method, path, &pairs, headers);
        let to_sign = string_to_sign(&date, &scope, &canonical);
        let sig = signature(self.secret, &date[..8], self.region, "s3", &to_sign);
        pairs.push(("X-Amz-Signature".into(), sig));
        pairs
            .iter()
            .map(|(k, v)| format!("{}={}", uri_encode(k, false), uri_encode(v, false)))
            .collect::<Vec<_>>()
            .join("&")
    }
}
