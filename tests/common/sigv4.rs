//! AWS Signature Version 4 of presigned (query-string) S3 requests, computed by AWS's own signer, the
//! `aws-sigv4` crate, for the S3 front proxy ([`super::s3front`]): it verifies every request the module
//! sends and presigns what it forwards to SeaweedFS.
//!
//! Why AWS's signer: the module signs with rusty-s3, and a verifier written here from the
//! specification could share the signer's misreading of it (an encoding, an order, a header left out)
//! and accept what S3 refuses. What is written here is only what a server does around the signature:
//! reading the authentication parameters of the query, refusing an expired URL or a missing signed
//! header, and handing the request as received to `aws-sigv4` to recompute the signature it must carry.
//!
//! How a received request is recomputed: S3 checks a presigned request with the parameters it
//! carries, so its canonical request is that of the request as received, whose query holds every
//! `X-Amz-*` parameter but the signature, with exactly the headers its `X-Amz-SignedHeaders` names.
//! `aws-sigv4`'s presigning picks its own signed headers (it never signs `x-amz-checksum-mode`, which
//! the module signs on its HEADs), so the verifier asks it instead for the header-form signature of
//! that very request, adding nothing to it: both forms sign the same string. AWS's published presigned
//! examples, and `aws-sigv4`'s own presigning where it signs the same headers, prove that this gives
//! AWS's signatures (tests/s3_production.rs). The front presigns what it forwards the same way, every
//! forwarded header signed. The path is canonical as S3 reads it:
//! decoded, then every byte but `A-Za-z0-9-._~/` encoded. Payloads are `UNSIGNED-PAYLOAD`, as in
//! every presigned S3 request.

use std::borrow::Cow;
use std::time::{Duration, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, PercentEncodingMode, SessionTokenMode, SignableBody, SignableRequest, SignatureLocation,
    SigningSettings, UriPathNormalizationMode,
};
use aws_sigv4::sign::v4;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// What SigV4 encodes in a path: every byte but its unreserved characters and the separator.
const PATH_ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The decoded `name=value` pairs of a query string (or of a form body).
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

/// The path as S3 signs it: decoded, then encoded once as SigV4 asks. `None` if it is no UTF-8.
pub fn canonical_path(path: &str) -> Option<String> {
    let decoded = percent_decode_str(path).decode_utf8().ok()?;
    Some(utf8_percent_encode(&decoded, PATH_ENCODED).to_string())
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
}

/// Checks a presigned S3 request as S3 does: `host` must be signed, every signed header present, the
/// URL not expired at `now`, and the signature the one `aws-sigv4` computes for `secret`. The token,
/// key id and the credential's own expiry are the caller's to check against what it issued.
pub fn verify(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    secret: &str,
    now: i64,
) -> Result<QueryAuth, Refusal> {
    verify_payload(
        method,
        path,
        query,
        headers,
        secret,
        now,
        SignableBody::UnsignedPayload,
    )
}

/// [`verify`] for a request whose payload is signed as `body` (AWS's generic examples sign the empty
/// body's hash; S3's presigned requests `UNSIGNED-PAYLOAD`).
pub fn verify_payload(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(String, String)],
    secret: &str,
    now: i64,
    body: SignableBody<'_>,
) -> Result<QueryAuth, Refusal> {
    let auth = QueryAuth::parse(&query_pairs(query))?;
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(refuse(403, "AccessDenied", "host is not signed"));
    }
    // Every value of every signed header, in the order sent (SigV4 joins repeated ones).
    let mut signed = Vec::new();
    for name in &auth.signed_headers {
        let before = signed.len();
        signed.extend(
            headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| (name.as_str(), v.as_str())),
        );
        if signed.len() == before {
            return Err(refuse(
                403,
                "AccessDenied",
                format!("signed header {name} is missing"),
            ));
        }
    }
    if now > auth.signed_at + auth.expires {
        return Err(refuse(403, "AccessDenied", "Request has expired"));
    }
    if auth.signed_at > now + 900 {
        return Err(refuse(403, "RequestTimeTooSkewed", "signed in the future"));
    }
    let path = canonical_path(path)
        .ok_or_else(|| refuse(400, "InvalidURI", "the path decodes to no UTF-8"))?;
    // The query as received, but for the signature: the signed parameters themselves.
    let query = query
        .split('&')
        .filter(|p| !p.starts_with("X-Amz-Signature="))
        .collect::<Vec<_>>()
        .join("&");
    let scope = Scope {
        key_id: &auth.key_id,
        secret,
        region: &auth.region,
        service: &auth.service,
        signed_at: auth.signed_at,
    };
    let (expected, signed_by_aws) = signature(method, &path, &query, &signed, &scope, body)?;
    let listed = auth.signed_headers.join(";");
    if signed_by_aws != listed {
        return Err(refuse(
            403,
            "SignatureDoesNotMatch",
            format!("X-Amz-SignedHeaders {listed}, but aws-sigv4 signed {signed_by_aws}"),
        ));
    }
    if expected != auth.signature {
        return Err(refuse(
            403,
            "SignatureDoesNotMatch",
            format!(
                "signature {} is not {expected}, aws-sigv4's for {method} {path}?{query}",
                auth.signature
            ),
        ));
    }
    Ok(auth)
}

