//! S3 credentials, resolved as the AWS SDKs resolve them, cached and refreshed before they expire.
//!
//! Order (`credentials auto`): the `access-key` config (with `secret-key` / `secret-key-file`) → the
//! environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) → web identity
//! (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, through STS `AssumeRoleWithWebIdentity`) → container
//! credentials (ECS `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, or `..._FULL_URI` with
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]` as EKS Pod Identity sets) → EC2 instance metadata, IMDSv2
//! only (a session token first; IMDSv1 is never tried). `credentials <name>` pins one source.
//!
//! The first source that is *configured* is used, as in the SDKs: a configured source that fails is an
//! error, not a reason to try the next (that would sign with an identity nobody chose).
//!
//! The shape is object_store's: each source is one small type implementing one trait
//! ([`providers::Provider`]: is it configured, and fetch a set from it), the chain and the pin are a
//! walk over those types ([`choose`]), and temporary sets go through one token cache
//! ([`cache::TokenCache`]) that refreshes them ahead of expiry, one worker at a time, and keeps the
//! last good set while a refresh fails. Why each piece is its own file: the providers hold the AWS
//! protocols, [`service`] the HTTP and the answers' formats (JSON, STS XML, RFC 3339), the cache the
//! concurrency; each can be read, and tested, without the others.
//!
//! Temporary credentials are fetched on the worker thread that needs them (never on the main thread),
//! cached for the whole server, and refreshed when less than half their lifetime (at most five
//! minutes) is left. One worker refreshes while the others keep signing with the cached set. A failed
//! refresh keeps the old credentials until they are about to expire, and is counted and logged; it is
//! tried again after a pause, not on every request.

mod cache;
mod providers;
mod service;
#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::clock::now_ms;

use super::{fail, FailureKind, StoreError};
use cache::TokenCache;
use providers::{ConfigKeys, Container, Env, EnvKeys, Imds, Provider, WebIdentity};

/// Where credentials come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Config,
    Env,
    WebIdentity,
    Container,
    Imds,
}

impl Source {
    /// Every source, in the order of the chain.
    pub const ALL: [Source; 5] = [
        Source::Config,
        Source::Env,
        Source::WebIdentity,
        Source::Container,
        Source::Imds,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Env => "env",
            Source::WebIdentity => "web-identity",
            Source::Container => "container",
            Source::Imds => "imds",
        }
    }

    /// The value of the `credentials` config: `auto` (`None`) or one source.
    pub fn parse_pin(v: &str) -> Result<Option<Source>, String> {
        if v.is_empty() || v.eq_ignore_ascii_case("auto") {
            return Ok(None);
        }
        Source::ALL
            .into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(v))
            .map(Some)
            .ok_or_else(|| {
                "credentials must be auto, config, env, web-identity, container or imds".into()
            })
    }
}

/// A credential set. Its secret parts never appear in `Debug`, errors or logs.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    pub key_id: String,
    secret: String,
    token: Option<String>,
    /// Unix ms after which the set is refused (`None`: long-term keys).
    pub expires_ms: Option<i64>,
    pub source: Source,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials({}, expires {:?})",
            self.source.name(),
            self.expires_ms
        )
    }
}

impl Credentials {
    /// The set rusty-s3 presigns with.
    pub fn signing(&self) -> rusty_s3::Credentials {
        match &self.token {
            Some(t) => rusty_s3::Credentials::new_with_token(&self.key_id, &self.secret, t),
            None => rusty_s3::Credentials::new(&self.key_id, &self.secret),
        }
    }
}

/// What the chain reads from the configs (copied on the main thread with the other settings).
#[derive(Clone, Debug)]
pub struct CredentialConfig {
    /// `credentials`: `None` for auto.
    pub pin: Option<Source>,
    pub access_key: String,
    /// Never shown.
    pub secret_key: Hidden,
    /// The S3 region (STS's regional endpoint when `AWS_REGION` is unset).
    pub region: String,
    /// `tls-ca-file`, for S3 and for STS and container endpoints over HTTPS.
    pub tls_ca_file: String,
    /// Where a failed refresh is reported (the server log).
    pub warn: fn(&str),
}

/// A string kept out of `Debug`.
#[derive(Clone, Default, PartialEq)]
pub struct Hidden(pub String);

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

fn cred_error(message: String) -> StoreError {
    fail(FailureKind::Credentials, message)
}

/// The provider the chain chose, as configs and environment set it up. Comparable, so the token
/// cache can tell whether its set came from the provider chosen now.
#[derive(Clone, Debug, PartialEq)]
enum Chosen {
    Config(ConfigKeys),
    Env(EnvKeys),
    WebIdentity(WebIdentity),
    Container(Container),
    Imds(Imds),
}

impl Chosen {
    fn provider(&self) -> &dyn Provider {
        match self {
            Chosen::Config(p) => p,
            Chosen::Env(p) => p,
            Chosen::WebIdentity(p) => p,
            Chosen::Container(p) => p,
            Chosen::Imds(p) => p,
        }
    }
}

/// One link of the chain: the provider of its source if that source is configured.
type Link = fn(&CredentialConfig, Env, bool) -> Result<Option<Chosen>, StoreError>;

/// The chain, in the SDKs' order (that of [`Source::ALL`]).
const CHAIN: [(Source, Link); 5] = [
    (Source::Config, |c, e, p| {
        Ok(ConfigKeys::configured(c, e, p)?.map(Chosen::Config))
    }),
    (Source::Env, |c, e, p| {
        Ok(EnvKeys::configured(c, e, p)?.map(Chosen::Env))
    }),
    (Source::WebIdentity, |c, e, p| {
        Ok(WebIdentity::configured(c, e, p)?.map(Chosen::WebIdentity))
    }),
    (Source::Container, |c, e, p| {
        Ok(Container::configured(c, e, p)?.map(Chosen::Container))
    }),
    (Source::Imds, |c, e, p| {
        Ok(Imds::configured(c, e, p)?.map(Chosen::Imds))
    }),
];

/// The first configured source (`auto`), or the pinned one, as its provider.
fn choose(cfg: &CredentialConfig, env: Env) -> Result<Chosen, StoreError> {
    let pinned = cfg.pin.is_some();
    for (source, link) in CHAIN {
        if cfg.pin.is_some_and(|p| p != source) {
            continue;
        }
        if let Some(chosen) = link(cfg, env, pinned)? {
            return Ok(chosen);
        }
    }
    Err(cred_error(match cfg.pin {
        Some(Source::Imds) => "credentials imds: AWS_EC2_METADATA_DISABLED is true".into(),
        _ => "no S3 credentials: set flowarchive.access-key and secret-key-file, the AWS_* \
              environment, a web identity, container credentials, or run on EC2 with a role"
            .into(),
    }))
}

/// The temporary set in use, for the whole server. A static because the stores that sign are
/// rebuilt from a copy of the configs for every command and sweep, while a set fetched from STS,
/// IMDS or a container endpoint must outlive them (or each request would ask the service again);
/// and because INFO, on the main thread, reads the set in use from it without a handle to any store.
static CACHE: TokenCache<Chosen> = TokenCache::new();

/// The credentials to sign with now. Fetches or refreshes when needed, on the calling thread (always
/// a worker). `timeout` bounds each call to a credential service.
pub fn current(cfg: &CredentialConfig, timeout: Duration) -> Result<Credentials, StoreError> {
    current_with(cfg, &|name| std::env::var(name).ok(), timeout)
}

fn current_with(
    cfg: &CredentialConfig,
    env: Env,
    timeout: Duration,
) -> Result<Credentials, StoreError> {
    let chosen = choose(cfg, env)?;
    let provider = chosen.provider();
    if !provider.temporary() {
        return provider
            .fetch(&cfg.tls_ca_file, timeout)
            .map(|c| CACHE.serve(&c));
    }
    CACHE.get(&chosen, cfg.warn, || {
        provider.fetch(&cfg.tls_ca_file, timeout).map_err(|e| {
            cred_error(format!(
                "S3 credentials from {}: {e}",
                provider.source().name()
            ))
        })
    })
}

/// The source in use (of the set last handed out), seconds to its expiry (-1: does not expire), and
/// refresh failures since load.
pub fn status() -> (Option<Source>, i64, u64) {
    let (source, expires) = CACHE.served();
    let left = expires.map_or(-1, |e| ((e - now_ms()) / 1000).max(0));
    (source, left, CACHE.failures())
}
