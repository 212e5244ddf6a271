//! Module configs (`CONFIG GET/SET flowarchive.*`, also accepted as `loadmodule` arguments).
//!
//! Every string config is validated when set: a bad value is refused with the reason and the old value
//! stays. `Settings::current()` is their snapshot, built once per change and shared by every command
//! and job until the next change.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis_module::configuration::{
    ConfigurationContext, ConfigurationValue, EnumConfigurationValue,
};
use redis_module::{raw, Context, RedisError, RedisString};

use crate::layout::{self, Layout, StateSource};
use crate::s3::credentials::{CredentialConfig, Hidden, Source};
/// How an upload is proven stored before anything is deleted (`flowarchive.verify`).
pub use crate::s3::VerifyMode;
use crate::s3::{self, retry, Checksum, S3Settings, Sse};
use crate::sync::lock;

/// An integer config: its value and its default and bounds, named once for registration and code.
pub struct Int {
    pub value: AtomicI64,
    pub default: i64,
    pub min: i64,
    pub max: i64,
}

impl Int {
    pub const fn new(default: i64, min: i64, max: i64) -> Self {
        Int {
            value: AtomicI64::new(default),
            default,
            min,
            max,
        }
    }

    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }
}

/// A string config with its default and a validator.
pub struct Checked {
    value: Mutex<String>,
    pub default: &'static str,
    check: fn(&str) -> Result<(), String>,
}

impl Checked {
    pub const fn new(default: &'static str, check: fn(&str) -> Result<(), String>) -> Self {
        Checked {
            value: Mutex::new(String::new()),
            default,
            check,
        }
    }

    fn lock(&self) -> MutexGuard<'_, String> {
        lock(&self.value)
    }

    pub fn get(&self) -> String {
        self.lock().clone()
    }
}

impl ConfigurationValue<RedisString> for Checked {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create_from_slice(std::ptr::null_mut(), self.lock().as_bytes())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let text = val
            .try_as_str()
            .map_err(|_| RedisError::Str("value must be UTF-8"))?;
        let text = text.trim();
        (self.check)(text).map_err(RedisError::String)?;
        *self.lock() = text.to_string();
        changed();
        Ok(())
    }
}

/// A secret: settable, never shown back (CONFIG GET answers an empty string). Empty means not set, so a
/// `flowarchive.secret-key ""` line in a config file (as CONFIG REWRITE used to write) changes nothing.
pub struct Secret(Mutex<String>);

impl Secret {
    fn lock(&self) -> MutexGuard<'_, String> {
        lock(&self.0)
    }

    pub fn get(&self) -> String {
        self.lock().clone()
    }

    fn clear(&self) {
        self.lock().clear();
    }
}

impl ConfigurationValue<RedisString> for Secret {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create_from_slice(std::ptr::null_mut(), b"")
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let text = val
            .try_as_str()
            .map_err(|_| RedisError::Str("value must be UTF-8"))?;
        *self.lock() = text.to_string();
        changed();
        Ok(())
    }
}

/// Largest secret-key-file read: a secret key is a few dozen bytes.
const MAX_SECRET_FILE: u64 = 4096;

/// `secret-key-file`: a path, shown by CONFIG GET and kept by CONFIG REWRITE, and the secret read from
/// it, kept in memory only. The file is read when the config is set (at load or by CONFIG SET); a file
/// that cannot be read or holds no secret is refused and the old path and secret stay. Of secret-key and
/// secret-key-file, the one set last is used.
pub struct SecretFile(Mutex<(String, String)>);

impl SecretFile {
    fn lock(&self) -> MutexGuard<'_, (String, String)> {
        lock(&self.0)
    }

    /// The secret read from the file; empty when no file is set.
    pub fn secret(&self) -> String {
        self.lock().1.clone()
    }
}

impl ConfigurationValue<RedisString> for SecretFile {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create_from_slice(std::ptr::null_mut(), self.lock().0.as_bytes())
    }

    fn set(&self, _ctx: &ConfigurationContext, val: RedisString) -> Result<(), RedisError> {
        let path = val
            .try_as_str()
            .map_err(|_| RedisError::Str("value must be UTF-8"))?
            .trim();
        if path.is_empty() {
            *self.lock() = Default::default();
            changed();
            return Ok(());
        }
        let secret = read_secret_file(path).map_err(RedisError::String)?;
        *self.lock() = (path.to_string(), secret);
        // The server skips a CONFIG SET of secret-key to "" (CONFIG GET already answers ""), so setting
        // a file is how a runtime secret-key is dropped.
        SECRET_KEY.clear();
        changed();
        Ok(())
    }
}

