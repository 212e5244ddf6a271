//! The five sources of credentials, one small type each behind one trait, as object_store has one
//! provider per AWS source.
//!
//! Why a type per source: each source has its own settings and its own protocol (keys as they are,
//! STS, the container endpoint, IMDSv2), and whether it is configured is decided from configs and
//! environment alone, before any request. Keeping the two together per source lets the chain
//! ([`super::choose`]) be a walk over the sources, and a source be tested without its neighbours.

use std::time::Duration;

use super::service::{parse_json, parse_sts, read_token_file, Service};
use super::{cred_error, CredentialConfig, Credentials, Hidden, Source};
use crate::s3::StoreError;

/// The environment, as a function (tests pass their own).
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// One source of credentials.
pub(super) trait Provider {
    fn source(&self) -> Source;

    /// Whether its sets expire. Temporary sets go through the token cache; long-term keys are used
    /// as they are.
    fn temporary(&self) -> bool {
        true
    }

    /// A set from this source, fetched on the calling worker (never the main thread). `timeout`
    /// bounds each call to the source's service, `tls_ca_file` adds a CA for it over HTTPS.
    fn fetch(&self, tls_ca_file: &str, timeout: Duration) -> Result<Credentials, StoreError>;

    /// This source as configs and environment set it up. `Ok(None)` when it is not configured (the
    /// chain goes on); an error when it is half configured, or pinned and not configured.
    fn configured(
        cfg: &CredentialConfig,
        env: Env,
        pinned: bool,
    ) -> Result<Option<Self>, StoreError>
    where
        Self: Sized;
}

pub(super) const IMDS_DEFAULT: &str = "http://169.254.169.254";
const ECS_HOST: &str = "http://169.254.170.2";
/// As the SDKs: an instance metadata service answers at once or is not there (off EC2, the address
/// does not answer at all).
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);

/// A variable of the environment, trimmed; unset when empty.
fn var(env: Env, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// A source's setting that is not there: `Ok(None)` (try the next source) unless the source is
/// pinned, then an error naming the setting.
fn missing<T>(source: Source, what: &str, pinned: bool) -> Result<Option<T>, StoreError> {
    if !pinned {
        return Ok(None);
    }
    Err(cred_error(format!(
        "credentials {}: {what} is not set",
        source.name()
    )))
}

/// Long-term keys from the `access-key` and `secret-key` (or `secret-key-file`) configs.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct ConfigKeys(Credentials);

impl Provider for ConfigKeys {
    fn source(&self) -> Source {
        Source::Config
    }

    fn temporary(&self) -> bool {
        false
    }

    fn fetch(&self, _: &str, _: Duration) -> Result<Credentials, StoreError> {
        Ok(self.0.clone())
    }

    fn configured(
        cfg: &CredentialConfig,
        _: Env,
        pinned: bool,
    ) -> Result<Option<Self>, StoreError> {
        if cfg.access_key.is_empty() {
            return missing(Source::Config, "flowarchive.access-key", pinned);
        }
        if cfg.secret_key.0.is_empty() {
            // An access key without its secret is half configured: an error, pinned or not.
            return missing(
                Source::Config,
                "flowarchive.secret-key (or secret-key-file)",
                true,
            );
        }
        Ok(Some(ConfigKeys(Credentials {
            key_id: cfg.access_key.clone(),
            secret: cfg.secret_key.0.clone(),
            token: None,
            expires_ms: None,
            source: Source::Config,
        })))
    }
}

/// Keys from the server process's environment (a session token with them is used, never refreshed).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct EnvKeys(Credentials);

impl Provider for EnvKeys {
    fn source(&self) -> Source {
        Source::Env
    }

    fn temporary(&self) -> bool {
        false
    }

    fn fetch(&self, _: &str, _: Duration) -> Result<Credentials, StoreError> {
        Ok(self.0.clone())
    }

    fn configured(
        _: &CredentialConfig,
        env: Env,
        pinned: bool,
    ) -> Result<Option<Self>, StoreError> {
        let Some(key_id) = var(env, "AWS_ACCESS_KEY_ID") else {
            return missing(Source::Env, "AWS_ACCESS_KEY_ID", pinned);
        };
        let Some(secret) = var(env, "AWS_SECRET_ACCESS_KEY") else {
            return missing(Source::Env, "AWS_SECRET_ACCESS_KEY", true);
        };
        Ok(Some(EnvKeys(Credentials {
            key_id,
            secret,
            token: var(env, "AWS_SESSION_TOKEN"),
            expires_ms: None,
            source: Source::Env,
        })))
    }
}

/// STS `AssumeRoleWithWebIdentity` with the JWT of a token file (EKS IRSA).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct WebIdentity {
    pub(super) token_file: String,
    pub(super) role_arn: String,
    pub(super) session: String,
    /// The STS endpoint.
    pub(super) sts: String,
}

