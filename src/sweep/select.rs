//! Sweep selection: finds candidate flows in bounded steps, each one short main-thread step.
//!
//! With a status index, the terminal status ZSETs are read oldest first. The cursor is the last
//! (score, member) returned; the next step finds its place again by rank — `ZCOUNT` below the score,
//! then a binary search among the members tied at that score — so a step costs O(batch + log N) however
//! many flows share one score (an offset into the tie would grow with it). Without a status index, one
//! `SCAN` call per step walks the keys every flow has (the event logs; the snapshots of a layout served
//! from its snapshot). On a cluster node the walk is always the `SCAN` (an
//! engine-wide status set cannot live in every flow's slot): it sees this node's own keys, and keeps
//! only flows of slots this node serves and that are not being migrated.

use std::collections::{HashSet, VecDeque};

use redis_module::{CallReply, Context, RedisError};

use crate::archive::capture;
use crate::archive::eligible::{SnapshotFacts, Window};
use crate::layout::{Layout, StateSource};
use crate::ops::errors::{self, ServerError};
use crate::runtime::acl::{self, Access, Caller};
use crate::runtime::cluster;
use crate::runtime::server::{bytes, call, integer, strings, with_string};

/// Where candidates are found.
enum Source {
    /// The status ZSETs: the index of the one being read, and the last (score as stored, member) seen.
    StatusSets {
        statuses: Vec<String>,
        next: usize,
        after: Option<(String, Vec<u8>)>,
    },
    /// A SCAN over event log (or snapshot) keys, for layouts without a status index. SCAN may return
    /// a key twice; the sweep counts each candidate once (`Recent`).
    Scan { cursor: String, done: bool },
}

/// The candidates a sweep remembers, to count each once: a flow found again within the last
/// `RECENT` candidates (SCAN returns a key twice while the server rehashes; a status change moves a
/// flow later in its ZSET) is passed over. The window keeps a sweep's memory bounded however many
/// flows it walks; a flow found again beyond it is inspected again, and an archived one is then
/// skipped as archived already.
pub struct Recent {
    set: HashSet<String>,
    order: VecDeque<String>,
}

pub const RECENT: usize = 16_384;

