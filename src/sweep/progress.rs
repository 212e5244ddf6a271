//! The counters of one sweep: shared by its coordinator, shown in INFO while it runs and after, and
//! answered as its summary. One list of fields serves both.
//!
//! The flow counts change in one place only, `Progress::shift`: the published side of one flow's
//! transition, called by the ledger (`ledger.rs`) as it moves the flow's token. Their fields are
//! private so that no other code can count a flow; what else a sweep records (bytes, time, the longest
//! main-thread stretch) is not a count of flows and has its own methods.
//!
//! The identity the end-of-sweep check proves on these fields:
//! `candidates = archived + skipped_changed + skipped_ineligible + skipped_noperm + failed + in_flight
//! + len(flows)`, where `flows` (the flows a sweep would archive) is filled only by DRYRUN, which
//! archives nothing; `failed` is the sum of `failed_by_reason`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use redis_module::redisvalue::RedisValueKey;
use redis_module::RedisValue;

use crate::archive::Archived;
use crate::sweep::flow::{self, Outcome, State};
use crate::sync::lock;

#[derive(Default)]
pub struct Progress {
    pub dry_run: bool,
    candidates: AtomicU64,
    archived: AtomicU64,
    skipped_changed: AtomicU64,
    skipped_ineligible: AtomicU64,
    skipped_noperm: AtomicU64,
    /// Flows out now (uploading or committing); at the end, those the sweep ended with still out.
    in_flight: AtomicU64,
    raw_bytes: AtomicU64,
    stored_bytes: AtomicU64,
    duration_ms: AtomicU64,
    /// Longest single main-thread stretch of this sweep (selection, capture or commit), microseconds.
    main_thread_max_us: AtomicU64,
    failed: Mutex<BTreeMap<&'static str, u64>>,
    /// DRYRUN: the flows that would be archived.
    would_archive: Mutex<Vec<String>>,
}

/// The flow counts as published, read at once (the end-of-sweep check compares them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub candidates: u64,
    pub archived: u64,
    pub skipped_changed: u64,
    pub skipped_ineligible: u64,
    pub skipped_noperm: u64,
    pub failed: BTreeMap<&'static str, u64>,
    pub in_flight: u64,
    pub would_archive: u64,
}

impl Counts {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// Every outcome summed: what `candidates` must equal once no flow is between stages.
    pub fn outcomes(&self) -> u64 {
        self.archived
            + self.skipped_changed
            + self.skipped_ineligible
            + self.skipped_noperm
            + self.failed_total()
            + self.in_flight
            + self.would_archive
    }
}

impl Progress {
    pub fn new(dry_run: bool) -> Self {
        Progress {
            dry_run,
            ..Progress::default()
        }
    }

    /// The counts' side of flow `id` moving from `from` (`None`: just selected) to `to`: the only code
    /// that changes a flow count. A candidate counts once when selected; `in_flight` holds a flow from
    /// its hand-over to the uploaders until an outcome other than `InFlight`; an outcome counts once.
    pub(super) fn shift(&self, id: &str, from: Option<State>, to: State) {
        let add = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        match to {
            State::Selected => add(&self.candidates),
            State::Uploading => add(&self.in_flight),
            State::Capturing | State::Committing => {}
            State::Done(outcome) => {
                if from.is_some_and(flow::out) && outcome != Outcome::InFlight {
                    // Saturating: a bug that releases a flow twice shows as a count the check
                    // refuses, not as a wrapped number.
                    let release = |n: u64| Some(n.saturating_sub(1));
                    let _ =
                        self.in_flight
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, release);
                }
                match outcome {
                    Outcome::Archived => add(&self.archived),
                    Outcome::SkippedChanged => add(&self.skipped_changed),
                    Outcome::SkippedIneligible => add(&self.skipped_ineligible),
                    Outcome::SkippedNoperm => add(&self.skipped_noperm),
                    Outcome::Failed(kind) => *lock(&self.failed).entry(kind).or_default() += 1,
                    Outcome::WouldArchive => lock(&self.would_archive).push(id.to_string()),
                    Outcome::InFlight => {}
                }
            }
        }
    }

    /// An archived flow's bytes and its longest main-thread stretch (with its `Archived` outcome).
    pub(super) fn add_archived(&self, done: &Archived) {
        let r = Ordering::Relaxed;
        self.raw_bytes.fetch_add(done.raw_bytes, r);
        self.stored_bytes.fetch_add(done.stored_bytes, r);
        self.main_thread_max_us.fetch_max(done.main_thread_us, r);
    }

    /// A main-thread stretch of the sweep's own (selection, DRYRUN's inspection).
    pub(super) fn held_main_thread(&self, us: u64) {
        self.main_thread_max_us.fetch_max(us, Ordering::Relaxed);
    }

    pub(super) fn add_duration_ms(&self, ms: u64) {
        self.duration_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// The flow counts now.
    pub fn counts(&self) -> Counts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            candidates: get(&self.candidates),
            archived: get(&self.archived),
            skipped_changed: get(&self.skipped_changed),
            skipped_ineligible: get(&self.skipped_ineligible),
            skipped_noperm: get(&self.skipped_noperm),
            failed: lock(&self.failed).clone(),
            in_flight: get(&self.in_flight),
            would_archive: lock(&self.would_archive).len() as u64,
        }
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
