//! The token cache: one temporary credential set with its expiry, refreshed ahead of that expiry by
//! one worker at a time, as object_store's `TokenCache` keeps its tokens.
//!
//! Why refresh ahead: a presigned request must reach S3 before its credentials expire, and a refresh
//! may take a while (or fail), so a set is refreshed when half its life (at most five minutes) is
//! left and is never used in its last tenth (at most a minute). Why one worker at a time: every
//! S3 request asks for credentials, and a service must not get one call per waiting worker; the
//! others keep signing with the cached set meanwhile, or, with none to sign with, wait and share the
//! fetching worker's set or failure. Why failures keep the last good set: a short outage of STS or
//! IMDS must not stop archiving while the set in hand is still valid; each failure is counted and
//! logged, and the next try waits a pause instead of coming with every request.
//!
//! The set is kept with the provider it came from (`K`): when the configs choose another provider,
//! its first request fetches anew.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, TryLockError};

use super::{cred_error, Credentials, Source};
use crate::clock::now_ms;
use crate::s3::StoreError;
use crate::sync::lock;

/// Pause after a failed refresh before the next try (other requests keep the old set meanwhile).
const RETRY_REFRESH_MS: i64 = 1_000;

/// When a set is refreshed (`refresh_at`) and when it is no longer used to sign (`usable_until`).
/// A presigned request must reach S3 before the set expires: the last tenth of its life (at most a
/// minute) is not used.
fn schedule(fetched_ms: i64, expires_ms: i64) -> (i64, i64) {
    let life = (expires_ms - fetched_ms).max(0);
    let refresh_at = expires_ms - (life / 2).min(300_000);
    let usable_until = expires_ms - (life / 10).min(60_000);
    (refresh_at, usable_until)
}

/// The cached set, the provider it came from, and its schedule (unix ms).
struct Entry<K> {
    provider: K,
    creds: Credentials,
    refresh_at: i64,
    usable_until: i64,
    /// No refresh is tried before this (after a failure).
    next_try: i64,
}

pub(super) struct TokenCache<K> {
    entry: Mutex<Option<Entry<K>>>,
    /// Held by the one worker that fetches.
    fetching: Mutex<()>,
    /// The provider of the last failed fetch and its error: workers that waited for a fetch that
    /// failed share its error instead of asking again, one after the other.
    last_failure: Mutex<Option<(K, String)>>,
    /// Failed fetches since load; also tells a worker whether a fetch failed while it waited.
    failures: AtomicU64,
    /// Source (its index in `Source::ALL`, plus one; 0 before any) and expiry (`i64::MAX`: none) of
    /// the set last served, for INFO. Atomics, not a lock: INFO runs on the main thread, and the
    /// workers that sign may run in the idle scheduling class (a lock one of them held while
    /// descheduled would stall the server).
    served_source: AtomicU8,
    served_expires: AtomicI64,
}

impl<K: Clone + PartialEq> TokenCache<K> {
    pub(super) const fn new() -> TokenCache<K> {
        TokenCache {
            entry: Mutex::new(None),
            fetching: Mutex::new(()),
            last_failure: Mutex::new(None),
            failures: AtomicU64::new(0),
            served_source: AtomicU8::new(0),
            served_expires: AtomicI64::new(i64::MAX),
        }
    }

    /// Hands `creds` out, as the set in use. Long-term keys, which are never cached, are served
    /// through here too, so INFO shows whichever set signed last.
    pub(super) fn serve(&self, creds: &Credentials) -> Credentials {
        let index = Source::ALL.iter().position(|s| *s == creds.source);
        let expires = creds.expires_ms.unwrap_or(i64::MAX);
        self.served_expires.store(expires, Ordering::Relaxed);
        self.served_source
            .store(index.map_or(0, |i| i as u8 + 1), Ordering::Relaxed);
        creds.clone()
    }

    /// The source and expiry (unix ms; `None`: does not expire) of the set last served.
    pub(super) fn served(&self) -> (Option<Source>, Option<i64>) {
        let source = (self.served_source.load(Ordering::Relaxed) as usize)
            .checked_sub(1)
            .and_then(|i| Source::ALL.get(i).copied());
        let expires = Some(self.served_expires.load(Ordering::Relaxed)).filter(|e| *e != i64::MAX);
        (source, expires)
    }