impl Recent {
    pub fn new() -> Recent {
        Recent {
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Whether `id` is new to the window (then remembered).
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == RECENT {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

pub struct Selector {
    source: Source,
    want: Want,
    caller: Caller,
}

/// What makes a flow a candidate: terminal and idle long enough in `window`; without a status index,
/// judged from a snapshot read where the server holds it, and only up to `max_bytes` (a larger one
/// is a candidate whose capture refuses it, as any flow too large to read back).
#[derive(Clone, Copy)]
struct Want {
    window: Window,
    max_bytes: u64,
}

impl Selector {
    /// Selects the flows eligible in `window` (terminal, idle long enough) that `caller` may read;
    /// `max_bytes` is the capture's cap (`read-max-bytes`).
    pub fn new(layout: &Layout, window: Window, max_bytes: u64, caller: Caller) -> Self {
        let source = if layout.status_set.is_some() && !cluster::enabled() {
            Source::StatusSets {
                statuses: layout.terminal.clone(),
                next: 0,
                after: None,
            }
        } else {
            Source::Scan {
                cursor: "0".into(),
                done: false,
            }
        };
        Selector {
            source,
            want: Want { window, max_bytes },
            caller,
        }
    }

    /// The next candidates (at most `batch`, possibly none this step); `None` once selection is done.
    pub fn next(
        &mut self,
        ctx: &Context,
        layout: &Layout,
        batch: usize,
    ) -> Result<Option<Vec<String>>, ServerError> {
        let want = self.want;
        match &mut self.source {
            Source::StatusSets {
                statuses,
                next,
                after,
            } => {
                let Some(key) = statuses
                    .get(*next)
                    .and_then(|status| layout.status_set_key("", status))
                else {
                    return Ok(None);
                };
                let cutoff = want.window.cutoff_ms();
                let (ids, exhausted) = status_page(ctx, &key, after, cutoff, batch, layout)?;
                if exhausted {
                    *next += 1;
                    *after = None;
                }
                Ok(Some(ids))
            }
            Source::Scan { cursor, done } => {
                if *done {
                    return Ok(None);
                }
                let ids = scan_step(ctx, &self.caller, layout, cursor, batch, &want)?;
                *done = cursor.as_str() == "0";
                Ok(Some(ids))
            }
        }
    }
}

/// Selection reads the status indexes: the caller must be allowed to read them.
pub fn check_readable(ctx: &Context, caller: &Caller, layout: &Layout) -> Result<(), RedisError> {
    for status in &layout.terminal {
        let Some(key) = layout.status_set_key("", status) else {
            continue;
        };
        if acl::check(ctx, caller, &key, Access::Read).is_err() {
            return Err(RedisError::String(errors::bounded(format!(
                "NOPERM this user has no permissions to read the {} key a sweep selects from",
                errors::show_key(&key)
            ))));
        }
    }
    Ok(())
}

fn zcount(ctx: &Context, key: &str, min: &str, max: &str) -> Result<usize, ServerError> {
    let reply = call(
        ctx,
        "ZCOUNT",
        &[key.as_bytes(), min.as_bytes(), max.as_bytes()],
    )?;
    Ok(integer(&reply).unwrap_or(0).max(0) as usize)
}

/// `ZRANGE key from to WITHSCORES` as (member, score as stored) pairs.
fn by_rank(
    ctx: &Context,
    key: &str,
    from: usize,
    to: usize,
) -> Result<Vec<(Vec<u8>, String)>, ServerError> {
    let (from, to) = (from.to_string(), to.to_string());
    let reply = call(
        ctx,
        "ZRANGE",
        &[
            key.as_bytes(),
            from.as_bytes(),
            to.as_bytes(),
            b"WITHSCORES",
        ],
    )?;
    Ok(strings(&reply)
        .chunks_exact(2)
        .map(|p| (p[0].clone(), String::from_utf8_lossy(&p[1]).into_owned()))
        .collect())
}

/// The rank of the first member after `(score, member)`: members order by score, then by their bytes.
fn rank_after(ctx: &Context, key: &str, score: &str, member: &[u8]) -> Result<usize, ServerError> {
    let mut lo = zcount(ctx, key, "-inf", &format!("({score}"))?;
    let mut hi = lo + zcount(ctx, key, score, score)?;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match by_rank(ctx, key, mid, mid)?.first() {
            Some((m, _)) if m.as_slice() > member => hi = mid,
            Some(_) => lo = mid + 1,
            // The set shrank under us: start from where it ends now.
            None => hi = mid,
        }
    }
    Ok(lo)
}

/// One page of a status ZSET after the cursor, up to `cutoff`; whether this set is exhausted.
fn status_page(
    ctx: &Context,
    key: &str,
    after: &mut Option<(String, Vec<u8>)>,
    cutoff: i64,
    batch: usize,
    layout: &Layout,
) -> Result<(Vec<String>, bool), ServerError> {
    let start = match after {
        Some((score, member)) => rank_after(ctx, key, score, member)?,
        None => 0,
    };
    let page = by_rank(ctx, key, start, start + batch - 1)?;
    let full = page.len() == batch;
    let mut ids = Vec::new();
    for (member, score) in page {
        if score.parse::<f64>().map_or(true, |s| s > cutoff as f64) {
            return Ok((ids, true));
        }
        ids.extend(layout.id_of_member(&String::from_utf8_lossy(&member)));
        *after = Some((score, member));
    }
    Ok((ids, !full))
}

/// One `SCAN` call over the `scanned` keys from `cursor` (advanced): the keys it found.
fn scan(
    ctx: &Context,
    layout: &Layout,
    cursor: &mut String,
    batch: usize,
) -> Result<Vec<Vec<u8>>, ServerError> {
    let pattern = layout.scan_pattern().ok_or(ServerError::Unexpected(
        "the key template a sweep walks cannot be scanned",
    ))?;
    let count = batch.to_string();
    let kind: &[u8] = match layout.state {
        StateSource::Fold => b"list",
        StateSource::Snapshot => b"string",
    };
    let args: [&[u8]; 7] = [
        cursor.as_bytes(),
        b"MATCH",
        pattern.as_bytes(),
        b"COUNT",
        count.as_bytes(),
        b"TYPE",
        kind,
    ];
    let reply = call(ctx, "SCAN", &args)?;
    let CallReply::Array(parts) = &reply else {
        return Err(ServerError::Unexpected("SCAN answered no array"));
    };
    let next_cursor = parts
        .get(0)
        .and_then(|r| r.ok().as_ref().and_then(bytes))
        .unwrap_or_else(|| b"0".to_vec());
    *cursor = String::from_utf8_lossy(&next_cursor).into_owned();
    let keys = match parts.get(1) {
        Some(Ok(keys)) => strings(&keys),
        _ => Vec::new(),
    };
    Ok(keys)
}

/// One SCAN call: the ids whose log's end (or snapshot) says terminal and old enough.
fn scan_step(
    ctx: &Context,
    caller: &Caller,
    layout: &Layout,
    cursor: &mut String,
    batch: usize,
    want: &Want,
) -> Result<Vec<String>, ServerError> {
    let keys = scan(ctx, layout, cursor, batch)?;
    let mut ids = Vec::new();
    for key in keys {
        let key = String::from_utf8_lossy(&key).into_owned();
        let Some(id) = layout.id_of_scanned_key(&key) else {
            continue;
        };
        // On a cluster, keys of slots this node may not archive from now (imported and not yet
        // owned, being migrated) are passed over; the capture checks the placement of the others.
        if !cluster::serves_key(ctx, &key) {
            continue;
        }
        // A key the caller may not read is not read here: the flow becomes a candidate whose capture
        // refuses it, so the sweep counts it as skipped for its ACL.
        if acl::check(ctx, caller, &key, Access::Read).is_err() {
            ids.push(id);
            continue;
        }
        let eligible = match layout.state {
            StateSource::Fold => {
                capture::looks_eligible(ctx, caller, layout, &id, &want.window, want.max_bytes)
            }
            StateSource::Snapshot => with_string(ctx, &key, |snapshot| match snapshot {
                Some(s) if s.len() as u64 > want.max_bytes => true,
                Some(s) => SnapshotFacts::parse(s).is_ok_and(|f| f.eligible(layout, &want.window)),
                None => false,
            }),
        };
        if eligible {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_candidates_are_remembered_in_a_bounded_window() {
        let mut recent = Recent::new();
        assert!(recent.insert("a"));
        assert!(!recent.insert("a"), "a duplicate within the window");
        for i in 0..RECENT {
            assert!(recent.insert(&format!("id-{i}")));
        }
        assert_eq!(
            recent.order.len(),
            RECENT,
            "the window never grows past its bound"
        );
        assert_eq!(recent.set.len(), RECENT);
        assert!(recent.insert("a"), "forgotten once out of the window");
        assert!(!recent.insert(&format!("id-{}", RECENT - 1)));
    }
}