impl Provider for WebIdentity {
    fn source(&self) -> Source {
        Source::WebIdentity
    }

    /// The token file is read anew at every fetch: EKS rotates it.
    fn fetch(&self, tls_ca_file: &str, timeout: Duration) -> Result<Credentials, StoreError> {
        let token = read_token_file(&self.token_file, "AWS_WEB_IDENTITY_TOKEN_FILE")?;
        let service = Service::new(tls_ca_file, timeout)?;
        let body = service.text(
            "STS AssumeRoleWithWebIdentity",
            service.agent.post(&self.sts).send_form(&[
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", &self.role_arn),
                ("RoleSessionName", &self.session),
                ("WebIdentityToken", &token),
            ]),
        )?;
        parse_sts(&body)
    }

    fn configured(
        cfg: &CredentialConfig,
        env: Env,
        pinned: bool,
    ) -> Result<Option<Self>, StoreError> {
        let Some(token_file) = var(env, "AWS_WEB_IDENTITY_TOKEN_FILE") else {
            return missing(Source::WebIdentity, "AWS_WEB_IDENTITY_TOKEN_FILE", pinned);
        };
        let Some(role_arn) = var(env, "AWS_ROLE_ARN") else {
            return missing(Source::WebIdentity, "AWS_ROLE_ARN", true);
        };
        let region = var(env, "AWS_REGION")
            .or_else(|| var(env, "AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| cfg.region.clone());
        Ok(Some(WebIdentity {
            token_file,
            role_arn,
            session: var(env, "AWS_ROLE_SESSION_NAME")
                .unwrap_or_else(|| format!("flowarchive-{}", std::process::id())),
            sts: var(env, "AWS_ENDPOINT_URL_STS")
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com")),
        }))
    }
}

/// The container credentials endpoint: ECS task roles, or EKS Pod Identity with its token.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Container {
    pub(super) url: String,
    pub(super) auth: ContainerAuth,
}

/// The `Authorization` a container endpoint gets.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum ContainerAuth {
    None,
    Token(Hidden),
    /// A file holding the token, read at every fetch (EKS rotates it).
    File(String),
}

impl Provider for Container {
    fn source(&self) -> Source {
        Source::Container
    }

    /// A GET of the endpoint, with its authorization token if one is configured.
    fn fetch(&self, tls_ca_file: &str, timeout: Duration) -> Result<Credentials, StoreError> {
        let token = match &self.auth {
            ContainerAuth::None => None,
            ContainerAuth::Token(t) => Some(t.0.clone()),
            ContainerAuth::File(f) => Some(read_token_file(
                f,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            )?),
        };
        let service = Service::new(tls_ca_file, timeout)?;
        let mut request = service.agent.get(&self.url);
        if let Some(token) = token {
            if token.contains(['\r', '\n']) {
                return Err(cred_error(
                    "the container authorization token holds a line break".into(),
                ));
            }
            request = request.set("Authorization", &token);
        }
        let body = service.text("container credentials", request.call())?;
        parse_json(&body, Source::Container)
    }

