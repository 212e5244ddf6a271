//! The archive side of FLOWARCHIVE.GET: a presigned GET on a worker thread, full verification, a
//! byte-bounded LRU cache, and one S3 fetch shared by every client asking for the same flow at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use redis_module::{BlockedClient, RedisError, RedisValue, ThreadSafeContext};
use sha2::{Digest, Sha256};

use crate::cache::{CacheKey, Lru};
use crate::configs::S3Settings;
use crate::decode::{self, Decoded};
use crate::errors::show_id;
use crate::layout::hex;
use crate::metrics;
use crate::store::Store;

/// A client waiting for a fetch, and whether it asked for the events.
pub struct Waiter {
    pub client: ThreadSafeContext<BlockedClient>,
    pub events: bool,
}

static CACHE: Mutex<Option<Lru>> = Mutex::new(None);
static IN_FLIGHT: Mutex<Option<HashMap<CacheKey, Vec<Waiter>>>> = Mutex::new(None);

fn lock<T>(m: &'static Mutex<Option<T>>) -> MutexGuard<'static, Option<T>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reply for a decoded flow: the FlowState, or `[FlowState, [events...]]`.
pub fn reply(flow: &Decoded, events: bool) -> RedisValue {
    let state = RedisValue::BulkString(flow.flow_state.clone());
    if !events {
        return state;
    }
    let list = flow
        .events
        .iter()
        .cloned()
        .map(RedisValue::BulkString)
        .collect();
    RedisValue::Array(vec![state, RedisValue::Array(list)])
}

pub fn cached(key: &CacheKey) -> Option<Arc<Decoded>> {
    lock(&CACHE).as_mut()?.get(key)
}

/// Applies a new cache budget at once (CONFIG SET flowarchive.cache-bytes).
pub fn resize_cache(budget: usize) {
    if let Some(lru) = lock(&CACHE).as_mut() {
        lru.shrink_to(budget);
    }
}

pub fn cache_stats() -> (usize, usize) {
    lock(&CACHE)
        .as_ref()
        .map_or((0, 0), |l| (l.len(), l.bytes()))
}

/// Queues `waiter` for the flow at `key`; starts the fetch unless one is already running.
pub fn request(key: CacheKey, waiter: Waiter, s3: S3Settings, budget: usize) {
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
    let spawned = std::thread::Builder::new()
        .name("flowarchive-get".into())
        .spawn(move || {
            let started = Instant::now();
            let outcome = std::panic::catch_unwind(|| fetch(&s3, &job_key))
                .unwrap_or_else(|_| Err(("internal", "fetch worker panicked".to_string())));
            metrics::fetched(started.elapsed(), outcome.as_ref().err().map(|e| e.0));
            finish(&job_key, outcome, budget);
        });
    if spawned.is_err() {
        finish(
            &key,
            Err(("internal", "cannot start a fetch thread".into())),
            budget,
        );
    }
}

/// Caches a good result, then answers everyone who waited for it.
fn finish(key: &CacheKey, outcome: Result<Arc<Decoded>, (&'static str, String)>, budget: usize) {
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
    let (_, id, location) = key;
    for w in waiters {
        let answer = match &outcome {
            Ok(flow) => Ok(reply(flow, w.events)),
            Err((_, why)) => Err(RedisError::String(format!(
                "ERR flow {} archived at {location}: {why}",
                show_id(id)
            ))),
        };
        w.client.reply(answer);
    }
}

/// `s3://bucket/key` → (bucket, key).
fn parse_location(location: &str) -> Option<(&str, &str)> {
    let rest = location.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

fn fetch(
    s3: &S3Settings,
    (_, id, location): &CacheKey,
) -> Result<Arc<Decoded>, (&'static str, String)> {
    let (bucket, key) = parse_location(location).ok_or((
        "bad_location",
        "the index entry is not an s3:// location".to_string(),
    ))?;
    let store = Store::for_bucket(s3, bucket).map_err(|e| (e.kind.name(), e.message))?;
    let (body, recorded) = store
        .get(key, crate::store::MAX_OBJECT)
        .map_err(|e| (e.kind.name(), e.message))?;
    let actual = hex(&Sha256::digest(&body));
    match recorded {
        Some(r) if r == actual => {}
        Some(r) => {
            return Err((
                "checksum",
                format!("object sha256 {actual} differs from the recorded {r}"),
            ))
        }
        None => {
            return Err((
                "checksum",
                "object carries no flowarchive checksum (overwritten?)".into(),
            ))
        }
    }
    decode::decode(&body, id)
        .map(Arc::new)
        .map_err(|e| (e.kind(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            parse_location("s3://b/flows/a.jsonl.gz"),
            Some(("b", "flows/a.jsonl.gz"))
        );
        assert_eq!(parse_location("s3://b/"), None);
        assert_eq!(parse_location("s3:///k"), None);
        assert_eq!(parse_location("https://b/k"), None);
    }
}
