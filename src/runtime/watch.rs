//! Change detection for flows in flight, paid for only by the flows that need it.
//!
//! Every archive first claims its flow here (one archive per flow at a time), and FLUSHDB, FLUSHALL and
//! SWAPDB mark every claimed flow as changed. Nothing else about a flow read in one main-thread step
//! (an event log of up to `EVENTS_PER_STEP` events, nearly every flow) is watched: its commit reads it
//! again in the commit's own step and compares it with what was archived (`archive::proof`). That is
//! exact and costs the server's other writes nothing, so a loaded module adds no work to them.
//!
//! A longer log is read over several steps, and a write between two of them must be seen when it
//! happens (a comparison over several steps could miss it). Only for such a flow, or a long live read,
//! does `follow` subscribe to keyspace events: list writes and the events any key raises (del, rename,
//! expire, restore, copy, move), expiries and evictions. A list key that turns into another type was
//! first deleted or renamed over (seen), or fails the commit's type check; the flow's small keys are
//! compared at commit. A snapshot too large to copy or compare in one step (`mainthread::WHOLE_BYTES`)
//! is followed the same way, and string writes are subscribed to as well, only then: a string key
//! written by another type's command (a `…STORE` over it) fails the type check or is written again
//! by a string or generic command to turn back into a string, and either is seen. A labels hash too
//! large to read in one step is followed likewise, with hash writes subscribed to only then (a field
//! that expires raises an expiry, which lists already subscribe to). No server this
//! module supports (Valkey 8.0 to 9.1, Redis 7.0) lets a module unsubscribe, so each subscription
//! stays until the module unloads (the server then drops it, and a new load subscribes again): from
//! the first long flow on, list writes pay for one notification each, from the first large snapshot
//! on, string writes too, from the first large labels hash on, hash writes too, and the hook returns at once while nothing is followed.
//!
//! Only the main thread takes the registry's lock. A watch ends wherever its archive ends, often on an
//! uploader thread in the idle scheduling class, which the kernel may leave unscheduled while it holds
//! a lock: such a watch only marks itself released, and the main thread clears released watches the
//! next time it uses the registry.

use std::collections::{HashMap, HashSet};
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use linkme::distributed_slice;
use redis_module::server_events::FlushSubevent;
use redis_module::{raw, Context};

use crate::ops::errors::FlowError;
use crate::ops::info::{named, Fields, INFO_FIELDS};
use crate::ops::log;
use crate::runtime::mainthread;
use crate::sync::lock;

/// What a watch shares with the registry: whether its keys changed, and whether it has ended.
#[derive(Default)]
struct Flags {
    changed: AtomicBool,
    released: AtomicBool,
}

/// One watch as the registry knows it.
struct Entry {
    flags: Arc<Flags>,
    db: i32,
    /// The flow it claims, if any.
    claimed: Option<String>,
    /// The names of the keys it follows (in its `db`).
    keys: Vec<Vec<u8>>,
}

#[derive(Default)]
struct Registry {
    /// Followed key names, each with the watches that follow it and their DBs: the hook looks a
    /// written key up by its name as the server hands it, with no copy (it runs on every write of a
    /// followed class while any watch follows), and finds a key of any DB in the same lookup.
    keys: HashMap<Vec<u8>, Vec<(i32, Arc<Flags>)>>,
    /// Every live watch (a flush or swap changes them all).
    all: Vec<Entry>,
    flows: HashSet<(i32, String)>,
}

impl Registry {
    /// Forgets released watches: their claims and followed keys. Main thread.
    fn clear_released(&mut self) {
        if !self
            .all
            .iter()
            .any(|e| e.flags.released.load(Ordering::SeqCst))
        {
            return;
        }
        let released = |e: &mut Entry| e.flags.released.load(Ordering::SeqCst);
        let ended: Vec<Entry> = self.all.extract_if(.., released).collect();
        for entry in ended {
            self.forget(entry);
        }
    }

