//! Commit: after a verified upload, on the main thread and in the flow's DB, proves the flow is unchanged,
//! records the index entry and removes the flow, exactly as the engine removes one. Every write goes
//! through the server's own commands with replication on, so replicas and the AOF receive them in one
//! MULTI/EXEC (all writes of one main-thread step are propagated together).

use redis_module::{Context, KeyType};

use crate::capture::{indexed_location, Captured};
use crate::errors::FlowError;
use crate::layout::Layout;
use crate::server::{bytes, call, call_replicated, integer, type_of};
use crate::watch::Watch;

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
    flow: &Captured,
    watch: Watch,
    layout: &Layout,
    location: &str,
) -> Result<(), FlowError> {
    if watch.changed() || !unchanged(ctx, flow, layout)? {
        return Err(FlowError::Changed);
    }
    if let Some(existing) = indexed_location(ctx, &flow.keys, &flow.id)? {
        return Err(FlowError::Conflict(existing));
    }
    // Our own deletes raise keyspace events for the watched keys: stop watching first.
    drop(watch);

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
    let mut own: Vec<&[u8]> = vec![flow.keys.events.as_bytes(), flow.keys.snapshot.as_bytes()];
    own.extend(flow.keys.seq.as_deref().map(str::as_bytes));
    own.extend(flow.keys.labels.as_deref().map(str::as_bytes));
    // UNLINK frees a long event log off the main thread.
    write(ctx, "UNLINK", &own)?;
    Ok(())
}
