//! Capture: reads one flow's keys natively inside the server, on the main thread.
//!
//! `start` checks eligibility, begins the change watch and reads everything but the tail of a long event
//! log; `read_more` reads the rest in bounded chunks, each in its own short main-thread step, so a flow of
//! 100,000 events never stalls the server in one go. The watch proves nothing changed in between.

use redis_module::{Context, KeyType};
use serde_json::Value;

use crate::acl::{self, Access, Caller};
use crate::clock;
use crate::commit;
use crate::configs::Settings;
use crate::errors::{show_key, FlowError};
use crate::layout::FlowKeys;
use crate::server::{self, bytes, call, strings, type_name, type_of};
use crate::watch::Watch;

/// Events read per main-thread step: about 0.5 MB of typical events, well under a millisecond.
pub const EVENTS_PER_CHUNK: usize = 1024;

/// One flow as read from Valkey.
pub struct Captured {
    pub id: String,
    pub db: i32,
    pub keys: FlowKeys,
    pub events: Vec<Vec<u8>>,
    pub snapshot: Vec<u8>,
    pub seq: Option<i64>,
    pub labels: Vec<(String, String)>,
    pub status: String,
    /// The status ZSET score as stored (the last event's unix ms), if the layout has that index.
    pub status_score: Option<String>,
}

/// A capture in progress: the flow, how long its event log is, and the watch that guards it.
pub struct Capture {
    pub flow: Captured,
    /// On whose behalf: the commit checks this user's ACL again.
    pub caller: Caller,
    pub events_total: usize,
    pub watch: Watch,
    /// The longest single main-thread stretch spent on this flow so far, in microseconds.
    pub held_us: u64,
    /// Bytes read so far, and the most a capture may hold (`read-max-bytes`: an object larger than
    /// reads accept could never be read back, so it is never archived, and memory stays bounded).
    pub bytes: u64,
    pub max_bytes: u64,
}

impl Capture {
    pub fn complete(&self) -> bool {
        self.flow.events.len() >= self.events_total
    }
}

/// What `inspect` found.
pub enum Inspected {
    /// Eligible now: everything but the event log is read.
    Eligible(Box<Captured>, usize),
    /// Not live and already in the index: its location.
    AlreadyArchived(String),
}

pub enum Start {
    Capture(Box<Capture>),
    /// Not live and already in the index: its location.
    AlreadyArchived(String),
}

/// The index entry of a flow, if any.
pub fn indexed_location(
    ctx: &Context,
    keys: &FlowKeys,
    id: &str,
) -> Result<Option<String>, FlowError> {
    expect_type(ctx, &keys.index, &KeyType::Hash)?;
    let reply = call(ctx, "HGET", &[keys.index.as_bytes(), id.as_bytes()])?;
    Ok(bytes(&reply).map(|b| String::from_utf8_lossy(&b).into_owned()))
}

pub fn expect_type(ctx: &Context, key: &str, expected: &KeyType) -> Result<bool, FlowError> {
    match type_of(ctx, key) {
        KeyType::Empty => Ok(false),
        t if &t == expected => Ok(true),
        t => Err(FlowError::WrongType {
            key: key.to_string(),
            found: type_name(&t),
            expected: type_name(expected),
        }),
    }
}

fn read_string(ctx: &Context, key: &str) -> Option<Vec<u8>> {
    let k = ctx.open_key(&server::string(ctx, key.as_bytes()));
    k.read().ok().flatten().map(<[u8]>::to_vec)
}

fn utf8(b: Vec<u8>, what: &str) -> Result<String, FlowError> {
    String::from_utf8(b).map_err(|_| FlowError::Unreadable(format!("{what} is not UTF-8")))
}

/// A live flow's stored snapshot, as stored; `None` when the flow is not live.
pub fn read_live(ctx: &Context, keys: &FlowKeys) -> Result<Option<Vec<u8>>, FlowError> {
    if !expect_type(ctx, &keys.snapshot, &KeyType::String)? {
        return Ok(None);
    }
    Ok(read_string(ctx, &keys.snapshot))
}

