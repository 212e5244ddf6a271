//! Module configs (`CONFIG GET/SET flowarchive.*`, also accepted as `loadmodule` arguments).
//!
//! Every string config is validated when set: a bad value is refused with the reason and the old value
//! stays. `Settings::current()` is their snapshot, built once per change and shared by every command
//! and job until the next change.

mod checks;
#[cfg(test)]
mod tests;
mod values;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis_module::configuration::ConfigurationContext;
use redis_module::{raw, Context};

use crate::layout::{self, Layout, StateSource};
use crate::read::fetch::read_scope;
use crate::s3::credentials::{CredentialConfig, Hidden, Source};
/// How an upload is proven stored before anything is deleted (`flowarchive.verify`).
pub use crate::s3::VerifyMode;
use crate::s3::{retry, Checksum, S3Settings, Sse};
use crate::sync::lock;

pub use checks::*;
pub use values::*;

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
/// The most the module holds of flows in flight at once, over every capture and live read
/// (`mainthread::ByteCap`): a copy that would pass it while others hold bytes is refused (the flow
/// stays live), and a sweep begins no flow while it is reached. One read alone may pass it, up to
/// `read-max-bytes`, so no flow is too large for it.
pub static BUFFER_MAX_BYTES: Int = Int::new(256 << 20, 1 << 20, 1 << 40);
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
    /// What an archived answer depends on besides its flow and location (`read::fetch::read_scope`).
    pub read_scope: u64,
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
        let (s3, read_allow) = (s3_settings(), READ_ALLOW.get());
        let read_max_bytes = READ_MAX_BYTES.get().max(0) as u64;
        let read_scope = read_scope(&s3, &read_allow, read_max_bytes, layout.state);
        Settings {
            s3,
            layout,
            retention_ms: retention.unwrap_or(i64::MAX),
            cache_bytes: CACHE_BYTES.get().max(0) as usize,
            read_max_bytes,
            read_allow,
            read_scope,
            concurrency: CONCURRENCY.get().max(1) as usize,
            batch_size: BATCH_SIZE.get().max(1) as usize,
            refused,
        }
    }
}