    /// Failed fetches since load.
    pub(super) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The set of `provider` to sign with now: the cached one while fresh, else one `fetch` gives
    /// (on the calling worker). A failed fetch is counted and reported to `warn`; the cached set is
    /// served instead while still usable.
    pub(super) fn get(
        &self,
        provider: &K,
        warn: fn(&str),
        fetch: impl FnOnce() -> Result<Credentials, StoreError>,
    ) -> Result<Credentials, StoreError> {
        let (fresh, usable) = self.cached(provider);
        if let Some(creds) = fresh {
            return Ok(self.serve(&creds));
        }
        // One fetch at a time. With a usable set, do not wait for another worker's refresh.
        let failures_before = self.failures();
        let _fetching = match self.fetching.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => match &usable {
                Some(creds) => return Ok(self.serve(creds)),
                None => lock(&self.fetching),
            },
        };
        // Another worker may have fetched while this one waited: its set, or its failure.
        if let (Some(creds), _) = self.cached(provider) {
            return Ok(self.serve(&creds));
        }
        if self.failures() != failures_before {
            if let Some((_, message)) = lock(&self.last_failure)
                .as_ref()
                .filter(|(p, _)| p == provider)
            {
                return Err(cred_error(message.clone()));
            }
        }
        match fetch() {
            Ok(creds) => self.remember(provider, creds),
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                warn(&format!("flowarchive: S3 credentials refresh failed: {e}"));
                *lock(&self.last_failure) = Some((provider.clone(), e.message.clone()));
                if let Some(entry) = lock(&self.entry)
                    .as_mut()
                    .filter(|c| c.provider == *provider)
                {
                    entry.next_try = now_ms() + RETRY_REFRESH_MS;
                }
                usable.map(|c| self.serve(&c)).ok_or(e)
            }
        }
    }

    /// Caches a fetched set with its refresh schedule, and serves it.
    fn remember(&self, provider: &K, creds: Credentials) -> Result<Credentials, StoreError> {
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
        let served = self.serve(&creds);
        *lock(&self.entry) = Some(Entry {
            provider: provider.clone(),
            creds,
            refresh_at,
            usable_until,
            next_try: 0,
        });
        Ok(served)
    }

    /// The cached set of `provider`: to sign with at once (fresh, or stale while a refresh pauses
    /// after a failure), and, when not, still usable while it is refreshed.
    fn cached(&self, provider: &K) -> (Option<Credentials>, Option<Credentials>) {
        let now = now_ms();
        let entry = lock(&self.entry);
        let Some(c) = entry.as_ref().filter(|c| c.provider == *provider) else {
            return (None, None);
        };
        let usable = now < c.usable_until;
        if now < c.refresh_at || (usable && now < c.next_try) {
            return (Some(c.creds.clone()), None);
        }
        (None, usable.then(|| c.creds.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use crate::s3::FailureKind;

    /// A set from IMDS that expires `life_ms` from now, tagged `n`.
    fn set(n: usize, life_ms: i64) -> Credentials {
        Credentials {
            key_id: format!("ASIA{n}"),
            secret: "s".into(),
            token: Some("t".into()),
            expires_ms: Some(now_ms() + life_ms),
            source: Source::Imds,
        }
    }

    fn outage() -> Result<Credentials, StoreError> {
        Err(cred_error("S3 credentials from imds: down".into()))
    }

    #[test]
    fn refresh_comes_well_before_expiry() {
        // An hour-long set: refreshed five minutes before, used until a minute before.
        assert_eq!(schedule(0, 3_600_000), (3_300_000, 3_540_000));
        // A ten-second set: refreshed at half-life, used until its last second.
        assert_eq!(schedule(0, 10_000), (5_000, 9_000));
    }

    #[test]
    fn a_fresh_set_is_served_from_the_cache_per_provider() {
        let cache = TokenCache::<&str>::new();
        let fetches = &AtomicUsize::new(0);
        let fetch = |life| move || Ok(set(fetches.fetch_add(1, Ordering::SeqCst), life));
        assert_eq!(cache.served(), (None, None));
        let a = cache.get(&"imds", |_| {}, fetch(60_000)).unwrap();
        let again = cache.get(&"imds", |_| {}, fetch(60_000)).unwrap();
        assert_eq!(
            (a.key_id.as_str(), again.key_id.as_str()),
            ("ASIA0", "ASIA0")
        );
        assert_eq!(cache.served(), (Some(Source::Imds), a.expires_ms));
        // Another provider: fetched anew.
        assert_eq!(
            cache.get(&"other", |_| {}, fetch(60_000)).unwrap().key_id,
            "ASIA1"
        );
        // A set already expired is refused, uncounted.
        let e = cache.get(&"late", |_| {}, fetch(-1_000)).unwrap_err();
        assert_eq!(e.message, "imds credentials are already expired");
        assert_eq!(cache.failures(), 0);
    }

    #[test]
    fn a_failed_refresh_serves_the_last_good_set_until_it_is_unusable() {
        let cache = TokenCache::<&str>::new();
        let warned = |m: &str| assert!(m.starts_with("flowarchive: S3 credentials refresh failed"));
        // 300 ms of life: refreshed after 150 ms, unusable after 270 ms.
        let first = cache.get(&"imds", warned, || Ok(set(0, 300))).unwrap();
        std::thread::sleep(Duration::from_millis(170));
        let kept = cache.get(&"imds", warned, outage).unwrap();
        assert_eq!((kept.key_id.as_str(), cache.failures()), ("ASIA0", 1));
        // The next try waits its pause: no fetch meanwhile.
        let kept = cache
            .get(&"imds", warned, || panic!("fetched during the pause"))
            .unwrap();
        assert_eq!(kept, first);
        std::thread::sleep(Duration::from_millis(130));
        let e = cache.get(&"imds", warned, outage).unwrap_err();
        assert_eq!(e.kind, FailureKind::Credentials);
        assert_eq!(
            (e.message.as_str(), cache.failures()),
            ("S3 credentials from imds: down", 2)
        );
        // Back: a new set at once.
        let back = cache.get(&"imds", warned, || Ok(set(1, 60_000))).unwrap();
        assert_eq!(back.key_id, "ASIA1");
    }

    #[test]
    fn one_fetch_at_a_time_and_waiters_share_its_outcome() {
        for fails in [false, true] {
            let cache = TokenCache::<&str>::new();
            let fetches = AtomicUsize::new(0);
            let start = std::sync::Barrier::new(4);
            let results: Vec<_> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            cache.get(
                                &"sts",
                                |_| {},
                                || {
                                    fetches.fetch_add(1, Ordering::SeqCst);
                                    std::thread::sleep(Duration::from_millis(300));
                                    if fails {
                                        outage()
                                    } else {
                                        Ok(set(0, 60_000))
                                    }
                                },
                            )
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).collect()
            });
            assert_eq!(fetches.load(Ordering::SeqCst), 1, "fails: {fails}");
            assert_eq!(cache.failures(), fails as u64);
            for r in results {
                assert_eq!(r.is_err(), fails, "{r:?}");
            }
        }
    }
}
