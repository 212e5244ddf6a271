//! The archive side of FLOWARCHIVE.GET: a presigned GET on a pool thread, full verification, a
//! byte-bounded LRU cache, and one S3 fetch shared by every client asking for the same flow at once.
//!
//! Reads are bounded in every dimension an index entry or an object could inflate: the location must be
//! the one this module would have written for the flow (so a planted entry cannot make the module sign
//! a request for someone else's object), at most `FETCH_THREADS` fetches run and `FETCH_QUEUE` distinct
//! flows wait (beyond that the client gets a busy error, not a thread), and each fetch holds at most
//! `flowarchive.read-max-bytes` of object plus as much decompressed content (see docs/FORMAT.md).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis_module::configuration::ConfigurationContext;
use redis_module::{Context, RedisError, RedisValue};

use crate::digest::{hex, sha256, sha256_of_parts};
use crate::format::reader::{self, DecodeError, Decoded, Whose};
use crate::kinds::{kinds, Tally};
use crate::layout::{self, StateSource};
use crate::ops::configs::{parse_roots, Root, Settings};
use crate::ops::errors::{show_id, FlowError};
use crate::ops::info::named;
use crate::ops::log;
use crate::ops::metrics::Stage;
use crate::read::cache::{CacheKey, Lru};
use crate::read::rights::Rights;
use crate::runtime::blocking::Client;
use crate::runtime::mainthread;
use crate::runtime::pool::Pool;
use crate::runtime::reply;
use crate::s3::{FailureKind, S3Settings, Store, StoreError};
use crate::sync::lock;

/// Fetch threads: each mostly waits on S3, so a few serve many reads.
pub const FETCH_THREADS: usize = 4;
/// Distinct flows waiting for a fetch thread; clients of a flow already queued share its fetch.
pub const FETCH_QUEUE: usize = 1024;

static FETCH_POOL: Pool = Pool::new("flowarchive-get", FETCH_THREADS, FETCH_QUEUE);

/// Why an archived flow could not be answered.
#[derive(Debug)]
pub enum FetchError {
    /// The index entry is not where this module writes the flow (nor an allowed older root).
    BadLocation,
    /// Every fetch thread is busy and the queue is full.
    Busy,
    Store(StoreError),
    /// The object's sha256 differs from the one recorded at upload, or none was recorded.
    ObjectChecksum(String),
    Decode(DecodeError),
    Panicked,
}

kinds! {
    /// How an archived read failed, apart from S3 (`FailureKind`).
    pub enum FetchKind {
        BadLocation => "bad_location",
        Busy => "busy",
        Checksum => "checksum",
        Corrupt => "corrupt",
        OtherFlow => "other_flow",
        OtherKeyspace => "other_keyspace",
        OtherGeneration => "other_generation",
        UnknownVersion => "unknown_version",
        TooLarge => "too_large",
        Internal => "internal",
    }
}

impl FetchError {
    /// The metric name of this failure.
    pub fn kind(&self) -> &'static str {
        let kind = match self {
            FetchError::BadLocation => FetchKind::BadLocation,
            FetchError::Busy => FetchKind::Busy,
            FetchError::Store(e) => return e.kind.name(),
            FetchError::ObjectChecksum(_) => FetchKind::Checksum,
            FetchError::Decode(e) => match e {
                DecodeError::Corrupt(_) => FetchKind::Corrupt,
                DecodeError::Checksum(_) => FetchKind::Checksum,
                DecodeError::OtherFlow(_) => FetchKind::OtherFlow,
                DecodeError::OtherKeyspace(_) => FetchKind::OtherKeyspace,
                DecodeError::OtherGeneration(_) => FetchKind::OtherGeneration,
                DecodeError::UnknownVersion(_) => FetchKind::UnknownVersion,
                DecodeError::TooLarge(_) => FetchKind::TooLarge,
            },
            FetchError::Panicked => FetchKind::Internal,
        };
        kind.name()
    }

    /// Every name `kind` can answer, for INFO.
    pub fn kind_names() -> impl Iterator<Item = &'static str> {
        let own = FetchKind::ALL.iter().map(|k| k.name());
        own.chain(FailureKind::ALL.iter().map(|k| k.name()))
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::BadLocation => f.write_str(
                "the index entry is not where flowarchive writes this flow (flowarchive.bucket and \
                 prefix, or a flowarchive.read-allow root); nothing was fetched",
            ),
            FetchError::Busy => f.write_str(
                "archive reads are busy (too many flows waiting for S3), retry later",
            ),
            FetchError::Store(e) => write!(f, "{e}"),
            FetchError::ObjectChecksum(why) => f.write_str(why),
            FetchError::Decode(e) => write!(f, "{e}"),
            FetchError::Panicked => f.write_str("internal error in the fetch worker"),
        }
    }
}

