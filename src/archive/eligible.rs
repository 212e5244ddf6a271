//! The one eligibility rule, used by FLOWARCHIVE.FLOW, both selection arms of the sweep and DRYRUN: a
//! flow is archived when its status is terminal and, unless forced, it has been idle longer than the
//! retention window.

use serde_json::Value;

use crate::clock;
use crate::layout::Layout;
use crate::ops::errors::FlowError;

/// The time window of one archive decision.
#[derive(Clone, Copy)]
pub struct Window {
    pub now_ms: i64,
    pub retention_ms: i64,
    /// FLOW's FORCE: skip the idle check (never the terminal check).
    pub force: bool,
}

impl Window {
    pub fn now(retention_ms: i64, force: bool) -> Self {
        Window {
            now_ms: clock::now_ms(),
            retention_ms,
            force,
        }
    }

    /// Flows last updated at or before this are idle long enough.
    pub fn cutoff_ms(&self) -> i64 {
        self.now_ms - self.retention_ms
    }
}

/// Whether a flow with `status`, last updated at `last_update_ms`, may be archived in `window`.
pub fn check(
    layout: &Layout,
    status: &str,
    last_update_ms: i64,
    window: &Window,
) -> Result<(), FlowError> {
    if !layout.is_terminal(status) {
        return Err(FlowError::NotTerminal(status.to_string()));
    }
    let idle_ms = window.now_ms.saturating_sub(last_update_ms);
    if !window.force && idle_ms < window.retention_ms {
        return Err(FlowError::TooRecent {
            idle_ms,
            retention_ms: window.retention_ms,
        });
    }
    Ok(())
}

/// Scores and times beyond this many ms from 1970 either way (about 146 million years) are taken as
/// this: far enough for any retention, near enough that no difference overflows.
const FAR_MS: i64 = 1 << 62;

/// A status ZSET score (unix ms, as the server stores it: any double, `inf` and `-inf` included) as
/// unix ms, clamped to `±FAR_MS`; `None` for NaN, which no ZSET holds.
pub fn score_ms(ms: f64) -> Option<i64> {
    if ms.is_nan() {
        return None;
    }
    Some(ms.clamp(-(FAR_MS as f64), FAR_MS as f64) as i64)
}

/// A snapshot's own `status` and `last_updated`, for layouts (or flows) without a status index.
pub struct SnapshotFacts(Value);

impl SnapshotFacts {
    pub fn parse(snapshot: &[u8]) -> Result<Self, FlowError> {
        serde_json::from_slice(snapshot)
            .map(SnapshotFacts)
            .map_err(|e| FlowError::Unreadable(format!("snapshot is not JSON: {e}")))
    }

    pub fn status(&self) -> Option<&str> {
        self.0.get("status").and_then(Value::as_str)
    }

    /// `last_updated` in unix ms.
    pub fn last_update_ms(&self) -> Result<i64, FlowError> {
        let stamp = self
            .0
            .get("last_updated")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                FlowError::Unreadable("no status score and no last_updated in the snapshot".into())
            })?;
        clock::parse_rfc3339_ms(stamp).ok_or_else(|| {
            FlowError::Unreadable(format!("last_updated {stamp:?} is not a timestamp"))
        })
    }

    /// The whole rule on the snapshot alone (the sweep's SCAN arm).
    pub fn eligible(&self, layout: &Layout, window: &Window) -> bool {
        let status = self.status().unwrap_or_default();
        self.last_update_ms()
            .and_then(|last| check(layout, status, last, window))
            .is_ok()
    }
}
