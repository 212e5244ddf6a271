//! Talking to a credential service and reading what it answers: the JSON of IMDS and the container
//! endpoint, the XML of STS, RFC 3339 expiry times.
//!
//! Why apart from the providers: every service is reached the same guarded way (short timeouts, no
//! redirects, answers and token files read up to a bound, each failure naming its service and
//! cause, never a secret), and the formats are read by the crates already compiled into the module
//! through rusty-s3 (quick-xml for STS, which escapes and may wrap its values as any XML writer may;
//! `time` for RFC 3339), not by hand.

use std::io::Read;
use std::time::Duration;

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{cred_error, Credentials, Source};
use crate::s3::StoreError;

/// Largest answer read from a credential service, and largest token file.
const MAX_ANSWER: u64 = 64 * 1024;

/// An HTTP client for one fetch from a credential service.
pub(super) struct Service {
    pub(super) agent: ureq::Agent,
}

impl Service {
    /// `timeout` bounds each call; `tls_ca_file` adds a CA for services over HTTPS.
    pub(super) fn new(tls_ca_file: &str, timeout: Duration) -> Result<Service, StoreError> {
        let tls = crate::s3::tls::client_config(tls_ca_file)
            .map_err(|e| cred_error(format!("credentials: {e}")))?;
        Ok(Service {
            agent: ureq::AgentBuilder::new()
                .timeout(timeout)
                .redirects(0)
                .tls_config(tls)
                .build(),
        })
    }

    /// The body of a call's answer; a refusal names its HTTP status and S3-style error code, a
    /// transport failure its cause.
    pub(super) fn text(
        &self,
        what: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<String, StoreError> {
        let response = r.map_err(|e| match e {
            ureq::Error::Status(code, r) => {
                let mut body = String::new();
                let _ = r.into_reader().take(MAX_ANSWER).read_to_string(&mut body);
                let code_name = crate::s3::s3_error_code(&body).unwrap_or("");
                cred_error(
                    format!("{what} refused: HTTP {code} {code_name}")
                        .trim_end()
                        .into(),
                )
            }
            ureq::Error::Transport(t) => cred_error(format!(
                "{what} failed: {}",
                crate::s3::tls::describe(&t).unwrap_or_else(|| t.kind().to_string())
            )),
        })?;
        let mut body = String::new();
        response
            .into_reader()
            .take(MAX_ANSWER)
            .read_to_string(&mut body)
            .map_err(|e| cred_error(format!("{what}: answer cut short ({})", e.kind())))?;
        Ok(body)
    }
}

/// A token file's content, trimmed (a JWT for STS, or a container authorization token).
pub(super) fn read_token_file(path: &str, what: &str) -> Result<String, StoreError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_ANSWER).read_to_string(&mut text))
        .map_err(|e| cred_error(format!("{what} {path} cannot be read ({})", e.kind())))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(cred_error(format!("{what} {path} is empty")));
    }
    Ok(text.to_string())
}

/// Unix milliseconds of an RFC 3339 time (any fraction of a second, any offset).
fn rfc3339_ms(text: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(text.trim(), &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos().div_euclid(1_000_000)).ok()
}

fn expiry(text: &str, source: Source) -> Result<i64, StoreError> {
    rfc3339_ms(text).ok_or_else(|| {
        cred_error(format!(
            "{} credentials carry an unreadable Expiration",
            source.name()
        ))
    })
}

/// The JSON of IMDS and of the container endpoint.
pub(super) fn parse_json(body: &str, source: Source) -> Result<Credentials, StoreError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        code: Option<String>,
        access_key_id: Option<String>,
        secret_access_key: Option<String>,
        token: Option<String>,
        expiration: Option<String>,
    }
    let a: Answer = serde_json::from_str(body).map_err(|_| {
        cred_error(format!(
            "{} credentials are not the expected JSON",
            source.name()
        ))
    })?;
    if let Some(code) = a.code.filter(|c| c != "Success") {
        // The service's own code, cut to a safe word: it is shown in errors and logs.
        let code: String = code
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(64)
            .collect();
        return Err(cred_error(format!("{} credentials: {code}", source.name())));
    }
    let (Some(key_id), Some(secret)) = (a.access_key_id, a.secret_access_key) else {
        return Err(cred_error(format!(
            "{} credentials lack AccessKeyId or SecretAccessKey",
            source.name()
        )));
    };
    let expires_ms = a.expiration.map(|e| expiry(&e, source)).transpose()?;
    Ok(Credentials {
        key_id,
        secret,
        token: a.token.filter(|t| !t.is_empty()),
        expires_ms,
        source,
    })
}

/// STS's answer to `AssumeRoleWithWebIdentity`: the elements read, by their path; any other element
/// or attribute (namespaces, the assumed role, the request id) is passed over.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsAnswer {
    assume_role_with_web_identity_result: StsResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsResult {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: String,
    expiration: String,
}