/// The read scope of these settings: every one an archived answer depends on besides its flow and
/// location. The store it is read from (endpoint, region, addressing, credentials, trusted CA), the
/// roots it may be read from (bucket and prefix, `read-allow`), the cap on a read and the state it
/// answers. The cache answers, and a fetch in flight is shared, only within one scope: after a change
/// of any of these, no read is answered from what was read under the earlier ones. (The secret is
/// hashed with the rest: a key that no longer signs is not answered for from the cache.)
pub fn read_scope(
    s3: &S3Settings,
    read_allow: &str,
    read_max_bytes: u64,
    state: StateSource,
) -> u64 {
    let (cap, state) = (read_max_bytes.to_string(), format!("{state:?}"));
    let c = &s3.credentials;
    let parts = [
        s3.endpoint.as_str(),
        &s3.region,
        if s3.path_style {
            "path"
        } else {
            "virtual-host"
        },
        c.pin.map_or("auto", |p| p.name()),
        &c.access_key,
        &c.secret_key.0,
        &c.tls_ca_file,
        &s3.bucket,
        &s3.prefix,
        read_allow,
        &cap,
        &state,
    ];
    let digest = sha256_of_parts(parts);
    u64::from_le_bytes(digest[..8].try_into().expect("eight bytes"))
}

/// What a read wants of the archive: the object at `key`'s location, or the incarnation `hops`
/// predecessors before it (each object names the one archived before it), and whether the events too;
/// and what its caller may read, asked where a location names another DB.
pub struct Want {
    pub key: CacheKey,
    pub events: bool,
    pub hops: usize,
    pub rights: Rights,
}

/// A client waiting for a fetch.
pub struct Waiter {
    pub client: Client,
    pub want: Want,
}

static CACHE: Mutex<Option<Lru>> = Mutex::new(None);
static IN_FLIGHT: Mutex<Option<HashMap<CacheKey, Vec<Waiter>>>> = Mutex::new(None);

/// Writes the reply for a decoded flow, the FlowState or `[FlowState, [events...]]`, straight from
/// it (`reply::state_and_events`).
pub fn reply(ctx: &Context, flow: &Decoded, events: bool) {
    let list = events.then(|| flow.events().map(str::as_bytes));
    reply::state_and_events(ctx, flow.flow_state.as_bytes(), list);
}

pub fn cached(key: &CacheKey) -> Option<Arc<Decoded>> {
    lock(&CACHE).as_mut()?.get(key)
}

/// Applies a new cache budget at once (CONFIG SET flowarchive.cache-bytes).
pub fn on_cache_budget(_ctx: &ConfigurationContext, _name: &str, value: &'static AtomicI64) {
    resize_cache(value.load(Ordering::Relaxed).max(0) as usize);
}

/// Empties the cache under memory pressure (counted in INFO `get_cache_yields`).
pub fn yield_cache() {
    if cache_stats().0 > 0 {
        CACHE_YIELDS.fetch_add(1, Ordering::Relaxed);
        resize_cache(0);
    }
}

static CACHE_YIELDS: AtomicU64 = AtomicU64::new(0);