/// The secret in `path`, trimmed. Errors name the path (cut short), never the content.
fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let shown: String = path.chars().take(200).collect();
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_string(&mut text))
        .map_err(|e| format!("secret-key-file {shown:?} cannot be read: {e}"))?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "secret-key-file {shown:?} is larger than {MAX_SECRET_FILE} bytes"
        ));
    }
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("secret-key-file {shown:?} is empty"));
    }
    Ok(secret.to_string())
}

/// Why the module must not load with these arguments, if it must not: a `secret-key` argument would
/// be shown by MODULE LIST and written in clear by CONFIG REWRITE, and a `secret-key-file` argument
/// whose file could not be read leaves the module without its secret (the server loads a module even
/// when one of its configs is refused).
pub fn refused_load_args(args: &[RedisString]) -> Option<String> {
    if args.iter().any(|a| a.as_slice() == b"secret-key") {
        return Some(
            "flowarchive: the secret-key load argument is refused (MODULE LIST and CONFIG REWRITE \
             would show it): pass the secret with secret-key-file <path>, the AWS_* environment, or \
             CONFIG SET flowarchive.secret-key at runtime"
                .into(),
        );
    }
    let path = args
        .iter()
        .skip_while(|a| a.as_slice() != b"secret-key-file")
        .nth(1)?
        .try_as_str()
        .ok()?
        .trim();
    if path.is_empty() || !SECRET_KEY_FILE.secret().is_empty() {
        return None;
    }
    let why = read_secret_file(path).err()?;
    Some(format!("flowarchive: not loaded: {why}"))
}

fn any(_: &str) -> Result<(), String> {
    Ok(())
}

fn endpoint(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    let url = url::Url::parse(v).map_err(|e| format!("endpoint is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("endpoint must be an http:// or https:// URL with a host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("endpoint must not carry a query or fragment".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "endpoint must not carry credentials (user:password@); use access-key and secret-key-file"
                .into(),
        );
    }
    Ok(())
}

fn region(v: &str) -> Result<(), String> {
    if v.is_empty() || !v.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
        return Err("region must be non-empty letters, digits and '-'".into());
    }
    Ok(())
}

pub fn bucket(v: &str) -> Result<(), String> {
    let ok = v.is_empty()
        || ((3..=63).contains(&v.len())
            && v.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
            && v.as_bytes()[0].is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err("bucket must be 3-63 characters of a-z, 0-9, '-' and '.'".into())
    }
}

pub fn object_prefix(v: &str) -> Result<(), String> {
    if v.starts_with('/') || v.ends_with('/') || v.contains("//") {
        return Err("prefix must not start or end with '/' nor contain '//'".into());
    }
    if v.split('/').any(|seg| seg == "." || seg == "..") {
        return Err("prefix must not contain '.' or '..' segments".into());
    }
    if v.bytes().any(|c| c.is_ascii_control()) || v.len() > 512 {
        return Err("prefix must be at most 512 printable characters".into());
    }
    Ok(())
}

/// A place archives may be read from: a bucket and an object key prefix (possibly empty).
#[derive(Debug, PartialEq)]
pub struct Root {
    pub bucket: String,
    pub prefix: String,
}

/// Parses `flowarchive.read-allow`: space-separated `s3://bucket[/prefix]` roots.
pub fn parse_roots(value: &str) -> Result<Vec<Root>, String> {
    value
        .split_whitespace()
        .map(|root| {
            let rest = root.strip_prefix("s3://").ok_or_else(|| {
                format!("read-allow root {root:?} must look like s3://bucket[/prefix]")
            })?;
            let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if name.is_empty() {
                return Err(format!("read-allow root {root:?} names no bucket"));
            }
            bucket(name).map_err(|e| format!("read-allow root {root:?}: {e}"))?;
            object_prefix(prefix).map_err(|e| format!("read-allow root {root:?}: {e}"))?;
            Ok(Root {
                bucket: name.to_string(),
                prefix: prefix.to_string(),
            })
        })
        .collect()
}