    fn forget(&mut self, entry: Entry) {
        for k in &entry.keys {
            if let Some(list) = self.keys.get_mut(k) {
                list.retain(|(_, f)| !Arc::ptr_eq(f, &entry.flags));
                if list.is_empty() {
                    self.keys.remove(k);
                }
            }
        }
        if !entry.keys.is_empty() {
            FOLLOWED.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(id) = entry.claimed {
            self.flows.remove(&(entry.db, id));
        }
    }
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
/// Followed watches: lets the notification hook skip the lock when none is (the common case).
static FOLLOWED: AtomicUsize = AtomicUsize::new(0);
/// The keyspace-event classes the hook is subscribed to (each at the first `follow` that needs it).
static SUBSCRIBED: AtomicI32 = AtomicI32::new(0);

/// The writes a watch follows to its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    /// Writes to lists, the events any key type raises, expiries and evictions: an event log.
    Lists,
    /// Those and writes to strings: also a snapshot too large to compare at commit.
    ListsAndStrings,
    /// Those of lists and writes to hashes: also a labels hash too large to compare at commit (a
    /// field's expiry comes as an expiry).
    ListsAndHashes,
}

impl Writes {
    /// The keyspace-event classes the hook must be subscribed to.
    fn events(self) -> c_int {
        let lists = raw::REDISMODULE_NOTIFY_LIST
            | raw::REDISMODULE_NOTIFY_GENERIC
            | raw::REDISMODULE_NOTIFY_EXPIRED
            | raw::REDISMODULE_NOTIFY_EVICTED;
        match self {
            Writes::Lists => lists,
            Writes::ListsAndStrings => lists | raw::REDISMODULE_NOTIFY_STRING,
            Writes::ListsAndHashes => lists | raw::REDISMODULE_NOTIFY_HASH,
        }
    }
}

/// The registry, released watches cleared. Main thread only (see the module's notes).
fn registry() -> MutexGuard<'static, Option<Registry>> {
    let mut guard = lock(&REGISTRY);
    guard.get_or_insert_with(Registry::default).clear_released();
    guard
}

/// A flow being archived or read. Dropping it ends the watch and frees the flow for another archive
/// (at once on the main thread, else at the main thread's next use of the registry).
pub struct Watch {
    flags: Arc<Flags>,
    /// Whether it follows keys (its log or snapshot was not read in one step).
    follows: bool,
}

impl Watch {
    /// Claims flow `id` in `db` for one archive; `None` if another archive holds it. Main thread.
    pub fn claim(db: i32, id: &str) -> Option<Watch> {
        let mut guard = registry();
        let reg = guard.get_or_insert_with(Registry::default);
        if !reg.flows.insert((db, id.to_string())) {
            return None;
        }
        Some(Self::register(reg, db, Some(id.to_string())))
    }

    /// A reader's watch of `keys` in `db`, following `writes`, claiming nothing. Main thread, before
    /// the first read.
    pub fn observe(
        ctx: &Context,
        db: i32,
        keys: &[&str],
        writes: Writes,
    ) -> Result<Watch, FlowError> {
        let mut watch = {
            let mut guard = registry();
            Self::register(guard.get_or_insert_with(Registry::default), db, None)
        };
        watch.follow(ctx, keys, writes)?;
        Ok(watch)
    }

    fn register(reg: &mut Registry, db: i32, claimed: Option<String>) -> Watch {
        let flags = Arc::new(Flags::default());
        reg.all.push(Entry {
            flags: flags.clone(),
            db,
            claimed,
            keys: Vec::new(),
        });
        Watch {
            flags,
            follows: false,
        }
    }

    /// From now on, any of `writes` to `keys` marks this watch changed. Main thread, in the same step as
    /// the read it must guard (no write can come between). A watch follows one set of keys; following
    /// again adds writes to follow, not keys.
    pub fn follow(
        &mut self,
        ctx: &Context,
        keys: &[&str],
        writes: Writes,
    ) -> Result<(), FlowError> {
        subscribe(ctx, writes)?;
        self.follow_keys(keys);
        Ok(())
    }

