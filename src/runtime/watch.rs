//! Change detection for flows being archived.
//!
//! While a flow is between capture and commit, its own keys are registered here. Every keyspace event
//! the server raises for one of them (a late RPUSH, SET, DEL, RENAME, expiry, eviction...) and every
//! FLUSHDB/FLUSHALL/SWAPDB marks the archive as changed, so the commit deletes nothing. This is the
//! fingerprint: exact, O(1) per write, and it covers captures that span several event-loop turns.

use std::collections::{HashMap, HashSet};
use std::os::raw::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use redis_module::server_events::FlushSubevent;
use redis_module::{raw, Context, NotifyEvent};

use crate::runtime::server::selected_db;
use crate::sync::lock;

type DbKey = (i32, Vec<u8>);

#[derive(Default)]
struct Registry {
    keys: HashMap<DbKey, Vec<Arc<AtomicBool>>>,
    all: Vec<Arc<AtomicBool>>,
    flows: HashSet<(i32, String)>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
/// Lets the notification hook skip the lock when nothing is watched (the common case).
static WATCHED: AtomicUsize = AtomicUsize::new(0);

fn registry() -> MutexGuard<'static, Option<Registry>> {
    lock(&REGISTRY)
}

/// A flow being archived. Dropping it ends the watch and frees the flow for another archive attempt.
pub struct Watch {
    db: i32,
    /// The flow this watch claims for its archive, if any (a reader's watch claims nothing).
    claimed: Option<String>,
    keys: Vec<DbKey>,
    changed: Arc<AtomicBool>,
}

impl Watch {
    /// Starts watching `keys` of flow `id` in `db`; `None` if that flow is already being archived.
    /// Must be called on the main thread before the first key is read.
    pub fn start(db: i32, id: &str, keys: &[&str]) -> Option<Watch> {
        let mut guard = registry();
        let reg = guard.get_or_insert_with(Registry::default);
        if !reg.flows.insert((db, id.to_string())) {
            return None;
        }
        Some(Self::register(reg, db, Some(id.to_string()), keys))
    }

    /// Watches `keys` in `db` for a reader, without claiming the flow. Main thread, before the first read.
    pub fn observe(db: i32, keys: &[&str]) -> Watch {
        let mut guard = registry();
        Self::register(guard.get_or_insert_with(Registry::default), db, None, keys)
    }

    fn register(reg: &mut Registry, db: i32, claimed: Option<String>, keys: &[&str]) -> Watch {
        let changed = Arc::new(AtomicBool::new(false));
        let keys: Vec<DbKey> = keys.iter().map(|k| (db, k.as_bytes().to_vec())).collect();
        for k in &keys {
            reg.keys.entry(k.clone()).or_default().push(changed.clone());
        }
        reg.all.push(changed.clone());
        WATCHED.fetch_add(1, Ordering::SeqCst);
        Watch {
            db,
            claimed,
            keys,
            changed,
        }
    }

    pub fn changed(&self) -> bool {
        self.changed.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut guard = registry();
        if let Some(reg) = guard.as_mut() {
            for k in &self.keys {
                if let Some(list) = reg.keys.get_mut(k) {
                    list.retain(|f| !Arc::ptr_eq(f, &self.changed));
                    if list.is_empty() {
                        reg.keys.remove(k);
                    }
                }
            }
            reg.all.retain(|f| !Arc::ptr_eq(f, &self.changed));
            if let Some(id) = self.claimed.take() {
                reg.flows.remove(&(self.db, id));
            }
        }
        WATCHED.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Subscribes to SWAPDB (FLUSHDB/FLUSHALL come through `on_flush`, key events through `on_key_event`).
pub fn init(ctx: &Context) {
    // SAFETY: called once from OnLoad with the module's context.
    unsafe {
        if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
            let event = raw::RedisModuleEvent {
                id: raw::REDISMODULE_EVENT_SWAPDB,
                dataver: 1,
            };
            subscribe(ctx.ctx, event, Some(on_swapdb));
        }
    }
}

/// Keyspace notification hook: a write touched `key` in the context's DB.
pub fn on_key_event(ctx: &Context, _event: NotifyEvent, _name: &str, key: &[u8]) {
    key_touched(selected_db(ctx), key);
}

#[redis_module_macros::flush_event_handler]
fn on_flush(_ctx: &Context, _sub: FlushSubevent) {
    everything_touched();
}

extern "C" fn on_swapdb(
    _ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    _sub: u64,
    _data: *mut c_void,
) {
    everything_touched();
}

/// A write touched `key` in `db`.
fn key_touched(db: i32, key: &[u8]) {
    if WATCHED.load(Ordering::SeqCst) == 0 {
        return;
    }
    if let Some(reg) = registry().as_ref() {
        if let Some(list) = reg.keys.get(&(db, key.to_vec())) {
            list.iter().for_each(|f| f.store(true, Ordering::SeqCst));
        }
    }
}

/// FLUSHDB, FLUSHALL and SWAPDB raise no per-key events: treat every watched flow as changed.
fn everything_touched() {
    if let Some(reg) = registry().as_ref() {
        reg.all.iter().for_each(|f| f.store(true, Ordering::SeqCst));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_only_the_touched_flow() {
        let a = Watch::start(0, "a", &["p:flow:a:events", "p:flow:a:snapshot:val"]).unwrap();
        let b = Watch::start(0, "b", &["p:flow:b:events"]).unwrap();
        assert!(
            Watch::start(0, "a", &[]).is_none(),
            "one archive per flow at a time"
        );
        key_touched(1, b"p:flow:a:events");
        key_touched(0, b"p:flow:c:events");
        assert!(!a.changed() && !b.changed());
        key_touched(0, b"p:flow:a:snapshot:val");
        assert!(a.changed() && !b.changed());
        everything_touched();
        assert!(b.changed());
        drop(a);
        let again = Watch::start(0, "a", &["p:flow:a:events"]).unwrap();
        assert!(!again.changed());
    }
}