/// The CONFIG SET check of `flowarchive.read-allow`.
pub fn check_read_allow(value: &str) -> Result<(), String> {
    parse_roots(value).map(|_| ())
}

/// `credentials`: `auto` or one source of the chain.
fn credentials(v: &str) -> Result<(), String> {
    Source::parse_pin(v).map(|_| ())
}

/// `tls-ca-file`: read now, so a file that cannot serve is refused with the reason.
fn tls_ca_file(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    s3::tls::read_ca_file(v).map(|_| ())
}

fn sse(v: &str) -> Result<(), String> {
    Sse::parse(v).map(|_| ())
}

fn sse_kms_key_id(v: &str) -> Result<(), String> {
    if v.len() > 2048 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "sse-kms-key-id must be a KMS key id, ARN or alias (printable, no spaces)".into(),
        );
    }
    Ok(())
}

/// `storage-class`: the classes whose objects FLOWARCHIVE.GET can read at once.
fn storage_class(v: &str) -> Result<(), String> {
    const READABLE: [&str; 7] = [
        "STANDARD",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER_IR",
        "REDUCED_REDUNDANCY",
        "EXPRESS_ONEZONE",
    ];
    match v {
        "" => Ok(()),
        v if READABLE.contains(&v) => Ok(()),
        "GLACIER" | "DEEP_ARCHIVE" => Err(format!(
            "storage-class {v} is refused: its objects need a restore before FLOWARCHIVE.GET can read them"
        )),
        _ => Err(format!(
            "storage-class must be empty or one of {}",
            READABLE.join(", ")
        )),
    }
}

fn checksum(v: &str) -> Result<(), String> {
    Checksum::parse(v).map(|_| ())
}

/// Declares an enum config once: the enum, its conversions for the server (the choices numbered 0, 1,
/// ... in the order listed), the names `CONFIG GET` shows, and the refusal of any other value, all
/// from one list. The `impl` form gives an enum declared elsewhere (a room below this one) the same
/// conversions; its list must name every variant (the numbering is an exhaustive match).
macro_rules! choice_config {
    (
        $(#[$meta:meta])* $vis:vis enum $name:ident ($config:literal) {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        choice_config! { impl $name ($config) { $($variant => $text,)+ } }
    };
    (impl $name:ident ($config:literal) { $($variant:ident => $text:literal,)+ }) => {
        impl From<$name> for i32 {
            fn from(v: $name) -> i32 {
                // The position of each choice in the list.
                enum Position {
                    $($variant,)+
                }
                match v {
                    $($name::$variant => Position::$variant as i32,)+
                }
            }
        }

        impl TryFrom<i32> for $name {
            type Error = RedisError;
            fn try_from(v: i32) -> Result<Self, RedisError> {
                [$($name::$variant,)+]
                    .into_iter()
                    .find(|c| i32::from(*c) == v)
                    .ok_or_else(|| RedisError::String(choices_refused($config, &[$($text,)+])))
            }
        }

        impl EnumConfigurationValue for $name {
            fn get_options(&self) -> (Vec<String>, Vec<i32>) {
                (
                    vec![$($text.into(),)+],
                    vec![$(i32::from($name::$variant),)+],
                )
            }
        }
    };
}

/// The refusal of a value that is none of a choice config's `names`: `<config> must be a, b or c`.
fn choices_refused(config: &str, names: &[&str]) -> String {
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("{config} must be {} or {last}", rest.join(", "))
        }
        _ => format!("{config} must be {}", names.join(", ")),
    }
}

choice_config! {
    impl VerifyMode ("verify") { Head => "head", PutResponse => "put-response", Auto => "auto", }
}

choice_config! {
    /// How the archive index stores its entries (`flowarchive.index-format`, see `index`).
    pub enum IndexFormat ("index-format") {
        /// One hash, id -> `s3://bucket/key` (per slot on a cluster): the design's index.
        Hash => "hash",
        /// Many small hashes, id -> generation and folder number (docs/FORMAT.md).
        Compact => "compact",
    }
}

choice_config! { impl StateSource ("state") { Fold => "fold", Snapshot => "snapshot", } }

fn statuses(v: &str) -> Result<(), String> {
    if v.split([',', ' ']).any(|s| !s.is_empty()) {
        Ok(())
    } else {
        Err("terminal-statuses needs at least one status".into())
    }
}