fn resize_cache(budget: usize) {
    if let Some(lru) = lock(&CACHE).as_mut() {
        lru.shrink_to(budget);
    }
}

pub fn cache_stats() -> (usize, usize) {
    lock(&CACHE)
        .as_ref()
        .map_or((0, 0), |l| (l.len(), l.bytes()))
}

/// Queues `waiter` for the object it wants; starts the fetch unless one is already running. The
/// answer is cached when `cache` (not under memory pressure) and `cache-bytes` allows.
pub fn request(waiter: Waiter, settings: Arc<Settings>, cache: bool) {
    let key = waiter.want.key.clone();
    {
        let mut guard = lock(&IN_FLIGHT);
        let waiting = guard.get_or_insert_with(HashMap::new);
        if let Some(list) = waiting.get_mut(&key) {
            list.push(waiter);
            return;
        }
        waiting.insert(key.clone(), vec![waiter]);
    }
    let job_key = key.clone();
    let job_settings = settings.clone();
    let job = Box::new(move || {
        let started = Instant::now();
        let outcome = log::contained("a fetch", || fetch(&job_settings, &job_key))
            .unwrap_or(Err(FetchError::Panicked));
        fetched(started.elapsed(), outcome.as_ref().err());
        finish(&job_key, outcome, &job_settings, cache);
    });
    if FETCH_POOL.submit(job).is_err() {
        fetched(Duration::ZERO, Some(&FetchError::Busy));
        finish(&key, Err(FetchError::Busy), &settings, cache);
    }
}

/// Answers `waiter` for a flow no index names while no index exists at all for its DB (lost, or never
/// written): the bucket is asked where the flow's newest archive is (`locate`), and that is fetched
/// as usual; nil when there is none.
pub fn probe(waiter: Waiter, settings: Arc<Settings>, cache: bool) {
    let (db, id) = (waiter.want.key.db, waiter.want.key.id.clone());
    // The waiter goes to the job, or back to be told the pool is busy.
    let slot = Arc::new(Mutex::new(Some(waiter)));
    let (job_slot, job_settings) = (slot.clone(), settings);
    let job = Box::new(move || {
        let Some(mut waiter) = lock(&job_slot).take() else {
            return;
        };
        PROBES.fetch_add(1, Ordering::Relaxed);
        let found = log::contained("an index probe", || locate(&job_settings, db, &id))
            .unwrap_or(Err(FetchError::Panicked));
        let answer = match found {
            Ok(Some(location)) => {
                PROBES_FOUND.fetch_add(1, Ordering::Relaxed);
                waiter.want.key.location = location;
                request(waiter, job_settings, cache);
                return;
            }
            Ok(None) => Ok(RedisValue::Null),
            Err(why) => Err(RedisError::String(format!(
                "ERR flow {}: no index holds entries for this DB and the bucket could not be searched: {why}",
                show_id(&id)
            ))),
        };
        waiter
            .client
            .reply(crate::ops::errors::ascii_errors(answer));
    });
    if FETCH_POOL.submit(job).is_err() {
        if let Some(waiter) = lock(&slot).take() {
            let busy = Err(RedisError::String(format!("ERR {}", FetchError::Busy)));
            waiter.client.reply(busy);
        }
    }
}

/// The location of the newest archive of `id` in the configured bucket and prefix, if any: each
/// generation's key (both forms a name may take) is asked with a HEAD, from the first, until one has
/// none. At most `2 × GENERATIONS` HEADs; an unknown id costs two.
fn locate(settings: &Settings, db: i32, id: &str) -> Result<Option<String>, FetchError> {
    let store = Store::new(&settings.s3).map_err(FetchError::Store)?;
    let prefix = &settings.s3.prefix;
    let max_name = settings.s3.object_name_max;
    let mut newest = None;
    for generation in 0..layout::GENERATIONS {
        let stored = layout::stored_key(prefix, db, id, generation, max_name);
        let other = layout::readable_keys(prefix, db, id)
            .skip(2 * generation as usize)
            .take(2)
            .map(|(_, k)| k)
            .find(|k| *k != stored);
        let mut found = None;
        for key in std::iter::once(stored).chain(other) {
            if store.exists(&key).map_err(FetchError::Store)? {
                found = Some(key);
                break;
            }
        }
        match found {
            Some(key) => newest = Some(store.location(&key)),
            None => break,
        }
    }
    Ok(newest)
}

