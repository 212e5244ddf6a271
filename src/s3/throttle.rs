//! The upload rate cap (`upload-bytes-per-sec`): one token bucket shared by every upload of the server.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// How long a throttled upload sleeps before it looks at the rate cap again.
pub(super) const THROTTLE_SLICE: Duration = Duration::from_millis(50);

/// The token bucket behind `flowarchive.upload-bytes-per-sec`, shared by every upload of the server.
///
/// It holds at most one second of the rate. An upload waits until the bucket holds its size (or is full,
/// for an upload larger than one second's worth), then takes its size, possibly leaving a debt that later
/// uploads repay: the long-run rate holds for any object size. Nothing is reserved ahead at a rate:
/// every call is given the rate of that moment, so a changed cap applies at once to the debt and to
/// uploads already waiting.
#[derive(Debug)]
pub(super) struct TokenBucket {
    /// Bytes that may be sent now; negative while a large upload's debt is repaid.
    tokens: f64,
    /// When `tokens` was last brought up to date; `None` while uncapped (a new cap starts full).
    updated: Option<Instant>,
}

impl TokenBucket {
    pub(super) const fn new() -> Self {
        TokenBucket {
            tokens: 0.0,
            updated: None,
        }
    }

    /// Admits an upload of `bytes` at `rate` bytes per second (0: unlimited) at `now`, or tells how
    /// long it would have to wait at this rate.
    pub(super) fn admit(&mut self, bytes: u64, rate: u64, now: Instant) -> Result<(), Duration> {
        if rate == 0 {
            *self = TokenBucket::new();
            return Ok(());
        }
        let rate = rate as f64;
        self.tokens = match self.updated {
            None => rate,
            Some(t) => {
                (self.tokens + now.saturating_duration_since(t).as_secs_f64() * rate).min(rate)
            }
        };
        self.updated = Some(now);
        let needed = (bytes as f64).min(rate);
        if self.tokens >= needed {
            self.tokens -= bytes as f64;
            return Ok(());
        }
        Err(Duration::try_from_secs_f64((needed - self.tokens) / rate).unwrap_or(THROTTLE_SLICE))
    }
}

static UPLOAD_LINK: Mutex<TokenBucket> = Mutex::new(TokenBucket::new());

/// Waits until `bytes` fit under the upload rate cap, re-reading the cap every slice.
pub(super) fn throttle(bytes: usize, cap: &AtomicI64) {
    loop {
        let rate = cap.load(Ordering::Relaxed).max(0) as u64;
        let admitted = lock(&UPLOAD_LINK).admit(bytes as u64, rate, Instant::now());
        match admitted {
            Ok(()) => return,
            Err(wait) => std::thread::sleep(wait.min(THROTTLE_SLICE)),
        }
    }
}
