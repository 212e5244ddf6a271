//! Retries of S3 requests: exponential backoff with full jitter (a random sleep between zero and
//! `base · 2^attempt`, capped), bounded by a number of attempts and by a total time, counted in INFO.
//!
//! Retried: 5xx (including 503 SlowDown), 429, timeouts, connection failures and resets, bodies cut
//! short. Never retried: 400/403/404 and every other answer that would come back the same (the caller
//! gets a clear error at once), TLS certificate failures, credential errors, an existing object at a
//! write-once key, verification mismatches. A PUT is safe to retry: its key and content are
//! deterministic and it is write-once (a retry after a lost answer finds the object and the caller
//! compares it).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{FailureKind, StoreError};

/// The first backoff ceiling; doubles with each attempt.
const BASE: Duration = Duration::from_millis(100);
/// The largest single backoff.
const CAP: Duration = Duration::from_secs(5);

static RETRIES: AtomicU64 = AtomicU64::new(0);
static GAVE_UP: AtomicU64 = AtomicU64::new(0);

/// Retries made, and requests given up on with a transient failure after at least one retry (no
/// attempts or time left), since load.
pub fn counts() -> (u64, u64) {
    (
        RETRIES.load(Ordering::Relaxed),
        GAVE_UP.load(Ordering::Relaxed),
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    /// No retry starts after this long since the first attempt began.
    pub total: Duration,
}

pub fn retryable(e: &StoreError) -> bool {
    matches!(
        e.kind,
        FailureKind::ServerError
            | FailureKind::Throttled
            | FailureKind::Timeout
            | FailureKind::Unreachable
            | FailureKind::Truncated
    )
}

/// A random number (no extra crate needed for jitter): SipHash under the standard library's random
/// keys (drawn per thread from the OS, advanced for every `RandomState`) of a draw counter and the time.
pub(super) fn random() -> u64 {
    static DRAWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(DRAWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

fn ceiling(retry: u32) -> Duration {
    BASE.saturating_mul(1u32 << retry.saturating_sub(1).min(16))
        .min(CAP)
}

/// The sleep before retry number `retry` (1 for the first): uniform in [0, min(CAP, BASE·2^(retry-1))].
fn backoff(retry: u32, random: u64) -> Duration {
    ceiling(retry).mul_f64(random as f64 / u64::MAX as f64)
}

impl Policy {
    /// Runs `op` until it succeeds, fails for good, or the attempts or the time are used up.
    pub fn run<T>(&self, mut op: impl FnMut() -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.run_with(&mut op, &mut random, &mut std::thread::sleep)
    }

    fn run_with<T>(
        &self,
        op: &mut dyn FnMut() -> Result<T, StoreError>,
        random: &mut dyn FnMut() -> u64,
        sleep: &mut dyn FnMut(Duration),
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let mut retry = 0;
        loop {
            let err = match op() {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            retry += 1;
            let pause = backoff(retry, random());
            if !retryable(&err) {
                return Err(err);
            }
            if retry >= self.attempts.max(1) || start.elapsed() + pause >= self.total {
                if retry > 1 {
                    GAVE_UP.fetch_add(1, Ordering::Relaxed);
                }
                return Err(err);
            }
            RETRIES.fetch_add(1, Ordering::Relaxed);
            sleep(pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::s3::fail;

    fn policy(attempts: u32) -> Policy {
        Policy {
            attempts,
            total: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_growing_capped_ceiling() {
        assert_eq!(backoff(1, 0), Duration::ZERO);
        assert_eq!(backoff(1, u64::MAX), Duration::from_millis(100));
        assert_eq!(backoff(3, u64::MAX), Duration::from_millis(400));
        assert_eq!(backoff(3, u64::MAX / 2), Duration::from_millis(200));
        assert_eq!(backoff(7, u64::MAX), CAP, "capped");
        assert_eq!(backoff(40, u64::MAX), CAP);
        for retry in 1..40 {
            assert!(backoff(retry, random()) <= ceiling(retry));
        }
    }

    #[test]
    fn jitter_is_spread_over_its_whole_range() {
        let draws: Vec<f64> = (0..4000)
            .map(|_| random() as f64 / u64::MAX as f64)
            .collect();
        let mut tenths = [0usize; 10];
        for d in &draws {
            tenths[((d * 10.0) as usize).min(9)] += 1;
        }
        // 400 expected in each tenth; a constant or clustered source fails this.
        assert!(
            tenths.iter().all(|&n| (300..=500).contains(&n)),
            "{tenths:?}"
        );
    }

    #[test]
    fn retries_transient_failures_only_within_bounds() {
        let mut sleeps = Vec::new();
        let mut calls = 0;
        let r = policy(4).run_with(
            &mut || {
                calls += 1;
                if calls < 3 {
                    Err(fail(FailureKind::Throttled, "503 SlowDown".into()))
                } else {
                    Ok(calls)
                }
            },
            &mut || u64::MAX,
            &mut |d| sleeps.push(d),
        );
        assert_eq!(r.unwrap(), 3);
        assert_eq!(sleeps.len(), 2);
        for (kind, expected_calls) in [
            (FailureKind::ServerError, 4),
            (FailureKind::Rejected, 1),
            (FailureKind::Missing, 1),
            (FailureKind::Exists, 1),
            (FailureKind::Tls, 1),
            (FailureKind::Credentials, 1),
        ] {
            let mut calls = 0;
            let err = policy(4)
                .run_with(
                    &mut || -> Result<(), _> {
                        calls += 1;
                        Err(fail(kind, "x".into()))
                    },
                    &mut || 0,
                    &mut |_| {},
                )
                .unwrap_err();
            assert_eq!((err.kind, calls), (kind, expected_calls));
        }
        // The total time bounds retries too: no retry whose pause would pass it.
        let mut calls = 0;
        let short = Policy {
            attempts: 100,
            total: Duration::from_millis(250),
        };
        let _ = short.run_with(
            &mut || -> Result<(), _> {
                calls += 1;
                Err(fail(FailureKind::Timeout, "x".into()))
            },
            &mut || u64::MAX,
            &mut |d| std::thread::sleep(d),
        );
        assert_eq!(calls, 2, "100 ms, then 200 ms would pass 250 ms");
    }
}
