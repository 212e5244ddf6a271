//! The counters of one sweep: shared by its coordinator, shown in INFO while it runs and after, and
//! answered as its summary. One list of fields serves both.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use redis_module::redisvalue::RedisValueKey;
use redis_module::RedisValue;

use crate::ops::errors::FlowError;
use crate::sync::lock;

#[derive(Default)]
pub struct Progress {
    pub dry_run: bool,
    pub candidates: AtomicU64,
    pub archived: AtomicU64,
    pub skipped_changed: AtomicU64,
    pub skipped_ineligible: AtomicU64,
    pub skipped_noperm: AtomicU64,
    pub in_flight: AtomicU64,
    pub raw_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
    pub duration_ms: AtomicU64,
    /// Longest single main-thread stretch of this sweep (selection, capture or commit), microseconds.
    pub main_thread_max_us: AtomicU64,
    failed: Mutex<BTreeMap<&'static str, u64>>,
    /// DRYRUN: the flows that would be archived.
    pub would_archive: Mutex<Vec<String>>,
}

impl Progress {
    pub fn new(dry_run: bool) -> Self {
        Progress {
            dry_run,
            ..Progress::default()
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a flow that was not archived: skipped (changed, not eligible, not allowed) or failed.
    pub fn count(&self, err: &FlowError) {
        let skipped = match err {
            FlowError::Changed | FlowError::Moved(_) => &self.skipped_changed,
            FlowError::NoPerm(_) => &self.skipped_noperm,
            FlowError::NotFound
            | FlowError::NotTerminal(_)
            | FlowError::TooRecent { .. }
            | FlowError::Conflict(_)
            | FlowError::Leased(_)
            | FlowError::Busy => &self.skipped_ineligible,
            _ => {
                *lock(&self.failed).entry(err.kind()).or_default() += 1;
                return;
            }
        };
        Self::add(skipped, 1);
    }

    pub fn failed_total(&self) -> u64 {
        lock(&self.failed).values().sum()
    }

    /// Every numeric field, in order: INFO shows them under a prefix, the summary answers them.
    pub fn fields(&self) -> Vec<(&'static str, i64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as i64;
        vec![
            ("dry_run", self.dry_run as i64),
            ("candidates", get(&self.candidates)),
            ("archived", get(&self.archived)),
            ("skipped_changed", get(&self.skipped_changed)),
            ("skipped_ineligible", get(&self.skipped_ineligible)),
            ("skipped_noperm", get(&self.skipped_noperm)),
            ("failed", self.failed_total() as i64),
            ("in_flight", get(&self.in_flight)),
            ("raw_bytes", get(&self.raw_bytes)),
            ("stored_bytes", get(&self.stored_bytes)),
            ("duration_ms", get(&self.duration_ms)),
            ("main_thread_max_us", get(&self.main_thread_max_us)),
        ]
    }

    /// The reply to FLOWARCHIVE.SWEEP: every field, failures by reason and (DRYRUN) the flows.
    pub fn summary(&self) -> RedisValue {
        let key = |k: &str| RedisValueKey::String(k.to_string());
        let mut out: Vec<(RedisValueKey, RedisValue)> = self
            .fields()
            .into_iter()
            .map(|(k, v)| (key(k), RedisValue::Integer(v)))
            .collect();
        let by_reason = lock(&self.failed)
            .iter()
            .map(|(k, v)| (key(k), RedisValue::Integer(*v as i64)))
            .collect();
        out.push((key("failed_by_reason"), RedisValue::OrderedMap(by_reason)));
        let flows = lock(&self.would_archive)
            .iter()
            .cloned()
            .map(RedisValue::BulkString)
            .collect();
        out.push((key("flows"), RedisValue::Array(flows)));
        RedisValue::OrderedMap(out.into_iter().collect())
    }

    /// The log line of a finished sweep.
    pub fn log_line(&self) -> String {
        let fields: Vec<String> = self
            .fields()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("flowarchive: sweep done: {}", fields.join(" "))
    }
}