static PROBES: AtomicU64 = AtomicU64::new(0);
static PROBES_FOUND: AtomicU64 = AtomicU64::new(0);

static FETCHES: AtomicU64 = AtomicU64::new(0);
static FETCH_US_TOTAL: AtomicU64 = AtomicU64::new(0);
static FETCH_US_MAX: AtomicU64 = AtomicU64::new(0);
static FETCH_ERRORS: Tally = Tally::new();

/// Counts one S3 fetch that finished in `took`, failing with `error` if any.
fn fetched(took: Duration, error: Option<&FetchError>) {
    let us = took.as_micros() as u64;
    FETCHES.fetch_add(1, Ordering::Relaxed);
    FETCH_US_TOTAL.fetch_add(us, Ordering::Relaxed);
    FETCH_US_MAX.fetch_max(us, Ordering::Relaxed);
    if let Some(e) = error {
        FETCH_ERRORS.add(e.kind());
        log::warning(&format!("flowarchive: GET fetch failed [{}]", e.kind()));
    }
}

/// The fetch and cache fields of INFO.
pub fn fields() -> Vec<(String, i64)> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as i64;
    let (cached_flows, cached_bytes) = cache_stats();
    let mut out = named([
        ("get_archive_fetches", get(&FETCHES)),
        ("get_fetch_us_total", get(&FETCH_US_TOTAL)),
        ("get_fetch_us_max", get(&FETCH_US_MAX)),
        ("get_cache_flows", cached_flows as i64),
        ("get_cache_bytes", cached_bytes as i64),
        ("get_cache_yields", get(&CACHE_YIELDS)),
        ("get_index_probes", get(&PROBES)),
        ("get_index_probes_found", get(&PROBES_FOUND)),
    ]);
    out.extend(FETCH_ERRORS.fields("get_fetch_errors_", FetchError::kind_names()));
    out
}

/// Caches a good result, then answers everyone who waited for it (or, for an earlier incarnation,
/// fetches its predecessor next).
fn finish(
    key: &CacheKey,
    outcome: Result<Arc<Decoded>, FetchError>,
    settings: &Arc<Settings>,
    cache: bool,
) {
    let budget = if cache { settings.cache_bytes } else { 0 };
    let waiters = {
        let mut guard = lock(&IN_FLIGHT);
        if let Ok(flow) = &outcome {
            if budget > 0 {
                lock(&CACHE).get_or_insert_with(Lru::default).insert(
                    key.clone(),
                    flow.clone(),
                    budget,
                );
            }
        }
        guard
            .as_mut()
            .and_then(|w| w.remove(key))
            .unwrap_or_default()
    };
    let CacheKey { id, location, .. } = key;
    for mut w in waiters {
        let answer = match &outcome {
            Ok(flow) if w.want.hops == 0 => {
                w.client.write(|ctx| reply(ctx, flow, w.want.events));
                continue;
            }
            Ok(flow) => match &flow.previous {
                Some(previous) => {
                    if let Err(e) = may_follow(&w.want, settings, previous) {
                        let refused = Err(RedisError::String(e.read_message(id)));
                        w.client.reply(crate::ops::errors::ascii_errors(refused));
                        continue;
                    }
                    w.want.key.location = previous.clone();
                    w.want.hops -= 1;
                    request(w, settings.clone(), cache);
                    continue;
                }
                None => Ok(RedisValue::Null),
            },
            Err(why) => Err(RedisError::String(format!(
                "ERR flow {} archived at {}: {why}",
                show_id(id),
                shown(location)
            ))),
        };
        w.client.reply(crate::ops::errors::ascii_errors(answer));
    }
}

