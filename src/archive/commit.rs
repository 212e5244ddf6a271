//! Commit: after a verified upload, on the main thread and in the flow's DB, proves the flow is unchanged
//! (its keys hold what the archive holds, `proof`; its watch saw no flush, swap or followed write),
//! records the index entry and removes the flow, exactly as the engine removes one. Every write goes
//! through the server's own commands with replication on, so replicas and the AOF receive them in one
//! MULTI/EXEC (all writes of one main-thread step are propagated together).
//!
//! All or nothing: every precondition of every write (the node is a writable, unpaused primary; the
//! caller's ACL; the type of every key touched; on a cluster, the slot) is checked in the same step
//! before the first write, so no write can fail after another has landed.
//!
//! The sweep commits several flows per main-thread step (`commit_many`): each flow still runs the whole
//! of `commit`, checks before writes, so a flow that fails its checks stays live and the others go on;
//! all writes of the step, of every flow committed in it, reach replicas and the AOF as one MULTI/EXEC.

use redis_module::{Context, ContextFlags, KeyType};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::archive::capture::Capture;
use crate::archive::guard;
use crate::archive::proof::{self, Fingerprint};
use crate::format::captured::Captured;
use crate::index::{self, Object};
use crate::layout::Layout;
use crate::ops::errors::{self, FlowError};
use crate::ops::metrics::Stage;
use crate::runtime::acl::Caller;
use crate::runtime::cluster;
use crate::runtime::mainthread;
use crate::runtime::server::{call_replicated, hash_get, integer, type_of, zset_score};

/// How long a commit waits for paused writes to resume, and how often it looks.
const PAUSE_WAIT: Duration = Duration::from_secs(10);
const PAUSE_RETRY: Duration = Duration::from_millis(50);

/// Writes may land here now: a primary (a demoted node would delete on itself only), and not while
/// writes are paused (`CLIENT PAUSE WRITE`, a failover): a propagated write then trips a server
/// assertion.
fn writable(ctx: &Context) -> Result<(), FlowError> {
    let flags = ctx.get_flags();
    if flags.contains(ContextFlags::SLAVE) || !flags.contains(ContextFlags::MASTER) {
        return Err(FlowError::NotWritable(errors::NOT_PRIMARY));
    }
    // SAFETY: a plain query of server state, on the main thread.
    let paused = unsafe { redis_module::raw::RedisModule_AvoidReplicaTraffic.map_or(0, |f| f()) };
    if paused != 0 {
        return Err(FlowError::NotWritable(errors::WRITES_PAUSED));
    }
    Ok(())
}

