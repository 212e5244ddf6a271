//! Valkey Cluster. A flow lives in the slot of its id: every key of the layout carries `{$id}` as hash
//! tag (or is absent), and the archive index is one hash per slot, `<index-key>:{N}` with N the
//! smallest non-negative integer whose decimal text hashes to that slot, so the index entry is
//! written by the commit that deletes the flow, in one slot, on the node that owns it.
//!
//! `FLOWARCHIVE.FLOW` and `GET` declare the flow id as a routing-only key (`commands`: key spec flag
//! `NOT_KEY`, read-only, argument 1; cluster clients and the server route by it, ACL checks and
//! `COMMAND GETKEYS` see no key), so a wrong node answers `-MOVED`. A commit proves, in the same main-thread step as its writes, that this node still serves
//! the flow's slot as primary, that the slot is not being migrated (classic `MIGRATING`/`IMPORTING`
//! or a Valkey 9 atomic slot migration), and that no atomic migration of that slot began or ended
//! since the capture; anything else abandons the archive with the flow live. (A classic migration
//! moves the flow's keys with MIGRATE, which deletes them here: the commit finds them gone.)
//!
//! On a server without cluster mode nothing here changes behaviour.

use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use redis_module::{raw, CallReply, Context, ContextFlags};

use crate::ops::errors::{show_key, FlowError};
use crate::runtime::server::call;
use crate::slot::{self, tags, SLOTS};
pub use crate::slot::{enabled, key_slot};
use crate::sync::lock;

/// At load: remembers cluster mode, builds the slot tag table and follows atomic slot migrations.
pub fn init(ctx: &Context) {
    slot::set_enabled(ctx.get_flags().contains(ContextFlags::CLUSTER));
    if enabled() {
        slot::build_tags();
        subscribe_slot_migrations(ctx);
    }
}

// ------------------------------------------------------------------ placement

/// Where a flow's keys must live on a cluster: the slot of its id. Refuses an id whose braces would
/// move its keys' hash tag, and any key (named by the template it comes from) outside that slot.
pub fn placement<'k>(
    id: &str,
    keys: impl IntoIterator<Item = (&'static str, &'k str)>,
) -> Result<Option<u16>, FlowError> {
    if !enabled() {
        return Ok(None);
    }
    if id.contains(['{', '}']) {
        return Err(FlowError::Cluster(
            "the id contains '{' or '}', which would break the {$id} hash tag of its keys and place them in another slot".into(),
        ));
    }
    let slot = key_slot(id.as_bytes());
    for (template, key) in keys {
        let at = key_slot(key.as_bytes());
        if at != slot {
            return Err(FlowError::Cluster(format!(
                "template {template} gives key {} in slot {at}, not the flow's slot {slot}; on a cluster every template must carry {{$id}} as hash tag or be empty",
                show_key(key)
            )));
        }
    }
    Ok(Some(slot))
}

// ------------------------------------------------------------------ slot motion

/// Bumped for every slot an atomic slot migration starts, completes or aborts on: a capture remembers
/// its slot's value, the commit refuses if it changed.
static MOTION: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];

/// One atomic slot migration in flight on this node (import or export): job name and slot ranges.
type Job = (Vec<u8>, Vec<(u16, u16)>);

static IN_FLIGHT: Mutex<Vec<Job>> = Mutex::new(Vec::new());

/// Atomic slot migrations this node has seen start (import or export).
static MIGRATIONS_SEEN: AtomicU32 = AtomicU32::new(0);

/// INFO: whether this is a cluster node, atomic slot migrations seen to start here, and the slots in
/// one now.
fn fields() -> Vec<(String, i64)> {
    let moving: usize = lock(&IN_FLIGHT)
        .iter()
        .flat_map(|(_, ranges)| ranges)
        .map(|&(a, b)| (b - a) as usize + 1)
        .sum();
    vec![
        ("cluster_enabled".into(), enabled() as i64),
        (
            "cluster_slot_migrations_seen".into(),
            MIGRATIONS_SEEN.load(Ordering::Relaxed) as i64,
        ),
        ("cluster_slots_migrating".into(), moving as i64),
    ]
}

#[linkme::distributed_slice(crate::ops::info::INFO_FIELDS)]
static CLUSTER_FIELDS: crate::ops::info::Fields = fields;

/// The motion generation of `slot` (0 outside cluster mode).
pub fn motion(slot: Option<u16>) -> u32 {
    slot.map_or(0, |s| MOTION[s as usize].load(Ordering::Acquire))
}

// Valkey 9's atomic slot migration event (valkeymodule.h): id 19, subevents import/export
// started (0/1), aborted (2/3), completed (4/5); data `ValkeyModuleAtomicSlotMigrationInfo`.
const EVENT_ATOMIC_SLOT_MIGRATION: u64 = 19;
const NODE_ID_LEN: usize = 40;

#[repr(C)]
struct SlotRange {
    start: c_int,
    end: c_int,
}

#[repr(C)]
struct SlotMigrationInfo {
    version: u64,
    job_name: [c_char; NODE_ID_LEN + 1],
    slot_ranges: *const SlotRange,
    num_slot_ranges: u32,
}