/// Whether a read may follow its flow to `previous`: asked of the server, in a main-thread step, only
/// where that location names another DB than the one read from.
fn may_follow(want: &Want, settings: &Settings, previous: &str) -> Result<(), FlowError> {
    let CacheKey { db, id, .. } = &want.key;
    let Some(named) = crossing(settings, *db, id, previous) else {
        return Ok(());
    };
    let mut held = 0;
    mainthread::step(*db, Stage::Capture, &mut held, |ctx| {
        want.rights.check_in(ctx, named)
    })
}

/// How an index entry appears in messages: as is when it is one sane line, else quoted and cut.
fn shown(location: &str) -> String {
    if location.len() <= 2048 && !location.chars().any(char::is_control) {
        location.to_string()
    } else {
        show_id(location)
    }
}

/// The bucket, key and DB to read for an index entry: only a location this module would have written
/// for flow `id` under the configured bucket and prefix, or under an allowed older root. The DB is the
/// one the key names (`db<n>/` or none for DB 0): an index entry travels with its flow when SWAPDB moves
/// a DB, so it may name another DB number than the one it is read from now; the object's header must
/// name that same DB. The entry is compared with the keys this module derives, never parsed into a
/// request, so `..`, another bucket or another flow's key all fail here and no request is sent.
fn resolve(location: &str, configured: &Root, allowed: &[Root], id: &str) -> Option<Place> {
    std::iter::once(configured)
        .filter(|r| !r.bucket.is_empty())
        .chain(allowed)
        .find_map(|root| {
            let key = location.strip_prefix(&format!("s3://{}/", root.bucket))?;
            let db = named_db(key, &root.prefix)?;
            let (generation, _) =
                layout::readable_keys(&root.prefix, db, id).find(|(_, k)| k == key)?;
            Some(Place {
                bucket: root.bucket.clone(),
                key: key.to_string(),
                db,
                generation,
            })
        })
}

/// Where a location this module reads lives: its bucket and key, and the DB and generation the key
/// names.
#[derive(Debug, PartialEq)]
struct Place {
    bucket: String,
    key: String,
    db: i32,
    generation: u32,
}

/// The DB an object key under `prefix` names: `db<n>/…` is DB n, anything else DB 0 (checked by the
/// caller against the keys derived for that DB).
fn named_db(key: &str, prefix: &str) -> Option<i32> {
    let rest = match prefix {
        "" => key,
        p => key.strip_prefix(p)?.strip_prefix('/')?,
    };
    let Some(folder) = rest.strip_prefix("db") else {
        return Some(0);
    };
    folder.split_once('/')?.0.parse().ok()
}

/// The DB a location of `id` names when it is not `db`, the one read from, and is a location this
/// module would read (`resolve`, under `settings`' roots): the read must be allowed there too
/// (`Rights::check_in`).
pub fn crossing(settings: &Settings, db: i32, id: &str, location: &str) -> Option<i32> {
    resolved(settings, location, id)
        .map(|place| place.db)
        .filter(|named| *named != db)
}

/// `resolve` under the configured root and those `read-allow` names.
fn resolved(settings: &Settings, location: &str, id: &str) -> Option<Place> {
    let configured = Root {
        bucket: settings.s3.bucket.clone(),
        prefix: settings.s3.prefix.clone(),
    };
    let allowed = parse_roots(&settings.read_allow).unwrap_or_default();
    resolve(location, &configured, &allowed, id)
}