/// Re-reads the flow's entries in engine-wide indexes (shared keys, touched by every flow).
fn unchanged(ctx: &Context, flow: &Captured, layout: &Layout) -> Result<bool, FlowError> {
    let member = flow.keys.member.as_bytes();
    if let Some(hash) = &flow.keys.status_hash {
        // A status hash without this flow's entry was accepted at capture through the snapshot.
        if let Some(now) = hash_get(ctx, hash, member)? {
            if now != flow.status.as_bytes() {
                return Ok(false);
            }
        }
    }
    if let Some(set) = layout.status_set_key(&flow.id, &flow.status) {
        // The scores are compared bit for bit.
        if zset_score(ctx, &set, member)?.map(f64::to_bits) != flow.status_score.map(f64::to_bits) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Refuses a flow the engine's own archiver holds (its lease key exists): it is left to that archiver.
/// The guard checked, in the same step, that the caller may read the lease.
fn unleased(ctx: &Context, flow: &Captured) -> Result<(), FlowError> {
    match (flow.keys.lease.as_ref()).filter(|k| type_of(ctx, k) != KeyType::Empty) {
        Some(lease) => Err(FlowError::Leased(lease.clone())),
        None => Ok(()),
    }
}

/// Takes the flow out of the engine's status and label indexes, as the engine does when it removes a
/// flow (part of the commit, after its checks).
fn unindex(ctx: &Context, flow: &Captured, layout: &Layout) -> Result<(), FlowError> {
    let member = flow.keys.member.as_bytes();
    if let Some(set) = layout.status_set_key(&flow.id, &flow.status) {
        write(ctx, "ZREM", &[set.as_bytes(), member])?;
    }
    if let Some(hash) = &flow.keys.status_hash {
        write(ctx, "HDEL", &[hash.as_bytes(), member])?;
    }
    for (label, value) in &flow.labels {
        let Some(set) = layout.label_set_key(&flow.id, label, value) else {
            continue;
        };
        write(ctx, "SREM", &[set.as_bytes(), member])?;
        if let Some(values) = layout.label_values_key(&flow.id, label) {
            // The engine drops a label value once no flow carries it.
            if type_of(ctx, &set) == KeyType::Empty {
                write(ctx, "SREM", &[values.as_bytes(), value.as_bytes()])?;
            }
        }
    }
    Ok(())
}

fn write(ctx: &Context, cmd: &str, args: &[&[u8]]) -> Result<i64, FlowError> {
    let reply = call_replicated(ctx, cmd, args)
        .map_err(|e| FlowError::Internal(format!("{cmd} failed during commit: {e}")))?;
    Ok(integer(&reply).unwrap_or(0))
}

/// Verifies, indexes and deletes. Nothing is written unless every check passes.
fn commit(
    ctx: &Context,
    capture: &Capture,
    archived: &Fingerprint,
    layout: &Layout,
    location: &str,
) -> Result<(), FlowError> {
    let Capture {
        flow,
        previous,
        caller,
        watch,
        motion,
        ..
    } = capture;
    writable(ctx)?;
    if watch.changed() || !unchanged(ctx, flow, layout)? || !proof::unchanged(ctx, flow, archived)?
    {
        return Err(FlowError::Changed);
    }
    // Every key the commit reads or writes is checked as the keys of one command, as at capture: the
    // index and lease reads below are then implied by the guard's joined check, not asked again.
    let caller = caller.one_command();
    let caller: &Caller = &caller;
    let object = Object::At(location);
    let slot = guard::check(ctx, caller, flow, previous.as_ref(), layout, object)?;
    // On a cluster: still this node's slot, not moving, and no migration of it since the capture.
    cluster::check_commit(ctx, slot, *motion)?;
    // The index still names what it named at capture: nothing, or the earlier incarnation this
    // archive records as its predecessor.
    let indexed = index::find(ctx, caller, &flow.keys, &flow.id)?;
    if indexed != *previous {
        return Err(indexed.map_or(FlowError::Changed, |e| FlowError::Conflict(e.location)));
    }
    // The engine's own archiver may have taken the flow meanwhile.
    unleased(ctx, flow)?;
    // From here every write is certain to succeed. Our own deletes may raise keyspace events on
    // followed keys; the watch is dropped by the caller afterwards.
    // An earlier incarnation's entry is replaced: in place in the configured format, else removed from
    // the other one, so no conversion can bring it back over this one.
    let replacing = previous
        .as_ref()
        .is_some_and(|entry| index::written_in_place(entry, &flow.keys, location, &flow.id));
    if let Some(previous) = previous.as_ref().filter(|_| !replacing) {
        index::remove(ctx, previous, |cmd, args| write(ctx, cmd, args))?;
    }
    index::record(
        ctx,
        &flow.keys,
        &flow.id,
        location,
        replacing,
        |cmd, args| write(ctx, cmd, args),
    )?;
    unindex(ctx, flow, layout)?;
    let own: Vec<&[u8]> = flow.keys.own().map(str::as_bytes).collect();
    // UNLINK frees a long event log off the main thread.
    write(ctx, "UNLINK", &own)?;
    // Success is answered only for an entry that reads back as written.
    let recorded = index::find(ctx, &Caller::Server, &flow.keys, &flow.id)?;
    if recorded.map(|e| e.location).as_deref() != Some(location) {
        return Err(FlowError::Unindexed(location.to_string()));
    }
    Ok(())
}

/// A flow waiting for its commit: the caller's tag for it, its capture, what the object holds of its
/// keys, and the object's location.
pub type Pending<T> = (T, Capture, Fingerprint, String);

/// `commit` of one pending flow, in a main-thread step in its DB.
pub fn commit_pending<T>(
    ctx: &Context,
    flow: &Pending<T>,
    layout: &Layout,
) -> Result<(), FlowError> {
    let (_, capture, archived, location) = flow;
    commit(ctx, capture, archived, layout, location)
}

/// Commits several captured, stored flows of one DB from a worker thread, as many per main-thread step
/// as the step budget (`step-budget-us`) allows. Each flow runs the whole of `commit` on its own: its checks
/// before any of its writes, all or nothing for that flow, and a flow that fails (changed, not allowed,
/// a conflict...) stays live without holding back the others. Writes paused (a failover, `CLIENT
/// PAUSE WRITE`) usually end within seconds: a paused flow is tried again every `PAUSE_RETRY` for up
/// to `PAUSE_WAIT`, then given up with the flow live. Returns every flow's tag with its outcome (one
/// per flow): the longest main-thread stretch spent on it, or why it stays live.
pub fn commit_many<T: Sync>(
    flows: Vec<Pending<T>>,
    layout: &Layout,
) -> Vec<(T, Result<u64, FlowError>)> {
    let paused_until = Instant::now() + PAUSE_WAIT;
    let mut waiting: VecDeque<Pending<T>> = flows.into();
    let mut out = Vec::with_capacity(waiting.len());
    while let Some((_, first, ..)) = waiting.front() {
        let db = first.flow.db;
        let mut held = 0;
        let batch = waiting.make_contiguous();
        let ran = mainthread::step_batch(db, Stage::Commit, &mut held, batch, |ctx, flow| {
            commit_pending(ctx, flow, layout)
        });
        // A step that could not run (no event loop) or panicked fails every flow still waiting (one
        // the panicking step had committed already is found archived by the next sweep).
        let results = ran.unwrap_or_else(|e| {
            let failed = |_| Err(FlowError::from(e.clone()));
            (0..waiting.len()).map(failed).collect()
        });
        let mut paused = Vec::new();
        for result in results {
            let Some(flow) = waiting.pop_front() else {
                break;
            };
            match result {
                Err(FlowError::NotWritable(errors::WRITES_PAUSED))
                    if Instant::now() < paused_until =>
                {
                    paused.push(flow);
                }
                other => out.push((flow.0, other.map(|()| flow.1.held_us.max(held)))),
            }
        }
        if !paused.is_empty() {
            std::thread::sleep(PAUSE_RETRY);
            // The paused flows go first again, in their order.
            for flow in paused.into_iter().rev() {
                waiting.push_front(flow);
            }
        }
    }
    out
}