/// Who signs, for what, and when.
struct Scope<'a> {
    key_id: &'a str,
    secret: &'a str,
    region: &'a str,
    service: &'a str,
    signed_at: i64,
}

/// The signature `aws-sigv4` gives `method path?query` (the query holding the request's own
/// authentication parameters, but for the signature) with exactly `headers` signed and nothing added,
/// and the signed-headers list it used.
fn signature(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    scope: &Scope,
    body: SignableBody<'_>,
) -> Result<(String, String), Refusal> {
    let identity = Credentials::new(scope.key_id, scope.secret, None, None, "s3-front").into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::Headers;
    settings.percent_encoding_mode = PercentEncodingMode::Single;
    settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    // The token, if any, is signed where the request carries it: in its query.
    settings.session_token_mode = SessionTokenMode::Exclude;
    // The header form adds x-amz-date; only the request's own signed headers are given, and none of
    // them is left out.
    settings.excluded_headers = Some(
        ["x-amz-date", "x-amz-security-token"]
            .into_iter()
            .filter(|h| !headers.iter().any(|(k, _)| k == h))
            .map(Cow::Borrowed)
            .collect(),
    );
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(scope.region)
        .name(scope.service)
        .time(UNIX_EPOCH + Duration::from_secs(scope.signed_at.max(0) as u64))
        .settings(settings)
        .build()
        .expect("every signing parameter is set")
        .into();
    let unsignable = |e: aws_sigv4::http_request::SigningError| {
        refuse(
            400,
            "InvalidRequest",
            format!("aws-sigv4 cannot sign it: {e}"),
        )
    };
    let uri = format!("{path}?{query}");
    let request =
        SignableRequest::new(method, uri, headers.iter().copied(), body).map_err(unsignable)?;
    let (instructions, signature) = sign(request, &params).map_err(unsignable)?.into_parts();
    let signed = instructions
        .headers()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.split("SignedHeaders=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_default()
        .to_string();
    Ok((signature, signed))
}

/// What a presigned URL is signed with.
pub struct Signer<'a> {
    pub key_id: &'a str,
    pub secret: &'a str,
    pub token: Option<&'a str>,
    pub region: &'a str,
}

impl Signer<'_> {
    /// The query string (the `extra` pairs, then the authentication parameters) that presigns
    /// `method path` (`path` already encoded, as sent) for S3 at Unix time `now`, signing every one
    /// of `headers` (they must include `host`). Not `aws-sigv4`'s own presigning: that never signs
    /// `x-amz-checksum-mode`, and SeaweedFS refuses an `x-amz-*` header it finds unsigned. The
    /// signature is `aws-sigv4`'s, computed as [`verify`] recomputes it.
    pub fn presign(
        &self,
        method: &str,
        path: &str,
        extra: &[(String, String)],
        headers: &[(String, String)],
        now: i64,
        expires: u64,
    ) -> String {
        let date = amz_date(now);
        let mut names: Vec<String> = headers
            .iter()
            .map(|(k, _)| k.to_ascii_lowercase())
            .collect();
        names.sort();
        names.dedup();
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query
            .extend_pairs(extra)
            .append_pair("X-Amz-Algorithm", ALGORITHM)
            .append_pair(
                "X-Amz-Credential",
                &format!(
                    "{}/{}/{}/s3/aws4_request",
                    self.key_id,
                    &date[..8],
                    self.region
                ),
            )
            .append_pair("X-Amz-Date", &date)
            .append_pair("X-Amz-Expires", &expires.to_string())
            .append_pair("X-Amz-SignedHeaders", &names.join(";"));
        if let Some(token) = self.token {
            query.append_pair("X-Amz-Security-Token", token);
        }
        let query = query.finish();
        let signed: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let scope = Scope {
            key_id: self.key_id,
            secret: self.secret,
            region: self.region,
            service: "s3",
            signed_at: now,
        };
        let (signature, _) = signature(
            method,
            path,
            &query,
            &signed,
            &scope,
            SignableBody::UnsignedPayload,
        )
        .expect("a request the front forwards is signable");
        format!("{query}&X-Amz-Signature={signature}")
    }
}