/// Checks the flow and begins its capture. `now_ms` and `force` decide the idle check.
pub fn start(
    ctx: &Context,
    caller: &Caller,
    db: i32,
    id: &str,
    settings: &Settings,
    force: bool,
    now_ms: i64,
) -> Result<Start, FlowError> {
    let (flow, events_total) = match inspect(ctx, caller, db, id, settings, force, now_ms)? {
        Inspected::AlreadyArchived(location) => return Ok(Start::AlreadyArchived(location)),
        Inspected::Eligible(flow, total) => (*flow, total),
    };
    let keys = &flow.keys;
    let mut watched: Vec<&str> = vec![&keys.events, &keys.snapshot];
    watched.extend(keys.seq.as_deref());
    watched.extend(keys.labels.as_deref());
    let watch = Watch::start(db, id, &watched).ok_or(FlowError::Busy)?;
    let mut capture = Capture {
        flow,
        caller: caller.clone(),
        events_total,
        watch,
        held_us: 0,
        bytes: 0,
        max_bytes: settings.read_max_bytes,
    };
    capture.bytes = capture.flow.snapshot.len() as u64;
    read_more(ctx, &mut capture)?;
    Ok(Start::Capture(Box::new(capture)))
}

/// Every eligibility check of `start`, reading no events and watching nothing (also DRYRUN's test).
pub fn inspect(
    ctx: &Context,
    caller: &Caller,
    db: i32,
    id: &str,
    settings: &Settings,
    force: bool,
    now_ms: i64,
) -> Result<Inspected, FlowError> {
    let layout = &settings.layout;
    let keys = layout.flow_keys(id);
    // Nothing is read before the caller is known to have the rights an archive needs on these keys.
    acl::check_all(ctx, caller, keys.own(), Access::Remove)?;
    acl::check(ctx, caller, &keys.index, Access::Add)?;
    if let Some(hash) = &keys.status_hash {
        acl::check(ctx, caller, hash, Access::Remove)?;
    }
    let has_events = expect_type(ctx, &keys.events, &KeyType::List)?;
    let has_snapshot = expect_type(ctx, &keys.snapshot, &KeyType::String)?;
    let indexed = indexed_location(ctx, &keys, id)?;
    match (has_events || has_snapshot, indexed) {
        (false, Some(location)) => return Ok(Inspected::AlreadyArchived(location)),
        (false, None) => return Err(FlowError::NotFound),
        (true, Some(location)) => return Err(FlowError::Conflict(location)),
        (true, None) => {}
    }
    if !has_snapshot {
        return Err(FlowError::Unreadable(format!(
            "snapshot {} is missing",
            show_key(&keys.snapshot)
        )));
    }
    if !has_events {
        return Err(FlowError::Unreadable(format!(
            "event log {} is missing",
            show_key(&keys.events)
        )));
    }
    let snapshot = read_string(ctx, &keys.snapshot).unwrap_or_default();
    // Parsed lazily: only layouts without a status index need the snapshot's own fields.
    let mut parsed: Option<Value> = None;
    let mut snapshot_field = |name: &str| -> Result<Option<String>, FlowError> {
        if parsed.is_none() {
            let v: Value = serde_json::from_slice(&snapshot)
                .map_err(|e| FlowError::Unreadable(format!("snapshot is not JSON: {e}")))?;
            parsed = Some(v);
        }
        Ok(parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(Value::as_str)
            .map(str::to_string))
    };

    let status = match &keys.status_hash {
        Some(hash) => {
            expect_type(ctx, hash, &KeyType::Hash)?;
            let reply = call(ctx, "HGET", &[hash.as_bytes(), keys.member.as_bytes()])?;
            match bytes(&reply) {
                Some(s) => utf8(s, "status")?,
                None => snapshot_field("status")?.ok_or_else(|| {
                    FlowError::Unreadable(format!("no status in {hash:?} or the snapshot"))
                })?,
            }
        }
        None => snapshot_field("status")?
            .ok_or_else(|| FlowError::Unreadable("snapshot has no status".into()))?,
    };
    if !layout.is_terminal(&status) {
        return Err(FlowError::NotTerminal(status));
    }

    let mut status_score = None;
    if let Some(set) = layout.status_set_key(id, &status) {
        acl::check(ctx, caller, &set, Access::Remove)?;
        expect_type(ctx, &set, &KeyType::ZSet)?;
        let reply = call(ctx, "ZSCORE", &[set.as_bytes(), keys.member.as_bytes()])?;
        status_score = bytes(&reply).map(|b| String::from_utf8_lossy(&b).into_owned());
    }
    let last_update_ms = match status_score.as_deref().and_then(|s| s.parse::<f64>().ok()) {
        Some(ms) => ms as i64,
        None => {
            let stamp = snapshot_field("last_updated")?.ok_or_else(|| {
                FlowError::Unreadable("no status score and no last_updated in the snapshot".into())
            })?;
            clock::parse_rfc3339_ms(&stamp).ok_or_else(|| {
                FlowError::Unreadable(format!("last_updated {stamp:?} is not a timestamp"))
            })?
        }
    };
    let idle_ms = now_ms - last_update_ms;
    if !force && idle_ms < settings.retention_ms {
        return Err(FlowError::TooRecent {
            idle_ms,
            retention_ms: settings.retention_ms,
        });
    }

    let seq = match &keys.seq {
        Some(k) if expect_type(ctx, k, &KeyType::String)? => {
            let raw = utf8(read_string(ctx, k).unwrap_or_default(), "snapshot sequence")?;
            Some(raw.trim().parse::<i64>().map_err(|_| {
                FlowError::Unreadable(format!("snapshot sequence {raw:?} is not an integer"))
            })?)
        }
        _ => None,
    };
    let mut labels = Vec::new();
    if let Some(k) = &keys.labels {
        if expect_type(ctx, k, &KeyType::Hash)? {
            let reply = call(ctx, "HGETALL", &[k.as_bytes()])?;
            for pair in strings(&reply).chunks_exact(2) {
                labels.push((
                    utf8(pair[0].clone(), "a label name")?,
                    utf8(pair[1].clone(), "a label value")?,
                ));
            }
        }
    }
    let len_reply = call(ctx, "LLEN", &[keys.events.as_bytes()])?;
    let events_total = server::integer(&len_reply).unwrap_or(0).max(0) as usize;

    let flow = Captured {
        id: id.to_string(),
        db,
        keys,
        events: Vec::with_capacity(events_total),
        snapshot,
        seq,
        labels,
        status,
        status_score,
    };
    // Every key the commit will touch: the caller's rights, its types and (on a cluster) its slot,
    // now, so an archive that could not commit is refused before anything is uploaded.
    commit::preconditions(ctx, caller, &commit::touched(&flow, layout))?;
    Ok(Inspected::Eligible(Box::new(flow), events_total))
}

/// Reads the next chunk of the event log. Call on the main thread with the flow's DB selected.
pub fn read_more(ctx: &Context, capture: &mut Capture) -> Result<(), FlowError> {
    if capture.watch.changed() {
        return Err(FlowError::Changed);
    }
    let from = capture.flow.events.len();
    let to = (from + EVENTS_PER_CHUNK).min(capture.events_total);
    if from >= to {
        return Ok(());
    }
    let (start, stop) = (from.to_string(), (to - 1).to_string());
    let key = capture.flow.keys.events.as_bytes();
    let reply = call(ctx, "LRANGE", &[key, start.as_bytes(), stop.as_bytes()])?;
    let chunk = strings(&reply);
    capture.bytes += chunk.iter().map(|e| e.len() as u64 + 1).sum::<u64>();
    if capture.bytes > capture.max_bytes {
        return Err(FlowError::Unreadable(format!(
            "the flow is larger than flowarchive.read-max-bytes ({} bytes), so it could not be read back; raise it to archive this flow",
            capture.max_bytes
        )));
    }
    capture.flow.events.extend(chunk);
    // Fewer elements than the range asked for: the list shrank since LLEN.
    if capture.flow.events.len() != to {
        return Err(FlowError::Changed);
    }
    Ok(())
}
