//! The read path of FLOWARCHIVE.GET: the live keys, else the archive index, the cache and finally a
//! verified fetch from S3 (fetch → decode → cache). Every key read is checked against the caller's ACL
//! first.

pub mod cache;
pub mod fetch;
pub mod live;
pub mod rights;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redis_module::{Context, KeyType, RedisError, RedisResult, RedisValue};

use crate::index;
use crate::layout::{FlowKeys, StateSource, GENERATIONS};
use crate::ops::configs::Settings;
use crate::ops::errors::{show_id, FlowError};
use crate::ops::info::named;
use crate::read::cache::CacheKey;
use crate::read::fetch::Waiter;
use crate::read::rights::Rights;
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::blocking::{can_block, this_client};
use crate::runtime::cluster;
use crate::runtime::key::Key;
use crate::runtime::server::{self, expect_type, selected_db};

static GET_LIVE: AtomicU64 = AtomicU64::new(0);
static GET_NOT_FOUND: AtomicU64 = AtomicU64::new(0);
static GET_CACHE_HITS: AtomicU64 = AtomicU64::new(0);

#[linkme::distributed_slice(crate::ops::info::INFO_FIELDS)]
static READ_FIELDS: crate::ops::info::Fields = fields;

/// The read fields of INFO.
fn fields() -> Vec<(String, i64)> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as i64;
    let mut out = named([
        ("get_live", get(&GET_LIVE)),
        ("get_not_found", get(&GET_NOT_FOUND)),
        ("get_cache_hits", get(&GET_CACHE_HITS)),
    ]);
    out.extend(fetch::fields());
    out
}

/// `FLOWARCHIVE.GET <id> [EVENTS] [PREVIOUS n]`.
pub struct Request {
    pub id: String,
    /// Also answer the event log.
    pub events: bool,
    /// Answer the incarnation of the id this many before the one answered without it (0: the newest,
    /// live or archived). Each archive records the incarnation archived before it.
    pub previous: usize,
}

/// No id has more archives than it has object keys.
pub const MAX_PREVIOUS: u64 = GENERATIONS as u64;