/// Parses `30d`, `12h`, `15m`, `90s`, `500ms` into milliseconds.
pub fn parse_duration_ms(v: &str) -> Result<i64, String> {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("'{v}' is not a duration like 30d, 12h, 15m, 90s or 500ms"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("'{v}' needs a unit: ms, s, m, h or d")),
    };
    n.checked_mul(scale)
        .filter(|ms| *ms <= 100 * 365 * 86_400_000)
        .ok_or_else(|| format!("'{v}' is too long (at most 100 years)"))
}

fn duration(v: &str) -> Result<(), String> {
    parse_duration_ms(v).map(|_| ())
}

fn key_prefix(v: &str) -> Result<(), String> {
    if v.contains('$') {
        return Err("key-prefix must not contain '$'".into());
    }
    if v.len() > layout::MAX_TEMPLATE {
        return Err(format!(
            "key-prefix is longer than {} bytes",
            layout::MAX_TEMPLATE
        ));
    }
    Ok(())
}

macro_rules! template_check {
    ($name:ident, [$($allowed:literal),*], [$($required:literal),*], $optional:literal) => {
        fn $name(v: &str) -> Result<(), String> {
            if v.is_empty() {
                return if $optional { Ok(()) } else { Err("must not be empty".into()) };
            }
            layout::validate(v, &[$($allowed),*], &[$($required),*])
        }
    };
}

template_check!(flow_key, ["prefix", "id"], ["id"], false);
template_check!(opt_flow_key, ["prefix", "id"], ["id"], true);
template_check!(member, ["prefix", "id"], ["id"], false);
template_check!(index_name, ["prefix", "id"], [], false);

/// Earlier index names a change of `index-key` keeps readable (`index-read-keys`) at most.
pub const MAX_INDEX_READ_KEYS: usize = 8;

/// Set once the module has loaded: from then on a change of `index-key` keeps the name it replaces.
static LOADED: AtomicBool = AtomicBool::new(false);
/// `index-key` as last applied.
static LAST_INDEX_KEY: Mutex<String> = Mutex::new(String::new());

/// `index-key`: a name template, and room in `index-read-keys` for the name it replaces.
fn index_key(v: &str) -> Result<(), String> {
    index_name(v)?;
    let old = INDEX_KEY.get();
    let kept = INDEX_READ_KEYS.get();
    let names: Vec<&str> = kept.split_whitespace().collect();
    if LOADED.load(Ordering::SeqCst)
        && old != v
        && !names.contains(&old.as_str())
        && names.len() >= MAX_INDEX_READ_KEYS
    {
        return Err(format!(
            "index-read-keys already holds {MAX_INDEX_READ_KEYS} earlier index names; move their entries under the current one (scripts/flowarchive-index --rebuild) and clear it first"
        ));
    }
    Ok(())
}

/// `index-read-keys`: up to `MAX_INDEX_READ_KEYS` space-separated index names.
fn index_read_keys(v: &str) -> Result<(), String> {
    let names: Vec<&str> = v.split_whitespace().collect();
    if names.len() > MAX_INDEX_READ_KEYS {
        return Err(format!("at most {MAX_INDEX_READ_KEYS} index names"));
    }
    names
        .iter()
        .try_for_each(|n| index_name(n).map_err(|e| format!("{n:?}: {e}")))
}

/// A change of `index-key` after load: the name it replaces joins `index-read-keys`, so every flow
/// archived under it (by a sweep that began before the change, too) stays readable and is never
/// archived twice.
pub fn on_index_key(_ctx: &ConfigurationContext, _name: &str, _value: &'static Checked) {
    let now = INDEX_KEY.get();
    let mut last = lock(&LAST_INDEX_KEY);
    if LOADED.load(Ordering::SeqCst) && !last.is_empty() && *last != now {
        let mut kept = INDEX_READ_KEYS.get();
        if !kept.split_whitespace().any(|n| n == *last) {
            if !kept.is_empty() {
                kept.push(' ');
            }
            kept.push_str(&last);
            *INDEX_READ_KEYS.lock() = kept;
            changed();
            crate::ops::log::notice(&format!(
                "flowarchive: index-key changed from {:?} to {now:?}; the earlier name is read too (flowarchive.index-read-keys)",
                *last
            ));
        }
    }
    *last = now;
}