fn fetch(settings: &Settings, key: &CacheKey) -> Result<Arc<Decoded>, FetchError> {
    let CacheKey { id, location, .. } = key;
    let place = resolved(settings, location, id).ok_or(FetchError::BadLocation)?;
    let store = Store::for_bucket(&settings.s3, &place.bucket).map_err(FetchError::Store)?;
    let max = settings.read_max_bytes;
    let (body, recorded) = store.get(&place.key, max).map_err(FetchError::Store)?;
    let actual = hex(&sha256(&body));
    match recorded {
        Some(r) if r == actual => {}
        Some(r) => {
            return Err(FetchError::ObjectChecksum(format!(
                "object sha256 {actual} differs from the recorded {r}"
            )))
        }
        None => {
            return Err(FetchError::ObjectChecksum(
                "object carries no flowarchive checksum (overwritten?)".into(),
            ))
        }
    }
    let whose = Whose {
        id,
        db: place.db,
        generation: place.generation,
    };
    reader::decode(&body, &whose, max, settings.layout.state)
        .map(Arc::new)
        .map_err(FetchError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(bucket: &str, prefix: &str) -> Root {
        Root {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn reads_only_where_this_module_writes() {
        let cfg = root("live", "p");
        let old = parse_roots("s3://old s3://older/a/b").unwrap();
        let at = |loc: &str, id| resolve(loc, &cfg, &old, id);
        for (location, bucket, key, db, generation) in [
            (
                "s3://live/p/flows/a%3Ab.jsonl.gz",
                "live",
                "p/flows/a%3Ab.jsonl.gz",
                0,
                0,
            ),
            (
                "s3://live/p/db3/flows/x.jsonl.gz",
                "live",
                "p/db3/flows/x.jsonl.gz",
                3,
                0,
            ),
            (
                "s3://live/p/db3/flows/x.g2.jsonl.gz",
                "live",
                "p/db3/flows/x.g2.jsonl.gz",
                3,
                2,
            ),
            ("s3://old/flows/x.jsonl.gz", "old", "flows/x.jsonl.gz", 0, 0),
            (
                "s3://older/a/b/db2/flows/x.g15.jsonl.gz",
                "older",
                "a/b/db2/flows/x.g15.jsonl.gz",
                2,
                15,
            ),
        ] {
            let id = if location.contains("a%3Ab") {
                "a:b"
            } else {
                "x"
            };
            let want = Some(Place {
                bucket: bucket.to_string(),
                key: key.to_string(),
                db,
                generation,
            });
            assert_eq!(at(location, id), want, "{location}");
        }
        for bad in [
            "s3://live/p/flows/y.jsonl.gz",      // another flow's object
            "s3://live/p/db03/flows/x.jsonl.gz", // not a key this module writes
            "s3://live/p/db0/flows/x.jsonl.gz",
            "s3://live/p/db/flows/x.jsonl.gz",
            "s3://live/p/x.g99.jsonl.gz",
            "s3://other/p/flows/x.jsonl.gz", // another bucket
            "s3://live/p/../flows/x.jsonl.gz",
            "s3://live/../p/flows/x.jsonl.gz",
            "s3://live/p/flows/x.jsonl.gz?versionId=1",
            "https://live/p/flows/x.jsonl.gz",
            "s3://old/a/flows/x.jsonl.gz",
            "",
        ] {
            assert_eq!(at(bad, "x"), None, "{bad}");
        }
        assert_eq!(
            resolve("s3:///flows/x.jsonl.gz", &root("", ""), &[], "x"),
            None
        );
    }

    #[test]
    fn read_allow_roots_are_validated() {
        assert_eq!(parse_roots("").unwrap(), vec![]);
        assert_eq!(
            parse_roots(" s3://bk1  s3://b-2/x/y ").unwrap(),
            vec![
                Root {
                    bucket: "bk1".into(),
                    prefix: String::new()
                },
                Root {
                    bucket: "b-2".into(),
                    prefix: "x/y".into()
                },
            ]
        );
        for bad in [
            "b1",
            "s3://",
            "s3:///p",
            "s3://UP",
            "s3://b1/../x",
            "s3://b1/x/",
            "http://b1",
            "s3://b1//x",
        ] {
            assert!(parse_roots(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_show_odd_locations_quoted_and_cut() {
        assert_eq!(shown("s3://b/k"), "s3://b/k");
        let odd = format!("s3://b/\r\n{}", "x".repeat(5000));
        let s = shown(&odd);
        assert!(s.len() < 200 && !s.contains('\n'), "{s}");
    }
}