    fn follow_keys(&mut self, keys: &[&str]) {
        if keys.is_empty() || self.follows {
            return;
        }
        let mut guard = registry();
        let reg = guard.get_or_insert_with(Registry::default);
        let Some(entry) = reg
            .all
            .iter_mut()
            .find(|e| Arc::ptr_eq(&e.flags, &self.flags))
        else {
            return;
        };
        let db = entry.db;
        for k in keys {
            entry.keys.push(k.as_bytes().to_vec());
            (reg.keys.entry(k.as_bytes().to_vec()).or_default()).push((db, self.flags.clone()));
        }
        self.follows = true;
        FOLLOWED.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether writes to the flow's keys are followed (it was not read in one step).
    pub fn follows(&self) -> bool {
        self.follows
    }

    pub fn changed(&self) -> bool {
        self.flags.changed.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.flags.released.store(true, Ordering::SeqCst);
        // On the main thread the registry is cleared at once; elsewhere it is left to the main thread.
        if mainthread::is_main() {
            drop(registry());
        }
    }
}

/// Subscribes the hook to the keyspace-event classes `writes` needs and it lacks. Main thread.
fn subscribe(ctx: &Context, writes: Writes) -> Result<(), FlowError> {
    let missing = writes.events() & !SUBSCRIBED.load(Ordering::SeqCst);
    if missing == 0 {
        return Ok(());
    }
    // SAFETY: on the main thread with a live context; the callback is a plain function that lives as
    // long as the module.
    let status = unsafe {
        raw::RedisModule_SubscribeToKeyspaceEvents.map_or(raw::REDISMODULE_ERR as c_int, |f| {
            f(ctx.ctx, missing, Some(on_key_event))
        })
    };
    if status != raw::REDISMODULE_OK as c_int {
        return Err(FlowError::Internal(
            "the server refused a keyspace-event subscription, so a flow read in steps cannot be watched"
                .into(),
        ));
    }
    SUBSCRIBED.fetch_or(missing, Ordering::SeqCst);
    let lists = missing & Writes::Lists.events();
    let more = missing & !Writes::Lists.events();
    if lists != 0 {
        log::notice("flowarchive: following list writes from now on (a flow longer than one read step is in flight)");
    }
    if more & raw::REDISMODULE_NOTIFY_STRING != 0 {
        log::notice("flowarchive: following string writes from now on (a snapshot larger than one read step is in flight)");
    }
    if more & raw::REDISMODULE_NOTIFY_HASH != 0 {
        log::notice("flowarchive: following hash writes from now on (a labels hash larger than one read step is in flight)");
    }
    Ok(())
}

/// Subscribes to SWAPDB and to a replica's async load (FLUSHDB/FLUSHALL come through `on_flush`).
/// Called once from OnLoad.
pub fn init(ctx: &Context) {
    // A load starts with no keyspace-event subscription: the server dropped the last load's at its
    // MODULE UNLOAD, while the library, and so this static, can stay mapped (it does on Valkey 9:
    // dlclose leaves it loaded). Left set, the first long flow would not subscribe again, and follow
    // nothing.
    SUBSCRIBED.store(0, Ordering::SeqCst);
    for id in [raw::REDISMODULE_EVENT_SWAPDB, EVENT_REPL_ASYNC_LOAD] {
        let event = raw::RedisModuleEvent { id, dataver: 1 };
        // SAFETY: called once from OnLoad with the module's context; the callback has the
        // signature the API declares and is a plain function that lives as long as the module. A
        // server without the event refuses the subscription.
        unsafe {
            if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
                subscribe(ctx.ctx, event, Some(on_dataset_swapped));
            }
        }
    }
}

/// A replica's diskless load with `repl-diskless-load swapdb` (Valkey's async load): the old data
/// is served until the new is loaded, then swapped in at once.
const EVENT_REPL_ASYNC_LOAD: u64 = 14;
const SUBEVENT_ASYNC_LOAD_COMPLETED: u64 = 2;

/// Events that can touch a key in another DB than the one the hook's context has selected, which
/// such an event touches in every DB. A client running a command hands the hook its own context, in
/// the DB the client has selected, whatever DB the event names (Valkey 9.1: `COPY … DB 1 REPLACE` in
/// a transaction of a client in DB 0 reached the hook in DB 0, and a same-length copy over a large
/// snapshot or a long log in flight in DB 1 went unseen: the flow was deleted, its archive holding
/// the bytes copied over). `COPY … DB` writes a key of another DB (`copy_to`), and an
/// eviction, or an expiry met while a command looks a key up there, removes one (`evicted`,
/// `expired`). A `MOVE` into another DB (`move_to`) needs no more: the key was absent there, so its
/// removal was seen, or it was absent at capture, which the commit's own reading sees. Every other
/// event is raised by a command on the DB its client has selected.
const ANY_DB_EVENTS: [&[u8]; 3] = [b"copy_to", b"evicted", b"expired"];

/// Keyspace notification hook: a write touched `key` in the context's DB, or in any DB for
/// `ANY_DB_EVENTS`.
extern "C" fn on_key_event(
    ctx: *mut raw::RedisModuleCtx,
    _type: c_int,
    event: *const c_char,
    key: *mut raw::RedisModuleString,
) -> c_int {
    if FOLLOWED.load(Ordering::SeqCst) == 0 {
        return raw::REDISMODULE_OK as c_int;
    }
    log::contained("the keyspace-event hook", || {
        let mut len = 0;
        // SAFETY: the server passes its live context, the event's name (a C string) and the key's
        // name for this call; the key's `len` bytes and the event's name stay valid while the call
        // lasts, and are not kept past it.
        let (db, event, name) = unsafe {
            let db = raw::RedisModule_GetSelectedDb.map_or(0, |f| f(ctx));
            let ptr = raw::RedisModule_StringPtrLen.map_or(std::ptr::null(), |f| f(key, &mut len));
            if ptr.is_null() {
                return;
            }
            let event = (!event.is_null()).then(|| std::ffi::CStr::from_ptr(event).to_bytes());
            (db, event, std::slice::from_raw_parts(ptr as *const u8, len))
        };
        // An event the server does not name could be any of them.
        let db = match event {
            Some(event) if !ANY_DB_EVENTS.contains(&event) => Some(db),
            _ => None,
        };
        key_touched(db, name);
    });
    raw::REDISMODULE_OK as c_int
}