/// The server's config event: every CONFIG SET, of the integer, flag and choice configs too (whose
/// values the server stores in place).
extern "C" fn on_config_event(
    _ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    _sub: u64,
    _data: *mut std::ffi::c_void,
) {
    changed();
}

/// Follows CONFIG SET from now on (called from OnLoad). A server without the config event gets
/// settings built afresh at every use instead.
pub fn follow_changes(ctx: &Context) {
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_CONFIG,
        dataver: 1,
    };
    // SAFETY: called from OnLoad with the module's context; the callback is a plain function that
    // lives as long as the module.
    let status = unsafe {
        raw::RedisModule_SubscribeToServerEvent.map_or(raw::REDISMODULE_ERR as i32, |subscribe| {
            subscribe(ctx.ctx, event, Some(on_config_event))
        })
    };
    FOLLOWED.store(status == raw::REDISMODULE_OK as i32, Ordering::SeqCst);
}

/// Whether the server tells the module of every CONFIG SET (`follow_changes`).
static FOLLOWED: AtomicBool = AtomicBool::new(false);

/// While the server tells the module of every CONFIG SET: a number that changes with every one, so
/// what is read from the server's configs holds while it stays the same. `None` otherwise (read
/// them afresh at every use).
pub fn followed_generation() -> Option<u64> {
    FOLLOWED
        .load(Ordering::SeqCst)
        .then(|| GENERATION.load(Ordering::SeqCst))
}

/// Called at the end of OnLoad: configs set from now on are changes.
pub fn loaded() {
    *lock(&LAST_INDEX_KEY) = INDEX_KEY.get();
    LOADED.store(true, Ordering::SeqCst);
}
template_check!(opt_shared_key, ["prefix"], [], true);
template_check!(status_set, ["prefix", "status"], ["status"], true);
template_check!(
    label_set,
    ["prefix", "label", "value"],
    ["label", "value"],
    true
);
template_check!(label_values, ["prefix", "label"], ["label"], true);