/// Answers `FLOWARCHIVE.GET`: the FlowState (and the events), nil for an unknown flow (or an unknown
/// earlier incarnation).
pub fn get(ctx: &Context, request: Request) -> RedisResult {
    let Request {
        id,
        events,
        previous,
    } = request;
    let settings = Settings::current();
    // Near the server's limit the read cache yields first: emptied, and nothing cached.
    let cache = !server::memory_pressed();
    if !cache {
        fetch::yield_cache();
    }
    let fail = |e: FlowError| RedisError::String(e.read_message(&id));
    settings
        .usable()
        .map_err(|why| fail(FlowError::Unsafe(why)))?;
    let keys = settings.layout.flow_keys(&id);
    // Every key read for the answer allowed together with the others, as the keys of one command.
    let user = Caller::of(ctx);
    let caller: &Caller = &user.one_command();
    let slot = cluster::placement(&id, keys.named()).map_err(fail)?;
    let db = selected_db(ctx);
    let shown = shown(&keys, settings.layout.state, events);
    acl::check_all(ctx, caller, shown.iter().copied(), Access::Read).map_err(fail)?;
    let live = match settings.layout.state {
        StateSource::Fold => expect_type(ctx, &keys.events, &KeyType::List).map_err(fail)?,
        StateSource::Snapshot => {
            // Opened once for its type and the answer, in this command: nothing runs between them.
            let snapshot = Key::open(ctx, &keys.snapshot);
            let stored = snapshot.holds(&KeyType::String).map_err(fail)?;
            if stored && previous == 0 {
                GET_LIVE.fetch_add(1, Ordering::Relaxed);
                if !events {
                    live::answer_snapshot(ctx, &snapshot, settings.read_max_bytes).map_err(fail)?;
                    return Ok(RedisValue::NoReply);
                }
                drop(snapshot);
                expect_type(ctx, &keys.events, &KeyType::List).map_err(fail)?;
                let rights = Rights::new(user, shown.iter().copied());
                return live::events(ctx, db, id, keys, settings.read_max_bytes, rights);
            }
            stored
        }
    };
    if live && previous == 0 {
        GET_LIVE.fetch_add(1, Ordering::Relaxed);
        let rights = Rights::new(user, shown.iter().copied());
        return live::fold(ctx, db, id, keys, events, settings.read_max_bytes, rights);
    }
    // Counted from the newest archive: a live flow is the newest incarnation itself.
    let hops = previous - usize::from(live && previous > 0);
    let found = index::location(ctx, caller, &keys, &id).map_err(fail)?;
    let rights = Rights::new(user, shown.iter().copied());
    let Some(location) = found else {
        // A classic resharding sends reads of the slot here (ASK) before the flow's keys arrive:
        // "not found" is only an answer in a slot this node serves.
        if cluster::archivable(ctx, slot).is_err() {
            return Err(RedisError::String(cluster::try_again(&id)));
        }
        // No index at all for this DB (lost, or never written): the bucket is asked instead.
        if index::absent(ctx, &keys) && can_block(ctx) {
            if let Some(client) = this_client(ctx) {
                let want = fetch::Want {
                    key: CacheKey {
                        db,
                        id,
                        location: String::new(),
                        scope: settings.read_scope,
                    },
                    events,
                    hops,
                    rights,
                };
                fetch::probe(Waiter { client, want }, settings, cache);
                return Ok(RedisValue::NoReply);
            }
        }
        GET_NOT_FOUND.fetch_add(1, Ordering::Relaxed);
        return Ok(RedisValue::Null);
    };
    if let Some(named) = fetch::crossing(&settings, db, &id, &location) {
        rights.check_in(ctx, named).map_err(fail)?;
    }
    let want = fetch::Want {
        key: CacheKey {
            db,
            id,
            location,
            scope: settings.read_scope,
        },
        events,
        hops,
        rights,
    };
    archived(ctx, want, settings, cache)
}

/// The keys an answer shows, live or archived, whose rights a read asks (as one command) and carries
/// off the main thread: under `state fold` those the state is folded from; under `state snapshot`
/// the snapshot, and the event log for `EVENTS`.
fn shown(keys: &FlowKeys, state: StateSource, events: bool) -> Vec<&str> {
    match state {
        StateSource::Fold => keys.state().collect(),
        StateSource::Snapshot => std::iter::once(keys.snapshot.as_str())
            .chain(events.then_some(keys.events.as_str()))
            .collect(),
    }
}

/// Answers an archived flow from the cache, following earlier incarnations cached there (an answer
/// read under other settings is not found there: its key's read scope differs), else by a fetch the
/// client waits for.
fn archived(
    ctx: &Context,
    mut want: fetch::Want,
    settings: Arc<Settings>,
    cache: bool,
) -> RedisResult {
    while let Some(flow) = fetch::cached(&want.key) {
        if want.hops == 0 {
            GET_CACHE_HITS.fetch_add(1, Ordering::Relaxed);
            fetch::reply(ctx, &flow, want.events);
            return Ok(RedisValue::NoReply);
        }
        let Some(previous) = flow.previous.clone() else {
            return Ok(RedisValue::Null);
        };
        let key = &want.key;
        if let Some(named) = fetch::crossing(&settings, key.db, &key.id, &previous) {
            let refused = |e: FlowError| RedisError::String(e.read_message(&key.id));
            want.rights.check_in(ctx, named).map_err(refused)?;
        }
        want.key.location = previous;
        want.hops -= 1;
    }
    if !can_block(ctx) {
        return Err(RedisError::String(format!(
            "ERR flow {} is archived and not cached; FLOWARCHIVE.GET cannot fetch it inside MULTI or a script",
            show_id(&want.key.id)
        )));
    }
    let Some(client) = this_client(ctx) else {
        return Ok(RedisValue::Null);
    };
    fetch::request(Waiter { client, want }, settings, cache);
    Ok(RedisValue::NoReply)
}