#[redis_module_macros::flush_event_handler]
fn on_flush(_ctx: &Context, _sub: FlushSubevent) {
    everything_touched();
}

/// SWAPDB, or an async load's new dataset swapped in: every key may now hold other data, so every
/// flow in flight counts as changed (a started or aborted async load changes nothing).
extern "C" fn on_dataset_swapped(
    _ctx: *mut raw::RedisModuleCtx,
    eid: raw::RedisModuleEvent,
    sub: u64,
    _data: *mut c_void,
) {
    if eid.id != EVENT_REPL_ASYNC_LOAD || sub == SUBEVENT_ASYNC_LOAD_COMPLETED {
        everything_touched();
    }
}

/// A write touched `key` in `db`, or in whichever DB holds it (`None`).
fn key_touched(db: Option<i32>, key: &[u8]) {
    let guard = registry();
    let Some(reg) = guard.as_ref() else {
        return;
    };
    let Some(list) = reg.keys.get(key) else {
        return;
    };
    list.iter()
        .filter(|(followed, _)| db.is_none_or(|db| db == *followed))
        .for_each(|(_, f)| f.changed.store(true, Ordering::SeqCst));
}

/// FLUSHDB, FLUSHALL, SWAPDB and a dataset swapped in by a replica's async load raise no per-key
/// events: treat every watched flow as changed.
pub fn everything_touched() {
    if let Some(reg) = registry().as_ref() {
        reg.all
            .iter()
            .for_each(|e| e.flags.changed.store(true, Ordering::SeqCst));
    }
}

fn info_fields() -> Vec<(String, i64)> {
    let subscribed = |writes: Writes| {
        let events = writes.events();
        (SUBSCRIBED.load(Ordering::SeqCst) & events == events) as i64
    };
    named([
        ("keyspace_events_subscribed", subscribed(Writes::Lists)),
        (
            "string_events_subscribed",
            subscribed(Writes::ListsAndStrings),
        ),
        ("hash_events_subscribed", subscribed(Writes::ListsAndHashes)),
    ])
}

#[distributed_slice(INFO_FIELDS)]
static WATCH_FIELDS: Fields = info_fields;

#[cfg(test)]
mod tests {
    use super::*;

    fn followed(db: i32, id: &str, keys: &[&str]) -> Watch {
        let mut w = Watch::claim(db, id).unwrap();
        w.follow_keys(keys);
        w
    }

    #[test]
    fn flags_only_the_touched_flow() {
        let a = followed(0, "a", &["p:flow:a:events"]);
        let b = followed(0, "b", &["p:flow:b:events"]);
        let c = Watch::claim(0, "c").unwrap();
        assert!(
            Watch::claim(0, "a").is_none(),
            "one archive per flow at a time"
        );
        key_touched(Some(1), b"p:flow:a:events");
        key_touched(Some(0), b"p:flow:c:events");
        assert!(!a.changed() && !b.changed() && !c.changed());
        key_touched(Some(0), b"p:flow:a:events");
        assert!(a.changed() && !b.changed());
        everything_touched();
        assert!(
            b.changed() && c.changed(),
            "a flush changes every claimed flow"
        );
        drop(a);
        let again = Watch::claim(0, "a").unwrap();
        assert!(!again.changed() && !again.follows());
    }

    #[test]
    fn a_write_placed_in_no_db_touches_the_key_in_every_db() {
        let near = followed(5, "twin", &["p:flow:twin:snapshot:val"]);
        let far = followed(6, "twin", &["p:flow:twin:snapshot:val"]);
        let other = followed(6, "other", &["p:flow:other:snapshot:val"]);
        key_touched(None, b"p:flow:twin:snapshot:val");
        assert!(near.changed() && far.changed() && !other.changed());
    }

    #[test]
    fn a_watch_ended_off_the_main_thread_is_cleared_by_the_main_thread() {
        let w = followed(3, "far", &["p:flow:far:events"]);
        std::thread::spawn(move || drop(w)).join().unwrap();
        // The worker took no lock; the next use of the registry frees the claim and the key.
        let again = Watch::claim(3, "far").expect("the claim was released");
        key_touched(Some(3), b"p:flow:far:events");
        assert!(
            !again.changed(),
            "the ended watch no longer follows the key"
        );
        let left = lock(&REGISTRY)
            .as_ref()
            .is_some_and(|r| r.keys.contains_key(&b"p:flow:far:events"[..]));
        assert!(!left);
    }
}