pub static ENDPOINT: Checked = Checked::new("", endpoint);
pub static REGION: Checked = Checked::new("us-east-1", region);
pub static BUCKET: Checked = Checked::new("", bucket);
pub static PREFIX: Checked = Checked::new("", object_prefix);
pub static PATH_STYLE: AtomicBool = AtomicBool::new(false);
pub static ACCESS_KEY: Checked = Checked::new("", any);
pub static SECRET_KEY: Secret = Secret(Mutex::new(String::new()));
pub static SECRET_KEY_FILE: SecretFile = SecretFile(Mutex::new((String::new(), String::new())));
pub static REQUEST_TIMEOUT_MS: Int = Int::new(30_000, 100, 3_600_000);
pub static VERIFY: Mutex<VerifyMode> = Mutex::new(VerifyMode::Auto);
pub static RETENTION: Checked = Checked::new("30d", duration);
pub static CONCURRENCY: Int = Int::new(4, 1, CONCURRENCY_MAX);
/// Also bounds the sweep's upload pool.
pub const CONCURRENCY_MAX: i64 = 256;
pub static BATCH_SIZE: Int = Int::new(100, 1, 100_000);
/// The main thread's time per batched step in µs (`mainthread::step_batch`): a step begins or commits
/// further flows, or reads further events of a long log (`mainthread::read_log`), only while it has
/// spent less.
pub static STEP_BUDGET_US: Int = Int::new(250, 50, 100_000);
pub static CACHE_BYTES: Int = Int::new(64 << 20, 0, 1 << 40);
pub static READ_MAX_BYTES: Int = Int::new(64 << 20, 64 << 10, 1 << 40);
pub static OBJECT_NAME_MAX: Int = Int::new(
    layout::OBJECT_NAME_MAX as i64,
    layout::SHA_NAME_LEN as i64,
    layout::MAX_OBJECT_KEY as i64,
);
pub static READ_ALLOW: Checked = Checked::new("", check_read_allow);
pub static UPLOAD_BYTES_PER_SEC: Int = Int::new(0, 0, 1 << 40);
pub static SWEEP_INTERVAL: Checked = Checked::new("0s", duration);
pub static KEY_PREFIX: Checked = Checked::new("argyll", key_prefix);
pub static INDEX_KEY: Checked = Checked::new("archived:flows", index_key);
pub static INDEX_READ_KEYS: Checked = Checked::new("", index_read_keys);
pub static INDEX_FORMAT: Mutex<IndexFormat> = Mutex::new(IndexFormat::Hash);
/// Hashes of a new compact index (per DB; on a cluster spread over the 16384 slots): about one per 50
/// archived flows keeps each in the server's listpack encoding (docs/FORMAT.md). Recorded in the index
/// when it is created, so a change applies to indexes created later (convert to hash and back).
pub static INDEX_BUCKETS: Int = Int::new(4096, 1, 1 << 26);
pub static EVENTS_KEY: Checked = Checked::new("$prefix:flow:$id:events", flow_key);
pub static SNAPSHOT_KEY: Checked = Checked::new("$prefix:flow:$id:snapshot:val", flow_key);
pub static SEQ_KEY: Checked = Checked::new("$prefix:flow:$id:snapshot:seq", opt_flow_key);
pub static LABELS_KEY: Checked = Checked::new("$prefix:flow:$id:idx:labels", opt_flow_key);
pub static STATUS_KEY: Checked = Checked::new("$prefix:idx:status", opt_shared_key);
pub static STATUS_SET_KEY: Checked = Checked::new("$prefix:idx:status:$status", status_set);
pub static LABEL_SET_KEY: Checked = Checked::new("$prefix:idx:label:$label:$value", label_set);
pub static LABEL_VALUES_KEY: Checked = Checked::new("$prefix:idx:label:$label", label_values);
pub static FLOW_MEMBER: Checked = Checked::new("flow:$id", member);
/// The engine's own archiver holds this key while it takes a flow: such a flow is left to it.
pub static LEASE_KEY: Checked = Checked::new("$prefix:archive:lease:$id", opt_flow_key);
pub static STATE: Mutex<StateSource> = Mutex::new(StateSource::Fold);
pub static TERMINAL_STATUSES: Checked = Checked::new("completed,failed", statuses);
pub static CREDENTIALS: Checked = Checked::new("auto", credentials);
pub static TLS_CA_FILE: Checked = Checked::new("", tls_ca_file);
pub static RETRY_ATTEMPTS: Int = Int::new(5, 1, 20);
pub static RETRY_MAX_MS: Int = Int::new(20_000, 0, 3_600_000);
pub static SSE: Checked = Checked::new("none", sse);
pub static SSE_KMS_KEY_ID: Checked = Checked::new("", sse_kms_key_id);
pub static STORAGE_CLASS: Checked = Checked::new("", storage_class);
pub static CHECKSUM: Checked = Checked::new("sha256", checksum);

/// The S3 settings of one job. The credential configs: `access-key` with `secret-key` when set at
/// runtime and not dropped by a later `secret-key-file`, else the secret of `secret-key-file`; the
/// rest of the chain (the environment, roles) is read by the worker that signs.
fn s3_settings() -> S3Settings {
    let secret = Some(SECRET_KEY.get())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| SECRET_KEY_FILE.secret());
    S3Settings {
        endpoint: ENDPOINT.get(),
        region: REGION.get(),
        bucket: BUCKET.get(),
        prefix: PREFIX.get(),
        path_style: PATH_STYLE.load(Ordering::Relaxed),
        credentials: CredentialConfig {
            pin: Source::parse_pin(&CREDENTIALS.get()).unwrap_or(None),
            access_key: ACCESS_KEY.get(),
            secret_key: Hidden(secret),
            region: REGION.get(),
            tls_ca_file: TLS_CA_FILE.get(),
            warn: crate::ops::log::warning,
        },
        timeout_ms: REQUEST_TIMEOUT_MS.get().max(1) as u64,
        verify: *lock(&VERIFY),
        notice: crate::ops::log::notice,
        upload_bytes_per_sec: &UPLOAD_BYTES_PER_SEC.value,
        retry: retry::Policy {
            attempts: RETRY_ATTEMPTS.get().clamp(1, 20) as u32,
            total: Duration::from_millis(RETRY_MAX_MS.get().max(0) as u64),
        },
        sse: Sse::parse(&SSE.get()).unwrap_or(Sse::None),
        sse_kms_key_id: SSE_KMS_KEY_ID.get(),
        storage_class: STORAGE_CLASS.get(),
        checksum: Checksum::parse(&CHECKSUM.get()).unwrap_or(Checksum::Sha256),
        object_name_max: OBJECT_NAME_MAX.get().max(layout::SHA_NAME_LEN as i64) as usize,
    }
}