pub(super) fn parse_sts(body: &str) -> Result<Credentials, StoreError> {
    let answer: StsAnswer = quick_xml::de::from_str(body).map_err(|_| {
        cred_error("STS AssumeRoleWithWebIdentity answered without credentials".into())
    })?;
    let c = answer.assume_role_with_web_identity_result.credentials;
    Ok(Credentials {
        key_id: c.access_key_id.trim().to_string(),
        secret: c.secret_access_key.trim().to_string(),
        token: Some(c.session_token.trim().to_string()),
        expires_ms: Some(expiry(&c.expiration, Source::WebIdentity)?),
        source: Source::WebIdentity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_answers_parse_and_secrets_stay_out_of_debug() {
        let json = r#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"sek/ret","Token":"tok","Expiration":"2026-11-30T05:00:00Z"}"#;
        let c = parse_json(json, Source::Imds).unwrap();
        assert_eq!(c.key_id, "ASIA1");
        assert_eq!(c.expires_ms, Some(1_796_014_800_000));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("sek/ret") && !shown.contains("tok"),
            "{shown}"
        );
        let e = parse_json(r#"{"Code":"Failed <b>"}"#, Source::Imds).unwrap_err();
        assert_eq!(e.message, "imds credentials: Failedb");
        assert!(parse_json("<html>", Source::Container).is_err());
        let e = parse_json(r#"{"AccessKeyId":"A"}"#, Source::Container).unwrap_err();
        assert!(
            e.message.contains("lack AccessKeyId or SecretAccessKey"),
            "{e}"
        );
        let late = r#"{"AccessKeyId":"A","SecretAccessKey":"s","Expiration":"soon"}"#;
        let e = parse_json(late, Source::Container).unwrap_err();
        assert_eq!(
            e.message,
            "container credentials carry an unreadable Expiration"
        );
    }

    /// STS as AWS answers: a namespace, elements in any order, values escaped with entities and
    /// character references (a session token is base64: `/`, `+`, `=`), an offset time with a
    /// fraction of a second.
    #[test]
    fn sts_answers_parse_through_quick_xml() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:default:app</SubjectFromWebIdentityToken>
    <AssumedRoleUser><Arn>arn:aws:sts::1:assumed-role/r/s</Arn><AssumedRoleId>AROA:s</AssumedRoleId></AssumedRoleUser>
    <Credentials>
      <SessionToken>a&amp;b&lt;c&gt;&quot;d&apos;e&#x2F;f&#43;=</SessionToken>
      <SecretAccessKey> wJal/rXUt+n&amp;KEY </SecretAccessKey>
      <Expiration>2026-11-30T07:00:00.123456+02:00</Expiration>
      <AccessKeyId>ASIA2</AccessKeyId>
    </Credentials>
    <Provider>oidc.eks.amazonaws.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;
        let c = parse_sts(xml).unwrap();
        assert_eq!(c.key_id, "ASIA2");
        assert_eq!(c.secret, "wJal/rXUt+n&KEY");
        assert_eq!(c.token.as_deref(), Some("a&b<c>\"d'e/f+="));
        assert_eq!(c.expires_ms, Some(1_796_014_800_123));
        assert_eq!(c.source, Source::WebIdentity);
        // A CDATA section is text too.
        let cdata = xml.replace(
            "<AccessKeyId>ASIA2</AccessKeyId>",
            "<AccessKeyId><![CDATA[ASIA3]]></AccessKeyId>",
        );
        assert_eq!(parse_sts(&cdata).unwrap().key_id, "ASIA3");
        // An error answer, a missing element, something that is not XML: no credentials.
        let error = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>AccessDenied</Code></Error></ErrorResponse>"#;
        let no_token = xml
            .replace("<SessionToken>", "<Other>")
            .replace("</SessionToken>", "</Other>");
        for bad in [error, "<ErrorResponse/>", &no_token, "{\"json\":1}", ""] {
            let e = parse_sts(bad).unwrap_err();
            assert_eq!(
                e.message, "STS AssumeRoleWithWebIdentity answered without credentials",
                "{bad}"
            );
        }
        let late = xml.replace("2026-11-30T07:00:00.123456+02:00", "2026-11-30 07:00");
        assert_eq!(
            parse_sts(&late).unwrap_err().message,
            "web-identity credentials carry an unreadable Expiration"
        );
    }

    #[test]
    fn expiry_times_are_rfc3339() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ms(" 2026-11-30T05:00:00Z\n"),
            Some(1_796_014_800_000)
        );
        // Fractions of any length, cut to the millisecond; any offset.
        assert_eq!(
            rfc3339_ms("2026-11-30T05:00:00.9Z"),
            Some(1_796_014_800_900)
        );
        assert_eq!(
            rfc3339_ms("2026-11-30T05:00:00.123987654Z"),
            Some(1_796_014_800_123)
        );
        assert_eq!(
            rfc3339_ms("2026-11-30T00:30:00.5-04:30"),
            Some(1_796_014_800_500)
        );
        assert_eq!(rfc3339_ms("1969-12-31T23:59:59.9995Z"), Some(-1));
        for bad in [
            "",
            "2026-11-30",
            "2026-11-30T05:00:00",
            "2026-02-30T05:00:00Z",
            "2026-11-30T25:00:00Z",
            "2026-11-30T05:00:00+2:00",
            "1796014800",
        ] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }
}