fn subscribe_slot_migrations(ctx: &Context) {
    let event = raw::RedisModuleEvent {
        id: EVENT_ATOMIC_SLOT_MIGRATION,
        dataver: 1,
    };
    // SAFETY: called from OnLoad with the module's context; the callback has the signature the API
    // declares and is a plain function that lives as long as the module. A server without the event
    // refuses the subscription (Valkey 8 has classic resharding only, checked at commit).
    unsafe {
        if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
            subscribe(ctx.ctx, event, Some(on_slot_migration));
        }
    }
}

extern "C" fn on_slot_migration(
    _ctx: *mut raw::RedisModuleCtx,
    _eid: raw::RedisModuleEvent,
    subevent: u64,
    data: *mut c_void,
) {
    if data.is_null() {
        return;
    }
    // SAFETY: the server passes a live ValkeyModuleAtomicSlotMigrationInfo (version 1) for this event,
    // valid for the duration of the callback, which `SlotMigrationInfo` mirrors field for field
    // (`repr(C)`); only its documented fields are read, `slot_ranges` as the array of
    // `num_slot_ranges` entries the header declares.
    let (job, ranges) = unsafe {
        let info = &*(data as *const SlotMigrationInfo);
        let job: Vec<u8> = info
            .job_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        let ranges: Vec<(u16, u16)> = if info.slot_ranges.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(info.slot_ranges, info.num_slot_ranges as usize)
                .iter()
                .filter(|r| 0 <= r.start && r.start <= r.end && (r.end as usize) < SLOTS)
                .map(|r| (r.start as u16, r.end as u16))
                .collect()
        };
        (job, ranges)
    };
    for &(start, end) in &ranges {
        for slot in start..=end {
            MOTION[slot as usize].fetch_add(1, Ordering::AcqRel);
        }
    }
    let mut in_flight = lock(&IN_FLIGHT);
    in_flight.retain(|(name, _)| *name != job);
    if subevent <= 1 {
        MIGRATIONS_SEEN.fetch_add(1, Ordering::Relaxed);
        in_flight.push((job, ranges));
    }
}

fn in_atomic_migration(slot: u16) -> bool {
    lock(&IN_FLIGHT)
        .iter()
        .flat_map(|(_, ranges)| ranges)
        .any(|&(a, b)| (a..=b).contains(&slot))
}

// ------------------------------------------------------------------ ownership

/// Two keys of `slot` that never hold data: the probe of `serves`.
fn probe_keys(slot: u16) -> [String; 2] {
    let tag = tags()[slot as usize];
    [1, 2].map(|n| format!("flowarchive:slot-probe-{n}:{{{tag}}}"))
}

/// Whether this node may archive from `slot` now, asked of the server's own routing: a module call
/// on a cluster node is refused unless the node would serve it to the client, which it does only for
/// a slot it serves. The probe reads two keys of the slot that do not exist, so a replica redirects
/// (to its primary), a migrating slot redirects (ASK: the keys are missing here), an importing slot
/// redirects or, for an ASKING client, answers TRYAGAIN (several keys, missing), and a failed cluster
/// refuses. Atomic slot migrations (Valkey 9) are followed through their server events. One O(1)
/// call, and no `CLUSTER SLOTS`/`NODES` (Valkey 8.0 crashes answering those to a module outside a
/// command).
fn serves(ctx: &Context, slot: u16) -> Result<(), String> {
    if in_atomic_migration(slot) {
        return Err("the flow's slot is being migrated".into());
    }
    let [a, b] = probe_keys(slot);
    // A call the cluster refuses returns no reply at all (an error only with the `E` flag): anything
    // but the count is a refusal.
    match call(ctx, "EXISTS", &[a.as_bytes(), b.as_bytes()]) {
        Ok(CallReply::I64(_)) => Ok(()),
        Ok(_) => Err("this node does not serve the flow's slot now".into()),
        Err(why) => Err(format!(
            "this node does not serve the flow's slot now ({why})"
        )),
    }
}

/// The reply to a read that cannot tell "not found" now (its slot is being migrated): clients retry
/// on `TRYAGAIN`, as for a multi-key command in a migrating slot.
pub fn try_again(id: &str) -> String {
    format!(
        "TRYAGAIN flow {} is in a slot being migrated to or from this node; retry",
        crate::ops::errors::show_id(id)
    )
}

/// Whether the snapshot key `key` (found by a sweep's SCAN) is in a slot this node may archive from.
pub fn serves_key(ctx: &Context, key: &str) -> bool {
    !enabled() || serves(ctx, key_slot(key.as_bytes())).is_ok()
}

/// Whether flows of `slot` may be archived here now (for capture and commit).
pub fn archivable(ctx: &Context, slot: Option<u16>) -> Result<(), FlowError> {
    let Some(slot) = slot else {
        return Ok(());
    };
    serves(ctx, slot).map_err(|why| FlowError::Moved(format!("slot {slot}: {why}")))
}

/// At commit, in the step that writes: the slot is archivable here and no atomic migration of it
/// began or ended since the capture (`motion_at_capture`).
pub fn check_commit(
    ctx: &Context,
    slot: Option<u16>,
    motion_at_capture: u32,
) -> Result<(), FlowError> {
    archivable(ctx, slot)?;
    if motion(slot) != motion_at_capture {
        return Err(FlowError::Moved(format!(
            "slot {} was migrated while the flow was being archived",
            slot.unwrap_or_default()
        )));
    }
    Ok(())
}