    fn configured(
        _: &CredentialConfig,
        env: Env,
        pinned: bool,
    ) -> Result<Option<Self>, StoreError> {
        let url = match (
            var(env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"),
            var(env, "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        ) {
            (Some(rel), _) => format!("{ECS_HOST}{rel}"),
            (None, Some(full)) => {
                container_url_allowed(&full)?;
                full
            }
            (None, None) => {
                return missing(
                    Source::Container,
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI (or _FULL_URI)",
                    pinned,
                )
            }
        };
        let auth = match (
            var(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
            var(env, "AWS_CONTAINER_AUTHORIZATION_TOKEN"),
        ) {
            (Some(file), _) => ContainerAuth::File(file),
            (None, Some(token)) => ContainerAuth::Token(Hidden(token)),
            (None, None) => ContainerAuth::None,
        };
        Ok(Some(Container { url, auth }))
    }
}

/// A full container credentials URI over plain HTTP must stay on this host or the ECS / EKS agents,
/// as the SDKs require (the token would otherwise travel in clear).
fn container_url_allowed(full: &str) -> Result<(), StoreError> {
    let url = url::Url::parse(full)
        .map_err(|_| cred_error("AWS_CONTAINER_CREDENTIALS_FULL_URI is not a URL".into()))?;
    let host_ok = match url.host() {
        Some(url::Host::Ipv4(ip)) => {
            ip.is_loopback()
                || ip == std::net::Ipv4Addr::new(169, 254, 170, 2)
                || ip == std::net::Ipv4Addr::new(169, 254, 170, 23)
        }
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.segments() == [0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23]
        }
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if host_ok => Ok(()),
        _ => Err(cred_error(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI over http must name a loopback or the ECS/EKS agent address"
                .into(),
        )),
    }
}

/// EC2 instance metadata, IMDSv2 only: IMDSv1 (no session token) is never tried.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Imds {
    pub(super) endpoint: String,
}

impl Provider for Imds {
    fn source(&self) -> Source {
        Source::Imds
    }

    /// A session token first, then the role's name and its credentials with that token.
    fn fetch(&self, tls_ca_file: &str, timeout: Duration) -> Result<Credentials, StoreError> {
        let service = Service::new(tls_ca_file, timeout.min(IMDS_TIMEOUT))?;
        let agent = &service.agent;
        let token = service.text(
            "IMDSv2 session token",
            agent
                .put(&format!("{}/latest/api/token", self.endpoint))
                .set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
                .call(),
        )?;
        let base = format!(
            "{}/latest/meta-data/iam/security-credentials/",
            self.endpoint
        );
        let get = |url: &str, what: &str| {
            let request = agent.get(url).set("X-aws-ec2-metadata-token", token.trim());
            service.text(what, request.call())
        };
        let roles = get(&base, "IMDS role name")?;
        let role = roles.lines().next().unwrap_or("").trim();
        if role.is_empty() || !role.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(cred_error("IMDS: the instance has no usable role".into()));
        }
        parse_json(
            &get(&format!("{base}{role}"), "IMDS credentials")?,
            Source::Imds,
        )
    }

    /// Configured unless `AWS_EC2_METADATA_DISABLED` is true (then not even when pinned: the chain's
    /// end names that variable).
    fn configured(_: &CredentialConfig, env: Env, _: bool) -> Result<Option<Self>, StoreError> {
        let disabled =
            var(env, "AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        Ok((!disabled).then(|| Imds {
            endpoint: var(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT")
                .unwrap_or_else(|| IMDS_DEFAULT.into())
                .trim_end_matches('/')
                .to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_full_uri_stays_local_over_http() {
        for ok in [
            "http://127.0.0.1:9/creds",
            "http://169.254.170.23/v1/credentials",
            "http://[fd00:ec2::23]/v1/credentials",
            "https://creds.example/x",
        ] {
            assert!(container_url_allowed(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1/creds",
            "http://creds.example/x",
            "ftp://127.0.0.1/",
        ] {
            assert!(container_url_allowed(bad).is_err(), "{bad}");
        }
    }
}