/// The internal sweep timer's period in ms; 0 when off.
pub fn sweep_interval_ms() -> i64 {
    parse_duration_ms(&SWEEP_INTERVAL.get()).unwrap_or(0)
}

/// Everything a command or an archive job needs. Built once per change of a config and shared, so a
/// job keeps the settings it started with whatever CONFIG SETs follow.
pub struct Settings {
    pub s3: S3Settings,
    pub layout: Layout,
    pub retention_ms: i64,
    /// Byte budget of the archived-flow cache (0: off).
    pub cache_bytes: usize,
    /// Cap on one read (flowarchive.read-max-bytes).
    pub read_max_bytes: u64,
    /// Older `s3://bucket[/prefix]` roots archives may also be read from (flowarchive.read-allow).
    pub read_allow: String,
    pub concurrency: usize,
    pub batch_size: usize,
    /// Why nothing may run under these settings: key templates that can meet (`Layout::check_keys`).
    refused: Option<String>,
}

/// Bumped by every change of a module config: the snapshot is rebuilt at its next use.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// A module config changed (the server's config event, a set of the module's own, or the module's
/// own change of `index-read-keys`).
pub fn changed() {
    GENERATION.fetch_add(1, Ordering::SeqCst);
}

thread_local! {
    /// The settings last built on this thread (the main thread, in practice), with the generation
    /// they were built at.
    static SNAPSHOT: RefCell<Option<(u64, Arc<Settings>)>> = const { RefCell::new(None) };
}

