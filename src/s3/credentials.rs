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
//! Temporary credentials are fetched on the worker thread that needs them (never on the main thread),
//! cached for the whole server, and refreshed when less than half their lifetime (at most five
//! minutes) is left. One worker refreshes while the others keep signing with the cached set. A failed
//! refresh keeps the old credentials until they are about to expire, and is counted and logged; it is
//! tried again after a pause, not on every request.

use std::io::Read;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::{now_ms, parse_rfc3339_ms};
use crate::sync::lock;

use super::{fail, FailureKind, StoreError};

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

/// How the chosen source is reached: decided from configs and environment alone.
#[derive(Clone, Debug, PartialEq)]
enum Plan {
    Static(Credentials),
    WebIdentity {
        token_file: String,
        role_arn: String,
        session: String,
        sts: String,
    },
    Container {
        url: String,
        auth: ContainerAuth,
    },
    Imds {
        endpoint: String,
    },
}

impl Plan {
    fn source(&self) -> Source {
        match self {
            Plan::Static(c) => c.source,
            Plan::WebIdentity { .. } => Source::WebIdentity,
            Plan::Container { .. } => Source::Container,
            Plan::Imds { .. } => Source::Imds,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum ContainerAuth {
    None,
    Token(Hidden),
    File(String),
}

const IMDS_DEFAULT: &str = "http://169.254.169.254";
const ECS_HOST: &str = "http://169.254.170.2";
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);
/// Largest answer read from a credential service, and largest token file.
const MAX_ANSWER: u64 = 64 * 1024;

fn cred_error(message: String) -> StoreError {
    fail(FailureKind::Credentials, message)
}

fn var(env: Env, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The first configured source (or the pinned one) and how to reach it.
fn plan(cfg: &CredentialConfig, env: Env) -> Result<Plan, StoreError> {
    let pinned = cfg.pin.is_some();
    for source in Source::ALL {
        if cfg.pin.is_some_and(|p| p != source) {
            continue;
        }
        let found = match source {
            Source::Config => config_plan(cfg, pinned)?,
            Source::Env => env_plan(env, pinned)?,
            Source::WebIdentity => web_identity_plan(cfg, env, pinned)?,
            Source::Container => container_plan(env, pinned)?,
            Source::Imds => imds_plan(env),
        };
        if let Some(plan) = found {
            return Ok(plan);
        }
    }
    Err(cred_error(match cfg.pin {
        Some(Source::Imds) => "credentials imds: AWS_EC2_METADATA_DISABLED is true".into(),
        _ => "no S3 credentials: set flowarchive.access-key and secret-key-file, the AWS_* \
              environment, a web identity, container credentials, or run on EC2 with a role"
            .into(),
    }))
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

fn config_plan(cfg: &CredentialConfig, pinned: bool) -> Result<Option<Plan>, StoreError> {
    if cfg.access_key.is_empty() {
        return missing(Source::Config, "flowarchive.access-key", pinned);
    }
    if cfg.secret_key.0.is_empty() {
        return missing(
            Source::Config,
            "flowarchive.secret-key (or secret-key-file)",
            true,
        );
    }
    Ok(Some(Plan::Static(Credentials {
        key_id: cfg.access_key.clone(),
        secret: cfg.secret_key.0.clone(),
        token: None,
        expires_ms: None,
        source: Source::Config,
    })))
}

fn env_plan(env: Env, pinned: bool) -> Result<Option<Plan>, StoreError> {
    let Some(key_id) = var(env, "AWS_ACCESS_KEY_ID") else {
        return missing(Source::Env, "AWS_ACCESS_KEY_ID", pinned);
    };
    let Some(secret) = var(env, "AWS_SECRET_ACCESS_KEY") else {
        return missing(Source::Env, "AWS_SECRET_ACCESS_KEY", true);
    };
    Ok(Some(Plan::Static(Credentials {
        key_id,
        secret,
        token: var(env, "AWS_SESSION_TOKEN"),
        expires_ms: None,
        source: Source::Env,
    })))
}

fn web_identity_plan(
    cfg: &CredentialConfig,
    env: Env,
    pinned: bool,
) -> Result<Option<Plan>, StoreError> {
    let Some(token_file) = var(env, "AWS_WEB_IDENTITY_TOKEN_FILE") else {
        return missing(Source::WebIdentity, "AWS_WEB_IDENTITY_TOKEN_FILE", pinned);
    };
    let Some(role_arn) = var(env, "AWS_ROLE_ARN") else {
        return missing(Source::WebIdentity, "AWS_ROLE_ARN", true);
    };
    let region = var(env, "AWS_REGION")
        .or_else(|| var(env, "AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| cfg.region.clone());
    Ok(Some(Plan::WebIdentity {
        token_file,
        role_arn,
        session: var(env, "AWS_ROLE_SESSION_NAME")
            .unwrap_or_else(|| format!("flowarchive-{}", std::process::id())),
        sts: var(env, "AWS_ENDPOINT_URL_STS")
            .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com")),
    }))
}

fn container_plan(env: Env, pinned: bool) -> Result<Option<Plan>, StoreError> {
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
    Ok(Some(Plan::Container { url, auth }))
}

fn imds_plan(env: Env) -> Option<Plan> {
    let disabled =
        var(env, "AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    (!disabled).then(|| Plan::Imds {
        endpoint: var(env, "AWS_EC2_METADATA_SERVICE_ENDPOINT")
            .unwrap_or_else(|| IMDS_DEFAULT.into())
            .trim_end_matches('/')
            .to_string(),
    })
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

// ------------------------------------------------------------------ fetching

/// Talks to a credential service: bounded answers, short timeouts, causes named.
struct Fetcher {
    agent: ureq::Agent,
}

impl Fetcher {
    fn new(cfg: &CredentialConfig, timeout: Duration) -> Result<Fetcher, StoreError> {
        let tls = super::tls::client_config(&cfg.tls_ca_file)
            .map_err(|e| cred_error(format!("credentials: {e}")))?;
        Ok(Fetcher {
            agent: ureq::AgentBuilder::new()
                .timeout(timeout)
                .redirects(0)
                .tls_config(tls)
                .build(),
        })
    }

    fn text(
        &self,
        what: &str,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<String, StoreError> {
        let response = r.map_err(|e| match e {
            ureq::Error::Status(code, r) => {
                let mut body = String::new();
                let _ = r.into_reader().take(MAX_ANSWER).read_to_string(&mut body);
                let code_name = super::s3_error_code(&body).unwrap_or("");
                cred_error(
                    format!("{what} refused: HTTP {code} {code_name}")
                        .trim_end()
                        .into(),
                )
            }
            ureq::Error::Transport(t) => cred_error(format!(
                "{what} failed: {}",
                super::tls::describe(&t).unwrap_or_else(|| t.kind().to_string())
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

    fn fetch(&self, plan: &Plan) -> Result<Credentials, StoreError> {
        match plan {
            Plan::Static(c) => Ok(c.clone()),
            Plan::WebIdentity {
                token_file,
                role_arn,
                session,
                sts,
            } => self.web_identity(token_file, role_arn, session, sts),
            Plan::Container { url, auth } => self.container(url, auth),
            Plan::Imds { endpoint } => self.imds(endpoint),
        }
    }

    /// STS `AssumeRoleWithWebIdentity` with the token file's JWT (read anew: EKS rotates it).
    fn web_identity(
        &self,
        token_file: &str,
        role_arn: &str,
        session: &str,
        sts: &str,
    ) -> Result<Credentials, StoreError> {
        let token = read_token_file(token_file, "AWS_WEB_IDENTITY_TOKEN_FILE")?;
        let body = self.text(
            "STS AssumeRoleWithWebIdentity",
            self.agent.post(sts).send_form(&[
                ("Action", "AssumeRoleWithWebIdentity"),
                ("Version", "2011-06-15"),
                ("RoleArn", role_arn),
                ("RoleSessionName", session),
                ("WebIdentityToken", &token),
            ]),
        )?;
        parse_sts(&body)
    }

    /// A GET of the container endpoint, with its authorization token if one is configured.
    fn container(&self, url: &str, auth: &ContainerAuth) -> Result<Credentials, StoreError> {
        let mut request = self.agent.get(url);
        let token = match auth {
            ContainerAuth::None => None,
            ContainerAuth::Token(t) => Some(t.0.clone()),
            ContainerAuth::File(f) => Some(read_token_file(
                f,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            )?),
        };
        if let Some(token) = token {
            if token.contains(['\r', '\n']) {
                return Err(cred_error(
                    "the container authorization token holds a line break".into(),
                ));
            }
            request = request.set("Authorization", &token);
        }
        let body = self.text("container credentials", request.call())?;
        parse_json(&body, Source::Container)
    }

    /// IMDSv2: a session token first, then the role's name and its credentials with that token.
    fn imds(&self, endpoint: &str) -> Result<Credentials, StoreError> {
        let token = self.text(
            "IMDSv2 session token",
            self.agent
                .put(&format!("{endpoint}/latest/api/token"))
                .set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
                .call(),
        )?;
        let base = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
        let get = |url: &str, what: &str| {
            self.text(
                what,
                self.agent
                    .get(url)
                    .set("X-aws-ec2-metadata-token", token.trim())
                    .call(),
            )
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
}

fn read_token_file(path: &str, what: &str) -> Result<String, StoreError> {
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

fn expiry(text: &str, source: Source) -> Result<i64, StoreError> {
    parse_rfc3339_ms(text.trim()).ok_or_else(|| {
        cred_error(format!(
            "{} credentials carry an unreadable Expiration",
            source.name()
        ))
    })
}

/// The JSON of IMDS and of the container endpoint.
fn parse_json(body: &str, source: Source) -> Result<Credentials, StoreError> {
    #[derive(serde::Deserialize)]
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

/// The text of `<tag>` in an XML answer, unescaped.
fn xml_tag(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let end = body[start..].find(&format!("</{tag}>"))? + start;
    Some(
        body[start..end]
            .trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

fn parse_sts(body: &str) -> Result<Credentials, StoreError> {
    let get = |tag| xml_tag(body, tag);
    match (
        get("AccessKeyId"),
        get("SecretAccessKey"),
        get("SessionToken"),
        get("Expiration"),
    ) {
        (Some(key_id), Some(secret), Some(token), Some(exp)) => Ok(Credentials {
            key_id,
            secret,
            token: Some(token),
            expires_ms: Some(expiry(&exp, Source::WebIdentity)?),
            source: Source::WebIdentity,
        }),
        _ => Err(cred_error(
            "STS AssumeRoleWithWebIdentity answered without credentials".into(),
        )),
    }
}

// ------------------------------------------------------------------ the cache

/// When a set is refreshed (`refresh_at`) and when it is no longer used to sign (`usable_until`).
/// A presigned request must reach S3 before the set expires: the last tenth of its life (at most a
/// minute) is not used.
fn schedule(fetched_ms: i64, expires_ms: i64) -> (i64, i64) {
    let life = (expires_ms - fetched_ms).max(0);
    let refresh_at = expires_ms - (life / 2).min(300_000);
    let usable_until = expires_ms - (life / 10).min(60_000);
    (refresh_at, usable_until)
}

/// Pause after a failed refresh before the next try (other requests keep the old set meanwhile).
const RETRY_REFRESH_MS: i64 = 1_000;

struct Cached {
    plan: Plan,
    creds: Credentials,
    refresh_at: i64,
    usable_until: i64,
    /// No refresh is tried before this (after a failure).
    next_try: i64,
}

static CACHE: Mutex<Option<Cached>> = Mutex::new(None);
/// Held by the one worker that fetches; others keep signing with the cached set.
static FETCHING: Mutex<()> = Mutex::new(());
static REFRESH_FAILURES: AtomicU64 = AtomicU64::new(0);
/// The last failed fetch: when, for which plan, and its error (workers that waited for it share it
/// instead of asking again, one after the other).
static LAST_FAILURE: Mutex<Option<(i64, Plan, String)>> = Mutex::new(None);
/// Source (its index in `Source::ALL`, plus one; 0 before any) and expiry (`i64::MAX`: none) of the set
/// last handed out, for INFO. Atomics, not a lock: INFO runs on the main thread, and the workers that
/// sign may run in the idle scheduling class (a lock one of them held while descheduled would stall
/// the server).
static IN_USE_SOURCE: AtomicU8 = AtomicU8::new(0);
static IN_USE_EXPIRES: AtomicI64 = AtomicI64::new(i64::MAX);

fn in_use(c: &Credentials) -> Credentials {
    let index = Source::ALL.iter().position(|s| *s == c.source).unwrap_or(0);
    IN_USE_EXPIRES.store(c.expires_ms.unwrap_or(i64::MAX), Ordering::Relaxed);
    IN_USE_SOURCE.store(index as u8 + 1, Ordering::Relaxed);
    c.clone()
}

/// The credentials to sign with now. Fetches or refreshes when needed, on the calling thread (always
/// a worker). `timeout` bounds each call to a credential service.
pub fn current(cfg: &CredentialConfig, timeout: Duration) -> Result<Credentials, StoreError> {
    current_with(cfg, &|name| std::env::var(name).ok(), timeout)
}

fn current_with(
    cfg: &CredentialConfig,
    env: &dyn Fn(&str) -> Option<String>,
    timeout: Duration,
) -> Result<Credentials, StoreError> {
    let plan = plan(cfg, env)?;
    if let Plan::Static(c) = &plan {
        return Ok(in_use(c));
    }
    let (keep, usable) = cached(&plan);
    if let Some(creds) = keep {
        return Ok(in_use(&creds));
    }
    // One fetch at a time. With a usable set, do not wait for another worker's refresh.
    let asked = now_ms();
    let _fetching = match (FETCHING.try_lock(), &usable) {
        (Ok(guard), _) => guard,
        (Err(_), Some(creds)) => return Ok(in_use(creds)),
        (Err(_), None) => lock(&FETCHING),
    };
    // Another worker may have fetched while this one waited: its set, or its failure.
    if let (Some(creds), _) = cached(&plan) {
        return Ok(in_use(&creds));
    }
    if let Some((_, _, message)) = lock(&LAST_FAILURE)
        .as_ref()
        .filter(|(at, p, _)| *at >= asked && *p == plan)
    {
        return Err(cred_error(message.clone()));
    }
    // As the SDKs: an instance metadata service answers at once or is not there (off EC2, the
    // address does not answer at all).
    let timeout = match plan {
        Plan::Imds { .. } => timeout.min(IMDS_TIMEOUT),
        _ => timeout,
    };
    match Fetcher::new(cfg, timeout).and_then(|f| f.fetch(&plan)) {
        Ok(creds) => remember(plan, creds),
        Err(e) => {
            let e = cred_error(format!("S3 credentials from {}: {e}", plan.source().name()));
            REFRESH_FAILURES.fetch_add(1, Ordering::Relaxed);
            (cfg.warn)(&format!("flowarchive: S3 credentials refresh failed: {e}"));
            *lock(&LAST_FAILURE) = Some((now_ms(), plan.clone(), e.message.clone()));
            if let Some(c) = lock(&CACHE).as_mut().filter(|c| c.plan == plan) {
                c.next_try = now_ms() + RETRY_REFRESH_MS;
            }
            usable.map(|c| in_use(&c)).ok_or(e)
        }
    }
}

/// Caches a fetched set with its refresh schedule, and hands it out.
fn remember(plan: Plan, creds: Credentials) -> Result<Credentials, StoreError> {
    let fetched = now_ms();
    let (refresh_at, usable_until) = creds
        .expires_ms
        .map_or((i64::MAX, i64::MAX), |e| schedule(fetched, e));
    if usable_until <= fetched {
        return Err(cred_error(format!(
            "{} credentials are already expired",
            creds.source.name()
        )));
    }
    *lock(&CACHE) = Some(Cached {
        plan,
        creds: creds.clone(),
        refresh_at,
        usable_until,
        next_try: 0,
    });
    Ok(in_use(&creds))
}

/// The cached set for `plan`: to sign with at once (fresh, or stale while a refresh pauses after a
/// failure), and, when not, still usable while it is refreshed.
fn cached(plan: &Plan) -> (Option<Credentials>, Option<Credentials>) {
    let now = now_ms();
    let cache = lock(&CACHE);
    let Some(c) = cache.as_ref().filter(|c| c.plan == *plan) else {
        return (None, None);
    };
    let usable = now < c.usable_until;
    if now < c.refresh_at || (usable && now < c.next_try) {
        return (Some(c.creds.clone()), None);
    }
    (None, usable.then(|| c.creds.clone()))
}

/// The source in use (of the set last handed out), seconds to its expiry (-1: does not expire), and
/// refresh failures since load.
pub fn status() -> (Option<Source>, i64, u64) {
    let source = (IN_USE_SOURCE.load(Ordering::Relaxed) as usize)
        .checked_sub(1)
        .and_then(|i| Source::ALL.get(i).copied());
    let expires = Some(IN_USE_EXPIRES.load(Ordering::Relaxed)).filter(|e| *e != i64::MAX);
    let left = expires.map_or(-1, |e| ((e - now_ms()) / 1000).max(0));
    (source, left, REFRESH_FAILURES.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn cfg(pin: Option<Source>, key: &str) -> CredentialConfig {
        CredentialConfig {
            pin,
            access_key: key.into(),
            secret_key: Hidden(if key.is_empty() { "" } else { "s3cr3t" }.into()),
            region: "eu-west-3".into(),
            tls_ca_file: String::new(),
            warn: |_| {},
        }
    }

    fn source(p: &Plan) -> &'static str {
        p.source().name()
    }

    #[test]
    fn the_chain_takes_the_first_configured_source() {
        let everything = env_of(&[
            ("AWS_ACCESS_KEY_ID", "AKENV"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
            (
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "/v2/credentials/x",
            ),
        ]);
        assert_eq!(
            source(&plan(&cfg(None, "AKCFG"), &everything).unwrap()),
            "config"
        );
        assert_eq!(source(&plan(&cfg(None, ""), &everything).unwrap()), "env");
        let web = plan(&cfg(Some(Source::WebIdentity), "AKCFG"), &everything).unwrap();
        assert_eq!(
            web,
            Plan::WebIdentity {
                token_file: "/var/run/token".into(),
                role_arn: "arn:aws:iam::1:role/r".into(),
                session: format!("flowarchive-{}", std::process::id()),
                sts: "https://sts.eu-west-3.amazonaws.com".into(),
            }
        );
        let container = plan(&cfg(Some(Source::Container), ""), &everything).unwrap();
        assert_eq!(
            container,
            Plan::Container {
                url: "http://169.254.170.2/v2/credentials/x".into(),
                auth: ContainerAuth::None
            }
        );
        // Nothing configured: IMDSv2 at its default address, unless disabled.
        let imds = plan(&cfg(None, ""), &env_of(&[])).unwrap();
        assert_eq!(
            imds,
            Plan::Imds {
                endpoint: IMDS_DEFAULT.into()
            }
        );
        let off = env_of(&[("AWS_EC2_METADATA_DISABLED", "TRUE")]);
        let e = plan(&cfg(None, ""), &off).unwrap_err();
        assert_eq!(e.kind, FailureKind::Credentials);
        assert!(e.message.contains("no S3 credentials"), "{e}");
        // A pinned source that is not configured is an error naming what is missing.
        let e = plan(&cfg(Some(Source::Env), "AKCFG"), &env_of(&[])).unwrap_err();
        assert!(e.message.contains("AWS_ACCESS_KEY_ID"), "{e}");
        let e = plan(&cfg(Some(Source::Config), ""), &everything).unwrap_err();
        assert!(e.message.contains("flowarchive.access-key"), "{e}");
    }

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
        let env = env_of(&[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:9/c"),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "tok"),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "/run/token"),
        ]);
        assert_eq!(
            plan(&cfg(None, ""), &env).unwrap(),
            Plan::Container {
                url: "http://127.0.0.1:9/c".into(),
                auth: ContainerAuth::File("/run/token".into())
            }
        );
    }

    #[test]
    fn answers_parse_and_secrets_stay_out_of_debug() {
        let json = r#"{"Code":"Success","AccessKeyId":"ASIA1","SecretAccessKey":"sek/ret","Token":"tok","Expiration":"2026-11-30T05:00:00Z"}"#;
        let c = parse_json(json, Source::Imds).unwrap();
        assert_eq!(c.key_id, "ASIA1");
        assert_eq!(c.expires_ms, parse_rfc3339_ms("2026-11-30T05:00:00Z"));
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("sek/ret") && !shown.contains("tok"),
            "{shown}"
        );
        assert!(parse_json(r#"{"Code":"Failed"}"#, Source::Imds).is_err());
        assert!(parse_json("<html>", Source::Container).is_err());
        let xml = "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
                   <SessionToken>a&amp;b</SessionToken><SecretAccessKey>s</SecretAccessKey>\
                   <Expiration>2026-11-30T05:00:00.123Z</Expiration><AccessKeyId>ASIA2</AccessKeyId>\
                   </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>";
        let c = parse_sts(xml).unwrap();
        assert_eq!(
            (c.key_id.as_str(), c.token.as_deref()),
            ("ASIA2", Some("a&b"))
        );
        assert!(parse_sts("<ErrorResponse/>").is_err());
    }

    #[test]
    fn an_unreachable_source_is_a_counted_error_naming_it() {
        // Port 1 on loopback refuses at once.
        let env = env_of(&[("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1")]);
        let failures = REFRESH_FAILURES.load(Ordering::Relaxed);
        let errors: Vec<StoreError> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| current_with(&cfg(None, ""), &env, Duration::from_secs(1))))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap().unwrap_err())
                .collect()
        });
        for e in &errors {
            assert_eq!(e.kind, FailureKind::Credentials);
            assert!(
                e.message
                    .starts_with("S3 credentials from imds: IMDSv2 session token failed"),
                "{e}"
            );
        }
        let fetched = REFRESH_FAILURES.load(Ordering::Relaxed) - failures;
        assert!((1..=4).contains(&fetched), "{fetched}");
    }

    #[test]
    fn refresh_comes_well_before_expiry() {
        // An hour-long set: refreshed five minutes before, used until a minute before.
        assert_eq!(schedule(0, 3_600_000), (3_300_000, 3_540_000));
        // A ten-second set: refreshed at half-life, used until its last second.
        assert_eq!(schedule(0, 10_000), (5_000, 9_000));
    }
}
