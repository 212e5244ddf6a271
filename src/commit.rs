//! Commit: after a verified upload, on the main thread and in the flow's DB, proves the flow is unchanged,
//! records the index entry and removes the flow, exactly as the engine removes one. Every write goes
//! through the server's own commands with replication on, so replicas and the AOF receive them in one
//! MULTI/EXEC (all writes of one main-thread step are propagated together).
//!
//! All or nothing: every precondition of every write (the node is a writable, unpaused primary; the
//! caller's ACL; the type of every key touched; on a cluster, the slot) is checked in the same step
//! before the first write, so no write can fail after another has landed.

use redis_module::{Context, ContextFlags, KeyType};

use crate::acl::{self, Access, Caller};
use crate::capture::{expect_type, indexed_location, Captured};
use crate::cluster;
use crate::errors::{self, FlowError};
use crate::layout::Layout;
use crate::server::{bytes, call, call_replicated, integer, type_of};
use crate::watch::Watch;

/// One key the commit touches: what it must hold and what is done to it.
pub struct Touched {
    pub key: String,
    pub expected: KeyType,
    pub access: Access,
}

/// Every key the commit of `flow` reads or writes, in one list for the ACL, type and slot checks.
pub fn touched(flow: &Captured, layout: &Layout) -> Vec<Touched> {
    let keys = &flow.keys;
    let entry = |key: &str, expected, access| Touched {
        key: key.to_string(),
        expected,
        access,
    };
    let mut out = vec![
        entry(&keys.events, KeyType::List, Access::Remove),
        entry(&keys.snapshot, KeyType::String, Access::Remove),
    ];
    out.extend(
        keys.seq
            .iter()
            .map(|k| entry(k, KeyType::String, Access::Remove)),
    );
    out.extend(
        keys.labels
            .iter()
            .map(|k| entry(k, KeyType::Hash, Access::Remove)),
    );
    out.push(entry(&keys.index, KeyType::Hash, Access::Add));
    out.extend(
        keys.status_hash
            .iter()
            .map(|k| entry(k, KeyType::Hash, Access::Remove)),
    );
    if let Some(set) = layout.status_set_key(&flow.id, &flow.status) {
        out.push(entry(&set, KeyType::ZSet, Access::Remove));
    }
    for (label, value) in &flow.labels {
        if let Some(set) = layout.label_set_key(&flow.id, label, value) {
            out.push(entry(&set, KeyType::Set, Access::Remove));
        }
        if let Some(values) = layout.label_values_key(&flow.id, label) {
            out.push(entry(&values, KeyType::Set, Access::Remove));
        }
    }
    out
}

/// The caller may touch every key, each holds its expected type (or nothing), and on a cluster all of
/// them sit in one slot this node serves.
pub fn preconditions(ctx: &Context, caller: &Caller, touched: &[Touched]) -> Result<(), FlowError> {
    for t in touched {
        acl::check(ctx, caller, &t.key, t.access)?;
        expect_type(ctx, &t.key, &t.expected)?;
    }
    let keys: Vec<&str> = touched.iter().map(|t| t.key.as_str()).collect();
    cluster::check(ctx, &keys)
}

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

/// Re-reads what the watch cannot see: the flow's entries in engine-wide indexes (shared keys are
/// touched by every flow, so they are compared, not watched).
fn unchanged(ctx: &Context, flow: &Captured, layout: &Layout) -> Result<bool, FlowError> {
    if let Some(hash) = &flow.keys.status_hash {
        let reply = call(ctx, "HGET", &[hash.as_bytes(), flow.keys.member.as_bytes()])?;
        // A status hash without this flow's entry was accepted at capture through the snapshot.
        if let Some(now) = bytes(&reply) {
            if now != flow.status.as_bytes() {
                return Ok(false);
            }
        }
    }
    if let Some(set) = layout.status_set_key(&flow.id, &flow.status) {
        let reply = call(
            ctx,
            "ZSCORE",
            &[set.as_bytes(), flow.keys.member.as_bytes()],
        )?;
        let now = bytes(&reply).map(|b| String::from_utf8_lossy(&b).into_owned());
        if now != flow.status_score {
            return Ok(false);
        }
    }
    Ok(true)
}

fn write(ctx: &Context, cmd: &str, args: &[&[u8]]) -> Result<i64, FlowError> {
    let reply = call_replicated(ctx, cmd, args)
        .map_err(|e| FlowError::Internal(format!("{cmd} failed during commit: {e}")))?;
    Ok(integer(&reply).unwrap_or(0))
}

/// Verifies, indexes and deletes. Nothing is written unless every check passes.
pub fn commit(
    ctx: &Context,
    caller: &Caller,
    flow: &Captured,
    watch: &Watch,
    layout: &Layout,
    location: &str,
) -> Result<(), FlowError> {
    writable(ctx)?;
    if watch.changed() || !unchanged(ctx, flow, layout)? {
        return Err(FlowError::Changed);
    }
    preconditions(ctx, caller, &touched(flow, layout))?;
    if let Some(existing) = indexed_location(ctx, &flow.keys, &flow.id)? {
        return Err(FlowError::Conflict(existing));
    }
    // From here every write is certain to succeed. Our own deletes raise keyspace events on the
    // watched keys; the watch is dropped by the caller afterwards.
    let id = flow.id.as_bytes();
    let member = flow.keys.member.as_bytes();
    write(
        ctx,
        "HSET",
        &[flow.keys.index.as_bytes(), id, location.as_bytes()],
    )?;
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
    let own: Vec<&[u8]> = flow.keys.own().map(str::as_bytes).collect();
    // UNLINK frees a long event log off the main thread.
    write(ctx, "UNLINK", &own)?;
    Ok(())
}