impl Settings {
    /// The settings in force: built and checked at the first use after a change, then shared without
    /// a lock. A change that lands while they are built bumps the generation again, so they are
    /// rebuilt at the next use.
    pub fn current() -> Arc<Settings> {
        if !FOLLOWED.load(Ordering::SeqCst) {
            changed();
        }
        let generation = GENERATION.load(Ordering::SeqCst);
        SNAPSHOT.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some((seen, settings)) = cell.as_ref() {
                if *seen == generation {
                    return settings.clone();
                }
            }
            let settings = Arc::new(Settings::build());
            *cell = Some((generation, settings.clone()));
            settings
        })
    }

    /// Refuses, saying why, settings under which nothing may run.
    pub fn usable(&self) -> Result<(), String> {
        self.refused.clone().map_or(Ok(()), Err)
    }

    fn build() -> Settings {
        let opt = |c: &Checked| Some(c.get()).filter(|v| !v.is_empty());
        let layout = Layout {
            prefix: KEY_PREFIX.get(),
            events: EVENTS_KEY.get(),
            snapshot: SNAPSHOT_KEY.get(),
            seq: opt(&SEQ_KEY),
            labels: opt(&LABELS_KEY),
            status_hash: opt(&STATUS_KEY),
            status_set: opt(&STATUS_SET_KEY),
            label_set: opt(&LABEL_SET_KEY),
            label_values: opt(&LABEL_VALUES_KEY),
            member: FLOW_MEMBER.get(),
            lease: opt(&LEASE_KEY),
            index: INDEX_KEY.get(),
            earlier_indexes: INDEX_READ_KEYS
                .get()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            state: *lock(&STATE),
            terminal: TERMINAL_STATUSES
                .get()
                .split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        };
        // Every value was validated when set; one that does not parse now refuses, never guesses.
        let retention = parse_duration_ms(&RETENTION.get());
        let refused = layout.check_keys().err().or_else(|| {
            retention
                .clone()
                .err()
                .map(|e| format!("flowarchive.retention: {e}"))
        });
        Settings {
            s3: s3_settings(),
            layout,
            retention_ms: retention.unwrap_or(i64::MAX),
            cache_bytes: CACHE_BYTES.get().max(0) as usize,
            read_max_bytes: READ_MAX_BYTES.get().max(0) as u64,
            read_allow: READ_ALLOW.get(),
            concurrency: CONCURRENCY.get().max(1) as usize,
            batch_size: BATCH_SIZE.get().max(1) as usize,
            refused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_duration_ms("12h"), Ok(12 * 3_600_000));
        assert_eq!(parse_duration_ms("15m"), Ok(900_000));
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        for bad in [
            "",
            "30",
            "d",
            "-1d",
            "1.5h",
            "30 days",
            "99999999999999999999d",
            "40000d",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validators() {
        assert!(endpoint("").is_ok());
        assert!(endpoint("http://127.0.0.1:8333").is_ok());
        assert!(endpoint("https://s3.eu-west-1.amazonaws.com").is_ok());
        assert!(endpoint("ftp://x").is_err());
        assert!(endpoint("not a url").is_err());
        assert!(endpoint("http://h/?x=1").is_err());
        for with_userinfo in [
            "http://user:pa55w0rd@h:8333",
            "https://user@h",
            "http://:pa55w0rd@h",
        ] {
            let e = endpoint(with_userinfo).unwrap_err();
            assert!(e.contains("must not carry credentials"), "{e}");
            assert!(!e.contains("pa55w0rd"), "{e}");
        }
        assert!(bucket("flows-archive.1").is_ok());
        assert!(bucket("").is_ok());
        assert!(bucket("Upper").is_err());
        assert!(bucket("ab").is_err());
        assert!(object_prefix("a/b").is_ok());
        assert!(object_prefix("").is_ok());
        for bad in ["/a", "a/", "a//b", "a/../b", "."] {
            assert!(object_prefix(bad).is_err(), "{bad}");
        }
        assert!(flow_key("$prefix:flow:$id:events").is_ok());
        assert!(flow_key("").is_err());
        assert!(flow_key("$prefix:events").is_err());
        assert!(opt_flow_key("").is_ok());
        assert!(status_set("$prefix:idx:status:$status").is_ok());
        assert!(status_set("$prefix:idx:status").is_err());
        assert!(index_key("archived:{flow:$id}").is_ok());
        assert!(index_key("archived:$status").is_err());
        assert_eq!(VerifyMode::try_from(1).ok(), Some(VerifyMode::PutResponse));
        assert_eq!(VerifyMode::try_from(2).ok(), Some(VerifyMode::Auto));
        assert_eq!(i32::from(VerifyMode::Auto), 2);
        assert!(VerifyMode::try_from(3).is_err());
        let refusal = |e: RedisError| e.to_string();
        assert_eq!(
            VerifyMode::try_from(3).map_err(refusal).err().as_deref(),
            Some("verify must be head, put-response or auto")
        );
        assert_eq!(
            VerifyMode::Head.get_options(),
            (
                vec!["head".to_string(), "put-response".into(), "auto".into()],
                vec![0, 1, 2]
            )
        );
        assert_eq!(
            IndexFormat::try_from(-1).map_err(refusal).err().as_deref(),
            Some("index-format must be hash or compact")
        );
        assert_eq!(
            IndexFormat::Compact.get_options(),
            (vec!["hash".to_string(), "compact".to_string()], vec![0, 1])
        );
        assert_eq!(i32::from(IndexFormat::Compact), 1);
        assert!(statuses("completed,failed").is_ok() && statuses(" , ").is_err());
        assert!(region("us-east-1").is_ok() && region("").is_err());
    }

    #[test]
    fn secret_files_are_read_trimmed_and_errors_never_show_the_content() {
        let dir = std::env::temp_dir().join(format!("flowarchive-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, content: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, content).unwrap();
            p.to_str().unwrap().to_string()
        };
        assert_eq!(
            read_secret_file(&file("ok", b"  s3cr3t-v4lue\n")).as_deref(),
            Ok("s3cr3t-v4lue")
        );
        let missing = dir.join("missing").to_str().unwrap().to_string();
        let e = read_secret_file(&missing).unwrap_err();
        assert!(e.contains(&missing) && e.contains("cannot be read"), "{e}");
        let e = read_secret_file(&file("blank", b" \n\t\n")).unwrap_err();
        assert!(e.contains("is empty"), "{e}");
        let e = read_secret_file(&file("big", "s3cr3t-v4lue ".repeat(400).as_bytes())).unwrap_err();
        assert!(
            e.contains("larger than 4096 bytes") && !e.contains("s3cr3t"),
            "{e}"
        );
        let e = read_secret_file(&file("binary", b"s3cr3t-v4lue\xff")).unwrap_err();
        assert!(e.contains("cannot be read") && !e.contains("s3cr3t"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
